"""Every shipped config composes, and every component in it instantiates."""

from __future__ import annotations

import copy
import json

import hydra
import pytest
from omegaconf import OmegaConf

from tests import config_golden
from tests.conftest import CONF, compose_config, make_nltk_data

GROUPS = ["pruner", "selector", "recovery", "evaluator", "logger", "data", "model"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "model" and option == "local":
        overrides.append("model.path=/nonexistent")
    if group == "data" and option == "jsonl":
        overrides.append("data.path=/nonexistent.jsonl")
    cfg = compose_config(overrides, tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg[group] is not None


@pytest.mark.parametrize("group", ["pruner", "selector", "recovery", "logger"])
def test_components_instantiate(group, tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(make_nltk_data(tmp_path / "nltk_data"))])  # paser_official
    for option in options(group):
        node = OmegaConf.to_container(compose_config([f"{group}={option}"], tmp_path)[group], resolve=True)
        node.pop("calibration", None)  # the pipeline hands calibration windows to prune(), not __init__
        if node.get("_target_") is None:
            continue
        obj = hydra.utils.instantiate(node, _convert_="all")
        assert type(obj).__name__ == node["_target_"].rsplit(".", 1)[-1]


def test_evaluators_instantiate(tmp_path):
    for option in options("evaluator"):
        cfg = compose_config([f"evaluator={option}"], tmp_path)
        built = [hydra.utils.instantiate(node) for node in cfg.evaluator.values() if node is not None]
        assert built and all(hasattr(e, "evaluate") for e in built), option


def test_experiments_compose_and_their_sweeps_name_real_options(tmp_path):
    from paser.compose import compose

    for option in options("experiment"):
        full = compose([f"experiment={option}"], return_hydra_config=True)
        params = {k: [v.strip() for v in str(vals).split(",")] for k, vals in (full.hydra.sweeper.params or {}).items()}
        for key, values in params.items():
            others = [f"{k}={vals[0]}" for k, vals in params.items() if k != key]
            for v in values:  # every value of each swept key, the other keys at their first value
                cfg = compose_config([f"experiment={option}", *others, f"{key}={v}"], tmp_path)
                OmegaConf.resolve(cfg)  # the option exists, or the key is a real config key


# ------------------------------------------------------------- resolved configs: the golden record

GOLDEN_CONFIGS = json.loads(config_golden.GOLDEN.read_text())


def differences(now, want, prefix="") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (nested dicts)."""
    if isinstance(now, dict) and isinstance(want, dict):
        return [d for k in sorted(set(now) | set(want), key=str)
                for d in differences(now.get(k, "<absent>"), want.get(k, "<absent>"), f"{prefix}{k}.")]
    return [] if now == want else [f"{prefix[:-1]}: {want!r} -> {now!r}"]


def intended_changes(preset: str, want: dict) -> dict:
    """The record with the changes made on purpose since it was written, each stated here (not rewritten
    into the record), so that the record stays what conf/ resolved to before the de-duplication.

    #15.2: every data preset instantiates through ``_target_`` and names every loader key (``field_map``
    too), and the embedded default's ``subsample: 1000`` belongs to the Alpaca-family presets, so
    ``data=jsonl`` no longer inherits it (your own pool is used whole unless you say otherwise).

    #16.5: every calibration node names its source (local file or hub shard), sampling and fallback, at
    values that draw the same windows as before (the offline file, each document at most once, an error
    when too few are long enough); the full-edition presets that prune with Wanda or SparseGPT use their
    references' calibration: the hub's C4 shard, documents with replacement, 2048 tokens (SparseGPT) or
    the model's context (Wanda).

    LoRA targets: Baichuan2's q/k/v are one fused layer, adapted as ``W_pack``; Mixtral's experts are no
    Linear layers, so its LoRA adapts the attention projections (recovery refuses a target the model
    lacks, which peft would skip silently).

    #14: LoRA at lr 1e-3 wherever the recipe is not LLM-Pruner's (effective batch 64, which keeps its
    1e-4): 14 steps at 1e-4 closed 4.5% of the embedded default's gap, at 1e-3 31%
    (experiments/recipe_h200). The CPU edition is the measured one: a 5,000-sample pool, effective batch
    16, every perplexity window, and PIQA, ARC-e and HellaSwag on 2,000 seeded documents each.

    #15: LLM-Pruner's two algorithms are two classes: block-wise ``LLMPruner`` (no ``strategy`` key) and
    channel-wise ``LLMPrunerChannel``, which has none of the block-wise keys (GQA, layer ranges).

    #15: the W&B logger's ``artifacts`` (default ``[]``: nothing uploaded).

    #15: PASER's S²RIC knobs and allocation rule live in the ``clustering`` block the hybrids use (one
    file, conf/selector/clustering/s2ric.yaml), so sweeps name ``selector.clustering.<knob>``.

    #16.1: the clustering block's ``nmf_input`` (coordinates, as before); PASER's ``concepts`` (rake) and
    ``ccg_vertices`` (concepts), as before.

    #31: ``budget_unit`` (samples, as before; or tokens).

    #33: the clustering block's ``landmarks_above`` (200,000) and ``landmarks`` (20,000): pools up to
    200,000 rows (every recorded one but LaMini's) get the exact diffusion map, as before.

    #30: every data preset names ``drop_duplicates`` (true: a pool's repeated rows are dropped).

    #37: conf/config.yaml sets no group's keys: the embedded default's LoRA values are the option
    ``recovery=lora_cpu`` (the same values; the CPU editions choose it too), and the paper presets choose
    ``recovery=lora`` whole, so they validate on 2,000 held-out samples every 100 steps as the recipe says
    (the record has the embedded default's 100 samples at the end of each epoch, which the root leaked
    into them).

    #34: the embedded SmolLM2-135M runs at ``dtype: auto`` (bf16 on GPUs and on CPUs with bf16 instructions,
    fp32 on other CPUs, where bf16 is emulated and slower), and so does the embedded default's LoRA
    (``recovery=lora_cpu``; the paper recipe keeps bf16)."""
    from paser.selectors.clustered import CLUSTERING_KEYS

    want = copy.deepcopy(want)
    want["config"].setdefault("budget_unit", "samples")
    if want["config"]["model"].get("name") == "smollm2-135m":
        want["config"]["model"]["dtype"] = "auto"
    selector = want["config"]["selector"]
    if selector.get("_target_") == "paser.selectors.paser.selector.PaserSelector":
        selector["clustering"] = {k: selector.pop(k) for k in CLUSTERING_KEYS if k in selector}
        selector.update(concepts="rake", ccg_vertices="concepts")
    if isinstance(selector.get("clustering"), dict):
        selector["clustering"].setdefault("nmf_input", "coordinates")
        selector["clustering"].update(landmarks_above=200000, landmarks=20000)
    want["sweep"] = [[f"selector.clustering.{k.removeprefix('selector.')}"
                      if k.removeprefix("selector.") in CLUSTERING_KEYS else k, v] for k, v in want["sweep"]]
    if want["config"]["logger"].get("_target_") == "paser.tracking.WandbLogger":
        want["config"]["logger"]["artifacts"] = []
    pruner = want["config"]["pruner"]
    if pruner.pop("strategy", None) == "channel":
        for key in ("gqa", "gqa_grouping", "attention_layers", "mlp_layers"):
            pruner.pop(key)
        pruner["_target_"] = "paser.pruners.llm_pruner_channel.LLMPrunerChannel"
    recovery = want["config"].get("recovery") or {}
    if "lr" in recovery and recovery.get("batch_size") != 64:
        recovery["lr"] = 1e-3
    cpu_edition = preset.endswith("_cpu") or preset == "experiment=cpu_edition"
    if cpu_edition:
        want["config"]["data"]["subsample"] = 5000
        recovery["batch_size"] = 16
    if cpu_edition or preset == "evaluator=cpu_table":
        evaluator = want["config"]["evaluator"]
        evaluator["ppl"]["max_windows"] = None
        evaluator["zeroshot"].update(tasks=["piqa", "arc_easy", "hellaswag"], limit=2000)
    data = want["config"]["data"]
    data.setdefault("_target_", "paser.data.pool_from_config")
    data.setdefault("field_map", None)
    data.setdefault("drop_duplicates", True)
    if preset == "data=jsonl":
        data["subsample"] = None
    calibration = want["config"]["pruner"].get("calibration")
    if calibration is not None:
        for key, value in (("source", "local"), ("hub_id", "allenai/c4"),
                           ("data_files", "en/c4-train.00000-of-01024.json.gz"),
                           ("sampling", "without_replacement"), ("fallback", "error")):
            calibration.setdefault(key, value)
        reference_seqlen = {"experiment=sparsegpt_50": 2048, "experiment=mixtral_8x7b": 2048,
                            "experiment=wanda_2-4": want["config"]["model"]["context_length"]}
        if preset in reference_seqlen:
            calibration.update(source="hub", sampling="with_replacement", seqlen=reference_seqlen[preset])
    if want["choices"].get("recovery") == "lora":
        paper = recovery.get("batch_size") == 64
        want["choices"]["recovery"] = "lora" if paper else "lora_cpu"
        if not paper:
            recovery["dtype"] = "auto"
        if paper:
            recovery.update(val_size=2000, eval_every=100)
    lora_targets = {"experiment=baichuan2_7b": ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    "experiment=mixtral_8x7b": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    if preset in lora_targets:
        want["config"]["recovery"]["target_modules"] = lora_targets[preset]
    return want


# Groups whose files this record does not cover (they change on their own schedule): there a preset must
# make the same changes to the group's option as recorded, whatever that option's file now holds.
FOREIGN = ("selector", "recovery")


@pytest.fixture(scope="module")
def default_now():
    return config_golden.resolved("config", "default")["config"]


@pytest.mark.parametrize("preset", sorted(GOLDEN_CONFIGS))
def test_every_preset_resolves_as_recorded(preset, default_now):
    """Each preset (experiment, evaluator, model, pruner, data, logger, the default) resolves to the
    config, sweep (in order) and group choices recorded from conf/ before its de-duplication (tests/data/
    resolved_configs.json; see tests/config_golden.py to regenerate), up to ``intended_changes``. In the
    FOREIGN groups, what the preset changes relative to the default config is compared."""
    group, option = preset.split("=")
    now, want = config_golden.resolved(group, option), intended_changes(preset, GOLDEN_CONFIGS[preset])
    now_cfg, want_cfg = dict(now["config"]), dict(want["config"])
    default_then = intended_changes("config=default", GOLDEN_CONFIGS["config=default"])["config"]
    for node in FOREIGN:
        assert differences(now_cfg.pop(node), default_now[node]) == \
            differences(want_cfg.pop(node), default_then[node]), (preset, node)
    assert differences(now_cfg, want_cfg) == [], preset
    assert now["sweep"] == want["sweep"], preset
    assert now["choices"] == want["choices"], preset


def own_keys(option: str) -> tuple[str, ...]:
    """The top-level keys a *_cpu preset's own file sets after cpu_edition (config groups it overrides
    included), each a deliberate difference from cpu_edition."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{option}.yaml"))
    groups = [next(iter(d)).removeprefix("override /") for d in raw.get("defaults", []) if isinstance(d, dict)]
    return tuple(k for k in [*raw, *groups] if k not in ("defaults", "hydra", "name"))


def test_cpu_editions_are_cpu_edition_plus_a_sweep():
    """A *_cpu preset is its full twin followed by cpu_edition: cpu_edition must replace everything the
    twin sets, so the resolved configs differ from cpu_edition's only in the name (and the sweep), and in
    what the preset's own file sets after it (e.g. fair_comparison_cpu's token budget and evaluator)."""
    base = config_golden.resolved("experiment", "cpu_edition")["config"]
    for option in options("experiment"):
        if option.endswith("_cpu"):
            cfg = config_golden.resolved("experiment", option)["config"]
            named = [f"{key}: 'default' -> '{option}'" for key in ("logger.group", "name")]  # group: ${name}
            own = own_keys(option)
            assert [d for d in differences(cfg, base) if d.split(":")[0].split(".")[0] not in own] == named, option


def test_the_embedded_model_preset_loads_without_hydra():
    """Scripts and tests load conf/model/smollm2-135m.yaml with OmegaConf.load: it stays self-contained
    (no defaults list), equal to the composed model node."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "smollm2-135m.yaml"))
    assert "defaults" not in raw
    assert raw == config_golden.resolved("config", "default")["config"]["model"]


# ------------------------------------------------------------------------ data presets: own keys only

DATA_KEYS = {"_target_", "name", "path", "hub_id", "split", "subsample", "subsample_seed", "field_map",
             "drop_duplicates"}


def own_values(option: str) -> dict:
    """A data preset's values as its files state them (its chain of defaults), paths fixed as in the record."""
    return config_golden.resolved("data", option)["config"]["data"]


@pytest.mark.parametrize("option", options("data"))
def test_each_data_preset_has_exactly_the_loaders_keys(option):
    import inspect

    from paser.data import pool_from_config

    data = own_values(option)
    assert set(data) == DATA_KEYS, option
    params = set(inspect.signature(pool_from_config).parameters) - {"unknown"}
    assert params == DATA_KEYS - {"_target_"}
    assert data["_target_"] == "paser.data.pool_from_config"


@pytest.mark.parametrize("experiment", [None, "table1", "lamini_4pct", "table1_cpu"])
@pytest.mark.parametrize("option", options("data"))
def test_switching_the_data_preset_keeps_none_of_the_others_values(option, experiment):
    """data=<option> on the command line, alone or after an experiment that picks another pool: the data
    node is the option's own, except the keys the experiment itself sets (its pool size)."""
    overrides = [*config_golden.FIXED_PATHS, *config_golden.EXTRA.get(("data", option), []), f"data={option}"]
    if experiment:
        overrides.insert(0, f"experiment={experiment}")
    got = OmegaConf.to_container(compose_config(overrides).data, resolve=True)
    want = own_values(option)
    if experiment:  # paper_setting: the whole pool; cpu_edition: a 5,000-sample slice of whichever pool
        want["subsample"] = {"table1": None, "lamini_4pct": None, "table1_cpu": 5000}[experiment]
    assert got == want


def test_the_embedded_slice_stays_with_alpaca_not_your_own_pool():
    assert own_values("alpaca")["subsample"] == 1000
    assert own_values("jsonl")["subsample"] is None  # it was 1000: config.yaml set it for every pool
    assert own_values("jsonl")["hub_id"] is None and own_values("jsonl")["field_map"] is None


@pytest.mark.parametrize("override,message", [
    ("+data.subsampel=5", r"data\.subsampel is not a key of the data config \(alpaca\); allowed: path, hub_id"),
    ("data.field_map={outptu: response}", r"data\.field_map: \['outptu'\] are not fields.*allowed"),
    ("data.subsample=0.5", r"data\.subsample=0\.5 must be a whole number"),
])
def test_a_bad_data_key_stops_the_run_with_its_name(override, message, tmp_path):
    from paser import pipeline
    from paser.errors import ConfigError

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"i{k}", "input": "", "output": "o"}) + "\n" for k in range(4)))
    with pytest.raises(ConfigError, match=message):
        pipeline.build_components(compose_config([override, "data.hub_id=null", f"data.path={pool}"], tmp_path))


def test_jsonl_without_a_path_says_which_key_to_set(tmp_path):
    from paser import pipeline
    from paser.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.path is not set \(data=jsonl\)"):
        pipeline.build_components(compose_config(["data=jsonl"], tmp_path))


def test_the_hybrids_clustering_block_states_s2rics_own_defaults():
    """conf/selector/clustering/s2ric.yaml and a hybrid built without a block agree: both are the
    defaults of ``s2ric_clusters`` (and proportional allocation)."""
    from paser.selectors.clustered import clustering_defaults

    block = OmegaConf.to_container(OmegaConf.load(CONF / "selector" / "clustering" / "s2ric.yaml"))
    defaults = clustering_defaults()
    assert block == {**defaults, "k_range": list(defaults["k_range"])}


def test_lora_yaml_states_the_recoverys_own_defaults():
    """conf/recovery/lora.yaml (the paper recipe) and LoraRecovery built without arguments agree, so each
    default is stated once (the embedded default's values live in conf/recovery/lora_cpu.yaml, built on it)."""
    import inspect

    from paser.recovery import LoraRecovery

    node = OmegaConf.load(CONF / "recovery" / "lora.yaml")
    params = inspect.signature(LoraRecovery).parameters
    stated = OmegaConf.to_container(node)
    assert stated.pop("_target_") == "paser.recovery.LoraRecovery"
    assert stated.pop("seed") == "${seed}"  # the run's seed, not a default
    assert set(stated) == set(params) - {"seed"}
    assert stated == {k: list(p.default) if isinstance(p.default, tuple) else p.default
                      for k, p in params.items() if k != "seed"}


@pytest.mark.parametrize("preset", [k for k in sorted(GOLDEN_CONFIGS) if k.startswith("experiment=")])
def test_nuggets_prefilter_holds_every_budget_its_presets_sweep(preset):
    """A preset that sweeps a Nuggets selector with ``prefilter`` must give it at least the budget (it scores
    only the prefiltered candidates): table1_cpu once swept nuggets_cpu with 60 candidates for 500 samples and
    failed at selection, after hours of other runs."""
    sweep = dict(GOLDEN_CONFIGS[preset]["sweep"])
    for selector in str(sweep.get("selector", "")).split(","):
        if not selector.startswith("nuggets"):
            continue
        for budget in str(sweep.get("budget", "")).split(",") if "budget" in sweep else [None]:
            overrides = [f"{preset}", f"selector={selector}"] + ([f"budget={budget}"] if budget else [])
            cfg = compose_config(overrides)
            pool, prefilter = cfg.data.subsample, cfg.selector.prefilter
            if prefilter is None:  # every candidate scored
                continue
            assert pool is not None, f"{preset}: a prefiltering Nuggets needs a stated pool size (data.subsample)"
            count = round(cfg.budget * pool) if cfg.budget <= 1 else int(cfg.budget)
            assert count <= prefilter <= pool, (preset, selector, budget, prefilter, count, pool)


# ------------------------------------------------------------------ the recipes the presets promise

# docs/configuration.md ("Config groups", the recovery row): LLM-Pruner's LoRA recipe for every full-edition
# preset, the embedded default's for the default and the CPU editions
PAPER_RECIPE = {"lr": 1e-4, "batch_size": 64, "micro_batch_size": 4, "warmup_steps": 100, "epochs": 2,
                "val_size": 2000, "eval_every": 100}
CPU_RECIPE = {"lr": 1e-3, "batch_size": 16, "micro_batch_size": 4, "warmup_steps": 2, "epochs": 2,
              "val_size": 100, "eval_every": 0}


def built_on(option: str) -> set[str]:
    """The experiment presets ``option`` is built on (its defaults list, transitively), itself included."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{option}.yaml"))
    parents = [d for d in raw.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return {option}.union(*(built_on(p) for p in parents))


CPU_PRESETS = [o for o in options("experiment") if "cpu_edition" in built_on(o)]
PAPER_PRESETS = [o for o in options("experiment") if "paper_setting" in built_on(o) and o not in CPU_PRESETS]


def test_the_preset_families_are_the_ones_the_readme_names():
    assert {"table1", "fair_comparison", "budget_curve", "lamini_4pct", "mixtral_8x7b"} <= set(PAPER_PRESETS)
    assert set(CPU_PRESETS) == {o for o in options("experiment") if o.endswith("_cpu")} | {"cpu_edition"}


@pytest.mark.parametrize("option", PAPER_PRESETS)
def test_every_paper_preset_recovers_with_the_papers_recipe(option):
    recovery = config_golden.resolved("experiment", option)["config"]["recovery"]
    assert {k: recovery[k] for k in PAPER_RECIPE} == PAPER_RECIPE, option


@pytest.mark.parametrize("option", ["default", *CPU_PRESETS])
def test_the_default_and_the_cpu_editions_keep_the_embedded_recipe(option):
    group = "config" if option == "default" else "experiment"
    recovery = config_golden.resolved(group, option)["config"]["recovery"]
    assert {k: recovery[k] for k in CPU_RECIPE} == CPU_RECIPE, option


def test_the_configuration_doc_states_both_recipes():
    doc = (CONF.parent / "docs" / "configuration.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `recovery`"))
    paper = "lr 1e-4, effective batch 64, 100 warm-up steps, 2 epochs, 2,000 held-out samples validated every 100 steps"
    cpu = "lr 1e-3, effective batch 16, 2 warm-up steps, 2 epochs, 100 held-out samples validated at the end of each epoch"
    assert paper in row and cpu in row

"""Every shipped config composes, and every component in it instantiates."""

from __future__ import annotations

import json

import hydra
import pytest
from omegaconf import OmegaConf

from tests import config_golden
from tests.conftest import CONF, compose_config

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
def test_components_instantiate(group, tmp_path):
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
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    for option in options("experiment"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            full = compose(config_name="config", overrides=[f"experiment={option}"], return_hydra_config=True)
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


@pytest.mark.parametrize("preset", sorted(GOLDEN_CONFIGS))
def test_every_preset_resolves_as_recorded(preset):
    """Each preset (experiment, evaluator, model, pruner, data, logger, the default) resolves to the
    config, sweep (in order) and group choices recorded from conf/ before its de-duplication (tests/data/
    resolved_configs.json; see tests/config_golden.py to regenerate after an intended change)."""
    group, option = preset.split("=")
    now, want = config_golden.resolved(group, option), GOLDEN_CONFIGS[preset]
    assert differences(now["config"], want["config"]) == [], preset
    assert now["sweep"] == want["sweep"], preset
    assert now["choices"] == want["choices"], preset


def test_cpu_editions_are_cpu_edition_plus_a_sweep():
    """A *_cpu preset is its full twin followed by cpu_edition: cpu_edition must replace everything the
    twin sets, so the resolved configs differ from cpu_edition's only in the name (and the sweep)."""
    base = config_golden.resolved("experiment", "cpu_edition")["config"]
    for option in options("experiment"):
        if option.endswith("_cpu"):
            cfg = config_golden.resolved("experiment", option)["config"]
            named = [f"{key}: 'default' -> '{option}'" for key in ("logger.group", "name")]  # group: ${name}
            assert differences(cfg, base) == named, option


def test_the_embedded_model_preset_loads_without_hydra():
    """Scripts and tests load conf/model/smollm2-135m.yaml with OmegaConf.load: it stays self-contained
    (no defaults list), equal to the composed model node."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "smollm2-135m.yaml"))
    assert "defaults" not in raw
    assert raw == config_golden.resolved("config", "default")["config"]["model"]

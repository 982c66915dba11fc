"""scripts/capability_recovery.py on two tiny runs (PASER and Random): the held-out samples are cluster
members no run trained on, and the pruned model's per-cluster JSD equals one computed by hand from the
two models' full softmaxes. A run's config is rebuilt from the registered config groups, never instantiated
from its results.json: a crafted ``_target_`` is refused before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from paser.cache import to_plain
from scripts.capability_recovery import load_runs, run_config
from tests.conftest import CONF, ROOT, TINY_RUN, compose_config, requires_shared_data

PER_CLUSTER = 3


def jsd_by_hand(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over positions of ½KL(P‖M) + ½KL(Q‖M), M = (P + Q) / 2, in float64."""
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    m = (p + q) / 2
    kl = lambda a, b: (a * (a / b).log()).sum(-1)
    return float((kl(p, m) / 2 + kl(q, m) / 2).mean())


@requires_shared_data()
def test_capability_recovery_on_a_paser_and_a_random_run(tmp_path):
    from paser import pipeline
    from paser.cache import StageCache
    from paser.data import encode_pool
    from paser.models import load_model, load_saved

    runs = []
    for selector, extra in (("paser", ["selector.clustering.n_clusters=3"]), ("random", [])):
        cfg = compose_config([*TINY_RUN, f"selector={selector}", "data.subsample=40", "budget=8", *extra], tmp_path)
        pipeline.run(cfg, run_dir=tmp_path / selector)
        runs.append(tmp_path / selector)
    out = subprocess.run([sys.executable, "scripts/capability_recovery.py", *map(str, runs), "--per-cluster",
                          str(PER_CLUSTER), "--out", str(tmp_path / "cap")], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "cap" / "capability.json").read_text())
    assert (tmp_path / "cap" / "capability.md").is_file() and (tmp_path / "cap" / "capability.png").is_file()

    labels = np.load(runs[0] / "paser_samples.npz")["labels"]
    trained = {i for r in runs for i in json.loads((r / "selected_indices.json").read_text())}
    held = {int(c): idx for c, idx in data["heldout"].items()}
    assert sorted(held) == sorted(set(labels.tolist()))
    for c, idx in held.items():
        outside = [i for i in np.flatnonzero(labels == c) if i not in trained]
        assert len(idx) == min(PER_CLUSTER, len(outside)) and set(idx) <= set(outside)
    rows = {r["cluster"]: r for r in data["rows"]}
    assert sum(r["trained"]["PASER seed 0"] for r in data["rows"]) == 8
    assert sum(r["trained"]["Random seed 0"] for r in data["rows"]) == 8

    # the pruned model's JSD of one cluster, by hand
    cfg = compose_config([*TINY_RUN, "selector=random", "data.subsample=40", "budget=8"], tmp_path)
    parts = pipeline.build_components(cfg)
    cache = StageCache(cfg.paths.cache_dir)
    dense, tok = load_model(cfg.model, cache, "cpu")
    pruned = load_saved(cache.lookup("pruned", pipeline.Keys.build(cfg, parts).pruned) / "model",
                        dtype=cfg.model.dtype)[0]
    c = next(c for c, idx in held.items() if idx)
    values = []
    with torch.no_grad():
        for e in encode_pool(tok, [parts.pool.rows[i] for i in held[c]], cfg.scoring.cutoff):
            ids = torch.tensor([e.input_ids])
            values.append(jsd_by_hand(dense(ids).logits[0, :-1], pruned(ids).logits[0, :-1]))
    assert rows[c]["jsd pruned"][0] == pytest.approx(np.mean(values), rel=1e-4)


# ------------------------------------------------------------------ configs rebuilt, never instantiated


def _run_folder(tmp_path, config: dict):
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"config": config}))
    (folder / "selected_indices.json").write_text("[]")
    return folder


def _crafted(marker):
    return {"_target_": "builtins.open", "_args_": [str(marker), "w"]}  # leaves the marker file when it runs


@pytest.mark.parametrize("where", ["data.path", "selector", "evaluator.ppl", "scoring.extra"])
def test_a_crafted_target_in_results_json_is_refused_and_never_runs(tmp_path, where):
    config = to_plain(compose_config([*TINY_RUN, "selector=random"], tmp_path))
    marker = tmp_path / "marker"
    parent, _, key = where.rpartition(".")
    (config[parent] if parent else config)[key] = _crafted(marker)
    folder = _run_folder(tmp_path, config)
    with pytest.raises(SystemExit, match="refusing to build it"):
        load_runs([folder], None, None)
    assert not marker.exists()
    out = subprocess.run([sys.executable, "scripts/capability_recovery.py", str(folder)], cwd=ROOT,
                         capture_output=True, text=True, check=False) if where == "data.path" else None
    assert out is None or (out.returncode != 0 and "refusing to build it" in out.stderr and not marker.exists())


def test_a_component_of_another_group_is_refused(tmp_path):
    """A class of this package, but one no registered option of the group gives."""
    config = to_plain(compose_config([*TINY_RUN, "selector=random"], tmp_path))
    config["selector"]["_target_"] = "paser.pruners.magnitude.MagnitudePruner"
    with pytest.raises(SystemExit, match=r"config\.selector names .*MagnitudePruner.*no registered selector option"):
        run_config({"config": config}, None, None)


EXPERIMENTS = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml"))


def test_every_preset_and_option_is_rebuilt_exactly(tmp_path):
    """The composed config of every experiment preset (and of options the presets do not use) comes back
    value for value, so that the rebuilt run has the cache keys of the original."""
    for overrides in [*([f"experiment={e}"] for e in EXPERIMENTS), ["model=tiny-llama", "recovery=none", "pruner=none"],
                      ["model=local", "model.path=/somewhere", "evaluator=zeroshot", "logger=none"],
                      [*TINY_RUN, "selector=paser", "selector.clustering.n_clusters=3", "+selector.extra=1"]]:
        config = to_plain(compose_config(overrides, tmp_path))
        assert to_plain(run_config({"config": config}, None, None)) == config, overrides


def test_keys_a_run_lacks_come_from_the_registered_config(tmp_path):
    """An older run's results.json without a knob added since: it is composed, not copied."""
    config = to_plain(compose_config([*TINY_RUN, "selector=random"], tmp_path))
    del config["scoring"]["batch_size"], config["selector"]["_target_"]
    with pytest.raises(SystemExit, match="refusing"):  # a component whose _target_ went missing is refused too
        run_config({"config": config}, None, None)
    config["selector"]["_target_"] = "paser.selectors.basic.RandomSelector"
    del config["logger"]
    rebuilt = run_config({"config": config}, None, None)
    assert rebuilt.scoring.batch_size == 8 and rebuilt.logger._target_ == "paser.tracking.WandbLogger"


def test_trust_remote_code_a_results_json_turns_on_is_refused_unless_asked(tmp_path):
    config = to_plain(compose_config([*TINY_RUN, "model=local", "model.path=/somewhere"], tmp_path))
    config["model"]["trust_remote_code"] = True
    with pytest.raises(SystemExit, match="model.trust_remote_code=true.*--trust-remote-code"):
        run_config({"config": config}, None, None)
    assert run_config({"config": config}, None, None, trust_remote_code=True).model.trust_remote_code is True
    baichuan = to_plain(compose_config(["experiment=baichuan2_7b"], tmp_path))  # its option sets it
    assert run_config({"config": baichuan}, None, None).model.trust_remote_code is True

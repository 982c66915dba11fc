"""scripts/capability_recovery.py on two tiny runs (PASER and Random): the held-out samples are cluster
members no run trained on, and the pruned model's per-cluster JSD equals one computed by hand from the
two models' full softmaxes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, TINY_RUN, compose_config, requires_shared_data

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

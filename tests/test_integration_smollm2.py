"""The pipeline on the real embedded SmolLM2-135M with small slices of data (slow: ~1-2 min)."""

from __future__ import annotations

import pytest

from paser import pipeline
from tests.conftest import requires_shared_data

pytestmark = [pytest.mark.slow, requires_shared_data()]


def test_smollm2_prune_select_recover_evaluate(compose_cfg, tmp_path):
    cfg = compose_cfg(["logger=none", "pruner=magnitude", "pruner.sparsity=0.3", "selector=random",
                       "data.subsample=24", "budget=8", "recovery.batch_size=4", "recovery.micro_batch_size=4",
                       "recovery.epochs=1", "recovery.warmup_steps=0", "recovery.val_size=4", "evaluator.ppl.max_windows=8"])
    results = pipeline.run(cfg, run_dir=tmp_path / "run")
    m = results["metrics"]
    dense = m["dense"]["ppl"]["wikitext2"]["ppl"]
    # a real pretrained model: far from the uniform-guess perplexity (49,152) of a random one
    assert 5 < dense < 60, dense
    assert m["pruned"]["ppl"]["wikitext2"]["ppl"] > dense  # 30% magnitude pruning hurts
    assert m["recovered"]["ppl"]["wikitext2"]["ppl"] > 1
    assert results["prune"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert results["recovery"]["steps"] == 2
    assert results["config"]["model"]["dtype"] == "bfloat16"

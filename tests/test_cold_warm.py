"""A fresh run and a rerun that finds the LoRA adapter cached evaluate the same recovered model, whatever
model.dtype and recovery.dtype are (issue #30.6: with them unequal a fresh run evaluated the merge in the
recovery dtype, a rerun merged the cached adapter into the model dtype, and the shared metrics key kept
whichever number was stored first: 332.0452 vs 332.0027)."""

from __future__ import annotations

import shutil

import pytest

from paser import pipeline
from tests.conftest import TINY_RUN, requires_shared_data

pytestmark = requires_shared_data()


@pytest.mark.parametrize("model_dtype,recovery_dtype", [("float32", "bfloat16"), ("bfloat16", "float32"),
                                                        ("bfloat16", "bfloat16")])
def test_cold_and_warm_runs_report_the_same_recovered_metrics(compose_cfg, tmp_path, model_dtype, recovery_dtype):
    overrides = TINY_RUN + [f"model.dtype={model_dtype}", f"recovery.dtype={recovery_dtype}"]
    cold = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "cold")
    shutil.rmtree(tmp_path / "cache" / "metrics")  # the adapter stays cached, every evaluation is computed again
    warm = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "warm")
    assert warm["timings"]["recover"]["reused"] and not warm["timings"]["eval_recovered"]["reused"]
    assert warm["metrics"]["recovered"] == cold["metrics"]["recovered"]
    assert warm["metrics"]["recovered"] != cold["metrics"]["pruned"]  # the adapter was applied

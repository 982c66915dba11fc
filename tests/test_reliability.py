"""Reliability: a run killed mid-stage resumes to the same result, damaged cache entries are recomputed,
the same config and seed give identical results, and bad settings fail before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paser import pipeline
from paser.errors import PaserError
from tests.conftest import DATA_DIR, ROOT, TINY_RUN, requires_shared_data

pytestmark = requires_shared_data()
LONG_RECOVERY = ["recovery.epochs=4", "recovery.checkpoint_every=1"]


def cli(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "run.py", *TINY_RUN, *LONG_RECOVERY, f"paths.data_dir={DATA_DIR}",
            f"paths.cache_dir={tmp / 'cache'}", f"paths.output_dir={tmp / 'out'}", *extra]


def results_of(tmp: Path) -> dict:
    [path] = sorted((tmp / "out").rglob("results.json"))
    return json.loads(path.read_text())


def test_sigkill_during_recovery_then_rerun_equals_a_clean_run(tmp_path):
    clean = tmp_path / "clean"
    subprocess.run(cli(clean), cwd=ROOT, check=True, capture_output=True, timeout=600)

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(cli(crashed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    checkpoints = []
    while time.time() < deadline and not checkpoints and proc.poll() is None:
        checkpoints = list((crashed / "cache").glob("adapter/*.work/checkpoint/state.json"))
        time.sleep(0.05)
    assert checkpoints, "the run ended before a LoRA checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((crashed / "out").rglob("results.json"))

    rerun = subprocess.run(cli(crashed), cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    assert "resuming from checkpoint" in rerun.stderr + rerun.stdout
    a, b = results_of(clean), results_of(crashed)
    assert b["timings"]["prune"]["reused"] and b["timings"]["select"]["reused"]
    assert b["metrics"] == a["metrics"]
    assert b["recovery"]["loss_curve"] == a["recovery"]["loss_curve"]


def test_corrupted_pruned_model_is_recomputed_not_loaded(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg(TINY_RUN)
    first = pipeline.run(cfg, run_dir=tmp_path / "a")
    [weights] = (tmp_path / "cache" / "pruned").glob("*/model/*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk
    second = pipeline.run(compose_cfg(TINY_RUN), run_dir=tmp_path / "b")
    assert "damaged" in caplog.text and "model/model.safetensors has 1000 bytes" in caplog.text
    assert not second["timings"]["prune"]["reused"]
    assert second["metrics"]["pruned"] == first["metrics"]["pruned"]


def test_same_config_and_seed_give_identical_results(compose_cfg, tmp_path):
    runs = []
    for k in range(2):
        cfg = compose_cfg(TINY_RUN + [f"paths.cache_dir={tmp_path / f'cache{k}'}"])
        runs.append(pipeline.run(cfg, run_dir=tmp_path / f"run{k}"))
    indices = [json.loads((tmp_path / f"run{k}" / "selected_indices.json").read_text()) for k in range(2)]
    assert indices[0] == indices[1]
    assert runs[0]["metrics"] == runs[1]["metrics"]
    assert runs[0]["recovery"]["loss_curve"] == runs[1]["recovery"]["loss_curve"]
    assert runs[0]["seed"] == 0 and runs[0]["versions"]["transformers"]
    other = pipeline.run(compose_cfg(TINY_RUN + ["seed=1", f"paths.cache_dir={tmp_path / 'c2'}"]),
                         run_dir=tmp_path / "run2")
    assert json.loads((tmp_path / "run2" / "selected_indices.json").read_text()) != indices[0]
    assert other["seed"] == 1


@pytest.mark.parametrize("override,message", [
    ("scoring.cutoff=100000", "scoring.cutoff=100000 exceeds the model context"),
    ("recovery.cutoff=100000", "recovery.cutoff=100000 exceeds the model context"),
    ("recovery.dtype=float16", "float16 is refused"),
    ("pruner.sparsity=0", "strictly between 0 and 1"),
    ("paths.data_dir=/nowhere", "instruction pool not found at '/nowhere/alpaca/alpaca_data.jsonl'"),
])
def test_bad_settings_fail_before_any_work(compose_cfg, tmp_path, override, message):
    cfg = compose_cfg(TINY_RUN + [override])
    with pytest.raises(PaserError, match=message):
        pipeline.run(cfg, run_dir=tmp_path / "r")
    assert not (tmp_path / "cache").exists()

"""The evaluate stage: each model state (dense, pruned, recovered) under every configured evaluator, one
cache entry per state and evaluator kind (adding an evaluator reuses the others), with the evaluator's
per-window / per-document arrays for paired statistics. Concurrent jobs of a sweep share the dense and
pruned evaluations: an evaluation another process is computing is put off until the others are done."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from paser import distributed
from paser.components import evaluate_all
from paser.stages.runner import read_json

if TYPE_CHECKING:
    from paser.pipeline import Run

PER_SAMPLE = "per_sample.npz"  # an evaluator's per-window / per-document arrays, beside metrics.json


def evaluate(run: Run, states: list[tuple[str, dict, object]]) -> dict:
    """{name: {evaluator kind: metrics}} of model states given as (name, state key, model factory), under
    every configured evaluator (rank 0 only). An evaluation that another process is computing is put off
    until the others are done: concurrent jobs of a sweep, which share the dense and pruned evaluations,
    then split them instead of queueing behind the first job."""
    if not distributed.is_main():
        return {}
    evaluators = run.parts.evaluators
    units = [(name, get_model, kind, ev, run.keys.metrics(state, kind, run.cfg.evaluator[kind], ev))
             for name, state, get_model in states for kind, ev in evaluators.items()]
    metrics = {name: {} for name, _, _ in states}
    while units:  # the first evaluation nobody else is computing; when all are, wait for the first
        unit = next((u for u in units if not run.cache.claimed_elsewhere("metrics", u[-1])), units[0])
        units.remove(unit)
        name, get_model, kind, ev, key = unit
        metrics[name][kind] = _evaluate_one(run, name, get_model, kind, ev, key)
    return {name: {kind: m[kind] for kind in evaluators} for name, m in metrics.items()}


def _evaluate_one(run: Run, name: str, get_model, kind: str, ev, key: dict) -> dict:
    def compute():
        return evaluate_all(ev, get_model(), run.models.tok())

    def save(value, d):
        (d / "metrics.json").write_text(json.dumps(value[0], indent=1))
        if value[1]:
            save_per_sample(d / PER_SAMPLE, value[1])

    def load(d):
        return read_json(d / "metrics.json"), load_per_sample(d / PER_SAMPLE) if (d / PER_SAMPLE).is_file() else {}

    metrics, samples = run.cached(
        f"eval_{name}" if len(run.parts.evaluators) == 1 else f"eval_{name}_{kind}", "metrics",
        key, compute=compute, save=save, load=load, ranks="only_main")
    if samples:  # per-window NLL / per-document correctness, for paired statistics (make_tables.py)
        save_per_sample(run.run_dir / "per_sample" / f"{name}_{kind}.npz", samples)
    return metrics


def save_per_sample(path: Path, arrays: dict) -> None:
    """``arrays`` ({name: 1-D array}) as one compressed .npz, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def load_per_sample(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}

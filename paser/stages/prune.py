"""The prune stage: the dense model pruned in place by the configured pruner on its calibration windows,
stored with its report (parameters before and after, time, what it was calibrated on). With pruner=none
the pruned model is the dense one, and only its weight report is cached (``dense_report``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from paser.components import declared
from paser.data import calibration_recipe, calibration_set
from paser.models import save_model
from paser.pruners.common import parameter_count, sparsity_report
from paser.stages.runner import log, read_json

if TYPE_CHECKING:
    from paser.pipeline import Run


def prune(run: Run) -> tuple[Path, dict]:
    """(the pruned model's cache entry, the prune report); a fresh pruning leaves its model in
    ``run.models.pruned``."""
    models, pruner, cfg = run.models, run.parts.pruner, run.cfg

    def compute():
        model, tokenizer = models.take_dense(), models.tok()
        calib, calib_report = None, None
        if declared(pruner, "needs_calibration"):
            recipe = calibration_recipe(cfg.pruner.calibration, cfg.model.get("context_length"))
            calib, calib_report = calibration_set(tokenizer, recipe)  # logs what was used
        params_before = parameter_count(model)
        start = time.time()
        report = pruner.prune(model, calib)
        report.update(params_before=params_before, params_after=parameter_count(model),
                      prune_time_s=round(time.time() - start, 3))
        if calib_report is not None:  # results.json prune.calibration: source, seqlen, sampling, documents
            report["calibration"] = calib_report
        models.pruned = model
        return report

    def save(report, d: Path):
        save_model(models.pruned, models.tok(), d / "model")
        (d / "report.json").write_text(json.dumps(report, indent=1))

    def load(d: Path) -> dict:
        report = read_json(d / "report.json")
        c = report.get("calibration")
        if c:  # the log says what the cached pruning was calibrated on, as a fresh one does
            log.info("calibration (cached pruning): %d windows x %d tokens from %s, %s%s", c["nsamples"],
                     c["seqlen"], c["from"], c["sampling"].replace("_", " "),
                     "".join(f"; {x}" for x in c.get("differs_from_reference") or []))
        return report

    report = run.cached("prune", "pruned", run.keys.pruned, compute, save, load=load)
    return run.cache.entry_dir("pruned", run.keys.pruned), report


def dense_report(run: Run) -> dict:
    """pruner=none: the dense model's sparsity report, cached so that a fully cached run loads no model."""
    return run.cached("prune", "dense_report", run.keys.model,
                      compute=lambda: sparsity_report(run.models.dense()),
                      save=lambda r, d: (d / "report.json").write_text(json.dumps(r, indent=1)),
                      load=lambda d: read_json(d / "report.json"))

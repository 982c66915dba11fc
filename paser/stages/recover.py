"""The recover stage: the configured recovery (LoRA, full fine-tuning) trains the pruned model on the
selection; the cache stores what the recovery's ``save`` writes and its report, and the recovered model is
evaluated as the recovery's ``load`` rebuilds it from that artifact. The pipeline knows no training library:
the recovery owns its artifact (paser.components)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from paser import distributed
from paser.models import load_saved
from paser.stages.runner import log, read_json

if TYPE_CHECKING:
    from paser.pipeline import Run


def adapter_dir(run: Run) -> Path | None:
    """The stored recovery artifact (the folder the recovery's ``save`` wrote, e.g. LoRA's adapter); None with
    recovery=none."""
    key = run.keys.adapter
    return None if key is None else run.cache.entry_dir("adapter", key) / "adapter"


def recover(run: Run, selection: dict, pruned_fn):
    """(factory of the recovered model, recovery report), or (None, None) with recovery=none."""
    recovery = run.parts.recovery
    if recovery is None:
        return None, None
    key = run.keys.adapter
    samples = run.parts.pool.subset(selection["indices"])
    val_samples = run.parts.pool.subset(run.parts.validation)
    # checkpoints live beside the entry until it is stored: a rerun finds and resumes them
    workdir = run.cache.entry_dir("adapter", key).with_suffix(".work")
    box = {}

    def compute():
        box["trained"], report = recovery.recover(_recovery_base(run, pruned_fn), run.models.tok(), samples,
                                                  workdir, val_samples=val_samples)
        return report

    def save(report, d: Path):
        recovery.save(box["trained"], d / "adapter")
        (d / "report.json").write_text(json.dumps(report, indent=1))

    def load(d: Path):
        return read_json(d / "report.json")

    report = run.cached("recover", "adapter", key, compute, save, load, ranks="all")
    if distributed.is_main():
        shutil.rmtree(workdir, ignore_errors=True)
    if _sharded(run):  # a sharded model runs only with every rank: rank 0 evaluates a fresh one
        run.models.drop()

    def recovered():
        """The recovered model for evaluation, as the recovery rebuilds it from its stored artifact on the
        pruned model reloaded as it is stored (in model.dtype, as the pruned model is evaluated; LoRA
        merges its adapter into the weights, so it runs at the pruned model's speed). A fresh run evaluates
        what a rerun that finds the artifact cached does: training cast its copy of the pruned model to
        recovery.dtype, and merging there gave other numbers (issue #30.6)."""
        if "recovered" not in box:
            box.pop("trained", None)
            run.models.drop()
            box["recovered"] = recovery.load(pruned_fn(), adapter_dir(run))
        return box["recovered"]

    return recovered, report


def _sharded(run: Run) -> bool:
    return bool(getattr(run.parts.recovery, "fsdp", False)) and distributed.active()


def _recovery_base(run: Run, pruned_fn):
    """The model LoRA starts from. Under FSDP the earlier stages' models first leave every device, then
    rank 0 reads the pruned weights onto the host and the other ranks build the model on meta: the weights
    are read once and reach the GPUs only as shards (paser.sharding.shard). With pruner=none (no stored
    entry) every rank loads the dense model on its device before sharding."""
    if not _sharded(run):
        return pruned_fn()
    run.models.drop()
    if run.keys.pruner is None:
        return pruned_fn()
    device = "cpu" if distributed.is_main() else "meta"
    log.info("recovery.fsdp: rank %d builds the pruned model on %s%s", distributed.rank(), device,
             "" if device == "meta" else " and broadcasts its weights into every rank's shards")
    model, _ = load_saved(run.pruned_stage[0] / "model", dtype=run.cfg.model.dtype,
                          trust_remote_code=run.cfg.model.get("trust_remote_code", False), device=device)
    return model

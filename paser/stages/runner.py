"""How every stage of a run goes through the stage cache (``StageRunner.cached``): the lookup, the rank
protocol under torchrun, the wait for an entry another process computes, and each stage's time, peak
memory and cache counts (results.json ``timings``). Infrastructure: where a result comes from, never what
it is (paser.fingerprint.INFRASTRUCTURE)."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from paser import distributed
from paser.cache import StageCache
from paser.hardware import StagePeaks
from paser.reporting import stage_doing

# the stages' lines in run.log are the run's: they keep the name they had while the stages lived in paser.pipeline
log = logging.getLogger("paser.pipeline")


class Timer:
    def __init__(self):
        self.stages: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.time()
        entry = {"reused": False, "source": "computed"}
        try:
            yield entry
        finally:
            entry["seconds"] = round(time.time() - start, 3)
            self.stages[name] = entry
            log.info("stage %-14s %7.1f s%s", name, entry["seconds"],
                     {"computed": "", "cache": " (reused from cache)",
                      "other": " (computed by another process)"}[entry["source"]])


class StageRunner:
    """The stage cache, the timer and the peak-memory counters of one run."""

    def __init__(self, cfg: DictConfig, cache: StageCache, device: torch.device):
        self.cfg, self.cache = cfg, cache
        self.timer = Timer()
        self.peaks = StagePeaks(device)

    def cached(self, name: str, stage: str, key: dict, compute, save, load, ranks: str = "main"):
        """The stage's value: ``load(entry)`` of a cached entry, or ``compute()`` stored with
        ``save(value, folder)``. Under torchrun (``ranks``): "main", rank 0 computes and stores while the
        other ranks wait for its entry; "all", every rank runs ``compute`` (it is data parallel inside) and
        the others then take rank 0's stored entry; "only_main", only rank 0 calls this at all."""
        box = {}
        collective = ranks != "only_main"
        log.info("stage %s: %s", name, stage_doing(self.cfg, name))
        with self.timer.stage(name) as t, self.peaks.measure(t):  # peak memory from the stage's start
            before = {k: dict(v) for k, v in self.cache.counts.items()}
            if not distributed.is_main():
                if distributed.broadcast(None) is None and ranks == "all":  # rank 0 found no entry
                    compute()
                entry, source = self._wait_for(stage, key), "other"
            else:
                hit = self.cache.lookup(stage, key)
                if collective:
                    distributed.broadcast(hit)
                if hit is not None:
                    entry, source = hit, "cache"
                else:
                    def write(folder: Path):
                        box["value"] = compute()
                        save(box["value"], folder)

                    entry, source = self.cache.get_or_create(stage, key, write)
            t["source"], t["reused"] = source, source != "computed"
            chunks = _count_diff(before, self.cache.counts)
            if chunks:
                t["chunks"] = chunks
            return box["value"] if "value" in box else load(entry)

    def _wait_for(self, stage: str, key: dict) -> Path:
        """Another rank computes this entry: poll the shared cache until it is there."""
        while (hit := self.cache.lookup(stage, key)) is None:
            time.sleep(1.0)
        return hit


def _count_diff(before: dict, after: dict) -> dict:
    """Per cache stage, the chunks/entries this stage computed, found cached, or took from another process."""
    out = {}
    for stage, counts in after.items():
        diff = {k: v - before.get(stage, {}).get(k, 0) for k, v in counts.items()}
        if any(diff.values()):
            out[stage] = diff
    return out


def read_json(path: Path):
    return json.loads(path.read_text())

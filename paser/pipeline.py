"""One run: prune -> select -> recover -> evaluate.

Every stage's output is cached (paser.cache) under a key of exactly what determines it (``Keys``), so a
sweep over selectors prunes once, a rerun of a finished config loads results instead of recomputing, and
concurrent jobs that share a stage compute it once between them. Models are loaded lazily, on the run's
device (``model.device``): a stage whose result is cached never touches a model. Under torchrun the stages
split their work across ranks as paser.distributed describes.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from paser import distributed
from paser.budget import Budget, check_unit, resolve_budget
from paser.cache import StageCache, config_hash, library_versions, to_plain
from paser.components import (
    Selection,
    SelectionContext,
    declared,
    environment,
    evaluate_all,
    unused_imports,
)
from paser.config_keys import check_top_level_keys
from paser.data import Pool, calibration_recipe, calibration_set, encode_pool, hold_out
from paser.embedding import load_embedder
from paser.errors import ConfigError, DataError, PaserError
from paser.fingerprint import code_version, file_fingerprint
from paser.hardware import StagePeaks, host_facts, resolve_device
from paser.models import load_model, load_saved, load_tokenizer, model_identity, resolve_dtype, save_model
from paser.progress import quiet_library_bars
from paser.pruners.common import parameter_count, sparsity_report
from paser.reporting import (
    WIRING_CHECK,
    component_name,
    log_artifacts,
    log_results,
    prune_record,
    stage_doing,
    summary,
    summary_table,
    write_selected,
)
from paser.tracking import NullLogger, check_fresh, git_commit, run_stamp, set_active, write_results
from paser.validation import check_config

log = logging.getLogger(__name__)


class Models:
    """The dense and pruned models of one run, on the run's device, loaded when first needed. Pruning
    consumes the dense instance (it prunes in place); whoever needs the original model afterwards gets
    a fresh copy from disk. The pruned model is handed over by the prune stage (``pruned``) or loaded
    from its cache entry (``load_pruned``)."""

    def __init__(self, cfg: DictConfig, cache: StageCache, device: torch.device):
        self.cfg, self.cache, self.device = cfg, cache, device
        self._dense = None
        self.pruned = None
        self.tokenizer = None

    def dense(self):
        if self._dense is None:
            self._dense = self.fresh_dense()
        return self._dense

    def take_dense(self):
        model = self.dense()
        self._dense = None
        return model

    def fresh_dense(self):
        return load_model(self.cfg.model, self.cache, self.device)[0]

    def load_pruned(self, entry: Path):
        if self.pruned is None:
            # a remote-code preset (Baichuan) needs its modelling code to rebuild the pruned model too
            self.pruned, _ = load_saved(entry / "model", dtype=self.cfg.model.dtype,
                                        trust_remote_code=self.cfg.model.get("trust_remote_code", False),
                                        device_map=self.cfg.model.get("device_map"), device=self.device)
        return self.pruned

    def tok(self):
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.cfg.model, self.cache)
        return self.tokenizer


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


def _json(path: Path):
    return json.loads(path.read_text())


PER_SAMPLE = "per_sample.npz"  # an evaluator's per-window / per-document arrays, beside metrics.json


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


def _instantiate(node: DictConfig, drop: tuple[str, ...] = ()):
    plain = {k: v for k, v in to_plain(node).items() if k not in drop}
    try:
        return hydra.utils.instantiate(plain, _convert_="all")
    except InstantiationException as e:  # Hydra wraps the component's own error: surface ours as is
        if isinstance(e.__cause__, PaserError):
            raise e.__cause__ from None
        raise


# ---------------------------------------------------------------------------------------- stages


@dataclass
class Components:
    """Everything the config asks for, built (and so validated) before any model is loaded: a typo or
    an impossible value fails in seconds, not after an hour of pruning."""

    pruner: object
    selector: object
    recovery: object | None
    evaluators: dict
    pool: Pool               # all of D
    candidates: Pool         # D without the validation rows: what the selector chooses from
    validation: list[int]    # indices into D of recovery's validation set, one draw for every selector and seed
    budget: int | None       # the sample budget; None with budget_unit=tokens (resolved by Run.budget)
    budget_unit: str


def check_lengths(cfg: DictConfig) -> None:
    """Token cutoffs must fit the model's context (longer samples are truncated to the cutoff and
    counted in the reports)."""
    context = cfg.model.get("context_length")
    for key in ("scoring.cutoff", "recovery.cutoff"):
        value = OmegaConf.select(cfg, key)
        if context and value and value > context:
            raise ConfigError(f"{key}={value} exceeds the model context ({cfg.model.name}: "
                              f"model.context_length={context}); lower it to at most {context}")


def build_components(cfg: DictConfig) -> Components:
    check_top_level_keys(cfg)
    check_config(cfg)  # every value against paser.validation.RULES, before anything is built
    check_lengths(cfg)
    pool = _instantiate(cfg.data)  # paser.data.pool_from_config (conf/data/jsonl.yaml)
    recovery = _instantiate(cfg.recovery) if cfg.recovery.get("_target_") else None
    # every component before the pool is split: an impossible knob is named before a pool-size error
    pruner, selector = _instantiate(cfg.pruner, drop=("calibration",)), _instantiate(cfg.selector)
    evaluators = {kind: _instantiate(node) for kind, node in cfg.evaluator.items() if node is not None}
    candidates, validation = hold_out(pool, declared(recovery, "val_size"), declared(recovery, "val_seed"))
    unit = check_unit(cfg.get("budget_unit", "samples"))
    if unit == "samples":
        budget = resolve_budget(cfg.budget, len(pool))
        if budget > len(candidates):
            raise ConfigError(f"budget={cfg.budget} asks for {budget} samples, but only {len(candidates)} of the "
                              f"{len(pool)} are candidates (recovery.val_size={len(validation)} are held out for "
                              "validation); lower the budget or recovery.val_size, or use selector=full")
    else:
        budget = None
        resolve_budget(cfg.budget, 2**62, unit)  # its form: the token total needs the tokenizer (Run.budget)
    return Components(
        pruner=pruner, selector=selector, recovery=recovery, evaluators=evaluators,
        pool=pool, candidates=candidates, validation=validation, budget=budget, budget_unit=unit)


def trained_cutoff(cfg: DictConfig) -> int:
    """The token cutoff a sample is trained at: what a token budget counts."""
    return int(OmegaConf.select(cfg, "recovery.cutoff") or cfg.scoring.cutoff)


# ---------------------------------------------------------------------------------------- cache keys

SCORING_NEUTRAL_KNOBS = ("batch_size", "embedder_device")  # the scoring block's memory/speed knobs


def knobs(node, neutral=()) -> dict:
    """A config node as plain data without its ``neutral`` keys (knobs that only move memory or speed)."""
    return {k: v for k, v in to_plain(node).items() if k not in neutral}


def calibration_key(c: DictConfig, context_length: int | None = None) -> dict:
    """The calibration windows by what determines them: the recipe (``seqlen`` resolved against the model's
    context), the local file's content (not its path) or the hub shard's name, and the code that draws
    them. ``fallback`` only acts on a local file."""
    r = calibration_recipe(c, context_length)
    key = {"source": r.source, "nsamples": r.nsamples, "seqlen": r.seqlen, "seed": r.seed,
           "sampling": r.sampling, "code": code_version(calibration_set)}
    if r.source == "hub":
        return {**key, "hub": [r.hub_id, r.data_files]}
    if not r.path or not Path(r.path).is_file():
        raise DataError(f"calibration text not found at {r.path}; set pruner.calibration.path to a JSONL "
                        "file with a 'text' field (e.g. a C4 shard)")
    return {**key, "file": file_fingerprint(r.path), "fallback": r.fallback}


def input_files(component) -> dict:
    """Content fingerprints of the files a component declares it reads (``input_files()``), by file name."""
    files = getattr(component, "input_files", None)
    return {Path(f).name: file_fingerprint(f) for f in files()} if callable(files) else {}


@dataclass
class Keys:
    """Every stage's cache key, written once: exactly what determines the artifact (config values the
    component does not declare neutral, input file contents, the source of the implementing code, and
    environment facts that change the result)."""

    model: dict           # the dense model
    pruner: dict | None   # None for pruner=none
    pruned: dict          # the pruned model's state (the dense key for pruner=none)
    selection: dict
    adapter: dict | None

    @classmethod
    def build(cls, cfg: DictConfig, parts: Components) -> Keys:
        model = {"model": model_identity(cfg.model)}
        pruner = None
        if declared(parts.pruner, "changes_model"):
            p = parts.pruner
            pruner = {"config": knobs(cfg.pruner, declared(p, "neutral_knobs") + ("calibration",)),
                      "calibration": calibration_key(cfg.pruner.calibration, cfg.model.get("context_length"))
                      if declared(p, "needs_calibration") else None,
                      "code": code_version(type(p), cut=unused_imports(p))}
        pruned = {**model, "pruner": pruner} if pruner else model
        s = parts.selector
        budget = parts.budget if parts.budget_unit == "samples" else \
            {"unit": "tokens", "value": cfg.budget, "cutoff": trained_cutoff(cfg), "code": code_version(encode_pool)}
        selection = {"state": pruned, "pool": parts.candidates.fingerprint,
                     "selector": knobs(cfg.selector, declared(s, "neutral_knobs")),
                     "environment": environment(s), "files": input_files(s),
                     "budget": budget if declared(s, "uses_budget") else None,
                     "seed": cfg.seed,
                     "scoring": knobs(cfg.scoring, SCORING_NEUTRAL_KNOBS) if declared(s, "uses_scoring") else None,
                     "code": code_version(type(s), cut=unused_imports(s))}
        adapter = None
        if parts.recovery is not None:
            adapter = {"selection": selection,
                       "recovery": knobs(cfg.recovery, declared(parts.recovery, "neutral_knobs")),
                       "code": code_version(type(parts.recovery), cut=unused_imports(parts.recovery))}
        return cls(model=model, pruner=pruner, pruned=pruned, selection=selection, adapter=adapter)

    def metrics(self, state: dict, kind: str, node: DictConfig, evaluator) -> dict:
        """One entry per evaluator kind and model state: adding an evaluator reuses the others."""
        return {"state": state, "evaluator": kind, "config": knobs(node, declared(evaluator, "neutral_knobs")),
                "files": input_files(evaluator), "code": code_version(type(evaluator), cut=unused_imports(evaluator))}


# ---------------------------------------------------------------------------------------- stages


class Run:
    """The four stages of one composed config, sharing the cache, the models and the timer. Every stage
    goes through ``cached``: a result is looked up, or computed once (concurrent jobs of configs that share
    the stage wait for each other instead of computing it twice) and stored."""

    def __init__(self, cfg: DictConfig, parts: Components, run_dir: Path, device: torch.device):
        self.cfg, self.parts, self.run_dir, self.device = cfg, parts, run_dir, device
        self.cache = StageCache(cfg.paths.cache_dir)
        self.models = Models(cfg, self.cache, device)
        self.keys = Keys.build(cfg, parts)
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

    def evaluate(self, states: list[tuple[str, dict, object]]) -> dict:
        """{name: {evaluator kind: metrics}} of model states given as (name, state key, model factory), under
        every configured evaluator (rank 0 only). An evaluation that another process is computing is put off
        until the others are done: concurrent jobs of a sweep, which share the dense and pruned evaluations,
        then split them instead of queueing behind the first job."""
        if not distributed.is_main():
            return {}
        units = [(name, get_model, kind, ev, self._metrics_key(state, kind, ev)) for name, state, get_model in states
                 for kind, ev in self.parts.evaluators.items()]
        metrics = {name: {} for name, _, _ in states}
        while units:  # the first evaluation nobody else is computing; when all are, wait for the first
            unit = next((u for u in units if not self.cache.claimed_elsewhere("metrics", u[-1])), units[0])
            units.remove(unit)
            name, get_model, kind, ev, key = unit
            metrics[name][kind] = self._evaluate_one(name, get_model, kind, ev, key)
        return {name: {kind: m[kind] for kind in self.parts.evaluators} for name, m in metrics.items()}

    def _metrics_key(self, state: dict, kind: str, ev) -> dict:
        return self.keys.metrics(state, kind, self.cfg.evaluator[kind], ev)

    def _evaluate_one(self, name: str, get_model, kind: str, ev, key: dict) -> dict:
        def compute():
            return evaluate_all(ev, get_model(), self.models.tok())

        def save(value, d):
            (d / "metrics.json").write_text(json.dumps(value[0], indent=1))
            if value[1]:
                save_per_sample(d / PER_SAMPLE, value[1])

        def load(d):
            return _json(d / "metrics.json"), load_per_sample(d / PER_SAMPLE) if (d / PER_SAMPLE).is_file() else {}

        metrics, samples = self.cached(
            f"eval_{name}" if len(self.parts.evaluators) == 1 else f"eval_{name}_{kind}", "metrics",
            key, compute=compute, save=save, load=load, ranks="only_main")
        if samples:  # per-window NLL / per-document correctness, for paired statistics (make_tables.py)
            save_per_sample(self.run_dir / "per_sample" / f"{name}_{kind}.npz", samples)
        return metrics

    def prune(self) -> tuple[Path, dict]:
        def compute():
            model, tokenizer = self.models.take_dense(), self.models.tok()
            calib, calib_report = None, None
            if declared(self.parts.pruner, "needs_calibration"):
                recipe = calibration_recipe(self.cfg.pruner.calibration, self.cfg.model.get("context_length"))
                calib, calib_report = calibration_set(tokenizer, recipe)  # logs what was used
            params_before = parameter_count(model)
            start = time.time()
            report = self.parts.pruner.prune(model, calib)
            report.update(params_before=params_before, params_after=parameter_count(model),
                          prune_time_s=round(time.time() - start, 3))
            if calib_report is not None:  # results.json prune.calibration: source, seqlen, sampling, documents
                report["calibration"] = calib_report
            self.models.pruned = model
            return report

        def save(report, d: Path):
            save_model(self.models.pruned, self.models.tok(), d / "model")
            (d / "report.json").write_text(json.dumps(report, indent=1))

        def load(d: Path) -> dict:
            report = _json(d / "report.json")
            c = report.get("calibration")
            if c:  # the log says what the cached pruning was calibrated on, as a fresh one does
                log.info("calibration (cached pruning): %d windows x %d tokens from %s, %s%s", c["nsamples"],
                         c["seqlen"], c["from"], c["sampling"].replace("_", " "),
                         "".join(f"; {x}" for x in c.get("differs_from_reference") or []))
            return report

        report = self.cached("prune", "pruned", self.keys.pruned, compute, save, load=load)
        return self.cache.entry_dir("pruned", self.keys.pruned), report

    def dense_report(self) -> dict:
        """pruner=none: the dense model's sparsity report, cached so that a fully cached run loads no model."""
        return self.cached("prune", "dense_report", self.keys.model,
                           compute=lambda: sparsity_report(self.models.dense()),
                           save=lambda r, d: (d / "report.json").write_text(json.dumps(r, indent=1)),
                           load=lambda d: _json(d / "report.json"))

    def selection_context(self, pruned_fn) -> SelectionContext:
        cfg = self.cfg
        embedder_device = cfg.scoring.get("embedder_device") or str(self.device)
        return SelectionContext(
            tokenizer=self.models.tok(), original_model=self.models.fresh_dense, pruned_model=pruned_fn,
            embedder=lambda: load_embedder(cfg.scoring.embedder, device=embedder_device),
            embedder_name=cfg.scoring.embedder, cache=self.cache, seed=cfg.seed,
            cutoff=cfg.scoring.cutoff, batch_size=cfg.scoring.batch_size, device=self.device,
            world_size=distributed.world_size(),
            cache_key={"model": config_hash(self.keys.model), "pruner": config_hash(self.keys.pruner),
                       "pool": self.parts.candidates.fingerprint})

    @functools.cached_property
    def budget(self) -> Budget:
        """The selection budget over the candidates: a count, or tokens at the trained cutoff (which needs the
        tokenizer, so it is resolved here rather than in build_components)."""
        parts = self.parts
        if parts.budget_unit == "samples":
            return Budget.samples(parts.budget)
        tokens = [len(e.input_ids) for e in encode_pool(self.models.tok(), parts.candidates.rows,
                                                         trained_cutoff(self.cfg))]
        return Budget.tokens(resolve_budget(self.cfg.budget, sum(tokens), "tokens"), tokens)

    def select(self, pruned_fn) -> tuple[dict, list[str]]:
        """(selection record, names of the selector's files written into the run folder). The record's
        indices are into the pool D (the selector's own are into the candidates)."""
        parts, selector = self.parts, self.parts.selector

        def compute():
            budget, candidates = self.budget, parts.candidates
            selection: Selection = selector.select(candidates, budget, self.selection_context(pruned_fn))
            # checked before anything is stored: an over-budget selection must not be cached
            if declared(selector, "uses_budget") and budget.cost(selection.indices) > budget.size:
                raise RuntimeError(f"selector returned {budget.cost(selection.indices)} {budget.unit} for a "
                                   f"budget of {budget}")
            indices = [candidates.positions[i] for i in selection.indices]
            record = {"indices": indices, "budget": budget.key(),
                      "pool_size": len(parts.pool), "candidates": len(candidates),
                      "validation_indices": parts.validation, "pool_source": parts.pool.source,
                      "pool_fingerprint": parts.pool.fingerprint, "environment": self.keys.selection["environment"],
                      "diagnostics": selection.diagnostics,
                      "stats": selection_stats(parts.pool.rows, indices, self.models.tok(), trained_cutoff(self.cfg))}
            return record, selection.artifacts

        def save(value, d: Path):
            record, artifacts = value
            (d / "selection.json").write_text(json.dumps(record, indent=1, default=_np_default))
            write_files(d / "artifacts", artifacts)

        def load(d: Path):
            return _json(d / "selection.json"), {f.name: f.read_bytes() for f in (d / "artifacts").glob("*")}

        record, artifacts = self.cached("select", "selection", self.keys.selection, compute, save, load, ranks="all")
        if distributed.is_main():  # the selector's files (e.g. PASER's cluster map), fresh or cached
            write_files(self.run_dir, artifacts)
        # a fresh computation's record goes through JSON like a cached one, so cold and warm runs agree
        return json.loads(json.dumps(record, default=_np_default)), sorted(artifacts)

    def adapter_dir(self) -> Path | None:
        """The stored recovery artifact (the folder the recovery's ``save`` wrote, e.g. LoRA's adapter); None with
        recovery=none."""
        key = self.keys.adapter
        return None if key is None else self.cache.entry_dir("adapter", key) / "adapter"

    def recover(self, selection: dict, pruned_fn):
        """(factory of the recovered model, recovery report), or (None, None) with recovery=none."""
        recovery = self.parts.recovery
        if recovery is None:
            return None, None
        key = self.keys.adapter
        samples = self.parts.pool.subset(selection["indices"])
        val_samples = self.parts.pool.subset(self.parts.validation)
        # checkpoints live beside the entry until it is stored: a rerun finds and resumes them
        workdir = self.cache.entry_dir("adapter", key).with_suffix(".work")
        box = {}

        def compute():
            box["trained"], report = recovery.recover(self._recovery_base(pruned_fn), self.models.tok(), samples,
                                                      workdir, val_samples=val_samples)
            return report

        def save(report, d: Path):
            recovery.save(box["trained"], d / "adapter")
            (d / "report.json").write_text(json.dumps(report, indent=1))

        def load(d: Path):
            return _json(d / "report.json")

        report = self.cached("recover", "adapter", key, compute, save, load, ranks="all")
        if distributed.is_main():
            shutil.rmtree(workdir, ignore_errors=True)
        if self._sharded_recovery():  # a sharded model runs only with every rank: rank 0 evaluates a fresh one
            self._drop_models()

        def recovered():
            """The recovered model for evaluation, as the recovery rebuilds it from its stored artifact on the
            pruned model reloaded as it is stored (in model.dtype, as the pruned model is evaluated; LoRA
            merges its adapter into the weights, so it runs at the pruned model's speed). A fresh run evaluates
            what a rerun that finds the artifact cached does: training cast its copy of the pruned model to
            recovery.dtype, and merging there gave other numbers (issue #30.6)."""
            if "recovered" not in box:
                box.pop("trained", None)
                self._drop_models()
                box["recovered"] = recovery.load(pruned_fn(), self.adapter_dir())
            return box["recovered"]

        return recovered, report

    def _sharded_recovery(self) -> bool:
        return bool(getattr(self.parts.recovery, "fsdp", False)) and distributed.active()

    def _recovery_base(self, pruned_fn):
        """The model LoRA starts from. Under FSDP the earlier stages' models first leave every device, then
        rank 0 reads the pruned weights onto the host and the other ranks build the model on meta: the weights
        are read once and reach the GPUs only as shards (paser.sharding.shard). With pruner=none (no stored
        entry) every rank loads the dense model on its device before sharding."""
        if not self._sharded_recovery():
            return pruned_fn()
        self._drop_models()
        if self.keys.pruner is None:
            return pruned_fn()
        device = "cpu" if distributed.is_main() else "meta"
        log.info("recovery.fsdp: rank %d builds the pruned model on %s%s", distributed.rank(), device,
                 "" if device == "meta" else " and broadcasts its weights into every rank's shards")
        model, _ = load_saved(self.pruned_stage[0] / "model", dtype=self.cfg.model.dtype,
                              trust_remote_code=self.cfg.model.get("trust_remote_code", False), device=device)
        return model

    def _drop_models(self) -> None:
        """This process forgets its dense and pruned models (they are reloaded from disk when needed again)."""
        import gc

        self.models.pruned = self.models._dense = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __call__(self) -> dict:
        models, keys = self.models, self.keys
        if keys.pruner is None:  # the pruned model *is* the dense one: no copy
            pruned = models.dense
        else:
            def pruned():
                return models.load_pruned(self.pruned_stage[0])

        metrics = self.evaluate([("dense", keys.model, models.dense), ("pruned", keys.pruned, pruned)])
        prune_report = self.dense_report() if keys.pruner is None else self.pruned_stage[1]
        selection, selector_files = self.select(pruned)
        recovered, recovery_report = self.recover(selection, pruned)
        if recovered is not None:
            # the key says the dtype the adapter is merged into: entries of the old cold path hold recovery.dtype's
            merged_state = {**keys.adapter, "merged_into": self.cfg.model.dtype}
            metrics.update(self.evaluate([("recovered", merged_state, recovered)]))
        return {"metrics": metrics, "prune": prune_report, "selection": selection, "recovery": recovery_report,
                "selector_files": selector_files, "adapter_dir": self.adapter_dir()}

    @functools.cached_property
    def pruned_stage(self) -> tuple[Path, dict]:
        """The prune stage, run once: when the pruned model is first evaluated, or after the evaluations when
        they were all cached (its report goes into results.json either way)."""
        return self.prune()


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write a selector's artifacts (file name -> bytes) into ``folder``; names are plain file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"selector artifact name {name!r} must be a plain file name")
        (folder / name).write_bytes(data)


def _count_diff(before: dict, after: dict) -> dict:
    """Per cache stage, the chunks/entries this stage computed, found cached, or took from another process."""
    out = {}
    for stage, counts in after.items():
        diff = {k: v - before.get(stage, {}).get(k, 0) for k, v in counts.items()}
        if any(diff.values()):
            out[stage] = diff
    return out


def selection_stats(rows: list[dict], indices, tokenizer, cutoff: int) -> dict:
    """Size of the selection: samples, characters per field against the pool's, and the tokens trained on
    (templated prompt and response at the cutoff, summed; samples the cutoff truncates)."""
    def mean_len(items, field):
        return float(np.mean([len(r[field]) for r in items])) if items else 0.0

    chosen = [rows[i] for i in indices]
    encoded = encode_pool(tokenizer, chosen, cutoff) if chosen else []
    prompt = sum(e.prompt_len for e in encoded)
    return {"selected": len(chosen),
            "tokens": {"total": sum(len(e.input_ids) for e in encoded), "prompt": prompt,
                       "response": sum(len(e.input_ids) for e in encoded) - prompt,
                       "truncated_samples": sum(e.truncated for e in encoded), "cutoff": cutoff},
            **{f"mean_chars_{f}_selected": mean_len(chosen, f) for f in ("instruction", "input", "output")},
            **{f"mean_chars_{f}_pool": mean_len(rows, f) for f in ("instruction", "input", "output")},
            "with_input_fraction_selected": float(np.mean([bool(r["input"]) for r in chosen])) if chosen else 0.0}


def _np_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------------------- the run


def prune_only(cfg: DictConfig, device: torch.device | str | None = None) -> tuple[torch.nn.Module, object, dict]:
    """The prune stage alone, for scripts: (pruned model, tokenizer, prune report) of ``cfg``'s model and
    pruner, pruned on the calibration recipe as a run prunes and through the stage cache (a run of the same
    model and pruner reuses the entry, and this reuses a run's). pruner=none gives the dense model."""
    parts = build_components(cfg)
    device = torch.device(device) if device is not None else resolve_device(cfg.model.get("device", "auto"))
    stages = Run(cfg, parts, run_dir=None, device=device)
    if stages.keys.pruner is None:
        return stages.models.dense(), stages.models.tok(), stages.dense_report()
    entry, report = stages.pruned_stage
    return stages.models.load_pruned(entry), stages.models.tok(), report


def with_dtypes_resolved(cfg: DictConfig, device: torch.device) -> DictConfig:
    """A copy of ``cfg`` with ``auto`` in model.dtype and recovery.dtype replaced by the dtype that runs on
    ``device`` (paser.models.resolve_dtype), so that results.json's config and host and every cache key hold
    the dtype that ran."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.model.dtype = resolve_dtype(cfg.model.dtype, device)
        if OmegaConf.select(cfg, "recovery.dtype") is not None:
            cfg.recovery.dtype = resolve_dtype(cfg.recovery.dtype, device)
    return cfg


def run(cfg: DictConfig, run_dir: str | Path | None = None, job_index: int | None = None) -> dict | None:
    """Run the four stages for a composed config; writes ``results.json`` into ``run_dir``.

    ``job_index``: the job's number in a local parallel sweep (one GPU per job under model.device=auto).
    Under torchrun every rank calls this; rank 0 returns the results, the other ranks None.
    """
    started = time.time()
    device = resolve_device(cfg.model.get("device", "auto"), job_index)
    cfg = with_dtypes_resolved(cfg, device)
    parts = build_components(cfg)
    distributed.init(device)
    host = host_facts(device)
    log.info("device %s (%s); model dtype %s, recovery dtype %s; %d process(es); GPUs visible: %d%s",
             device, host.get("gpu") or host["cpu"], cfg.model.dtype, OmegaConf.select(cfg, "recovery.dtype"),
             host["world_size"], host["gpu_count"], f" ({', '.join(host['gpus'])})" if host.get("gpus") else "")
    quiet_library_bars()
    if cfg.model.kind == "tiny":
        full = OmegaConf.select(cfg, "evaluator.ppl") is not None and not cfg.evaluator.ppl.get("max_windows")
        log.warning("this run is %s%s", WIRING_CHECK, "; it evaluates every perplexity window of the byte-level "
                    "vocabulary (slow): experiment=smoke is the two-minute check" if full else "")
    run_dir = Path(run_dir or Path(cfg.paths.output_dir) / "runs" / cfg.name / run_stamp())
    run_dir = distributed.broadcast(run_dir)  # every rank's Hydra made its own folder: use rank 0's
    check_fresh(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    main = distributed.is_main()
    logger = _instantiate(cfg.logger) if main else NullLogger()
    tags = [f"model:{cfg.model.name}", f"pruner:{component_name(cfg.pruner)}",
            f"selector:{component_name(cfg.selector)}", f"recovery:{component_name(cfg.recovery)}"]
    logger.start(to_plain(cfg), run_dir, name=run_dir.name, tags=tags)
    set_active(logger)
    try:
        stages = Run(cfg, parts, run_dir, device)
        out = stages()
    finally:
        set_active(NullLogger())
    if not main:
        return None
    selection = out["selection"]
    results = {
        "name": cfg.name, "seed": cfg.seed, "run_dir": str(run_dir),
        "started_at": datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
        "config": to_plain(cfg),
        "host": {**host, "model_dtype": cfg.model.dtype, "recovery_dtype": OmegaConf.select(cfg, "recovery.dtype")},
        "metrics": out["metrics"],
        "prune": prune_record(out["prune"]),
        "selection": {k: v for k, v in selection.items() if k != "indices"},
        "recovery": out["recovery"],
        "timings": {**stages.timer.stages, "total_s": round(time.time() - started, 3)},
        "versions": library_versions(), "git_commit": git_commit(),
    }
    results["summary"] = summary(results, wiring_check=cfg.model.kind == "tiny")
    (run_dir / "selected_indices.json").write_text(json.dumps(selection["indices"]))
    write_selected(run_dir / "selected.jsonl", parts.pool, selection["indices"])
    write_results(run_dir, results)
    log_artifacts(logger, results, run_dir, out["selector_files"], out["adapter_dir"])
    log_results(logger, results, run_dir)
    log.info("summary%s", summary_table(results))
    return results

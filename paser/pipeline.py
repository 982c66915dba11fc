"""One run: prune -> select -> recover -> evaluate.

Every stage's output is cached (paser.cache) under a key of exactly what determines it (``Keys``), so a
sweep over selectors prunes once, a rerun of a finished config loads results instead of recomputing, and
concurrent jobs that share a stage compute it once between them. Models are loaded lazily, on the run's
device (``model.device``): a stage whose result is cached never touches a model. Under torchrun the stages
split their work across ranks as paser.distributed describes. The stages themselves are paser.stages;
this module builds what the config asks for and the cache keys, and composes the stages into a run.
"""

from __future__ import annotations

import copy
import functools
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from paser import distributed
from paser.budget import check_unit, resolve_budget
from paser.cache import StageCache, to_plain
from paser.components import declared, environment, unused_imports
from paser.config_keys import check_top_level_keys
from paser.data import Pool, calibration_recipe, calibration_set, encode_pool, hold_out
from paser.errors import ConfigError, DataError, PaserError
from paser.fingerprint import code_version, file_fingerprint
from paser.hardware import host_facts, resolve_device
from paser.models import load_model, load_saved, load_tokenizer, model_identity, resolve_dtype
from paser.progress import quiet_library_bars
from paser.reporting import WIRING_CHECK, report_run, run_tags, summary_table
from paser.stages.evaluate import evaluate
from paser.stages.prune import dense_report, prune
from paser.stages.recover import adapter_dir, recover
from paser.stages.runner import StageRunner
from paser.stages.select import select, trained_cutoff
from paser.tracking import NullLogger, check_fresh, run_stamp, set_active
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

    def drop(self) -> None:
        """Forget the dense and pruned models (they are reloaded from disk when needed again)."""
        self.pruned = self._dense = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def tok(self):
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.cfg.model, self.cache)
        return self.tokenizer


def _instantiate(node: DictConfig, drop: tuple[str, ...] = ()):
    plain = {k: v for k, v in to_plain(node).items() if k not in drop}
    try:
        return hydra.utils.instantiate(plain, _convert_="all")
    except InstantiationException as e:  # Hydra wraps the component's own error: surface ours as is
        if isinstance(e.__cause__, PaserError):
            raise e.__cause__ from None
        raise


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
    budget: int | None       # the sample budget; None with budget_unit=tokens (resolved by stages.select)
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
        resolve_budget(cfg.budget, 2**62, unit)  # its form: the token total needs the tokenizer (stages.select)
    return Components(
        pruner=pruner, selector=selector, recovery=recovery, evaluators=evaluators,
        pool=pool, candidates=candidates, validation=validation, budget=budget, budget_unit=unit)


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


# ---------------------------------------------------------------------------------------- the run


class Run(StageRunner):
    """The four stages of one composed config (paser.stages), sharing the cache, the models, the keys and
    the timer. Every stage goes through ``cached`` (paser.stages.runner): a result is looked up, or computed
    once (concurrent jobs of configs that share the stage wait for each other instead of computing it twice)
    and stored."""

    def __init__(self, cfg: DictConfig, parts: Components, run_dir: Path, device: torch.device):
        cache = StageCache(cfg.paths.cache_dir)
        self.parts, self.run_dir, self.device = parts, run_dir, device
        self.models = Models(cfg, cache, device)
        self.keys = Keys.build(cfg, parts)
        super().__init__(cfg, cache, device)

    def __call__(self) -> dict:
        models, keys = self.models, self.keys
        if keys.pruner is None:  # the pruned model *is* the dense one: no copy
            pruned = models.dense
        else:
            def pruned():
                return models.load_pruned(self.pruned_stage[0])

        metrics = evaluate(self, [("dense", keys.model, models.dense), ("pruned", keys.pruned, pruned)])
        prune_report = dense_report(self) if keys.pruner is None else self.pruned_stage[1]
        selection, selector_files = select(self, pruned)
        recovered, recovery_report = recover(self, selection, pruned)
        if recovered is not None:
            # the key says the dtype the adapter is merged into: entries of the old cold path hold recovery.dtype's
            merged_state = {**keys.adapter, "merged_into": self.cfg.model.dtype}
            metrics.update(evaluate(self, [("recovered", merged_state, recovered)]))
        return {"metrics": metrics, "prune": prune_report, "selection": selection, "recovery": recovery_report,
                "selector_files": selector_files, "adapter_dir": adapter_dir(self)}

    @functools.cached_property
    def pruned_stage(self) -> tuple[Path, dict]:
        """The prune stage, run once: when the pruned model is first evaluated, or after the evaluations when
        they were all cached (its report goes into results.json either way)."""
        return prune(self)


def prune_only(cfg: DictConfig, device: torch.device | str | None = None) -> tuple[torch.nn.Module, object, dict]:
    """The prune stage alone, for scripts: (pruned model, tokenizer, prune report) of ``cfg``'s model and
    pruner, pruned on the calibration recipe as a run prunes and through the stage cache (a run of the same
    model and pruner reuses the entry, and this reuses a run's). pruner=none gives the dense model."""
    parts = build_components(cfg)
    device = torch.device(device) if device is not None else resolve_device(cfg.model.get("device", "auto"))
    stages = Run(cfg, parts, run_dir=None, device=device)
    if stages.keys.pruner is None:
        return stages.models.dense(), stages.models.tok(), dense_report(stages)
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
    logger.start(to_plain(cfg), run_dir, name=run_dir.name, tags=run_tags(cfg))
    set_active(logger)
    try:
        stages = Run(cfg, parts, run_dir, device)
        out = stages()
    finally:
        set_active(NullLogger())
    if not main:
        return None
    results = report_run(cfg, out, stages.timer.stages, run_dir, started, host, parts.pool, logger)
    log.info("summary%s", summary_table(results))
    return results

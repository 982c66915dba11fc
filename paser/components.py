"""The protocol of each component kind. Concrete components live in pruners/, selectors/, recovery.py and
evaluation/, and are built from the Hydra config through ``_target_``.

    Pruner.prune(model, calib) -> report                     (modifies the model in place)
    Selector.select(pool, budget, ctx) -> Selection         (budget: paser.budget.Budget, samples or tokens)
    Recovery.recover(model, tokenizer, samples, workdir, val_samples) -> (trained, report)
            .save(trained, folder)  .load(pruned_model, folder) -> model     (the artifact: stored, rebuilt)
    Evaluator.evaluate(model, tokenizer) -> metrics

Besides its method, a component *declares* (class attributes; ``declared`` gives the defaults):
    neutral_knobs       config keys of its node that only move memory or speed (batch sizes, checkpoint
                        intervals): left out of its cache key, so changing them reuses the result
    needs_calibration   (pruners) whether ``prune`` needs calibration windows
    changes_model       (pruners) False for pruner=none: the pruned model *is* the dense one
    uses_budget         (selectors) whether the selection depends on the budget (``full`` does not)
    uses_scoring        (selectors) whether the shared ``scoring`` block (cutoff, embedder) changes it
    val_size, val_seed  (recoveries) how many pool rows to hold out for its validation (0: none), drawn by
                        val_seed alone before selection (paser.data.hold_out)
    display_name        its name in tables (scripts/make_tables.py); without one, the class name
and may define ``environment() -> dict``: facts of this machine that change its result (e.g. a reward
model that is not available offline), which become part of its cache key and of results.json,
``input_files() -> list[Path]``: files it reads, keyed by content (so their folder can be a neutral knob), and
``unused_imports() -> [(module, imported module)]``: imports its configuration never runs, left out of its
code version (e.g. ``HYBRID_CLUSTERING`` for a baseline with ``cluster: null``).
An evaluator may define ``evaluate_with_samples(model, tokenizer) -> (metrics, {name: 1-D array})``: its
per-window / per-document numbers, saved beside results.json for paired statistics (``evaluate_all``).

The cache key of each stage is built by the pipeline from these declarations, the config values, the
content of input files and the source of the implementing code (paser.fingerprint).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from paser import tracking
from paser.budget import Budget
from paser.data import Pool

DEFAULTS = {"neutral_knobs": (), "needs_calibration": False, "changes_model": True, "uses_budget": True,
            "uses_scoring": True, "val_size": 0, "val_seed": 0}


def declared(component, name: str):
    """A component's declaration ``name`` (see the module docstring), or its default."""
    return getattr(component, name, DEFAULTS[name])


def environment(component) -> dict:
    """The component's environment facts that change its result (empty for most)."""
    facts = getattr(component, "environment", None)
    return dict(facts()) if callable(facts) else {}


# The hybrids' clustering: paser.selectors.clustered imports these only to cluster the pool (cluster: s2ric).
# Per-sample scores never depend on it (a cluster map is cached under its own code), nor does a baseline
# that ranks the whole pool.
HYBRID_CLUSTERING = tuple(("paser.selectors.clustered", m) for m in (
    "paser.selectors.paser.clustering", "paser.selectors.paser.allocation", "paser.selectors.clustering_methods",
    "paser.embedding"))


def unused_imports(component) -> tuple:
    """The imports the component's configuration never runs, left out of its code version (empty for most)."""
    unused = getattr(component, "unused_imports", None)
    return tuple(unused()) if callable(unused) else ()


def display_name(target: str | None) -> str | None:
    """The ``display_name`` a component class declares, found from its ``_target_`` (as results.json records it);
    None where it declares none. Only paser's own modules are imported, and nothing is called."""
    import importlib

    module, _, name = str(target).rpartition(".")
    if not module.startswith("paser."):
        return None
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    value = getattr(cls, "display_name", None) if isinstance(cls, type) else None
    return value if isinstance(value, str) else None


def evaluate_all(evaluator, model, tokenizer) -> tuple[dict, dict]:
    """(metrics, per-sample arrays) of an evaluator; no arrays from one that only defines ``evaluate``."""
    with_samples = getattr(evaluator, "evaluate_with_samples", None)
    if callable(with_samples):
        return with_samples(model, tokenizer)
    return evaluator.evaluate(model, tokenizer), {}


class Pruner(Protocol):
    neutral_knobs: tuple[str, ...]
    needs_calibration: bool
    changes_model: bool

    def prune(self, model: torch.nn.Module, calib: torch.Tensor | None) -> dict:
        """Prune ``model`` in place; ``calib`` is a LongTensor [nsamples, seqlen] of calibration windows
        (None for pruners that need none, see ``needs_calibration``). Returns a JSON-able report."""


@dataclass
class Selection:
    """What a selector returns: indices into the pool and JSON-able diagnostics.

    ``scores`` (optional) holds one float per pool sample, for plots and for hybrids that rank by it.
    ``artifacts`` holds the files it made for people to look at (file name -> bytes, e.g. PASER's cluster
    map): the pipeline writes them into the run folder and keeps them with the cached selection, so a
    selector never writes files itself.
    """

    indices: list[int]
    diagnostics: dict = field(default_factory=dict)
    scores: np.ndarray | None = None
    artifacts: dict[str, bytes] = field(default_factory=dict)


class SelectionContext:
    """What a selector may use, built lazily: a selector that needs no model pays nothing.

    ``original_model`` / ``pruned_model`` / ``embedder`` are factories run on first access.
    ``cache_key`` holds the fingerprints of the model, the pruner (config, calibration, code) and the pool,
    so that selectors can cache per-sample scores (``ctx.cached_scores``) across runs that share them.
    ``device`` is where the models are (kNN and other tensor work goes there too).
    """

    def __init__(self, *, tokenizer, original_model: Callable[[], torch.nn.Module],
                 pruned_model: Callable[[], torch.nn.Module], embedder: Callable[[], Any],
                 embedder_name: str, cache, cache_key: dict, seed: int, cutoff: int = 256,
                 batch_size: int = 8, device: torch.device | str = "cpu", world_size: int = 1):
        self.tokenizer = tokenizer
        self._factories = {"original_model": original_model, "pruned_model": pruned_model,
                           "embedder": embedder}
        self.embedder_name = embedder_name
        self.cache = cache
        self.cache_key = cache_key
        self.seed = seed
        self.cutoff = cutoff
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.world_size = world_size

    def _build(self, name: str):
        # Selectors often first touch a model inside torch.inference_mode(); weights loaded there would
        # become inference tensors, which LoRA recovery later cannot train through.
        with torch.inference_mode(False):
            return self._factories[name]()

    @cached_property
    def original_model(self) -> torch.nn.Module:
        return self._build("original_model")

    @cached_property
    def pruned_model(self) -> torch.nn.Module:
        return self._build("pruned_model")

    @cached_property
    def embedder(self):
        return self._build("embedder")

    def cached_scores(self, name: str, depends_on: tuple[str, ...], params: dict, n_items: int,
                      compute: Callable[[int, int], np.ndarray], chunk_size: int = 1024) -> np.ndarray:
        """Per-sample scores, computed by ``compute(start, end)`` in chunks that persist (a killed run
        resumes; concurrent processes and torchrun ranks share the chunks), and cached under (name, the
        chosen parts of cache_key, params, the source of the code that defines ``compute``).

        ``depends_on`` names the parts of ``cache_key`` the scores depend on, e.g. ("model", "pool") for
        scores of the original model or ("model", "pruner", "pool") for ones that use the pruned model.
        """
        from paser.fingerprint import code_version

        key = {"name": name, "params": params, **{k: self.cache_key[k] for k in depends_on},
               "code": code_version(compute, cut=HYBRID_CLUSTERING)}
        if self.world_size > 1:  # enough chunks for every rank to take some
            chunk_size = max(1, min(chunk_size, -(-n_items // (4 * self.world_size))))

        def reported(start: int, end: int) -> np.ndarray:  # live progress of the long scoring stages
            out = compute(start, end)
            tracking.progress(f"scores/{name}", end, n_items)
            return out

        return self.cache.array(f"scores/{name}", key, n_items, reported, chunk_size=chunk_size)

    def cached_result(self, name: str, depends_on: tuple[str, ...], params: dict, compute: Callable[[], dict]) -> dict:
        """A JSON-able result (e.g. cluster labels with their diagnostics), computed once and cached like
        ``cached_scores``; a cold and a warm run get the identical dict."""
        from paser.fingerprint import code_version

        key = {"name": name, "params": params, **{k: self.cache_key[k] for k in depends_on},
               "code": code_version(compute)}
        box = {}

        def write(folder):
            box["value"] = compute()
            (folder / "result.json").write_text(json.dumps(box["value"]))

        entry, _ = self.cache.get_or_create(f"results/{name}", key, write)
        return box["value"] if "value" in box else json.loads((entry / "result.json").read_text())


class Selector(Protocol):
    neutral_knobs: tuple[str, ...]
    uses_budget: bool
    uses_scoring: bool

    def select(self, pool: Pool, budget: Budget, ctx: SelectionContext) -> Selection:
        """Indices into ``pool`` (the candidates: the pool without recovery's validation rows) whose cost
        is at most ``budget.size`` (``budget.fill(ranking)`` walks a ranking); unless the selector declares
        ``uses_budget = False``."""


class Recovery(Protocol):
    """A recovery owns its artifact: the pipeline stores what ``save`` writes in the stage cache and evaluates
    what ``load`` rebuilds from it (also right after training, so that a fresh run and a cached one evaluate
    the same model), knowing nothing of how it was trained (paser.recovery: LoRA, full fine-tuning)."""

    neutral_knobs: tuple[str, ...]
    val_size: int
    val_seed: int

    def recover(self, model: torch.nn.Module, tokenizer, samples: list[dict], workdir,
                val_samples: list[dict] = ()) -> tuple[object, dict]:
        """Fine-tune ``model`` (the pruned model; it may be changed in place) on ``samples``, validating on
        ``val_samples`` (``val_size`` rows held out of the pool), checkpointing into ``workdir`` and resuming
        from it; returns (what ``save`` stores, JSON-able report with ``steps``, ``loss_curve`` and
        ``final_loss``). Under torchrun every rank calls it with the same samples (data parallel)."""

    def save(self, trained, folder: Path) -> None:
        """Write the artifact into ``folder`` (it is then stored in the cache)."""

    def load(self, base_model: torch.nn.Module, folder: Path) -> torch.nn.Module:
        """The recovered model ready for evaluation, from a fresh pruned model and a folder ``save`` wrote."""


class Evaluator(Protocol):
    neutral_knobs: tuple[str, ...]

    def evaluate(self, model: torch.nn.Module, tokenizer) -> dict: ...

"""The protocol of each component kind. Concrete components live in pruners/, selectors/, recovery.py and
evaluation/, and are built from the Hydra config through ``_target_``.

    Pruner.prune(model, calib) -> report            (modifies the model in place)
    Selector.select(pool, budget, ctx) -> Selection
    Recovery.recover(model, tokenizer, samples, workdir) -> model
    Evaluator.evaluate(model, tokenizer) -> metrics
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import torch

from paser.data import Pool


class Pruner(Protocol):
    def prune(self, model: torch.nn.Module, calib: torch.Tensor | None) -> dict:
        """Prune ``model`` in place; ``calib`` is a LongTensor [nsamples, seqlen] of calibration windows
        (None for pruners that need none, see ``needs_calibration``). Returns a JSON-able report."""

    needs_calibration: bool


@dataclass
class Selection:
    """What a selector returns: indices into the pool and JSON-able diagnostics.

    ``scores`` (optional) holds one float per pool sample, for plots and for hybrids that rank by it.
    """

    indices: list[int]
    diagnostics: dict = field(default_factory=dict)
    scores: np.ndarray | None = None


class SelectionContext:
    """What a selector may use, built lazily: a selector that needs no model pays nothing.

    ``original_model`` / ``pruned_model`` / ``embedder`` are factories run on first access.
    ``cache_key`` holds the fingerprints of the model, the pruner config and the pool, so that selectors
    can cache per-sample scores (``ctx.cached_scores``) across runs that share them.
    """

    def __init__(self, *, tokenizer, original_model: Callable[[], torch.nn.Module],
                 pruned_model: Callable[[], torch.nn.Module], embedder: Callable[[], Any],
                 embedder_name: str, cache, cache_key: dict, seed: int, run_dir, cutoff: int = 256, batch_size: int = 8):
        self.tokenizer = tokenizer
        self._factories = {"original_model": original_model, "pruned_model": pruned_model,
                           "embedder": embedder}
        self.embedder_name = embedder_name
        self.cache = cache
        self.cache_key = cache_key
        self.seed = seed
        self.run_dir = run_dir
        self.cutoff = cutoff
        self.batch_size = batch_size

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
        resumes), and cached under (name, the chosen parts of cache_key, params).

        ``depends_on`` names the parts of ``cache_key`` the scores depend on, e.g. ("model", "pool") for
        scores of the original model or ("model", "pruner", "pool") for ones that use the pruned model.
        """
        key = {"name": name, "params": params, **{k: self.cache_key[k] for k in depends_on}}
        return self.cache.array(f"scores/{name}", key, n_items, compute, chunk_size=chunk_size)


class Selector(Protocol):
    def select(self, pool: Pool, budget: int, ctx: SelectionContext) -> Selection: ...


class Recovery(Protocol):
    def recover(self, model: torch.nn.Module, tokenizer, samples: list[dict], workdir) -> torch.nn.Module:
        """Fine-tune ``model`` on ``samples`` (checkpointing into ``workdir``) and return it."""


class Evaluator(Protocol):
    def evaluate(self, model: torch.nn.Module, tokenizer) -> dict: ...

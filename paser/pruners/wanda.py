"""Wanda (Sun et al. 2023): score S_ij = |W_ij| * ||X_j||_2 (X_j: the j-th input feature over all
calibration tokens), compared within each output row (unstructured) or within each block of M
consecutive inputs of a row (N:M). No weight update; layers are pruned in sequence on the pruned
model's activations (paser.pruners.layerwise)."""

from __future__ import annotations

import logging

import torch

from paser.errors import ConfigError
from paser.pruners.common import parameter_count, prune_mask, resolve_sparsity, sparsity_report
from paser.pruners.layerwise import Target, prune_layerwise

log = logging.getLogger(__name__)


class SquaredNorms:
    """Sum over tokens of x_j^2 per input feature j (fp32)."""

    def __init__(self, weight: torch.Tensor):
        self.sum = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        self.sum += x.pow(2).sum(dim=0)
        self.tokens += x.shape[0]


def wanda_score(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    return weight.abs().float() * sq_norms.sqrt().unsqueeze(0)


class WandaPruner:
    """Neutral knob: ``batch_size`` (windows per calibration pass) changes bf16 results at most in the last
    digits (kernels block batches differently), so the cache key ignores it."""

    needs_calibration = True
    neutral_knobs: tuple[str, ...] = ("batch_size",)

    def __init__(self, sparsity: float | None = 0.5, pattern: str | None = "unstructured", batch_size: int = 8):
        self.sparsity, self.nm = resolve_sparsity(sparsity, pattern)
        self.batch_size = batch_size

    @torch.no_grad()
    def prune_target(self, target: Target) -> None:
        norms = target.stat.sum
        if target.stat.tokens == 0:  # an MoE expert no calibration token was routed to
            log.warning("%s received no calibration tokens; pruning it by magnitude", target.name)
            norms = torch.ones_like(norms)
        mask = prune_mask(wanda_score(target.weight, norms), self.sparsity, self.nm)
        target.weight.masked_fill_(mask, 0)

    def prune(self, model, calib: torch.Tensor | None) -> dict:
        if calib is None:
            raise ConfigError("Wanda needs calibration windows: set pruner.calibration (path, nsamples, seqlen, seed)")
        before = parameter_count(model)
        prune_layerwise(model, calib, SquaredNorms, self.prune_target, self.batch_size, desc="wanda")
        return sparsity_report(model, before)

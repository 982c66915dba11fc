"""Magnitude pruning: zero the smallest |W| in each output row (or each N:M block) of every decoder
weight matrix. Needs no calibration data."""

from __future__ import annotations

import torch

from paser.pruners.common import (
    parameter_count,
    prunable_weights,
    prune_mask,
    resolve_sparsity,
    sparsity_report,
)


class MagnitudePruner:
    needs_calibration = False

    def __init__(self, sparsity: float | None = 0.5, pattern: str | None = "unstructured"):
        self.sparsity, self.nm = resolve_sparsity(sparsity, pattern)

    @torch.no_grad()
    def prune(self, model, calib=None) -> dict:
        before = parameter_count(model)
        for _, w in prunable_weights(model):
            w.masked_fill_(prune_mask(w.abs().float(), self.sparsity, self.nm), 0)
        return sparsity_report(model, before)

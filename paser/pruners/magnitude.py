"""Magnitude pruning: zero the smallest |W| in each output row of every decoder Linear layer."""

from __future__ import annotations

import torch

from paser.pruners.common import check_sparsity, prunable_linears, sparsity_report


class MagnitudePruner:
    needs_calibration = False

    def __init__(self, sparsity: float = 0.5):
        self.sparsity = check_sparsity(sparsity)

    @torch.no_grad()
    def prune(self, model, calib=None) -> dict:
        for _, linear in prunable_linears(model):
            w = linear.weight
            k = int(w.shape[1] * self.sparsity)
            if k == 0:
                continue
            # per output row: the k smallest magnitudes go
            drop = torch.topk(w.abs().float(), k, dim=1, largest=False).indices
            w.scatter_(1, drop, 0)
        return sparsity_report(model)

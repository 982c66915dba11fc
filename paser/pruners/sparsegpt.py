"""SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with error feedback.

Per weight matrix W [out, in] with inputs X: H = 2 X^T X / tokens, dampened by ``percdamp`` x its mean
diagonal, and U = the upper Cholesky factor of H^-1. Columns are visited in blocks of ``blocksize``; in
each block the mask is chosen by w^2 / U_jj^2 (unstructured: the lowest fraction of the block; N:M: the
N lowest of every M consecutive columns of a row, chosen when the sweep reaches the group), and the error
of each zeroed column is spread over the later columns: W[:, j:] -= (w_j - q_j) / U_jj * U[j, j:].
Layers are processed in sequence on the pruned model's activations (paser.pruners.layerwise).
"""

from __future__ import annotations

import logging

import torch

from paser.errors import ConfigError
from paser.pruners.common import lowest, parameter_count, resolve_sparsity, sparsity_report
from paser.pruners.layerwise import Target, prune_layerwise

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


class Hessian:
    """Running sum of X^T X over calibration tokens (fp32)."""

    def __init__(self, weight: torch.Tensor):
        cols = weight.shape[1]
        self.sum = torch.zeros(cols, cols, dtype=torch.float32, device=weight.device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        return 2 * self.sum / max(self.tokens, 1)


def inverse_cholesky(hessian: torch.Tensor, percdamp: float, name: str = "") -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1. When a factorisation fails (H not
    positive definite in floating point), the dampening is raised tenfold (from 0 to 0.01) and retried."""
    mean_diag = hessian.diagonal().mean()
    damp = percdamp
    for _ in range(MAX_DAMP_RETRIES):
        h = hessian.clone()
        h.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper
        raised = damp * 10 if damp > 0 else 0.01
        log.warning("%s: Cholesky factorisation failed with dampening %g x mean diagonal; retrying with %g",
                    name or "sparsegpt", damp, raised)
        damp = raised
    raise RuntimeError(f"{name}: Hessian not invertible even with dampening {damp:g} x mean diagonal "
                       "(non-finite calibration activations?)")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01,
                    name: str = "") -> torch.Tensor:
    """The pruned and updated weight (fp32) of ``weight`` [out, in] given H [in, in]."""
    w = weight.float().clone()
    h = hessian.float().clone()
    cols = w.shape[1]
    if nm is not None and (cols % nm[1] or blocksize % nm[1]):
        raise ConfigError(f"pruner.pattern='{nm[0]}:{nm[1]}' needs the input width ({cols}) and "
                          f"pruner.blocksize ({blocksize}) divisible by {nm[1]}")
    dead = h.diagonal() == 0  # inputs that are always zero: their weights can go at no cost
    h.diagonal().masked_fill_(dead, 1)
    w.masked_fill_(dead.unsqueeze(0), 0)
    hinv = inverse_cholesky(h, percdamp, name)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            k = int(w1.numel() * sparsity)
            if k:
                scores = (w1.pow(2) / d.pow(2).unsqueeze(0)).flatten()
                mask1.view(-1)[lowest(scores, k)] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                scores = w1[:, i:i + nm[1]].pow(2) / d[i:i + nm[1]].pow(2).unsqueeze(0)
                mask1[:, i:i + nm[1]].scatter_(1, lowest(scores, nm[0], dim=1), True)
            col = w1[:, i]
            q = torch.where(mask1[:, i], 0.0, col)
            q1[:, i] = q
            err = (col - q) / d[i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


class SparseGPTPruner:
    """Neutral knob: ``batch_size`` (windows per calibration pass) changes bf16 results at most in the last
    digits (kernels block batches differently), so the cache key ignores it."""

    needs_calibration = True
    neutral_knobs: tuple[str, ...] = ("batch_size",)

    def __init__(self, sparsity: float | None = 0.5, pattern: str | None = "unstructured",
                 blocksize: int = 128, percdamp: float = 0.01, batch_size: int = 8):
        self.sparsity, self.nm = resolve_sparsity(sparsity, pattern)
        if not isinstance(blocksize, int) or blocksize < 1:
            raise ConfigError(f"pruner.blocksize={blocksize!r} must be a positive integer (reference: 128)")
        if not isinstance(percdamp, (int, float)) or percdamp < 0:
            raise ConfigError(f"pruner.percdamp={percdamp!r} must be >= 0 (reference: 0.01)")
        self.blocksize, self.percdamp, self.batch_size = blocksize, float(percdamp), batch_size

    def hessian(self, target: Target) -> torch.Tensor:
        """The layer's H = 2XXᵀ/n from its calibration inputs."""
        if target.stat.tokens == 0:  # an MoE expert no calibration token was routed to: H = I is magnitude pruning
            log.warning("%s received no calibration tokens; pruning it by magnitude", target.name)
            return torch.eye(target.weight.shape[1], device=target.weight.device)
        return target.stat.matrix()

    def prune_target(self, target: Target) -> None:
        pruned = sparsegpt_prune(target.weight, self.hessian(target), self.sparsity, self.nm, self.blocksize,
                                 self.percdamp, target.name)
        target.weight.copy_(pruned.to(target.weight.dtype))

    def prune(self, model, calib: torch.Tensor | None) -> dict:
        if calib is None:
            raise ConfigError("SparseGPT needs calibration windows: set pruner.calibration (path, nsamples, seqlen, seed)")
        before = parameter_count(model)
        prune_layerwise(model, calib, Hessian, self.prune_target, self.batch_size, desc="sparsegpt")
        return sparsity_report(model, before)

"""LLM-Pruner's importance of coupled weight groups and what its block-wise (``llm_pruner``) and
channel-wise (``llm_pruner_channel``) pruners share: validation of ratio / importance / seed, the
calibration gradients, the per-weight scores and the row / column cuts.

Importance of a unit = sum over the weights of its coupled group (``group_reduction='sum'`` in the
reference):
  param_first   |w * g|                      (g: gradient of the LM loss on the calibration windows)
  param_second  |1/2 w^2 * F|               (F: mean over windows of the squared per-window gradient,
                                              the Fisher approximation of the Hessian diagonal)
  param_mix     |w * g - 1/2 w^2 * F|
  vectorize     |sum over each channel of w * g|, then summed over the channels of the unit
  l1 / l2       sum |w| / sum w^2;   random: a seeded random score

Precision of the gradient pass, as the reference's hf_prune.py (``model.half()`` on a GPU, fp32 on the CPU):
on the CPU a bf16/fp16 model is upcast to fp32 for the forward and backward passes and cast back; on an
accelerator the passes run in the model's own dtype, since an fp32 copy would not fit (~50 GB at 7B), and the
gradients are kept in that dtype. Either way the importance maths is fp32, one weight at a time; the Fisher
sum is kept in the gradients' dtype, except fp16, whose range squared gradients would underflow (fp32).
Every index (kept heads, channels) is created on the device of the weights it selects from, and random
importances come from a seeded host generator, so every device prunes the same units.
"""

from __future__ import annotations

import logging

import torch

from paser.errors import ConfigError
from paser.models import layer_shapes
from paser.pruners.common import parameter_count, sparsity_report
from paser.scoring import to_host

log = logging.getLogger(__name__)

TAYLOR = ("param_first", "param_second", "param_mix", "vectorize")
IMPORTANCES = TAYLOR + ("l1", "l2", "random")


def n_pruned(ratio: float, units: int) -> int:
    """Units to remove: ratio x units rounded to nearest, always keeping at least one."""
    return min(int(ratio * units + 0.5), units - 1)


class Scorer:
    """Per-channel importance of a weight matrix along its output rows (dim=1) or input columns (dim=0)."""

    def __init__(self, kind: str, grads: dict, fisher: dict):
        self.kind, self.grads, self.fisher = kind, grads, fisher

    def __call__(self, weight: torch.Tensor, dim: int) -> torch.Tensor:
        w = weight.detach().float()
        if w.dim() == 1:  # a norm's weight: one entry per channel, scored elementwise
            w, dim = w.unsqueeze(0), 0
        if self.kind == "l1":
            return w.abs().sum(dim)
        if self.kind == "l2":
            return w.pow(2).sum(dim)
        first = w * self.grads[weight].float().view_as(w)
        if self.kind == "vectorize":
            return first.sum(dim).abs()
        if self.kind == "param_first":
            return first.abs().sum(dim)
        second = 0.5 * w.pow(2) * self.fisher[weight].float().view_as(w)
        if self.kind == "param_second":
            return second.abs().sum(dim)
        return (first - second).abs().sum(dim)  # param_mix


def keep_rows(linear: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None,
                          dtype=linear.weight.dtype, device=linear.weight.device)
    idx = idx.to(linear.weight.device)  # a model split over devices has its layers on several
    new.weight.data.copy_(linear.weight.data[idx])
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[idx])
    return new


def keep_cols(linear: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None,
                          dtype=linear.weight.dtype, device=linear.weight.device)
    new.weight.data.copy_(linear.weight.data[:, idx.to(linear.weight.device)])
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data)
    return new


def random_importance(n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """Seeded scores from the host generator (the same on every device), moved to ``device``."""
    return torch.rand(n, generator=rng).to(device)


class StructuredPruner:
    """LLM-Pruner's common part. A subclass implements ``remove(model, calib) -> dict`` (what it removed,
    for the report) with ``self.scorer`` and ``random_importance``; ``prune`` adds the parameter counts and
    the per-layer shapes the pruned checkpoint is rebuilt from."""

    needs_calibration = True

    def __init__(self, ratio: float = 0.25, importance: str = "param_first", seed: int = 0):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ConfigError(f"pruner.ratio={ratio!r} must be a fraction strictly between 0 and 1")
        if importance not in IMPORTANCES:
            raise ConfigError(f"pruner.importance='{importance}' is unknown; allowed: {list(IMPORTANCES)}")
        self.ratio, self.importance, self.seed = float(ratio), importance, seed
        self.needs_calibration = importance in TAYLOR  # l1/l2/random use no data

    def prune(self, model, calib: torch.Tensor | None) -> dict:
        before = parameter_count(model)
        report = self.remove(model, calib)
        report.update(sparsity_report(model, before))
        report.update(param_reduction=1 - report["params"] / before, layer_shapes=layer_shapes(model))
        return report

    def remove(self, model, calib: torch.Tensor | None) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ gradients
    def _gradients(self, model, calib: torch.Tensor, weights: list[torch.Tensor]) -> tuple[dict, dict]:
        """Gradient of the mean LM loss over all windows, and (param_second/mix) the mean over windows
        of the squared per-window gradient, for each of ``weights`` (fp32)."""
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        device = next(model.parameters()).device
        calib = calib.to(device)
        fisher = {}
        try:
            if self.importance in ("param_second", "param_mix"):
                for window in calib:
                    window = window.unsqueeze(0)
                    model(window, labels=window, use_cache=False).loss.backward()
                    for w in weights:
                        g = w.grad if w.grad.dtype != torch.float16 else w.grad.float()
                        sq = g.pow(2) / len(calib)
                        fisher[w] = fisher[w] + sq if w in fisher else sq
                        w.grad = None
            loss = model(calib, labels=calib, use_cache=False).loss
            loss.backward()
            log.info("llm_pruner: calibration loss %.4f over %d windows", float(to_host(loss)), len(calib))
            grads = {w: w.grad for w in weights}
        finally:
            for p, flag in flags.items():
                p.grad = None
                p.requires_grad_(flag)
        return grads, fisher

    def scorer(self, model, calib: torch.Tensor | None, weights: list[torch.Tensor]) -> Scorer:
        """Importance scorer for ``weights``; the Taylor kinds first take gradients (in fp32 on the CPU, in
        the model's dtype on an accelerator: see the module docstring)."""
        grads, fisher = {}, {}
        if self.needs_calibration:
            if calib is None:
                raise ConfigError(f"pruner.importance='{self.importance}' needs calibration windows "
                                  "(pruner.calibration)")
            param = next(model.parameters())
            dtype, upcast = param.dtype, param.device.type == "cpu"
            if upcast:
                model.float()
            try:
                grads, fisher = self._gradients(model, calib, weights)
            finally:
                if upcast:
                    model.to(dtype)
        return Scorer(self.importance, grads, fisher)

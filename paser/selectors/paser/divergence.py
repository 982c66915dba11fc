"""CDAIS: per-sample divergence between the original and the pruned model's next-token distributions.

Both models run teacher-forced on the same token sequences, batched by length (bf16 or whatever dtype the
models are in); only the positions in the span get logits (the LM head runs on their hidden states, in
the model's dtype), and the divergence maths is fp32, with log-probabilities clamped to a finite floor so
that p = 0 contributes exactly 0 (never 0·∞ = NaN).

Divergences (P = original model, Q = pruned model, per position, summed over the vocabulary):
    jsd          ½KL(P‖M) + ½KL(Q‖M), M = ½(P+Q); in [0, ln 2]                      (the paper)
    kl           KL(P‖Q): what the pruned model loses in approximating the original
    wasserstein  sliced Wasserstein-1 with tokens placed at their input-embedding vectors (of the original
                 model): the mean over 16 seeded random unit directions u of the 1-D W1 between P and Q
                 on the line E·u, i.e. Σ_i |F_P(i) − F_Q(i)|·(x_(i+1) − x_(i)) over the tokens sorted
                 by x = E·u. An exact W1 with an embedding ground metric would cost O(V²) per position.

Spans (which positions' distributions are compared):
    full         the predictions of every token of the templated sample after the first        (default)
    response     the predictions of the response tokens only
    instruction  every position of the raw instruction text, untemplated (the official code)
Reduction over positions: mean (default) or sum (the official code).

Device: everything runs on the original model's device (the pruned model's logits join it there); the
positions to compare are known on the host from the sequence lengths, so the device work has no
data-dependent step, and each batch's scores come back with one transfer. The Wasserstein directions are
drawn by a seeded host generator, so every device uses the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from paser.errors import ConfigError
from paser.scoring import iter_batches, iter_logits, logits_at, math_rows, model_device, span_index, to_host

DIVERGENCES = ("jsd", "kl", "wasserstein")
SPANS = ("full", "response", "instruction")
REDUCTIONS = ("mean", "sum")
N_PROJECTIONS = 16
LOG_FLOOR = -1e4  # exp(-1e4) == 0 in fp32: clamping changes no finite probability
_LN2 = math.log(2.0)


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"selector.{key}='{value}' is unknown; allowed: {list(allowed)}")
    return value


def _distribution(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, log p, Σp) in fp32 of logits [..., V] (any float dtype; left unchanged): one exp per element,
    log p clamped to a finite floor, p = exp(log p) as computed (a rounding of the normaliser then shifts p
    and log p together). In-place ops on two buffers: these passes are memory-bound, and on a CPU each
    fresh buffer costs page faults."""
    z = logits.to(torch.float32, copy=True)
    z = z.sub_(z.amax(-1, keepdim=True)).clamp_min_(LOG_FLOOR)
    e = z.exp()
    total = e.sum(-1)
    log_norm = total.log()[..., None]
    scale = log_norm.neg().exp_()
    return e.mul_(scale), z.sub_(log_norm), total.mul_(scale[..., 0])


def jsd(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) per row of two logit tensors [..., V] → [...].

    With s = p + q = 2m: JSD = ½ Σ (p·log p + q·log q − s·log s) + ½ ln 2 · Σ s, the terms combined before
    the sum, which keeps small divergences precise (summing the entropies separately leaves ~1e-6 nats of
    fp32 accumulation error); per element one exp per model and one log, all in place.
    """
    p, lp, total_p = _distribution(logits_p)
    q, lq, total_q = _distribution(logits_q)
    both = lp.mul_(p).add_(lq.mul_(q))  # p·log p + q·log q
    s = p.add_(q)
    s_log_s = torch.log(s, out=q).clamp_min_(LOG_FLOOR).mul_(s)  # s = 0 only where p = q = 0: term 0
    return both.sub_(s_log_s).sum(-1).add_(total_p.add_(total_q), alpha=_LN2).mul_(0.5).clamp_min_(0.0)


def kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) (nats) per row → [...]."""
    p, lp, _ = _distribution(logits_p)
    return lp.sub_(_distribution(logits_q)[1]).mul_(p).sum(-1).clamp_min_(0.0)


class SlicedWasserstein:
    """Sliced W1 between next-token distributions, tokens at the rows of ``token_vectors`` [V, H]."""

    def __init__(self, token_vectors: torch.Tensor, n_projections: int = N_PROJECTIONS, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dirs = torch.randn(token_vectors.shape[1], n_projections, generator=g)
        dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(token_vectors.device)
        x = token_vectors.float() @ dirs  # [V, n]
        self.order = x.argsort(dim=0).T.contiguous()  # [n, V]
        self.gaps = torch.stack([x[o, j].diff() for j, o in enumerate(self.order)])  # [n, V-1]

    def __call__(self, logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
        diff = _distribution(logits_p)[0].sub_(_distribution(logits_q)[0])
        total = torch.zeros(diff.shape[:-1], device=diff.device)
        # a model split over devices yields logits on its last one, the embeddings sit on its first
        for order, gaps in zip(self.order.to(diff.device), self.gaps.to(diff.device)):
            cdf_gap = diff[..., order].cumsum_(-1)[..., :-1].abs_()
            total += cdf_gap @ gaps
        return total / len(self.order)


def make_divergence(kind: str, original_model=None, seed: int = 0):
    """The per-position divergence function (logits_p, logits_q) → values, for ``kind``."""
    check_choice("divergence", kind, DIVERGENCES)
    if kind == "jsd":
        return jsd
    if kind == "kl":
        return kl
    return SlicedWasserstein(original_model.get_input_embeddings().weight.detach(), seed=seed)


def span_bounds(lengths: Sequence[int], prompt_lens: Sequence[int], span: str) -> list[tuple[int, int]]:
    """Per sample, the positions [first, end) whose next-token distributions are compared."""
    check_choice("span", span, SPANS)
    if span == "instruction":
        return [(0, n) for n in lengths]
    if span == "full":
        return [(0, n - 1) for n in lengths]
    return [(max(p - 1, 0), n - 1) for n, p in zip(lengths, prompt_lens)]


@torch.no_grad()
def sample_divergences(original_model, pruned_model, seqs: Sequence[Sequence[int]],
                       bounds: Sequence[tuple[int, int]], divergence, reduction: str = "mean",
                       batch_size: int = 8, pad_id: int = 0, rows_per_chunk: int | None = None,
                       desc: str | None = None) -> np.ndarray:
    """One float per sequence: the divergence over its positions [first, end), reduced by mean or sum.

    A sequence with no position in its span scores 0. Only the span's positions get logits (the LM head
    runs on their hidden states, ``paser.scoring.logits_at``), ``rows_per_chunk`` positions at a time
    (default: ``paser.scoring.math_rows``), so the logits and the fp32 temporaries stay small.
    """
    return divergences_to(original_model, [pruned_model], seqs, bounds, divergence, reduction, batch_size, pad_id,
                          rows_per_chunk, desc)[0]


@torch.no_grad()
def divergences_to(original_model, models: Sequence, seqs: Sequence[Sequence[int]],
                   bounds: Sequence[tuple[int, int]], divergence, reduction: str = "mean", batch_size: int = 8,
                   pad_id: int = 0, rows_per_chunk: int | None = None, desc: str | None = None) -> np.ndarray:
    """``sample_divergences`` of several models against one original, [len(models), len(seqs)]: the
    original's forward pass runs once per batch for all of them."""
    check_choice("reduction", reduction, REDUCTIONS)
    out = np.zeros((len(models), len(seqs)), dtype=np.float64)
    device = model_device(original_model)
    for idx, ids, mask in iter_batches(seqs, batch_size, pad_id, desc=desc, device=device):
        logits_p = logits_at(original_model, ids, mask, use_cache=False)
        spans = [range(*bounds[i]) for i in idx]
        rows, cols = span_index(spans, device)
        counts = torch.tensor([max(len(span), 1) for span in spans], dtype=torch.float64, device=device)
        for m, model in enumerate(models):
            model_dev = model_device(model)
            logits_q = logits_at(model, ids.to(model_dev), mask.to(model_dev), use_cache=False)
            sums = torch.zeros(len(idx), dtype=torch.float64, device=device)
            for chunk, (lo, lq) in iter_logits((logits_p, logits_q), rows, cols, rows_per_chunk or math_rows(device)):
                sums.index_add_(0, rows[chunk], divergence(lo, lq.to(lo.device)).to(device, torch.float64))
            if reduction == "mean":
                sums /= counts
            out[m, idx] = to_host(sums)
    return out

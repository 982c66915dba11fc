"""Batched teacher-forced forward passes over tokenised samples, shared by every scorer
(JSD in PASER, IFD, Nuggets, Instruction Mining's perplexity, recovery's loss).

Samples are sorted by length and padded on the right, so a batch wastes little compute on padding; the
results come back in the caller's order.

Device rule of every scorer: batches are built on the host and moved once to the model's device, every
tensor derived from them is created there, and numbers come back through ``to_host`` (one transfer per
batch), the one place where device work ends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def model_device(model) -> torch.device:
    """Where a model's inputs go: the device of its first parameter (the embeddings, also when accelerate
    spreads the model over several devices)."""
    return next(model.parameters()).device


def to_host(t: torch.Tensor) -> np.ndarray:
    """A device tensor's values as a numpy array: the single host transfer at the end of device work."""
    return t.detach().cpu().numpy()


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early).

    ``max_tokens`` caps batch_size x longest length, for pools with very uneven lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) == batch_size or (max_tokens and (len(current) + 1) * longest > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[row, :len(s)] = 1
    return ids, mask


def iter_batches(seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int, max_tokens: int | None = None,
                 desc: str | None = None, device: torch.device | str | None = None) \
        -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield (indices, input_ids, attention_mask) batches, grouped by length, with a progress bar; the
    tensors are on ``device`` (default: the host)."""
    batches = length_batches([len(s) for s in seqs], batch_size, max_tokens)
    with tqdm(total=len(seqs), desc=desc, disable=desc is None, unit="sample") as bar:
        for idx in batches:
            ids, mask = pad_right([seqs[i] for i in idx], pad_id)
            yield idx, ids.to(device), mask.to(device)
            bar.update(len(idx))


def target_mask(attention_mask: torch.Tensor, starts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Boolean [B, T-1] mask over next-token *targets*: target t+1 is scored iff it is a real token at
    position >= starts[b] (e.g. the response start, to score only the answer)."""
    device = attention_mask.device
    starts = torch.as_tensor(list(starts) if not torch.is_tensor(starts) else starts, device=device).view(-1, 1)
    positions = torch.arange(1, attention_mask.shape[1], device=device).view(1, -1)
    return attention_mask[:, 1:].bool() & (positions >= starts)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position next-token negative log-likelihood [B, T-1], in fp32."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def masked_mean_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL over the masked targets of each row [B] (NaN where a row has no target)."""
    nll = token_nll(logits, input_ids) * mask
    return nll.sum(-1) / mask.sum(-1)

"""Batched teacher-forced forward passes over tokenised samples, shared by every scorer
(JSD in PASER, IFD, Nuggets, Instruction Mining's perplexity, recovery's loss).

Samples are sorted by length and padded on the right, so a batch wastes little compute on padding; the
results come back in the caller's order.

Device rule of every scorer: batches are built on the host and moved once to the model's device, every
tensor derived from them is created there, and numbers come back through ``to_host`` (one transfer per
batch), the one place where device work ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from paser.progress import tqdm


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
        ids[row, :len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))  # a list or TokenIds
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


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position next-token negative log-likelihood [B, T-1], in fp32, from the full logits: the plain
    form, the reference ``window_token_nll`` is tested and timed against (scripts/profile_device.py)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


# config attributes of models whose logits are not just the LM head's output (transformers' Gemma 2/3,
# Cohere, Granite): their head is not applied position by position here
POSTPROCESSED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
HEAD_ROWS = 512  # positions per LM-head call (see iter_logits)


def math_rows(device: torch.device) -> int:
    """Positions per chunk of full-vocabulary maths: on a CPU few, so that the fp32 temporaries stay in
    cache (4 rows of 49,152: 0.8 MB each; 64 rows made the JSD maths ~1.3x slower); on an accelerator many,
    so that each kernel launch does enough work."""
    return 4 if device.type == "cpu" else 64


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, whole: bool = False,
              **forward_kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Run ``model`` on a batch and return ``at(rows, cols)``: the logits [P, V] at the (row, position)
    pairs (index tensors [P] on the inputs' device), in the model's dtype.

    For the Llama-family layout (``model.model`` the decoder, logits = LM head of its last hidden state)
    only the decoder runs here, and each call of ``at`` applies the LM head to its positions only: the
    full [B, T, V] logits are never formed, and the caller can take the positions in chunks. A model
    that post-processes its logits (``POSTPROCESSED_LOGITS``) or is laid out otherwise runs whole, and so
    does any model with ``whole=True`` (e.g. one whose forward hooks gather sharded weights). A peft model
    runs through its base model (the adapters live in the base model's layers).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    decoder, head = getattr(base, "model", None), base.get_output_embeddings()
    if whole or decoder is None or head is None or any(getattr(config, a, None) for a in POSTPROCESSED_LOGITS):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
        return lambda rows, cols: logits[rows.to(logits.device), cols.to(logits.device)]
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).last_hidden_state
    return lambda rows, cols: head(hidden[rows.to(hidden.device), cols.to(hidden.device)])


def iter_logits(logits_fns: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], rows: torch.Tensor,
                cols: torch.Tensor, rows_per_chunk: int) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """(slice of the positions, [logits of each ``logits_at`` function]) in chunks of ``rows_per_chunk``
    positions. The LM head runs ``HEAD_ROWS`` positions at a time: on a CPU every call packs the head's
    weights anew (a 64-row call costs twice a 256-row one per row), while the maths after it wants small
    chunks that stay in cache."""
    for s in range(0, len(rows), HEAD_ROWS):
        blocks = [fn(rows[s:s + HEAD_ROWS], cols[s:s + HEAD_ROWS]) for fn in logits_fns]
        n = len(blocks[0])
        for t in range(0, n, rows_per_chunk):
            yield slice(s + t, s + min(t + rows_per_chunk, n)), [b[t:t + rows_per_chunk] for b in blocks]


def window_token_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``token_nll`` of ``model`` on unpadded windows [B, T] without forming the [B, T, V] logits: the LM
    head runs on ``HEAD_ROWS`` positions at a time (``logits_at``) and each chunk of ``math_rows`` positions
    gives logsumexp - target logit in fp32, so the fp32 temporaries stay in cache. [B, T-1], fp32."""
    b, t = input_ids.shape
    at = logits_at(model, input_ids, None, use_cache=False)  # no mask, as a plain forward of the windows
    device = input_ids.device
    rows = torch.arange(b, device=device).repeat_interleave(t - 1)
    cols = torch.arange(t - 1, device=device).repeat(b)
    targets = input_ids[:, 1:].reshape(-1)
    out = torch.empty(b * (t - 1), dtype=torch.float32, device=device)
    for chunk, (logits,) in iter_logits((at,), rows, cols, math_rows(device)):
        lf = logits.float()
        out[chunk] = torch.logsumexp(lf, dim=-1) - lf.gather(1, targets[chunk, None].to(lf.device)).squeeze(1).to(out.device)
    return out.view(b, t - 1)


def span_index(spans: Sequence[range], device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) index tensors [P] on ``device`` of every position in each row's range, row-major,
    built from host-side bounds (no data-dependent device step)."""
    rows = torch.tensor([r for r, span in enumerate(spans) for _ in span], dtype=torch.long, device=device)
    cols = torch.tensor([c for span in spans for c in span], dtype=torch.long, device=device)
    return rows, cols


def answer_spans(lengths: Sequence[int], starts: Sequence[int]) -> list[range]:
    """Per row, the positions that predict its tokens max(starts[b], 1) <= t < lengths[b]."""
    return [range(max(s, 1) - 1, n - 1) for s, n in zip(starts, lengths)]


def answer_nll_sums(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: Sequence[int],
                    starts: Sequence[int], rows_per_chunk: int | None = None, **forward_kwargs) -> torch.Tensor:
    """Summed next-token NLL [B] (float64, on the inputs' device) of the tokens at positions
    max(starts[b], 1) <= t < lengths[b] of each row: the LM head and the fp32 log-softmax run only at the
    positions that predict them, ``rows_per_chunk`` at a time (default: ``math_rows``). ``attention_mask``
    may be longer than the
    rows (a cached prefix: ``forward_kwargs`` carries its cache)."""
    device = input_ids.device
    rows, cols = span_index(answer_spans(lengths, starts), device)
    at = logits_at(model, input_ids, attention_mask, **forward_kwargs)
    targets = input_ids[rows, cols + 1]
    sums = torch.zeros(len(lengths), dtype=torch.float64, device=device)
    for chunk, (logits,) in iter_logits((at,), rows, cols, rows_per_chunk or math_rows(device)):
        logp = F.log_softmax(logits, -1, dtype=torch.float32)
        nll = -logp.gather(1, targets[chunk, None].to(logp.device)).squeeze(1)
        sums.index_add_(0, rows[chunk], nll.to(device, torch.float64))
    return sums

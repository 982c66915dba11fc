"""Answer losses under a causal LM, shared by the baselines: IFD's conditioned and unconditioned losses,
Instruction Mining's perplexity (the conditioned loss again, so the two share one cached array).

Every score names the model it comes from: ``pruned`` (the default: the model that is being recovered)
or ``original``; the cache key follows, since scores of the pruned model also depend on the pruner.
"""

from __future__ import annotations

import numpy as np
import torch

from paser.data import alpaca_prompt
from paser.errors import ConfigError
from paser.scoring import answer_nll_sums, answer_spans, iter_batches, model_device, to_host

MODELS = ("pruned", "original")


def score_dependencies(which: str, key: str = "selector.model") -> tuple[str, ...]:
    """The parts of ctx.cache_key that scores of the ``which`` model depend on."""
    if check_model_choice(which, key) == "pruned":
        return ("model", "pruner", "pool")
    return ("model", "pool")


def scoring_model(ctx, which: str) -> torch.nn.Module:
    """The model itself; fetched only when a score has to be computed (cached scores need no model)."""
    return ctx.pruned_model if check_model_choice(which) == "pruned" else ctx.original_model


def check_model_choice(which: str, key: str = "selector.model") -> str:
    if which not in MODELS:
        raise ConfigError(f"{key}='{which}' is unknown; allowed: {list(MODELS)}")
    return which


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text (its BOS), possibly none (e.g. SmolLM2, Qwen)."""
    return list(tokenizer("", add_special_tokens=True)["input_ids"])


def start_tokens(tokenizer) -> list[int]:
    """At least one token to condition on, so that the first answer token is scored too: the tokenizer's
    own prefix, else its BOS, else its EOS (a document boundary)."""
    ids = special_prefix(tokenizer)
    if ids:
        return ids
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start an unconditioned text")
    return [tid]


def answer_sequences(tokenizer, rows: list[dict], cutoff: int, conditioned: bool, prefix: str = "") \
        -> tuple[list[list[int]], list[int]]:
    """Token sequences and the index where the answer starts, for each row.

    conditioned:   Alpaca prompt + answer, truncated to ``cutoff`` tokens.
    unconditioned: start token(s) + ``prefix`` + answer, with *the same answer tokens* as the conditioned
                   sequence (as Cherry_LLM does by shortening its max length by the prompt's length), so
                   that IFD compares two losses over identical targets.
    The answer carries no EOS (the reference scores the answer text only). A row whose prompt fills the
    cutoff has no answer tokens left: its loss is NaN.
    """
    seqs, starts = [], []
    head = start_tokens(tokenizer) + (tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [])
    for r in rows:
        prompt = tokenizer(alpaca_prompt(r), add_special_tokens=True)["input_ids"]
        answer = tokenizer(r["output"], add_special_tokens=False)["input_ids"][:max(0, cutoff - len(prompt))]
        context = prompt if conditioned else head
        seqs.append(list(context) + list(answer))
        starts.append(len(context))
    return seqs, starts


@torch.no_grad()
def mean_answer_nll(model, seqs: list[list[int]], starts: list[int], batch_size: int, pad_id: int,
                    desc: str | None = None) -> np.ndarray:
    """Mean next-token NLL over positions >= starts[i] of each sequence (NaN where there are none)."""
    out = np.full(len(seqs), np.nan, dtype=np.float64)
    for idx, ids, mask in iter_batches(seqs, batch_size, pad_id, desc=desc, device=model_device(model)):
        lengths, first = [len(seqs[i]) for i in idx], [starts[i] for i in idx]
        counts = torch.tensor([len(r) for r in answer_spans(lengths, first)], dtype=torch.float64, device=ids.device)
        out[idx] = to_host(answer_nll_sums(model, ids, mask, lengths, first, use_cache=False) / counts)  # 0/0: NaN
    return out


def answer_losses(ctx, rows: list[dict], which: str, conditioned: bool, prefix: str = "",
                  chunk_size: int = 256) -> np.ndarray:
    """Cached mean answer NLL of every row under the ``which`` model ([N], NaN = no answer token)."""
    tok = ctx.tokenizer
    seqs, starts = answer_sequences(tok, rows, ctx.cutoff, conditioned, prefix)
    kind = "conditioned" if conditioned else "unconditioned"
    params = {"which": which, "cutoff": ctx.cutoff, "template": "alpaca", "eos": False}
    if not conditioned:
        params["prefix"] = prefix

    def compute(start: int, end: int) -> np.ndarray:
        return mean_answer_nll(scoring_model(ctx, which), seqs[start:end], starts[start:end], ctx.batch_size, tok.pad_token_id,
                               desc=f"answer loss ({kind}, {which}) {start}-{end}")

    return ctx.cached_scores(f"answer_nll_{kind}", score_dependencies(which), params, len(rows), compute, chunk_size=chunk_size)

"""Answer losses under a causal LM, shared by the baselines: IFD's conditioned and unconditioned losses,
Instruction Mining's perplexity (the conditioned loss on the Alpaca template: with IFD's ``prompt_format:
alpaca`` the two share one cached array; IFD's default, Cherry_LLM's template, has its own).

A prompt and its answer are always tokenised as one text (``joined_encoding``, with recovery's seam rule
from ``paser.data``), as both references do and as recovery trains.

Every score names the model it comes from: ``pruned`` (the default: the model that is being recovered)
or ``original``; the cache key follows, since scores of the pruned model also depend on the pruner.
"""

from __future__ import annotations

import numpy as np
import torch

from paser.data import (
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    _common_prefix,
    _response_start,
    alpaca_prompt,
    tokenise_heads,
)
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


TEMPLATES = ("alpaca", "cherry")
TRUNCATIONS = ("cherry", "same_answer")

# Cherry_LLM's PROMPT_DICT (cherry_seletion/data_analysis.py): the Alpaca template, but "### Response:" ends the
# prompt without a newline, so that the answer follows the colon directly.
CHERRY_PROMPT_WITH_INPUT = PROMPT_WITH_INPUT.removesuffix("\n")
CHERRY_PROMPT_NO_INPUT = PROMPT_NO_INPUT.removesuffix("\n")
CHERRY_MAX_LENGTH_SLACK = 4  # data_analysis.py: max_length - instruct_i_len + 4 for the answer-only text


def check_choice(value, allowed: tuple[str, ...], key: str):
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is unknown; allowed: {list(allowed)}")
    return value


def prompt_text(row: dict, template: str) -> str:
    """The text before the answer: ``alpaca`` (the recovery template, ending "### Response:\\n") or
    ``cherry`` (Cherry_LLM's, ending "### Response:")."""
    if check_choice(template, TEMPLATES, "selector.prompt_format") == "alpaca":
        return alpaca_prompt(row)
    template_str = CHERRY_PROMPT_WITH_INPUT if row.get("input") else CHERRY_PROMPT_NO_INPUT
    return template_str.format(instruction=row["instruction"], input=row.get("input", ""))


def joined_encoding(tokenizer, prompts: list[str], answers: list[str], add_special_tokens: bool = True,
                    rows_per_call: int = 1024, keep: int | None = None) -> list[tuple[list[int], int]]:
    """(ids of prompt + answer tokenised as one text, index of the answer's first token) for each pair.

    The seam rule is recovery's (``paser.data``): the first token whose character span starts at or after
    the prompt's end (a token merged across the seam counts as prompt); a slow tokenizer, without offsets,
    takes the common prefix with the prompt's own ids. Tokenising the answer on its own would give
    SentencePiece (Metaspace) vocabularies a word-initial "▁" the joined text does not have.
    ``keep``: the caller uses only the first ``keep`` ids and the answer's start up to there, so a huge row is
    tokenised only as far as they need (``paser.data.tokenise_heads``).
    """
    def tokenise(texts: list[str], ps: list[str]) -> list[tuple[list[int], int]]:
        if getattr(tokenizer, "is_fast", False):
            batch = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                              return_special_tokens_mask=True, return_attention_mask=False)
            return [(list(ids), max(_response_start(offsets, special, len(p)), _leading(special)))
                    for ids, offsets, special, p in
                    zip(batch["input_ids"], batch["offset_mapping"], batch["special_tokens_mask"], ps)]
        out = []
        for p, t in zip(ps, texts):
            ids = list(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"])
            out.append((ids, _common_prefix(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"], ids)))
        return out

    out = []
    for b in range(0, len(prompts), rows_per_call):
        ps, texts = prompts[b:b + rows_per_call], [p + a for p, a in zip(prompts[b:b + rows_per_call],
                                                                        answers[b:b + rows_per_call])]
        out += tokenise(texts, ps) if keep is None else tokenise_heads(tokenise, texts, ps, keep)[0]
    return out


def _leading(special: list[int]) -> int:
    """How many special tokens (a BOS) come first: they precede even an empty prompt."""
    return next((i for i, flag in enumerate(special) if not flag), len(special))


def answer_sequences(tokenizer, rows: list[dict], cutoff: int, conditioned: bool, prefix: str = "",
                     template: str = "alpaca", truncation: str = "same_answer") \
        -> tuple[list[list[int]], list[int]]:
    """Token sequences and the index where the answer starts, for each row.

    conditioned:   ``template`` prompt + answer, tokenised as one text (with the tokenizer's special
                   tokens), truncated to ``cutoff`` tokens.
    unconditioned, ``truncation``:
      cherry       Cherry_LLM's: ``prefix`` + answer tokenised as one text (special tokens included), cut
                   at cutoff - P + 4 tokens, P = the prompt's tokens within the cutoff. A row whose prompt
                   fills the cutoff, or whose unconditioned answer tokens do not fit beside its prompt
                   (P + answer > cutoff: data_by_IFD.py skips it), gets no answer tokens.
      same_answer  ours: start token(s) + ``prefix`` tokens + *the conditioned sequence's answer tokens*, so
                   that IFD compares two losses over identical targets.
    Where the unconditioned text has no token before its answer (no BOS, empty prefix), the start tokens are
    put first so that the first answer token is scored. The answer carries no EOS (the reference scores the
    answer text only). A row without answer tokens has a NaN loss.
    """
    check_choice(truncation, TRUNCATIONS, "selector.truncation")
    outputs = [r["output"] for r in rows]
    cond = [(ids[:cutoff], min(start, cutoff)) for ids, start in
            joined_encoding(tokenizer, [prompt_text(r, template) for r in rows], outputs, keep=cutoff)]
    if conditioned:
        return [ids for ids, _ in cond], [start for _, start in cond]
    seqs, starts = [], []
    if truncation == "same_answer":
        head = start_tokens(tokenizer) + (tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [])
        for ids, start in cond:
            seqs.append(list(head) + ids[start:])
            starts.append(len(head))
        return seqs, starts
    unconditioned = joined_encoding(tokenizer, [prefix] * len(rows), outputs, keep=cutoff + CHERRY_MAX_LENGTH_SLACK)
    for (ids, start), (_, prompt_len) in zip(unconditioned, cond):
        if start == 0:
            first = start_tokens(tokenizer)
            ids, start = first + ids, len(first)
        ids = ids[:max(0, cutoff - prompt_len + CHERRY_MAX_LENGTH_SLACK)]
        if prompt_len >= cutoff or prompt_len + len(ids) - start > cutoff:
            ids = ids[:start]  # not scored, as in the reference
        seqs.append(ids)
        starts.append(min(start, len(ids)))
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
                  chunk_size: int = 256, template: str = "alpaca", truncation: str = "same_answer") -> np.ndarray:
    """Cached mean answer NLL of every row under the ``which`` model ([N], NaN = no answer token).

    Everything that changes the sequences enters the cache key: the template (the conditioned sequence,
    and the unconditioned one through its answer tokens or its length), and for the unconditioned loss
    the prefix and the truncation rule."""
    tok = ctx.tokenizer
    seqs, starts = answer_sequences(tok, rows, ctx.cutoff, conditioned, prefix, template, truncation)
    kind = "conditioned" if conditioned else "unconditioned"
    params = {"which": which, "cutoff": ctx.cutoff, "template": template, "eos": False}
    if not conditioned:
        params.update(prefix=prefix, truncation=truncation)

    def compute(start: int, end: int) -> np.ndarray:
        return mean_answer_nll(scoring_model(ctx, which), seqs[start:end], starts[start:end], ctx.batch_size, tok.pad_token_id,
                               desc=f"answer loss ({kind}, {which}) {start}-{end}")

    return ctx.cached_scores(f"answer_nll_{kind}", score_dependencies(which), params, len(rows), compute, chunk_size=chunk_size)

"""Nuggets (Li et al. 2024, "One Shot Learning as Instruction Data Prospector").

Anchors: k-means over the pool's instruction embeddings, and the sample nearest each centre (100 by
default). Zero-shot score of an anchor a: log-likelihood of its answer given its own prompt. One-shot
score of a given candidate z: the same, with z (prompt + answer) prepended as a demonstration. Golden
score of z = fraction of anchors whose answer log-likelihood strictly rises with z as the prefix; the
highest golden scores are kept. (The reference compares summed log-probabilities; over identical answer
tokens a sum and a mean give the same comparison.)

Sequences, as in the reference (pldlgb/nuggets: tasks/alpaca.py, tasks/loader.py, instruction_main.py):
the anchor is its prompt + answer tokenised as one text *without* special tokens (TokenizedForGenRightPad),
the answer starting after the prompt's tokens; the zero-shot pass runs on the anchor alone, with no BOS
(``zero_shot_bos: false``); the one-shot pass runs on the demonstration tokenised with the tokenizer's
special tokens (its BOS), followed directly by the anchor's tokens (``separator: ""``: the reference's
Alpaca task builds one demonstration per candidate and joins nothing to it). Ours, as options:
``zero_shot_bos: true`` (both passes start at the BOS, so that only the demonstration differs) and a
``separator`` such as "\\n\\n" between demonstration and anchor. Known differences: the reference cuts
anchors at 200 tokens and never cuts the demonstration (here both at ``scoring.cutoff``).

Cost: |candidates| x |anchors| forward passes over the anchors. Each candidate's key/value cache is
computed once and shared by all anchors (``reuse_prefix_kv``), so an anchor pass costs only its own
tokens. Golden scores persist in chunks of ``chunk_size`` candidates: an interrupted run resumes. The anchors'
zero-shot scores persist too, so that a run on cached scores reports the same diagnostics as the first.

Cheaper mode for CPU runs: fewer anchors (``n_anchors``), and/or ``prefilter: M``, which scores only M
candidates drawn at random (seeded) in proportion to the anchor clusters' sizes; the others are not
eligible, so M must be at least the budget.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time

import numpy as np
import torch

from paser.data import alpaca_prompt, text_heads
from paser.embedding import embed_pool
from paser.errors import ConfigError
from paser.progress import tqdm
from paser.scoring import answer_nll_sums, iter_batches, model_device, pad_right, to_host
from paser.selectors.clustered import Scored, ScoredSelector, describe
from paser.selectors.lm_scores import (
    check_model_choice,
    joined_encoding,
    score_dependencies,
    scoring_model,
    special_prefix,
)

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("alpaca", "nuggets")
SEPARATOR = ""  # between the demonstration and the anchor: nothing, as in the reference


def _fields(row: dict, prompt_format: str) -> dict:
    """The row as the format sees it: the reference's Alpaca task strips every field (dataset_preprocess)."""
    if prompt_format == "nuggets":
        return {k: (row.get(k) or "").strip() for k in ("instruction", "input", "output")}
    return row


def format_prompt(row: dict, prompt_format: str) -> str:
    """The prompt before the answer: the Alpaca template (what recovery trains on), or the reference
    code's short "Instruction:/Input:/Response:" form (its prompt version "sp", fields stripped)."""
    if prompt_format == "alpaca":
        return alpaca_prompt(row)
    row = _fields(row, prompt_format)
    if row["input"]:
        return f"Instruction:\n{row['instruction']}\nInput:\n{row['input']}\nResponse:\n"
    return f"Instruction:\n{row['instruction']}\nResponse:\n"


def format_answer(row: dict, prompt_format: str) -> str:
    return _fields(row, prompt_format)["output"]


def kmeans_anchors(embeddings: np.ndarray, n_anchors: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(anchor indices, cluster label of every sample): k-means, then the sample nearest each centre."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_anchors, random_state=seed, n_init=3).fit(embeddings)
    dist = km.transform(embeddings)
    anchors = []
    for c in range(n_anchors):  # nearest unused sample, so that two centres never share an anchor
        for i in np.argsort(dist[:, c]):
            if i not in anchors:
                anchors.append(int(i))
                break
    return np.array(anchors, dtype=np.int64), km.labels_.astype(np.int64)


def encode_anchors(tokenizer, rows: list[dict], cutoff: int, prompt_format: str) -> list[tuple[list[int], int]]:
    """Per anchor: (prompt + answer tokenised as one text without special tokens, cut at cutoff; index where
    the answer starts)."""
    enc = joined_encoding(tokenizer, [format_prompt(r, prompt_format) for r in rows],
                          [format_answer(r, prompt_format) for r in rows], add_special_tokens=False, keep=cutoff)
    return [(ids[:cutoff], min(start, cutoff)) for ids, start in enc]


def encode_anchor(tokenizer, row: dict, cutoff: int, prompt_format: str) -> tuple[list[int], int]:
    """encode_anchors for one row."""
    return encode_anchors(tokenizer, [row], cutoff, prompt_format)[0]


def encode_demonstration(tokenizer, row: dict, cutoff: int, prompt_format: str, separator: str = SEPARATOR) \
        -> list[int]:
    """Special prefix + demonstration (prompt + answer as one text, cut at cutoff) + ``separator``'s tokens."""
    text = format_prompt(row, prompt_format) + format_answer(row, prompt_format)
    ids = tokenizer(text_heads(tokenizer, [text], cutoff)[0], add_special_tokens=False)["input_ids"]
    sep = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    return special_prefix(tokenizer) + ids[:cutoff] + sep


def _cache_argument(model) -> str:
    """The keyword a model's forward takes its key/value cache under (renamed in transformers 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _batch_cache(prefix_cache, n: int):
    """A fresh cache holding the demonstration's keys/values for each of ``n`` rows (views, not copies: the
    forward appends the anchors' by concatenation). A transformers cache keeps its own layer kinds, so that
    sliding-window layers (Mistral, Gemma-3's local layers) keep their window and their position count; a
    legacy tuple cache (remote code) becomes a DynamicCache."""
    layers = getattr(prefix_cache, "layers", None)
    if layers is None:
        from transformers import DynamicCache

        return DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix_cache])
    cache = copy.copy(prefix_cache)
    cache.layers = []
    for layer in layers:
        fresh = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            fresh.keys, fresh.values = layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1)
        cache.layers.append(fresh)
    return cache


class AnchorSet:
    """Tokenised anchors and their zero-shot answer log-likelihoods (computed once, reused by every
    candidate)."""

    def __init__(self, tokenizer, rows: list[dict], cutoff: int, prompt_format: str, zero_shot_bos: bool = False):
        enc = encode_anchors(tokenizer, rows, cutoff, prompt_format)
        self.seqs = [e[0] for e in enc]
        self.starts = [e[1] for e in enc]
        self.pad_id = tokenizer.pad_token_id
        self.head = special_prefix(tokenizer) if zero_shot_bos else []  # before the anchor in the zero-shot pass
        self.has_answer = [start < len(seq) for seq, start in zip(self.seqs, self.starts)]

    def __len__(self) -> int:
        return len(self.seqs)

    @torch.no_grad()
    def zero_shot(self, model, batch_size: int) -> np.ndarray:
        seqs = [self.head + s for s in self.seqs]
        starts = [len(self.head) + s for s in self.starts]
        return answer_logprob_sums(model, seqs, starts, batch_size, self.pad_id)

    @torch.no_grad()
    def one_shot(self, model, demo: list[int], batch_size: int, reuse_prefix_kv: bool = True) -> np.ndarray:
        """Answer log-likelihood of every anchor after the demonstration ``demo``."""
        if not reuse_prefix_kv:
            seqs = [demo + s for s in self.seqs]
            starts = [len(demo) + s for s in self.starts]
            return answer_logprob_sums(model, seqs, starts, batch_size, self.pad_id)
        device = model_device(model)
        kw = _cache_argument(model)
        prefix = torch.tensor([demo], dtype=torch.long, device=device)
        prefix_cache = _output_cache(model(input_ids=prefix, use_cache=True))
        out = np.empty(len(self.seqs))
        order = sorted(range(len(self.seqs)), key=lambda i: -len(self.seqs[i]))
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            ids, mask = pad_right([self.seqs[i] for i in idx], self.pad_id)
            ids, mask = ids.to(device), mask.to(device)
            n = len(idx)
            cache = _batch_cache(prefix_cache, n)  # a fresh one per batch: the forward appends to it
            full_mask = torch.cat([torch.ones(n, len(demo), dtype=mask.dtype, device=device), mask], dim=1)
            nll = answer_nll_sums(model, ids, full_mask, [len(self.seqs[i]) for i in idx],
                                  [self.starts[i] for i in idx], use_cache=True, **{kw: cache})
            out[idx] = to_host(-nll)
        return out


@torch.no_grad()
def answer_logprob_sums(model, seqs, starts, batch_size: int, pad_id: int) -> np.ndarray:
    """Summed log-probability of the tokens at positions >= starts[i] of each sequence."""
    out = np.empty(len(seqs))
    for idx, ids, mask in iter_batches(seqs, batch_size, pad_id, device=model_device(model)):
        nll = answer_nll_sums(model, ids, mask, [len(seqs[i]) for i in idx], [starts[i] for i in idx],
                              use_cache=False)
        out[idx] = to_host(-nll)
    return out


def golden_scores(model, tokenizer, candidates: list[dict], anchors: AnchorSet, zero: np.ndarray, cutoff: int,
                  prompt_format: str, batch_size: int, reuse_prefix_kv: bool = True, bar=None,
                  separator: str = SEPARATOR) -> np.ndarray:
    """Fraction of anchors whose answer log-likelihood rises with each candidate as the demonstration."""
    out = np.empty(len(candidates))
    for j, row in enumerate(candidates):
        demo = encode_demonstration(tokenizer, row, cutoff, prompt_format, separator)
        out[j] = float(np.mean(anchors.one_shot(model, demo, batch_size, reuse_prefix_kv) > zero))
        if bar is not None:
            bar.update(1)
    return out


def stratified_prefilter(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` sample indices drawn without replacement, each k-means cluster contributing in
    proportion to its size (largest remainders get the leftover slots)."""
    rng = np.random.default_rng(seed)
    clusters, counts = np.unique(labels, return_counts=True)
    share = counts / counts.sum() * size
    take = np.floor(share).astype(int)
    for c in np.argsort(-(share - take), kind="stable")[:size - take.sum()]:
        take[c] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=t, replace=False) for c, t in zip(clusters, take)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


class NuggetsSelector(ScoredSelector):
    name = "nuggets"

    def __init__(self, model: str = "pruned", n_anchors: int = 100, prefilter: int | None = None,
                 prompt_format: str = "alpaca", separator: str = SEPARATOR, zero_shot_bos: bool = False,
                 reuse_prefix_kv: bool = True, chunk_size: int = 16,
                 cluster: str | None = None, clustering: dict | None = None):
        super().__init__(cluster, clustering)
        self.model = check_model_choice(model)
        if not isinstance(n_anchors, int) or n_anchors < 1:
            raise ConfigError(f"selector.n_anchors={n_anchors!r} must be a positive integer (default 100)")
        if prefilter is not None and (not isinstance(prefilter, int) or prefilter < 1):
            raise ConfigError(f"selector.prefilter={prefilter!r} must be null (score every candidate) or a "
                              "positive number of candidates to score")
        if prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"selector.prompt_format='{prompt_format}' is unknown; allowed: "
                              f"{list(PROMPT_FORMATS)}")
        if separator is not None and not isinstance(separator, str):
            raise ConfigError(f"selector.separator={separator!r} must be a string put between the demonstration "
                              "and the anchor (\"\": none, the reference; e.g. \"\\n\\n\")")
        if not isinstance(zero_shot_bos, bool):
            raise ConfigError(f"selector.zero_shot_bos={zero_shot_bos!r} must be true or false (false: the "
                              "reference's zero-shot pass without BOS; true: a BOS before the anchor)")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"selector.chunk_size={chunk_size!r} must be a positive integer")
        self.n_anchors, self.prefilter, self.prompt_format = n_anchors, prefilter, prompt_format
        self.separator, self.zero_shot_bos = separator or "", zero_shot_bos
        self.reuse_prefix_kv, self.chunk_size = bool(reuse_prefix_kv), chunk_size

    def select(self, pool, budget, ctx):
        least = budget.size if budget.in_samples else 1  # only prefiltered candidates can be selected
        if self.prefilter is not None and not least <= self.prefilter <= len(pool):
            raise ConfigError(f"selector.prefilter={self.prefilter} must lie between the budget ({budget}) "
                              f"and the pool size ({len(pool)}): only prefiltered candidates can be selected")
        return super().select(pool, budget, ctx)

    def score(self, pool, ctx) -> Scored:
        if self.n_anchors > len(pool):
            raise ConfigError(f"selector.n_anchors={self.n_anchors} exceeds the pool size ({len(pool)})")
        t0 = time.perf_counter()
        anchor_idx, labels = kmeans_anchors(embed_pool(ctx, pool.rows), self.n_anchors, ctx.seed)
        candidates = (np.arange(len(pool)) if self.prefilter is None
                      else stratified_prefilter(labels, self.prefilter, ctx.seed))
        anchors = AnchorSet(ctx.tokenizer, pool.subset(anchor_idx), ctx.cutoff, self.prompt_format,
                            self.zero_shot_bos)
        if not all(anchors.has_answer):
            log.warning("Nuggets: %d anchor(s) have no answer token within the cutoff and cannot improve; "
                        "they still count in the denominator", len(anchors) - sum(anchors.has_answer))
        t1 = time.perf_counter()
        # the anchors' zero-shot log-likelihoods persist on their own: a warm run reports the same statistics
        anchor_params = {"which": self.model, "cutoff": ctx.cutoff, "format": self.prompt_format,
                         "zero_shot_bos": self.zero_shot_bos, "anchors": anchor_idx.tolist()}

        def zero_shot(start: int, end: int) -> np.ndarray:
            return anchors.zero_shot(scoring_model(ctx, self.model), ctx.batch_size)[start:end]

        zero = ctx.cached_scores("nuggets_zero_shot", score_dependencies(self.model), anchor_params, len(anchors),
                                 zero_shot, chunk_size=len(anchors))
        t2 = time.perf_counter()
        rows = pool.subset(candidates)
        bar = tqdm(total=len(rows), desc=f"Nuggets golden scores ({len(anchors)} anchors)", unit="cand")
        state: dict = {}  # the model and the progress origin, once a chunk is computed in this run

        def compute(start: int, end: int) -> np.ndarray:
            if not state:  # first chunk computed in this run; after a resume, bar and projection count what is left
                state["model"] = scoring_model(ctx, self.model)
                bar.reset(total=len(rows) - start)
                state["first"] = (start, time.perf_counter())
            out = golden_scores(state["model"], ctx.tokenizer, rows[start:end], anchors, zero, ctx.cutoff,
                                self.prompt_format, ctx.batch_size, self.reuse_prefix_kv, bar, self.separator)
            first, since = state["first"]
            per = (time.perf_counter() - since) / (end - first)
            log.info("Nuggets: %d/%d candidates, %.2f s each, projected %.1f min left", end, len(rows), per,
                     per * (len(rows) - end) / 60)
            return out

        params = {**anchor_params, "separator": self.separator, "prefilter": self.prefilter, "seed": ctx.seed,
                  "embedder": ctx.embedder_name}
        golden = ctx.cached_scores("nuggets_golden", score_dependencies(self.model), params, len(rows), compute,
                                   chunk_size=self.chunk_size)
        bar.close()
        t3 = time.perf_counter()
        scores = np.full(len(pool), np.nan)
        scores[candidates] = golden
        return Scored(scores=scores, rank_key=scores.copy(), diagnostics={
            "model": self.model, "n_anchors": len(anchors), "anchors": anchor_idx.tolist(),
            "prefilter": self.prefilter, "candidates_scored": len(candidates),
            "anchor_evaluations": int(len(candidates) * len(anchors)), "prompt_format": self.prompt_format,
            "separator": self.separator, "zero_shot_bos": self.zero_shot_bos,
            "anchor_zero_shot_logprob": describe(zero),
            "time_s": {"anchors": round(t1 - t0, 3), "zero_shot": round(t2 - t1, 3), "golden": round(t3 - t2, 3),
                       "golden_per_candidate": round((t3 - t2) / max(len(candidates), 1), 4)},
        })

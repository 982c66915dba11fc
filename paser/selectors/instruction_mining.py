"""Instruction Mining (Cao et al. 2023, "Instruction Mining: When Data Mining Meets Large Language Model
Finetuning", arXiv 2307.06290).

A linear rule predicts the (log) evaluation loss a model fine-tuned on a sample would reach from quality
indicators of that sample; the samples with the lowest predicted loss are kept:

    predicted = intercept + sum_i coefficient_i * indicator_i(sample)

Built-in indicators (``INDICATORS``; a name that contains ':' is imported as ``module:function``, called
as ``function(pool, ctx) -> array[N]``, and ``register_indicator`` adds one from Python):

    input_length    tokens of instruction (+ input)          output_length  tokens of the response
    knn<k>          distance to the k-th nearest neighbour in the embedding space (e.g. knn6); S²RIC's
                    kNN search: exact up to 100,000 rows, approximate above (its recall in diagnostics)
    perplexity      exp(mean response NLL given the Alpaca prompt) under the scoring model
    reward          score of a reward model (``reward_model``: hub id or local folder) on (prompt, answer)

Default coefficients: the rule the paper reports after backward feature selection on LLaMA-2-7B (v3 of
the paper), log L = 1.0694 - 0.1498 Rew + 8.257e-5 Len - 0.9350 Knn6, with Rew from OpenAssistant's
reward-model-deberta-v3-large-v2 and Knn6 in SentenceBERT space. They are quoted from the paper as
recalled here: verify them against the paper before citing results. Assumptions: "Len" is read as the
response length in tokens, and Knn6 as the Euclidean distance between unit-normalised MiniLM
embeddings. A coefficient fitted on another model's loss transfers only roughly; refit for a new model.

An indicator that cannot be computed is skipped with a warning, and the rule runs with the rest;
``diagnostics.skipped_indicators`` says which and why. The reward term is decided once per selector, before
any score, by ``environment()``: it is used when the reward model is a local folder, is in the local hub
cache, or the hub is reachable (it is then downloaded), and it is dropped otherwise (e.g. offline). The rule
without it is another method: ``instruction_mining_no_reward`` names its cache key, its diagnostics and its
table rows.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from paser.embedding import embed_pool, instruction_text
from paser.errors import ConfigError
from paser.progress import tqdm
from paser.scoring import to_host
from paser.selectors.clustered import Scored, ScoredSelector, describe
from paser.selectors.lm_scores import answer_losses, check_model_choice
from paser.selectors.paser.clustering import KNN_EXACT_MAX, knn_graph

log = logging.getLogger(__name__)

PAPER_INTERCEPT = 1.0694
PAPER_COEFFICIENTS = {"reward": -0.1498, "output_length": 8.257e-5, "knn6": -0.9350}
PAPER_REWARD_MODEL = "OpenAssistant/reward-model-deberta-v3-large-v2"


class IndicatorUnavailable(RuntimeError):
    """The indicator cannot be computed here (e.g. its model is not reachable): skip it with a warning."""


INDICATORS: dict[str, Callable] = {}


def register_indicator(name: str):
    """Decorator: ``fn(selector, pool, ctx) -> array[N]`` (or ``(array[N], notes dict)``, the notes joining
    the indicator's diagnostics) becomes the indicator ``name``."""
    def wrap(fn):
        INDICATORS[name] = fn
        return fn
    return wrap


@register_indicator("input_length")
def _input_length(sel, pool, ctx) -> np.ndarray:
    return np.array([len(ctx.tokenizer(instruction_text(r), add_special_tokens=False)["input_ids"])
                     for r in pool.rows], dtype=np.float64)


@register_indicator("output_length")
def _output_length(sel, pool, ctx) -> np.ndarray:
    return np.array([len(ctx.tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in pool.rows],
                    dtype=np.float64)


@register_indicator("perplexity")
def _perplexity(sel, pool, ctx) -> np.ndarray:
    # the same cached array as IFD's conditioned loss
    return np.exp(answer_losses(ctx, pool.rows, sel.model, conditioned=True))


@register_indicator("reward")
def _reward(sel, pool, ctx) -> np.ndarray:
    if sel.reward_unavailable:
        raise IndicatorUnavailable(sel.reward_unavailable)
    return reward_scores(ctx, pool.rows, sel.reward_model)


def knn_distance(embeddings: np.ndarray, k: int, device: torch.device | str | None = None,
                 exact_max: int = KNN_EXACT_MAX) -> tuple[np.ndarray, dict]:
    """(Euclidean distance of each row to its k-th nearest other row, the kNN search's diagnostics):
    S²RIC's kNN graph, exact up to ``exact_max`` rows, approximate (with its measured recall) above."""
    x = np.asarray(embeddings, dtype=np.float32)
    n = len(x)
    if not 1 <= k < n:
        raise ConfigError(f"a knn{k} indicator needs 1 <= k < pool size ({n})")
    _, dist, info = knn_graph(x, k, device=device, exact_max=exact_max)
    return dist[:, k - 1].astype(np.float64), info


def reward_unavailable(model_id: str | None) -> str | None:
    """Why the reward model cannot be used on this machine, or None when it can: a local folder, a
    snapshot in the local hub cache, or a hub id while the hub is reachable. Reads no weights."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not model_id:
        return "no selector.reward_model configured"
    if Path(model_id).is_dir():
        return None
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return f"reward model '{model_id}' is neither a local folder nor a hub id"
    try:
        snapshot_download(model_id, local_files_only=True)
        return None
    except OSError:  # not in the local cache
        pass
    if _hub_reachable():
        return None
    return f"reward model '{model_id}' is neither a local folder nor cached, and the hub is not reachable (offline)"


@torch.no_grad()
def reward_scores(ctx, rows: list[dict], model_id: str, batch_size: int = 16) -> np.ndarray:
    """Reward-model scores of (instruction [+ input], answer) pairs on ctx.device, cached per (pool, reward
    model); the model is loaded only when a score has to be computed."""
    state: dict = {}

    def compute(start: int, end: int) -> np.ndarray:
        if not state:
            state["tok"], state["rm"] = _load_reward_model(model_id, ctx.device)
        tok, rm = state["tok"], state["rm"]
        out = []
        for b in tqdm(range(start, end, batch_size), desc=f"reward {start}-{end}", unit="batch"):
            batch = rows[b:min(b + batch_size, end)]
            enc = tok([instruction_text(r) for r in batch], [r["output"] for r in batch], truncation=True,
                      max_length=512, padding=True, return_tensors="pt").to(ctx.device)
            out.append(to_host(rm(**enc).logits[:, 0].float()))
        return np.concatenate(out)

    return ctx.cached_scores("reward", ("pool",), {"reward_model": model_id}, len(rows), compute, chunk_size=1024)


def _load_reward_model(model_id: str, device: torch.device):
    """The reward model from the local cache, else from the hub (environment() found one of them)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def load(local_files_only: bool):
        tok = AutoTokenizer.from_pretrained(model_id, local_files_only=local_files_only)
        model = AutoModelForSequenceClassification.from_pretrained(model_id, local_files_only=local_files_only)
        return tok, model.to(device).eval()

    for local_files_only in (True, False):
        try:
            return load(local_files_only)
        except Exception as e:  # noqa: BLE001 -- not cached, gated, or not a reward model
            error = e
    # the key already says "with the reward term": never fall back silently
    raise RuntimeError(f"could not load reward model '{model_id}' ({type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''}); set selector.reward_model=null to "
                       "run Instruction Mining without its reward term") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline run skips the reward model at once instead of waiting
    through the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _resolve(name: str) -> Callable:
    if name in INDICATORS:
        return INDICATORS[name]
    m = re.fullmatch(r"knn(\d+)", name)
    if m:
        k = int(m.group(1))
        return lambda sel, pool, ctx: knn_distance(embed_pool(ctx, pool.rows), k, device=ctx.device)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"selector.coefficients: indicator '{name}' cannot be imported ({e})") from None
        return lambda sel, pool, ctx: fn(pool, ctx)
    raise ConfigError(f"selector.coefficients: unknown indicator '{name}'; allowed: {sorted(INDICATORS)}, "
                      "knn<k> (e.g. knn6), or 'module:function'")


class InstructionMiningSelector(ScoredSelector):
    name = "instruction_mining"
    REDUCED = "instruction_mining_no_reward"  # the rule with a reward coefficient but no reward model

    def __init__(self, coefficients: dict | None = None, intercept: float = PAPER_INTERCEPT,
                 reward_model: str | None = PAPER_REWARD_MODEL, model: str = "pruned",
                 cluster: str | None = None, clustering: dict | None = None):
        super().__init__(cluster, clustering)
        coefficients = dict(PAPER_COEFFICIENTS if coefficients is None else coefficients)
        bad = {k: v for k, v in coefficients.items()
               if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise ConfigError(f"selector.coefficients must map indicator names to numbers; got {bad}")
        self.coefficients = {k: float(v) for k, v in coefficients.items() if v != 0}
        if not self.coefficients:
            raise ConfigError("selector.coefficients has no non-zero coefficient: the rule would rank nothing")
        self.indicators = {k: _resolve(k) for k in self.coefficients}
        self.intercept = float(intercept)
        self.reward_model = reward_model
        self.model = check_model_choice(model)

    @cached_property
    def reward_unavailable(self) -> str | None:
        """Why the rule's reward term is dropped here (None: it is used, or the rule has none); decided once."""
        return reward_unavailable(self.reward_model) if "reward" in self.coefficients else None

    @property
    def method(self) -> str:
        return self.REDUCED if self.reward_unavailable else self.name

    def environment(self) -> dict:
        """Whether this machine can compute the reward term: it changes the result, so the pipeline puts it
        in the selection's cache key and results."""
        if "reward" not in self.coefficients:
            return {}
        return {"method": self.method, "reward_term": not self.reward_unavailable}

    def score(self, pool, ctx) -> Scored:
        predicted = np.full(len(pool), self.intercept)
        used, skipped, summary, times = {}, {}, {}, {}
        for name, coef in self.coefficients.items():
            t0 = time.perf_counter()
            try:
                out = self.indicators[name](self, pool, ctx)
            except IndicatorUnavailable as e:
                log.warning("Instruction Mining: skipping indicator '%s': %s", name, e)
                skipped[name] = str(e)
                continue
            values, notes = out if isinstance(out, tuple) else (out, {})
            values = np.asarray(values, dtype=np.float64)
            if values.shape != (len(pool),):
                raise RuntimeError(f"indicator '{name}' returned shape {values.shape}, expected ({len(pool)},)")
            predicted += coef * values
            used[name] = coef
            summary[name] = {**describe(values), **notes}
            times[name] = round(time.perf_counter() - t0, 3)
        if not used:
            raise ConfigError(f"Instruction Mining: no indicator could be computed ({skipped}); configure "
                              "selector.coefficients with indicators available here")
        return Scored(scores=predicted, rank_key=-predicted, diagnostics={
            "method": self.method, "intercept": self.intercept, "coefficients_used": used, "skipped_indicators": skipped,
            "indicators": summary, "predicted_loss": describe(predicted), "time_s": times})

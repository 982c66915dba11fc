"""Perplexity with the LLM-Pruner protocol: the corpus joined with blank lines, tokenised once, cut into
non-overlapping windows of ``seq_len`` tokens (the tail shorter than a window is dropped), each window
scored on its own; ppl = exp(mean NLL over all predicted tokens).

``bos`` says where a BOS token goes. ``none`` (the LLaMA papers' convention): the corpus is tokenised as
the tokenizer does by default, so only the first window starts with BOS (for tokenizers that add one).
``per_window``: the corpus is tokenised without special tokens and every window is BOS + ``seq_len - 1``
corpus tokens; the windows tile the corpus without overlap and every corpus token in them is scored (the
BOS is only read). Models trained with a BOS on every sequence (Gemma) are far off-distribution without
it. The per-model default is ``model.ppl_bos``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from pathlib import Path

import numpy as np
import torch

from paser.data import ppl_corpus_path, ppl_corpus_text
from paser.errors import ConfigError
from paser.progress import tqdm
from paser.scoring import model_device, to_host, window_token_nll

log = logging.getLogger(__name__)

BOS_MODES = ("none", "per_window")


def check_bos(bos: str, key: str = "evaluator.ppl.bos") -> str:
    if bos not in BOS_MODES:
        raise ConfigError(f"{key}={bos!r} is unknown; allowed: {list(BOS_MODES)} (the default comes from "
                          "model.ppl_bos)")
    return bos


def corpus_windows(tokenizer, text: str, seq_len: int, bos: str = "none") -> torch.Tensor:
    """The scored windows [n, seq_len] of ``text`` (see the module docstring for ``bos``)."""
    check_bos(bos)
    if bos == "none":
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        n = ids.numel() // seq_len
        return ids[: n * seq_len].view(n, seq_len)
    if tokenizer.bos_token_id is None:
        raise ConfigError(f"evaluator.ppl.bos=per_window needs a BOS token, and the tokenizer of "
                          f"'{tokenizer.name_or_path}' has none; use evaluator.ppl.bos=none (or model.ppl_bos=none)")
    if seq_len < 2:
        raise ConfigError(f"evaluator.ppl.seq_len={seq_len} leaves no corpus token after the BOS; use >= 2")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    body = seq_len - 1
    n = ids.numel() // body
    first = torch.full((n, 1), tokenizer.bos_token_id, dtype=ids.dtype)
    return torch.cat([first, ids[: n * body].view(n, body)], dim=1)


_WINDOWS: dict[tuple, torch.Tensor] = {}
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition, computed once per tokenizer object (it serialises MBs)."""
    if tokenizer not in _FINGERPRINTS:
        spec = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
        _FINGERPRINTS[tokenizer] = hashlib.sha256(spec.encode()).hexdigest()
    return _FINGERPRINTS[tokenizer]


def cached_corpus_windows(tokenizer, name: str, data_dir: str, seq_len: int, bos: str = "none") -> torch.Tensor:
    """corpus_windows of a named corpus, tokenised once per process (a run evaluates up to three
    model states with the same tokenizer)."""
    key = (tokenizer.name_or_path, len(tokenizer), _tokenizer_fingerprint(tokenizer), name, str(data_dir),
           seq_len, bos)
    if key not in _WINDOWS:
        _WINDOWS[key] = corpus_windows(tokenizer, ppl_corpus_text(name, data_dir), seq_len, bos)
    return _WINDOWS[key]


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8, desc: str | None = None) -> np.ndarray:
    """Summed next-token NLL (nats, float64) of each window [n, seq_len]: ``seq_len - 1`` predictions each."""
    device = model_device(model)
    sums = []
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=desc is None, unit="batch"):
        batch = windows[start:start + batch_size].to(device)
        sums.append(window_token_nll(model, batch).double().sum(dim=1))  # on the device: no host sync per batch
    if not sums:
        return np.zeros(0, dtype=np.float64)
    return to_host(torch.cat(sums)).astype(np.float64)


def perplexity(model, windows: torch.Tensor, batch_size: int = 8, desc: str | None = None) -> dict:
    """exp(mean NLL) over every next-token prediction in ``windows`` [n, seq_len]."""
    sums = window_nll(model, windows, batch_size, desc)
    count = len(windows) * (windows.shape[1] - 1)
    mean = float(sums.sum()) / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": len(windows)}


def summarise(sums: np.ndarray, per_window: int) -> dict:
    count = len(sums) * per_window
    mean = float(sums.sum()) / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": len(sums)}


class PerplexityEvaluator:
    """Perplexity on each configured corpus (wikitext2 = WikiText-2 test, ptb = PTB validation).

    ``batch_size`` only moves memory and speed: in bf16 it changes results at most in the last digits
    (batched kernels block differently), so it is a neutral knob that the cache key ignores.
    ``evaluate_with_samples`` also returns each window's summed NLL and token count (``<corpus>/nll``,
    ``<corpus>/tokens``), for paired comparisons between model states.
    """

    neutral_knobs: tuple[str, ...] = ("batch_size", "data_dir")  # the corpora count by content: input_files

    def __init__(self, corpora=("wikitext2", "ptb"), seq_len: int = 128, batch_size: int = 8,
                 max_windows: int | None = None, data_dir: str = "../shared/data", bos: str = "none"):
        self.corpora = list(corpora)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.max_windows = max_windows
        self.data_dir = data_dir
        self.bos = check_bos(bos)

    def input_files(self) -> list[Path]:
        return [ppl_corpus_path(name, self.data_dir) for name in self.corpora]

    def evaluate(self, model, tokenizer) -> dict:
        return self.evaluate_with_samples(model, tokenizer)[0]

    def evaluate_with_samples(self, model, tokenizer) -> tuple[dict, dict[str, np.ndarray]]:
        """(metrics, per-window arrays)."""
        out, samples = {}, {}
        for name in self.corpora:
            windows = cached_corpus_windows(tokenizer, name, self.data_dir, self.seq_len, self.bos)
            if self.max_windows is not None and len(windows) > self.max_windows:
                windows = windows[: self.max_windows]  # first windows: a fixed, reproducible subset
            sums = window_nll(model, windows, self.batch_size, desc=f"ppl {name}")
            result = summarise(sums, self.seq_len - 1)
            log.info("%s perplexity %.3f over %d windows of %d tokens (BOS: %s)", name, result["ppl"],
                     result["windows"], self.seq_len, self.bos)
            out[name] = {**result, "subset": self.max_windows is not None, "bos": self.bos}
            samples[f"{name}/nll"] = sums
            samples[f"{name}/tokens"] = np.full(len(sums), self.seq_len - 1, dtype=np.int64)
        return out, samples

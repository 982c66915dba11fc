"""Perplexity with the LLM-Pruner protocol: the corpus joined with blank lines, tokenised once,
cut into non-overlapping windows of ``seq_len`` tokens (the tail shorter than a window is dropped), each
window scored on its own; ppl = exp(mean NLL over all predicted tokens)."""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from pathlib import Path

import torch
from tqdm.auto import tqdm

from paser.data import ppl_corpus_path, ppl_corpus_text
from paser.scoring import model_device, to_host, token_nll

log = logging.getLogger(__name__)


def corpus_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


_WINDOWS: dict[tuple, torch.Tensor] = {}
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition, computed once per tokenizer object (it serialises MBs)."""
    if tokenizer not in _FINGERPRINTS:
        spec = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
        _FINGERPRINTS[tokenizer] = hashlib.sha256(spec.encode()).hexdigest()
    return _FINGERPRINTS[tokenizer]


def cached_corpus_windows(tokenizer, name: str, data_dir: str, seq_len: int) -> torch.Tensor:
    """corpus_windows of a named corpus, tokenised once per process (a run evaluates up to three
    model states with the same tokenizer)."""
    key = (tokenizer.name_or_path, len(tokenizer), _tokenizer_fingerprint(tokenizer), name, str(data_dir), seq_len)
    if key not in _WINDOWS:
        _WINDOWS[key] = corpus_windows(tokenizer, ppl_corpus_text(name, data_dir), seq_len)
    return _WINDOWS[key]


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, desc: str | None = None) -> dict:
    """exp(mean NLL) over every next-token prediction in ``windows`` [n, seq_len]."""
    device = model_device(model)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=desc is None, unit="batch"):
        batch = windows[start:start + batch_size].to(device)
        nll = token_nll(model(batch, use_cache=False).logits, batch)
        total += nll.double().sum().to(device)  # summed on the device: no host sync per batch
        count += nll.numel()
    mean = float(to_host(total)) / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": len(windows)}


class PerplexityEvaluator:
    """Perplexity on each configured corpus (wikitext2 = WikiText-2 test, ptb = PTB validation).

    ``batch_size`` only moves memory and speed: in bf16 it changes results at most in the last digits
    (batched kernels block differently), so it is a neutral knob that the cache key ignores.
    """

    neutral_knobs: tuple[str, ...] = ("batch_size", "data_dir")  # the corpora count by content: input_files

    def __init__(self, corpora=("wikitext2", "ptb"), seq_len: int = 128, batch_size: int = 8,
                 max_windows: int | None = None, data_dir: str = "../shared/data"):
        self.corpora = list(corpora)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.max_windows = max_windows
        self.data_dir = data_dir

    def input_files(self) -> list[Path]:
        return [ppl_corpus_path(name, self.data_dir) for name in self.corpora]

    def evaluate(self, model, tokenizer) -> dict:
        out = {}
        for name in self.corpora:
            windows = cached_corpus_windows(tokenizer, name, self.data_dir, self.seq_len)
            if self.max_windows is not None and len(windows) > self.max_windows:
                windows = windows[: self.max_windows]  # first windows: a fixed, reproducible subset
            result = perplexity(model, windows, self.batch_size, desc=f"ppl {name}")
            log.info("%s perplexity %.3f over %d windows of %d tokens", name, result["ppl"],
                     result["windows"], self.seq_len)
            out[name] = {**result, "subset": self.max_windows is not None}
        return out

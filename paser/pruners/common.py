"""What every pruner shares: which weights are pruned, argument checks, masks, and the sparsity report."""

from __future__ import annotations

import torch

from paser.errors import ConfigError
from paser.models import decoder_layers


class NoPruner:
    """pruner=none: the dense model goes on unchanged (the 'dense' rows of a table)."""

    needs_calibration = False
    changes_model = False

    def prune(self, model, calib=None) -> dict:
        return sparsity_report(model)


def check_sparsity(sparsity: float, key: str = "pruner.sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise ConfigError(f"{key}={sparsity!r} must be a fraction strictly between 0 and 1")
    return float(sparsity)


def parse_nm(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): N zeros in every block of M consecutive weights of a row."""
    if pattern in (None, "", "unstructured"):
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise ConfigError(f"pruner.pattern='{pattern}' must be 'unstructured' or 'N:M' like '2:4'") from None
    if not 0 < n < m:
        raise ConfigError(f"pruner.pattern='{pattern}': need 0 < N < M")
    return n, m


def resolve_sparsity(sparsity: float | None, pattern: str | None) -> tuple[float, tuple[int, int] | None]:
    """(sparsity, (N, M) or None). With an N:M pattern the sparsity is N/M: ``sparsity`` must then be
    null or equal to it, so that a config never claims a sparsity it does not get."""
    nm = parse_nm(pattern)
    if nm is None:
        if sparsity is None:
            raise ConfigError("pruner.sparsity is null but pruner.pattern is unstructured; "
                              "set a fraction in (0, 1) or an N:M pattern like '2:4'")
        return check_sparsity(sparsity), None
    if sparsity is not None and abs(float(sparsity) - nm[0] / nm[1]) > 1e-9:
        raise ConfigError(f"pruner.sparsity={sparsity} contradicts pruner.pattern='{pattern}' "
                          f"(which means {nm[0] / nm[1]:g}); set pruner.sparsity=null")
    return nm[0] / nm[1], nm


def lowest(score: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Indices of the k lowest entries along ``dim``, ties going to the lower index (a stable sort, as
    Wanda's reference takes its unstructured mask). ``torch.topk`` leaves the order of ties to the device
    and its kernel: on bf16 weights, where a row's cut falls inside a run of equal magnitudes in most rows
    (SmolLM2: 73.7% of rows, ``scripts/mask_ties.py``), CPU and CUDA then prune different weights."""
    return torch.sort(score, dim=dim, stable=True).indices.narrow(dim, 0, k)


def prune_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Boolean mask of the weights to zero, comparing ``score`` [out, in] within each output row:
    unstructured, the int(in * sparsity) lowest of every row; N:M, the N lowest of every block of M
    consecutive inputs of every row (ties to the lower index, see ``lowest``)."""
    rows, cols = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    if nm is None:
        k = int(cols * sparsity)
        if k:
            mask.scatter_(1, lowest(score, k, dim=1), True)
        return mask
    n, m = nm
    if cols % m:
        raise ConfigError(f"pruner.pattern='{n}:{m}' needs input widths divisible by {m}; a layer has {cols}")
    blocks = score.reshape(rows, cols // m, m)
    return mask.reshape(rows, cols // m, m).scatter_(2, lowest(blocks, n, dim=2), True).reshape(rows, cols)


def prunable_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """Every Linear inside the decoder blocks (attention, MLP and MoE experts stored as Linear layers);
    embeddings and lm_head are never returned, so no pruner touches them. An MoE router (``gate``) is
    left dense."""
    return [(f"layers.{i}.{name}", linear) for i, layer in enumerate(decoder_layers(model))
            for name, linear in layer_linears(layer)]


def layer_linears(layer) -> list[tuple[str, torch.nn.Linear]]:
    """The prunable Linear layers of one decoder block, named relative to it."""
    return [(name, m) for name, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("mlp.gate") and "router" not in name]


def fused_experts(layer) -> list[tuple[str, torch.nn.Module]]:
    """MoE expert banks that keep all experts in 3-D parameters (transformers 5 Mixtral, Qwen-MoE, ...):
    ``gate_up_proj`` [E, 2I, H] (gate rows then up rows) and ``down_proj`` [E, H, I]."""
    out = []
    for name, module in layer.named_modules():
        gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(gu, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gu.dim() == 3:
            if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True) \
                    or getattr(module, "has_bias", False):
                raise ConfigError(f"MoE experts '{name}' ({type(module).__name__}) use a transposed, "
                                  "interleaved or biased layout; only [gate; up] x hidden without bias "
                                  "(Mixtral-style) is supported")
            out.append((name, module))
    return out


def prunable_weights(model) -> list[tuple[str, torch.Tensor]]:
    """(name, 2-D weight [out, in]) for every prunable matrix: each decoder Linear and each expert's
    gate_up/down matrix of fused MoE banks (views: editing them edits the model)."""
    out = [(name, linear.weight) for name, linear in prunable_linears(model)]
    for i, layer in enumerate(decoder_layers(model)):
        for name, experts in fused_experts(layer):
            for e in range(experts.gate_up_proj.shape[0]):
                out.append((f"layers.{i}.{name}.{e}.gate_up_proj", experts.gate_up_proj.data[e]))
                out.append((f"layers.{i}.{name}.{e}.down_proj", experts.down_proj.data[e]))
    return out


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sparsity_report(model, params_before: int | None = None) -> dict:
    """Achieved sparsity overall (over the prunable decoder weights) and per layer, and the parameter
    counts (all, and non-zero; with ``params_before``, also the count before pruning)."""
    per_layer, zeros, total = {}, 0, 0
    for name, weight in prunable_weights(model):
        z = int((weight == 0).sum())
        n = weight.numel()
        layer = ".".join(name.split(".")[:2])
        lz, ln = per_layer.get(layer, (0, 0))
        per_layer[layer] = (lz + z, ln + n)
        zeros += z
        total += n
    params = parameter_count(model)
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    report = {"sparsity": zeros / total if total else 0.0,
              "sparsity_per_layer": {k: z / n for k, (z, n) in per_layer.items()},
              "params": params, "params_nonzero": nonzero}
    if params_before is not None:
        report["params_before"] = params_before
    return report

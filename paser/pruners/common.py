"""What every pruner shares: which Linear layers are pruned, argument checks, and the sparsity report."""

from __future__ import annotations

import torch

from paser.errors import ConfigError
from paser.models import decoder_layers

NONE_PRUNER_REPORT = {"sparsity": 0.0}


class NoPruner:
    """pruner=none: the dense model goes on unchanged (the 'dense' rows of a table)."""

    needs_calibration = False

    def prune(self, model, calib=None) -> dict:
        return sparsity_report(model)


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise ConfigError(f"pruner.sparsity={sparsity!r} must be a fraction strictly between 0 and 1")
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


def prunable_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """Every Linear inside the decoder blocks (attention, MLP and MoE experts); embeddings and lm_head
    are never returned, so no pruner touches them. The MoE router (``gate``) is left dense."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("mlp.gate") and "router" not in name:
                out.append((f"layers.{i}.{name}", module))
    return out


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sparsity_report(model) -> dict:
    """Achieved sparsity overall (over the prunable Linear weights) and per layer, and the parameter
    counts (all, and non-zero)."""
    per_layer, zeros, total = {}, 0, 0
    for name, linear in prunable_linears(model):
        z = int((linear.weight == 0).sum())
        n = linear.weight.numel()
        layer = ".".join(name.split(".")[:2])
        lz, ln = per_layer.get(layer, (0, 0))
        per_layer[layer] = (lz + z, ln + n)
        zeros += z
        total += n
    params = parameter_count(model)
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"sparsity": zeros / total if total else 0.0,
            "sparsity_per_layer": {k: z / n for k, (z, n) in per_layer.items()},
            "params": params, "params_nonzero": nonzero}

"""The layer-wise calibration runner shared by Wanda and SparseGPT.

The calibration windows are embedded once and the inputs of decoder layer 0 captured by a hook. Then,
layer by layer: hooks record statistics of the input of every prunable weight (in fp32, whatever the
model dtype) while the layer runs on all windows, the pruner edits the layer's weights from those
statistics, and the *pruned* layer is run again so that its outputs become the next layer's inputs
(errors of earlier layers are seen by later ones, as in both reference implementations). Within a layer
all weights are pruned from the dense layer's inputs, as in the Wanda repository (no "true sequential"
split into q/k/v, o, gate/up, down).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from paser.models import decoder_layers
from paser.pruners.common import fused_experts, layer_linears

log = logging.getLogger(__name__)


class InputStat(Protocol):
    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x`` [tokens, in_features] (fp32)."""


@dataclass
class Target:
    name: str
    weight: torch.Tensor  # [out, in], a view into the model's parameter
    stat: InputStat


class _Captured(Exception):
    """Raised by the layer-0 hook to stop the forward pass once the layer inputs are recorded."""


@torch.no_grad()
def first_layer_inputs(model, calib: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, keyword arguments) that the model passes to its first decoder layer, per batch of
    calibration windows. The keyword arguments (position embeddings, attention mask, ...) are whatever
    this transformers version passes, so the runner does not depend on the layer's call signature."""
    layers = decoder_layers(model)
    batches: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        batches.append((hidden.detach(), kwargs))
        raise _Captured

    device = next(model.parameters()).device
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return batches


def _attach(layer, prefix: str, make_stat: Callable[[torch.Tensor], InputStat]):
    """Targets of one decoder layer, with hooks that feed their input statistics."""
    targets, handles = [], []
    for name, linear in layer_linears(layer):
        target = Target(f"{prefix}.{name}", linear.weight, make_stat(linear.weight))

        def hook(module, inputs, output, stat=target.stat):
            x = inputs[0]
            stat.add(x.reshape(-1, x.shape[-1]).float())

        handles.append(linear.register_forward_hook(hook))
        targets.append(target)
    for name, experts in fused_experts(layer):
        n_experts = experts.gate_up_proj.shape[0]
        gu = [Target(f"{prefix}.{name}.{e}.gate_up_proj", experts.gate_up_proj.data[e],
                     make_stat(experts.gate_up_proj.data[e])) for e in range(n_experts)]
        down = [Target(f"{prefix}.{name}.{e}.down_proj", experts.down_proj.data[e],
                       make_stat(experts.down_proj.data[e])) for e in range(n_experts)]

        def moe_hook(module, args, kwargs, gu=gu, down=down):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            values = dict(zip(names, args)) | {k: kwargs[k] for k in names if k in kwargs}
            hidden, index = values["hidden_states"], values["top_k_index"]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            for e in range(len(gu)):
                x = hidden[(index == e).any(dim=-1)].float()
                if not len(x):
                    continue
                gu[e].stat.add(x)
                # the input of down_proj, recomputed in fp32: act(gate) * up of the routed tokens
                gate, up = torch.nn.functional.linear(x, gu[e].weight.float()).chunk(2, dim=-1)
                down[e].stat.add(module.act_fn(gate) * up)

        handles.append(experts.register_forward_pre_hook(moe_hook, with_kwargs=True))
        targets += gu + down
    return targets, handles


def _output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def prune_layerwise(model, calib: torch.Tensor, make_stat: Callable[[torch.Tensor], InputStat],
                    prune_target: Callable[[Target], None], batch_size: int = 8, desc: str = "prune") -> None:
    """Run the layer-wise calibration and call ``prune_target`` on every prunable weight, in order."""
    start = time.perf_counter()
    batches = first_layer_inputs(model, calib, batch_size)
    for i, layer in enumerate(tqdm(decoder_layers(model), desc=desc, unit="layer")):
        targets, handles = _attach(layer, f"layers.{i}", make_stat)
        try:
            for hidden, kwargs in batches:
                layer(hidden, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for target in targets:
            prune_target(target)
        batches = [(_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in batches]
    log.info("%s: %d layers pruned from %d calibration windows in %.1f s", desc, len(decoder_layers(model)),
             len(calib), time.perf_counter() - start)

"""The layer-wise calibration runner shared by Wanda and SparseGPT.

The calibration windows are embedded once and the inputs of decoder layer 0 captured by a hook. Then,
layer by layer: hooks record statistics of the input of every prunable weight (in fp32, whatever the
model dtype) while the layer runs on all windows, the pruner edits the layer's weights from those
statistics, and the *pruned* layer is run again so that its outputs become the next layer's inputs
(errors of earlier layers are seen by later ones, as in both reference implementations). Within a layer
all weights are pruned from the dense layer's inputs, as in the Wanda repository (no "true sequential"
split into q/k/v, o, gate/up, down).

Each layer is called with the arguments the model itself passes it: positional ones after the hidden
states as well as keyword ones (attention mask, position embeddings, ...). Where the layers differ in kind
(``config.layer_types``, e.g. Gemma-3's sliding-window and full-attention layers, which get different masks
and rotary embeddings), the arguments of every layer are recorded in one dense forward pass; otherwise
those of layer 0 serve all layers and the capture stops at layer 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from paser.models import decoder_layers
from paser.progress import tqdm
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
    """Raised by a layer hook to stop the forward pass once the layer inputs are recorded."""


def mixed_layer_types(model) -> bool:
    """Whether the decoder layers come in several kinds that the model calls with different arguments."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return len(set(getattr(config, "layer_types", None) or ())) > 1


LayerInputs = tuple[tuple, dict]  # (positional arguments after the hidden states, keyword arguments)


@torch.no_grad()
def first_layer_inputs(model, calib: torch.Tensor, batch_size: int) \
        -> list[tuple[torch.Tensor, list[LayerInputs]]]:
    """Per batch of calibration windows, the hidden states the model passes to its first decoder layer and,
    for every layer, the other arguments it passes (position embeddings, attention mask, ...): whatever
    this transformers version (or the model's own code) passes, positional or keyword, so that the runner
    does not depend on the layer's call signature."""
    layers = decoder_layers(model)
    per_layer = mixed_layer_types(model)
    last = len(layers) - 1 if per_layer else 0
    batches: list[tuple[torch.Tensor, list[LayerInputs]]] = []
    seen: list = []

    def hook(module, args, kwargs, index):
        kwargs = dict(kwargs)
        hidden, rest = (args[0], tuple(args[1:])) if args else (kwargs.pop("hidden_states"), ())
        if index == 0:
            seen.append(hidden.detach())
        seen.append((rest, kwargs))
        if index == last:
            raise _Captured

    device = next(model.parameters()).device
    handles = [layers[i].register_forward_pre_hook(partial(hook, index=i), with_kwargs=True)
               for i in range(last + 1)]
    try:
        for batch in calib.split(batch_size):
            seen.clear()
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
            inputs = seen[1:] if per_layer else seen[1:2] * len(layers)
            batches.append((seen[0], inputs))
    finally:
        for h in handles:
            h.remove()
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
            for hidden, inputs in batches:
                layer(hidden, *inputs[i][0], **inputs[i][1])
        finally:
            for h in handles:
                h.remove()
        for target in targets:
            prune_target(target)
        batches = [(_output(layer(hidden, *inputs[i][0], **inputs[i][1])), inputs) for hidden, inputs in batches]
    log.info("%s: %d layers pruned from %d calibration windows in %.1f s", desc, len(decoder_layers(model)),
             len(calib), time.perf_counter() - start)

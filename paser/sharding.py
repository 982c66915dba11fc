"""FSDP for LoRA recovery (``recovery.fsdp=true`` under torchrun): for models whose training state does not
fit one GPU.

Every decoder layer and then the whole peft model are wrapped with FSDP2's ``fully_shard``
(``torch.distributed.fsdp``): each rank keeps 1/N of every weight (frozen base weights in the model's
dtype, LoRA weights in fp32) and of the optimizer state, and gathers a layer's weights in the model's dtype
just for its forward and backward (``MixedPrecisionPolicy``); gradients are reduce-scattered in fp32. The
fp32 sharded LoRA weights are the master weights, so ``ShardedWeights`` stands in for
``paser.recovery.MasterWeights`` with the same interface. The trained adapter is gathered once, in full,
and returned as an ``AdapterWeights`` (what the pipeline stores); the evaluation loads it onto the pruned
model as for any stored adapter.

The weights are read once: rank 0 loads the pruned model on the host, the other ranks build it on ``meta``
(``paser.models.load_saved(device="meta")``), and ``shard`` broadcasts rank 0's tensors into every rank's
shards after wrapping, as torchtune's distributed LoRA recipe loads a full state dict into a model sharded on
meta. No GPU ever holds more than its shards (plus one layer's gathered weights). The stages other than
recovery run on rank 0 (see paser.distributed); README, "On GPUs and clusters".
"""

from __future__ import annotations

from pathlib import Path

import torch

from paser import distributed
from paser.errors import ConfigError


def shard(peft_model, compute_dtype: torch.dtype) -> None:
    """Wrap ``peft_model`` in place: LoRA weights to fp32, ``fully_shard`` per decoder layer and at the root,
    over all ranks of the process group, on this rank's device (CUDA under NCCL, else the CPU); then every
    rank's shards take rank 0's values, so the other ranks may pass the model built on ``meta``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = [m for m in peft_model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ConfigError(f"recovery.fsdp=true: no decoder layers (modules named *DecoderLayer) found in "
                          f"{type(peft_model.get_base_model()).__name__}; this model cannot be sharded per layer")
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the sharded fp32 copies are the optimizer's master weights
    device_type = "cuda" if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (distributed.world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # rank 0's full weights (on the host: fully_shard moves them to the device one layer at a time, as shards)
    full = peft_model.state_dict() if distributed.is_main() else {}
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(peft_model, mesh=mesh, mp_policy=policy)
    set_model_state_dict(peft_model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    # a meta rank's shards were assigned afresh, one per name: tied weights (the LM head) are tied again
    peft_model.get_base_model().tie_weights()


class ShardedWeights:
    """The trainable (LoRA) weights of a sharded model: ``MasterWeights``' interface, where FSDP already
    keeps fp32 shards, accumulates fp32 gradients and sums them across ranks (every backward of every rank
    takes part in the reduce-scatter, so the caller runs the same number of backwards on each rank:
    ``same_backwards``). ``state`` and ``load`` take the full (unsharded) tensors; every rank calls them."""

    same_backwards = True
    # FSDP averages the reduce-scattered gradients over ranks: the loss is scaled by the world size so that
    # they are summed, as the one-process loop's gradients are
    grad_scale = property(lambda self: float(distributed.world_size()))

    def __init__(self, model):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def tensors(self) -> list[torch.Tensor]:
        return [p for _, p in self.named]

    def accumulate(self) -> None:
        pass

    def collect_grads(self) -> list[torch.Tensor]:
        """Nothing left to sum across ranks; a parameter that got no gradient gets zeros."""
        for _, p in self.named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return []

    def push(self) -> None:
        pass

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().full_tensor().to("cpu", copy=True).contiguous() for n, p in self.named}

    @torch.no_grad()
    def load(self, weights: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        for n, p in self.named:
            p.copy_(distribute_tensor(weights[n].detach().to(p.device, p.dtype), p.device_mesh, p.placements))

    def finish(self) -> None:
        pass

    def optimizer_state(self, model, optimizer) -> dict:
        """The optimizer's full state (gathered from the shards, on the host)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))


class AdapterWeights:
    """A trained adapter outside its (sharded) model: the peft config and the full LoRA weights, stored as
    ``PeftModel.save_pretrained`` stores them, so ``PeftModel.from_pretrained`` loads them."""

    def __init__(self, peft_model, weights: dict[str, torch.Tensor]):
        from peft.utils import get_peft_model_state_dict

        self.config = peft_model.peft_config["default"]
        self.weights = get_peft_model_state_dict(peft_model, state_dict=weights)

    def save_pretrained(self, directory) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(directory))
        save_file({k: v.contiguous() for k, v in self.weights.items()}, directory / "adapter_model.safetensors")


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)

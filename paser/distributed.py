"""One experiment on N processes: `torchrun --nproc_per_node=N run.py ...` (gloo on CPUs, NCCL on GPUs).

The split of work, stage by stage (paser.pipeline):
  prune, evaluate        rank 0 computes; the other ranks wait for its cache entry (pruning is one pass
                         over a few calibration windows; evaluation would only be split for a speed-up).
  per-sample scores      every rank takes chunks of the pool through the cache's chunk claims and the
                         ranks gather the full array from the shared cache folder (paser.cache.array).
  LoRA recovery          data parallel with the same effective batch: each rank runs its share of the
                         micro-batches of every optimizer step and the gradients are summed across ranks
                         (paser.recovery), so the adapter equals the one-process adapter up to
                         floating-point summation order (and dropout masks, which each rank draws itself).
  results, cache, W&B    written by rank 0 only.
The cache folder must be on a filesystem all ranks see (it is on one node; on several nodes use a shared one).
Outside torchrun (no WORLD_SIZE in the environment) every function here is a no-op for one process.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# Rank 0 may prune or evaluate for hours while the others wait on the cache, not in a collective; the
# long timeout only covers collectives around LoRA steps and the run-folder broadcast.
TIMEOUT = datetime.timedelta(hours=float(os.environ.get("PASER_DIST_TIMEOUT_H", "6")))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int | None:
    """This process's index on its node under torchrun, else None."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else None


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (once per process); nothing for a single process."""
    if world_size() <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)


def broadcast(obj):
    """Rank 0's value of ``obj`` on every rank (any picklable object)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across_ranks(tensors: list[torch.Tensor]) -> None:
    """In-place sum of each tensor over all ranks, as one flat all-reduce (LoRA gradients are small)."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def gather(obj) -> list:
    """[every rank's ``obj``] in rank order on every rank ([obj] for one process)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out

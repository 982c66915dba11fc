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

Ranks come from torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK) or, where they are absent, from the srun
step this process is a task of (SLURM_STEP_NUM_TASKS, SLURM_PROCID, SLURM_LOCALID): ``srun --ntasks-per-node=8
python run.py ...`` runs one experiment on 8 GPUs per node, on one node or several, without torchrun. The
rendezvous is MASTER_ADDR:MASTER_PORT when set, else the step's first node and a port derived from the job
id. A batch script's own process (no srun step) is one process, whatever --ntasks the job asked for.
Outside both every function here is a no-op for one process.
"""

from __future__ import annotations

import datetime
import os
import re

import torch
import torch.distributed as dist

# Rank 0 may prune or evaluate for hours while the others wait on the cache, not in a collective; the
# long timeout only covers collectives around LoRA steps and the run-folder broadcast.
TIMEOUT = datetime.timedelta(hours=float(os.environ.get("PASER_DIST_TIMEOUT_H", "6")))


# torchrun's variable -> the srun step's
SLURM_NAMES = {"WORLD_SIZE": "SLURM_STEP_NUM_TASKS", "RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID"}


def _launcher_value(name: str) -> str | None:
    """torchrun's ``name``, else the srun step's equivalent (only inside a step: a batch script's own
    process also sees SLURM_NTASKS and SLURM_PROCID=0, but no other task runs beside it)."""
    value = os.environ.get(name)
    if value is None and "WORLD_SIZE" not in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ:
        value = os.environ.get(SLURM_NAMES[name])
    return value


def world_size() -> int:
    return int(_launcher_value("WORLD_SIZE") or 1)


def rank() -> int:
    return int(_launcher_value("RANK") or 0)


def local_rank() -> int | None:
    """This process's index on its node under torchrun or srun, else None."""
    value = _launcher_value("LOCAL_RANK")
    return int(value) if value is not None else None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list ("gpu[003-005,9],cpu1" -> "gpu003"), without scontrol."""
    head = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist.strip()).group(0)
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", head)


def rendezvous() -> tuple[str, str]:
    """(MASTER_ADDR, MASTER_PORT) of an srun-launched group: the environment's when set, else the step's
    first node and 20000 + job id mod 20000 (the same on every task, unlikely to clash between jobs)."""
    nodes = next((os.environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                  if os.environ.get(k)), "127.0.0.1")
    port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
    return os.environ.get("MASTER_ADDR") or first_host(nodes), os.environ.get("MASTER_PORT") or str(port)


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def init(device: torch.device) -> None:
    """Join the process group torchrun or srun describes (once per process); nothing for a single process."""
    if world_size() <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:  # torchrun set up the rendezvous
        dist.init_process_group(backend, timeout=TIMEOUT)
        return
    addr, port = rendezvous()
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank(), world_size=world_size(),
                            timeout=TIMEOUT)


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

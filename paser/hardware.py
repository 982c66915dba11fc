"""Where a run computes: the device policy (``model.device``), and the host facts recorded beside every
timing in results.json (CPU model, AMX or not, GPUs)."""

from __future__ import annotations

import logging
import os
import platform
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from paser import distributed
from paser.errors import ConfigError

log = logging.getLogger(__name__)
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"


def resolve_device(spec: str | None = "auto", job_index: int | None = None) -> torch.device:
    """The device a run's models live on.

    auto   the GPU of this process when CUDA is present, else the CPU. "This process's GPU" is
           cuda:<LOCAL_RANK> under torchrun, cuda:<SLURM_LOCALID> for a task of an srun step (mod the GPUs
           it sees: a task bound to its own GPU sees one), cuda:<job number mod GPUs> for a job of a local
           parallel sweep (hydra joblib: one GPU per job, not every job on every GPU), else cuda:0.
    cuda   the same choice, but an error when no GPU is visible;  cuda:N  exactly that GPU;  cpu.
    """
    spec = "auto" if spec is None else str(spec)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if spec == "cpu" or (spec == "auto" and count == 0):
        return torch.device("cpu")
    if spec != "auto" and match is None:
        raise ConfigError(f"model.device='{spec}' is unknown; allowed: {DEVICE_CHOICES}")
    if count == 0:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"model.device='{spec}' but no CUDA GPU is visible (torch {torch.__version__}, "
                          f"{build}); use model.device=cpu or model.device=auto")
    if match is not None and match.group(1) is not None:
        index = int(match.group(1))
        if index >= count:
            raise ConfigError(f"model.device='{spec}' but only {count} GPU(s) are visible (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    local = distributed.local_rank()
    index = local if local is not None else (job_index or 0)
    return torch.device("cuda", index % count)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def has_amx() -> bool:
    return "amx_bf16" in cpu_flags()


BF16_UNITS = ("amx_bf16", "avx512_bf16")  # x86 instructions that compute in bf16 (oneDNN uses them)


def cpu_bf16_units() -> list[str]:
    """The CPU's bf16 instructions among BF16_UNITS; none means bf16 is emulated (converted to fp32)."""
    flags = cpu_flags()
    return [unit for unit in BF16_UNITS if unit in flags]


def auto_dtype(device: torch.device) -> str:
    """``dtype: auto``: bfloat16 on a GPU and on a CPU with bf16 instructions (AMX or AVX512-BF16), float32
    on other CPUs, where bf16 is emulated and slower than fp32. scripts/bench_dtype.py measures it: a
    SmolLM2-135M-shaped forward on one thread of an AMD EPYC with AVX512-BF16 ran bf16 faster than fp32, and
    fp32 faster with oneDNN kept off those instructions (ONEDNN_MAX_CPU_ISA=AVX512_CORE); README: Quick start."""
    if device.type == "cuda":
        return "bfloat16"
    return "bfloat16" if cpu_bf16_units() else "float32"


def host_facts(device: torch.device) -> dict:
    """What a reader needs beside a time: the device, CPU model and AMX, GPUs, torch and CUDA versions."""
    facts = {"device": str(device), "cpu": cpu_model(), "amx_bf16": has_amx(), "cpu_bf16_units": cpu_bf16_units(),
             "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the ISA of torch's CPU kernels
             "cpu_cores": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "world_size": distributed.world_size()}
    if torch.cuda.is_available():
        facts["gpu_count"] = torch.cuda.device_count()
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            facts["gpu"] = props.name
            facts["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        facts["gpu_count"] = 0
    return facts


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory allocated by torch on ``device`` since its last reset (GPUs only; None on the CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


HIGH_WATER = re.compile(r"^VmHWM:\s+(\d+) kB", re.MULTILINE)


def host_peak_gib() -> float:
    """The process's peak resident set since its last reset (Linux: VmHWM), else since it started."""
    try:
        return round(int(HIGH_WATER.search(Path("/proc/self/status").read_text()).group(1)) / 2**20, 3)
    except (OSError, AttributeError):
        import resource  # ru_maxrss: kB on Linux, bytes on macOS

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2**30 if platform.system() == "Darwin" else 2**20), 3)


def reset_host_peak() -> bool:
    """Reset the process's resident-set high-water mark to its current size (Linux >= 4.0: write 5 to
    /proc/self/clear_refs); False where that is impossible (then host peaks count from the process start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StagePeaks:
    """Peak memory of each stage: the resident set of the whole process on the host (everything resident
    while the stage ran, e.g. a model loaded before it, counts) and torch's allocations on the run's GPU.
    Both counters are reset when a stage starts; a stage that runs inside another (the prune stage inside
    the pruned model's evaluation) hands its peak on to the one around it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.open: list[dict] = []  # the peaks so far of the stages around the current one

    def _read(self) -> dict:
        return {"peak_host_rss_gib": host_peak_gib(), "peak_gpu_memory_gib": peak_memory_gib(self.device)}

    def _reset(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return reset_host_peak()

    @contextmanager
    def measure(self, into: dict):
        """Writes this stage's ``peak_host_rss_gib`` and ``peak_gpu_memory_gib`` (None on the CPU) into
        ``into`` when the stage ends; ``peak_host_rss_since: process start`` where it cannot be reset."""
        if self.open:
            self.open[-1] = _larger(self.open[-1], self._read())
        per_stage = self._reset()
        self.open.append({})
        try:
            yield
        finally:
            peaks = _larger(self.open.pop(), self._read())
            into.update(peaks)
            if not per_stage:
                into["peak_host_rss_since"] = "process start"
            if self.open:
                self.open[-1] = _larger(self.open[-1], peaks)


def _larger(a: dict, b: dict) -> dict:
    return {k: max((v for v in (a.get(k), b.get(k)) if v is not None), default=None) for k in a.keys() | b.keys()}

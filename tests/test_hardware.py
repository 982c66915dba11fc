"""The device policy (model.device) and the host facts recorded in results.json."""

from __future__ import annotations

import pytest
import torch

from paser.errors import ConfigError
from paser.hardware import host_facts, resolve_device


def fake_gpus(monkeypatch, count: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("spec", ["auto", None, "cpu"])
def test_without_gpus_auto_and_cpu_are_the_cpu(monkeypatch, spec):
    fake_gpus(monkeypatch, 0)
    assert resolve_device(spec) == torch.device("cpu")


def test_auto_takes_the_first_gpu_when_present(monkeypatch):
    fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit cpu stays on the cpu


def test_one_gpu_per_sweep_job_and_per_torchrun_rank(monkeypatch):
    fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert [resolve_device("auto", job_index=j).index for j in range(4)] == [0, 1, 0, 1]
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto", job_index=0) == torch.device("cuda", 1)  # the rank wins
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # explicit index: exactly that GPU


@pytest.mark.parametrize("spec, count, message", [
    ("cuda", 0, "no CUDA GPU is visible"),
    ("cuda:1", 0, "no CUDA GPU is visible"),
    ("cuda:2", 2, "only 2 GPU(s)"),
    ("gpu", 1, "allowed: auto, cpu, cuda, cuda:N"),
    ("mps", 0, "allowed: auto, cpu, cuda, cuda:N"),
])
def test_impossible_devices_are_clear_errors(monkeypatch, spec, count, message):
    fake_gpus(monkeypatch, count)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(spec)


def test_host_facts_name_the_machine():
    facts = host_facts(torch.device("cpu"))
    assert facts["device"] == "cpu" and facts["cpu"] and isinstance(facts["amx_bf16"], bool)
    assert facts["cpu_capability"] in ("DEFAULT", "VSX", "ZVECTOR", "AVX2", "AVX512", "SVE256", "SVE128")
    assert facts["world_size"] == 1 and facts["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)

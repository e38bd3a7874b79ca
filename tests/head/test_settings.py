"""The memory budget: the override, the environment, and the GPU default scaled with the device's memory (device
properties monkeypatched: no GPU needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rankgrpo_kernels import settings

GIB = 2**30


@pytest.fixture
def gpu_of(monkeypatch):
    monkeypatch.delenv("RANKGRPO_MEMORY_BUDGET", raising=False)
    seen = []

    def with_memory(total_bytes):
        def properties(device):
            seen.append(device)
            return SimpleNamespace(total_memory=total_bytes, name="fake")
        monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
        return seen
    return with_memory


@pytest.mark.parametrize("total_gib, budget_mib", [
    (141, 4096),           # H200: 4.4 GiB, capped
    (80, 2560),            # H100 / A100 80 GB
    (40, 1280),            # A100 40 GB
    (24, 768),
    (16, 512), (8, 512),   # the floor
])
def test_gpu_default_scales_with_device_memory(gpu_of, total_gib, budget_mib):
    seen = gpu_of(total_gib * GIB)
    device = torch.device("cuda", 1)
    assert settings.memory_budget(None, device) == budget_mib * 2**20
    assert seen == [device]  # the device of the call, not the current one


def test_override_and_environment_win_over_the_device(gpu_of, monkeypatch):
    seen = gpu_of(141 * GIB)
    assert settings.memory_budget(2**20, torch.device("cuda")) == 2**20
    monkeypatch.setenv("RANKGRPO_MEMORY_BUDGET", str(3 * 2**20))
    assert settings.memory_budget(None, torch.device("cuda")) == 3 * 2**20
    assert seen == []


def test_cpu_default_and_unqueryable_gpu(monkeypatch):
    monkeypatch.delenv("RANKGRPO_MEMORY_BUDGET", raising=False)
    assert settings.memory_budget(None, torch.device("cpu")) == 2**26

    def no_cuda(device):
        raise RuntimeError("Found no NVIDIA driver on your system")
    monkeypatch.setattr(torch.cuda, "get_device_properties", no_cuda)
    assert settings.memory_budget(None, torch.device("cuda")) == settings.DEFAULT_MEMORY_BUDGET["cuda"]


@pytest.mark.parametrize("bad", [10, 1.5e9, True, -1])
def test_bad_budget_is_refused(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        settings.memory_budget(bad, torch.device("cpu"))

"""ROCm, simulated on any machine by setting ``torch.version.hip``: ``backend="auto"`` resolves to Triton, whose row
pass then launches within a work-group's 1024 work-items (64-lane wavefronts: 16 of them, not 32), and
``backend="cuda"`` is refused by name with the reason (``csrc/`` assumes 32-lane warps)."""

from __future__ import annotations

import pytest
import torch

from rankgrpo_kernels.backends import registry
from rankgrpo_kernels.backends.cuda import loader
from rankgrpo_kernels.backends.protocol import BackendUnavailable
from rankgrpo_kernels.backends.triton import tiles

pytest.importorskip("triton")

from rankgrpo_kernels.backends.triton.row_pass_kernel import single_block_launch  # noqa: E402

GRAD_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def rocm_gpu(monkeypatch):
    """A ROCm torch with an MI300 (gfx942: capability 9.4) as the current CUDA device, and the Triton kernels
    compiled rather than interpreted (so that the launchers pick the device's tiles)."""
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(tiles, "interpreting", lambda: False)
    return torch.device("cuda", 0)


def _launches(cfg):
    """Warps of every program the row pass launches with ``cfg``: the single block with and without a softcap
    (at its largest row, and a short one), and the walk of longer rows."""
    warps = [cfg.num_warps]
    for softcap in (False, True):
        for V in (cfg.single_limit(softcap), 100):
            warps.append(single_block_launch(V, cfg, softcap)[1])
    return warps


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_rocm_tiles_fit_a_work_group(rocm_gpu, grad_dtype):
    cfg = tiles.row_pass_config(rocm_gpu, grad_dtype)
    assert cfg is tiles.ROW_PASS_ROCM
    assert max(tiles.work_items(w) for w in _launches(cfg)) == tiles.MAX_WORK_ITEMS
    # the same floats a thread as the CUDA tiles: the registers per work-item of the compiled kernels
    cuda = tiles.ROW_PASS_CONFIGS[("sm_90", torch.bfloat16)]
    assert cfg.single_block // tiles.work_items(cfg.single_warps) == cuda.single_block // (cuda.single_warps * 32)


def test_cuda_tiles_fit_a_thread_block():
    if torch.version.hip is not None:
        pytest.skip("a ROCm torch: the CUDA tiles are not used")
    for cfg in tiles.ROW_PASS_CONFIGS.values():
        assert max(tiles.work_items(w) for w in _launches(cfg)) <= tiles.MAX_WORK_ITEMS


def test_auto_picks_triton_on_rocm(rocm_gpu):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert registry.choose("auto", rocm_gpu, dtype) == "triton"


def test_cuda_backend_refused_by_name_on_rocm(rocm_gpu):
    with pytest.raises(BackendUnavailable, match="unavailable on ROCm .*6.4.0.*32-lane warps"):
        loader.load_extension(jit=True)
    reason = registry.refusal("cuda", rocm_gpu, torch.bfloat16)
    assert reason is not None and "ROCm" in reason and "backend='triton'" in reason
    with pytest.raises(ValueError, match="ROCm"):
        registry.choose("cuda", rocm_gpu, torch.bfloat16)
    assert "cuda" not in registry.available(rocm_gpu, torch.bfloat16)

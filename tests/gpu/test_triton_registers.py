"""Registers and spills of the Triton kernels as JIT-compiled on this device, after a fused loss and the row pass's
variants at Qwen2.5-0.5B's head (``tests/backends/test_triton_aot.py`` reports the ahead-of-time compile for sm_90a
and sm_80 in CI)."""

from __future__ import annotations

import pytest
import torch

from rankgrpo_kernels import backends, rank_grpo_loss
from rankgrpo_kernels.specs import HeadSpec

from .helpers import CUDA, QWEN, loss_inputs

pytestmark = pytest.mark.gpu


def _compiled(fn):
    """The kernels Triton compiled for ``fn`` on any device (its cache layout differs between versions)."""
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        yield from getattr(cache, "values", list)()


def test_triton_registers(record):
    from rankgrpo_kernels.backends.triton.row_pass_kernel import _row_pass_kernel
    from rankgrpo_kernels.backends.triton.segment_loss_kernel import _segment_loss_kernel

    h, w, y, kwargs = loss_inputs(4, 512, torch.bfloat16)
    loss, _ = rank_grpo_loss(h, w, y, backend="triton", **kwargs)
    torch.autograd.grad(loss, (h, w))
    row_pass = backends.load("triton").row_pass
    for grad_dtype in (None, torch.bfloat16, torch.float32):  # the row pass's variants, each compiled once
        for width in (QWEN[1], 5003):
            row_pass(torch.randn(64, width, device=CUDA), bias=None, targets=torch.zeros(64, dtype=torch.long,
                     device=CUDA), head=HeadSpec(), grad_dtype=grad_dtype, compute_entropy=True)
    torch.cuda.synchronize()
    kernels = []
    names = {"row_pass": _row_pass_kernel, "segment_loss": _segment_loss_kernel}
    for name, fn in names.items():
        for compiled in _compiled(fn):
            meta = getattr(compiled, "metadata", None)
            kernels.append(dict(kernel=name, registers=getattr(compiled, "n_regs", None),
                                spills=getattr(compiled, "n_spills", None), num_warps=getattr(meta, "num_warps", None),
                                shared=getattr(meta, "shared", None)))
    record(kernels=kernels, any_spills=any((k["spills"] or 0) > 0 for k in kernels),
           device=torch.cuda.get_device_name(CUDA))
    assert {k["kernel"] for k in kernels} == set(names)

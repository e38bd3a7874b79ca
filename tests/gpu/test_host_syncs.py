"""Host syncs of one ``rank_grpo_loss`` forward and backward at Qwen2.5-0.5B's head with ``RANKGRPO_VALIDATE=0``,
counted as the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` after a warm-up call (JIT compiles, the GEMM
probe, caches). On a CPU ``tests/head/test_host_syncs.py`` checks the input layer alone."""

from __future__ import annotations

import warnings

import pytest
import torch

from rankgrpo_kernels import rank_grpo_loss

from .helpers import loss_inputs

pytestmark = pytest.mark.gpu


def _syncs_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(c.message).splitlines()[0] for c in caught if "synchroniz" in str(c.message).lower()]
    return out, dict(count=len(syncs), first=syncs[:5])


def test_host_syncs(record, monkeypatch):
    monkeypatch.setenv("RANKGRPO_VALIDATE", "0")
    B, T = 8, 512
    h, w, y, kwargs = loss_inputs(B, T, torch.bfloat16)

    def call():
        loss, _ = rank_grpo_loss(h, w, y, **kwargs)
        return loss

    torch.autograd.grad(call(), (h, w))  # the warm-up
    torch.cuda.synchronize()
    loss, forward = _syncs_of(call)
    _, backward = _syncs_of(lambda: torch.autograd.grad(loss, (h, w)))
    record(validate="0", tokens=B * T, forward=forward, backward=backward)

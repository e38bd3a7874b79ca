"""Time per part of ours at Qwen2.5-0.5B's head (bf16): the three GEMMs per chunk size in TFLOP/s, the row pass in
GB/s and the segment loss on each backend, and fwd+bwd of ``rank_grpo_loss`` at the default and a small memory
budget. Each part is measured even when another fails; the test fails if any did."""

from __future__ import annotations

import pytest
import torch

from rankgrpo_kernels import backends, rank_grpo_loss
from rankgrpo_kernels.head import gemms
from rankgrpo_kernels.inputs import token_batch
from rankgrpo_kernels.settings import memory_budget
from rankgrpo_kernels.specs import HeadSpec, LossSpec

from .helpers import CUDA, QWEN, errors, guarded, loss_inputs, median_ms, sig

pytestmark = pytest.mark.gpu
REPS = 10
CHUNKS = (512, 1024, 2048, 4096, 8192)
ROW_PASS_TOKENS = 4096
B, T = 32, 512  # the segment loss's and the full loss's batch
DTYPE, ACC = torch.bfloat16, torch.float32
BACKENDS = ("triton", "torch")


def test_gemm_rates(record):
    H, V = QWEN
    g = torch.Generator(device=CUDA).manual_seed(0)
    hidden = torch.randn(max(CHUNKS), H, device=CUDA, generator=g).to(DTYPE)
    weight = (torch.randn(V, H, device=CUDA, generator=g) / H**0.5).to(DTYPE)

    def rates(C):
        h = hidden[:C]
        logits = torch.empty(C, V, device=CUDA, dtype=ACC)
        d = torch.randn(C, V, device=CUDA).to(DTYPE)
        rows = torch.empty(C, H, device=CUDA, dtype=ACC)
        d_weight = torch.zeros(V, H, device=CUDA, dtype=ACC)
        flop = 2 * C * V * H
        times = dict(logits=median_ms(lambda: gemms.mm_into(h, weight.T, logits), REPS),
                     d_hidden=median_ms(lambda: gemms.mm_into(d, weight, rows), REPS),
                     d_weight=median_ms(lambda: gemms.addmm_into(d_weight, d.T, h, beta=1.0), REPS))
        return {k: dict(ms=sig(t), tflops=sig(flop / (t * 1e-3) / 1e12)) for k, t in times.items()}

    parts = {str(C): guarded(lambda C=C: rates(C)) for C in CHUNKS}
    record(shape=dict(hidden=H, vocab=V, dtype=str(DTYPE).split(".")[-1]), reps=REPS, gemms=parts)
    assert not errors(parts)


def test_row_pass_rate(record):
    V = QWEN[1]

    def rate(backend):
        logits = torch.randn(ROW_PASS_TOKENS, V, device=CUDA, dtype=ACC)
        targets = torch.randint(0, V, (ROW_PASS_TOKENS,), device=CUDA)
        row_pass = backends.load(backend).row_pass
        t = median_ms(lambda: row_pass(logits, bias=None, targets=targets, head=HeadSpec(), grad_dtype=DTYPE), REPS)
        moved = ROW_PASS_TOKENS * V * (ACC.itemsize + DTYPE.itemsize)  # read fp32 logits, write D
        return dict(tokens=ROW_PASS_TOKENS, ms=sig(t), gb_per_s=sig(moved / (t * 1e-3) / 1e9))

    parts = {b: guarded(lambda b=b: rate(b)) for b in BACKENDS}
    record(row_pass=parts)
    assert not errors(parts)


def test_segment_loss_time(record):
    def time_of(backend):
        g = torch.Generator(device=CUDA).manual_seed(1)
        logps = -4 * torch.rand(B, T, device=CUDA, generator=g)
        spec = LossSpec()
        batch, _ = token_batch(B, T, CUDA, spec, item_ids=(torch.arange(T, device=CUDA) * 20 // T).expand(B, T),
                               advantages=torch.randn(B, T, device=CUDA, generator=g), old_logps=logps + 0.05,
                               logps=logps)
        segment_loss = backends.load(backend).segment_loss
        return dict(tokens=B * T, ms=sig(median_ms(lambda: segment_loss(batch, spec=spec), REPS)))

    parts = {b: guarded(lambda b=b: time_of(b)) for b in BACKENDS}
    record(segment_loss=parts)
    assert not errors(parts)


def test_full_loss(record):
    def fwd_bwd(budget):
        h, w, y, kwargs = loss_inputs(B, T, DTYPE)

        def step():
            loss, _ = rank_grpo_loss(h, w, y, memory_budget_bytes=budget, **kwargs)
            torch.autograd.grad(loss, (h, w))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = median_ms(step, REPS)
        return dict(tokens=B * T, budget_mib=round(budget / 2**20, 1), fwd_bwd_ms=sig(t),
                    peak_mib_above_inputs=round((torch.cuda.max_memory_allocated() - base) / 2**20, 1))

    default = memory_budget(None, CUDA)
    parts = {name: guarded(lambda b=b: fwd_bwd(b)) for name, b in (("default", default),
                                                                   ("small", max(2**20, default // 8)))}
    record(full_loss=parts)
    assert not errors(parts)

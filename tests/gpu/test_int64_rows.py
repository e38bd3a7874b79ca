"""A logits chunk with N*V > 2^31 elements through the Triton row pass at Qwen2.5-0.5B's vocabulary: the last rows,
wholly past element 2^31, against float64 torch (the kernel's offsets must be int64)."""

from __future__ import annotations

import math

import pytest
import torch

from rankgrpo_kernels import backends
from rankgrpo_kernels.specs import HeadSpec

from .helpers import CUDA, QWEN

pytestmark = pytest.mark.gpu


def test_int64_rows(record):
    V = QWEN[1]
    C = math.ceil(2**31 / V) + 8
    check = 4  # the last rows
    torch.cuda.empty_cache()
    logits = torch.empty(C, V, device=CUDA, dtype=torch.float32)
    g = torch.Generator(device=CUDA).manual_seed(3)
    for r in range(0, C, 1024):  # filled in slices: no second (C, V) temporary
        logits[r:r + 1024].normal_(generator=g).mul_(3.0)
    targets = torch.randint(0, V, (C,), device=CUDA, generator=g)
    tail = logits[-check:].clone()
    out = backends.load("triton").row_pass(logits, bias=None, targets=targets, head=HeadSpec(),
                                           grad_dtype=torch.bfloat16, compute_entropy=True)
    want_lse = torch.logsumexp(tail.double(), 1)
    want_logp = tail.double().gather(1, targets[-check:, None].long())[:, 0] - want_lse
    want_d = -torch.softmax(tail.double(), 1)
    want_d[torch.arange(check, device=CUDA), targets[-check:].long()] += 1
    first_elem = (C - check) * V
    lse_err = (out.lse[-check:].double() - want_lse).abs().max().item()
    d_err = (out.grad[-check:].double() - want_d).abs().max().item()
    ok = lse_err < 1e-3 and d_err < 1e-2
    record(rows=C, vocab=V, elements=C * V, past_2_31=C * V > 2**31, checked_rows_start_at=first_elem,
           checked_rows_past_2_31=first_elem > 2**31, lse_max_abs_err=lse_err,
           logp_max_abs_err=(out.logp[-check:].double() - want_logp).abs().max().item(), d_max_abs_err=d_err, ok=ok)
    assert first_elem > 2**31 and ok

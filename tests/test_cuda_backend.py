"""The CUDA backend (``csrc/``) at its interface and determinism; ``pytest -m gpu``. (``test_gpu.py`` checks it
against the reference at real heads, with Triton and torch.)

The GPU tests are skipped without one; they compile the extension just in time (ninja) unless ``pip install
--no-build-isolation .`` prebuilt it. Tolerances as in ``test_gpu.py`` (bf16 at real LM-head sizes) and
``test_triton_interpret.py`` (fp32 against the float64-free reference run on the same inputs). Without a GPU only
the error of a CPU-only torch is checked here; ``test_cuda_compile.py`` compiles the sources.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from rankgrpo_kernels import rank_grpo_loss
from rankgrpo_kernels.backends import torch_backend
from rankgrpo_kernels.reference import reference_logprobs, reference_loss
from rankgrpo_kernels.contract import LossConfig, TokenBatch, dense_groups
from rankgrpo_kernels.backends.torch_backend import segment_loss as torch_segment_loss

from .helpers import random_loss_batch
from .test_gpu import _batch

gpu = pytest.mark.gpu
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
       torch.float16: dict(rtol=2e-3, atol=2e-4)}


@pytest.fixture(scope="module")
def cuda_backend():
    return importlib.import_module("rankgrpo_kernels.backends.cuda_backend")


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the error of a CPU-only torch")
def test_cpu_only_torch_gives_the_fix():
    with pytest.raises(ImportError, match="CUDA build of torch.*backend='triton' or 'torch'"):
        importlib.import_module("rankgrpo_kernels.backends.cuda_backend")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias,temperature,budget", [(True, 0.7, 2**16), (False, 1.0, 2**25)])
def test_backend_matches_chunked_torch(cuda_backend, dtype, bias, temperature, budget):
    """Forward and backward at the backend interface, a small budget forcing many (token x vocabulary) slabs."""
    g = torch.Generator(device="cuda").manual_seed(1)
    N, H, V = 300, 64, 1001  # ragged token chunks and vocabulary slabs
    hidden = torch.randn(N, H, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).to(dtype)
    b = (0.1 * torch.randn(V, device="cuda", generator=g)).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    got = cuda_backend.logprob_forward(hidden, weight, b, targets, temperature, budget, True)
    f32 = [None if x is None else x.float() for x in (hidden, weight, b)]
    want = torch_backend.logprob_forward(*f32, targets, temperature, budget, True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
    grad_logp = torch.randn(N, device="cuda", generator=g)
    grad_logp[::3] = 0  # tokens without gradient are skipped
    needs = (True, True, bias)
    got = cuda_backend.logprob_backward(hidden, weight, b, targets, temperature, want[1], grad_logp, budget, needs)
    ref = torch_backend.logprob_backward(*f32, targets, temperature, want[1], grad_logp, budget, needs)
    for x, y in zip(got, ref):
        if y is not None:
            assert x.dtype == dtype
            torch.testing.assert_close(x.float(), y, **TOL[dtype])


@gpu
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "rank"])
@pytest.mark.parametrize("old,ref,delta", [(True, True, 1.8), (True, False, None), (False, True, None)])
def test_segment_loss_matches_torch(cuda_backend, loss_type, old, ref, delta):
    B, T, K = 5, 97, 20
    batch = random_loss_batch(B, T, K, dtype=torch.float32, generator=torch.Generator().manual_seed(2),
                              old_scale=0.5)
    batch = {k: v.cuda() for k, v in batch.items()}
    batch["item_ids"][0] = torch.arange(T)  # one-token items
    batch["completion_mask"][1] = False  # an all-masked row
    batch["logps"][2, ~batch["completion_mask"][2]] = float("nan")  # padding may hold NaN
    mask = batch["completion_mask"]
    normaliser = torch.tensor({"grpo": float(B), "bnpo": float(mask.sum()), "dr_grpo": B * 128.0, "dapo": 400.0,
                               "rank": B * K * 1.0}[loss_type], device="cuda")
    tokens = TokenBatch(logps=batch["logps"], old_logps=batch["old_logps"] if old else None,
                        ref_logps=batch["ref_logps"] if ref else None, advantages=batch["advantages"],
                        group=dense_groups(batch["item_ids"], mask), mask=mask, normaliser=normaliser,
                        tokens=mask.sum().clamp(min=1).float(), entropy=-batch["logps"].abs())
    cfg = LossConfig(epsilon_low=0.1, epsilon_high=0.2, delta=delta, beta=0.04 if ref else 0.0, loss_type=loss_type)
    loss, stats, grad = cuda_backend.segment_loss(tokens, cfg)
    want_loss, want_stats, want_grad = torch_segment_loss(tokens, cfg)
    torch.testing.assert_close(loss, want_loss, **TOL[torch.float32])
    torch.testing.assert_close(stats, want_stats, **TOL[torch.float32])
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert stats[2] > 0 or not old  # the clip range binds somewhere


@gpu
@pytest.mark.parametrize("loss_type", ["bnpo", "rank"])
def test_loss_through_the_public_api(loss_type):
    B, T, H, V, K = 3, 11, 16, 67, 4
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, H, generator=g).cuda().requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).cuda().requires_grad_()
    b = (0.1 * torch.randn(V, generator=g)).cuda().requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g).cuda()
    batch = {k: v.cuda() for k, v in random_loss_batch(B, T, K, dtype=torch.float32, generator=g).items()}
    with torch.no_grad():
        logps = reference_logprobs(hidden, weight, targets, bias=b)
    kwargs = dict(item_ids=batch["item_ids"], advantages=batch["advantages"], completion_mask=batch["completion_mask"],
                  old_logps=logps + (batch["old_logps"] - batch["logps"]),
                  ref_logps=logps + (batch["ref_logps"] - batch["logps"]), beta=0.04, loss_type=loss_type,
                  epsilon_low=0.1, epsilon_high=0.2, delta=1.8, rec_num=K)
    loss, stats = rank_grpo_loss(hidden, weight, targets, bias=b, backend="cuda", compute_entropy=True, **kwargs)
    ref_loss, ref_stats = reference_loss(hidden, weight, targets, bias=b, **kwargs)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    for name in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean", "kl"):
        torch.testing.assert_close(stats[name], ref_stats[name], **TOL[torch.float32])
    for x, y in zip(torch.autograd.grad(loss, (hidden, weight, b)), torch.autograd.grad(ref_loss, (hidden, weight, b))):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@gpu
def test_deterministic_repeats(cuda_backend):
    """No atomics anywhere: repeated backward passes give bit-identical gradients."""
    hidden, weight, targets, _ = _batch(2, 128, 256, 5003, torch.bfloat16)
    h, w, y = hidden.detach().reshape(-1, 256), weight.detach(), targets.reshape(-1)
    _, lse, _ = cuda_backend.logprob_forward(h, w, None, y, 1.0, 2**20)
    grad = torch.randn_like(lse)
    first = cuda_backend.logprob_backward(h, w, None, y, 1.0, lse, grad, 2**20, (True, True, False))
    second = cuda_backend.logprob_backward(h, w, None, y, 1.0, lse, grad, 2**20, (True, True, False))
    assert all(torch.equal(x, z) for x, z in zip(first[:2], second[:2]))

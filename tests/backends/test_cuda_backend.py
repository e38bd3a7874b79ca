"""What is specific to the CUDA backend (``csrc/``): the error of a CPU-only torch, and its kernels (row pass with
logit scale and softcap, gradient pass, segment loss) at the backend interface against the torch backend's
(``pytest -m gpu``). The conformance suite (``test_backends.py``) runs it through every public path on a GPU;
``test_cuda_compile.py`` compiles the sources without one.

The GPU tests load the extension ``pip install --no-build-isolation .`` prebuilt or ``python -m
rankgrpo_kernels.backends.cuda.build`` built (the suite sets ``RANKGRPO_CUDA_JIT=0``: no compiling while testing).
Tolerances: fp32 kernels against fp32 torch ops summing in another order; D rounded once to bf16/fp16.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from rankgrpo_kernels.backends import torch as torch_backend
from rankgrpo_kernels.contract import LOSS_TYPES, POLICY, TokenBatch, dense_groups
from rankgrpo_kernels.specs import LossSpec

from ..helpers import launcher_form, random_loss_batch

TORCH_ROW_PASS, TORCH_GRAD_PASS = launcher_form(torch_backend)

gpu = pytest.mark.gpu
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-3),
       torch.float16: dict(rtol=2e-3, atol=2e-4)}


@pytest.fixture(scope="module")
def cuda_backend():
    return importlib.import_module("rankgrpo_kernels.backends.cuda")


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the error of a CPU-only torch")
def test_cpu_only_torch_gives_the_fix():
    cuda = importlib.import_module("rankgrpo_kernels.backends.cuda")  # the package builds and loads nothing
    with pytest.raises(ImportError, match="CUDA build of torch.*backend='triton' or 'torch'"):
        cuda.row_pass  # the first call loads the extension


def _row_pass_case(V, C=37):
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = 4 * torch.randn(C, V + 5, device="cuda", generator=g)[:, :V]  # a row stride above V
    bias = 0.1 * torch.randn(V, device="cuda", generator=g).bfloat16()
    targets = torch.randint(-2, V + 2, (C,), device="cuda", generator=g)  # some outside [0, V): another shard
    return logits, bias, targets


@gpu
@pytest.mark.parametrize("grad_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1001, 40000])  # held in registers, and walked in two passes
@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("softcap", [None, 6.0])
def test_row_pass_matches_torch(cuda_backend, grad_dtype, V, with_lse, softcap):
    logits, bias, targets = _row_pass_case(V)
    kw = dict(logit_scale=1.25, softcap=softcap)
    lse = TORCH_ROW_PASS(logits.clone(), bias, targets, 1 / 0.7, None, None, False, **kw)[1]
    lse = lse if with_lse else None
    want = TORCH_ROW_PASS(logits.clone(), bias, targets, 1 / 0.7, lse, grad_dtype, not with_lse, **kw)
    got = launcher_form(cuda_backend)[0](logits, bias, targets, 1 / 0.7, lse, grad_dtype, not with_lse, **kw)
    for x, y in zip(got[:3], want[:3]):
        if y is not None:
            torch.testing.assert_close(x, y, **TOL[torch.float32])
    if grad_dtype is not None:
        assert got[3].data_ptr() == logits.data_ptr() and got[3].dtype == grad_dtype
        torch.testing.assert_close(got[3].float(), want[3].float(), **TOL[grad_dtype])


@gpu
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1001, 40000])
@pytest.mark.parametrize("softcap", [None, 6.0])
def test_grad_pass_matches_torch(cuda_backend, grad_dtype, V, softcap):
    logits, bias, targets = _row_pass_case(V)
    kw = dict(logit_scale=0.9, softcap=softcap)
    gen = torch.Generator(device="cuda").manual_seed(2)
    g, e = (torch.randn(logits.shape[0], device="cuda", generator=gen) for _ in range(2))
    g[:3], e[:3] = 0.0, 0.0
    _, lse, entropy, _ = TORCH_ROW_PASS(logits.clone(), bias, targets, 1 / 0.7, None, None, True, **kw)
    want = TORCH_GRAD_PASS(logits.clone(), bias, targets, 1 / 0.7, lse, entropy, g, e, torch.float32, **kw)
    got = launcher_form(cuda_backend)[1](logits, bias, targets, 1 / 0.7, lse, entropy, g, e, grad_dtype, **kw)
    assert got.data_ptr() == logits.data_ptr() and got.dtype == grad_dtype
    assert torch.equal(got[:3].float(), torch.zeros(3, got.shape[1], device="cuda"))
    torch.testing.assert_close(got.float(), want, **{**TOL[grad_dtype], "atol": max(TOL[grad_dtype]["atol"], 4e-6)})


@gpu
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("old,ref,delta,corrected_kl", [(True, True, 1.8, False), (True, False, None, False),
                                                       (False, True, None, False), (True, True, None, True)])
def test_segment_loss_matches_torch(cuda_backend, loss_type, old, ref, delta, corrected_kl):
    B, T, K = 5, 97, 20
    batch = random_loss_batch(B, T, K, dtype=torch.float32, generator=torch.Generator().manual_seed(2),
                              old_scale=0.5)
    batch = {k: v.cuda() for k, v in batch.items()}
    batch["item_ids"][0] = torch.arange(T)  # one-token items
    batch["completion_mask"][1] = False  # an all-masked row
    batch["logps"][2, ~batch["completion_mask"][2]] = float("nan")  # padding may hold NaN
    mask = batch["completion_mask"]
    normaliser = torch.tensor({"grpo": float(B), "bnpo": float(mask.sum()), "dr_grpo": B * 128.0, "dapo": 400.0,
                               "rank": B * K * 1.0, "luspo": float(B), "sapo": float(B), "cispo": 400.0,
                               "vespo": 400.0}[loss_type], device="cuda")
    tokens = TokenBatch(logps=batch["logps"], old_logps=batch["old_logps"] if old else None,
                        ref_logps=batch["ref_logps"] if ref else None, advantages=batch["advantages"],
                        group=dense_groups(batch["item_ids"], mask), mask=mask, normaliser=normaliser,
                        tokens=mask.sum().clamp(min=1).float(), entropy=-batch["logps"].abs())
    spec = LossSpec(epsilon_low=0.1, epsilon_high=0.2, delta=delta if POLICY[loss_type] == 0 else None,
                    beta=0.04 if ref else 0.0, loss_type=loss_type, use_bias_correction_kl=corrected_kl)
    loss, stats, grad, row_clipped = cuda_backend.segment_loss(tokens, spec=spec)
    want_loss, want_stats, want_grad, want_row_clipped = torch_backend.segment_loss(tokens, spec=spec)
    torch.testing.assert_close(row_clipped, want_row_clipped, rtol=0, atol=0)  # token counts
    torch.testing.assert_close(loss, want_loss, **TOL[torch.float32])
    torch.testing.assert_close(stats, want_stats, **TOL[torch.float32])
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert stats[2] > 0 or not old or loss_type == "vespo"  # the clip range binds somewhere (VESPO has none)



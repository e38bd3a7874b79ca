"""The Triton backend against the reference, run by Triton's interpreter on the CPU (or natively on a GPU).

Tolerances: the kernels accumulate in fp32 in another order than the float64 reference, so fp32 inputs agree to
~1e-5 relative; bf16/fp16 inputs are compared with the reference run on the same (rounded) inputs in float32,
where only the products' rounding differs (bf16 keeps 8 bits: ~1e-2).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rankgrpo_kernels import fused_logprobs, rank_grpo_loss  # noqa: E402
from rankgrpo_kernels.backends import triton_backend  # noqa: E402
from rankgrpo_kernels.kernels.tiles import interpreting  # noqa: E402
from rankgrpo_kernels.reference import reference_logprobs, reference_loss  # noqa: E402

from .helpers import random_loss_batch  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("neither a GPU nor TRITON_INTERPRET=1", allow_module_level=True)
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
       torch.float16: dict(rtol=2e-3, atol=2e-4)}


def _head(B, T, H, V, dtype, bias):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + V)
    hidden = torch.randn(B, T, H, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(DEVICE, dtype).requires_grad_()
    b = (0.1 * torch.randn(V, generator=g)).to(DEVICE, dtype).requires_grad_() if bias else None
    return hidden, weight, b, torch.randint(0, V, (B, T), generator=g).to(DEVICE)


def _float(*xs):
    return [None if x is None else x.detach().float().requires_grad_() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias,temperature,entropy", [(True, 0.7, True), (False, 1.0, False)])
def test_logprobs_and_gradients(dtype, bias, temperature, entropy):
    hidden, weight, b, targets = _head(2, 9, 24, 101, dtype, bias)  # V = 101: a ragged last vocabulary tile
    out = fused_logprobs(hidden, weight, targets, bias=b, temperature=temperature, return_entropy=entropy,
                         backend="triton")
    ref_inputs = _float(hidden, weight, b)
    ref = reference_logprobs(*ref_inputs[:2], targets, bias=ref_inputs[2], temperature=temperature,
                             return_entropy=entropy)
    logp, ref_logp = (out[0], ref[0]) if entropy else (out, ref)
    torch.testing.assert_close(logp, ref_logp, **TOL[torch.float32])
    if entropy:
        torch.testing.assert_close(out[1], ref[1], **TOL[torch.float32])
    upstream = torch.randn_like(logp)
    upstream[0, ::2] = 0  # tokens without gradient are skipped
    params = [x for x in (hidden, weight, b) if x is not None]
    got = torch.autograd.grad((logp * upstream).sum(), params)
    want = torch.autograd.grad((ref_logp * upstream).sum(), [x for x in ref_inputs if x is not None])
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, **TOL[dtype])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "rank"])
@pytest.mark.parametrize("regime", ["unclipped", "clipped"])
def test_loss_matches_reference(loss_type, regime):
    B, T, H, V, K = 3, 11, 16, 67, 4
    hidden, weight, b, targets = _head(B, T, H, V, torch.float32, True)
    batch = random_loss_batch(B, T, K, dtype=torch.float32, old_scale=0.02 if regime == "unclipped" else 1.0)
    with torch.no_grad():
        logps = reference_logprobs(hidden, weight, targets, bias=b)
    kwargs = dict(item_ids=batch["item_ids"], advantages=batch["advantages"],
                  completion_mask=batch["completion_mask"], old_logps=logps + (batch["old_logps"] - batch["logps"]),
                  ref_logps=logps + (batch["ref_logps"] - batch["logps"]), beta=0.04, loss_type=loss_type,
                  epsilon_low=0.1, epsilon_high=0.2, delta=1.8, num_items_in_batch=40, rec_num=K)
    kwargs["item_ids"][0, :] = torch.arange(T)  # one-token items
    kwargs["completion_mask"][1] = False  # an all-masked row
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss, stats = rank_grpo_loss(hidden, weight, targets, bias=b, backend="triton", compute_entropy=True, **kwargs)
    ref_loss, ref_stats = reference_loss(hidden, weight, targets, bias=b, **kwargs)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    for name in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean", "kl"):
        torch.testing.assert_close(stats[name], ref_stats[name], **TOL[torch.float32])
    for g, w in zip(torch.autograd.grad(loss, (hidden, weight, b)), torch.autograd.grad(ref_loss, (hidden, weight, b))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    if regime == "clipped":
        assert stats["clip_ratio_region"] > 0


def test_deterministic_mode_uses_the_chunked_backward():
    hidden, weight, b, targets = _head(2, 5, 16, 40, torch.float32, True)
    logp = fused_logprobs(hidden, weight, targets, bias=b, backend="triton")
    torch.use_deterministic_algorithms(True)
    try:
        first = torch.autograd.grad(logp.sum(), (hidden, weight, b), retain_graph=True)
        second = torch.autograd.grad(logp.sum(), (hidden, weight, b))
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_float64_is_refused_with_the_fix():
    hidden, weight, _, targets = _head(1, 3, 16, 20, torch.float64, False)
    with pytest.raises(TypeError, match="backend='torch'"):
        triton_backend.logprob_forward(hidden.reshape(3, 16), weight, None, targets.reshape(3), 1.0, 0)


@pytest.mark.parametrize("B,T", [(0, 4), (2, 0)])
def test_empty_batches(B, T):
    hidden, weight, b, targets = _head(max(B, 1), max(T, 1), 16, 20, torch.float32, True)
    hidden = hidden.detach()[:B, :T].requires_grad_()
    targets = targets[:B, :T]
    ids = torch.zeros(B, T, dtype=torch.long, device=DEVICE)
    loss, _ = rank_grpo_loss(hidden, weight, targets, bias=b, item_ids=ids, advantages=torch.ones(B, T, device=DEVICE),
                             backend="triton")
    assert loss.item() == 0.0
    assert torch.autograd.grad(loss, hidden)[0].shape == hidden.shape


def test_infinite_reference_logps_without_kl_weight():
    """beta = 0: the KL only feeds the statistics, so -inf reference log-probs must not turn the loss into NaN."""
    hidden, weight, b, targets = _head(2, 6, 16, 30, torch.float32, False)
    batch = random_loss_batch(2, 6, 2, dtype=torch.float32)
    ref = batch["ref_logps"].to(DEVICE)
    ref[0, 1] = float("-inf")
    kwargs = dict(item_ids=batch["item_ids"].to(DEVICE), advantages=batch["advantages"].to(DEVICE),
                  ref_logps=ref, beta=0.0)
    ours, _ = rank_grpo_loss(hidden, weight, targets, backend="triton", **kwargs)
    torch_loss, _ = rank_grpo_loss(hidden, weight, targets, backend="torch", **kwargs)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, torch_loss, **TOL[torch.float32])

"""The chunked torch backend against the eager reference: values and gradients of hidden, weight and bias."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rankgrpo_kernels import RankGRPOLoss, fused_logprobs, rank_grpo_loss
from rankgrpo_kernels.reference import reference_logprobs, reference_loss

from .helpers import random_loss_batch

SMALL_BUDGET = 65536  # forces many token and vocabulary chunks (and a ragged vocabulary tail) at these shapes
# float64: both sides compute the same sums in another order. float32: logits of magnitude ~10 summed over H and
# V in another order, relative to gradients of magnitude ~1.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _head(B, T, H, V, dtype, bias=True, scale=1.0):
    hidden = (scale * torch.randn(B, T, H, dtype=dtype)).requires_grad_()
    weight = (torch.randn(V, H, dtype=dtype) / H**0.5).requires_grad_()
    b = (0.1 * torch.randn(V, dtype=dtype)).requires_grad_() if bias else None
    return hidden, weight, b, torch.randint(0, V, (B, T))


def _loss_inputs(hidden, weight, bias, targets, temperature, K, old_scale=0.1):
    """Random items and advantages with old/ref log-probs near the model's own, as in real training."""
    B, T, _ = hidden.shape
    batch = random_loss_batch(B, T, K, dtype=hidden.dtype, old_scale=old_scale)
    with torch.no_grad():
        logps = reference_logprobs(hidden, weight, targets, bias=bias, temperature=temperature)
    batch["old_logps"] = logps + (batch["old_logps"] - batch["logps"])
    batch["ref_logps"] = logps + (batch["ref_logps"] - batch["logps"])
    del batch["logps"]
    return batch


def _grads(loss, params):
    return torch.autograd.grad(loss, [p for p in params if p is not None])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "rank"])
@pytest.mark.parametrize("shape", [(2, 5, 8, 97), (3, 11, 16, 1001), (1, 1, 4, 3)])
def test_loss_matches_reference(dtype, loss_type, shape):
    B, T, H, V = shape
    temperature = 0.7
    hidden, weight, bias, targets = _head(B, T, H, V, dtype)
    kwargs = _loss_inputs(hidden, weight, bias, targets, temperature, K=3, old_scale=0.1)
    kwargs.update(loss_type=loss_type, beta=0.04, epsilon_low=0.05, epsilon_high=0.08, delta=1.3)
    if loss_type == "dapo":
        kwargs["num_items_in_batch"] = 2 * B * T
    if loss_type == "rank":
        kwargs["rec_num"] = 3
    ours, ours_stats = rank_grpo_loss(hidden, weight, targets, bias=bias, temperature=temperature,
                                      memory_budget_bytes=SMALL_BUDGET, **kwargs)
    ref, ref_stats = reference_loss(hidden, weight, targets, bias=bias, temperature=temperature, **kwargs)
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    for got, want in zip(_grads(ours, (hidden, weight, bias)), _grads(ref, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, **TOL[dtype])
    for name in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean", "kl"):
        torch.testing.assert_close(ours_stats[name], ref_stats[name].to(ours_stats[name].dtype), **TOL[dtype])


@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_logprobs_values_and_gradients(return_entropy, bias):
    hidden, weight, b, targets = _head(3, 7, 12, 517, torch.float64, bias=bias, scale=3.0)
    out = fused_logprobs(hidden, weight, targets, bias=b, temperature=1.3, return_entropy=return_entropy,
                         memory_budget_bytes=SMALL_BUDGET)
    ref = reference_logprobs(hidden, weight, targets, bias=b, temperature=1.3, return_entropy=return_entropy)
    logp, ref_logp = (out[0], ref[0]) if return_entropy else (out, ref)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-12)
    if return_entropy:
        torch.testing.assert_close(out[1], ref[1], rtol=1e-12, atol=1e-12)
        assert not out[1].requires_grad
    upstream = torch.randn_like(logp)
    for got, want in zip(_grads((logp * upstream).sum(), (hidden, weight, b)),
                         _grads((ref_logp * upstream).sum(), (hidden, weight, b))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_tokens_with_zero_gradient_get_none():
    """Masked, clipped and zero-advantage tokens contribute nothing: their hidden rows get exactly zero."""
    hidden, weight, _, targets = _head(2, 6, 8, 50, torch.float64, bias=False)
    kwargs = _loss_inputs(hidden, weight, None, targets, 1.0, K=2)
    zero_item = torch.zeros_like(kwargs["completion_mask"])
    zero_item[0] = kwargs["item_ids"][0] == kwargs["item_ids"][0, 0]  # a whole item: its ratio's gradient is 0
    kwargs["advantages"][zero_item] = 0.0
    loss, _ = rank_grpo_loss(hidden, weight, targets, **kwargs)
    (d_hidden,) = torch.autograd.grad(loss, hidden)
    silent = ~kwargs["completion_mask"] | zero_item
    assert torch.all(d_hidden[silent] == 0)
    assert torch.any(d_hidden[~silent] != 0)


def test_bfloat16_inputs_stay_close_to_float64():
    """bf16 GEMMs round logits to 8 bits of mantissa: the loss matches the float64 maths to ~1e-2 relative."""
    hidden, weight, bias, targets = _head(2, 9, 32, 300, torch.float64)
    kwargs = _loss_inputs(hidden, weight, bias, targets, 1.0, K=3)
    exact, _ = reference_loss(hidden, weight, targets, bias=bias, **kwargs)
    low = [x.detach().bfloat16().requires_grad_() for x in (hidden, weight, bias)]
    ours, _ = rank_grpo_loss(*low[:2], targets, bias=low[2], memory_budget_bytes=SMALL_BUDGET, **kwargs)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), exact, rtol=3e-2, atol=3e-3)
    grads = torch.autograd.grad(ours, low)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all() for g in grads)
    (d_hidden_exact,) = torch.autograd.grad(exact, hidden)
    torch.testing.assert_close(grads[0].double(), d_hidden_exact, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_huge_logits_and_all_masked_rows_stay_finite(scale):
    hidden, weight, bias, targets = _head(3, 5, 4, 40, torch.float32)
    hidden = (hidden.detach() * scale).requires_grad_()
    kwargs = _loss_inputs(hidden, weight, bias, targets, 1.0, K=2, old_scale=30.0)
    kwargs["completion_mask"][1] = False
    kwargs.update(beta=0.1)
    loss, stats = rank_grpo_loss(hidden, weight, targets, bias=bias, **kwargs)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(v) for k, v in stats.items() if k != "entropy")
    assert torch.all(grads[0][1] == 0)


def test_everything_masked_gives_zero_loss_and_gradients():
    hidden, weight, bias, targets = _head(2, 4, 4, 10, torch.float32)
    kwargs = _loss_inputs(hidden, weight, bias, targets, 1.0, K=2)
    kwargs["completion_mask"][:] = False
    loss, _ = rank_grpo_loss(hidden, weight, targets, bias=bias, **kwargs)
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in torch.autograd.grad(loss, (hidden, weight, bias)))


def test_module_matches_function_and_tied_embeddings():
    """RankGRPOLoss holds the settings; a tied embedding Parameter as the head gets the LM-head gradient."""
    embedding = torch.nn.Embedding(30, 8, dtype=torch.float64)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (2, 5))
    kwargs = _loss_inputs(hidden, embedding.weight, None, targets, 0.9, K=2)
    criterion = RankGRPOLoss(epsilon_low=0.06, epsilon_high=0.08, beta=1e-3, loss_type="grpo", temperature=0.9)
    loss, _ = criterion(hidden, embedding.weight, targets, **kwargs)
    expected, _ = reference_loss(hidden, embedding.weight, targets, temperature=0.9, epsilon_low=0.06,
                                 epsilon_high=0.08, beta=1e-3, loss_type="grpo", **kwargs)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    (d_weight,) = torch.autograd.grad(expected, embedding.weight)
    torch.testing.assert_close(embedding.weight.grad, d_weight)
    logps = reference_logprobs(hidden, embedding.weight, targets, temperature=0.9)
    from_logps, _ = criterion.from_logps(logps, **kwargs)
    torch.testing.assert_close(from_logps, expected)


def test_non_contiguous_hidden():
    hidden, weight, bias, targets = _head(4, 6, 8, 33, torch.float64)
    view = hidden.transpose(0, 1)  # (T, B, H) view: a batch of 6 rows of 4 tokens, not contiguous
    kwargs = _loss_inputs(view, weight, bias, targets.T, 1.0, K=2)
    ours, _ = rank_grpo_loss(view, weight, targets.T.contiguous(), bias=bias, **kwargs)
    ref, _ = reference_loss(view, weight, targets.T.contiguous(), bias=bias, **kwargs)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(*[torch.autograd.grad(x, hidden)[0] for x in (ours, ref)])


class LargestScratch(TorchDispatchMode):
    """Records the largest tensor any op creates (bytes, shape), leaving out the shapes of inputs and gradients."""

    def __init__(self, allowed_shapes):
        super().__init__()
        self.allowed, self.nbytes, self.shape = allowed_shapes, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) not in self.allowed:
                if t.numel() * t.element_size() > self.nbytes:
                    self.nbytes, self.shape = t.numel() * t.element_size(), tuple(t.shape)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_tensor_beyond_the_budget_or_the_gradients(dtype):
    """Every tensor of a fused fwd+bwd has the shape of an input or a gradient, or fits in the budget."""
    B, T, H, V = 4, 128, 64, 8000
    budget = 2**20
    hidden, weight, _, targets = _head(B, T, H, V, dtype, bias=False)
    kwargs = _loss_inputs(hidden, weight, None, targets, 1.0, K=4)
    kwargs["ref_logps"] = None
    with LargestScratch({(B * T, H), (V, H), (B, T, H)}) as largest:
        loss, _ = rank_grpo_loss(hidden, weight, targets, memory_budget_bytes=budget, compute_entropy=True,
                                 **kwargs)
        torch.autograd.grad(loss, (hidden, weight))
    assert 0 < largest.nbytes <= budget, (largest.shape, largest.nbytes)  # the eager logits: 16 MB


def test_fused_entropy_statistic():
    hidden, weight, bias, targets = _head(2, 6, 8, 50, torch.float64)
    kwargs = _loss_inputs(hidden, weight, bias, targets, 0.8, K=2)
    _, stats = rank_grpo_loss(hidden, weight, targets, bias=bias, temperature=0.8, compute_entropy=True, **kwargs)
    _, entropy = reference_logprobs(hidden, weight, targets, bias=bias, temperature=0.8, return_entropy=True)
    mask = kwargs["completion_mask"] & (kwargs["item_ids"] >= 0)
    torch.testing.assert_close(stats["entropy"], entropy[mask].mean())

"""One conformance suite for every backend that can run here (``backends.available``) and every path of the fused
loss, against the float64 reference: values, gradients, statistics, precision, determinism, non-finite inputs,
memory, ``opcheck`` and ``torch.compile``. On the CPU that is ``torch`` and ``triton`` (Triton's interpreter); on a
GPU also ``cuda``. A new backend needs a registry entry, not a new test file.

Paths of ``rank_grpo_loss``: ``fused`` (gradient in the forward, all rows in one chunk), ``chunked`` (the same, one
row per chunk) and ``recompute`` (one row exceeds the budget: log-probs, then a backward that recomputes logits).

Tolerances, against the float64 reference run on the same (rounded) inputs:
- float64 (torch only): the same maths summed in another order, 1e-9.
- float32: fp32 logits and GEMMs; logits of magnitude ~10 summed over H and V in another order relative to
  gradients of magnitude ~1: 2e-4 relative.
- bf16/fp16: fp32 logits (so log-probs and the loss keep fp32 accuracy), but D is rounded to the operand dtype for
  the gradient GEMMs and the gradients are returned in it: 8 bits (bf16) or 11 bits (fp16) of mantissa.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rankgrpo_kernels import RankGRPOLoss, backends, fused_logprobs, rank_grpo_loss
from rankgrpo_kernels import rank_grpo_loss_from_logps
from rankgrpo_kernels.contract import LOSS_TYPES, POLICY, WINDOW_TOKEN_NORMALISED, TokenBatch, dense_groups
from rankgrpo_kernels.head import plan
from rankgrpo_kernels.ops import OPS
from rankgrpo_kernels.reference import reference_logprobs, reference_loss
from rankgrpo_kernels.settings import MIN_MEMORY_BUDGET
from rankgrpo_kernels.specs import HeadSpec, LossSpec

from ..helpers import loss_inputs_near_policy, random_head, random_loss_batch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
CASES = [(name, dtype) for dtype in DTYPES for name in backends.available(DEVICE, dtype)]
BACKENDS = sorted({name for name, _ in CASES})
PATHS = ("fused", "chunked", "recompute")
SHAPE = (3, 16, 16, 1100)  # one row of fp32 logits and its scratch is ~72 KB: above the 64 KiB minimum budget
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-3), torch.float16: dict(rtol=4e-3, atol=4e-4)}
LOSS_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11)}  # else fp32 logits: fp32 accuracy whatever the inputs
FP32_TOL = dict(rtol=2e-5, atol=2e-6)


def _budget(path, backend, kwargs, V, H, dtype):
    """The memory budget of a path. ``chunked``: chunks as long as the longest item, so rows are split between
    chunks; ``recompute``: row 1 becomes one item longer than a chunk (its logits are recomputed)."""
    if path == "fused":
        return None
    per_token = plan.bytes_per_token(backend, V, H, plan.gemm_dtype(torch.empty(0, dtype=dtype, device=DEVICE)),
                                        True, kwargs.get("entropy_coef", 0.0) != 0.0)
    if path == "recompute":
        kwargs["item_ids"][1] = 0
        kwargs["completion_mask"][1] = True
        assert MIN_MEMORY_BUDGET // per_token < kwargs["item_ids"].shape[1]
        return MIN_MEMORY_BUDGET
    mask = kwargs["completion_mask"] & (kwargs["item_ids"] >= 0)
    longest = int(torch.bincount(dense_groups(kwargs["item_ids"], mask)[mask]).max())
    return max(MIN_MEMORY_BUDGET, longest * per_token)


def _run(path, fn):
    """Run ``fn``; the recompute path must announce its long item with one warning, the others must not warn."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    fallbacks = [w for w in caught if "recomputing" in str(w.message)]
    assert len(fallbacks) == (path == "recompute"), [str(w.message) for w in caught]
    return out


def _reference_inputs(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def _grads(loss, params):
    return torch.autograd.grad(loss, [p for p in params if p is not None])


def _assert_close(got, want, dtype):
    tol = TOL[dtype]
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradients_match_reference(backend, dtype, path, loss_type):
    B, T, H, V = SHAPE
    temperature = 0.7
    hidden, weight, bias, targets = random_head(B, T, H, V, dtype, device=DEVICE, seed=len(loss_type))
    kwargs = loss_inputs_near_policy(hidden, weight, bias, targets, temperature, K=4)
    kwargs["completion_mask"][0, T // 3:] = False  # rows of very different lengths
    kwargs["completion_mask"][1, :] = True
    kwargs["item_ids"][2, 5] = 9  # a one-token item
    kwargs.update(loss_type=loss_type, beta=0.04, epsilon_low=0.05, epsilon_high=0.08,
                  delta=1.3 if POLICY[loss_type] == 0 else None)  # delta: PPO's clipped surrogate only
    # an importance-sampling correction with masked (0) tokens: it scales the policy terms only
    kwargs["policy_weights"] = torch.rand(B, T, device=DEVICE) * 2 * (torch.rand(B, T, device=DEVICE) > 0.2)
    if loss_type in WINDOW_TOKEN_NORMALISED:
        kwargs["num_items_in_batch"] = 2 * B * T
    if loss_type == "rank":
        kwargs["rec_num"] = 4
    budget = _budget(path, backend, kwargs, V, H, dtype)
    ours, ours_stats = _run(path, lambda: rank_grpo_loss(
        hidden, weight, targets, bias=bias, temperature=temperature, backend=backend, memory_budget_bytes=budget,
        compute_entropy=True, **kwargs))
    ref_params = _reference_inputs(hidden, weight, bias)
    ref, ref_stats = reference_loss(*ref_params[:2], targets, bias=ref_params[2], temperature=temperature,
                                    **kwargs)
    torch.testing.assert_close(ours.double(), ref, **LOSS_TOL.get(dtype, FP32_TOL))
    for got, want in zip(_grads(ours, (hidden, weight, bias)), _grads(ref, ref_params)):
        assert got.dtype == dtype
        _assert_close(got, want, dtype)
    for name, value in ref_stats.items():
        torch.testing.assert_close(ours_stats[name].double(), value, **LOSS_TOL.get(dtype, FP32_TOL))
    _, entropy = reference_logprobs(*ref_params[:2], targets, bias=ref_params[2], temperature=temperature,
                                    return_entropy=True)
    mask = kwargs["completion_mask"] & (kwargs["item_ids"] >= 0)
    torch.testing.assert_close(ours_stats["entropy"].double(), entropy[mask].mean().detach(),
                               **LOSS_TOL.get(dtype, FP32_TOL))


HEADS = {"softcap": dict(logit_softcap=2.5, logit_scale=1.7), "entropy": dict(entropy_coef=0.3),
         "both": dict(logit_softcap=3.0, logit_scale=0.8, entropy_coef=-0.2),
         "masked_entropy": dict(entropy_coef=0.3)}  # plus an entropy_mask: TRL's high-entropy tokens


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head", HEADS)
def test_logit_transform_and_entropy_bonus_match_reference(backend, dtype, path, head):
    """Softcapped and scaled logits (Gemma-2, Cohere) and the entropy bonus with its gradient, on- and off-policy
    items beside zero-advantage ones (kept: the bonus reaches every loss token), or the loss tokens of a mask."""
    B, T, H, V = SHAPE
    hidden, weight, bias, targets = random_head(B, T, H, V, dtype, device=DEVICE, seed=3, scale=2.0)
    kwargs = loss_inputs_near_policy(hidden, weight, bias, targets, 0.9, K=4)
    kwargs["advantages"][0] = 0.0
    kwargs.update(epsilon_low=0.05, epsilon_high=0.08, ref_logps=None, **HEADS[head])
    if head == "masked_entropy":
        kwargs["entropy_mask"] = torch.rand(B, T, generator=torch.Generator().manual_seed(6)).to(DEVICE) > 0.5
    budget = _budget(path, backend, kwargs, V, H, dtype)
    ours, stats = _run(path, lambda: rank_grpo_loss(hidden, weight, targets, bias=bias, temperature=0.9,
                                                    backend=backend, memory_budget_bytes=budget, **kwargs))
    ref_params = _reference_inputs(hidden, weight, bias)
    ref, ref_stats = reference_loss(*ref_params[:2], targets, bias=ref_params[2], temperature=0.9, **kwargs)
    torch.testing.assert_close(ours.double(), ref, **LOSS_TOL.get(dtype, FP32_TOL))
    for got, want in zip(_grads(ours, (hidden, weight, bias)), _grads(ref, ref_params)):
        _assert_close(got, want, dtype)
    if "entropy_coef" in kwargs:
        torch.testing.assert_close(stats["entropy"].double(), ref_stats["entropy"] if "entropy" in ref_stats else
                                   _reference_entropy(ref_params, targets, kwargs), **LOSS_TOL.get(dtype, FP32_TOL))


def _reference_entropy(params, targets, kwargs):
    _, entropy = reference_logprobs(*params[:2], targets, bias=params[2], temperature=0.9, return_entropy=True,
                                    logit_scale=kwargs.get("logit_scale", 1.0),
                                    logit_softcap=kwargs.get("logit_softcap"))
    mask = kwargs["completion_mask"] & (kwargs["item_ids"] >= 0)
    return entropy[mask].mean().detach()


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("head", ["plain", "softcap"])
def test_fused_logprobs_entropy_is_differentiable(backend, dtype, head):
    """What OpenRLHF's and verl's entropy bonus backpropagates through: d(sum a logp + b H) for the whole head."""
    hidden, weight, bias, targets = random_head(3, 7, 12, 517, dtype, scale=3.0, device=DEVICE)
    transform = dict(logit_softcap=4.0, logit_scale=1.3) if head == "softcap" else {}
    logp, entropy = fused_logprobs(hidden, weight, targets, bias=bias, temperature=1.3, return_entropy=True,
                                   backend=backend, memory_budget_bytes=MIN_MEMORY_BUDGET, **transform)
    ref_params = _reference_inputs(hidden, weight, bias)
    ref_logp, ref_entropy = reference_logprobs(*ref_params[:2], targets, bias=ref_params[2], temperature=1.3,
                                               return_entropy=True, **transform)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **LOSS_TOL.get(dtype, FP32_TOL))
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(logp.shape, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    a[0, ::2] = 0  # tokens with only an entropy gradient, and (below) neither
    b[1] = 0
    a[1, 3] = 0
    ours = (logp * a.to(logp.dtype)).sum() + (entropy * b.to(entropy.dtype)).sum()
    ref = (ref_logp * a).sum() + (ref_entropy * b).sum()
    for got, want in zip(_grads(ours, (hidden, weight, bias)), _grads(ref, ref_params)):
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("return_entropy", [False, True])
def test_fused_logprobs_values_and_gradients(backend, dtype, return_entropy):
    hidden, weight, bias, targets = random_head(3, 7, 12, 517, dtype, scale=3.0, device=DEVICE)
    out = fused_logprobs(hidden, weight, targets, bias=bias, temperature=1.3, return_entropy=return_entropy,
                         backend=backend, memory_budget_bytes=MIN_MEMORY_BUDGET)
    ref_params = _reference_inputs(hidden, weight, bias)
    ref = reference_logprobs(*ref_params[:2], targets, bias=ref_params[2], temperature=1.3,
                             return_entropy=return_entropy)
    logp, ref_logp = (out[0], ref[0]) if return_entropy else (out, ref)
    torch.testing.assert_close(logp.double(), ref_logp, **LOSS_TOL.get(dtype, FP32_TOL))
    if return_entropy:
        torch.testing.assert_close(out[1].double(), ref[1].detach(), **LOSS_TOL.get(dtype, FP32_TOL))
    upstream = torch.randn(logp.shape, dtype=torch.float64, device=DEVICE)
    upstream[0, ::2] = 0  # tokens without gradient are not recomputed
    for got, want in zip(_grads((logp * upstream.to(logp.dtype)).sum(), (hidden, weight, bias)),
                         _grads((ref_logp * upstream).sum(), ref_params)):
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_get_fp32_logits(backend):
    """bf16 inputs with |z| around 16-30: the log-probs stay within 1e-3 of the float64 maths on the same inputs
    (bf16 logits would be off by up to 0.06 there, half a bf16 ulp at |z| in [16, 32))."""
    if backends.refusal(backend, DEVICE, torch.bfloat16) is not None:
        pytest.skip(f"{backend} does not take bf16 here")
    B, T, H, V = 2, 8, 64, 300
    hidden, weight, _, targets = random_head(B, T, H, V, torch.bfloat16, bias=False, scale=16.0, device=DEVICE)
    with torch.no_grad():  # logits of standard deviation ~16
        z = hidden.double() @ weight.double().T
        assert 14 < z.abs().max() and 8 < z.std() < 30
        targets = z.argmax(-1)  # the large logits are the ones taken
        exact = reference_logprobs(hidden.double(), weight.double(), targets)
        for path_budget in (None, MIN_MEMORY_BUDGET):
            logp = fused_logprobs(hidden, weight, targets, backend=backend, memory_budget_bytes=path_budget)
            assert (logp.double() - exact).abs().max() < 1e-3
        kwargs = dict(item_ids=torch.zeros(B, T, dtype=torch.long, device=DEVICE),
                      advantages=torch.ones(B, T, device=DEVICE), old_logps=exact.float() + 0.01)
        loss, stats = rank_grpo_loss(hidden, weight, targets, backend=backend, **kwargs)
        ref, ref_stats = reference_loss(hidden.double(), weight.double(), targets, **kwargs)
        assert abs(stats["ratio_mean"].item() - ref_stats["ratio_mean"].item()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("path", PATHS)
def test_bias_gradient_is_a_column_of_the_weight_gemm(monkeypatch, dtype, path):
    """bf16 heads (an fp32 accumulator apart from the returned gradients): d_bias is column H of the d_weight GEMM,
    D is read once, no M = 1 GEMM; fp32 heads and the fused loss of fp16 heads (which saves fp32 gradients: the
    accumulator is the returned gradient) keep the GEMV. The gradients come back contiguous and match the float64
    reference either way."""
    from rankgrpo_kernels.head import gemms

    B, T, H, V = SHAPE
    hidden, weight, bias, targets = random_head(B, T, H, V, dtype, device=DEVICE, seed=3)
    kwargs = loss_inputs_near_policy(hidden, weight, bias, targets, 1.0, K=4)
    budget = _budget(path, "torch", kwargs, V, H, dtype)
    outputs = []
    addmm_into = gemms.addmm_into

    def spy(total, a, b, **kw):
        outputs.append(tuple(total.shape))
        return addmm_into(total, a, b, **kw)

    monkeypatch.setattr(gemms, "addmm_into", spy)
    loss, _ = _run(path, lambda: rank_grpo_loss(hidden, weight, targets, bias=bias, backend="torch", beta=0.04,
                                                memory_budget_bytes=budget, **kwargs))
    got = _grads(loss, (hidden, weight, bias))
    joint = dtype == torch.bfloat16
    assert outputs and all(shape == ((V, -(-(H + 1) // 8) * 8) if joint else (V, H)) for shape in outputs
                           if shape[0] != 1)
    assert ((1, V) in outputs) != joint
    ref_params = _reference_inputs(hidden, weight, bias)
    ref, _ = reference_loss(*ref_params[:2], targets, bias=ref_params[2], beta=0.04, **kwargs)
    for ours, want in zip(got, _grads(ref, ref_params)):
        assert ours.is_contiguous() and ours.dtype == dtype
        _assert_close(ours, want, dtype)


@pytest.mark.parametrize("backend,dtype", [c for c in CASES if c[1] != torch.float64])
@pytest.mark.parametrize("path", PATHS)
def test_repeated_runs_are_bit_identical(backend, dtype, path):
    B, T, H, V = SHAPE
    hidden, weight, bias, targets = random_head(B, T, H, V, dtype, device=DEVICE)
    kwargs = loss_inputs_near_policy(hidden, weight, bias, targets, 1.0, K=3)
    budget = _budget(path, backend, kwargs, V, H, dtype)
    runs = []
    for _ in range(2):
        loss, _ = _run(path, lambda: rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend,
                                                    memory_budget_bytes=budget, **kwargs))
        runs.append((loss, *_grads(loss, (hidden, weight, bias))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_gradient_accumulation_and_scaled_loss(backend, path):
    """Two calls accumulate into .grad; ``(0.5 * loss).backward()`` halves the saved gradients; frozen heads and
    no-grad calls form only what is needed."""
    B, T, H, V = SHAPE
    hidden, weight, bias, targets = random_head(B, T, H, V, torch.float32, device=DEVICE)
    kwargs = loss_inputs_near_policy(hidden, weight, bias, targets, 1.0, K=3)
    budget = _budget(path, backend, kwargs, V, H, torch.float32)

    def rows_of(rows):
        return {k: v[rows] if torch.is_tensor(v) else v for k, v in kwargs.items()}

    def loss_of(h, rows):
        warns = path != "recompute" or rows.start <= 1 < rows.stop  # the long item is in row 1
        return _run(path if warns else "fused", lambda: rank_grpo_loss(
            h, weight, targets[rows], bias=bias, backend=backend, memory_budget_bytes=budget, **rows_of(rows)))[0]

    halves = (slice(0, 2), slice(2, 3))
    first, second = (hidden[rows].detach().requires_grad_() for rows in halves)
    (0.5 * loss_of(first, halves[0])).backward()
    (0.5 * loss_of(second, halves[1])).backward()
    ref_params = _reference_inputs(hidden, weight, bias)
    ref = sum(0.5 * reference_loss(ref_params[0][rows], *ref_params[1:2], targets[rows], bias=ref_params[2],
                                   **rows_of(rows))[0] for rows in halves)
    ref.backward()
    for got, want in ((weight.grad, ref_params[1].grad), (bias.grad, ref_params[2].grad),
                      (torch.cat([first.grad, second.grad]), ref_params[0].grad)):
        _assert_close(got, want, torch.float32)

    frozen = weight.detach()
    loss, _ = _run(path, lambda: rank_grpo_loss(hidden, frozen, targets, backend=backend,
                                                memory_budget_bytes=budget, **kwargs))
    assert torch.autograd.grad(loss, hidden)[0].abs().sum() > 0
    with torch.no_grad():
        no_grad, _ = _run(path, lambda: rank_grpo_loss(hidden, frozen, targets, backend=backend,
                                                       memory_budget_bytes=budget, **kwargs))
    torch.testing.assert_close(no_grad, loss.detach(), rtol=1e-6, atol=1e-7)


def test_second_backward_through_the_same_graph_raises():
    hidden, weight, bias, targets = random_head(2, 5, 8, 30, torch.float32)
    kwargs = loss_inputs_near_policy(hidden, weight, bias, targets, 1.0, K=2)
    loss, _ = rank_grpo_loss(hidden, weight, targets, bias=bias, **kwargs)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="call the loss again"):
        loss.backward()


def test_backward_of_the_fused_loss_allocates_no_gradient_sized_tensor():
    """The gradients are formed in the forward; the backward (of a loss with gradient 1, on a CPU) hands them out
    as they are: autograd passes no zeros for the op's gradient outputs, which take no gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NewTensors(TorchDispatchMode):  # the shapes of the tensors with new memory (not views) made inside
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            leaves = torch.utils._pytree.tree_leaves
            old = {x.untyped_storage().data_ptr() for x in leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
            self.shapes += [tuple(x.shape) for x in leaves(out)
                            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in old]
            return out

    hidden, weight, bias, targets = random_head(2, 5, 8, 30, torch.float32)
    kwargs = loss_inputs_near_policy(hidden, weight, bias, targets, 1.0, K=2)
    loss, _ = rank_grpo_loss(hidden, weight, targets, bias=bias, **kwargs)
    with NewTensors() as made:
        loss.backward()
    assert tuple(weight.shape) not in made.shapes and tuple(hidden.shape) not in made.shapes, made.shapes
    assert weight.grad is not None and hidden.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("where", ["hidden_in_loss", "weight", "bias", "hidden_outside_loss"])
def test_non_finite_inputs(backend, path, where):
    """A non-finite value that reaches a token in the loss makes the loss non-finite (NaN guards fire); one that
    sits on a token outside the loss changes nothing and gets an exactly zero gradient."""
    B, T, H, V = SHAPE
    hidden, weight, bias, targets = random_head(B, T, H, V, torch.float32, device=DEVICE)
    kwargs = loss_inputs_near_policy(hidden, weight, bias, targets, 1.0, K=3)
    kwargs["old_logps"] = None  # on-policy: the ratio is 1 whatever the log-prob, which must not hide a NaN
    kwargs["ref_logps"] = None
    budget = _budget(path, backend, kwargs, V, H, torch.float32)
    mask = kwargs["completion_mask"] & (kwargs["item_ids"] >= 0)
    inside, outside = mask.nonzero()[0].tolist(), (~mask).nonzero()[0].tolist()
    clean, _ = _run(path, lambda: rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend,
                                                 memory_budget_bytes=budget, **kwargs))
    with torch.no_grad():
        if where == "hidden_in_loss":
            hidden[inside[0], inside[1], 3] = float("nan")
        elif where == "hidden_outside_loss":
            hidden[outside[0], outside[1], :] = float("nan")
        elif where == "weight":
            weight[7, 2] = float("inf")
        else:
            bias[7] = float("nan")
    loss, _ = _run(path, lambda: rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend,
                                                memory_budget_bytes=budget, **kwargs))
    if where != "hidden_outside_loss":
        assert not torch.isfinite(loss)
        return
    torch.testing.assert_close(loss, clean)
    d_hidden, d_weight, d_bias = torch.autograd.grad(loss, (hidden, weight, bias))
    assert torch.isfinite(d_weight).all() and torch.isfinite(d_bias).all() and torch.isfinite(d_hidden).all()
    assert torch.all(d_hidden[~mask] == 0)


def test_fused_logprobs_propagate_non_finite_inputs():
    hidden, weight, bias, targets = random_head(2, 4, 8, 30, torch.float32)
    with torch.no_grad():
        hidden[1, 2, 0] = float("nan")
    logp = fused_logprobs(hidden, weight, targets, bias=bias)
    assert torch.isnan(logp[1, 2]) and torch.isfinite(logp[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_with_zero_gradient_get_exactly_zero(backend):
    """Masked, clipped and zero-advantage tokens contribute nothing: their hidden rows get exactly zero."""
    hidden, weight, _, targets = random_head(2, 6, 8, 50, torch.float32, bias=False, device=DEVICE)
    kwargs = loss_inputs_near_policy(hidden, weight, None, targets, 1.0, K=2)
    zero_item = torch.zeros_like(kwargs["completion_mask"])
    zero_item[0] = kwargs["item_ids"][0] == kwargs["item_ids"][0, 0]  # a whole item: its ratio's gradient is 0
    kwargs["advantages"][zero_item] = 0.0
    loss, _ = rank_grpo_loss(hidden, weight, targets, backend=backend, **kwargs)
    (d_hidden,) = torch.autograd.grad(loss, hidden)
    silent = ~kwargs["completion_mask"] | zero_item
    assert torch.all(d_hidden[silent] == 0)
    assert torch.any(d_hidden[~silent] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_huge_logits_and_all_masked_rows_stay_finite(backend, scale):
    hidden, weight, bias, targets = random_head(3, 5, 4, 40, torch.float32, device=DEVICE)
    hidden = (hidden.detach() * scale).requires_grad_()
    kwargs = loss_inputs_near_policy(hidden, weight, bias, targets, 1.0, K=2, old_scale=30.0)
    kwargs["completion_mask"][1] = False
    kwargs.update(beta=0.1)
    loss, stats = rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend, **kwargs)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert torch.all(grads[0][1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T", [(0, 4), (2, 0)])
def test_empty_batches(backend, B, T):
    hidden, weight, bias, targets = random_head(max(B, 1), max(T, 1), 16, 20, torch.float32, device=DEVICE)
    hidden = hidden.detach()[:B, :T].requires_grad_()
    ids = torch.zeros(B, T, dtype=torch.long, device=DEVICE)
    loss, _ = rank_grpo_loss(hidden, weight, targets[:B, :T], bias=bias, item_ids=ids,
                             advantages=torch.ones(B, T, device=DEVICE), backend=backend)
    assert loss.item() == 0.0
    d_hidden, d_weight = torch.autograd.grad(loss, (hidden, weight))
    assert d_hidden.shape == hidden.shape and torch.all(d_weight == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_masked_gives_zero_loss_and_gradients(backend):
    hidden, weight, bias, targets = random_head(2, 4, 4, 10, torch.float32, device=DEVICE)
    kwargs = loss_inputs_near_policy(hidden, weight, bias, targets, 1.0, K=2)
    kwargs["completion_mask"][:] = False
    loss, _ = rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend, **kwargs)
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in torch.autograd.grad(loss, (hidden, weight, bias)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_reference_logps_without_kl_weight(backend):
    """beta = 0: the KL only feeds the statistics, so -inf reference log-probs must not turn the loss into NaN."""
    hidden, weight, _, targets = random_head(2, 6, 16, 30, torch.float32, bias=False, device=DEVICE)
    batch = loss_inputs_near_policy(hidden, weight, None, targets, 1.0, K=2)
    batch["ref_logps"][0, 1] = float("-inf")
    ours, _ = rank_grpo_loss(hidden, weight, targets, backend=backend, beta=0.0, **batch)
    exact, _ = reference_loss(hidden.double(), weight.double(), targets, beta=0.0, **batch)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours.double(), exact, **FP32_TOL)


def test_module_matches_function_and_tied_embeddings():
    """RankGRPOLoss holds the settings; a tied embedding Parameter as the head gets the LM-head gradient."""
    embedding = torch.nn.Embedding(30, 8, dtype=torch.float64)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (2, 5))
    kwargs = loss_inputs_near_policy(hidden, embedding.weight, None, targets, 0.9, K=2)
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
    hidden, weight, bias, targets = random_head(4, 6, 8, 33, torch.float64)
    view = hidden.transpose(0, 1)  # (T, B, H) view: a batch of 6 rows of 4 tokens, not contiguous
    kwargs = loss_inputs_near_policy(view, weight, bias, targets.T, 1.0, K=2)
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
@pytest.mark.parametrize("path", ["chunked", "recompute"])
def test_no_tensor_beyond_the_budget_or_the_gradients(dtype, path):
    """Every tensor of a fwd+bwd has the shape of an input or a gradient, or fits in the budget (a flattened
    chunk buffer holds the logits)."""
    B, T, H, V = 4, 128, 64, 8000
    budget = 2**23 if path == "chunked" else 2**20
    hidden, weight, _, targets = random_head(B, T, H, V, dtype, bias=False)
    kwargs = loss_inputs_near_policy(hidden, weight, None, targets, 1.0, K=4)
    kwargs["ref_logps"] = None
    if path == "recompute":  # one item of 128 tokens, longer than the 32 tokens of a chunk
        kwargs["item_ids"][0], kwargs["completion_mask"][0] = 0, True
    allowed = {(B * T, H), (V, H), (B, T, H)}
    with LargestScratch(allowed) as largest:
        loss, _ = _run(path, lambda: rank_grpo_loss(hidden, weight, targets, memory_budget_bytes=budget,
                                                    compute_entropy=True, **kwargs))
        torch.autograd.grad(loss, (hidden, weight))
    assert 0 < largest.nbytes <= budget, (largest.shape, largest.nbytes)  # the eager logits: 16 MB


# --- the custom ops ------------------------------------------------------------------------------------------------

OP_B, OP_T, OP_H, OP_V = 2, 5, 8, 37


def _op_inputs(device):
    b = random_loss_batch(OP_B, OP_T, 2, dtype=torch.float32)
    b = {k: v.to(device) for k, v in b.items()}
    mask = b["completion_mask"] & (b["item_ids"] >= 0)
    b.update(
        hidden=torch.randn(OP_B * OP_T, OP_H, device=device, requires_grad=True),
        weight=torch.randn(OP_V, OP_H, device=device, requires_grad=True),
        bias=torch.randn(OP_V, device=device, requires_grad=True),
        targets=torch.randint(0, OP_V, (OP_B * OP_T,), device=device),
        group=dense_groups(b["item_ids"], mask), mask=mask, normaliser=mask.sum().float(),
        policy_weights=torch.rand(OP_B, OP_T, device=device) * 2,
        tokens=mask.sum().clamp(min=1).float(),
    )
    return b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget,dtype", [(MIN_MEMORY_BUDGET, torch.float32), (2**24, torch.float32),
                                           (2**24, torch.float16)])
@pytest.mark.parametrize("settings", [(1.0, None, 0.0, False), (1.3, 2.0, 0.1, False), (1.0, None, 0.1, True)])
def test_opcheck_fused_loss(backend, budget, dtype, settings):
    """fp16 included: its saved gradients are fp32 (cast after the loss scale), and the fake must say so; with a
    logit scale, a softcap and the entropy bonus too, over all loss tokens or a masked part of them."""
    logit_scale, softcap, entropy_coef, masked_bonus = settings
    b = _op_inputs(DEVICE)
    for name in ("hidden", "weight", "bias"):
        b[name] = b[name].detach().to(dtype).requires_grad_()
    entropy_mask = torch.rand(OP_B, OP_T, device=DEVICE) > 0.5 if masked_bonus else None
    batch = TokenBatch(None, b["old_logps"], b["ref_logps"], b["advantages"], b["group"], b["mask"], b["normaliser"],
                       b["tokens"], policy_weights=b["policy_weights"], entropy_mask=entropy_mask)
    spec = LossSpec(0.2, 0.28, 1.5, 0.01, "bnpo", entropy_coef=entropy_coef)
    head = HeadSpec(0.9, logit_scale, softcap, budget, backend, True)
    args = OPS.fused_loss_args.flatten(hidden=b["hidden"], weight=b["weight"], bias=b["bias"], targets=b["targets"],
                                       batch=batch, spec=spec, head=head, compute_entropy=True, need_hidden=True,
                                       need_weight=True, need_bias=True)
    torch.library.opcheck(OPS.fused_loss_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck_fused_logprobs(backend, return_entropy, masked):
    b = _op_inputs(DEVICE)
    mask = b["mask"].reshape(-1) if masked else None
    head = HeadSpec(1.0, 1.2, 3.0 if masked else None, MIN_MEMORY_BUDGET, backend)
    args = OPS.fused_logprobs_args.flatten(hidden=b["hidden"], weight=b["weight"], bias=None, targets=b["targets"],
                                           mask=mask, head=head, compute_entropy=return_entropy)
    torch.library.opcheck(OPS.fused_logprobs_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_loss_from_logps(backend):
    b = _op_inputs(DEVICE)
    batch = TokenBatch(b["logps"].requires_grad_(), None, b["ref_logps"], b["advantages"], b["group"], b["mask"],
                       b["normaliser"], b["tokens"], policy_weights=b["policy_weights"])
    args = OPS.loss_from_logps_args.flatten(batch=batch, spec=LossSpec(0.2, 0.2, None, 0.04, "rank"),
                                            head=HeadSpec(backend=backend, memory_budget_bytes=MIN_MEMORY_BUDGET))
    torch.library.opcheck(OPS.loss_from_logps_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compute_entropy", [False, True])
def test_opcheck_logprob_grads(backend, compute_entropy):
    b = _op_inputs(DEVICE)
    logp_all = (b["hidden"].detach() @ b["weight"].detach().T).log_softmax(-1)
    lse = torch.logsumexp(b["hidden"].detach() @ b["weight"].detach().T, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if compute_entropy else None
    grad_entropy = torch.randn(OP_B * OP_T, device=DEVICE) if compute_entropy else None
    args = OPS.logprob_grads_args.flatten(
        hidden=b["hidden"].detach(), weight=b["weight"].detach(), bias=None, targets=b["targets"],
        head=HeadSpec(memory_budget_bytes=MIN_MEMORY_BUDGET, backend=backend), lse=lse,
        grad_logp=torch.randn(OP_B * OP_T, device=DEVICE), entropy=entropy, grad_entropy=grad_entropy,
        need_hidden=True, need_weight=True, need_bias=False)
    torch.library.opcheck(OPS.logprob_grads_op, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.01, 0.0])
def test_compiled_fullgraph_matches_eager(backend, beta):
    """One graph, no host sync: the value checks are skipped while compiling. beta = 0 without reference
    log-probs, with a zero-advantage item: the tokens are listed (and that item skipped) inside the op."""
    b = _op_inputs(DEVICE)
    hidden = b["hidden"].detach().view(OP_B, OP_T, OP_H).requires_grad_()
    if beta == 0.0:
        b["advantages"][b["item_ids"] == 1] = 0.0
    kwargs = dict(item_ids=b["item_ids"], advantages=b["advantages"], completion_mask=b["completion_mask"],
                  old_logps=b["old_logps"], ref_logps=b["ref_logps"] if beta else None, beta=beta, backend=backend)

    def step(hidden, weight, targets):
        loss, stats = rank_grpo_loss(hidden, weight, targets, **kwargs)
        with torch.no_grad():
            logps = fused_logprobs(hidden, weight, targets, backend=backend)
        from_logps, _ = rank_grpo_loss_from_logps(logps, **kwargs)
        return loss, from_logps, stats["clip_ratio_region"]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    targets = b["targets"].view(OP_B, OP_T)
    got = compiled(hidden, b["weight"], targets)
    want = step(hidden, b["weight"], targets)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(*[torch.autograd.grad(x[0], hidden)[0] for x in (got, want)])

"""The Triton row pass (``rankgrpo_kernels/backends/triton/row_pass_kernel.py``) against a float64 torch formula of
its contract, run by Triton's interpreter on the CPU (natively on a GPU).

Tolerances: logp, lse and entropy are fp32 sums in another order than the float64 formula: 1e-5 relative. ``D``
written in fp32 carries the same ~1e-6 relative error of ``exp(z - lse)``. Written in bf16 / fp16, ``D`` is that
fp32 value rounded to nearest: half a unit in the last place of the dtype, plus the fp32 error, which can push a
value across a rounding midpoint; so it must lie within one unit in the last place (one rounding) of the float64
value.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from rankgrpo_kernels import backends  # noqa: E402
from rankgrpo_kernels.backends import torch as torch_backend  # noqa: E402
from rankgrpo_kernels.backends.triton.row_pass_kernel import _tanh_and_slope, grad_pass, grad_view, row_pass  # noqa: E402
from rankgrpo_kernels.backends.triton.tiles import RowPassConfig, interpreting, row_pass_config  # noqa: E402

from ..helpers import launcher_form  # noqa: E402

TORCH_ROW_PASS, TORCH_GRAD_PASS = launcher_form(torch_backend)
GPU_BACKENDS = [name for name in backends.names() if backends.REGISTRY[name].cuda_only]

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("neither a GPU nor TRITON_INTERPRET=1", allow_module_level=True)

GRAD_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
# Small tiles so that V = 75 takes each path: held whole (75 <= 128), or walked in 16-column blocks (75 > 64).
# With a softcap the single block is softcap_single_block (or single_block / 2): 128 and 32 here.
PATHS = {"single": RowPassConfig(single_block=128, single_warps=4, block_v=32, num_warps=4,
                                 softcap_single_block=128),
         "two_pass": RowPassConfig(single_block=64, single_warps=2, block_v=16, num_warps=4)}
C, V, S = 7, 75, 80  # rows, vocabulary, row stride (> V: the logits are a column slice of a wider buffer)
TARGETS = [0, 5, V - 1, -3, V, V + 7, 40]  # three outside [0, V): no target logit, no one-hot term
F32 = dict(rtol=1e-5, atol=1e-6)


def _buffer(seed=0, rows=C, stride=S, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(rows, stride, generator=g)).to(DEVICE)


def _bias(dtype, seed=1, n=V):
    if dtype is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(DEVICE, dtype)


def transform(logits, bias, inv_temperature, logit_scale=1.0, softcap=None):
    """z = S(s (logits + b)) / T and S'(u) in float64 (autograd-differentiable in ``logits``)."""
    u = logit_scale * (logits.double() + (bias.double() if bias is not None else 0.0))
    if softcap is None:
        return u * inv_temperature, torch.ones_like(u)
    t = torch.tanh(u / softcap)
    return softcap * t * inv_temperature, 1 - t.detach() ** 2


def reference(logits, bias, targets, inv_temperature, lse_in=None, logit_scale=1.0, softcap=None):
    """The contract in float64: logp, lse, entropy, D = (onehot - p) S'(u). A -inf logit has p = 0 and adds
    nothing to the entropy."""
    z, slope = transform(logits, bias, inv_temperature, logit_scale, softcap)
    lse = z.logsumexp(-1) if lse_in is None else lse_in.double()
    p = (z - lse[:, None]).exp()
    n = z.shape[1]
    hit = (targets >= 0) & (targets < n)
    z_y = torch.where(hit, z.gather(-1, targets.clamp(0, n - 1)[:, None].long())[:, 0], 0.0)
    entropy = -torch.where(p > 0, p * (z - lse[:, None]), 0.0).sum(-1)  # = lse - sum p z when sum p = 1
    d = (torch.nn.functional.one_hot(targets.clamp(0, n - 1).long(), n) * hit[:, None] - p) * slope
    return z_y - lse, lse, entropy, d


def autograd_reference(logits, bias, targets, inv_temperature, g, e, logit_scale=1.0, softcap=None):
    """d(sum_t g_t logp_t + e_t H_t)/d logits in float64 by autograd, divided by the caller's row scale s / T:
    what the gradient pass writes (and, with g = 1, e = 0, the row pass's D)."""
    acc = logits.detach().double().requires_grad_()
    z, _ = transform(acc, bias, inv_temperature, logit_scale, softcap)
    logp_all = z.log_softmax(-1)
    n = z.shape[1]
    hit = (targets >= 0) & (targets < n)
    logp = torch.where(hit, logp_all.gather(-1, targets.clamp(0, n - 1)[:, None].long())[:, 0],
                       -z.logsumexp(-1))
    finite = logp_all > float("-inf")  # p log p := 0 at p = 0, and no NaN from its gradient there
    entropy = -torch.where(finite, logp_all.exp() * torch.where(finite, logp_all, 0.0), 0.0).sum(-1)
    (grad,) = torch.autograd.grad((g.double() * logp + e.double() * entropy).sum(), acc)
    return grad / (logit_scale * inv_temperature)


def ulp(x, dtype):
    """Unit in the last place of ``dtype`` at |x| (subnormal spacing below the smallest normal)."""
    info = torch.finfo(dtype)
    mantissa = round(-math.log2(info.eps))
    exponent = torch.floor(torch.log2(x.abs())).clamp(min=math.log2(info.smallest_normal))
    return torch.exp2(exponent - mantissa)


def assert_grad_close(grad, d_ref, dtype, atol=None):
    """fp32 within rtol 1e-5 and atol (1e-7 unless given); bf16 / fp16 within one rounding of the float64 value
    (plus atol when given: the gradient pass's fp32 error, see its tests)."""
    assert grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(grad.double(), d_ref, rtol=1e-5, atol=1e-7 if atol is None else atol)
    else:
        err = (grad.double() - d_ref).abs()
        bound = ulp(d_ref, dtype) + (atol or 0.0)
        assert bool((err <= bound).all()), (err - bound).max()


def _run(buf, bias, targets, inv_t, grad_dtype, cfg, lse_in=None, compute_entropy=True, **transform_kw):
    logits = buf[:, :V]
    return row_pass(logits, bias, targets, inv_t, lse_in, grad_dtype, compute_entropy, cfg=cfg, **transform_kw)


# (logit_scale, softcap): none, Cohere's scale, Gemma-2's softcap (binding at |u| ~ 3-10 here), both.
TRANSFORMS = {"plain": dict(), "scale": dict(logit_scale=0.0625 * 16 / 2.5), "softcap": dict(softcap=5.0),
              "scale+softcap": dict(logit_scale=1.7, softcap=4.0)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_matches_float64_contract(path, bias_dtype, grad_dtype):
    buf, bias = _buffer(), _bias(bias_dtype)
    targets = torch.tensor(TARGETS, device=DEVICE)
    inv_t = 1 / 0.7
    expect = reference(buf[:, :V].clone(), bias, targets, inv_t)
    logp, lse, entropy, grad = _run(buf, bias, targets, inv_t, grad_dtype, PATHS[path])
    for got, want in zip((logp, lse, entropy), expect):
        assert got.dtype == torch.float32 and got.shape == (C,)
        torch.testing.assert_close(got.double(), want, **F32)
    if grad_dtype is None:
        assert grad is None
    else:
        assert_grad_close(grad, expect[3], grad_dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("transform", list(TRANSFORMS)[1:])
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("given_lse", [False, True])
def test_scale_and_softcap_match_float64(path, transform, grad_dtype, given_lse):
    """z = S(s (acc + b)) / T: logp, lse and entropy of that z, and D = (onehot - p) S'(u), whose rows scaled by
    s / T are autograd's d logp / d acc (checked in float64 on the reference itself). bf16 bias, temperature,
    targets outside [0, V), V = 75 (odd), both paths, a given lse."""
    kw = TRANSFORMS[transform]
    buf, bias = _buffer(), _bias(torch.bfloat16)
    targets = torch.tensor(TARGETS, device=DEVICE)
    inv_t = 1 / 0.7
    lse_in = reference(buf[:, :V].clone(), bias, targets, inv_t, **kw)[1].float() if given_lse else None
    expect = reference(buf[:, :V].clone(), bias, targets, inv_t, lse_in=lse_in, **kw)
    ones, zeros = torch.ones(C, device=DEVICE), torch.zeros(C, device=DEVICE)
    torch.testing.assert_close(autograd_reference(buf[:, :V], bias, targets, inv_t, ones, zeros, **kw), expect[3])
    logp, lse, entropy, grad = _run(buf, bias, targets, inv_t, grad_dtype, PATHS[path], lse_in=lse_in, **kw)
    for got, want in zip((logp, lse, entropy), expect):
        torch.testing.assert_close(got.double(), want, **F32)
    if grad_dtype is not None:
        assert_grad_close(grad, expect[3], grad_dtype)


@pytest.mark.parametrize("path", PATHS)
def test_plain_transform_folds_scale_and_temperature(path):
    """Without a softcap s and 1 / T are one multiply: (s = 2, T = 1) is bit-identical to (s = 1, T = 1/2), and
    s = 1 to the default (the plain row pass, unchanged)."""
    buf = _buffer()
    targets = torch.tensor(TARGETS, device=DEVICE)
    runs = [_run(buf.clone(), None, targets, 1.0, torch.bfloat16, PATHS[path], logit_scale=2.0),
            _run(buf.clone(), None, targets, 2.0, torch.bfloat16, PATHS[path]),
            _run(buf.clone(), None, targets, 2.0, torch.bfloat16, PATHS[path], logit_scale=1.0, softcap=None)]
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def test_softcap_single_block_limit():
    """With a softcap a row is held whole only up to softcap_single_block (S' is held next to p): the same values
    either way."""
    buf = _buffer()
    targets = torch.tensor(TARGETS, device=DEVICE)
    cfg = PATHS["single"]
    assert cfg.single_limit(True) == 128 and PATHS["two_pass"].single_limit(True) == 32
    assert RowPassConfig(single_block=128, single_warps=4, block_v=32).single_limit(True) == 64
    a = _run(buf.clone(), None, targets, 1.0, torch.float32, cfg, softcap=3.0)
    b = _run(buf.clone(), None, targets, 1.0, torch.float32, PATHS["two_pass"], softcap=3.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **F32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES[1:])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_gradient_is_written_in_place(path, grad_dtype, softcap):
    """D lands on the logits' bytes (row r where logits row r starts), as a strided view that matrix products
    accept as is; nothing past a row's D is written: the rest of its logits and the buffer's padding columns keep
    their values."""
    buf = _buffer()
    before = buf.clone()
    targets = torch.tensor(TARGETS, device=DEVICE)
    expect = reference(before[:, :V], None, targets, 1.0, softcap=softcap)
    *_, grad = _run(buf, None, targets, 1.0, grad_dtype, PATHS[path], softcap=softcap)
    itemsize = grad.element_size()
    assert grad.data_ptr() == buf.data_ptr() and grad.shape == (C, V)
    assert grad.stride() == (S * 4 // itemsize, 1)
    assert grad.stride(0) >= V  # what cuBLAS takes as the leading dimension without a copy
    assert_grad_close(grad, expect[3], grad_dtype)
    untouched = math.ceil(V * itemsize / 4)  # first fp32 column of each row that D does not reach
    assert torch.equal(buf[:, untouched:], before[:, untouched:])
    w = torch.randn(V, 5, device=DEVICE, dtype=grad_dtype)
    torch.testing.assert_close(torch.mm(grad, w), torch.mm(grad.contiguous(), w))


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("shift", [0.0, 0.75])
def test_given_lse_is_used(grad_dtype, shift):
    """With lse_in (a recomputed forward's, or a vocabulary shard's global one: larger than this shard's own),
    only the write pass runs: logp = z_y - lse_in, D = onehot - exp(z - lse_in), lse_in returned as is."""
    buf, bias = _buffer(), _bias(torch.float32)
    targets = torch.tensor(TARGETS, device=DEVICE)
    lse_in = reference(buf[:, :V].clone(), bias, targets, 0.5)[1].float() + shift
    expect = reference(buf[:, :V].clone(), bias, targets, 0.5, lse_in=lse_in)
    logp, lse, entropy, grad = _run(buf, bias, targets, 0.5, grad_dtype, PATHS["single"], lse_in=lse_in)
    assert lse is lse_in
    torch.testing.assert_close(logp.double(), expect[0], **F32)
    torch.testing.assert_close(entropy.double(), expect[2], **F32)
    if grad_dtype is not None:
        assert_grad_close(grad, expect[3], grad_dtype)


@pytest.mark.parametrize("V_", [75, 5000])
def test_default_tiles(V_):
    """The launcher's own tiles (the interpreter's under TRITON_INTERPRET=1): one path each for these widths."""
    buf = _buffer(stride=V_ + 3)
    targets = torch.tensor([0, V_ - 1, 3, -1, 10, 11, V_], device=DEVICE)
    expect = reference(buf[:, :V_].clone(), None, targets, 1.0)
    logp, lse, entropy, grad = row_pass(buf[:, :V_], None, targets, 1.0, None, torch.bfloat16, True)
    if interpreting():
        single_block = row_pass_config(buf.device, torch.bfloat16).single_block
        assert (V_ <= single_block) == (V_ == 75)
    for got, want in zip((logp, lse, entropy), expect):
        torch.testing.assert_close(got.double(), want, **F32)
    assert_grad_close(grad, expect[3], torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
def test_int32_targets_and_no_entropy(path):
    buf = _buffer()
    targets = torch.tensor(TARGETS, device=DEVICE)
    a = _run(buf.clone(), None, targets, 1.0, torch.float16, PATHS[path])
    b = _run(buf.clone(), None, targets.int(), 1.0, torch.float16, PATHS[path], compute_entropy=False)
    assert b[2] is None
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_masked_vocabulary_entries(path, softcap):
    """A -inf bias (a vocabulary entry ruled out) takes no probability and no NaN from -inf * 0; with a softcap
    S(-inf) = -c (a small probability, as the formula says) and S' = 0: a zero gradient there either way."""
    buf, bias = _buffer(), _bias(torch.float32)
    bias[[3, 20, 60]] = float("-inf")
    targets = torch.tensor(TARGETS, device=DEVICE)
    expect = reference(buf[:, :V].clone(), bias, targets, 1.0, softcap=softcap)
    logp, lse, entropy, grad = _run(buf, bias, targets, 1.0, torch.float32, PATHS[path], softcap=softcap)
    for got, want in zip((logp, lse, entropy), expect):
        torch.testing.assert_close(got.double(), want, **F32)
    assert_grad_close(grad, expect[3], torch.float32)
    assert torch.equal(grad[:, [3, 20, 60]], torch.zeros(C, 3, device=DEVICE))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_non_finite_logits_propagate(path, grad_dtype, softcap):
    """A NaN logit (and, without a softcap, a +inf one; a softcap maps +inf to the finite c / T) makes its row's
    lse and logp non-finite, never a finite log-prob next to a non-finite gradient; the other rows are untouched by
    it."""
    buf = _buffer()
    buf[0, 33] = float("nan")
    buf[5, 0] = float("nan")  # the target row 5 is out of range: z_y := 0, the NaN still reaches lse
    if softcap is None:
        buf[2, 70] = float("inf")
    targets = torch.tensor(TARGETS, device=DEVICE)
    expect = reference(buf[:, :V].clone(), None, targets, 1.0, softcap=softcap)
    logp, lse, entropy, grad = _run(buf, None, targets, 1.0, grad_dtype, PATHS[path], softcap=softcap)
    bad = torch.tensor([0, 2, 5] if softcap is None else [0, 5])
    assert not torch.isfinite(lse[bad]).any() and not torch.isfinite(logp[bad]).any()
    assert not torch.isfinite(entropy[bad]).any()
    finite_logp = torch.isfinite(logp)
    assert bool(torch.isfinite(grad.float()).all(-1)[finite_logp].all())
    good = torch.tensor([1, 3, 4, 6])
    for got, want in zip((logp, lse, entropy), expect):
        torch.testing.assert_close(got[good].double(), want[good], **F32)
    assert_grad_close(grad[good], expect[3][good], grad_dtype)


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_empty_chunk(grad_dtype):
    buf = _buffer(rows=0)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    logp, lse, entropy, grad = row_pass(buf[:, :V], None, empty, 1.0, None, grad_dtype, True)
    assert logp.shape == lse.shape == entropy.shape == (0,)
    assert grad is None if grad_dtype is None else grad.shape == (0, V) and grad.dtype == grad_dtype
    if grad_dtype is not None:
        rows = torch.zeros(0, device=DEVICE)
        d = grad_pass(buf[:, :V], None, empty, 1.0, rows, rows, rows, rows, grad_dtype, softcap=2.0)
        assert d.shape == (0, V) and d.dtype == grad_dtype


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_on_repeat(path, grad_dtype):
    buf, bias = _buffer(), _bias(torch.bfloat16)
    targets = torch.tensor(TARGETS, device=DEVICE)
    first = _run(buf.clone(), bias, targets, 1.3, grad_dtype, PATHS[path], softcap=6.0)
    for _ in range(2):
        again = _run(buf.clone(), bias, targets, 1.3, grad_dtype, PATHS[path], softcap=6.0)
        for x, y in zip(first, again):  # the bytes, so that -0.0 and 0.0 differ
            assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def test_grad_view_layout():
    buf = torch.zeros(3, 10, device=DEVICE)
    logits = buf[:, :7]
    for dtype in (torch.bfloat16, torch.float16):
        view = grad_view(logits, dtype)
        assert view.shape == (3, 7) and view.stride() == (20, 1) and view.data_ptr() == buf.data_ptr()
    assert grad_view(logits, torch.float32) is logits


def test_rejects_bad_inputs():
    buf = _buffer()
    targets = torch.tensor(TARGETS, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        row_pass(buf[:, :V].double(), None, targets, 1.0, None, None, False)
    with pytest.raises(ValueError, match="unit column stride"):
        row_pass(buf[:, :V:2], None, targets, 1.0, None, None, False)
    with pytest.raises(ValueError, match="grad_dtype"):
        row_pass(buf[:, :V], None, targets, 1.0, None, torch.float64, False)
    with pytest.raises(ValueError, match="targets"):
        row_pass(buf[:, :V], None, targets.float(), 1.0, None, None, False)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            row_pass(buf[:, :V], None, targets, 1.0, None, None, False, softcap=bad)
    with pytest.raises(ValueError, match="logit_scale"):
        row_pass(buf[:, :V], None, targets, 1.0, None, None, False, logit_scale=float("nan"))
    rows = torch.zeros(C, device=DEVICE)
    with pytest.raises(ValueError, match="grad_dtype"):
        grad_pass(buf[:, :V], None, targets, 1.0, rows, rows, rows, rows, None)
    with pytest.raises(ValueError, match="entropy"):
        grad_pass(buf[:, :V], None, targets, 1.0, rows, rows[:3], rows, rows, torch.float32)


@triton.jit
def _tanh_kernel(x_ptr, t_ptr, slope_ptr, N, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t, slope = _tanh_and_slope(tl.load(x_ptr + cols, mask=cols < N, other=0.0))
    tl.store(t_ptr + cols, t, mask=cols < N)
    tl.store(slope_ptr + cols, slope, mask=cols < N)


def test_tanh_and_slope_accuracy():
    """The kernels' tanh and 1 - tanh^2 (no tanh in every Triton, none under the interpreter): within a few fp32
    units in the last place of float64 over |x| from 1e-30 to 100 (the series / exp switch at 1/4 included; for the
    slope, a few units of its own conditioning), exact limits at +-inf, NaN for NaN."""
    mags = torch.cat([torch.logspace(-30, 2, 2000, dtype=torch.float64), torch.tensor([0.25, 0.2499999, 0.0])])
    x64 = torch.cat([mags, -mags]).float().double()
    x = torch.cat([x64.float(), torch.tensor([float("inf"), float("-inf"), float("nan")])]).to(DEVICE)
    t, slope = torch.empty_like(x), torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, t, slope, x.numel(), BLOCK=1024)
    n = x64.numel()
    want_t, want_slope = torch.tanh(x64), 1 / torch.cosh(x64) ** 2
    eps = torch.finfo(torch.float32).eps
    assert bool(((t[:n].double().cpu() - want_t).abs() <= 4 * eps * want_t.abs()).all())
    # 1 - tanh(x)^2 ~ 4 exp(-2|x|) has condition number 2|x|: the rounding of x alone moves it by |x| eps relative
    bound = 4 * eps * (1 + 2 * x64.abs()) * want_slope + 1e-36  # and it underflows past |x| ~ 44
    assert bool(((slope[:n].double().cpu() - want_slope).abs() <= bound).all())
    assert t[n:].tolist()[:2] == [1.0, -1.0] and slope[n:].tolist()[:2] == [0.0, 0.0]
    assert math.isnan(t[-1].item()) and math.isnan(slope[-1].item())


# --- the gradient pass ---------------------------------------------------------------------------------------------

def _grad_pass_inputs(buf, bias, targets, inv_t, kw, seed=3):
    """Per-row g and e (some rows g = e = 0, one g = 0 only, one e = 0 only) and the statistics-only row pass's lse
    and entropy over ``buf``'s logits (left as they were)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(C, generator=gen).to(DEVICE)
    e = torch.randn(C, generator=gen).to(DEVICE)
    g[[1, 4]], e[[1, 4]] = 0.0, 0.0
    g[3], e[6] = 0.0, 0.0
    logp, lse, entropy, grad = row_pass(buf[:, :V], bias, targets, inv_t, None, None, True, cfg=PATHS["two_pass"],
                                        **kw)
    assert grad is None
    return g, e, lse, entropy


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES[1:])
@pytest.mark.parametrize("block", [16, 128])  # V = 75 in five blocks, or one
def test_grad_pass_matches_autograd(transform, grad_dtype, block):
    """D' = dL/dz S'(u) for L = sum_t g_t logp_t + e_t H_t: autograd's dL/d acc in float64 divided by s / T, written
    in place over the logits (nothing past each row's D' is written); rows with g = e = 0 are exact zeros.

    Tolerance: z - lse + H cancels lse-sized fp32 terms (|lse| ~ 10 here: ~1e-6 absolute), times |e| p."""
    kw = TRANSFORMS[transform]
    buf, bias = _buffer(), _bias(torch.bfloat16)
    targets = torch.tensor(TARGETS, device=DEVICE)
    inv_t = 1 / 0.7
    g, e, lse, entropy = _grad_pass_inputs(buf, bias, targets, inv_t, kw)
    before = buf.clone()
    want = autograd_reference(before[:, :V], bias, targets, inv_t, g, e, **kw)
    cfg = RowPassConfig(single_block=64, single_warps=2, block_v=block, num_warps=4)
    d = grad_pass(buf[:, :V], bias, targets, inv_t, lse, entropy, g, e, grad_dtype, cfg=cfg, **kw)
    assert d.dtype == grad_dtype and d.shape == (C, V) and d.data_ptr() == buf.data_ptr()
    assert d.stride() == (S * 4 // d.element_size(), 1)
    assert_grad_close(d, want, grad_dtype, atol=4e-6)
    assert torch.equal(d[[1, 4]].float(), torch.zeros(2, V, device=DEVICE))
    untouched = math.ceil(V * d.element_size() / 4)
    assert torch.equal(buf[:, untouched:], before[:, untouched:])


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_grad_pass_special_cases(softcap):
    """With g = 1, e = 0 the gradient pass is the row pass's D (given lse); e alone is the entropy's gradient;
    a -inf bias entry gets a zero, never a NaN."""
    buf, bias = _buffer(), _bias(torch.float32)
    bias[[3, 60]] = float("-inf")
    targets = torch.tensor(TARGETS, device=DEVICE)
    kw = dict(softcap=softcap, logit_scale=1.25)
    _, lse, entropy, _ = row_pass(buf[:, :V], bias, targets, 2.0, None, None, True, cfg=PATHS["single"], **kw)
    ones, zeros = torch.ones(C, device=DEVICE), torch.zeros(C, device=DEVICE)
    d_row = row_pass(buf.clone()[:, :V], bias, targets, 2.0, lse, torch.float32, False, cfg=PATHS["two_pass"],
                     **kw)[3]
    d = grad_pass(buf.clone()[:, :V], bias, targets, 2.0, lse, entropy, ones, zeros, torch.float32,
                  cfg=PATHS["two_pass"], **kw)
    assert torch.equal(d, d_row)
    d_e = grad_pass(buf.clone()[:, :V], bias, targets, 2.0, lse, entropy, zeros, ones, torch.float32,
                    cfg=PATHS["two_pass"], **kw)
    want = autograd_reference(buf[:, :V], bias, targets, 2.0, zeros, ones, **kw)
    assert_grad_close(d_e, want, torch.float32, atol=4e-6)
    assert not d_e.isnan().any() and torch.equal(d_e[:, [3, 60]], torch.zeros(C, 2, device=DEVICE))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_grad_pass_propagates_nan(grad_dtype):
    """A NaN logit (so a NaN lse and entropy from the row pass) makes its row of D' NaN; other rows are exact."""
    buf = _buffer()
    buf[2, 40] = float("nan")
    targets = torch.tensor(TARGETS, device=DEVICE)
    g, e, lse, entropy = _grad_pass_inputs(buf, None, targets, 1.0, dict(softcap=5.0))
    assert lse[2].isnan() and entropy[2].isnan()
    want = autograd_reference(buf[:, :V].clone(), None, targets, 1.0, g, e, softcap=5.0)
    d = grad_pass(buf[:, :V], None, targets, 1.0, lse, entropy, g, e, grad_dtype, cfg=PATHS["two_pass"],
                  softcap=5.0)
    assert d[2].float().isnan().all()
    good = torch.tensor([0, 1, 3, 4, 5, 6])
    assert_grad_close(d[good], want[good], grad_dtype, atol=4e-6)


# --- the torch backend: the readable statement of the same contract ------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("given_lse", [False, True])
def test_torch_backend_row_pass(dtype, transform, given_lse):
    kw = TRANSFORMS[transform]
    buf, bias = _buffer().cpu(), _bias(torch.bfloat16).cpu()
    targets = torch.tensor(TARGETS)
    lse_in = reference(buf[:, :V], bias, targets, 1 / 0.7, **kw)[1].to(dtype) if given_lse else None
    expect = reference(buf[:, :V], bias, targets, 1 / 0.7, lse_in=lse_in, **kw)
    logits = buf[:, :V].to(dtype)
    logp, lse, entropy, grad = TORCH_ROW_PASS(logits, bias, targets, 1 / 0.7, lse_in, dtype, True, **kw)
    tol = F32 if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    outputs = (logp, lse) if given_lse else (logp, lse, entropy)  # no entropy with a given lse here
    for got, want in zip(outputs, expect):
        torch.testing.assert_close(got.double(), want, **tol)
    assert grad.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(grad.double(), expect[3], **(dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32
                                                            else tol))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_torch_backend_grad_pass(dtype, transform):
    kw = TRANSFORMS[transform]
    buf, bias = _buffer().cpu(), _bias(torch.float32).cpu()
    bias[5] = float("-inf")
    targets = torch.tensor(TARGETS)
    gen = torch.Generator().manual_seed(4)
    g, e = torch.randn(C, generator=gen, dtype=dtype), torch.randn(C, generator=gen, dtype=dtype)
    g[[1, 4]], e[[1, 4]] = 0.0, 0.0
    logits = buf[:, :V].to(dtype)
    _, lse, entropy, _ = TORCH_ROW_PASS(logits.clone(), bias, targets, 1 / 0.7, None, None, True, **kw)
    want = autograd_reference(logits, bias, targets, 1 / 0.7, g, e, **kw)
    d = TORCH_GRAD_PASS(logits, bias, targets, 1 / 0.7, lse, entropy, g, e, dtype, **kw)
    assert d.data_ptr() == logits.data_ptr() and not d.isnan().any()
    torch.testing.assert_close(d.double(), want, **(dict(rtol=1e-4, atol=4e-6) if dtype == torch.float32
                                                    else dict(rtol=1e-10, atol=1e-12)))
    assert torch.equal(d[[1, 4]], torch.zeros(2, V, dtype=dtype))
    half = TORCH_GRAD_PASS(buf[:, :V].clone(), bias, targets, 1 / 0.7, lse.float(), entropy.float(),
                                   g.float(), e.float(), torch.bfloat16, **kw)
    assert half.dtype == torch.bfloat16


# (V, row stride): Triton holds 16384 columns whole (8192 with a softcap) and walks 20000; CUDA's cached kernel
# takes 16384 aligned columns (8192 with a softcap), its vector streaming kernel 20000 or any lse_in, its scalar one
# the odd stride.
GPU_WIDTHS = [(8192, 8192), (16384, 16384), (20000, 20032), (4001, 4003)]


def _gpu_case(width, rows=37):
    """Rows of LM-head width: bf16 bias, targets out of range, a row with a NaN (5) and one with +inf logits (20)."""
    V_, S_ = width
    buf = _buffer(rows=rows, stride=S_)
    bias = _bias(torch.bfloat16, n=V_)
    targets = torch.randint(0, V_, (rows,), device=DEVICE)
    targets[[3, 7, 11]] = torch.tensor([-1, V_, V_ + 100], device=DEVICE)
    buf[5, 17] = float("nan")
    buf[20, ::7] = float("inf")
    good = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    good[[5, 20]] = False
    return buf, bias, targets, good


def _gpu_impls(impl):
    if DEVICE != "cuda" or (impl == "cuda" and torch.version.cuda is None):
        pytest.skip("needs a CUDA GPU (and a CUDA build of torch for the extension)")
    # Triton through its launchers (what the tiles tests drive), the others through their protocol calls
    return (row_pass, grad_pass) if impl == "triton" else launcher_form(backends.load(impl))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_BACKENDS)
@pytest.mark.parametrize("width", GPU_WIDTHS, ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("given_lse", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_real_widths(impl, width, grad_dtype, given_lse, softcap):
    """Both implementations natively at LM-head widths, with their shipped tiles: bf16 bias, temperature, logit
    scale and softcap, targets out of range, rows holding NaN / inf (non-finite outputs); bit-identical on a second
    run."""
    run, _ = _gpu_impls(impl)
    V_ = width[0]
    buf, bias, targets, good = _gpu_case(width)
    kw = dict(logit_scale=1.5, softcap=softcap)
    lse_in = reference(buf[:, :V_].clone(), bias, targets, 1 / 0.9, **kw)[1].float() if given_lse else None
    expect = reference(buf[:, :V_].clone(), bias, targets, 1 / 0.9, lse_in=lse_in, **kw)
    before = buf.clone()
    outputs = []
    for _ in range(2):
        buf.copy_(before)
        outputs.append(run(buf[:, :V_], bias, targets, 1 / 0.9, lse_in, grad_dtype, True, **kw))
        torch.cuda.synchronize()
    logp, lse, entropy, grad = outputs[0]
    assert not torch.isfinite(logp[5])  # row 20 (+inf logits) is finite under a softcap: tanh(inf) = 1
    for got, want in zip((logp, lse, entropy), expect):
        torch.testing.assert_close(got[good].double(), want[good], **F32)
    if grad_dtype is not None:
        assert_grad_close(grad[good], expect[3][good], grad_dtype)
    for x, y in zip(*outputs):
        if x is not None:
            assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_BACKENDS)
@pytest.mark.parametrize("width", GPU_WIDTHS[1:], ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES[1:])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_grad_pass(impl, width, grad_dtype, softcap):
    """The gradient pass natively against autograd in float64: in place, zero rows for g = e = 0, NaN rows NaN,
    bit-identical on a second run."""
    run, grad_run = _gpu_impls(impl)
    V_ = width[0]
    buf, bias, targets, good = _gpu_case(width)
    rows = buf.shape[0]
    kw = dict(logit_scale=0.8, softcap=softcap)
    g = torch.randn(rows, device=DEVICE)
    e = torch.randn(rows, device=DEVICE)
    g[[2, 9]], e[[2, 9]] = 0.0, 0.0
    _, lse, entropy, _ = run(buf[:, :V_], bias, targets, 1 / 0.9, None, None, True, **kw)
    want = autograd_reference(buf[:, :V_], bias, targets, 1 / 0.9, g, e, **kw)
    before = buf.clone()
    outputs = []
    for _ in range(2):
        buf.copy_(before)
        outputs.append(grad_run(buf[:, :V_], bias, targets, 1 / 0.9, lse, entropy, g, e, grad_dtype, **kw))
        torch.cuda.synchronize()
    d = outputs[0]
    assert d.data_ptr() == buf.data_ptr()
    assert d[5].float().isnan().any()
    assert torch.equal(d[[2, 9]].float(), torch.zeros(2, V_, device=DEVICE))
    assert_grad_close(d[good], want[good], grad_dtype, atol=4e-6)
    assert torch.equal(outputs[0].contiguous().view(torch.uint8), outputs[1].contiguous().view(torch.uint8))

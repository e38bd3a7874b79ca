"""The Triton row pass (``rankgrpo_kernels/kernels/row_pass.py``) against a float64 torch formula of its contract,
run by Triton's interpreter on the CPU (natively on a GPU).

Tolerances: logp, lse and entropy are fp32 sums in another order than the float64 formula: 1e-5 relative. ``D``
written in fp32 carries the same ~1e-6 relative error of ``exp(z - lse)``. Written in bf16 / fp16, ``D`` is that
fp32 value rounded to nearest: half a unit in the last place of the dtype, plus the fp32 error, which can push a
value across a rounding midpoint; so it must lie within one unit in the last place (one rounding) of the float64
value.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

pytest.importorskip("triton")

from rankgrpo_kernels.kernels.row_pass import grad_view, row_pass  # noqa: E402
from rankgrpo_kernels.kernels.tiles import RowPassConfig, interpreting, row_pass_config  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("neither a GPU nor TRITON_INTERPRET=1", allow_module_level=True)

GRAD_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
# Small tiles so that V = 75 takes each path: held whole (75 <= 128), or walked in 16-column blocks (75 > 64).
PATHS = {"single": RowPassConfig(single_block=128, single_warps=4, block_v=32, num_warps=4),
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


def reference(logits, bias, targets, inv_temperature, row_mask=None, lse_in=None):
    """The contract in float64: logp, lse, entropy, D (zeros on masked rows). A -inf logit has p = 0 and adds
    nothing to the entropy."""
    z = logits.double() + (bias.double() if bias is not None else 0.0)
    z = z * inv_temperature
    lse = z.logsumexp(-1) if lse_in is None else lse_in.double()
    p = (z - lse[:, None]).exp()
    n = z.shape[1]
    hit = (targets >= 0) & (targets < n)
    z_y = torch.where(hit, z.gather(-1, targets.clamp(0, n - 1)[:, None].long())[:, 0], 0.0)
    entropy = -torch.where(p > 0, p * (z - lse[:, None]), 0.0).sum(-1)  # = lse - sum p z when sum p = 1
    d = torch.nn.functional.one_hot(targets.clamp(0, n - 1).long(), n) * hit[:, None] - p
    logp = z_y - lse
    if row_mask is not None:  # where, not a product: the masked rows may hold NaN
        logp, entropy, d = torch.where(row_mask, logp, 0.0), torch.where(row_mask, entropy, 0.0), \
            torch.where(row_mask[:, None], d, 0.0)
        if lse_in is None:
            lse = torch.where(row_mask, lse, 0.0)
    return logp, lse, entropy, d


def ulp(x, dtype):
    """Unit in the last place of ``dtype`` at |x| (subnormal spacing below the smallest normal)."""
    info = torch.finfo(dtype)
    mantissa = round(-math.log2(info.eps))
    exponent = torch.floor(torch.log2(x.abs())).clamp(min=math.log2(info.smallest_normal))
    return torch.exp2(exponent - mantissa)


def assert_grad_close(grad, d_ref, dtype):
    assert grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(grad.double(), d_ref, rtol=1e-5, atol=1e-7)
    else:
        err = (grad.double() - d_ref).abs()
        bound = ulp(d_ref, dtype)
        assert bool((err <= bound).all()), (err - bound).max()


def _run(buf, bias, targets, inv_t, grad_dtype, cfg, row_mask=None, lse_in=None, want_entropy=True):
    logits = buf[:, :V]
    return row_pass(logits, bias, targets, row_mask, inv_t, lse_in, grad_dtype, want_entropy, cfg=cfg)


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
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES[1:])
def test_gradient_is_written_in_place(path, grad_dtype):
    """D lands on the logits' bytes (row r where logits row r starts), as a strided view that matrix products
    accept as is; nothing past a row's D is written: the rest of its logits and the buffer's padding columns keep
    their values."""
    buf = _buffer()
    before = buf.clone()
    targets = torch.tensor(TARGETS, device=DEVICE)
    expect = reference(before[:, :V], None, targets, 1.0)
    *_, grad = _run(buf, None, targets, 1.0, grad_dtype, PATHS[path])
    itemsize = grad.element_size()
    assert grad.data_ptr() == buf.data_ptr() and grad.shape == (C, V)
    assert grad.stride() == (S * 4 // itemsize, 1)
    assert grad.stride(0) >= V  # what cuBLAS takes as the leading dimension without a copy
    assert_grad_close(grad, expect[3], grad_dtype)
    untouched = math.ceil(V * itemsize / 4)  # first fp32 column of each row that D does not reach
    assert torch.equal(buf[:, untouched:], before[:, untouched:])
    w = torch.randn(V, 5, device=DEVICE, dtype=grad_dtype)
    torch.testing.assert_close(torch.mm(grad, w), torch.mm(grad.contiguous(), w))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("given_lse", [False, True])
def test_masked_rows_are_not_read(path, grad_dtype, given_lse):
    """Rows with row_mask False hold NaN and inf (padding's garbage): zeros out, nothing leaks into D."""
    buf = _buffer()
    row_mask = torch.tensor([True, False, True, True, False, True, False], device=DEVICE)
    buf[1] = float("nan")
    buf[4, ::3] = float("inf")
    buf[6, 10] = float("nan")
    targets = torch.tensor(TARGETS, device=DEVICE)
    lse_in = reference(buf[:, :V].clone(), None, targets, 1.0)[1].float() if given_lse else None
    if given_lse:
        lse_in[~row_mask] = float("nan")  # not read either
    expect = reference(buf[:, :V].clone(), None, targets, 1.0, row_mask=row_mask, lse_in=lse_in)
    logp, lse, entropy, grad = _run(buf, None, targets, 1.0, grad_dtype, PATHS[path], row_mask=row_mask,
                                    lse_in=lse_in)
    off = ~row_mask
    assert torch.equal(logp[off], torch.zeros_like(logp[off]))
    assert torch.equal(entropy[off], torch.zeros_like(entropy[off]))
    assert torch.equal(grad[off].float(), torch.zeros(int(off.sum()), V, device=DEVICE))
    if given_lse:
        assert lse is lse_in
    else:
        assert torch.equal(lse[off], torch.zeros_like(lse[off]))
    for got, want in zip((logp, lse, entropy), expect):
        torch.testing.assert_close(got[row_mask].double(), want[row_mask], **F32)
    assert_grad_close(grad[row_mask], expect[3][row_mask], grad_dtype)


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
    logp, lse, entropy, grad = row_pass(buf[:, :V_], None, targets, None, 1.0, None, torch.bfloat16, True)
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
    b = _run(buf.clone(), None, targets.int(), 1.0, torch.float16, PATHS[path], want_entropy=False)
    assert b[2] is None
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("path", PATHS)
def test_masked_vocabulary_entries(path):
    """A -inf bias (a vocabulary entry ruled out) takes no probability, and no NaN from -inf * 0."""
    buf, bias = _buffer(), _bias(torch.float32)
    bias[[3, 20, 60]] = float("-inf")
    targets = torch.tensor(TARGETS, device=DEVICE)
    expect = reference(buf[:, :V].clone(), bias, targets, 1.0)
    logp, lse, entropy, grad = _run(buf, bias, targets, 1.0, torch.float32, PATHS[path])
    for got, want in zip((logp, lse, entropy), expect):
        torch.testing.assert_close(got.double(), want, **F32)
    assert_grad_close(grad, expect[3], torch.float32)
    assert torch.equal(grad[:, [3, 20, 60]], torch.zeros(C, 3, device=DEVICE))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_non_finite_logits_propagate(path, grad_dtype):
    """A NaN or +inf logit in an active row makes its lse and logp non-finite, never a finite log-prob next to a
    non-finite gradient; the other rows are untouched by it."""
    buf = _buffer()
    buf[0, 33] = float("nan")
    buf[2, 70] = float("inf")
    buf[5, 0] = float("nan")  # the target row 5 is out of range: z_y := 0, the NaN still reaches lse
    targets = torch.tensor(TARGETS, device=DEVICE)
    expect = reference(buf[:, :V].clone(), None, targets, 1.0)
    logp, lse, entropy, grad = _run(buf, None, targets, 1.0, grad_dtype, PATHS[path])
    bad = torch.tensor([0, 2, 5])
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
    logp, lse, entropy, grad = row_pass(buf[:, :V], None, torch.zeros(0, dtype=torch.long, device=DEVICE), None,
                                        1.0, None, grad_dtype, True)
    assert logp.shape == lse.shape == entropy.shape == (0,)
    assert grad is None if grad_dtype is None else grad.shape == (0, V) and grad.dtype == grad_dtype


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_on_repeat(path, grad_dtype):
    buf, bias = _buffer(), _bias(torch.bfloat16)
    targets = torch.tensor(TARGETS, device=DEVICE)
    row_mask = torch.tensor([True, True, False, True, True, True, True], device=DEVICE)
    first = _run(buf.clone(), bias, targets, 1.3, grad_dtype, PATHS[path], row_mask=row_mask)
    for _ in range(2):
        again = _run(buf.clone(), bias, targets, 1.3, grad_dtype, PATHS[path], row_mask=row_mask)
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
        row_pass(buf[:, :V].double(), None, targets, None, 1.0, None, None, False)
    with pytest.raises(ValueError, match="unit column stride"):
        row_pass(buf[:, :V:2], None, targets, None, 1.0, None, None, False)
    with pytest.raises(ValueError, match="grad_dtype"):
        row_pass(buf[:, :V], None, targets, None, 1.0, None, torch.float64, False)
    with pytest.raises(ValueError, match="targets"):
        row_pass(buf[:, :V], None, targets.float(), None, 1.0, None, None, False)


def _cuda_row_pass(logits, bias, targets, row_mask, inv_t, lse_in, grad_dtype, want_entropy):
    """The CUDA binding (csrc/row_pass.cu) behind the Triton launcher's interface."""
    ext = importlib.import_module("rankgrpo_kernels.backends.cuda_backend")._ext
    rows = logits.shape[0]
    logp, lse = torch.empty(rows, device=logits.device), torch.empty(rows, device=logits.device)
    entropy = torch.empty(rows, device=logits.device) if want_entropy else None
    grad = grad_view(logits, grad_dtype) if grad_dtype is not None else None
    ext.row_pass(logits, bias, targets, row_mask, inv_t, lse_in, logp, lse, entropy, grad,
                 torch.cuda.current_stream().cuda_stream)
    return logp, lse_in if lse_in is not None else lse, entropy, grad


# (V, row stride): Triton holds 16384 columns whole and walks 20000; CUDA's cached kernel takes 16384 aligned
# columns, its vector streaming kernel 20000 or any lse_in, its scalar one the odd stride.
GPU_WIDTHS = [(16384, 16384), (20000, 20032), (4001, 4003)]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("width", GPU_WIDTHS, ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("given_lse", [False, True])
def test_gpu_real_widths(impl, width, grad_dtype, given_lse):
    """Both implementations natively at LM-head widths, with their shipped tiles: bf16 bias, temperature, targets
    out of range, masked rows of NaN; and bit-identical on a second run."""
    if DEVICE != "cuda" or (impl == "cuda" and torch.version.cuda is None):
        pytest.skip("needs a CUDA GPU (and a CUDA build of torch for the extension)")
    run = row_pass if impl == "triton" else _cuda_row_pass
    V_, S_ = width
    rows = 37
    buf = _buffer(rows=rows, stride=S_)
    bias = _bias(torch.bfloat16, n=V_)
    targets = torch.randint(0, V_, (rows,), device=DEVICE)
    targets[[3, 7, 11]] = torch.tensor([-1, V_, V_ + 100], device=DEVICE)
    row_mask = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    row_mask[[5, 20]] = False
    buf[5] = float("nan")
    buf[20, ::7] = float("inf")
    lse_in = None
    if given_lse:  # finite on the masked rows too, so that the returned lse_in compares equal
        lse_in = torch.where(row_mask, reference(buf[:, :V_].clone(), bias, targets, 1 / 0.9)[1], 0.0).float()
    expect = reference(buf[:, :V_].clone(), bias, targets, 1 / 0.9, row_mask=row_mask, lse_in=lse_in)
    before = buf.clone()
    outputs = []
    for _ in range(2):
        buf.copy_(before)
        outputs.append(run(buf[:, :V_], bias, targets, row_mask, 1 / 0.9, lse_in, grad_dtype, True))
        torch.cuda.synchronize()
    logp, lse, entropy, grad = outputs[0]
    for got, want in zip((logp, lse, entropy), expect):
        torch.testing.assert_close(got.double(), want, **F32)
    if grad_dtype is not None:
        assert_grad_close(grad, expect[3], grad_dtype)
    for x, y in zip(*outputs):
        if x is not None:
            assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))

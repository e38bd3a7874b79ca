"""fp16 D keeps small probabilities: the row pass writes ``D = (onehot - p) S'`` times ``grad_scale`` (the head
passes ``FP16_D_SCALE = 2^15`` for fp16 D), so a probability below fp16's smallest normal (6.1e-5) keeps fp16's
relative precision down to 2^-29 (1.9e-9) instead of turning subnormal (and 0 below 6e-8); the gradient GEMMs' row
scale takes the power of two out again. Run by Triton's interpreter on the CPU (natively on a GPU), against float64.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rankgrpo_kernels import backends  # noqa: E402
from rankgrpo_kernels.backends import torch as torch_backend  # noqa: E402
from rankgrpo_kernels.backends.triton import row_pass_kernel  # noqa: E402
from rankgrpo_kernels.backends.triton.tiles import RowPassConfig, interpreting  # noqa: E402
from rankgrpo_kernels.head import grads  # noqa: E402
from rankgrpo_kernels.specs import HeadSpec  # noqa: E402

from ..helpers import launcher_form  # noqa: E402
from .test_row_pass_kernels import assert_grad_close, autograd_reference, reference  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("neither a GPU nor TRITON_INTERPRET=1", allow_module_level=True)

C, V = 5, 75
K = grads.FP16_D_SCALE
SMALLEST_NORMAL = torch.finfo(torch.float16).smallest_normal  # 6.1e-5
PATHS = {"single": RowPassConfig(single_block=128, single_warps=4, block_v=32, num_warps=4, softcap_single_block=128),
         "two_pass": RowPassConfig(single_block=64, single_warps=2, block_v=16, num_warps=4)}
IMPLS = ("triton", "torch", "cuda")


def _row_pass(impl):
    if impl == "triton":
        return row_pass_kernel.row_pass
    if impl == "torch":
        return launcher_form(torch_backend)[0]
    if DEVICE != "cuda":
        pytest.skip("the CUDA backend needs a GPU")
    try:
        return launcher_form(backends.load("cuda"))[0]
    except ValueError as exc:  # not built here
        pytest.skip(str(exc))


def _logits(stride=80):
    """Rows whose probabilities span 1 down to ~1e-13 (logits from 0 to -30, shuffled), plus noise."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0.0, -30.0, V)
    rows = torch.stack([ramp[torch.randperm(V, generator=g)] + 0.1 * torch.randn(V, generator=g) for _ in range(C)])
    buf = torch.zeros(C, stride)
    buf[:, :V] = rows
    return buf.to(DEVICE)


def _run(impl, buf, targets, grad_scale, softcap, path="single"):
    kw = dict(cfg=PATHS[path]) if impl == "triton" else {}
    return _row_pass(impl)(buf[:, :V], None, targets, 1.0, None, torch.float16, False, softcap=softcap,
                           grad_scale=grad_scale, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("softcap", [None, 40.0])
def test_scaled_fp16_d_keeps_small_probabilities(impl, path, softcap):
    if impl != "triton" and path == "two_pass":
        pytest.skip("the tiles are Triton's")
    buf = _logits()
    targets = torch.tensor([0, 5, V - 1, -1, 40], device=DEVICE)
    want = reference(buf[:, :V].clone(), None, targets, 1.0, softcap=softcap)[3]
    scaled = _run(impl, buf.clone(), targets, K, softcap, path)[3]
    assert_grad_close(scaled, want * K, torch.float16)  # one fp16 rounding of the scaled value
    plain = _run(impl, buf.clone(), targets, 1.0, softcap, path)[3]
    small = (want.abs() < SMALLEST_NORMAL) & (want.abs() >= 2.0**-29)  # subnormal in plain fp16, normal scaled
    assert int(small.sum()) > 40
    rel = ((scaled[small].double() / K - want[small]) / want[small]).abs()
    assert float(rel.max()) <= 2.0**-11 * 1.01  # fp16's normal precision (plus the fp32 error)
    rel_plain = ((plain[small].double() - want[small]) / want[small]).abs()
    assert float(rel_plain.max()) > 0.05  # unscaled, the smallest are subnormal (or 0)
    assert bool((plain[small] == 0).any())


def test_grad_scale_must_be_a_power_of_two():
    buf = _logits()
    targets = torch.zeros(C, dtype=torch.long, device=DEVICE)
    for bad in (3.0, 0.0, -3.0, 2.0**16, -(2.0**16), float("inf")):
        with pytest.raises(ValueError, match="grad_scale"):
            row_pass_kernel.row_pass(buf[:, :V], None, targets, 1.0, None, torch.float16, False, grad_scale=bad)


@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_head_takes_the_factor_out(grad_dtype):
    """The head passes -1, and -FP16_D_SCALE for fp16 D, and divides it out of the rows' scale: d_weight =
    D^T (scale h) and d_bias = scale^T D match float64, and for fp16 the weight rows of tokens with p ~ 1e-7 keep
    fp16's precision (unscaled they would be subnormal)."""
    from rankgrpo_kernels.backends import triton as triton_backend

    H, T = 8, 0.5
    head = HeadSpec(temperature=T)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(C, H, generator=gen).to(DEVICE)
    g = torch.rand(C, generator=gen).to(DEVICE) * 1e-3 + 1e-4  # bnpo-sized dL/dlogp, one sign: no cancellation
    targets = torch.tensor([0, 5, V - 1, -1, 40], device=DEVICE)
    run = grads.HeadPass(impl=triton_backend, head=head, weight=torch.zeros(V, H, device=DEVICE), bias=None,
                         logits=None, cap=C, grad_dtype=grad_dtype)
    assert run.d_scale == -(K if grad_dtype == torch.float16 else 1.0)
    buf = _logits()
    want_d = reference(buf[:, :V].clone(), None, targets, 1 / T)[3]
    d = run.row_pass(buf[:, :V], targets, grad_dtype=grad_dtype).grad
    d_weight, d_bias = torch.empty(V, H, device=DEVICE), torch.empty(V, device=DEVICE)
    scale = run.row_scale(g)
    grads.accumulate_grads(d, scale, h.to(grad_dtype), None, grads.HeadGrads(None, d_weight, d_bias, torch.float32),
                           True, None, None)
    s = g.double() / T
    want_w = want_d.T @ (s[:, None] * h.double())
    want_b = s @ want_d
    # D and h in the GEMM dtype: bf16's 2^-9 relative rounding, summed with cancellation in d_weight
    torch.testing.assert_close(d_weight.double(), want_w, rtol=2e-2, atol=1e-2 * float(want_w.abs().max()))
    torch.testing.assert_close(d_bias.double(), want_b, rtol=2e-2, atol=1e-12)
    if grad_dtype == torch.float16:  # columns whose every |D| is tiny: relative accuracy all the same
        peak = want_d.abs().amax(0)
        tiny = (peak < 1e-6) & (peak > 1e-8)  # below fp16's normals (and 2^-24 times them), above 2^-29
        assert int(tiny.sum()) > 3
        rel = ((d_bias.double() - want_b) / want_b)[tiny].abs()
        assert float(rel.max()) < 2e-2


def test_entropy_gradient_pass_fits_fp16():
    """The gradient pass's D' for fp16 carries operand_factor and FP16_GRAD_PASS_SCALE, and stays finite: |D'| <=
    2 (1 + ln V) times 2^10 for |g|, |e| < 2 after operand_factor; the row scale s / (T factor) takes both out."""
    from rankgrpo_kernels.backends import triton as triton_backend

    T = 0.7
    head = HeadSpec(temperature=T)
    run = grads.HeadPass(impl=triton_backend, head=head, weight=torch.zeros(V, 8, device=DEVICE), bias=None,
                         logits=None, cap=C, grad_dtype=torch.float16)
    buf = _logits()
    targets = torch.tensor([0, 5, V - 1, -1, 40], device=DEVICE)
    _, lse, entropy, _ = row_pass_kernel.row_pass(buf[:, :V].clone(), None, targets, 1 / T, None, None, True)
    gen = torch.Generator().manual_seed(2)
    g = (torch.randn(C, generator=gen) * 1e-4).to(DEVICE)
    e = (torch.randn(C, generator=gen) * 1e-4).to(DEVICE)
    want = autograd_reference(buf[:, :V].clone(), None, targets, 1 / T, g, e) * (1 / T)  # dL/d acc
    d, scale = grads.entropy_gradient_pass(run, buf[:, :V], targets, lse, entropy, g, e)
    assert d.dtype == torch.float16 and bool(torch.isfinite(d).all())
    assert float(d.abs().max()) > 2.0**10 * 0.5  # the headroom is used
    got = d.double() * scale.double()[:, None]
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-10)

"""``gemms``: the mixed-dtype GEMMs (half operands, fp32 output) on every torch the package accepts, and IEEE fp32.

A CPU has no ``out_dtype=`` GEMM at all, so the torch versions are played by wrappers around the CPU's fp32 GEMMs:
torch >= 2.10 (both in-place forms work), torch 2.8/2.9 (``addmm(..., out_dtype=, out=)`` refused with "self and
mat2 must have the same dtype", ``mm(..., out_dtype=)`` fine) and a torch with neither. Operands are small integers
in bf16, so every product and sum is exact in fp32 and the paths must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from rankgrpo_kernels.head import gemms

REAL_MM, REAL_ADDMM = torch.mm, torch.addmm


def _mm(a, b, *, out_dtype=None, out=None):
    if out_dtype is None:
        return REAL_MM(a, b) if out is None else REAL_MM(a, b, out=out)
    product = REAL_MM(a.to(out_dtype), b.to(out_dtype))
    return product if out is None else out.copy_(product)


def _addmm(total, a, b, *, out_dtype=None, beta=1, alpha=1, out=None, refuse_out=False):
    if out_dtype is None:
        return REAL_ADDMM(total, a, b, beta=beta, alpha=alpha, out=out)
    if out is not None and refuse_out and total.dtype != a.dtype:
        raise RuntimeError(f"self and mat2 must have the same dtype, but got {total.dtype} and {a.dtype}")
    result = REAL_ADDMM(total, a.to(out_dtype), b.to(out_dtype), beta=beta, alpha=alpha)
    return result if out is None else out.copy_(result)


def _no_out_dtype(name, real):
    def gemm(*args, out_dtype=None, **kwargs):
        if out_dtype is not None:
            raise NotImplementedError(f"Could not run 'aten::{name}.dtype' with arguments from the 'CPU' backend")
        return real(*args, **kwargs)
    return gemm


TORCHES = {
    "2.10": (_mm, _addmm),
    "2.8": (_mm, lambda *args, **kwargs: _addmm(*args, refuse_out=True, **kwargs)),
    "none": (_no_out_dtype("mm", REAL_MM), _no_out_dtype("addmm", REAL_ADDMM)),
}
MODES = {"2.10": ("native", "native"), "2.8": ("native", "scratch"), "none": ("upcast", "upcast")}


@pytest.fixture(autouse=True)
def _fresh_probe(monkeypatch):
    monkeypatch.setattr(gemms, "_MODES", {})


def _as_torch(monkeypatch, version):
    mm, addmm = TORCHES[version]
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)


def _ints(*shape, dtype=torch.bfloat16):
    return torch.randint(-4, 5, shape).to(dtype)


@pytest.mark.parametrize("version", list(TORCHES))
def test_probe_finds_what_each_torch_takes(monkeypatch, version):
    _as_torch(monkeypatch, version)
    assert gemms.native_out_dtype("cpu") == dict(zip(("mm", "addmm"), MODES[version]))


def test_probe_runs_once_per_kind(monkeypatch):
    calls = []
    monkeypatch.setattr(gemms, "_native", lambda op, *args, **kwargs: calls.append(op))
    for _ in range(3):
        gemms.probe("addmm", torch.device("cpu"), torch.bfloat16, torch.float32)
    gemms.probe("addmm", torch.device("cpu"), torch.float16, torch.float32)
    gemms.probe("mm", torch.device("cpu"), torch.float16, torch.float32)
    assert calls == ["addmm", "addmm", "mm"]


def test_probe_of_this_cpu_torch():
    """The real CPU torch has no mixed-dtype GEMM: lm_head upcasts before it gets here, and gemms would too."""
    assert gemms.native_out_dtype("cpu") == {"mm": "upcast", "addmm": "upcast"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("version", ["2.8", "none"])
@pytest.mark.parametrize("beta, alpha", [(0.0, 1.0), (0.0, 0.25), (1.0, 1.0), (1.0, 2.0**-7), (0.5, 3.0)])
def test_addmm_fallback_equals_native(monkeypatch, version, dtype, beta, alpha):
    """d_weight += D^T (scale h): the operand a transposed view, blocks of a few rows, beta = 0 over NaN."""
    d, h = _ints(37, 53, dtype=dtype), _ints(37, 19, dtype=dtype)
    start = _ints(53, 19, dtype=torch.float32)
    if beta == 0:
        start.fill_(float("nan"))  # what torch.empty may hold: beta = 0 must not read it

    _as_torch(monkeypatch, "2.10")
    native = gemms.addmm_into(start.clone(), d.T, h, beta=beta, alpha=alpha)
    gemms._MODES.clear()
    _as_torch(monkeypatch, version)
    monkeypatch.setattr(gemms, "SCRATCH_BYTES", 5 * 19 * 4)  # 5 rows per block: 11 blocks, the last of 3 rows
    total = start.clone()
    fallback = gemms.addmm_into(total, d.T, h, beta=beta, alpha=alpha)
    assert gemms._MODES[("addmm", "cpu", dtype, torch.float32)] == MODES[version][1]
    assert fallback is total and total.dtype == torch.float32
    assert torch.isfinite(total).all()
    torch.testing.assert_close(total, native, rtol=0, atol=0)
    want = alpha * (d.T.double() @ h.double()) + (0 if beta == 0 else beta * start.double())
    torch.testing.assert_close(total.double(), want, rtol=0, atol=0)


def test_addmm_bias_row(monkeypatch):
    """d_bias[None] += (scale)^T D: a (1, V) view of a (V,) accumulator, beta = 0 then 1."""
    _as_torch(monkeypatch, "2.8")
    d, s = _ints(23, 41), _ints(1, 23)
    d_bias = torch.full((41,), float("nan"))
    gemms.addmm_into(d_bias[None], s, d, beta=0.0)
    gemms.addmm_into(d_bias[None], s, d, beta=1.0)
    torch.testing.assert_close(d_bias.double(), 2 * (s.double() @ d.double())[0], rtol=0, atol=0)


@pytest.mark.parametrize("version", list(TORCHES))
def test_mm_into_every_torch(monkeypatch, version):
    _as_torch(monkeypatch, version)
    monkeypatch.setattr(gemms, "SCRATCH_BYTES", 64)  # 2 rows of 29 fp32 per block
    h, w = _ints(11, 17), _ints(29, 17)
    out = torch.full((11, 29), float("nan"))
    assert gemms.mm_into(h, w.T, out) is out
    torch.testing.assert_close(out.double(), h.double() @ w.double().T, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_dtype_is_the_plain_gemm(dtype):
    a, b = torch.randn(6, 5, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    out = torch.empty(6, 4, dtype=dtype)
    torch.testing.assert_close(gemms.mm_into(a, b, out), a @ b)
    total = torch.full((6, 4), float("nan"), dtype=dtype)
    gemms.addmm_into(total, a, b, beta=0.0, alpha=0.5)
    torch.testing.assert_close(total, 0.5 * (a @ b))
    expected = 0.5 * total + 2 * (a @ b)
    gemms.addmm_into(total, a, b, beta=0.5, alpha=2.0)
    torch.testing.assert_close(total, expected)


def _precision():
    return (gemms._read(torch.get_float32_matmul_precision),
            gemms._read(lambda: torch.backends.cuda.matmul.fp32_precision))


@pytest.mark.parametrize("setting", ["high", "medium", "highest"])
def test_ieee_fp32_sets_and_restores_the_precision(setting):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        outside = _precision()
        with gemms.ieee_fp32():
            precision, fine = _precision()
            assert precision == "highest" and fine in (None, "ieee")
        assert _precision() == outside
        with pytest.raises(KeyError):
            with gemms.ieee_fp32():
                raise KeyError("restored on the way out too")
        assert _precision() == outside
    finally:
        torch.set_float32_matmul_precision(before)


def test_ieee_fp32_restores_the_new_api_setting():
    matmul = torch.backends.cuda.matmul
    if gemms._read(lambda: matmul.fp32_precision) is None:
        pytest.skip("torch < 2.9: no torch.backends.cuda.matmul.fp32_precision")
    before = torch.get_float32_matmul_precision(), matmul.fp32_precision, torch.backends.fp32_precision
    try:
        torch.backends.fp32_precision = "tf32"  # the user's choice for every backend; matmul inherits it
        matmul.fp32_precision = "none"
        outside = matmul.fp32_precision  # the getter answers the inherited value, "tf32"
        with gemms.ieee_fp32():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == outside and torch.backends.fp32_precision == "tf32"
    finally:
        torch.backends.fp32_precision = before[2]
        torch.set_float32_matmul_precision(before[0])
        matmul.fp32_precision = before[1]


def test_ieee_fp32_after_only_the_new_api():
    """torch >= 2.9 refuses to read the legacy setting once only the new one was set; inside, both say IEEE."""
    matmul = torch.backends.cuda.matmul
    if gemms._read(lambda: matmul.fp32_precision) is None:
        pytest.skip("torch < 2.9: no torch.backends.cuda.matmul.fp32_precision")
    before = torch.get_float32_matmul_precision(), matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with gemms.ieee_fp32():
            assert _precision() == ("highest", "ieee") and matmul.allow_tf32 is False
        assert matmul.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(before[0])
        matmul.fp32_precision = before[1]


def test_fp32_gemms_on_cuda_run_inside_ieee_fp32(monkeypatch):
    """The CUDA condition played on the CPU: the GEMMs see IEEE fp32 under a global 'high', which then stays."""
    seen = []

    def recording(real):
        return lambda *args, **kwargs: (seen.append(torch.get_float32_matmul_precision()), real(*args, **kwargs))[1]

    monkeypatch.setattr(gemms, "_IEEE_DEVICES", ("cpu",))
    monkeypatch.setattr(torch, "mm", recording(REAL_MM))
    monkeypatch.setattr(torch, "addmm", recording(REAL_ADDMM))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        a = torch.randn(4, 3)
        gemms.mm_into(a, a.T, torch.empty(4, 4))
        gemms.addmm_into(torch.zeros(4, 4), a, a.T)
        gemms.mm_into(a.double(), a.double().T, torch.empty(4, 4, dtype=torch.float64))  # fp64: no TF32 anyway
        assert seen == ["highest", "highest", "high"] and torch.get_float32_matmul_precision() == "high"
        monkeypatch.setattr(gemms, "IEEE_FP32", False)
        gemms.mm_into(a, a.T, torch.empty(4, 4))
        assert seen[-1] == "high"
    finally:
        torch.set_float32_matmul_precision(before)

"""The LM head's GEMMs with a wider output than their operands, on every torch the package accepts.

Shapes: ``a`` (M, K), ``b`` (K, N), ``out`` / ``total`` (M, N), any strides torch's GEMMs take (a transposed view
is fine). Operands are bf16/fp16 with an fp32 output, or share the output's dtype (fp32/fp64)::

    mm_into(a, b, out)                          out   = a @ b
    addmm_into(total, a, b, beta=, alpha=)      total = beta * total + alpha * (a @ b)

Products and sums in the output's precision (fp32 accumulation for half operands); ``beta = 0`` never reads
``total``, so it may hold uninitialised memory, NaN included. Equivalent PyTorch, up to the order of the sums::

    out.copy_(a.to(out.dtype) @ b.to(out.dtype))
    total.copy_(beta * total + alpha * (a.to(total.dtype) @ b.to(total.dtype)))      # beta = 0: no beta * total

Half operands with an fp32 output go through ``out_dtype=`` (CUDA only; a CPU has no such GEMM, so the head
upcasts there first). torch 2.8 and 2.9 take ``torch.mm(a, b, out_dtype=torch.float32)`` but refuse the in-place
``torch.addmm(total, a, b, out_dtype=torch.float32, out=total)`` ("self and mat2 must have the same dtype",
pytorch#154086; relaxed in 2.10, pytorch#167931). So the first mixed-dtype call of each kind (mm or addmm, operand
and output dtype, device type) tries the in-place form on tiny tensors and caches the answer (``probe``): one tiny
GEMM per process and kind, no host sync (the refusal is a host-side check). Where it is refused the same
arithmetic runs in two steps, over blocks of at most ``SCRATCH_BYTES`` of output rows::

    scratch = a[rows] @ b                       fp32 scratch from the half operands, fp32 accumulation
    total[rows] = beta * total[rows] + alpha * scratch     (beta = 0: total[rows] = alpha * scratch)

which rounds like the fused epilogue (one fp32 product, one fp32 multiply-add), at one more read and write of the
block. Where even ``out_dtype=`` without ``out=`` is refused (a torch without the overload), the operands of each
block are upcast to the output dtype instead (same values, the GEMM at fp32 speed).

fp32 GEMMs on CUDA run as TF32 when a user has set ``torch.backends.cuda.matmul.allow_tf32 = True`` or
``torch.set_float32_matmul_precision("high")`` (10-bit mantissas: ~1e-3 relative error per product, which log-probs
of a 150k vocabulary do not tolerate). ``ieee_fp32()`` runs the GEMMs inside it at IEEE fp32 whatever the global
setting, and restores it after; ``mm_into`` and ``addmm_into`` enter it by themselves for fp32 operands on CUDA
(``IEEE_FP32 = True``). It only sets host-side flags: no sync, no device work.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["mm_into", "addmm_into", "ieee_fp32", "probe", "native_out_dtype", "SCRATCH_BYTES", "IEEE_FP32"]

# Output bytes per block of the two-step fallback: the fp32 scratch it holds at once. 64 MiB is 18.7k rows of a
# 896-wide d_weight (GEMMs of that size run at full speed) and at most 1/8 of the GPU logits budget (settings).
SCRATCH_BYTES = 2**26

# fp32 operands on these device types run at IEEE fp32 (not TF32) whatever torch.backends.cuda.matmul says.
IEEE_FP32 = True
_IEEE_DEVICES = ("cuda",)

# (op, device type, operand dtype, output dtype) -> "native" | "scratch" | "upcast"
_MODES: dict[tuple[str, str, torch.dtype, torch.dtype], str] = {}


def _native(op, a, b, out, beta=1.0, alpha=1.0):
    if op == "mm":
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    return torch.addmm(out, a, b, out_dtype=out.dtype, beta=beta, alpha=alpha, out=out)


def probe(op: str, device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> str:
    """How ``op`` ("mm" or "addmm") runs with ``dtype`` operands and an ``out_dtype`` output on ``device``'s type:
    "native" (the in-place ``out_dtype=`` form works), "scratch" (only ``torch.mm(..., out_dtype=)`` without
    ``out=``) or "upcast" (no mixed-dtype GEMM). Tried once on 2x2 tensors, then cached."""
    key = (op, device.type, dtype, out_dtype)
    mode = _MODES.get(key)
    if mode is None:
        a = torch.zeros(2, 2, dtype=dtype, device=device)
        out = torch.zeros(2, 2, dtype=out_dtype, device=device)
        mode = "native"
        try:
            _native(op, a, a, out)
        except (RuntimeError, NotImplementedError, TypeError):
            try:
                torch.mm(a, a, out_dtype=out_dtype)
                mode = "scratch"
            except (RuntimeError, NotImplementedError, TypeError):
                mode = "upcast"
        _MODES[key] = mode
    return mode


def native_out_dtype(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """The probe's answers for both GEMMs with ``dtype`` operands and fp32 output on ``device`` (for reports)."""
    device = torch.device(device)
    return {op: probe(op, device, dtype, torch.float32) for op in ("mm", "addmm")}


@contextlib.contextmanager
def ieee_fp32():
    """fp32 GEMMs inside run at IEEE fp32, not TF32, whatever the global setting; restored on exit. Host-side only.

    Sets ``torch.set_float32_matmul_precision("highest")``, which torch >= 2.9 mirrors into
    ``torch.backends.cuda.matmul.fp32_precision = "ieee"``: both settings agree inside, so torch's check against
    mixing the legacy and the new API cannot fire in the GEMM. On exit it puts back each setting it could read
    (torch >= 2.9 refuses to read the legacy one after a user set only the new one; that user then gets the new
    one back, and the legacy one stays at its default, "highest")."""
    matmul = torch.backends.cuda.matmul
    legacy, fine = _read(torch.get_float32_matmul_precision), _read(lambda: matmul.fp32_precision)
    if legacy == "highest" and fine in (None, "ieee"):
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        if fine is not None:
            matmul.fp32_precision = fine


def _read(getter):
    """A precision setting, or None where this torch has none (< 2.9) or refuses to read it (a mixed state)."""
    try:
        return getter()
    except (AttributeError, RuntimeError):
        return None


def _ieee_scope(a: torch.Tensor):
    if IEEE_FP32 and a.dtype == torch.float32 and a.device.type in _IEEE_DEVICES:
        return ieee_fp32()
    return contextlib.nullcontext()


def _blocks(out: torch.Tensor):
    """Row ranges of ``out`` of at most ``SCRATCH_BYTES`` each (at least one row)."""
    M, N = out.shape
    rows = max(1, SCRATCH_BYTES // max(1, N * out.element_size()))
    return [(r, min(M, r + rows)) for r in range(0, M, rows)]


def _product(mode, a, b, dtype):
    if mode == "scratch":
        return torch.mm(a, b, out_dtype=dtype)
    return torch.mm(a.to(dtype), b.to(dtype))


def mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` with the output's (fp32/fp64) precision for products and sums; returns ``out``.

    ``a`` (M, K) and ``b`` (K, N) share a dtype: ``out``'s, or bf16/fp16 under an fp32 ``out`` (CUDA)."""
    with _ieee_scope(a):
        if a.dtype == out.dtype:
            return torch.mm(a, b, out=out)
        mode = probe("mm", a.device, a.dtype, out.dtype)
        if mode == "native":
            return _native("mm", a, b, out)
        for r0, r1 in _blocks(out):
            out[r0:r1].copy_(_product(mode, a[r0:r1], b, out.dtype))
        return out


def addmm_into(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1.0,
               alpha: float = 1.0) -> torch.Tensor:
    """``total = beta total + alpha a @ b`` in place, accumulating in ``total``'s precision; returns ``total``.
    ``beta = 0`` writes without reading ``total`` (uninitialised memory, NaN, is fine).

    ``a`` (M, K) and ``b`` (K, N) share a dtype: ``total``'s, or bf16/fp16 under an fp32 ``total`` (CUDA)."""
    with _ieee_scope(a):
        if a.dtype == total.dtype:
            return torch.addmm(total, a, b, beta=beta, alpha=alpha, out=total)
        mode = probe("addmm", a.device, a.dtype, total.dtype)
        if mode == "native":
            return _native("addmm", a, b, total, beta=beta, alpha=alpha)
        for r0, r1 in _blocks(total):
            scratch = _product(mode, a[r0:r1], b, total.dtype)
            rows = total[r0:r1]
            if beta == 0:
                torch.mul(scratch, alpha, out=rows)
            else:
                if beta != 1:
                    rows.mul_(beta)
                rows.add_(scratch, alpha=alpha)
        return total

"""The gradient GEMMs of a chunk, and what every chunk of a head call shares.

With D (C, V) from a backend's row pass (``D = onehot - p``, times ``S'(u)``, times ``k``) and the per-token row
scale ``scale = g s / (T k)`` (C,)::

    d_hidden[rows] = scale (D W)          GEMM with fp32 output, one row scale and cast, scattered to its rows
    d_weight      += D^T (scale h)        GEMM accumulating in fp32 in place (beta = 1)
    d_bias        += scale^T D            the same GEMM's column H where the gradients are returned in bf16 or
                                          fp16, else a GEMV

With both gradients and an fp32 accumulator apart from the returned (bf16/fp16) tensors, d_bias is one more column
of the d_weight GEMM: ``[d_weight | d_bias | 0] += D^T [scale h | scale | 0]``, the accumulator (V, H + pad) with
rows padded to ``BIAS_PAD`` columns (16-byte aligned GEMM operands), so D is read once instead of a second time by
an M = 1 GEMM for d_bias. The cast at the end makes both contiguous. Where the accumulator is the returned
gradient itself (fp32/fp64 heads; the fused loss saves fp16 heads' gradients in fp32) the padded rows would cost a
copy of d_weight, so d_bias stays a GEMV there.

GEMMs through ``gemms.py`` (fp32 output for half operands on CUDA, IEEE fp32 for fp32). No atomics: results are
bit-identical from run to run.

``k`` is -1 (``HeadPass.d_scale``: the softmax minus the one-hot, a pass fewer in the torch row pass), and -2^15
for fp16 D: a probability below 6e-5 is subnormal in fp16 (below 6e-8 it is 0), so the row pass writes D (|D| <= 1)
times ``FP16_D_SCALE = 2^15`` and the gradient pass D' (|D'| <= 2 (1 + ln V) for |g|, |e| < 2)
times ``FP16_GRAD_PASS_SCALE = 2^10`` on top of ``operand_factor`` (within fp16's 65504 for V < 2^31): powers of
two (signed), taken out exactly by the row scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch

from ..specs import HeadSpec
from . import gemms
from .scratch import LogitsBuffer

FP16_D_SCALE = 2.0**15
FP16_GRAD_PASS_SCALE = 2.0**10


@dataclass
class HeadPass:
    """What every chunk of one head call shares: the backend module, the head spec, the GEMM operand of the
    weight, the bias, the logits scratch, the chunk size ``cap``, the (cap, H) accumulator scratch of d_hidden
    (or None) and the dtype of D (the GEMM operand dtype, or None without gradients)."""

    impl: ModuleType
    head: HeadSpec
    weight: torch.Tensor
    bias: torch.Tensor | None
    logits: LogitsBuffer
    cap: int
    product: torch.Tensor | None = None
    grad_dtype: torch.dtype | None = None

    def logits_of(self, h: torch.Tensor) -> torch.Tensor:
        """Z = h W^T (C, V) into the scratch, C <= cap."""
        return gemms.mm_into(h, self.weight.T, self.logits.rows(h.shape[0]))

    @property
    def d_scale(self) -> float:
        """k, the factor of D in the row pass's output (module docstring): negative, so that D = k (onehot - p) is
        ``|k| (p - onehot)``, which the torch backend forms without a pass over the logits to negate them (the
        compiled kernels scale by k anyway); the row scale carries the sign."""
        return -(FP16_D_SCALE if self.grad_dtype == torch.float16 else 1.0)

    def row_pass(self, z, y, **kwargs):
        if kwargs.get("grad_dtype") is not None:
            kwargs["grad_scale"] = self.d_scale
        return self.impl.row_pass(z, bias=self.bias, targets=y, head=self.head, **kwargs)

    def row_scale(self, g):
        """The row scale of the row pass's D: ``g s / (T k)``."""
        return g * (self.head.row_scale / self.d_scale)


@dataclass
class HeadGrads:
    """The gradients of one head call: d_hidden (tokens, H) in its returned dtype, d_weight (V, H) and d_bias (V,)
    in the accumulator dtype (None where not needed), returned in ``dtype``; ``weight_bias``: the (V, H + pad)
    accumulator whose first H columns are d_weight and column H d_bias (module docstring), or None."""

    d_hidden: torch.Tensor | None
    d_weight: torch.Tensor | None
    d_bias: torch.Tensor | None
    dtype: torch.dtype
    weight_bias: torch.Tensor | None = None

    def finish(self) -> tuple:
        """(d_hidden, d_weight, d_bias), the last two cast to ``dtype`` and contiguous."""
        return (self.d_hidden, *(None if x is None else x.to(self.dtype).contiguous()
                                 for x in (self.d_weight, self.d_bias)))


BIAS_PAD = 8  # columns: the joint accumulator's width H + 1 rounded up to a multiple of it


def grad_buffers(tokens, listed, weight, bias, needs, hidden_dtype, acc, dtype) -> HeadGrads:
    """d_hidden (tokens, H) in ``hidden_dtype`` (zeros unless every token is listed), d_weight and d_bias in
    ``acc`` (uninitialised when a chunk will write them, zeros when no token is listed), returned in ``dtype``;
    None where not needed."""
    need_h, need_w, need_b = needs
    V, H = weight.shape
    device = weight.device
    d_hidden = None
    if need_h:
        d_hidden = (torch.empty if listed == tokens else torch.zeros)(tokens, H, dtype=hidden_dtype, device=device)
    need_b = need_b and bias is not None
    new = torch.empty if listed else torch.zeros
    if need_w and need_b and dtype != acc:
        joint = new(V, -(-(H + 1) // BIAS_PAD) * BIAS_PAD, dtype=acc, device=device)
        return HeadGrads(d_hidden, joint[:, :H], joint[:, H], dtype, joint)
    return HeadGrads(d_hidden, new(V, H, dtype=acc, device=device) if need_w else None,
                     new(V, dtype=acc, device=device) if need_b else None, dtype)


def accumulate_grads(d_logits, scale, h, weight, grads: HeadGrads, first, rows_out, product):
    """With D (C, V) and ``scale`` (C,): ``d_hidden[rows_out] = scale (D W)``, ``d_weight += D^T (scale h)``,
    ``d_bias += scale^T D``; ``first`` writes the sums instead of adding to them. ``product`` is (>= C, H) scratch
    in the accumulator dtype."""
    if grads.d_hidden is not None:
        rows = gemms.mm_into(d_logits, weight, product[: d_logits.shape[0]])
        rows.mul_(scale[:, None].to(rows.dtype))
        grads.d_hidden.index_copy_(0, rows_out, rows.to(grads.d_hidden.dtype))
    if grads.d_weight is None and grads.d_bias is None:
        return
    factor = operand_factor(scale, d_logits.dtype)
    accumulate = dict(beta=0.0 if first else 1.0, alpha=1.0 / factor)
    row = scale * factor
    if grads.d_weight is not None:
        # where, not a product: a token outside the loss may hold a NaN hidden state, and its D row is 0.
        scaled = torch.where(scale[:, None] != 0, h * row[:, None], 0)
        out = grads.d_weight
        if grads.weight_bias is not None:
            out = grads.weight_bias
            pad = out.shape[1] - scaled.shape[1] - 1
            scaled = torch.cat([scaled, row[:, None], scaled.new_zeros(scaled.shape[0], pad)], 1)
        gemms.addmm_into(out, d_logits.T, scaled.to(d_logits.dtype), **accumulate)
    if grads.d_bias is not None and grads.weight_bias is None:
        gemms.addmm_into(grads.d_bias[None], row[None].to(d_logits.dtype), d_logits, **accumulate)


def operand_factor(scale, dtype) -> float:
    """A power of two that brings ``scale = g / T`` near 1 before it enters an fp16 GEMM operand, whose normal range
    stops at 6e-5 (bnpo over 16k tokens puts g near there); the GEMM's alpha takes it out again. One host sync per
    chunk, for fp16 only; 1 for other dtypes (bf16 has fp32's range)."""
    if dtype != torch.float16:
        return 1.0
    peak = float(scale.abs().amax()) if scale.numel() else 0.0
    return 2.0 ** -math.floor(math.log2(peak)) if 0.0 < peak < math.inf else 1.0


def entropy_gradient_pass(run: HeadPass, z, y, lse, entropy, g, e):
    """``D'`` of a loss with an entropy term over the untouched logits ``z`` (a statistics-only row pass), and the
    row scale of its gradient GEMMs. fp16 operands get ``g`` and ``e`` times a power of two (``operand_factor``,
    then ``FP16_GRAD_PASS_SCALE``) that the row scale takes out again: ``D'`` holds ``g``, and ``g / T`` sits near
    fp16's subnormals."""
    factor = operand_factor(torch.maximum(g.abs(), e.abs()), run.grad_dtype)
    if run.grad_dtype == torch.float16:
        factor *= FP16_GRAD_PASS_SCALE
    d_logits = run.impl.grad_pass(z, bias=run.bias, targets=y, head=run.head, lse=lse, entropy=entropy,
                                  g=g * factor, e=e * factor, grad_dtype=run.grad_dtype)
    return d_logits, torch.full_like(g, run.head.row_scale / factor)

"""Backward of the fused log-probs: recompute each logits tile once, form dZ in registers, accumulate dh and dW.

Given ``g[n] = dL/dlogp[n]`` and the saved ``lse``, with ``p = exp(z - lse)`` and ``z`` as in the forward:

    dZ[n, v] = g[n] / T * (onehot(y_n)[v] - p[n, v])
    d_hidden = dZ @ W,   d_weight = dZ^T @ hidden,   d_bias = dZ.sum(0)

Only tokens with ``g != 0`` cost anything: they are listed first in ``order`` and ``count`` holds how many there
are (both on the device, so there is no host sync); programs whose token tile starts past ``count`` exit at once.
Program (i, j) owns active-token tile i and vocabulary tile j and adds its products into fp32 accumulators with
atomics (the order of float additions varies run to run; the torch backend's backward is the deterministic path).

Equivalent PyTorch::

    p = ((hidden @ weight.T + bias).float() / T).softmax(-1)
    dz = g[:, None] / T * (F.one_hot(y, V) - p)
    d_hidden, d_weight, d_bias = dz @ weight, dz.T @ hidden, dz.sum(0)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import KernelConfig, backward_config, dot_precision
from .logprob_forward import dot, logits_tile


@triton.jit
def _logprob_backward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_ptr, order_ptr, count_ptr,
    d_hidden_ptr, d_weight_ptr, d_bias_ptr,
    V, H, stride_h, stride_w, inv_temperature,
    HAS_BIAS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    count = tl.load(count_ptr)
    first = tl.program_id(0).to(tl.int64) * BLOCK_N
    if first < count:
        slots = first + tl.arange(0, BLOCK_N)
        slot_ok = slots < count
        rows = tl.load(order_ptr + slots, mask=slot_ok, other=0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, slot_ok, cols, col_ok, H, stride_h, stride_w,
                        inv_temperature, HAS_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        lse = tl.load(lse_ptr + rows, mask=slot_ok, other=0.0)
        coef = tl.load(grad_ptr + rows, mask=slot_ok, other=0.0).to(tl.float32) * inv_temperature
        y = tl.load(targets_ptr + rows, mask=slot_ok, other=-1).to(tl.int64)
        onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        d_z = coef[:, None] * (onehot - tl.exp(z - lse[:, None]))
        d_z = tl.where(slot_ok[:, None] & col_ok[None, :], d_z, 0.0)
        if NEED_DB:
            tl.atomic_add(d_bias_ptr + cols, tl.sum(d_z, axis=0), mask=col_ok)
        d_z_in = d_z.to(hidden_ptr.dtype.element_ty)  # the GEMM operands' dtype, accumulated in fp32
        for h0 in range(0, H, BLOCK_H):
            k = h0 + tl.arange(0, BLOCK_H)
            k_ok = k < H
            if NEED_DH:
                w = tl.load(weight_ptr + cols[:, None] * stride_w + k[None, :], mask=col_ok[:, None] & k_ok[None, :],
                            other=0.0)
                d_h = dot(d_z_in, w, tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32), PRECISION)
                tl.atomic_add(d_hidden_ptr + rows[:, None] * H + k[None, :], d_h,
                              mask=slot_ok[:, None] & k_ok[None, :])
            if NEED_DW:
                h = tl.load(hidden_ptr + rows[:, None] * stride_h + k[None, :], mask=slot_ok[:, None] & k_ok[None, :],
                            other=0.0)
                d_w = dot(tl.trans(d_z_in), h, tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32), PRECISION)
                tl.atomic_add(d_weight_ptr + cols[:, None] * H + k[None, :], d_w,
                              mask=col_ok[:, None] & k_ok[None, :])


def logprob_backward(hidden, weight, bias, targets, temperature, lse, grad_logp, needs, cfg: KernelConfig = None):
    """Gradients (d_hidden, d_weight, d_bias) of ``sum_n grad_logp[n] * logp[n]``, each in its input's dtype.

    ``needs`` = (need d_hidden, need d_weight, need d_bias); the others come back as None.
    """
    need_h, need_w, need_b = needs
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = cfg or backward_config(hidden.device, hidden.dtype)
    active = grad_logp != 0
    order = torch.argsort(active.to(torch.int8), descending=True, stable=True)  # active tokens first
    count = active.sum().to(torch.int64).reshape(1)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros(N, H, **f32) if need_h else None
    d_weight = torch.zeros(V, H, **f32) if need_w else None
    d_bias = torch.zeros(V, **f32) if need_b else None
    dummy = lse  # stands in for pointers of gradients that are not asked for
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v))
    if N and V:
        _logprob_backward_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, targets, lse, grad_logp, order, count,
            d_hidden if need_h else dummy, d_weight if need_w else dummy, d_bias if need_b else dummy,
            V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature,
            HAS_BIAS=bias is not None, NEED_DH=need_h, NEED_DW=need_w, NEED_DB=need_b,
            PRECISION=dot_precision(hidden.dtype), BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return (
        d_hidden.to(hidden.dtype) if need_h else None,
        d_weight.to(weight.dtype) if need_w else None,
        d_bias.to(bias.dtype) if need_b else None,
    )

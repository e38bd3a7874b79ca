"""Fused log-prob forward: token tiles x vocabulary tiles, one GEMM each, an fp32 epilogue, no logits in memory.

For tokens n and vocabulary rows v, ``z[n, v] = (hidden[n] . weight[v] + bias[v]) / T``. Program (i, s) owns
token tile i and vocabulary split s; walking its split tile by tile it keeps, per token,

    m = max_v z,   s = sum_v exp(z - m),   u = sum_v exp(z - m) z   (entropy only),   z_y (if y is in the split)

and writes them as fp32 partials (splits, N). The combine kernel reduces the splits in a fixed order (no atomics,
deterministic): ``lse = M + log sum_s s_s e^(m_s - M)``, ``logp = z_y - lse``,
``entropy = lse - sum_s u_s e^(m_s - M) / sum_s s_s e^(m_s - M)``.

Equivalent PyTorch::

    z = (hidden.float() @ weight.float().T + bias) / T
    lse = z.logsumexp(-1); logp = z.gather(-1, y[:, None])[:, 0] - lse
    entropy = lse - (z.softmax(-1) * z).sum(-1)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import KernelConfig, dot_precision, forward_config

COMBINE_BLOCK = 32  # tokens per program of the combine kernel (x 64 splits: no spills)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` on the matrix units; fp32 operands under the interpreter, whose bf16 products are wrong."""
    if PRECISION == "interpret":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w,
                inv_temperature, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of z; ``rows`` and ``cols`` are int64 (N * V and V * H may pass 2^31)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        k = h0 + tl.arange(0, BLOCK_H)
        k_ok = k < H
        a = tl.load(hidden_ptr + rows[:, None] * stride_h + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(weight_ptr + cols[:, None] * stride_w + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = dot(a, tl.trans(b), acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temperature


@triton.jit
def _logprob_partials_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    max_ptr, sum_exp_ptr, sum_exp_z_ptr, target_logit_ptr,
    N, V, H, stride_h, stride_w, vocab_per_split, inv_temperature,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split.to(tl.int64) * vocab_per_split
    v_end = tl.minimum(v_start + vocab_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w,
                         inv_temperature, HAS_BIAS, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        z = tl.where(col_ok[None, :], z, float("-inf"))  # the vocabulary tail takes no probability
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(z - new_max[:, None])
        sum_exp = sum_exp * rescale + tl.sum(p, axis=1)
        if WITH_ENTROPY:
            sum_exp_z = sum_exp_z * rescale + tl.sum(tl.where(col_ok[None, :], p * z, 0.0), axis=1)
        running_max = new_max
        # A target past the split (the vocabulary tail, another rank's shard) must not pick a masked -inf.
        is_target = (cols[None, :] == y[:, None]) & col_ok[None, :]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)
    out = split.to(tl.int64) * N + rows
    tl.store(max_ptr + out, running_max, mask=row_ok)
    tl.store(sum_exp_ptr + out, sum_exp, mask=row_ok)
    tl.store(target_logit_ptr + out, target_logit, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(sum_exp_z_ptr + out, sum_exp_z, mask=row_ok)


@triton.jit
def _logprob_combine_kernel(
    max_ptr, sum_exp_ptr, sum_exp_z_ptr, target_logit_ptr, logp_ptr, lse_ptr, entropy_ptr,
    N, num_splits,
    WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    splits = tl.arange(0, BLOCK_S)
    ok = (splits[:, None] < num_splits) & (rows[None, :] < N)
    at = splits[:, None].to(tl.int64) * N + rows[None, :]
    split_max = tl.load(max_ptr + at, mask=ok, other=float("-inf"))
    overall_max = tl.max(split_max, axis=0)
    scale = tl.where(ok, tl.exp(split_max - overall_max[None, :]), 0.0)
    sum_exp = tl.sum(tl.load(sum_exp_ptr + at, mask=ok, other=0.0) * scale, axis=0)
    lse = overall_max + tl.log(sum_exp)
    target_logit = tl.sum(tl.load(target_logit_ptr + at, mask=ok, other=0.0), axis=0)
    row_ok = rows < N
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, target_logit - lse, mask=row_ok)
    if WITH_ENTROPY:
        sum_exp_z = tl.sum(tl.load(sum_exp_z_ptr + at, mask=ok, other=0.0) * scale, axis=0)
        tl.store(entropy_ptr + rows, lse - sum_exp_z / sum_exp, mask=row_ok)


def num_vocab_splits(num_tokens: int, vocab: int, cfg: KernelConfig, device: torch.device) -> int:
    """Enough vocabulary splits that token tiles x splits fill the GPU about twice over."""
    token_tiles = triton.cdiv(num_tokens, cfg.block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, token_tiles), triton.cdiv(vocab, cfg.block_v), cfg.max_splits))


def logprob_forward(hidden, weight, bias, targets, temperature, return_entropy=False, cfg: KernelConfig = None):
    """hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) int -> logp, lse, entropy-or-None (N,) fp32.

    ``hidden`` and ``weight`` share one dtype (fp32, bf16, fp16) and have unit stride along H.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    if N == 0:
        return torch.empty(0, **f32), torch.empty(0, **f32), torch.empty(0, **f32) if return_entropy else None
    cfg = cfg or forward_config(hidden.device, hidden.dtype)
    splits = num_vocab_splits(N, V, cfg, hidden.device)
    vocab_per_split = triton.cdiv(triton.cdiv(V, splits), cfg.block_v) * cfg.block_v
    splits = triton.cdiv(V, vocab_per_split)  # no empty split
    partial_max, partial_sum, partial_target = (torch.empty(splits, N, **f32) for _ in range(3))
    partial_sum_z = torch.empty(splits, N, **f32) if return_entropy else partial_sum
    grid = (triton.cdiv(N, cfg.block_n), splits)
    _logprob_partials_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets,
        partial_max, partial_sum, partial_sum_z, partial_target,
        N, V, H, hidden.stride(0), weight.stride(0), vocab_per_split, 1.0 / temperature,
        HAS_BIAS=bias is not None, WITH_ENTROPY=return_entropy, PRECISION=dot_precision(hidden.dtype),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    entropy = torch.empty(N, **f32) if return_entropy else None
    _logprob_combine_kernel[(triton.cdiv(N, COMBINE_BLOCK),)](
        partial_max, partial_sum, partial_sum_z, partial_target, logp, lse, entropy if return_entropy else lse,
        N, splits, WITH_ENTROPY=return_entropy, BLOCK_N=COMBINE_BLOCK,
        BLOCK_S=max(2, triton.next_power_of_2(splits)),
    )
    return logp, lse, entropy

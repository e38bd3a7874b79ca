"""Row pass: one fused pass over a chunk of fp32 logits ``z = h_c W^T`` (a vendor GEMM's output) that yields the
log-prob, log-sum-exp and entropy of every row and writes ``D = onehot(y) - softmax(z)`` over the logits, in place.

For row r (a token) with target ``y_r``, bias ``b`` and temperature ``T``, in fp32::

    z      = (logits[r] + b) / T                                           (V,)
    lse    = log sum_v exp(z_v)                  (or lse_in[r] when given: a recomputed or vocabulary-sharded
                                                  forward's global log-sum-exp)
    logp   = z_y - lse                           z_y := 0 when y is outside [0, V) (another shard, padding)
    entropy = -sum_v p_v (z_v - lse),  p = exp(z - lse)     (= lse - sum_v softmax(z)_v z_v; with a shard's lse_in,
                                                  that shard's part of the global entropy: shards add up)
    D      = onehot(y) - exp(z - lse)            no one-hot term when y is outside [0, V)

``D`` is neither scaled by ``g = dL/dlogp`` nor by ``1 / T``: the caller scales rows (``d_hidden = (g / T) D W``,
``d_weight += D^T ((g / T) h_c)``). Rows with ``row_mask`` False are not read: logp = lse = entropy = 0 and their
row of ``D`` is zeros, so the garbage logits of padding never reach a gradient. A NaN or +inf logit makes its row's
lse and logp NaN (or inf), and so its ``D``: never a finite log-prob next to a NaN gradient.

Shapes: logits (C, V) fp32 with unit column stride and row stride S >= V elements; bias (V,); targets, row_mask,
lse_in and the outputs (C,). ``D`` (C, V) in ``grad_dtype`` lands on the bytes of the logits: row r of ``D`` starts
where row r of the logits starts, so its row stride is ``4 S / itemsize`` elements, a strided view that torch.mm
hands to cuBLAS as is (lda = 4 S / itemsize >= V).

One program owns a row (deterministic: every sum runs in a fixed order, no atomics). Bytes moved per logit
(g = itemsize of ``grad_dtype``, 0 without a gradient; the bias, V values shared by all rows, stays in L2):

    V <= single_block (RowPassConfig), no lse_in:   4 + g       the row is read once, held in registers
    V >  single_block, no lse_in:                   4 + 4 + g   online max / sum exp / entropy sum, then the write
                                                    4           (no gradient: the one online pass)
    lse_in given:                                   4 + g       the write pass only (4 for the entropy alone,
                                                                0 for neither: only the target logit is read)

In place without races: the store of column block [c0, c0 + B) writes bytes ``[4 S r + g c0, 4 S r + g (c0 + B))``,
which lie in fp32 columns < c0 + B because g <= 4. Blocks are walked in increasing column order and each block's
load precedes its store, so every fp32 column a store overwrites has been loaded already (in this block or an
earlier one) and is never read again; rows are disjoint. On a GPU the threads of a program do not run in lockstep,
so a barrier separates each block's loads (all threads) from its stores: a thread that runs ahead cannot overwrite
a column that a lagging thread has yet to load. Prefetching later blocks early stays safe (they start at c0 + B).
The target logit is loaded before the first barrier. ``tests/test_row_pass_kernels.py`` checks the result in place
(walking the blocks in decreasing order instead fails it).

Equivalent PyTorch::

    z = (logits[:, :V].double() + bias) / T
    lse = z.logsumexp(-1); p = (z - lse[:, None]).exp()
    hit = (y >= 0) & (y < V)
    logp = torch.where(hit, z.gather(-1, y.clamp(0, V - 1)[:, None])[:, 0], 0) - lse
    entropy = -(p * (z - lse[:, None])).sum(-1)
    D = F.one_hot(y.clamp(0, V - 1), V) * hit[:, None] - p       # written over the logits in grad_dtype
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import RowPassConfig, row_pass_config

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _scaled_logits(logits_row, bias_ptr, cols, ok, inv_temperature, HAS_BIAS: tl.constexpr):
    """z = (logits + bias) / T on the columns ``ok``, -inf elsewhere (no probability, no read)."""
    z = tl.load(logits_row + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, z * inv_temperature, float("-inf"))


@triton.jit
def _store_grad(grad_row, cols, V, n_read, p, y_hot):
    """D = onehot(y) - p over one column block (zeros on an inactive row, whose n_read is 0), after a barrier:
    every thread of the program has loaded this block before any thread overwrites it (module docstring)."""
    d = tl.where(cols < n_read, tl.where(cols == y_hot, 1.0, 0.0) - p, 0.0)
    tl.debug_barrier()
    tl.store(grad_row + cols, d.to(grad_row.dtype.element_ty), mask=cols < V)


@triton.jit
def _online_stats(logits_row, bias_ptr, n_cols, inv_temperature, HAS_BIAS: tl.constexpr, WANT_ENTROPY: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """lse and entropy of columns [0, n_cols) in one read. Each lane keeps its own running max m,
    s = sum exp(z - m) and w = sum exp(z - m) (z - m) (one exp a logit: exp(-|z - m|) rescales whichever side is
    smaller); the lanes are merged once at the end, and entropy = log s - w / s (relative to the max, so no
    cancellation of two lse-sized terms)."""
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    w = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _scaled_logits(logits_row, bias_ptr, cols, cols < n_cols, inv_temperature, HAS_BIAS)
        up = z > m  # False for a NaN z, which then turns s into NaN below
        e = tl.exp(-tl.abs(z - m))
        counts = z != float("-inf")  # a -inf logit adds nothing (and -inf - -inf must not make a NaN)
        s_new = tl.where(up, s * e + 1.0, s + tl.where(counts, e, 0.0))
        if WANT_ENTROPY:  # on a new max: w' = e (w + s (m - z)); an empty lane (m = -inf) has s = w = 0
            shift = tl.where(m == float("-inf"), 0.0, m - z)
            w = tl.where(up, e * (w + s * shift), w + tl.where(counts, e * (z - m), 0.0))
        s = s_new
        m = tl.where(up, z, m)
    top = tl.max(m, axis=0)
    empty = m == float("-inf")
    scale = tl.exp(m - tl.where(top == float("-inf"), 0.0, top))  # 0 for empty lanes; NaN for a +inf row
    total = tl.sum(s * scale, axis=0)
    lse = top + tl.log(total)
    entropy = tl.log(total) - tl.sum(tl.where(empty, 0.0, scale * (w + s * (m - top))), axis=0) / total
    return lse, entropy


@triton.jit
def _write_pass(logits_row, bias_ptr, grad_row, V, n_read, lse, y_hot, inv_temperature, HAS_BIAS: tl.constexpr,
                WANT_ENTROPY: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Walks the row in increasing column blocks: p = exp(z - lse), D written over the logits, and returns
    -sum_v p_v (z_v - lse) (when WANT_ENTROPY). Columns from n_read on are not read (an inactive row has
    n_read = 0: it reads nothing and gets zeros)."""
    u = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _scaled_logits(logits_row, bias_ptr, cols, cols < n_read, inv_temperature, HAS_BIAS)
        p = tl.exp(z - lse)
        if WANT_ENTROPY:
            u -= tl.where(z != float("-inf"), p * (z - lse), 0.0)
        if WRITE_GRAD:
            _store_grad(grad_row, cols, V, n_read, p, y_hot)
    return tl.sum(u, axis=0)


@triton.jit
def _row_pass_kernel(
    logits_ptr, bias_ptr, targets_ptr, row_mask_ptr, lse_in_ptr, logp_ptr, lse_ptr, entropy_ptr, grad_ptr,
    V, stride_row, stride_grad, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LSE: tl.constexpr, WANT_ENTROPY: tl.constexpr,
    WRITE_GRAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # rows * stride may pass 2^31
    logits_row = logits_ptr + row * stride_row
    grad_row = grad_ptr + row * stride_grad
    if HAS_MASK:
        active = tl.load(row_mask_ptr + row).to(tl.int32) != 0
    else:
        active = tl.full((), 1, tl.int1)
    n_read = tl.where(active, V, 0)  # columns read: none on an inactive row
    y = tl.load(targets_ptr + row).to(tl.int64)
    hit = (y >= 0) & (y < n_read)
    y_hot = tl.where(hit, y, -1)
    # The target logit is loaded before the first barrier, so before any thread overwrites its bytes.
    z_y = tl.load(logits_row + y, mask=hit, other=0.0)
    if HAS_BIAS:
        z_y += tl.load(bias_ptr + y, mask=hit, other=0.0).to(tl.float32)
    z_y *= inv_temperature
    entropy = tl.zeros((), tl.float32)
    if HAS_LSE:
        lse = tl.load(lse_in_ptr + row, mask=active, other=0.0)
        if WANT_ENTROPY or WRITE_GRAD:
            entropy = _write_pass(logits_row, bias_ptr, grad_row, V, n_read, lse, y_hot, inv_temperature,
                                  HAS_BIAS, WANT_ENTROPY, WRITE_GRAD, BLOCK_V)
    elif SINGLE:  # the whole row in registers: read once
        cols = tl.arange(0, BLOCK_V)
        z = _scaled_logits(logits_row, bias_ptr, cols, cols < n_read, inv_temperature, HAS_BIAS)
        top = tl.max(z, axis=0)
        p = tl.exp(z - tl.where(top == float("-inf"), 0.0, top))  # a NaN z gives a NaN p, hence a NaN sum
        total = tl.sum(p, axis=0)
        lse = top + tl.log(total)
        inv_total = 1.0 / total
        if WANT_ENTROPY:  # log s - sum p (z - max) / s: terms relative to the max, no cancellation of lse-sized ones
            sum_pz = tl.sum(tl.where(z != float("-inf"), p * (z - top), 0.0), axis=0)
            entropy = tl.log(total) - sum_pz * inv_total
        if WRITE_GRAD:  # the reductions above already order all loads before this store; the barrier is explicit
            _store_grad(grad_row, cols, V, n_read, p * inv_total, y_hot)
    else:  # two passes: online statistics, then the write
        lse, entropy = _online_stats(logits_row, bias_ptr, n_read, inv_temperature, HAS_BIAS, WANT_ENTROPY, BLOCK_V)
        lse = tl.where(active, lse, 0.0)
        if WRITE_GRAD:
            _write_pass(logits_row, bias_ptr, grad_row, V, n_read, lse, y_hot, inv_temperature, HAS_BIAS,
                        False, True, BLOCK_V)
    tl.store(logp_ptr + row, tl.where(active, z_y - lse, 0.0))
    if not HAS_LSE:
        tl.store(lse_ptr + row, tl.where(active, lse, 0.0))
    if WANT_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(active, entropy, 0.0))


def grad_view(logits: torch.Tensor, grad_dtype: torch.dtype) -> torch.Tensor:
    """The (C, V) view in ``grad_dtype`` whose row r starts at the byte where row r of ``logits`` starts (row
    stride ``4 S / itemsize``): fp32 is ``logits`` itself, 2-byte dtypes reinterpret each row's bytes."""
    if grad_dtype == torch.float32:
        return logits
    return logits.view(grad_dtype)[:, : logits.shape[1]]


def single_block_launch(V: int, cfg: RowPassConfig) -> tuple[int, int]:
    """(columns, warps) of a program holding a row of V <= cfg.single_block columns: the next power of two, and
    warps keeping the floats per thread of the full-size block."""
    block = triton.next_power_of_2(V)
    per_warp = cfg.single_block // cfg.single_warps
    return block, max(1, min(cfg.single_warps, block // per_warp))


def row_pass(logits, bias, targets, row_mask, inv_temperature, lse_in, grad_dtype, want_entropy,
             cfg: RowPassConfig = None):
    """logits (C, V) fp32 (unit column stride, row stride S >= V) -> (logp, lse, entropy or None, D or None).

    bias (V,) fp32/bf16/fp16 or None; targets (C,) int64 or int32; row_mask (C,) bool or None (all rows);
    lse_in (C,) fp32 or None (then returned as lse); grad_dtype None (no gradient) or fp32/bf16/fp16: D is written
    over the logits and returned as the strided view ``grad_view(logits, grad_dtype)``. ``cfg`` overrides the tiles.
    """
    C, V = logits.shape
    if logits.dtype != torch.float32 or (V > 1 and logits.stride(1) != 1):
        raise ValueError("row_pass: logits must be float32 with unit column stride")
    if V < 1 or (C > 1 and logits.stride(0) < V):
        raise ValueError("row_pass: logits need V >= 1 columns and a row stride >= V")
    if grad_dtype is not None and grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"row_pass: grad_dtype must be one of {GRAD_DTYPES} or None, got {grad_dtype}")
    if bias is not None and (bias.numel() != V or not bias.is_contiguous()):
        raise ValueError("row_pass: bias must be a contiguous (V,) tensor")
    if targets.shape != (C,) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError("row_pass: targets must be (C,) int64 or int32")
    if row_mask is not None and (row_mask.shape != (C,) or row_mask.dtype != torch.bool):
        raise ValueError("row_pass: row_mask must be (C,) bool")
    if lse_in is not None and (lse_in.shape != (C,) or lse_in.dtype != torch.float32):
        raise ValueError("row_pass: lse_in must be (C,) float32")
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp = torch.empty(C, **f32)
    lse = lse_in if lse_in is not None else torch.empty(C, **f32)
    entropy = torch.empty(C, **f32) if want_entropy else None
    grad = grad_view(logits, grad_dtype) if grad_dtype is not None else None
    if C == 0:
        return logp, lse, entropy, grad
    cfg = cfg or row_pass_config(logits.device, grad_dtype)
    single = lse_in is None and V <= cfg.single_block
    block, warps = single_block_launch(V, cfg) if single else (cfg.block_v, cfg.num_warps)
    _row_pass_kernel[(C,)](
        logits, bias if bias is not None else logits, targets.contiguous(),
        row_mask.contiguous() if row_mask is not None else targets,
        lse_in.contiguous() if lse_in is not None else logp, logp, lse, entropy if want_entropy else logp,
        grad if grad is not None else logits,
        V, logits.stride(0), grad.stride(0) if grad is not None else 0, float(inv_temperature),
        HAS_BIAS=bias is not None, HAS_MASK=row_mask is not None, HAS_LSE=lse_in is not None,
        WANT_ENTROPY=bool(want_entropy), WRITE_GRAD=grad is not None, SINGLE=single, BLOCK_V=block,
        num_warps=warps, num_stages=1,
    )
    return logp, lse, entropy, grad

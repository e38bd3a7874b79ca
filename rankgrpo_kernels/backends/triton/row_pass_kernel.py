"""Row pass and gradient pass: fused passes over a chunk of fp32 logits ``acc = h_c W^T`` (a vendor GEMM's output).
The row pass yields the log-prob, log-sum-exp and entropy of every row and writes ``D = (onehot(y) - softmax(z))
S'(u)`` over the logits, in place; the gradient pass writes the full ``dL/dz S'(u)`` of a loss with an entropy term
over logits left untouched by a statistics-only row pass.

For row r (a token) with target ``y_r``, bias ``b``, logit scale ``s``, softcap ``c`` and temperature ``T``, in
fp32::

    u      = s (logits[r] + b)                                             (V,)
    z      = S(u) / T,  S(u) = c tanh(u / c)  (softcap given), else u      (TRL's order: scale, softcap, temperature)
    lse    = log sum_v exp(z_v)                  (or lse_in[r] when given: a recomputed or vocabulary-sharded
                                                  forward's global log-sum-exp)
    logp   = z_y - lse                           z_y := 0 when y is outside [0, V) (another shard, padding)
    entropy = -sum_v p_v (z_v - lse),  p = exp(z - lse)     (= lse - sum_v softmax(z)_v z_v; with a shard's lse_in,
                                                  that shard's part of the global entropy: shards add up)
    D      = (onehot(y) - p) S'(u) k             no one-hot term when y is outside [0, V);
                                                 S'(u) = 1 - tanh(u / c)^2 with a softcap, 1 without;
                                                 k = grad_scale, +- a power of two (the head's -1; -2^15 for
                                                 fp16 D, whose probabilities below 6e-5 would be subnormal)

``D`` is neither scaled by ``g = dL/dlogp`` nor by ``s / T``: the caller scales rows (``d_hidden = (g s / (T k)) D
W``, ``d_weight += D^T ((g s / (T k)) h_c)``), so that ``dz / d acc = s S'(u) / T`` is complete. Without a softcap
the two scales fold into one multiply, ``z = (logits + b) (s / T)``: for ``s = 1`` bit-identical to the plain row
pass.
The gradient pass, given per-row ``lse``, entropy ``H``, ``g = dL/dlogp`` and ``e = dL/dH``, writes::

    D' = [ g (onehot(y) - p) - e p (z - lse + H) ] S'(u)     (dH/dz = -p (log p + H), log p = z - lse)

and the caller scales rows by ``s / T`` only. Rows with g = e = 0 are zeros. A NaN or +inf logit makes its row's
lse and logp NaN (or inf), and so its ``D`` / ``D'``: never a finite log-prob next to a NaN gradient. A -inf logit
(a -inf bias: a vocabulary entry ruled out) has p = 0 without a softcap; with one, ``S(-inf) = -c`` as the formula
says (p = exp(-c / T - lse) > 0, but S' = 0: a zero gradient).

Instruction issue, not only bytes, bounds these passes (with a softcap, tanh and S' cost more than the load): the
kernels work in base 2 (the scales carry 1 / ln 2, so ``p = exp2(z2 - lse2)`` with no multiply; exp2 flushes below
2^-126 without denormal fix-ups), tanh is ``(1 - q) r`` and ``S' = 4 q r^2`` with ``q = exp(-2 |x|)`` and one
approximate reciprocal ``r = 1 / (1 + q)`` (no overflow for any x, no cancellation of ``1 - tanh^2`` near
|tanh| = 1; a minimax odd polynomial below |x| = 1/4, where ``1 - q`` would cancel), the online statistics rescale
once per group of 4 adjacent columns, and the column blocks write D without its one-hot term (no per-logit
compare): one program then rewrites the target's entry. ``tests/backends/issue_slots.py`` counts the issue slots
per logit of every loop in the sm_90a SASS; ``test_triton_aot.py`` bounds them.

Shapes: logits (C, V) fp32 with unit column stride and row stride S >= V elements; bias (V,); targets, lse_in,
lse, entropy, g, e and the outputs (C,). ``D`` (C, V) in ``grad_dtype`` lands on the bytes of the logits: row r of
``D`` starts where row r of the logits starts, so its row stride is ``4 S / itemsize`` elements, a strided view that
torch.mm hands to cuBLAS as is (lda = 4 S / itemsize >= V).

One program owns a row (deterministic: every sum runs in a fixed order, no atomics). Bytes moved per logit
(g = itemsize of ``grad_dtype``, 0 without a gradient; the bias, V values shared by all rows, stays in L2):

    row pass, V <= single block, no lse_in:    4 + g       the row is read once, held in registers (the single
                                                           block is RowPassConfig.single_block, or its
                                                           softcap_single_block with a softcap: S' is held too)
    row pass, longer rows, no lse_in:          4 + 4 + g   online max / sum exp / entropy sum, then the write
                                               4           (no gradient: the one online pass)
    row pass, lse_in given:                    4 + g       the write pass only (4 for the entropy alone,
                                                           0 for neither: only the target logit is read)
    gradient pass:                             4 + g       the same write pass

In place without races: the store of column block [c0, c0 + B) writes bytes ``[4 S r + g c0, 4 S r + g (c0 + B))``,
which lie in fp32 columns < c0 + B because g <= 4. Blocks are walked in increasing column order and each block's
load precedes its store, so every fp32 column a store overwrites has been loaded already (in this block or an
earlier one) and is never read again; rows are disjoint. On a GPU the threads of a program do not run in lockstep,
so a barrier separates each block's loads (all threads) from its stores: a thread that runs ahead cannot overwrite
a column that a lagging thread has yet to load. Prefetching later blocks early stays safe (they start at c0 + B).
The target logit is loaded before the first barrier; the target's entry, written by its block without the one-hot
term, is rewritten with it after a last barrier (every thread's stores of the row done).
``tests/backends/test_row_pass_kernels.py`` checks the result in place (walking the blocks in decreasing order
instead fails it).

Equivalent PyTorch::

    u = s * (logits[:, :V].double() + bias)
    z = (c * torch.tanh(u / c) if c is not None else u) / T;  slope = 1 - torch.tanh(u / c) ** 2  (or 1)
    lse = z.logsumexp(-1); p = (z - lse[:, None]).exp()
    hit = (y >= 0) & (y < V)
    logp = torch.where(hit, z.gather(-1, y.clamp(0, V - 1)[:, None])[:, 0], 0) - lse
    entropy = -(p * (z - lse[:, None])).sum(-1)
    onehot = F.one_hot(y.clamp(0, V - 1), V) * hit[:, None]
    D = (onehot - p) * slope * grad_scale                                 # row pass, over the logits in grad_dtype
    D_ = (g[:, None] * (onehot - p) - e[:, None] * p * (z - lse[:, None] + H[:, None])) * slope   # gradient pass
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .tiles import RowPassConfig, row_pass_config

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LN2 = tl.constexpr(math.log(2.0))
LOG2E = tl.constexpr(1.0 / math.log(2.0))
# A floor for log2 p in a product with p: p = exp2(log2 p) is already 0 below -150 (exp2 flushes below 2^-126), and
# the floor keeps 0 * -inf (a -inf logit) out of the sums without a compare and select.
LOG2_FLOOR = tl.constexpr(-1000.0)
# Adjacent columns a group of the statistics walk: one thread's 16-byte load of fp32 logits, so that the group's
# max and sums stay within a thread.
GROUP = tl.constexpr(4)


@triton.jit
def _tanh_and_slope(x):
    """tanh(x) and 1 - tanh(x)^2 in fp32, accurate for every x (inf: +-1 and 0; NaN: NaN). With q = exp(-2 |x|)
    and one reciprocal r = 1 / (1 + q): |tanh| = (1 - q) r and 1 - tanh^2 = 4 q r^2 (no overflow, no cancellation
    near |tanh| = 1); below |x| = 1/4, where 1 - q would cancel, |tanh| = a + a^3 P(a^2), P minimax of degree 2
    (error < 3e-9 relative). exp2 flushes q below 2^-126 to 0 (no denormal fix-up): a slope of 0 past |x| ~ 44,
    where 4 q is below 1e-36 anyway."""
    a = tl.abs(x)
    q = tl.exp2(-2.8853900817779268 * a)  # in [0, 1]
    r = tl.math.fdiv(1.0, 1.0 + q, approx=True)  # 1 + q in [1, 2]: within the approximate division's range
    u = a * a
    series = a + (a * u) * (-0.33333240089291255 + u * (0.13324236695155903 + u * -0.051430037207871725))
    t = tl.where(a < 0.25, series, (1.0 - q) * r)  # a NaN fails a < 0.25: NaN
    # x's sign bit onto |tanh| (one bitwise op; tanh(-0) = -0)
    t = (t.to(tl.int32, bitcast=True) | (x.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32, bitcast=True)
    return t, (4.0 * q) * r * r


@triton.jit
def _logits(logits_row, bias_ptr, cols, ok, in_scale, out_scale, HAS_BIAS: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    """z / ln 2 = S(s (logits + b)) / (T ln 2) on the columns ``ok`` (MASKED, a row's last block: -inf elsewhere, no
    probability, no read; the full blocks before it read every column unmasked), and S'(u) (only with a softcap: the
    callers use it under HAS_SOFTCAP). Without a softcap in_scale = s / (T ln 2); with one in_scale = s / c and
    out_scale = c / (T ln 2) (``transform_scales``)."""
    x = tl.load(logits_row + cols, mask=ok if MASKED else None, other=0.0 if MASKED else None)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=ok if MASKED else None, other=0.0 if MASKED else None).to(tl.float32)
    x *= in_scale
    slope = x
    if HAS_SOFTCAP:
        t, slope = _tanh_and_slope(x)
        x = t * out_scale
    if MASKED:
        x = tl.where(ok, x, float("-inf"))
    return x, slope


@triton.jit
def _gradient(p, log2_p, slope, g, e, h, GRAD_PASS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HOT: tl.constexpr):
    """D = g (onehot(y) - p) (the row pass: g is D's scale), or D' = g (onehot(y) - p) - e p (log p + H) =
    g onehot(y) - p (g + e H + e ln 2 log2 p) (GRAD_PASS; a -inf z has p = 0 and adds nothing), times S'(u) with a
    softcap; onehot(y) = 1 for HOT (the target's column, ``_target_gradient``), 0 otherwise (the column blocks)."""
    if GRAD_PASS:
        d = -p * ((g + e * h) + (e * LN2) * tl.maximum(log2_p, LOG2_FLOOR))
    else:
        d = -p * g
    if HOT:
        d += g
    if HAS_SOFTCAP:
        d *= slope
    return d


@triton.jit
def _store_grad(grad_row, cols, V, d, MASKED: tl.constexpr = True):
    """Stores one column block of the gradient after a barrier: every thread of the program has loaded this block
    before any thread overwrites it (module docstring). Not MASKED: a full block."""
    tl.debug_barrier()
    tl.store(grad_row + cols, d.to(grad_row.dtype.element_ty), mask=cols < V if MASKED else None)


@triton.jit
def _stats_block(logits_row, bias_ptr, cols, V, m, s, w, in_scale, out_scale, HAS_BIAS: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr, MASKED: tl.constexpr):
    """One block of ``_online_stats``: (m, s, w) of each group slot updated by the block's columns ``cols``
    (slots x GROUP)."""
    z, _ = _logits(logits_row, bias_ptr, cols, cols < V, in_scale, out_scale, HAS_BIAS, HAS_SOFTCAP, MASKED)
    m_new = tl.maximum(m, tl.max(z, axis=1))  # a NaN z turns s into NaN below (2^(NaN - base))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)  # an empty slot stays empty: 2^(-inf - 0) = 0
    rescale = tl.exp2(m - base)
    d = z - base[:, None]
    e = tl.exp2(d)
    if WANT_ENTROPY:  # relative to the new max: w' = 2^(m - m') (w + s (m - m')); the floor keeps 0 * -inf out
        if HAS_SOFTCAP and not MASKED:
            d_w = d  # S(u) is finite (+-c at +-inf): no -inf logit outside the masked columns
        else:
            d_w = tl.maximum(d, LOG2_FLOOR)
        w = rescale * (w + s * tl.maximum(m - base, LOG2_FLOOR)) + tl.sum(e * d_w, axis=1)
    s = s * rescale + tl.sum(e, axis=1)
    return m_new, s, w


@triton.jit
def _online_stats(logits_row, bias_ptr, V, in_scale, out_scale, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  WANT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """lse / ln 2 and the entropy of the row in one read, in base 2 (z2 = z / ln 2). A block is walked as groups of
    GROUP adjacent columns (one thread's vector load); each group slot keeps a running max m, s = sum 2^(z2 - m)
    and w = sum 2^(z2 - m) (z2 - m), rescaled once a group by 2^(m - m') to the group's new max m' (one exp2 a
    logit, and one a group); the slots are merged once at the end, and entropy = ln 2 (log2 s - w / s) (relative to
    the max, so no cancellation of two lse-sized terms). Full blocks unmasked, then the row's last partial block."""
    block = tl.arange(0, BLOCK_V // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    m = tl.full((BLOCK_V // GROUP,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V // GROUP,), tl.float32)
    w = tl.zeros((BLOCK_V // GROUP,), tl.float32)
    full = V // BLOCK_V * BLOCK_V
    for v0 in range(0, full, BLOCK_V):
        m, s, w = _stats_block(logits_row, bias_ptr, v0 + block, V, m, s, w, in_scale, out_scale, HAS_BIAS,
                               HAS_SOFTCAP, WANT_ENTROPY, False)
    if full < V:
        m, s, w = _stats_block(logits_row, bias_ptr, full + block, V, m, s, w, in_scale, out_scale, HAS_BIAS,
                               HAS_SOFTCAP, WANT_ENTROPY, True)
    top = tl.max(m, axis=0)
    empty = m == float("-inf")
    scale = tl.exp2(m - tl.where(top == float("-inf"), 0.0, top))  # 0 for empty slots; NaN for a +inf row
    total = tl.sum(s * scale, axis=0)
    lse2 = top + tl.log2(total)
    entropy = LN2 * (tl.log2(total) - tl.sum(tl.where(empty, 0.0, scale * (w + s * (m - top))), axis=0) / total)
    return lse2, entropy


@triton.jit
def _write_block(logits_row, bias_ptr, grad_row, cols, V, lse2, in_scale, out_scale, g, e, h, u,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr,
                 WRITE_GRAD: tl.constexpr, GRAD_PASS: tl.constexpr, MASKED: tl.constexpr):
    """One block of ``_write_pass``: p = 2^(z2 - lse2), -p log2 p added to ``u`` (WANT_ENTROPY), the gradient
    without its one-hot term stored (WRITE_GRAD)."""
    z, slope = _logits(logits_row, bias_ptr, cols, cols < V, in_scale, out_scale, HAS_BIAS, HAS_SOFTCAP, MASKED)
    log2_p = z - lse2
    p = tl.exp2(log2_p)
    if WANT_ENTROPY:
        u -= p * tl.maximum(log2_p, LOG2_FLOOR)
    if WRITE_GRAD:
        _store_grad(grad_row, cols, V, _gradient(p, log2_p, slope, g, e, h, GRAD_PASS, HAS_SOFTCAP, False), MASKED)
    return u


@triton.jit
def _write_pass(logits_row, bias_ptr, grad_row, V, lse2, in_scale, out_scale, g, e, h, HAS_BIAS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr, WRITE_GRAD: tl.constexpr,
                GRAD_PASS: tl.constexpr, BLOCK_V: tl.constexpr):
    """The one write pass (the row pass's with a given or reduced lse2 = lse / ln 2 and g = D's scale: e, h unused;
    the gradient pass's with GRAD_PASS): walks the row in increasing column blocks (full blocks unmasked, then the
    last partial one), p = 2^(z2 - lse2), the gradient without its one-hot term written over the logits
    (``_target_gradient`` adds it), and returns -sum_v p_v (z_v - lse) (when WANT_ENTROPY)."""
    block = tl.arange(0, BLOCK_V)
    u = tl.zeros((BLOCK_V,), tl.float32)
    full = V // BLOCK_V * BLOCK_V
    for v0 in range(0, full, BLOCK_V):
        u = _write_block(logits_row, bias_ptr, grad_row, v0 + block, V, lse2, in_scale, out_scale, g, e, h, u,
                         HAS_BIAS, HAS_SOFTCAP, WANT_ENTROPY, WRITE_GRAD, GRAD_PASS, False)
    if full < V:
        u = _write_block(logits_row, bias_ptr, grad_row, full + block, V, lse2, in_scale, out_scale, g, e, h, u,
                         HAS_BIAS, HAS_SOFTCAP, WANT_ENTROPY, WRITE_GRAD, GRAD_PASS, True)
    return LN2 * tl.sum(u, axis=0)


@triton.jit
def _target(logits_row, bias_ptr, targets_ptr, row, V, in_scale, out_scale, HAS_BIAS: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr):
    """The row's target column (int32, as V; -1 when outside [0, V): no one-hot term), whether it is inside, its
    z / ln 2 (0 off-vocab: S(0) = 0) and S'(u). Loaded before the first barrier, so before any thread overwrites
    the target's bytes."""
    y = tl.load(targets_ptr + row).to(tl.int64)
    hit = (y >= 0) & (y < V)
    y_hot = tl.where(hit, y, -1).to(tl.int32)
    z_y = tl.load(logits_row + y_hot, mask=hit, other=0.0)
    if HAS_BIAS:
        z_y += tl.load(bias_ptr + y_hot, mask=hit, other=0.0).to(tl.float32)
    z_y *= in_scale
    slope_y = z_y
    if HAS_SOFTCAP:
        t, slope_y = _tanh_and_slope(z_y)
        z_y = t * out_scale
    return y_hot, hit, z_y, slope_y


@triton.jit
def _target_gradient(grad_row, y_hot, hit, z_y, slope_y, lse2, g, e, h, GRAD_PASS: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr):
    """The target's gradient with its one-hot term, over the value its column block wrote without it: after a
    barrier, so after every thread's stores of the row."""
    tl.debug_barrier()
    d = _gradient(tl.exp2(z_y - lse2), z_y - lse2, slope_y, g, e, h, GRAD_PASS, HAS_SOFTCAP, True)
    tl.store(grad_row + y_hot, d.to(grad_row.dtype.element_ty), mask=hit)


@triton.jit
def _row_pass_kernel(
    logits_ptr, bias_ptr, targets_ptr, lse_in_ptr, logp_ptr, lse_ptr, entropy_ptr, grad_ptr,
    V, stride_row, stride_grad, in_scale, out_scale, grad_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LSE: tl.constexpr, WANT_ENTROPY: tl.constexpr,
    WRITE_GRAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # rows * stride may pass 2^31
    logits_row = logits_ptr + row * stride_row
    grad_row = grad_ptr + row * stride_grad
    y_hot, hit, z_y, slope_y = _target(logits_row, bias_ptr, targets_ptr, row, V, in_scale, out_scale, HAS_BIAS,
                                       HAS_SOFTCAP)
    entropy = tl.zeros((), tl.float32)
    if HAS_LSE:
        lse2 = tl.load(lse_in_ptr + row) * LOG2E
        if WANT_ENTROPY or WRITE_GRAD:
            entropy = _write_pass(logits_row, bias_ptr, grad_row, V, lse2, in_scale, out_scale, grad_scale, 0.0, 0.0,
                                  HAS_BIAS, HAS_SOFTCAP, WANT_ENTROPY, WRITE_GRAD, False, BLOCK_V)
    elif SINGLE:  # the whole row in registers: read once
        cols = tl.arange(0, BLOCK_V)
        z, slope = _logits(logits_row, bias_ptr, cols, cols < V, in_scale, out_scale, HAS_BIAS, HAS_SOFTCAP, True)
        top = tl.max(z, axis=0)
        p = tl.exp2(z - tl.where(top == float("-inf"), 0.0, top))  # a NaN z gives a NaN p, hence a NaN sum
        total = tl.sum(p, axis=0)
        lse2 = top + tl.log2(total)
        inv_total = 1.0 / total
        if WANT_ENTROPY:  # log s - sum p (z - max) / s: terms relative to the max, no cancellation of lse-sized ones
            sum_pz = tl.sum(p * tl.maximum(z - top, LOG2_FLOOR), axis=0)
            entropy = LN2 * (tl.log2(total) - sum_pz * inv_total)
        if WRITE_GRAD:  # the reductions above already order all loads before this store; the barrier is explicit
            # p = 2^(z2 - max) / s: 1 / s folded into D's scale
            _store_grad(grad_row, cols, V, _gradient(p, z, slope, grad_scale * inv_total, 0.0, 0.0, False,
                                                     HAS_SOFTCAP, False))
    else:  # two passes: online statistics, then the write
        lse2, entropy = _online_stats(logits_row, bias_ptr, V, in_scale, out_scale, HAS_BIAS, HAS_SOFTCAP,
                                      WANT_ENTROPY, BLOCK_V)
        if WRITE_GRAD:
            _write_pass(logits_row, bias_ptr, grad_row, V, lse2, in_scale, out_scale, grad_scale, 0.0, 0.0,
                        HAS_BIAS, HAS_SOFTCAP, False, True, False, BLOCK_V)
    if WRITE_GRAD:
        _target_gradient(grad_row, y_hot, hit, z_y, slope_y, lse2, grad_scale, 0.0, 0.0, False, HAS_SOFTCAP)
    tl.store(logp_ptr + row, (z_y - lse2) * LN2)
    if not HAS_LSE:
        tl.store(lse_ptr + row, lse2 * LN2)
    if WANT_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def _grad_pass_kernel(
    logits_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, g_ptr, e_ptr, grad_ptr,
    V, stride_row, stride_grad, in_scale, out_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_row
    grad_row = grad_ptr + row * stride_grad
    y_hot, hit, z_y, slope_y = _target(logits_row, bias_ptr, targets_ptr, row, V, in_scale, out_scale, HAS_BIAS,
                                       HAS_SOFTCAP)
    lse2, h = tl.load(lse_ptr + row) * LOG2E, tl.load(entropy_ptr + row)
    g, e = tl.load(g_ptr + row), tl.load(e_ptr + row)
    _write_pass(logits_row, bias_ptr, grad_row, V, lse2, in_scale, out_scale, g, e, h, HAS_BIAS, HAS_SOFTCAP, False,
                True, True, BLOCK_V)
    _target_gradient(grad_row, y_hot, hit, z_y, slope_y, lse2, g, e, h, True, HAS_SOFTCAP)


def grad_view(logits: torch.Tensor, grad_dtype: torch.dtype) -> torch.Tensor:
    """The (C, V) view in ``grad_dtype`` whose row r starts at the byte where row r of ``logits`` starts (row
    stride ``4 S / itemsize``): fp32 is ``logits`` itself, 2-byte dtypes reinterpret each row's bytes."""
    if grad_dtype == torch.float32:
        return logits
    return logits.view(grad_dtype)[:, : logits.shape[1]]


def single_block_launch(V: int, cfg: RowPassConfig, softcap: bool = False) -> tuple[int, int]:
    """(columns, warps) of a program holding a row of V <= cfg.single_limit(softcap) columns: the next power of
    two, and warps keeping the floats per thread of the full-size block."""
    block = triton.next_power_of_2(V)
    per_warp = cfg.single_limit(softcap) // cfg.single_warps
    return block, max(1, min(cfg.single_warps, block // per_warp))


def transform_scales(inv_temperature: float, logit_scale: float, softcap: float | None) -> tuple[float, float]:
    """(in_scale, out_scale) of the kernels, which work in base 2 (exp2 and log2 of z / ln 2): z / ln 2 =
    x in_scale without a softcap (in_scale = s / (T ln 2); out_scale unused), tanh(x in_scale) out_scale with one
    (s / c, c / (T ln 2)); x = logits + bias. Checks the settings."""
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be finite, got {logit_scale}")
    if softcap is None:
        return logit_scale * inv_temperature * LOG2E.value, 1.0
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite float > 0 or None, got {softcap}")
    return logit_scale / softcap, softcap * inv_temperature * LOG2E.value


def check_grad_scale(name: str, grad_scale: float) -> float:
    """D's scale: a power of two or its negative (so that scaling and its undoing are exact), |k| at most 2^15
    (|D| <= 1 times it stays within fp16's 65504)."""
    mantissa, _ = math.frexp(abs(grad_scale))
    if not (0.0 < abs(grad_scale) <= 2.0**15 and mantissa == 0.5):
        raise ValueError(f"{name}: grad_scale must be +-a power of two, |grad_scale| in (0, 2^15], got {grad_scale}")
    return float(grad_scale)


def _check(name, logits, bias, targets, grad_dtype):
    C, V = logits.shape
    if logits.dtype != torch.float32 or (V > 1 and logits.stride(1) != 1):
        raise ValueError(f"{name}: logits must be float32 with unit column stride")
    if V < 1 or (C > 1 and logits.stride(0) < V):
        raise ValueError(f"{name}: logits need V >= 1 columns and a row stride >= V")
    if grad_dtype is not None and grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"{name}: grad_dtype must be one of {GRAD_DTYPES} or None, got {grad_dtype}")
    if bias is not None and (bias.numel() != V or not bias.is_contiguous()):
        raise ValueError(f"{name}: bias must be a contiguous (V,) tensor")
    if targets.shape != (C,) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: targets must be (C,) int64 or int32")


def _row_vector(name, what, x, C):
    if x.shape != (C,) or x.dtype != torch.float32:
        raise ValueError(f"{name}: {what} must be (C,) float32")
    return x.contiguous()


def row_pass(logits, bias, targets, inv_temperature, lse_in, grad_dtype, compute_entropy, *, logit_scale=1.0,
             softcap=None, grad_scale=1.0, cfg: RowPassConfig = None):
    """logits (C, V) fp32 (unit column stride, row stride S >= V) -> (logp, lse, entropy or None, D or None).

    bias (V,) fp32/bf16/fp16 or None; targets (C,) int64 or int32; lse_in (C,) fp32 or None (then returned as lse);
    grad_dtype None (no gradient) or fp32/bf16/fp16: D times ``grad_scale`` (+- a power of two: fp16's D is written
    scaled, so that probabilities below 6e-5 stay normal) is written over the logits and returned as the strided
    view ``grad_view(logits, grad_dtype)``; logit_scale a float, softcap a float > 0 or None (module docstring).
    ``cfg`` overrides the tiles.
    """
    C, V = logits.shape
    _check("row_pass", logits, bias, targets, grad_dtype)
    grad_scale = check_grad_scale("row_pass", grad_scale)
    in_scale, out_scale = transform_scales(inv_temperature, logit_scale, softcap)
    if lse_in is not None:
        lse_in = _row_vector("row_pass", "lse_in", lse_in, C)
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp = torch.empty(C, **f32)
    lse = lse_in if lse_in is not None else torch.empty(C, **f32)
    entropy = torch.empty(C, **f32) if compute_entropy else None
    grad = grad_view(logits, grad_dtype) if grad_dtype is not None else None
    if C == 0:
        return logp, lse, entropy, grad
    cfg = cfg or row_pass_config(logits.device, grad_dtype)
    has_softcap = softcap is not None
    single = lse_in is None and V <= cfg.single_limit(has_softcap)
    block, warps = single_block_launch(V, cfg, has_softcap) if single else (cfg.block_v, cfg.num_warps)
    _row_pass_kernel[(C,)](
        logits, bias if bias is not None else logits, targets.contiguous(), lse, logp, lse,
        entropy if compute_entropy else logp, grad if grad is not None else logits,
        V, logits.stride(0), grad.stride(0) if grad is not None else 0, float(in_scale), float(out_scale),
        grad_scale, HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap, HAS_LSE=lse_in is not None,
        WANT_ENTROPY=bool(compute_entropy), WRITE_GRAD=grad is not None, SINGLE=single, BLOCK_V=block,
        num_warps=warps, num_stages=1,
    )
    return logp, lse, entropy, grad


def grad_pass(logits, bias, targets, inv_temperature, lse, entropy, g, e, grad_dtype, *, logit_scale=1.0,
              softcap=None, cfg: RowPassConfig = None):
    """logits (C, V) fp32 as a statistics-only ``row_pass`` left them -> D' (C, V) in ``grad_dtype``, written over
    the logits (the strided view ``grad_view(logits, grad_dtype)``).

    lse, entropy: the row pass's (C,) fp32; g = dL/dlogp and e = dL/dentropy (C,) fp32; bias, targets, the
    temperature, logit_scale and softcap as in ``row_pass``. One read and one write a logit (module docstring).
    """
    C, V = logits.shape
    _check("grad_pass", logits, bias, targets, grad_dtype)
    if grad_dtype is None:
        raise ValueError("grad_pass: grad_dtype must be one of float32, bfloat16, float16")
    in_scale, out_scale = transform_scales(inv_temperature, logit_scale, softcap)
    rows = [_row_vector("grad_pass", what, x, C) for what, x in (("lse", lse), ("entropy", entropy), ("g", g),
                                                                   ("e", e))]
    grad = grad_view(logits, grad_dtype)
    if C == 0:
        return grad
    cfg = cfg or row_pass_config(logits.device, grad_dtype)
    _grad_pass_kernel[(C,)](
        logits, bias if bias is not None else logits, targets.contiguous(), *rows, grad,
        V, logits.stride(0), grad.stride(0), float(in_scale), float(out_scale),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps, num_stages=1,
    )
    return grad

"""The LM head in bounded chunks: vendor GEMMs around a backend's row pass and segment loss.

Shapes: hidden (N, H) with N = B * T tokens in row order, weight (V, H), bias (V,) or None, targets (N,).
``z = (hidden @ weight.T + bias) / temperature`` and ``D = onehot(y) - softmax(z)``, so that the gradient of a
token's log-prob with respect to its raw logits ``h W^T`` is ``D / temperature``.

Cost follows the gradient (``token_plan``). Only the tokens the loss needs enter a GEMM: those in the loss
(``batch.mask``), less, when nothing else reads them (``beta = 0``, no ``ref_logps``, no entropy asked), the tokens
of items whose every advantage is 0, which carry no loss and no gradient. They are listed once per call, in row
order, with one device-to-host copy that also fixes the chunks: runs of at most ``tokens_per_chunk`` listed tokens
that never split an item.

Gradient in the forward (``loss_and_grads``, what ``rank_grpo_loss`` runs). A token's loss gradient ``g`` depends
only on the log-probs of its own item and on normalisers fixed by the full masks, so a chunk of whole items knows
its ``g`` as soon as its log-probs exist. Per chunk of C listed tokens (``h_c = hidden[positions]``)::

    Z          = h_c W^T                  GEMM, fp32 output and accumulation: the only (C, V) buffer
    D, logp    = row_pass(Z)              one fused pass; D overwrites Z in the GEMM operand dtype (the torch
                                          backend with half operands on CUDA writes a separate D)
    g          = segment_loss(logp)       over the chunk's rows, every token outside the chunk neutral
    d_hidden_c = (g / T) * (D W)          GEMM with fp32 output, one row scale and cast, scattered to its rows
    d_weight  += D^T ((g / T) * h_c)      GEMM accumulating in fp32 in place (beta = 1)
    d_bias    += (g / T)^T D              GEMV accumulating in place

Each logit is computed once; the backward only scales the saved gradients by the incoming gradient. An item
longer than a chunk is the one exception: its logits are recomputed for its gradients (a fourth GEMM, with a
warning). Rows whose ``g`` is exactly 0 after the segment loss (clipped items) stay in the two gradient GEMMs:
leaving them out (a gather of their D rows) measured no faster on a CPU with a fifth of the rows clipped, and needs
a host sync per chunk on a GPU.

Recompute (``logprobs``, then ``logprob_grads`` in the backward): for ``fused_logprobs`` and vocabulary-sharded
heads. The forward keeps ``lse`` per token; the backward recomputes Z for the tokens with a non-zero gradient (one
host sync to list them), the row pass forms D with the saved ``lse``, then the same GEMMs.

GEMMs (``gemms.py``): bf16/fp16 operands on CUDA give fp32 outputs (``out_dtype``, with an exact fallback where a
torch refuses the in-place form); fp32 ones run at IEEE fp32, not TF32; a CPU has no mixed-dtype GEMM, so there
the operands are upcast once per call. No atomics anywhere: results are bit-identical from run to run.

Equivalent PyTorch (holding all logits)::

    z = (hidden @ weight.T + bias).float() / temperature
    logp = z.log_softmax(-1).gather(-1, y[:, None])[:, 0]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import backends, gemms
from .contract import STAT_NAMES, LogitTransform, LossConfig, TokenBatch

# The statistics of the policy's own distribution at a token, means over the tokens whose log-probs are computed.
LISTED_MEANS = [STAT_NAMES.index("ratio_mean"), STAT_NAMES.index("entropy")]
RATIO = STAT_NAMES.index("ratio_mean")


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def gemm_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The GEMM operand dtype (and so D's): the inputs' on CUDA and for fp32/fp64, fp32 for half inputs on a CPU."""
    if hidden.device.type == "cuda" or hidden.dtype == accumulator_dtype(hidden.dtype):
        return hidden.dtype
    return torch.float32


def _gemm_operands(hidden, weight):
    dtype = gemm_dtype(hidden)
    return hidden.to(dtype), weight.to(dtype)


ROW_ALIGNMENT = 16  # elements: logits rows start on 64-byte boundaries, so row-pass loads vectorise for any V


def padded_vocab(vocab: int) -> int:
    """The row stride (elements) of a logits chunk: V rounded up to ``ROW_ALIGNMENT``."""
    return -(-vocab // ROW_ALIGNMENT) * ROW_ALIGNMENT


class LogitsBuffer:
    """The one (rows x V) fp32 logits scratch of a call, rows ``padded_vocab(V)`` elements apart (the GEMM writes
    them with that leading dimension); ``rows(C)`` is the (C, V) view of the first C rows."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device):
        self.vocab, self.stride = vocab, padded_vocab(vocab)
        self.data = torch.empty(rows * self.stride, dtype=dtype, device=device)

    def rows(self, count: int) -> torch.Tensor:
        return self.data.as_strided((count, self.vocab), (self.stride, 1))


def bytes_per_token(backend: str, vocab, hidden_size, dtype, needs_grad, entropy_bonus=False) -> int:
    """Scratch per token of a chunk with GEMM operands of ``dtype`` (``gemm_dtype``): its fp32 logits row (plus a
    separate D row where the backend cannot write D in place, and a copy of the logits for the entropy bonus's
    statistics pass where the backend's overwrites them), its gathered hidden row, and with gradients its fp32
    (D W) row and its scaled hidden row."""
    acc = accumulator_dtype(dtype)
    grad_dtype = dtype if needs_grad else None
    spec = backends.REGISTRY[backend]
    per_logit = acc.itemsize
    if not spec.grad_in_place(acc, grad_dtype):
        per_logit += grad_dtype.itemsize
    if entropy_bonus and needs_grad and spec.stats_pass_overwrites:
        per_logit += acc.itemsize
    vocab = padded_vocab(vocab)
    per_row = hidden_size * dtype.itemsize
    if grad_dtype is not None:
        per_row += hidden_size * (acc.itemsize + grad_dtype.itemsize)
    return vocab * per_logit + per_row


def tokens_per_chunk(backend: str, vocab, hidden_size, dtype, needs_grad, budget_bytes, entropy_bonus=False) -> int:
    """Tokens per chunk within the budget: at least one token's whole vocabulary row."""
    return max(1, budget_bytes // bytes_per_token(backend, vocab, hidden_size, dtype, needs_grad, entropy_bonus))


# --- which tokens enter the GEMMs, and the chunks ------------------------------------------------------------------

@dataclass
class TokenPlan:
    """The tokens that enter the GEMMs and how they are chunked.

    ``positions`` (n,) int64 on the device: their flat indices in [0, B T), in row order. ``chunks``: host tuples
    (c0, c1, r0, r1): listed tokens [c0, c1), whole items, lying in rows [r0, r1)."""

    positions: torch.Tensor
    chunks: list[tuple[int, int, int, int]]

    @property
    def tokens(self) -> int:
        return self.positions.numel()


def skips_zero_advantage_items(cfg: LossConfig, batch: TokenBatch) -> bool:
    """Whether the items whose every advantage is 0 can stay out of the GEMMs: no loss term or exact statistic
    then reads their log-probs (no KL term or statistic)."""
    return cfg.beta == 0.0 and batch.ref_logps is None


def token_plan(batch: TokenBatch, skip_zero_advantage: bool, chunk_tokens: int) -> TokenPlan:
    """The tokens of ``batch`` that enter the GEMMs (see the module docstring) and chunks of at most
    ``chunk_tokens`` of them (more only for a single longer item), from one device-to-host copy of (B T,) ints."""
    B, T = batch.mask.shape
    N = B * T
    device = batch.mask.device
    mask = batch.mask.reshape(-1)
    group = batch.group.reshape(-1).clamp(min=0)  # dense ids in [0, N); tokens outside the loss read bin 0
    if skip_zero_advantage:
        signal = (mask & (batch.advantages.reshape(-1) != 0)).to(torch.int32)
        live = torch.zeros(N, dtype=torch.int32, device=device).scatter_reduce_(0, group, signal, "amax")
        listed = mask & (live[group] > 0)
    else:
        listed = mask
    # A cut after flat position f splits no item iff no listed token up to f belongs to an item that goes on past f.
    flat = torch.arange(N, device=device)
    item_end = torch.full((N,), -1, dtype=torch.int64, device=device).scatter_reduce_(
        0, group, torch.where(listed, flat, -1), "amax")
    reach = torch.where(listed, item_end[group], -1).cummax(0).values if N else flat
    count = listed.long().cumsum(0)
    packed = (count * 2 + (listed & (reach == flat))).cpu().numpy()  # the call's one host sync for the sizes
    count_host, cut_host = packed >> 1, (packed & 1).astype(bool)
    n = int(count_host[-1]) if N else 0
    positions_host = np.flatnonzero(np.diff(count_host, prepend=0))
    positions = torch.nonzero_static(listed, size=n).squeeze(1) if n else flat[:0]
    ends = count_host[cut_host]  # listed-token counts at the allowed cuts, ascending; the last is n
    chunks, start = [], 0
    while start < n:
        i = int(np.searchsorted(ends, start + chunk_tokens, side="right")) - 1
        end = int(ends[i]) if i >= 0 and ends[i] > start else int(ends[np.searchsorted(ends, start, side="right")])
        chunks.append((start, end, int(positions_host[start]) // T, int(positions_host[end - 1]) // T + 1))
        start = end
    return TokenPlan(positions, chunks)


def _chunk_batch(batch: TokenBatch, positions, r0, r1, logp, entropy) -> tuple[TokenBatch, torch.Tensor]:
    """Rows [r0, r1) of ``batch`` holding the chunk's log-probs at ``positions`` (flat, of the batch). Every other
    token of those rows stays in the masks (so the normalisers, M_i and n_k are the batch's) but is neutral: log-
    probs, old and reference log-probs, advantage and policy weight 0, so it adds no loss, gradient, clip count or
    KL, and a ratio of exactly 1. Also returns the chunk's positions local to the rows."""
    T = batch.mask.shape[1]
    local = positions - r0 * T
    sub = batch.rows(r0, r1)
    size = (r1 - r0) * T
    in_chunk = torch.zeros(size, dtype=torch.bool, device=local.device).index_fill_(0, local, True).view(r1 - r0, T)

    def place(values):
        return torch.zeros(size, dtype=values.dtype, device=values.device).index_copy_(0, local, values).view(
            r1 - r0, T)

    def neutral(x):
        return None if x is None else torch.where(in_chunk, x, 0)

    sub.logps = place(logp)
    sub.entropy = place(entropy) if entropy is not None else None
    sub.old_logps, sub.ref_logps, sub.advantages, sub.policy_weights = (
        neutral(x) for x in (sub.old_logps, sub.ref_logps, sub.advantages, sub.policy_weights))
    return sub, local


# --- the gradient GEMMs --------------------------------------------------------------------------------------------

def _grad_buffers(tokens, listed, weight, bias, needs, dtype, acc):
    """d_hidden (tokens, H) in ``dtype`` (zeros unless every token is listed), d_weight and d_bias in ``acc``
    (uninitialised when a chunk will write them, zeros when no token is listed); None where not needed."""
    need_h, need_w, need_b = needs
    device = weight.device
    d_hidden = None
    if need_h:
        d_hidden = (torch.empty if listed == tokens else torch.zeros)(tokens, weight.shape[1], dtype=dtype,
                                                                      device=device)
    new = torch.empty if listed else torch.zeros
    d_weight = new(weight.shape, dtype=acc, device=device) if need_w else None
    d_bias = new(weight.shape[0], dtype=acc, device=device) if need_b and bias is not None else None
    return d_hidden, d_weight, d_bias


def _accumulate_grads(d_logits, scale, h, weight, grads, first, rows_out, product):
    """With D (C, V) and ``scale = g / T`` (C,): ``d_hidden[rows_out] = scale (D W)``, ``d_weight += D^T (scale h)``,
    ``d_bias += scale^T D``; ``first`` writes the sums instead of adding to them. ``product`` is (>= C, H) scratch
    in the accumulator dtype."""
    d_hidden, d_weight, d_bias = grads
    if d_hidden is not None:
        rows = gemms.mm_into(d_logits, weight, product[: d_logits.shape[0]])
        rows.mul_(scale[:, None].to(rows.dtype))
        d_hidden.index_copy_(0, rows_out, rows.to(d_hidden.dtype))
    if d_weight is None and d_bias is None:
        return
    factor = _operand_factor(scale, d_logits.dtype)
    accumulate = dict(beta=0.0 if first else 1.0, alpha=1.0 / factor)
    if d_weight is not None:
        # where, not a product: a token outside the loss may hold a NaN hidden state, and its D row is 0.
        scaled = torch.where(scale[:, None] != 0, h * (scale[:, None] * factor), 0).to(d_logits.dtype)
        gemms.addmm_into(d_weight, d_logits.T, scaled, **accumulate)
    if d_bias is not None:
        gemms.addmm_into(d_bias[None], (scale[None] * factor).to(d_logits.dtype), d_logits, **accumulate)


def _operand_factor(scale, dtype) -> float:
    """A power of two that brings ``scale = g / T`` near 1 before it enters an fp16 GEMM operand, whose normal range
    stops at 6e-5 (bnpo over 16k tokens puts g near there); the GEMM's alpha takes it out again. One host sync per
    chunk, for fp16 only; 1 for other dtypes (bf16 has fp32's range)."""
    if dtype != torch.float16:
        return 1.0
    peak = float(scale.abs().amax()) if scale.numel() else 0.0
    return 2.0 ** -math.floor(math.log2(peak)) if 0.0 < peak < math.inf else 1.0


def _finish_grads(grads, dtype):
    d_hidden, d_weight, d_bias = grads
    return (d_hidden, d_weight.to(dtype) if d_weight is not None else None,
            d_bias.to(dtype) if d_bias is not None else None)


def saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the gradients ``loss_and_grads`` returns: the inputs', but fp32 for fp16 inputs, whose tiny
    gradients would flush to zero before the backward applies a loss scale (``GradScaler``)."""
    return torch.float32 if dtype == torch.float16 else dtype


# --- the fused loss --------------------------------------------------------------------------------------------------

def loss_and_grads(backend: str, hidden, weight, bias, targets, batch: TokenBatch, cfg: LossConfig,
                   transform: LogitTransform, compute_entropy: bool, entropy_coef: float, entropy_mask,
                   skip_zero_advantage: bool, budget_bytes: int, needs: tuple[bool, bool, bool]):
    """Loss, statistics, the per-row clip counts (B, 2) and the gradients (d_hidden, d_weight, d_bias; None where
    ``needs`` says so) of the fused loss over chunks of whole items within ``budget_bytes`` of scratch, in
    ``saved_grad_dtype``. ``batch.logps`` and ``batch.entropy`` are unused. ``ratio_mean`` and ``entropy`` are means
    over the tokens that entered the GEMMs.

    ``entropy_coef`` adds the entropy bonus ``-entropy_coef * sum_t E_t H_t / max(sum_t E_t, 1)`` with its gradient,
    a mean over the tokens ``E = M & entropy_mask`` (``entropy_mask`` (B, T) bool, or None: every loss token, the
    mean of TRL, verl and OpenRLHF; TRL's ``top_entropy_quantile`` restricts it to the high-entropy tokens). Every
    loss token then enters, the row pass gives the statistics only and, once the segment loss has given ``g``, the
    gradient pass writes ``D' = g (onehot - p) - e p (log p + H)`` with ``e = dL/dH = -entropy_coef E_t / sum E``
    over the same logits."""
    impl = backends.load(backend)
    V, H = weight.shape
    N = hidden.shape[0]
    h_op, w_op = _gemm_operands(hidden, weight)
    acc = accumulator_dtype(hidden.dtype)
    grad_dtype = h_op.dtype if any(needs) else None
    bonus = entropy_coef != 0.0
    want_entropy = compute_entropy or bonus
    cap = tokens_per_chunk(backend, V, H, h_op.dtype, grad_dtype is not None, budget_bytes, bonus)
    plan = token_plan(batch, skip_zero_advantage and skips_zero_advantage_items(cfg, batch) and not bonus, cap)
    # the entropy bonus's gradient pass reads the logits the statistics pass must leave as they are
    keep_logits = bonus and grad_dtype is not None and backends.REGISTRY[backend].stats_pass_overwrites
    grads = _grad_buffers(N, plan.tokens, weight, bias, needs, saved_grad_dtype(hidden.dtype), acc)
    largest = max((c1 - c0 for c0, c1, _, _ in plan.chunks), default=0)
    if largest > cap:
        warnings.warn(f"rank_grpo_loss: the fp32 logits of an item of {largest} tokens x {V} vocabulary exceed "
                      f"memory_budget_bytes={budget_bytes}; recomputing the logits of the items longer than "
                      f"{cap} tokens for their gradients (a fourth GEMM for them): raise the budget "
                      "(RANKGRPO_MEMORY_BUDGET) to avoid it", stacklevel=2)
    width = min(largest, cap)
    logits = LogitsBuffer(width, V, acc, hidden.device)
    product = torch.empty(width, H, dtype=acc, device=hidden.device) if grads[0] is not None else None
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    stats = torch.zeros(len(STAT_NAMES), dtype=acc, device=hidden.device)
    row_clipped = torch.zeros(batch.mask.shape[0], 2, dtype=acc, device=hidden.device)
    tokens = batch.tokens.to(acc)
    if bonus:
        bonus_weights, bonus_tokens = entropy_bonus_weights(batch.mask, entropy_mask, acc)
    for c0, c1, r0, r1 in plan.chunks:
        positions = plan.positions[c0:c1]
        h, y = h_op.index_select(0, positions), targets.index_select(0, positions)
        fits = c1 - c0 <= cap
        if fits:
            z = gemms.mm_into(h, w_op.T, logits.rows(c1 - c0))
            logp, lse, entropy, d_logits = impl.row_pass(z.clone() if keep_logits else z, bias, y,
                                                         transform.inv_temperature, None,
                                                         None if bonus else grad_dtype, want_entropy,
                                                         **transform.kwargs())
        else:
            logp, lse, entropy = _chunked_logprobs(impl, h, w_op, bias, y, transform, cap, logits, want_entropy)
        chunk, local = _chunk_batch(batch, positions, r0, r1, logp, entropy)
        chunk_loss, chunk_stats, g, chunk_clipped = impl.segment_loss(chunk, cfg)
        loss += chunk_loss
        row_clipped[r0:r1] += chunk_clipped
        if bonus:
            e = -entropy_coef * bonus_weights.index_select(0, positions) / bonus_tokens  # dL/dH
            loss += (e * entropy).sum()
        # the neutral tokens of the chunk's rows each added a ratio of exactly 1
        chunk_stats[RATIO] -= (chunk.mask.sum() - (c1 - c0)).to(acc) / tokens
        stats += chunk_stats
        if grad_dtype is None:
            continue
        g = g.reshape(-1).index_select(0, local).to(acc)
        if not fits:
            _recomputed_grads(impl, h, w_op, bias, y, transform, lse, entropy, g, e if bonus else None, grads,
                              c0 == 0, positions, cap, logits, product, h_op.dtype)
            continue
        if bonus:
            d_logits, scale = _entropy_gradient_pass(impl, z, bias, y, transform, lse, entropy, g, e, h_op.dtype)
        else:
            scale = g * transform.row_scale
        _accumulate_grads(d_logits, scale, h, w_op, grads, c0 == 0, positions, product)
    if plan.tokens:  # means over the listed tokens (all loss tokens unless items were skipped)
        stats[LISTED_MEANS] *= tokens / plan.tokens
    return (loss, stats, row_clipped, *_finish_grads(grads, saved_grad_dtype(weight.dtype)))


def entropy_bonus_weights(mask, entropy_mask, dtype):
    """The tokens the entropy bonus averages over, flat (B T,) in ``dtype`` (``mask & entropy_mask``; the loss
    tokens when ``entropy_mask`` is None), and their count clamped to >= 1 (0-dim)."""
    weights = mask if entropy_mask is None else mask & entropy_mask.bool()
    weights = weights.reshape(-1).to(dtype)
    return weights, weights.sum().clamp(min=1)


def _entropy_gradient_pass(impl, z, bias, y, transform, lse, entropy, g, e, grad_dtype):
    """``D'`` of a loss with an entropy term over the untouched logits ``z`` (a statistics-only row pass), and the
    row scale of its gradient GEMMs. fp16 operands get ``g`` and ``e`` times a power of two (``_operand_factor``)
    that the row scale takes out again: ``D'`` holds ``g``, and ``g / T`` sits near fp16's subnormals."""
    factor = _operand_factor(torch.maximum(g.abs(), e.abs()), grad_dtype)
    d_logits = impl.grad_pass(z, bias, y, transform.inv_temperature, lse, entropy, g * factor, e * factor,
                              grad_dtype, **transform.kwargs())
    return d_logits, torch.full_like(g, transform.row_scale / factor)


def _chunked_logprobs(impl, h, w_op, bias, y, transform, cap, logits, want_entropy):
    """logp, lse and entropy (or None), each (C,), of the tokens of ``h`` (C, H), ``cap`` tokens at a time."""
    C = h.shape[0]
    logp, lse = (torch.empty(C, dtype=logits.data.dtype, device=h.device) for _ in range(2))
    entropy = torch.empty(C, dtype=logits.data.dtype, device=h.device) if want_entropy else None
    for t0 in range(0, C, cap):
        t1 = min(C, t0 + cap)
        z = gemms.mm_into(h[t0:t1], w_op.T, logits.rows(t1 - t0))
        out = impl.row_pass(z, bias, y[t0:t1], transform.inv_temperature, None, None, want_entropy,
                            **transform.kwargs())
        logp[t0:t1], lse[t0:t1] = out[0], out[1]
        if want_entropy:
            entropy[t0:t1] = out[2]
    return logp, lse, entropy


def _recomputed_grads(impl, h, w_op, bias, y, transform, lse, entropy, g, e, grads, first, rows_out, cap, logits,
                      product, grad_dtype):
    """Gradients of ``sum_t g_t logp_t + e_t H_t`` (``e`` None: no entropy term) over the tokens of ``h`` (C, H),
    their logits recomputed ``cap`` tokens at a time and D formed with the saved ``lse`` (and ``entropy``);
    ``d_hidden`` rows go to ``rows_out``."""
    for t0 in range(0, h.shape[0], cap):
        t1 = min(h.shape[0], t0 + cap)
        z = gemms.mm_into(h[t0:t1], w_op.T, logits.rows(t1 - t0))
        if e is None:
            d_logits = impl.row_pass(z, bias, y[t0:t1], transform.inv_temperature, lse[t0:t1], grad_dtype, False,
                                     **transform.kwargs())[3]
            scale = g[t0:t1] * transform.row_scale
        else:
            d_logits, scale = _entropy_gradient_pass(impl, z, bias, y[t0:t1], transform, lse[t0:t1],
                                                     entropy[t0:t1], g[t0:t1], e[t0:t1], grad_dtype)
        _accumulate_grads(d_logits, scale, h[t0:t1], w_op, grads, first and t0 == 0, rows_out[t0:t1], product)


# --- the recompute path ------------------------------------------------------------------------------------------

def logprobs(backend: str, hidden, weight, bias, targets, transform: LogitTransform, budget_bytes: int,
             want_entropy: bool, positions=None):
    """logp, lse and entropy (or None), each (N,) in fp32 (fp64 for fp64 inputs), of the tokens at ``positions``
    ((n,) int64; None: all), 0 for the others. A target outside [0, V) (another vocabulary shard) has target logit
    0, so its logp is ``-lse``."""
    impl = backends.load(backend)
    N, V = hidden.shape[0], weight.shape[0]
    h_op, w_op = _gemm_operands(hidden, weight)
    acc = accumulator_dtype(hidden.dtype)
    if positions is not None:
        h_op, targets = h_op.index_select(0, positions), targets.index_select(0, positions)
    cap = tokens_per_chunk(backend, V, hidden.shape[1], h_op.dtype, False, budget_bytes)
    logits = LogitsBuffer(min(h_op.shape[0], cap), V, acc, hidden.device)
    out = _chunked_logprobs(impl, h_op, w_op, bias, targets, transform, cap, logits, want_entropy)
    if positions is None:
        return out
    return tuple(None if x is None else torch.zeros(N, dtype=acc, device=hidden.device).index_copy_(0, positions, x)
                 for x in out)


def logprob_grads(backend: str, hidden, weight, bias, targets, transform: LogitTransform, lse, grad_logp,
                  budget_bytes: int, needs: tuple[bool, bool, bool], entropy=None, grad_entropy=None):
    """Gradients (d_hidden, d_weight, d_bias) of ``sum_t grad_logp[t] logp[t] + grad_entropy[t] entropy[t]`` given
    the forward's ``lse`` (and ``entropy``; ``grad_entropy`` None: no entropy term); None where ``needs`` says so.
    Only the tokens with a non-zero incoming gradient are recomputed (one host sync to list them)."""
    impl = backends.load(backend)
    V, H = weight.shape
    h_op, w_op = _gemm_operands(hidden, weight)
    acc = accumulator_dtype(hidden.dtype)
    nonzero = grad_logp.reshape(-1) != 0
    if grad_entropy is not None:
        nonzero |= grad_entropy.reshape(-1) != 0
    active = nonzero.nonzero().squeeze(1)
    n_active = active.numel()
    grads = _grad_buffers(hidden.shape[0], n_active, weight, bias, needs, hidden.dtype, acc)
    if n_active:
        cap = tokens_per_chunk(backend, V, H, h_op.dtype, True, budget_bytes)
        width = min(n_active, cap)
        logits = LogitsBuffer(width, V, acc, hidden.device)
        product = torch.empty(width, H, dtype=acc, device=hidden.device) if needs[0] else None

        def take(x):
            return None if x is None else x.reshape(-1)[active].to(acc)

        _recomputed_grads(impl, h_op[active], w_op, bias, targets[active], transform, take(lse), take(entropy),
                          take(grad_logp), take(grad_entropy), grads, True, active, cap, logits, product, h_op.dtype)
    return _finish_grads(grads, weight.dtype)

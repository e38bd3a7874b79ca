"""Planning a head call: dtypes, the logits scratch per token, chunk sizes, and the tokens that enter the
GEMMs.

Cost follows the gradient (``token_plan``). Only the tokens the loss needs enter a GEMM: those in the loss
(``batch.mask``), less, when nothing else reads them (``beta = 0``, no ``ref_logps``, no entropy bonus), the tokens
of items whose every advantage is 0, which carry no loss and no gradient. They are listed once per call, in row
order, with one device-to-host copy that also fixes the chunks: runs of at most ``tokens_per_chunk`` listed tokens
that never split an item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..backends import REGISTRY
from ..contract import TokenBatch
from ..specs import LossSpec
from .scratch import padded_vocab


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def gemm_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The GEMM operand dtype (and so D's): the inputs' on CUDA and for fp32/fp64, fp32 for half inputs on a CPU."""
    if hidden.device.type == "cuda" or hidden.dtype == accumulator_dtype(hidden.dtype):
        return hidden.dtype
    return torch.float32


def gemm_operands(hidden, weight):
    dtype = gemm_dtype(hidden)
    return hidden.to(dtype), weight.to(dtype)


def saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the gradients the fused loss returns: the inputs', but fp32 for fp16 inputs, whose tiny
    gradients would flush to zero before the backward applies a loss scale (``GradScaler``)."""
    return torch.float32 if dtype == torch.float16 else dtype


def bytes_per_token(backend: str, vocab, hidden_size, dtype, needs_grad, entropy_bonus=False) -> int:
    """Scratch per token of a chunk with GEMM operands of ``dtype`` (``gemm_dtype``): its fp32 logits row (plus a
    separate D row where the backend cannot write D in place, and a copy of the logits for the entropy bonus's
    statistics pass where the backend's overwrites them), its gathered hidden row, and with gradients its fp32
    (D W) row and its scaled hidden row."""
    acc = accumulator_dtype(dtype)
    grad_dtype = dtype if needs_grad else None
    caps = REGISTRY[backend]
    per_logit = acc.itemsize
    if not caps.grad_in_place(acc, grad_dtype):
        per_logit += grad_dtype.itemsize
    if entropy_bonus and needs_grad and caps.stats_pass_overwrites:
        per_logit += acc.itemsize
    vocab = padded_vocab(vocab)
    per_row = hidden_size * dtype.itemsize
    if grad_dtype is not None:
        per_row += hidden_size * (acc.itemsize + grad_dtype.itemsize)
    return vocab * per_logit + per_row


def tokens_per_chunk(backend: str, vocab, hidden_size, dtype, needs_grad, memory_budget_bytes,
                     entropy_bonus=False) -> int:
    """Tokens per chunk within the budget: at least one token's whole vocabulary row."""
    return max(1, memory_budget_bytes // bytes_per_token(backend, vocab, hidden_size, dtype, needs_grad, entropy_bonus))


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


def skips_zero_advantage_items(spec: LossSpec, batch: TokenBatch) -> bool:
    """Whether the items whose every advantage is 0 can stay out of the GEMMs: no loss term or exact statistic
    then reads their log-probs (no KL term or statistic, no entropy bonus)."""
    return spec.beta == 0.0 and batch.ref_logps is None and spec.entropy_coef == 0.0


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

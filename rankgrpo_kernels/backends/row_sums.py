"""What the compiled segment-loss kernels (Triton and CUDA) share: their per-row sums and row-relative groups.

A leaf module (torch only), so that kernel files may import it.
"""

from __future__ import annotations

import torch

ROW_SUMS = 6  # per row: loss, clipped low, clipped high, ratio, KL, the REINFORCE term's weight


def loss_from_row_sums(row_sums: torch.Tensor, batch):
    """(loss, stats, per-row clip counts (B, 2)) from the per-row sums (B, ROW_SUMS) that the compiled segment-loss
    kernels write, for the ``TokenBatch`` they ran on. Summing rows here keeps the reduction order fixed. The stats
    are in ``contract.STAT_NAMES`` order; the KL entry is 0 without ref_logps (then not reported)."""
    sums = row_sums.sum(0)
    tokens = batch.tokens.to(sums.dtype)
    low, high = sums[1] / tokens, sums[2] / tokens
    entropy_mean = torch.zeros_like(low)
    if batch.entropy is not None:
        entropy_mean = torch.where(batch.mask, batch.entropy.detach().to(sums.dtype), 0).sum() / tokens
    stats = torch.stack([low, high, low + high, sums[3] / tokens, sums[4] / tokens, entropy_mean, sums[5] / tokens])
    return sums[0], stats, row_sums[:, 1:3].clone()  # not a view: op outputs own their storage


def row_relative_groups(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ids relative to their row (int32 (B, T), -1 outside the loss) and the number of groups of each row
    (int32 (B,); the CUDA kernel sizes its per-item slots with it), of a ``TokenBatch``."""
    B, T = batch.mask.shape
    rows = torch.arange(B, device=batch.mask.device).unsqueeze(1) * T
    group = torch.where(batch.mask, batch.group - rows, -1).to(torch.int32).contiguous()
    num_bins = (group.amax(1) + 1).to(torch.int32) if T else torch.zeros(B, dtype=torch.int32, device=group.device)
    return group, num_bins

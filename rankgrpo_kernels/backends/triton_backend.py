"""The Triton backend: the row and gradient passes (``kernels/row_pass.py``) and the segment loss
(``kernels/segment_loss.py``) as Triton kernels around ``lm_head``'s vendor GEMMs. CUDA GPUs (sm_80+), or the CPU
under ``TRITON_INTERPRET=1`` for tests. The kernels take plain tensors; this module adapts the shared contract to
them.
"""

from __future__ import annotations

from ..contract import LOG_RATIO_LIMIT, WEIGHTING, LossConfig, TokenBatch, loss_from_row_sums, row_relative_groups
from ..kernels import row_pass as _row_pass
from ..kernels import segment_loss as _segment
from . import on_input_device

__all__ = ["row_pass", "grad_pass", "segment_loss"]

row_pass = on_input_device(_row_pass.row_pass)
grad_pass = on_input_device(_row_pass.grad_pass)


@on_input_device
def segment_loss(batch: TokenBatch, cfg: LossConfig):
    """Same contract as ``torch_backend.segment_loss``: (loss, stats, grad (B, T), row_clipped (B, 2)) in fp32, from
    the leaf launcher ``kernels.segment_loss.segment_loss_rows`` (row-relative groups in, per-row sums out)."""
    group, _ = row_relative_groups(batch)
    grad, row_sums = _segment.segment_loss_rows(
        batch.logps, batch.old_logps, batch.ref_logps, batch.advantages, group, batch.normaliser, batch.tokens,
        beta=cfg.beta, clip_low=1.0 - cfg.epsilon_low, clip_high=1.0 + cfg.epsilon_high, delta=cfg.delta,
        weighting=WEIGHTING[cfg.loss_type], log_ratio_limit=LOG_RATIO_LIMIT, policy_weights=batch.policy_weights)
    loss, stats, row_clipped = loss_from_row_sums(row_sums, batch)
    return loss, stats, grad, row_clipped

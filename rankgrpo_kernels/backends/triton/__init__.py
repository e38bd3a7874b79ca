"""The Triton backend: the row and gradient passes (``row_pass_kernel.py``) and the segment loss
(``segment_loss_kernel.py``) as Triton kernels around the head's vendor GEMMs. CUDA GPUs (sm_80+), or the CPU under
``TRITON_INTERPRET=1`` for tests. The kernel files take plain tensors and numbers (one kernel and its launcher per
file, launch settings in ``tiles.py``); this module adapts the protocol's calls (``backends/protocol.py``) to them.
"""

from __future__ import annotations

from ...contract import LOG_RATIO_LIMIT, VESPO_LOG_W_MIN, WEIGHTING, TokenBatch
from ...specs import HeadSpec, LossSpec
from ..protocol import RowPass, SegmentLoss
from ..registry import on_input_device
from ..row_sums import loss_from_row_sums, row_relative_groups
from . import row_pass_kernel as _row_pass
from . import segment_loss_kernel as _segment

__all__ = ["row_pass", "grad_pass", "segment_loss"]


@on_input_device
def row_pass(logits, *, bias, targets, head: HeadSpec, lse=None, grad_dtype=None, grad_scale=1.0,
             compute_entropy=False) -> RowPass:
    """``protocol.py``'s row pass: D (times ``grad_scale``) is written over the logits
    (``row_pass_kernel.grad_view``)."""
    return RowPass(*_row_pass.row_pass(logits, bias, targets, head.inv_temperature, lse, grad_dtype, compute_entropy,
                                       logit_scale=head.logit_scale, softcap=head.logit_softcap,
                                       grad_scale=grad_scale))


@on_input_device
def grad_pass(logits, *, bias, targets, head: HeadSpec, lse, entropy, g, e, grad_dtype):
    """``protocol.py``'s gradient pass: D' is written over the logits."""
    return _row_pass.grad_pass(logits, bias, targets, head.inv_temperature, lse, entropy, g, e, grad_dtype,
                               logit_scale=head.logit_scale, softcap=head.logit_softcap)


@on_input_device
def segment_loss(batch: TokenBatch, *, spec: LossSpec) -> SegmentLoss:
    """``protocol.py``'s segment loss in fp32, from the leaf launcher ``segment_loss_kernel.segment_loss_rows``
    (row-relative groups in, per-row sums out)."""
    group, _ = row_relative_groups(batch)
    grad, row_sums = _segment.segment_loss_rows(
        batch.logps, batch.old_logps, batch.ref_logps, batch.advantages, group, batch.normaliser, batch.tokens,
        beta=spec.beta, clip_low=spec.clip_bounds[0], clip_high=spec.clip_bounds[1], delta=spec.delta,
        weighting=WEIGHTING[spec.loss_type], log_ratio_limit=LOG_RATIO_LIMIT, policy_weights=batch.policy_weights,
        policy=spec.policy, temperatures=spec.sapo_temperatures, gamma=spec.vespo_gamma,
        log_w_min=VESPO_LOG_W_MIN, kl_corrected=spec.use_bias_correction_kl and batch.ref_logps is not None)
    loss, stats, row_clipped = loss_from_row_sums(row_sums, batch)
    return SegmentLoss(loss, stats, grad, row_clipped)

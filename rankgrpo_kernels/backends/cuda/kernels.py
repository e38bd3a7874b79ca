"""The CUDA backend's three calls over the extension (``loader.py``): importing this module loads it, prebuilt or
built just in time, and raises ``protocol.BackendUnavailable`` (an ImportError) naming the fix when it cannot."""

from __future__ import annotations

import torch

from ...contract import LOG_RATIO_LIMIT, VESPO_LOG_W_MIN, WEIGHTING, TokenBatch
from ...specs import HeadSpec, LossSpec
from ..protocol import RowPass, SegmentLoss
from ..registry import on_input_device
from ..row_sums import ROW_SUMS, loss_from_row_sums, row_relative_groups
from .loader import load_extension

__all__ = ["row_pass", "grad_pass", "segment_loss"]

_ext = load_extension()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _transform(head: HeadSpec) -> tuple:
    """The binding's inv_temperature, logit_scale, softcap arguments."""
    return head.inv_temperature, head.logit_scale, head.logit_softcap


def _grad_view(logits, grad_dtype):
    V = logits.shape[1]
    return logits if grad_dtype == torch.float32 else logits.view(grad_dtype)[:, :V]


@on_input_device
def row_pass(logits, *, bias, targets, head: HeadSpec, lse=None, grad_dtype=None, grad_scale=1.0,
             compute_entropy=False) -> RowPass:
    """``protocol.py``'s row pass; D (times ``grad_scale``) is written over the logits (row r of D starts where row r
    of the logits starts, a strided view that cuBLAS takes as is)."""
    C = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp = torch.empty(C, **f32)
    lse_in = lse.contiguous() if lse is not None else None
    lse = lse_in if lse_in is not None else torch.empty(C, **f32)
    entropy = torch.empty(C, **f32) if compute_entropy else None
    grad = _grad_view(logits, grad_dtype) if grad_dtype is not None else None
    if C:
        _ext.row_pass(logits, bias.contiguous() if bias is not None else None, targets.contiguous(),
                      *_transform(head), lse_in, logp, lse, entropy, grad, float(grad_scale), _stream(logits.device))
    return RowPass(logp, lse, entropy, grad)


@on_input_device
def grad_pass(logits, *, bias, targets, head: HeadSpec, lse, entropy, g, e, grad_dtype):
    """``protocol.py``'s gradient pass; D' is written over the logits like the row pass's D."""
    grad = _grad_view(logits, grad_dtype)
    if logits.shape[0]:
        rows = [x.detach().to(torch.float32).contiguous() for x in (lse, entropy, g, e)]
        _ext.grad_pass(logits, bias.contiguous() if bias is not None else None, targets.contiguous(),
                       *_transform(head), *rows, grad, _stream(logits.device))
    return grad


@on_input_device
def segment_loss(batch: TokenBatch, *, spec: LossSpec) -> SegmentLoss:
    """``protocol.py``'s segment loss in fp32."""
    B, T = batch.mask.shape
    device = batch.mask.device
    f32 = dict(dtype=torch.float32, device=device)
    group, num_bins = row_relative_groups(batch)

    def operand(x):
        return None if x is None else x.detach().to(torch.float32).contiguous()

    grad = torch.empty(B, T, **f32)
    row_sums = torch.empty(B, ROW_SUMS, **f32)
    _ext.segment_loss(operand(batch.logps), operand(batch.old_logps), operand(batch.ref_logps),
                      operand(batch.advantages), operand(batch.policy_weights), group, num_bins,
                      operand(batch.normaliser).reshape(1), operand(batch.tokens).reshape(1),
                      torch.empty(3, B, T, **f32), grad, row_sums, spec.beta, *spec.clip_bounds, spec.delta,
                      WEIGHTING[spec.loss_type], LOG_RATIO_LIMIT, spec.policy, *spec.sapo_temperatures,
                      *spec.vespo_gamma, VESPO_LOG_W_MIN, spec.use_bias_correction_kl, _stream(device))
    loss, stats, row_clipped = loss_from_row_sums(row_sums, batch)
    return SegmentLoss(loss, stats, grad, row_clipped)

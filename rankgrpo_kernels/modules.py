"""``RankGRPOLoss``: the settings of a run held as two specs, the batch passed to ``forward``."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .functional import rank_grpo_loss, rank_grpo_loss_from_logps, spec_from
from .specs import HeadSpec, LossSpec

_LOSS_FIELDS = frozenset(f.name for f in dataclasses.fields(LossSpec))
_HEAD_FIELDS = frozenset(f.name for f in dataclasses.fields(HeadSpec))


class RankGRPOLoss(nn.Module):
    """Rank-GRPO loss with fixed settings; see ``rank_grpo_loss`` for the maths and the arguments.

    Built from the keywords of ``LossSpec`` and ``HeadSpec`` or from the specs themselves (``loss=``, ``head=``);
    ``forward`` takes the per-batch keywords of ``rank_grpo_loss``, and a keyword of a spec field there overrides
    the module's setting for that call (e.g. an ``entropy_coef`` that a controller adapts). Example::

        criterion = RankGRPOLoss(epsilon_low=0.06, epsilon_high=0.08, beta=1e-3, loss_type="bnpo")
        loss, stats = criterion(hidden, lm_head.weight, completion_ids, item_ids=seg.item_ids,
                                advantages=token_adv, old_logps=old, ref_logps=ref)
    """

    def __init__(self, *, loss: LossSpec | None = None, head: HeadSpec | None = None, **settings):
        super().__init__()
        unknown = sorted(set(settings) - _LOSS_FIELDS - _HEAD_FIELDS)
        if unknown:
            raise TypeError(f"RankGRPOLoss got unexpected keywords {unknown}; the settings are the fields of "
                            "LossSpec and HeadSpec")
        self.loss = spec_from(LossSpec, loss, "loss", **{k: v for k, v in settings.items() if k in _LOSS_FIELDS})
        self.head = spec_from(HeadSpec, head, "head", **{k: v for k, v in settings.items() if k in _HEAD_FIELDS})

    def _specs(self, batch: dict) -> tuple[LossSpec, HeadSpec]:
        """The specs of one call: the module's, with the spec fields among ``batch``'s keywords (taken out)."""
        loss = {k: batch.pop(k) for k in list(batch) if k in _LOSS_FIELDS}
        head = {k: batch.pop(k) for k in list(batch) if k in _HEAD_FIELDS}
        return dataclasses.replace(self.loss, **loss), dataclasses.replace(self.head, **head)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, *,
                item_ids, advantages, bias=None, **batch):
        """Fused loss from hidden states (B, T, H) and the LM head (V, H); ``batch`` takes the per-batch keywords
        of ``rank_grpo_loss`` (``completion_mask``, ``old_logps``, ``ref_logps``, ``policy_weights``,
        ``num_items_in_batch``, ``entropy_mask``, ``compute_entropy``, ...)."""
        loss, head = self._specs(batch)
        return rank_grpo_loss(hidden, weight, target_ids, bias=bias, item_ids=item_ids, advantages=advantages,
                              loss=loss, head=head, **batch)

    def from_logps(self, logps: torch.Tensor, *, item_ids, advantages, **batch):
        """The same loss from per-token log-probs (B, T) (``rank_grpo_loss_from_logps``; the head's backend). An
        ``entropy_coef`` is refused there: the bonus needs the entropies' gradient, which only the fused head has."""
        loss, head = self._specs(batch)
        return rank_grpo_loss_from_logps(logps, item_ids=item_ids, advantages=advantages, backend=head.backend,
                                         loss=loss, **batch)

    def extra_repr(self) -> str:
        return f"loss={self.loss}, head={self.head}"

"""``RankGRPOLoss``: the configuration of a run held in a module, the batch passed to ``forward``."""

from __future__ import annotations

import torch
from torch import nn

from .functional import rank_grpo_loss, rank_grpo_loss_from_logps
from .contract import LossConfig


class RankGRPOLoss(nn.Module):
    """Rank-GRPO loss with fixed settings; see ``rank_grpo_loss`` for the maths and the arguments.

    Example::

        criterion = RankGRPOLoss(epsilon_low=0.06, epsilon_high=0.08, beta=1e-3, loss_type="bnpo")
        loss, stats = criterion(hidden, lm_head.weight, completion_ids, item_ids=seg.item_ids,
                                advantages=token_adv, old_logps=old, ref_logps=ref)
    """

    def __init__(
        self,
        *,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        delta: float | None = None,
        beta: float = 0.0,
        loss_type: str = "bnpo",
        temperature: float = 1.0,
        max_completion_length: int | None = None,
        rec_num: int | None = None,
        backend: str = "auto",
        memory_budget_bytes: int | None = None,
    ):
        super().__init__()
        self.config = LossConfig(epsilon_low, epsilon_high, delta, beta, loss_type)  # validates
        self.temperature = temperature
        self.max_completion_length = max_completion_length
        self.rec_num = rec_num
        self.backend = backend
        self.memory_budget_bytes = memory_budget_bytes

    def _loss_kwargs(self):
        c = self.config
        return dict(
            epsilon_low=c.epsilon_low, epsilon_high=c.epsilon_high, delta=c.delta, beta=c.beta,
            loss_type=c.loss_type, max_completion_length=self.max_completion_length, rec_num=self.rec_num,
        )

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, *,
                item_ids, advantages, bias=None, **batch):
        """Fused loss from hidden states (B, T, H) and the LM head (V, H); ``batch`` takes the per-batch keywords
        of ``rank_grpo_loss`` (``completion_mask``, ``old_logps``, ``ref_logps``, ``policy_weights``,
        ``num_items_in_batch``, ``entropy_coef``, ``entropy_mask``, ...)."""
        return rank_grpo_loss(
            hidden, weight, target_ids, bias=bias, temperature=self.temperature, item_ids=item_ids,
            advantages=advantages, backend=self.backend, memory_budget_bytes=self.memory_budget_bytes,
            **self._loss_kwargs(), **batch,
        )

    def from_logps(self, logps: torch.Tensor, *, item_ids, advantages, **batch):
        """The same loss from per-token log-probs (B, T) (``rank_grpo_loss_from_logps``)."""
        return rank_grpo_loss_from_logps(logps, item_ids=item_ids, advantages=advantages, **self._loss_kwargs(),
                                         **batch)

    def extra_repr(self) -> str:
        return f"{self.config}, temperature={self.temperature}, backend={self.backend!r}"

"""``ForwardLoss``: a micro-batch's Rank-GRPO loss computed inside verl's model forward, on the last hidden states and
the head (the fused path: three GEMMs over the tokens the loss needs), or, where verl's options rule that out, the
log-probs of only the tokens the loss reads (the recompute path).

verl computes the loss after the model's forward, from the log-probs of every position of the packed sequence.
``hook.patch_forward_step`` binds the micro-batch around the engine's forward step (``bind_forward_loss``); inside the
model's forward, ``FusedLogprobsForPPO`` hands the states and the head to ``ForwardLoss.run``, and the loss hook
then returns the loss the forward computed (``ForwardLoss.result``) or scores verl's log-probs as before.

The fused path covers the code form with every ``loss_agg_mode``, the rollout importance-sampling weights, the dual
clip, a KL loss of type ``low_var_kl``/``k3`` and an entropy bonus aggregated per token; the paper form with neither
KL nor entropy bonus: every case without KL and entropy bonus, so at beta 0 only the items with a non-zero advantage
enter the GEMMs. Otherwise (other KL types, an entropy bonus over sequence means, the paper form with a KL or an
entropy bonus, each of which reads every response token) the forward scores the response tokens only
(``response_mask``), and verl's ``ppo_loss`` runs on those log-probs.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any

import torch
from verl.utils import tensordict_utils as tu

from ...functional import fused_logprobs
from ..common import framework_fused_loss
from .config import _segmentation
from .items import MicroBatchItems, padded, sequence_lengths
from .loss import aggregation, clip

# verl's KL loss types that are the loss's k3. verl clamps each token's k3 at 10, reached once ref - logp passes
# about 2.6 (or falls below -11); the fused k3 is not clamped there (its log-ratio is, at LOG_RATIO_LIMIT).
_K3_TYPES = ("low_var_kl", "k3")
_FORWARD_LOSS: contextvars.ContextVar[ForwardLoss | None] = contextvars.ContextVar("rank_grpo_forward_loss",
                                                                                   default=None)


@dataclass
class ForwardLoss:
    """The loss of one micro-batch (verl's ``TensorDict``) under the actor's ``config``; ``run`` fills ``result``
    ((loss, stats), the fused path) or leaves it None (the recompute path)."""

    config: Any
    data: Any
    result: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def run(self, hidden: torch.Tensor, weight: torch.Tensor, target_ids: torch.Tensor, head: dict):
        """``FusedLogprobsForPPO``'s ``(log_probs, entropy)`` for the model's states ``hidden`` (1, total, H) packed or
        (B, S, H) padded, predicting ``target_ids``: placeholders (zeros) once the fused loss is in ``result``, or
        the log-probs and entropies of the loss tokens (``response_mask``; the others get 0)."""
        data = self.data.to(hidden.device)
        set_batch_info(self.config, data)
        items = MicroBatchItems.from_data(data, _segmentation(self.config))
        positions = _response_positions(data, hidden.shape[:2], items.responses.shape[1])
        old = padded(data["old_log_probs"])
        calculate_entropy = tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False)
        options = self._fused_options(data, items, calculate_entropy)
        if options is not None:
            states = hidden.reshape(-1, hidden.shape[-1])[positions]
            self.result = framework_fused_loss(
                states, weight.to(hidden.dtype), items.responses, aggregation(
                    self.config, self.config.loss_agg_mode, items.loss_mask), clip(self.config),
                item_ids=items.item_ids, advantages=items.advantages, mask=items.loss_mask, old_log_probs=old,
                head=head, compute_entropy=calculate_entropy, **options)
            placeholder = hidden.new_zeros(hidden.shape[:-1], dtype=torch.float32)
            return placeholder, placeholder
        listed = torch.zeros(hidden.shape[:-1].numel(), dtype=torch.bool, device=hidden.device)
        listed[positions[items.loss_mask]] = True
        return fused_logprobs(hidden, weight.to(hidden.dtype), target_ids, return_entropy=True,
                              mask=listed.view(hidden.shape[:-1]), **head)

    def _fused_options(self, data, items: MicroBatchItems, calculate_entropy: bool) -> dict | None:
        """The KL and entropy keywords of the fused loss that give verl's ``ppo_loss``, or None where it cannot
        (module docstring)."""
        config, paper = self.config, _segmentation(self.config)["form"] == "rank"
        options = {"policy_weights": padded(data["rollout_is_weights"]) if "rollout_is_weights" in data else None}
        if config.use_kl_loss:
            if paper or config.kl_loss_type not in _K3_TYPES:
                return None
            options.update(ref_log_probs=padded(data["ref_log_prob"]), beta=float(config.kl_loss_coef))
        if calculate_entropy and config.entropy_coeff != 0:
            agg = aggregation(config, config.loss_agg_mode, items.loss_mask)
            loss_tokens = int((items.loss_mask & (items.item_ids >= 0)).sum())
            coef = None if paper else agg.token_bonus_coef(float(config.entropy_coeff), loss_tokens)
            if coef is None:
                return None
            options["entropy_coef"] = coef
        return options


def set_batch_info(config, data) -> bool:
    """Copy the global batch's normalisers of the micro-batch into ``config.global_batch_info``, as verl's
    ``ppo_loss`` does before its policy loss; True when they are set (verl then sums the loss metrics)."""
    config.global_batch_info.update(dp_size=data["dp_size"], batch_num_tokens=data["batch_num_tokens"],
                                    global_batch_size=data["global_batch_size"],
                                    loss_scale_factor=config.loss_scale_factor)
    return (data["dp_size"] > 1 or data["batch_num_tokens"] is not None or data["global_batch_size"] is not None
            or config.loss_scale_factor is not None)


def _response_positions(data, shape: torch.Size, width: int) -> torch.Tensor:
    """(B, width) flat index into the model's states (``shape`` = (1, total) packed or (B, S) padded) of the
    position that predicts each response token (the one before it); padding columns point at a valid row."""
    prompt_lengths, lengths = (x.to(torch.long) for x in sequence_lengths(data))
    rows, device = prompt_lengths.shape[0], prompt_lengths.device
    if shape[0] == 1:  # packed: the samples' prompt + response back to back
        starts = torch.cumsum(prompt_lengths + lengths, 0) - lengths - 1
    else:
        starts = torch.arange(rows, device=device) * shape[1] + prompt_lengths - 1
    offsets = torch.minimum(torch.arange(width, device=device)[None], (lengths - 1).clamp(min=0)[:, None])
    return starts[:, None] + offsets


def current_forward_loss() -> ForwardLoss | None:
    """The micro-batch bound around the running forward step, or None."""
    return _FORWARD_LOSS.get()


@contextlib.contextmanager
def bind_forward_loss(config, micro_batch):
    """Within the block the model's fused forward computes this micro-batch's loss (``ForwardLoss``)."""
    token = _FORWARD_LOSS.set(ForwardLoss(config, micro_batch))
    try:
        yield _FORWARD_LOSS.get()
    finally:
        _FORWARD_LOSS.reset(token)

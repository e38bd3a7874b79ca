"""``MicroBatchItems``: a micro-batch's responses split into ranked items, from the whole response.

verl's rollout rejection (``rollout_rs`` token_k1/k2/k3) zeroes single tokens of ``response_mask``; segmenting under
that mask would skip a rejected newline and move every later rank's advantage onto the wrong item. The items come
from the response's valid tokens before any rejection (its attention mask, up to EOS); ``response_mask`` only
masks the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...rewards import token_advantages
from ...segments import segment_items


def padded(x: torch.Tensor) -> torch.Tensor:
    """A (B, T) tensor of verl's micro-batch, nested (jagged) ones padded with 0."""
    return x.to_padded_tensor(0) if x.is_nested else x


def sequence_lengths(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) prompt and response lengths of a micro-batch, as verl's ``no_padding_2_padding`` reads them: from the
    nested prompts and responses, or from the attention mask over the padded prompt and response columns."""
    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        return prompts.offsets().diff(), responses.offsets().diff()
    attention = data["attention_mask"]
    return attention[:, : prompts.shape[1]].sum(1), attention[:, prompts.shape[1]:].sum(1)


@dataclass(frozen=True)
class MicroBatchItems:
    """The items of a micro-batch's responses, all (B, T) over the response tokens: ``responses``, ``loss_mask``
    (verl's ``response_mask``, rejections applied), ``item_ids`` (the loss's, of the code or the paper form) and
    the per-token ``advantages`` built from the packed per-rank ones ``data["advantages"][:, :N]``."""

    responses: torch.Tensor
    loss_mask: torch.Tensor
    item_ids: torch.Tensor
    advantages: torch.Tensor

    @classmethod
    def from_data(cls, data, settings: dict) -> MicroBatchItems:
        """Segment ``data["responses"]`` under the responses' valid tokens (``sequence_lengths``) with the loss
        hook's ``settings`` (``config._segmentation``)."""
        responses, loss_mask = padded(data["responses"]), padded(data["response_mask"]).bool()
        _, lengths = sequence_lengths(data)
        valid = torch.arange(responses.shape[1], device=responses.device) < lengths.to(responses.device)[:, None]
        segments = segment_items(responses, valid, settings["table"].to(responses.device), settings["rec_num"],
                                 eos_token_id=settings["eos_token_id"], skip_blank_lines=settings["skip_blank_lines"])
        paper = settings["form"] == "rank"
        rank_adv = padded(data["advantages"])[:, : settings["rec_num"]]
        return cls(responses, loss_mask, segments.item_ids_for("rank" if paper else "bnpo"),
                   token_advantages(rank_adv, segments, length_shaping=not paper))

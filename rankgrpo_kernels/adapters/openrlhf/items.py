"""``RankItems``: how OpenRLHF's responses split into ranked items, for the loss (item ids) and the experience maker
(per-token advantages)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...rewards import token_advantages
from ...segments import Segments, line_table, segment_items
from ..common import check_form


@dataclass(frozen=True)
class RankItems:
    """How responses split into ranked items: N = ``rec_num``, the tokenizer's newline table and EOS id.

    ``form="code"`` is the released code form (per-token advantages, EOS and overflow in the loss, length shaping),
    ``"rank"`` the paper form (item tokens only, ``-(1/(B N)) sum_k min(w A, clip(w) A)``).
    """

    table: torch.Tensor
    rec_num: int
    eos_token_id: int | None
    skip_blank_lines: bool = True
    form: str = "code"

    @classmethod
    def from_tokenizer(cls, tokenizer, rec_num: int, **kwargs) -> RankItems:
        return cls(line_table(tokenizer), rec_num, tokenizer.eos_token_id, **kwargs)

    def __post_init__(self):
        check_form(self.form)

    def segments(self, sequences: torch.Tensor, action_mask: torch.Tensor) -> Segments:
        """Items of the action tokens ``sequences[:, -A:]`` under ``action_mask`` (B, A). The window also holds
        prompt tokens (A = S - 1), outside the mask: the EOS id a chat template writes there (Qwen's
        ``<|im_end|>``) ends nothing, since ``segment_items`` looks for the EOS inside the mask only."""
        actions = sequences[:, -action_mask.shape[1]:]
        return segment_items(actions, action_mask, self.table.to(actions.device), self.rec_num,
                             eos_token_id=self.eos_token_id, skip_blank_lines=self.skip_blank_lines)

    def item_ids(self, sequences: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
        """(B, A) item of each action token for the loss; -1 outside it."""
        return self.segments(sequences, action_mask).item_ids_for("rank" if self.form == "rank" else "bnpo")

    def token_advantages(self, rank_adv: torch.Tensor, sequences: torch.Tensor,
                         action_mask: torch.Tensor) -> torch.Tensor:
        """(B, A) per-token advantages from per-rank advantages (B, N): the code form's (length shaping on) or,
        for the paper form, ``A[i, k]`` on the tokens of item k and 0 elsewhere."""
        segments = self.segments(sequences, action_mask)
        return token_advantages(rank_adv, segments, length_shaping=self.form == "code")

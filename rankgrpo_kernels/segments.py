"""Items of a ranked list: newline tables, vectorised token segmentation and the matching text splitter.

Two modes, one rule each:

* ``skip_blank_lines=False`` (the authors' code form): the item of token t is the number of "\\n" in the valid
  tokens before t, so a newline belongs to the item it ends, a ``"\\n\\n"`` token counts two and the EOS token
  gets the id after the last newline.
* ``skip_blank_lines=True`` (aligned): only a newline that closes a line holding non-whitespace text closes an
  item. Tokens that carry no text before any content of a new line (blank lines, a trailing newline, the EOS)
  stay with the item before them. ``split_items(text)`` returns exactly the non-blank lines, so reward functions
  score the very items the loss sees.

In both modes, items ``>= max_items`` share the overflow bin ``max_items`` and tokens outside the completion
get -1. Tokens outside the completion mask count for nothing: an EOS id there (a prompt's chat template, padding
with pad == EOS) is neither the row's EOS nor a termination.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass

import torch

_TABLE_CACHE: "weakref.WeakKeyDictionary[object, dict[int, torch.Tensor]]" = weakref.WeakKeyDictionary()

# Columns of the line table.
NEWLINES, LEAD, INNER, TRAIL = range(4)


def _decode_one(tokenizer, token_id: int) -> str:
    try:
        return tokenizer.decode([token_id], clean_up_tokenization_spaces=False, skip_special_tokens=False)
    except TypeError:
        return tokenizer.decode([token_id])


def _line_row(text: str) -> tuple[int, int, int, int]:
    """(newlines, text before the first newline, non-blank lines between newlines, text after the last one)."""
    parts = text.split("\n")
    n = len(parts) - 1
    lead = int(parts[0].strip() != "")
    inner = sum(p.strip() != "" for p in parts[1:-1])
    trail = int(parts[-1].strip() != "") if n else lead
    return n, lead, inner, trail


def line_table(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """(V, 4) int32 table of each token's decoded text: newlines, content before the first newline (0/1),
    non-blank lines strictly between newlines, content after the last newline (0/1; the whole token when it has
    no newline). Built once per tokenizer (cached); ``V = max(len(tokenizer), vocab_size)``, extra ids are 0.
    Column 0 is ``newline_counts(tokenizer)``; ``segment_items(..., skip_blank_lines=True)`` needs all four.
    """
    size = max(len(tokenizer), vocab_size or 0)
    try:
        per_tokenizer = _TABLE_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: build without caching
        per_tokenizer = {}
    if size not in per_tokenizer:
        table = torch.zeros(size, 4, dtype=torch.int32)
        rows = [_line_row(_decode_one(tokenizer, i)) for i in range(len(tokenizer))]
        table[: len(rows)] = torch.tensor(rows, dtype=torch.int32).reshape(-1, 4)
        per_tokenizer[size] = table
    return per_tokenizer[size]


def newline_counts(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """(V,) int32: how many "\\n" each token's decoded text holds (``"\\n\\n"`` -> 2, ``")\\n"`` -> 1)."""
    return line_table(tokenizer, vocab_size)[:, NEWLINES].contiguous()


@dataclass
class Segments:
    """Segmentation of a batch of completions, all tensors on the device of the ids.

    item_ids       (B, T) int64: item of each token in [0, max_items]; ``max_items`` is the overflow bin; -1 outside
                   the completion. The code form's groups (EOS and overflow included).
    content_mask   (B, T) bool: tokens of items 0..max_items-1, EOS excluded (the paper form's item tokens).
    overflow_mask  (B, T) bool: completion tokens in the overflow bin (an EOS there included).
    eos_mask       (B, T) bool: the first EOS token among the completion's (masked-in) tokens.
    items_emitted  (B,) int64: items the row produced (not capped at max_items).
    terminated     (B,) bool: the completion's tokens hold an EOS (EOS ids outside the mask do not count).
    """

    item_ids: torch.Tensor
    content_mask: torch.Tensor
    overflow_mask: torch.Tensor
    eos_mask: torch.Tensor
    items_emitted: torch.Tensor
    terminated: torch.Tensor
    max_items: int

    def item_ids_for(self, loss_type: str) -> torch.Tensor:
        """Item ids for ``rank_grpo_loss*``: the code form's bins, or for ``loss_type="rank"`` (paper form) only the
        item tokens, with EOS and overflow tokens set to -1 so they stay out of the ratios."""
        if loss_type == "rank":
            return torch.where(self.content_mask, self.item_ids, -1)
        return self.item_ids


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(1) - x


def segment_items(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    token_lines: torch.Tensor,
    max_items: int,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    skip_blank_lines: bool = False,
) -> Segments:
    """Assign every completion token to an item of the ranked list, fully vectorised (no host synchronisation).

    Args:
        completion_ids: (B, T) integer token ids.
        completion_mask: (B, T) 0/1 or bool, True on the completion's tokens (up to and including EOS).
        token_lines: the per-token newline table, (V,) from ``newline_counts(tokenizer)`` or (V, 4) from
            ``line_table(tokenizer)``; ``skip_blank_lines=True`` needs the latter. Move it to the ids' device once
            (``table.to(device)``); ids outside the table count as text without newlines.
        max_items: N, the number of ranks; items >= N share the overflow bin N.
        eos_token_id: the EOS id, a list of them (``generation_config.eos_token_id`` of Llama-3 and Qwen2.5: any of
            them ends the list), or None when completions carry none.
        skip_blank_lines: False for the authors' segmentation, True for the aligned mode (module docstring).

    Equivalent slow loop for ``skip_blank_lines=False`` (per row)::

        item = 0
        for t in valid positions: item_ids[t] = min(item, N); item += decode([ids[t]]).count("\\n")
    """
    if not isinstance(max_items, int) or isinstance(max_items, bool) or max_items < 1:
        raise ValueError(f"max_items must be an int >= 1, got {max_items!r}")
    if not isinstance(completion_ids, torch.Tensor) or completion_ids.dim() != 2:
        raise ValueError("completion_ids must be a (B, T) tensor")
    if completion_ids.dtype.is_floating_point or completion_ids.dtype == torch.bool:
        raise TypeError(f"completion_ids must hold integer token ids, got {completion_ids.dtype}")
    if not isinstance(completion_mask, torch.Tensor) or completion_mask.shape != completion_ids.shape:
        raise ValueError(
            f"completion_mask must be a tensor of completion_ids' shape {tuple(completion_ids.shape)}, got "
            f"{getattr(completion_mask, 'shape', type(completion_mask))}"
        )
    if not isinstance(token_lines, torch.Tensor) or token_lines.dim() not in (1, 2):
        raise ValueError("token_lines must be the (V,) newline_counts(tokenizer) or (V, 4) line_table(tokenizer)")
    if skip_blank_lines and (token_lines.dim() != 2 or token_lines.shape[1] != 4):
        raise ValueError("skip_blank_lines=True needs the (V, 4) line_table(tokenizer) as token_lines")

    device = completion_ids.device
    valid = completion_mask.to(device).bool()
    table = token_lines.to(device)  # a no-op once the caller keeps the table on the ids' device
    if table.dim() == 1:
        table = table.unsqueeze(-1)
    known = (completion_ids >= 0) & (completion_ids < table.shape[0])  # ids past the table carry no text
    ids = completion_ids.long().clamp(0, table.shape[0] - 1)
    per_token = table[ids].long() * (valid & known).unsqueeze(-1)
    newlines = per_token[..., NEWLINES]

    # Only completion tokens can be the EOS: masked positions may hold the EOS id (a chat-templated prompt inside
    # the window, padding with pad == EOS after a row cut off at the length limit) and must not end the list.
    if eos_token_id is None:
        is_eos = torch.zeros_like(valid)
    else:
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not eos_ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
            raise ValueError(f"eos_token_id must be an int, a non-empty list of ints or None, got {eos_token_id!r}")
        is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=device)) & valid
    eos_mask = is_eos & (is_eos.long().cumsum(1) == 1)
    terminated = is_eos.any(1)

    if skip_blank_lines:
        content = per_token[..., [LEAD, INNER, TRAIL]] * (~eos_mask).unsqueeze(-1)
        item, items_emitted = _aligned_items(newlines, *content.unbind(-1))
    else:
        item = _exclusive_cumsum(newlines)
        items_emitted = torch.where(valid, item, -1).amax(1) + 1 if item.shape[1] else item.new_zeros(item.shape[0])

    item_ids = torch.where(valid, item.clamp(max=max_items), -1)
    overflow_mask = valid & (item >= max_items)
    content_mask = valid & (item < max_items) & ~eos_mask
    return Segments(item_ids, content_mask, overflow_mask, eos_mask, items_emitted, terminated, max_items)


def _aligned_items(newlines, lead, inner, trail):
    """Item ids and item counts when only newlines that close a non-blank line count (module docstring)."""
    B, T = newlines.shape
    pad = newlines.new_zeros(B, 1)  # one virtual token past the end tells whether the last line has content
    newlines, lead, inner, trail = (torch.cat([x, pad], 1) for x in (newlines, lead, inner, trail))
    pos = torch.arange(T + 1, device=newlines.device).expand(B, T + 1)
    has_newline = newlines > 0
    # Last newline-bearing token strictly before t, and whether content was written since it.
    last_nl = torch.where(has_newline, pos, -1).cummax(1).values
    last_nl = torch.cat([pos.new_full((B, 1), -1), last_nl[:, :-1]], 1)
    leads = (lead * ~has_newline).cumsum(1)
    leads_before = leads - lead * ~has_newline
    leads_at_last_nl = torch.where(last_nl >= 0, leads.gather(1, last_nl.clamp(min=0)), 0)
    trail_at_last_nl = torch.where(last_nl >= 0, trail.gather(1, last_nl.clamp(min=0)), 0)
    line_has_content = (trail_at_last_nl > 0) | (leads_before > leads_at_last_nl)

    closing = has_newline * ((line_has_content | (lead > 0)).long() + inner)
    closed_before = _exclusive_cumsum(closing)
    starts_content = line_has_content | (lead > 0)
    item = torch.where(starts_content, closed_before, (closed_before - 1).clamp(min=0))
    items_emitted = closed_before[:, T] + line_has_content[:, T].long()
    return item[:, :T], items_emitted


_SEGMENTATION: contextvars.ContextVar[tuple[bool, str] | None] = contextvars.ContextVar("rankgrpo_segmentation",
                                                                                       default=None)


@contextlib.contextmanager
def segmentation_in_use(skip_blank_lines: bool, owner: str):
    """Within the block (a trainer's reward calls), ``split_items`` with another ``skip_blank_lines`` than the
    one ``owner`` segments tokens with raises: its hits would land on other items than the loss's."""
    token = _SEGMENTATION.set((skip_blank_lines, owner))
    try:
        yield
    finally:
        _SEGMENTATION.reset(token)


def split_items(text: str, skip_blank_lines: bool = True) -> list[str]:
    """Split a decoded completion into its items, by the same rule as ``segment_items``.

    ``skip_blank_lines=True``: the non-blank lines, stripped. ``False``: every "\\n"-separated part, as the
    authors' segmentation counts them (blank parts kept), without an empty part after a final newline.
    Pass the completion text without the EOS token. Inside a trainer's reward call (``segmentation_in_use``) a
    ``skip_blank_lines`` other than the trainer's is a ``ValueError``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    in_use = _SEGMENTATION.get()
    if in_use is not None and in_use[0] != skip_blank_lines:
        raise ValueError(f"split_items(skip_blank_lines={skip_blank_lines}) in a reward function of {in_use[1]}, "
                         f"whose segmentation has skip_blank_lines={in_use[0]}: the hits would land on other items "
                         f"than the loss's; pass skip_blank_lines={in_use[0]} (item_hits and make_rank_hit_reward "
                         "take it too)")
    lines = text.split("\n")
    if skip_blank_lines:
        return [line.strip() for line in lines if line.strip()]
    if lines and lines[-1] == "":
        lines.pop()
    return lines

"""``rank_hits`` as a TRL-style reward function: dataset columns in, one list of per-rank hits per completion out,
plain or conversational completions alike."""

from __future__ import annotations

from collections.abc import Sequence

from .catalog import Catalog
from .hits import _check_batch, _check_settings, rank_hits


def _completion_text(completion, i: int) -> str:
    """The text of a plain completion, or the last message's content of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise TypeError(
        f"completions[{i}] must be a str or a non-empty list of {{'role', 'content'}} messages with str content, "
        f"got {completion!r:.80}"
    )


def make_rank_hit_reward(catalog: Catalog, rec_num: int, skip_blank_lines: bool = True, *, clean: bool = True):
    """A TRL-style reward function returning per-rank hit lists, built on ``rank_hits``.

    The returned ``rank_hit_reward(prompts, completions, ground_truth=..., seen=None, **kwargs)`` takes the
    completions as strings or, for conversational data, as lists of ``{"role", "content"}`` messages (the last
    message's content is scored), and the dataset columns ``ground_truth`` (per completion, (title, year) entries;
    ``{"title", "year"}`` structs suit Arrow datasets) and ``seen`` (optional, per completion, titles). Other keyword
    arguments (``completion_ids``, ``trainer_state``, ...) are ignored. It returns one list of ``rec_num`` floats in
    {0.0, 1.0} per completion: per-rank rewards for a Rank-GRPO trainer (``rank_rewards`` turns the hits into
    discounted rewards), not the one float per completion a stock GRPO trainer expects.
    """
    _check_settings(catalog, rec_num)

    def rank_hit_reward(prompts, completions, ground_truth=None, seen=None, **kwargs) -> list[list[float]]:
        if ground_truth is None:
            raise ValueError(
                "ground_truth is missing: the dataset needs a 'ground_truth' column of (title, year) pairs"
            )
        _check_batch(completions, "completions")
        if prompts is not None:
            _check_batch(prompts, "prompts", len(completions))
        texts = [_completion_text(completion, i) for i, completion in enumerate(completions)]
        hits = rank_hits(texts, ground_truth, seen, catalog, rec_num, skip_blank_lines, clean=clean)
        return hits.tolist()

    return rank_hit_reward

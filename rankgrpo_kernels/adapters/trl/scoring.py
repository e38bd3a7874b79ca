"""From the reward functions' outputs to the loss's rank-level fields: per-rank rewards, per-rank group advantages
spread over each item's tokens, item ids."""

from __future__ import annotations

import torch

from ...rewards import per_rank_tensor, rank_advantages, rank_rewards, token_advantages
from ...segments import Segments, segmentation_in_use


def per_rank_rewards(funcs, names, args, prompts, completions, completion_ids, reward_kwargs: dict) -> torch.Tensor:
    """Each reward function's per-rank rewards (B, F, N) of these completions: every function, called with TRL's
    keyword arguments, returns ``args.rec_num`` values per completion, which ``args.reward_kind`` turns into
    rewards. Raises ``ValueError`` naming the function otherwise."""
    per_function = []
    for func, name in zip(funcs, names, strict=True):
        with segmentation_in_use(args.skip_blank_lines, f"RankGRPOTrainer (reward function {name!r})"):
            output = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **reward_kwargs)
        if output is None or len(output) != len(prompts):
            raise ValueError(f"reward function {name!r} returned {'None' if output is None else len(output)} "
                             f"entries for {len(prompts)} completions; return one list of rec_num="
                             f"{args.rec_num} values per completion")
        values = per_rank_tensor(output, args.rec_num, source=f"reward function {name!r}")
        per_function.append(rank_rewards(values, args.reward_kind, args.reward_gamma))
    return torch.stack(per_function, 1)


def rank_fields(rewards: torch.Tensor, segments: Segments, rows: slice, num_generations: int, scale: str,
                loss_type: str, args) -> dict[str, torch.Tensor]:
    """Per-token advantages and item ids (B, T) of the completions at ``rows`` of the batch on all processes (their
    ``segments``), from that batch's per-rank rewards (B_all, N): a prompt's G completions may lie on several
    processes."""
    advantages = rank_advantages(rewards, num_generations, scale=scale)
    per_token = token_advantages(
        advantages[rows], segments, length_shaping=args.length_shaping and loss_type != "rank",
        overflow_penalty=args.overflow_penalty, end_of_list_bonus=args.end_of_list_bonus,
        early_stop_penalty=args.early_stop_penalty,
    )
    return {"advantages": per_token, "item_ids": segments.item_ids_for(loss_type)}

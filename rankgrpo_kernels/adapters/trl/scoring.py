"""From the reward functions' outputs to the loss's fields: per-rank rewards, group advantages (per rank, or per list
for the baselines) spread over the tokens, item ids (the unit of the ratio); ``ObjectiveSpec`` holds the rules."""

from __future__ import annotations

import torch

from ...objective import ObjectiveSpec
from ...rewards import per_rank_tensor
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
        per_function.append(args.objective.rewards(values))
    return torch.stack(per_function, 1)


def rank_fields(rewards: torch.Tensor, weights: torch.Tensor, segments: Segments, rows: slice, num_generations: int,
                objective: ObjectiveSpec, loss_type: str) -> dict[str, torch.Tensor]:
    """Per-token advantages and item ids (B, T) of the completions at ``rows`` of the batch on all processes (their
    ``segments``), from that batch's per-rank rewards, (B_all, F, N) per reward function with ``weights`` (F,), or
    (B_all, N): a prompt's G completions may lie on several processes."""
    advantages = objective.advantages(rewards, num_generations, weights if rewards.dim() == 3 else None)
    item_ids, per_token = objective.loss_fields(advantages[rows], segments, loss_type)
    return {"advantages": per_token, "item_ids": item_ids}

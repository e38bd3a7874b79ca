"""``RankGRPOExperienceMaker``: OpenRLHF's experience maker with per-rank group advantages spread over the items."""

from __future__ import annotations

import itertools

import torch
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

from ...rewards import rank_advantages
from .items import RankItems


class RankGRPOExperienceMaker(RemoteExperienceMaker):
    """``RemoteExperienceMaker`` with per-rank group advantages. ``experience.rewards`` must be (b, N) per rank.

    ``A[i, k] = (r[i, k] - mean_g r[g, k]) / (std_g r[g, k] + 1e-4)`` over the ``n_samples_per_prompt`` samples of
    a prompt (``rank_advantages``), spread over the tokens of item k (``RankItems.token_advantages``). The KL goes
    into the loss (``--use_kl_loss``), not into the reward; OpenRLHF's length penalties are replaced by the code
    form's length shaping.
    """

    items: RankItems  # set by install()

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences):
        args = self.strategy.args
        if not args.algo.kl.use_loss and self.kl_ctl.value > 0:
            raise ValueError("Rank-GRPO adds the KL to the loss: set --use_kl_loss (or a zero KL coefficient)")
        rank_adv = group_rank_advantages(experiences, args.rollout.n_samples_per_prompt)
        for experience, adv in zip(experiences, rank_adv):
            experience.advantages = self.items.token_advantages(adv, experience.sequences, experience.action_mask)
            experience.returns = experience.advantages.clone()
            experience.info["return"] = experience.rewards.sum(-1)
            experience.kl = None
        return experiences


def group_rank_advantages(experiences, n_samples_per_prompt: int) -> list[torch.Tensor]:
    """Per-rank group advantages, one (b_j, N) tensor per experience, from their (b_j, N) per-rank rewards.

    Samples are regrouped by ``experience.index`` (the original rollout order, where the ``n_samples_per_prompt``
    samples of a prompt are consecutive), normalised with ``rank_advantages`` and split back.
    """
    sizes = [len(e.index) for e in experiences]
    order = torch.tensor(list(itertools.chain.from_iterable(e.index for e in experiences)))
    raw = torch.cat([e.rewards.float() for e in experiences])
    if raw.dim() != 2:
        raise ValueError(f"Rank-GRPO needs per-rank rewards (b, N) per experience, got shape {tuple(raw.shape)}: "
                         "let the reward function return one list of N rewards per sample")
    rewards = torch.empty_like(raw)
    rewards[order] = raw
    return list(rank_advantages(rewards, n_samples_per_prompt)[order].split(sizes))

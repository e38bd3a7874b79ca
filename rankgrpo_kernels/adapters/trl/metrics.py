"""The adapter's metrics, appended to GRPOTrainer's ``_metrics[mode]`` (``metrics``) over all processes."""

from __future__ import annotations

import torch
from trl.trainer.utils import nanmax, nanmin

from ...contract import POLICY
from ...segments import Segments

TOKEN_MEANS = {"clip_ratio_low": "clip_ratio/low_mean", "clip_ratio_high": "clip_ratio/high_mean",
               "clip_ratio_region": "clip_ratio/region_mean", "ratio_mean": "ratio/mean", "kl": "kl",
               "entropy": "entropy"}
CLIP_MEANS = ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region")


def token_mean_names(loss_type: str) -> dict[str, str]:
    """The statistics GRPOTrainer logs for ``loss_type`` and their names: PPO's clip fractions for the clipped
    surrogates; for ``cispo`` the share of tokens whose weight is clipped (``cispo_clip_ratio``); for ``vespo`` the
    gamma weight (``vespo/phi_seq_mean``: here the token mean of each item's weight, TRL's sequence mean with one
    item per completion of equal lengths); none for ``sapo``."""
    names = {key: name for key, name in TOKEN_MEANS.items() if key not in CLIP_MEANS}
    if POLICY[loss_type] == 0:
        return TOKEN_MEANS
    if loss_type == "cispo":
        names["clip_ratio_high"] = "cispo_clip_ratio"
    if loss_type == "vespo":
        names["weight_mean"] = "vespo/phi_seq_mean"
    return names


def log_rank_metrics(metrics, accelerator, rewards: torch.Tensor, segments: Segments, num_generations: int) -> None:
    """Mean reward of each rank over the whole batch (B_all, N), the share of groups in which a rank's reward has
    zero std (no signal at that rank: TRL's ``frac_reward_zero_std`` sees only the sum over ranks), and how many
    items the completions emitted."""
    zero_std = rewards.view(-1, num_generations, rewards.shape[1]).std(1, unbiased=False) == 0  # (groups, N)
    per_rank = torch.stack([rewards.mean(0), zero_std.float().mean(0)], 1).tolist()
    for rank, (mean, frac_zero_std) in enumerate(per_rank, start=1):
        metrics[f"rewards/rank_{rank}/mean"].append(mean)
        metrics[f"rewards/rank_{rank}/frac_zero_std"].append(frac_zero_std)
    metrics["frac_rank_reward_zero_std"].append(zero_std.float().mean().item())
    overflow = segments.overflow_mask.any(1)
    exact = (segments.items_emitted == segments.max_items) & segments.terminated & ~overflow
    per_row = torch.stack([segments.items_emitted.float(), exact.float(), overflow.float(),
                           (segments.terminated & (segments.items_emitted < segments.max_items)).float()], 1)
    means = accelerator.gather(per_row).mean(0).tolist()
    for name, value in zip(("emitted_mean", "exact_ratio", "overflow_ratio", "early_stop_ratio"), means):
        metrics[f"items/{name}"].append(value)


def log_sampling_ratios(metrics, accelerator, values: torch.Tensor) -> None:
    """TRL's ``sampling/importance_sampling_ratio/{min,mean,max}`` of the item-level weights on the loss tokens
    (``values``, 1-D), in place of the token-level figures TRL appended."""
    empty = torch.zeros((), device=values.device)
    summary = [values.min() if values.numel() else empty, values.mean() if values.numel() else empty,
               values.max() if values.numel() else empty]
    for name, value, reduce in zip(("min", "mean", "max"), summary, (torch.min, torch.mean, torch.max)):
        metrics[f"sampling/importance_sampling_ratio/{name}"][-1] = reduce(accelerator.gather(value)).item()


# means over computed tokens; the value if none was
PER_COMPUTED_TOKEN = {"ratio_mean": 1.0, "entropy": float("nan"), "weight_mean": float("nan")}


def log_token_means(metrics, accelerator, stats: dict[str, torch.Tensor], tokens: torch.Tensor,
                    names: dict[str, str] = TOKEN_MEANS) -> None:
    """The loss statistics ``names`` (``token_mean_names``) as token means over all processes: each process's mean
    weighted by its loss tokens, or, for those in ``PER_COMPUTED_TOKEN``, by the tokens whose log-probs the loss
    computed (``computed_tokens``; items with advantage 0 may be skipped), so that a process that computed none
    neither pulls the mean down nor adds a NaN."""
    present = [key for key in names if key in stats]  # no kl without reference log-probs
    counts = torch.stack([tokens.float(), stats["computed_tokens"].float()])
    weights = [counts[int(key in PER_COMPUTED_TOKEN)] for key in present]
    sums = [torch.where(weight > 0, stats[key].float() * weight, 0.0) for key, weight in zip(present, weights)]
    *totals, all_tokens, all_computed = accelerator.reduce(torch.stack([*sums, *counts]), reduction="sum").tolist()
    for key, total in zip(present, totals):
        count = all_computed if key in PER_COMPUTED_TOKEN else all_tokens
        metrics[names[key]].append(total / count if count else PER_COMPUTED_TOKEN.get(key, 0.0))


def log_sequence_clip_ratios(metrics, accelerator, stats: dict[str, torch.Tensor], loss_mask: torch.Tensor) -> None:
    """TRL's ``clip_ratio/low_min`` and ``clip_ratio/high_max``: the least low-clipped and the most high-clipped
    share of a sequence's loss tokens over the sequences of all processes (sequences without loss tokens left out,
    as TRL's NaN means are)."""
    has_tokens = loss_mask.any(1)
    for key, name, reduce in (("clip_ratio_low_per_row", "clip_ratio/low_min", nanmin),
                              ("clip_ratio_high_per_row", "clip_ratio/high_max", nanmax)):
        per_row = torch.where(has_tokens, stats[key].float(), float("nan"))
        metrics[name].append(reduce(accelerator.gather(per_row)).item())

"""GRPOTrainer's entropy bonus and its adaptive controller, over plain values: the controller's state stays in
GRPOTrainer's attributes (``entropy_coef``, ``_last_world_entropy``, ``_entropy_window_stats``), which TRL
checkpoints."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...contract import WINDOW_TOKEN_NORMALISED


def bonus_coef(coef: float, *, enabled: bool, adaptive: bool, last_world_entropy: float, target: float,
               loss_type: str, accumulation: int) -> float:
    """The entropy bonus's coefficient for one micro-batch, as GRPOTrainer applies it: ``coef``, in adaptive mode
    only while the last step's entropy is at most ``target``; a mean over the loss tokens scaled for gradient
    accumulation only (the loss of the types normalised by the window's tokens is not divided by the window
    afterwards)."""
    if not enabled:
        return 0.0
    if adaptive and last_world_entropy > target:
        coef = 0.0
    return coef / accumulation if loss_type in WINDOW_TOKEN_NORMALISED else coef


def bonus_entropy(mean_entropy: torch.Tensor, tokens: torch.Tensor, high_entropy: torch.Tensor | None,
                  entropies: torch.Tensor | None, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy sum, token count) of the tokens the bonus acts on, which GRPOTrainer's controller measures: every
    loss token (``mean_entropy`` over ``tokens``), or the high-entropy ones when ``high_entropy`` is a mask."""
    if high_entropy is None:
        return mean_entropy.detach() * tokens, tokens
    bonus_tokens = high_entropy & loss_mask
    return torch.where(bonus_tokens, entropies, 0).sum(), bonus_tokens.sum()


def adapt_entropy_coef(coef: float, last_world_entropy: float, window: torch.Tensor | None,
                       entropy_sum: torch.Tensor, tokens: torch.Tensor, *, window_ends: bool,
                       reduce_sum: Callable, args) -> tuple[float, float, torch.Tensor | None]:
    """GRPOTrainer's adaptive entropy controller after one micro-batch: adds its entropy sum and tokens to the
    accumulation ``window``; where the window ends (an optimizer step), its token-weighted entropy over all processes
    (``reduce_sum``) moves ``coef`` by ``args.entropy_coef_delta`` towards ``args.entropy_target``, within
    ``[entropy_coef_min, entropy_coef_max]``. Returns the new (coef, last_world_entropy, window)."""
    stats = torch.stack([entropy_sum.float(), tokens.float()])
    window = stats if window is None else window + stats
    if not window_ends:
        return coef, last_world_entropy, window
    total, count = reduce_sum(window).tolist()
    world_entropy = total / max(count, 1.0)
    step = args.entropy_coef_delta if world_entropy <= args.entropy_target else -args.entropy_coef_delta
    return min(max(coef + step, args.entropy_coef_min), args.entropy_coef_max), world_entropy, None

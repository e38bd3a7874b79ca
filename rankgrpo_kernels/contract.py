"""The contract every layer shares: loss types, statistic names, the two settings specs and the token-level batch.

``reference.py`` (the spec), the public API, the custom ops and every backend import these names from here, so that
the kernels and the spec can never disagree on a constant. Nothing here computes the loss.

Settings travel as two frozen specs, validated once when built: ``LossSpec`` (the objective) and ``HeadSpec`` (how
the LM head's logits are formed and computed). They cross every internal boundary whole; the custom ops take their
fields as arguments (``boundary.py`` derives each op's schema from the fields and rebuilds the specs by name). A new
loss option is one ``LossSpec`` field, its maths in ``reference.py`` and its use in each backend's
``segment_loss``; a new per-token input is one ``TokenBatch`` field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

# The log of every ratio (an item's mean log-ratio, r - l in the k3 KL) is clamped to at most this: e^20 ~ 4.9e8,
# far beyond any ratio PPO clipping lets through, so finite inputs stay finite.
LOG_RATIO_LIMIT = 20.0
# The kernels scale the logits by float32 factors (1 / temperature times logit_scale or logit_softcap): one past this
# would turn finite logits into inf - inf = NaN.
FLOAT32_MAX = torch.finfo(torch.float32).max
# Each loss type and the weighting of its policy terms in the compiled segment-loss kernels (0: 1 / (normaliser M_i)
# with normaliser = B, 1: 1 / normaliser, 2: 1 / (normaliser n_k)); the normalisers are in ``inputs.normaliser``.
WEIGHTING = {"grpo": 0, "bnpo": 1, "dr_grpo": 1, "dapo": 1, "rank": 2, "luspo": 1, "sapo": 0, "cispo": 1,
             "vespo": 1}
LOSS_TYPES = tuple(WEIGHTING)
# Each loss type's policy term of its item ratio w (the kernels' POLICY; reference.py has the maths):
# 0 PPO's clipped surrogate -min(w' a, clip(w) a); 1 GMPO's -w a with the tokens' log-ratios clipped inside w (a
# PPO loss type with ratio_clip="token"); 2 SAPO's soft gate -(4 / tau) sigmoid(tau (w - 1)) a; from
# FIRST_REINFORCE on, REINFORCE terms with a detached weight (no gradient through w): 3 CISPO's
# -sg(min(w, epsilon_high)) a l, 4 VESPO's -sg(phi(W)) a l with W the item's product of token ratios.
POLICY = {name: {"sapo": 2, "cispo": 3, "vespo": 4}.get(name, 0) for name in LOSS_TYPES}
GMPO_POLICY = 1
FIRST_REINFORCE = 3
# The loss types normalised by num_items_in_batch: the loss tokens of TRL's accumulation window.
WINDOW_TOKEN_NORMALISED = ("dapo", "cispo", "vespo")
# Where PPO's clipping acts: "item" on the item ratio (Rank-GRPO), "token" on each token's log-ratio inside the
# item's geometric mean (GMPO), in log space, sign-aware; the policy term is then -w a.
RATIO_CLIPS = ("item", "token")
# VESPO's clamp of log W from below (TRL's log(1e-8), after the authors' code) and of its lambdas.
VESPO_LOG_W_MIN = math.log(1e-8)
VESPO_LAMBDA_MIN = 1e-4
STAT_NAMES = ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean", "kl", "entropy",
              "weight_mean")
# Per-row statistics (B,): the fractions of each row's loss tokens whose item ratio is clipped low / high (TRL logs
# their minimum and maximum over sequences). The segment loss returns their counts (B, 2), which chunks add up.
ROW_STAT_NAMES = ("clip_ratio_low_per_row", "clip_ratio_high_per_row")


def _number(spec, name) -> float:
    """The field ``name`` of ``spec`` stored as a plain float (ints and numpy scalars accepted); a bool or a
    non-number is a ValueError naming the field."""
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    object.__setattr__(spec, name, float(value))
    return getattr(spec, name)


def _optional_positive_int(spec, name) -> None:
    value = getattr(spec, name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")


@dataclass(frozen=True)
class LossSpec:
    """The per-run settings of the Rank-GRPO objective (see ``rank_grpo_loss`` for their maths).

    ``epsilon_low``, ``epsilon_high``: the clip range ``[1 - epsilon_low, 1 + epsilon_high]``; ``delta``: the
    optional upper bound of the unclipped ratio (> 1); ``beta``: the weight of the k3 KL; ``loss_type``: one of
    ``LOSS_TYPES``, with its normaliser inputs ``max_completion_length`` (``dr_grpo``'s L_max, default T) and
    ``rec_num`` (``rank``'s N, default K of per-rank advantages); ``entropy_coef``: the entropy bonus
    ``loss -= entropy_coef * mean H`` of the fused loss. ``sapo_temperature_pos`` / ``_neg``: SAPO's gate
    temperatures for tokens with a > 0 / a <= 0; ``vespo_k_pos``, ``vespo_lambda_pos``, ``vespo_k_neg``,
    ``vespo_lambda_neg``: VESPO's gamma weight for a >= 0 / a < 0 (TRL's names and defaults);
    ``use_bias_correction_kl``: the KL term (and its statistic) weighted by the item ratio, ``w_k KL_t``, with its
    gradient through ``w_k`` (TRL's DeepSeek-V3.2 correction, at item level); ``ratio_clip``: ``"item"`` (PPO's
    clip of the item ratio) or ``"token"`` (GMPO: each token's log-ratio clipped to ``[-epsilon_low, epsilon_high]``,
    sign-aware, inside the item's geometric mean; TRL's GMPOTrainer with one item per completion). With
    ``loss_type="cispo"`` ``epsilon_high`` bounds the detached item ratio itself (TRL's meaning; ScaleRL uses 5.0)
    and ``epsilon_low`` is unused; ``delta`` belongs to PPO's clipped surrogate and is refused with the loss types
    that have none (sapo, cispo, vespo)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    beta: float = 0.0
    loss_type: str = "bnpo"
    max_completion_length: int | None = None
    rec_num: int | None = None
    entropy_coef: float = 0.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    use_bias_correction_kl: bool = False
    ratio_clip: str = "item"

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not (0.0 <= _number(self, "epsilon_low") < 1.0):
            raise ValueError(f"epsilon_low must be in [0, 1), got {self.epsilon_low!r}")
        if not (0.0 <= _number(self, "epsilon_high") < math.inf):
            raise ValueError(f"epsilon_high must be finite and >= 0, got {self.epsilon_high!r}")
        if self.delta is not None and not (1.0 < _number(self, "delta") < math.inf):
            raise ValueError(f"delta must be None or a finite number > 1, got {self.delta!r}")
        if not (0.0 <= _number(self, "beta") < math.inf):
            raise ValueError(f"beta must be finite and >= 0, got {self.beta!r}")
        if not math.isfinite(_number(self, "entropy_coef")):
            raise ValueError(f"entropy_coef must be a finite number, got {self.entropy_coef!r}")
        _optional_positive_int(self, "max_completion_length")
        _optional_positive_int(self, "rec_num")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not (0.0 < _number(self, name) < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            if not (0.0 <= _number(self, name) < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        if self.ratio_clip not in RATIO_CLIPS:
            raise ValueError(f"ratio_clip must be one of {RATIO_CLIPS}, got {self.ratio_clip!r}")
        if self.ratio_clip == "token" and (POLICY[self.loss_type] != 0 or self.delta is not None):
            raise ValueError(f"ratio_clip='token' (GMPO) clips inside the geometric mean in place of PPO's clipped "
                             f"surrogate: it needs a loss type with that surrogate (not {self.loss_type!r}) and no "
                             "delta")
        if POLICY[self.loss_type] != 0 and self.delta is not None:
            raise ValueError(f"delta bounds the unclipped ratio of PPO's clipped surrogate; loss_type="
                             f"{self.loss_type!r} has none: leave delta None")

    @property
    def policy(self) -> int:
        """The kernels' policy term: ``POLICY[loss_type]``, or ``GMPO_POLICY`` with ``ratio_clip="token"``."""
        return GMPO_POLICY if self.ratio_clip == "token" else POLICY[self.loss_type]

    @property
    def reinforce(self) -> bool:
        """Whether the policy term is a REINFORCE term with a detached weight (cispo, vespo): its gradient reaches
        each token directly, not through the item ratio, and ``weight_mean`` reports the weight."""
        return self.policy >= FIRST_REINFORCE

    @property
    def sapo_temperatures(self) -> tuple[float, float]:
        """(tau_pos, tau_neg) as the kernels take them."""
        return self.sapo_temperature_pos, self.sapo_temperature_neg

    @property
    def vespo_gamma(self) -> tuple[float, float, float, float]:
        """(k_pos, lambda_pos, k_neg, lambda_neg) as the kernels take them: each lambda at least
        ``VESPO_LAMBDA_MIN`` (TRL's clamp)."""
        return (self.vespo_k_pos, max(self.vespo_lambda_pos, VESPO_LAMBDA_MIN), self.vespo_k_neg,
                max(self.vespo_lambda_neg, VESPO_LAMBDA_MIN))

    @property
    def clip_bounds(self) -> tuple[float, float]:
        """(lo, hi) of the kernels' clamp and clip counts: PPO's clip range ``[1 - eps_low, 1 + eps_high]`` (also
        SAPO's statistics); CISPO's ``(0, eps_high)``: ``hi`` bounds the weight, no ratio lies below ``lo``, and
        the high count is TRL's ``cispo_clip_ratio``; VESPO clips nothing: ``(0, inf)``; with ``ratio_clip="token"``
        the bounds of each token's log-ratio, ``(-eps_low, eps_high)``."""
        if self.ratio_clip == "token":
            return -self.epsilon_low, self.epsilon_high
        if self.loss_type == "cispo":
            return 0.0, self.epsilon_high
        if self.loss_type == "vespo":
            return 0.0, math.inf
        return 1.0 - self.epsilon_low, 1.0 + self.epsilon_high


@dataclass(frozen=True)
class HeadSpec:
    """How raw logits ``acc = h W^T`` become the policy's, and how the head is computed.

    ``z = S(logit_scale (acc + b)) / temperature`` with ``S(u) = logit_softcap tanh(u / logit_softcap)`` (the
    identity when None; Gemma-2's final_logit_softcapping, Cohere's logit_scale), so ``dz/dacc = logit_scale S'(u) /
    temperature``: the row pass writes D times ``S'(u)`` and the gradient GEMMs scale its rows by ``row_scale``
    (times ``g``). ``memory_budget_bytes``: the logits scratch of one call (None: ``RANKGRPO_MEMORY_BUDGET`` or the
    device default, ``settings.py``); ``backend``: ``"auto"`` or a registered backend; ``skip_zero_advantage``:
    leave the items whose every advantage is 0 out of the GEMMs when nothing else reads them.
    ``inputs.resolve_head`` fixes ``"auto"`` and the budget for the tensors of a call, before the custom ops.
    The factors the kernels scale the logits by (``1 / temperature`` times ``logit_scale`` or ``logit_softcap``,
    ``logit_scale / logit_softcap``) must be float32 numbers: a smaller temperature is refused."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    logit_softcap: float | None = None
    memory_budget_bytes: int | None = None
    backend: str = "auto"
    skip_zero_advantage: bool = True

    def __post_init__(self):
        if not (0.0 < _number(self, "temperature") < math.inf):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (0.0 < _number(self, "logit_scale") < math.inf):
            raise ValueError(f"logit_scale must be a finite number > 0, got {self.logit_scale!r}")
        if self.logit_softcap is not None and not (0.0 < _number(self, "logit_softcap") < math.inf):
            raise ValueError(f"logit_softcap must be None or a finite number > 0, got {self.logit_softcap!r}")
        largest = max(1.0, self.logit_scale, self.logit_softcap or 0.0)
        if largest / self.temperature > FLOAT32_MAX:
            raise ValueError(f"temperature={self.temperature!r} is too small: max(1, logit_scale, logit_softcap) / "
                             f"temperature = {largest!r} / {self.temperature!r} overflows float32")
        if self.logit_softcap is not None and self.logit_scale / self.logit_softcap > FLOAT32_MAX:
            raise ValueError(f"logit_scale / logit_softcap = {self.logit_scale!r} / {self.logit_softcap!r} "
                             "overflows float32")
        if not isinstance(self.backend, str):
            raise ValueError(f"backend must be a str, got {self.backend!r}")
        object.__setattr__(self, "skip_zero_advantage", bool(self.skip_zero_advantage))

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def row_scale(self) -> float:
        return self.logit_scale / self.temperature


@dataclass
class TokenBatch:
    """Token-level inputs of the segment loss, all (B, T) on one device.

    ``group`` holds dense group ids (one per distinct (row, item id)), -1 outside the loss; those of row b lie in
    [b*T, b*T + T), as ``dense_groups`` numbers them (``rows`` and ``row_relative_groups`` rely on it);
    ``mask`` is True exactly where ``group >= 0``. ``normaliser`` is the scalar of the loss type (B for grpo,
    sum M for bnpo, B * L_max for dr_grpo, num_items_in_batch for dapo, B * N for rank) and ``tokens`` the number
    of loss tokens (clamped to >= 1), both of the whole batch; ``policy_weights`` (or None: 1) multiply each
    token's policy term (not its KL term, not the statistics): a slice of rows (``rows``) keeps them, so its loss
    and statistics are its exact share of the batch's and the shares add up. ``entropy_mask`` (bool, or None: every
    loss token) marks the loss tokens the entropy bonus averages over.
    """

    logps: torch.Tensor | None
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    advantages: torch.Tensor
    group: torch.Tensor
    mask: torch.Tensor
    normaliser: torch.Tensor
    tokens: torch.Tensor
    entropy: torch.Tensor | None = None
    policy_weights: torch.Tensor | None = None
    entropy_mask: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> "TokenBatch":
        """Rows [start, stop) with their group ids rebased to the slice; normaliser and tokens stay the batch's."""
        T = self.mask.shape[1]
        per_token = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[start:stop]
                     for f in dataclasses.fields(self) if f.name not in ("normaliser", "tokens")}
        per_token["group"] = torch.where(per_token["mask"], per_token["group"] - start * T, -1)
        return TokenBatch(**per_token, normaliser=self.normaliser, tokens=self.tokens)


def check_tensor(x, name, shape=None, kind="float", device=None, optional=False):
    """Check type, dtype kind ('float' | 'int' | 'mask'), shape and device of one argument."""
    if x is None:
        if not optional:
            raise ValueError(f"{name} is required")
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if kind == "float" and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if kind == "int" and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if kind == "mask" and (x.dtype.is_floating_point or x.dtype.is_complex):
        raise TypeError(f"{name} must be a bool or integer tensor (a mask), got {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device}")


def dense_groups(item_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Map each distinct item id of a row to a dense id in [row*T, row*T + T); -1 where ``mask`` is False.

    Sorting each row keeps this free of host synchronisation and of any bound on the id values.
    """
    B, T = item_ids.shape
    key = torch.where(mask, item_ids.long(), torch.iinfo(torch.int64).max)
    sorted_key, order = key.sort(dim=1, stable=True)
    starts = torch.ones_like(sorted_key, dtype=torch.bool)
    starts[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    rank = torch.empty_like(order).scatter_(1, order, starts.long().cumsum(1) - 1)
    rows = torch.arange(B, device=item_ids.device).unsqueeze(1) * T
    return torch.where(mask, rank + rows, -1)


def stats_dict(stats: torch.Tensor, row_clipped: torch.Tensor, mask: torch.Tensor, has_kl: bool,
               has_entropy: bool, computed: torch.Tensor | None = None, has_weight: bool = False
               ) -> dict[str, torch.Tensor]:
    """Name the entries of the statistics vector of ``segment_loss``, leaving out those that were not computed, and
    add the per-row clip fractions from its per-row clip counts (B, 2) and the loss mask (B, T) (0 for a row
    without loss tokens), and ``computed_tokens``: ``computed``, the number of loss tokens whose log-probs were
    computed (None: every loss token), over which ``ratio_mean`` and ``entropy`` are means; a mean of them over
    micro-batches or processes weights each by it; ``weight_mean`` (``has_weight``: ``LossSpec.reinforce``) is the
    token mean of the detached weight of the REINFORCE term. All detached."""
    named = dict(zip(STAT_NAMES, stats.detach().unbind(0)))
    row_clipped = row_clipped.detach()
    fractions = row_clipped / mask.sum(1, keepdim=True).clamp(min=1).to(row_clipped.dtype)
    named.update(zip(ROW_STAT_NAMES, fractions.unbind(1)))
    named["computed_tokens"] = (mask.sum() if computed is None else computed.detach()).to(stats.dtype)
    if not has_kl:
        del named["kl"]
    if not has_entropy:
        del named["entropy"]
    if not has_weight:
        del named["weight_mean"]
    return named

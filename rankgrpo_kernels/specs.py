"""The two settings specs, frozen and validated once when built: ``LossSpec`` (the objective) and ``HeadSpec`` (how
the LM head's logits are formed and computed).

They cross every internal boundary whole; the custom ops take their fields as arguments (``boundary.py`` derives
each op's schema from the fields and rebuilds the specs by name). A new loss option is one ``LossSpec`` field, its
maths in ``reference.py`` and its use in each backend's ``segment_loss``. The tables they check against (loss
types, policy terms) are in ``contract.py``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .contract import FIRST_REINFORCE, GMPO_POLICY, LOSS_TYPES, POLICY, VESPO_LAMBDA_MIN

# The kernels scale the logits by float32 factors (1 / temperature times logit_scale or logit_softcap): one past this
# would turn finite logits into inf - inf = NaN.
FLOAT32_MAX = torch.finfo(torch.float32).max
# Where PPO's clipping acts: "item" on the item ratio (Rank-GRPO), "token" on each token's log-ratio inside the
# item's geometric mean (GMPO), in log space, sign-aware; the policy term is then -w a.
RATIO_CLIPS = ("item", "token")


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

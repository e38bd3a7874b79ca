"""``RankGRPOConfig``, and the checks of what the adapter supports: the TRL release and the FSDP version."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch
from packaging.version import Version

from ...contract import LOSS_TYPES, LossSpec
from ...importance import ITEM_IS_MODES
from ...rewards import ADVANTAGE_SCALES, rank_rewards

SUPPORTED_TRL = (Version("1.16"), Version("1.17"))  # [low, high): the private GRPOTrainer methods overridden here
TRL_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def check_trl_version(installed: str) -> None:
    """Raise ``ImportError`` unless ``installed`` lies in the supported TRL range (>=1.16,<1.17)."""
    low, high = SUPPORTED_TRL
    if not low <= Version(installed) < high:
        raise ImportError(
            f"rankgrpo_kernels.adapters.trl supports trl>={low},<{high}, found trl {installed}: it overrides "
            f"private GRPOTrainer methods whose signatures change between releases. Install a supported release: "
            f"pip install 'trl>={low},<{high}'"
        )


# Before anything imports trl: the package imports this module first.
try:
    check_trl_version(version("trl"))
except PackageNotFoundError:
    raise ImportError("rankgrpo_kernels.adapters.trl needs TRL: pip install 'rankgrpo-kernels[trl]' "
                      "(or pip install 'trl>=1.16,<1.17')") from None

from trl import GRPOConfig  # noqa: E402

FSDP1_MESSAGE = (
    "RankGRPOTrainer supports FSDP version 2 (fully_shard, DTensor parameters), not FSDP version 1: set "
    "fsdp_version: 2 in the accelerate config (or fsdp_config={{'version': 2}} in the training arguments). "
    "Found fsdp_version={version}."
)


@dataclass
class RankGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the Rank-GRPO settings.

    Inherited fields with new defaults: ``loss_type="bnpo"``, ``epsilon=0.06``, ``epsilon_high=0.08`` (the released
    runs) and ``use_bias_correction_kl=False`` (the spec's plain k3 KL). ``beta`` keeps TRL's default 0.0; the
    released runs used 1e-3, which needs a reference model (TRL loads it from the policy's path). ``scale_rewards``
    ("group" | "batch" | "none") scales the per-rank advantages; ``reward_weights`` weight the per-rank rewards of
    several reward functions. ``temperature`` is the sampling temperature, used by the loss's log-probs too.
    """

    rec_num: int = field(default=20, metadata={"help": "N, the number of ranks (items) each completion lists."})
    reward_kind: str = field(
        default="exp_inf",
        metadata={"help": "How per-rank hits become per-rank rewards: 'exp_inf' (as they are), 'exp' (discounted "
                          "by reward_gamma) or 'dcg' (causal DCG)."},
    )
    reward_gamma: float | None = field(default=None, metadata={"help": "Gamma > 1 of reward_kind='exp'."})
    skip_blank_lines: bool = field(
        default=True,
        metadata={"help": "Aligned segmentation: blank lines start no item, as split_items(text) splits. False "
                          "counts every newline (the authors' segmentation)."},
    )
    length_shaping: bool = field(
        default=True, metadata={"help": "Code form only: add the three length-shaping terms below."}
    )
    overflow_penalty: float = field(default=-0.1, metadata={"help": "Added to every token past item N."})
    end_of_list_bonus: float = field(default=0.1, metadata={"help": "Added to the EOS of a list of exactly N items."})
    early_stop_penalty: float = field(default=-0.1, metadata={"help": "Added to the EOS of a list of < N items."})
    loss_type: str = field(
        default="bnpo",
        metadata={"help": "'grpo', 'bnpo', 'dr_grpo', 'dapo' (the code form, TRL's aggregations) or 'rank' (the "
                          "paper form: -(1/(B N)) sum over items, EOS and overflow tokens outside the loss)."},
    )
    epsilon: float = field(default=0.06, metadata={"help": "Lower clip range of the item ratio."})
    epsilon_high: float | None = field(default=0.08, metadata={"help": "Upper clip range of the item ratio."})
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={"help": "Must stay False: Rank-GRPO's KL is the plain k3 estimator (TRL's default True weights "
                          "it by the token ratio)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.rec_num, int) or isinstance(self.rec_num, bool) or self.rec_num < 1:
            raise ValueError(f"rec_num must be an int >= 1, got {self.rec_num!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"RankGRPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        rank_rewards(torch.zeros(1, self.rec_num), self.reward_kind, self.reward_gamma)  # validates kind and gamma
        epsilon_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        LossSpec(self.epsilon, epsilon_high, self.delta, self.beta, self.loss_type)  # validates the loss settings
        if self.scale_rewards not in ADVANTAGE_SCALES:
            raise ValueError(f"scale_rewards must be one of {ADVANTAGE_SCALES}, got {self.scale_rewards!r}")
        unsupported = [
            (self.importance_sampling_level != "token",
             "importance_sampling_level: Rank-GRPO's ratio is per item (the geometric mean over the item's tokens); "
             "leave it at 'token'"),
            (self.multi_objective_aggregation != "sum_then_normalize",
             "multi_objective_aggregation: per-rank rewards are summed with reward_weights, then normalised per rank"),
            (self.use_bias_correction_kl, "use_bias_correction_kl"),
            (self.vllm_importance_sampling_mode not in TRL_IS_MODES + ITEM_IS_MODES,
             f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r}: use one of "
             f"{TRL_IS_MODES + ITEM_IS_MODES}"),
        ]
        for is_set, what in unsupported:
            if is_set:
                raise ValueError(f"RankGRPOConfig does not support {what}")


def check_fsdp_plugin(fsdp_plugin) -> None:
    """Raise ``NotImplementedError`` (``FSDP1_MESSAGE``) unless accelerate's FSDP plugin runs FSDP version 2."""
    version = getattr(fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise NotImplementedError(FSDP1_MESSAGE.format(version=version))

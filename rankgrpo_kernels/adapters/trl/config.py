"""``RankGRPOConfig``, and the checks of what the adapter supports: the TRL release and the FSDP version."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

from ...contract import LOSS_TYPES
from ...importance import ITEM_IS_MODES
from ...objective import IMPORTANCE_SAMPLING_LEVELS, LIST_REWARDS, ObjectiveSpec
from ...specs import LossSpec

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
    runs) and ``use_bias_correction_kl=False`` (the spec's plain k3 KL; True weights it by the item ratio). ``beta``
    keeps TRL's default 0.0; the released runs used 1e-3, which needs a reference model (TRL loads it from the
    policy's path). ``scale_rewards`` ("group" | "batch" | "none") scales the per-rank advantages;
    ``reward_weights`` weight the per-rank rewards of several reward functions, summed before the normalisation or,
    with ``multi_objective_aggregation="normalize_then_sum"`` (GDPO), after each function's own, per rank.
    ``temperature`` is the sampling temperature, used by the loss's log-probs too.
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
        metadata={"help": "'grpo', 'bnpo', 'dr_grpo', 'dapo', 'luspo' (the code form, TRL's aggregations), 'sapo', "
                          "'cispo', 'vespo' (TRL's other policy terms, of the item ratio) or 'rank' (the paper form: "
                          "-(1/(B N)) sum over items, EOS and overflow tokens outside the loss)."},
    )
    epsilon: float = field(default=0.06, metadata={"help": "Lower clip range of the item ratio."})
    epsilon_high: float | None = field(default=0.08, metadata={"help": "Upper clip range of the item ratio."})
    importance_sampling_level: str = field(
        default="item",
        metadata={"help": f"The unit of the importance ratio, one of {IMPORTANCE_SAMPLING_LEVELS}: 'item' (Rank-GRPO: "
                          "the geometric mean over each item's tokens), 'token' (each token's own ratio) or 'sequence' "
                          "(the geometric mean over the completion's loss tokens). rankgrpo_kernels.objective."},
    )
    list_reward: str | None = field(
        default=None,
        metadata={"help": f"None: per-rank rewards and advantages (Rank-GRPO). One of {LIST_REWARDS}: one reward per "
                          "list from the per-rank rewards ('dcg': rank k weighted by 1/log2(k+2); 'sum') and one "
                          "advantage per completion, the GRPO (importance_sampling_level='token') and GSPO "
                          "('sequence') baselines of the paper."},
    )
    ratio_clip: str = field(
        default="item",
        metadata={"help": "'item': PPO's clip of the item ratio. 'token': GMPO's, each token's log-ratio clipped to "
                          "[-epsilon, epsilon_high] (log space; GMPO recommends 0.4) inside the item's geometric "
                          "mean, for loss types with PPO's clipped surrogate (TRL's experimental GMPOTrainer with "
                          "one item per completion and loss_type='grpo')."},
    )
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={"help": "False: Rank-GRPO's plain k3 KL. True: each token's KL weighted by its item ratio, with "
                          "the gradient through it (TRL's default, DeepSeek-V3.2's correction, at item level)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.rec_num, int) or isinstance(self.rec_num, bool) or self.rec_num < 1:
            raise ValueError(f"rec_num must be an int >= 1, got {self.rec_num!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"RankGRPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        self.objective.check_loss_type(self.loss_type)  # builds (validates) the objective's fields too
        self.loss_spec()  # validates the loss settings
        unsupported = [
            (self.loss_type == "vespo" and self.use_vllm and self.vllm_importance_sampling_correction,
             "loss_type='vespo' with vllm_importance_sampling_correction: TRL folds the sampler's ratio into VESPO's "
             "gamma weight, which the item-level weight does not take"),
            (self.ratio_clip == "token" and self.top_entropy_quantile < 1.0,
             "ratio_clip='token' with top_entropy_quantile < 1: GMPO leaves the low-entropy tokens out of the "
             "geometric mean itself, while the item ratio averages every token of its item"),
            (self.vllm_importance_sampling_mode not in TRL_IS_MODES + ITEM_IS_MODES,
             f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r}: use one of "
             f"{TRL_IS_MODES + ITEM_IS_MODES}"),
        ]
        for is_set, what in unsupported:
            if is_set:
                raise ValueError(f"RankGRPOConfig does not support {what}")

    def loss_spec(self, entropy_coef: float = 0.0) -> LossSpec:
        """The loss settings of this config (``epsilon_high`` None: ``epsilon``, as GRPOTrainer reads it), with the
        entropy bonus's coefficient of one micro-batch."""
        return LossSpec(
            epsilon_low=self.epsilon, epsilon_high=self.epsilon if self.epsilon_high is None else self.epsilon_high,
            delta=self.delta, beta=self.beta, loss_type=self.loss_type,
            max_completion_length=self.max_completion_length, rec_num=self.rec_num, entropy_coef=entropy_coef,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos, vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg, use_bias_correction_kl=self.use_bias_correction_kl,
            ratio_clip=self.ratio_clip,
        )

    @property
    def objective(self) -> ObjectiveSpec:
        """The rewards-to-advantages settings of this config as the ``ObjectiveSpec`` the scoring uses."""
        return ObjectiveSpec(
            reward_kind=self.reward_kind, reward_gamma=self.reward_gamma, scale_rewards=self.scale_rewards,
            multi_objective_aggregation=self.multi_objective_aggregation,
            list_reward=self.list_reward, importance_sampling_level=self.importance_sampling_level,
            length_shaping=self.length_shaping, overflow_penalty=self.overflow_penalty,
            end_of_list_bonus=self.end_of_list_bonus, early_stop_penalty=self.early_stop_penalty,
        )


def check_fsdp_plugin(fsdp_plugin) -> None:
    """Raise ``NotImplementedError`` (``FSDP1_MESSAGE``) unless accelerate's FSDP plugin runs FSDP version 2."""
    version = getattr(fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise NotImplementedError(FSDP1_MESSAGE.format(version=version))


def warn_truncated_sampling(args: RankGRPOConfig) -> None:
    """Warn when vLLM samples from a truncated distribution (``top_p < 1``, ``top_k > 0``, ``min_p > 0``) while the
    importance-sampling correction is on: the sampler's log-probs are then over the truncated support, not the
    policy's, so the trainer/sampler ratio is biased (TRL issue 6789)."""
    truncated = [name for name, on in (("top_p", args.top_p < 1.0), ("top_k", (args.top_k or 0) > 0),
                                       ("min_p", (args.min_p or 0.0) > 0.0)) if on]
    if truncated and args.use_vllm and args.vllm_importance_sampling_correction:
        warnings.warn(f"{', '.join(truncated)} truncate vLLM's sampling distribution while "
                      "vllm_importance_sampling_correction is on: the sampler's log-probs are over the truncated "
                      "support, which biases the importance-sampling ratio (TRL issue 6789). Sample from the full "
                      "distribution (top_p=1.0, top_k=0, min_p=None) or turn the correction off", stacklevel=3)

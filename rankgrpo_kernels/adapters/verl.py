"""Rank-GRPO in verl 0.9 (``verl==0.9.*``), through its registries and its loss hook.

verl's registries see no token ids, so the work is split three ways:

* advantage estimator ``"rank_grpo"`` (``core_algos.register_adv_est``): per-rank rewards (B, N), written by the
  reward manager into the first N columns of ``token_level_rewards`` (``pack_rank_values``), become per-rank group
  advantages ``A[i, k] = (r[i, k] - mean_g r[g, k]) / (std_g r[g, k] + 1e-4)`` over the samples of one ``uid``,
  returned in the same packed layout;
* the loss hook ``rank_grpo_ppo_loss(config, model_output, data)`` (verl's ``ppo_loss`` signature, set with
  ``actor.set_loss_fn``): it sees the whole micro-batch, segments ``data["responses"]`` into items, spreads the
  packed per-rank advantages over the item tokens and runs verl's own ``ppo_loss`` (entropy, KL loss, metrics)
  with the item ids bound for
* policy loss ``"rank_grpo"`` (``core_algos.register_policy_loss``, ``actor.policy_loss.loss_mode=rank_grpo``):
  the item-level ratio ``w_k = exp(mean_{t in k} (l_t - o_t))`` with verl's clip range, dual clip and
  ``loss_agg_mode``.

``install(tokenizer, rec_num)`` registers all three; ``patch_fused_logprobs()`` swaps verl's
``FusedLinearForPPO`` (the ``use_fused_kernels=True`` path) for ``fused_logprobs``. Run both in every process, the
Ray workers included (see ``integrations/verl/README.md``). All tensors here are (B, T) over the response tokens.

The loss hook and the policy loss need settings (N = ``rec_num``, the tokenizer's newline table and EOS id,
``form``, ``skip_blank_lines``); the estimator needs none. They come from ``install(tokenizer, rec_num)`` or from the
actor's config that verl hands to both: ``actor_rollout_ref.actor.policy_loss`` as a ``RankGRPOPolicyLossConfig``
(``rec_num``, ``form``, ``skip_blank_lines``) and the tokenizer verl loads for the actor
(``config.model_config.tokenizer``). A value given both ways must agree; one given neither way is an error that
names both.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from verl.trainer.ppo import core_algos
from verl.utils import torch_functional as verl_F
from verl.workers.config.actor import PolicyLossConfig
from verl.workers.utils import losses

from ..functional import fused_logprobs
from ..rewards import rank_advantages, token_advantages
from ..segments import line_table, segment_items
from .common import check_form, framework_loss
from .hf_model import logit_transform

NAME = "rank_grpo"
_ITEM_IDS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("rank_grpo_item_ids", default=None)
_SETTINGS: dict[str, Any] = {}  # what install() was given in this process
_CONFIG_KEYS = ("rec_num", "form", "skip_blank_lines")
_DEFAULTS = {"form": "code", "skip_blank_lines": True}
SETUP_HINT = (
    "call rankgrpo_kernels.adapters.verl.install(tokenizer, rec_num) in every process (the Ray workers' "
    "worker_process_setup_hook, integrations/verl/README.md), or install() there and the settings in verl's config: "
    "actor_rollout_ref.actor.policy_loss._target_=rankgrpo_kernels.adapters.verl.RankGRPOPolicyLossConfig "
    "+actor_rollout_ref.actor.policy_loss.rec_num=N"
)


@dataclass
class RankGRPOPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` (``actor_rollout_ref.actor.policy_loss``) with the Rank-GRPO settings, so that a
    run can carry them in its config instead of ``install()``'s arguments::

        actor_rollout_ref.actor.policy_loss._target_=rankgrpo_kernels.adapters.verl.RankGRPOPolicyLossConfig
        actor_rollout_ref.actor.policy_loss.loss_mode=rank_grpo +actor_rollout_ref.actor.policy_loss.rec_num=20

    ``None`` leaves a setting to ``install()`` (or its default: ``form="code"``, ``skip_blank_lines=True``). The
    tokenizer comes from ``actor_rollout_ref.model`` (verl loads it for the actor). The setup hook still runs
    ``install()`` (without arguments) in every process: it registers the estimator, the policy loss and the hook.
    """

    loss_mode: str = NAME
    rec_num: Optional[int] = None
    form: Optional[str] = None
    skip_blank_lines: Optional[bool] = None

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        for key in _CONFIG_KEYS:
            if getattr(self, key) is not None:
                _check_setting(key, getattr(self, key))


def _get(section, key):
    """``section[key]`` for verl's configs (``DictConfig``, ``BaseConfig``, dict), None when absent."""
    if section is None:
        return None
    getter = getattr(section, "get", None)
    return getter(key) if callable(getter) else getattr(section, key, None)


def _check_setting(key: str, value):
    if key == "rec_num" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"rec_num must be an int >= 1, got {value!r}")
    if key == "form":
        check_form(value)
    if key == "skip_blank_lines" and not isinstance(value, bool):
        raise ValueError(f"skip_blank_lines must be a bool, got {value!r}")
    return value


def _setting(key: str, section, where: str):
    """One setting from verl's config ``section`` or from ``install()``; both must agree; a default or an error."""
    from_config, from_install = _get(section, key), _SETTINGS.get(key)
    if from_config is not None:
        _check_setting(key, from_config)
    if from_config is not None and from_install is not None and from_config != from_install:
        raise ValueError(f"Rank-GRPO's {key} is {from_config!r} in verl's config ({where}) but install() was given "
                         f"{from_install!r}: set it one way, or the same in both")
    value = from_config if from_config is not None else from_install
    if value is None:
        if key in _DEFAULTS:
            return _DEFAULTS[key]
        raise RuntimeError(f"Rank-GRPO's verl adapter has no {key} in this process ({where}): {SETUP_HINT}")
    return value


def _segmentation(config) -> dict[str, Any]:
    """Everything the loss hook needs, from ``install()`` or the actor's config (``ActorConfig``)."""
    where = "actor_rollout_ref.actor.policy_loss"
    policy_loss = _get(config, "policy_loss")
    settings = {key: _setting(key, policy_loss, where) for key in _CONFIG_KEYS}
    if "table" in _SETTINGS:
        settings.update(table=_SETTINGS["table"], eos_token_id=_SETTINGS["eos_token_id"])
    else:
        tokenizer = _get(_get(config, "model_config"), "tokenizer")
        if tokenizer is None:
            raise RuntimeError("Rank-GRPO's verl adapter has no tokenizer in this process (neither install() nor the "
                               f"actor's config.model_config.tokenizer): {SETUP_HINT}")
        settings.update(table=line_table(tokenizer), eos_token_id=tokenizer.eos_token_id)
    return settings


def pack_rank_values(values: torch.Tensor, response_length: int) -> torch.Tensor:
    """(B, N) per-rank values -> (B, T) with ``values[:, k]`` in column k, zeros after: verl's token-level layout."""
    B, N = values.shape
    if N > response_length:
        raise ValueError(f"rec_num={N} exceeds the response length {response_length}")
    return torch.cat([values, values.new_zeros(B, response_length - N)], 1)


def _group_rows(index: np.ndarray) -> tuple[torch.Tensor, int]:
    """A permutation that makes the samples of each uid consecutive, and the group size G (equal for all)."""
    _, inverse, counts = np.unique(index, return_inverse=True, return_counts=True)
    if counts.min() != counts.max():
        raise ValueError(f"Rank-GRPO needs the same number of samples per prompt, got sizes {sorted(set(counts))}")
    return torch.from_numpy(np.argsort(inverse, kind="stable")), int(counts[0])


def compute_rank_grpo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray,
                                config=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator: packed per-rank rewards (B, T) -> packed per-rank group advantages (B, T).

    Rows with the same ``index`` (uid) form a group; ``rank_advantages`` normalises each column over it. Every
    column is normalised, so N is not needed here: the zeros after the N ranks stay zeros (0 / (0 + 1e-4)), and
    the loss hook reads the first N columns only.
    """
    order, group = _group_rows(index)
    order = order.to(token_level_rewards.device)
    adv = torch.empty_like(token_level_rewards, dtype=torch.float32)
    adv[order] = rank_advantages(token_level_rewards[order].float(), group)
    return adv, adv


@contextlib.contextmanager
def bind_item_ids(item_ids: torch.Tensor):
    """Within the block the ``"rank_grpo"`` policy loss groups tokens by these (B, T) item ids."""
    token = _ITEM_IDS.set(item_ids)
    try:
        yield
    finally:
        _ITEM_IDS.reset(token)


def compute_policy_loss_rank_grpo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                  config=None, rollout_is_weights=None) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``"rank_grpo"``: ``-min(w' a_t, clip(w_k, 1 - eps_low, 1 + eps_high) a_t)`` per token,
    ``w' = min(w_k, clip_ratio_c)`` (verl's dual clip), aggregated as ``agg_loss(loss_agg_mode)`` does:

    ``token-mean``  sum M L / batch_num_tokens * dp      (``dapo``; a token mean without batch_num_tokens)
    ``token-sum``   sum M L * dp                         (``dapo`` with 1 / dp)
    ``seq-mean-token-mean``  sum_i mean_t L / global_batch_size * dp  (``grpo`` rescaled)
    ``seq-mean-token-sum[-norm]``  sum M L / global_batch_size * dp [/ loss_scale_factor]  (``dapo``)

    ``rollout_is_weights`` (verl's rollout correction, (B, T), computed by verl) multiply each token's policy term,
    as in verl's vanilla loss. Item ids come from ``bind_item_ids``; one item per sequence is verl's GSPO, one per
    token its vanilla PPO.
    """
    item_ids = _ITEM_IDS.get()
    if item_ids is None:
        raise ValueError("the rank_grpo policy loss needs item ids: use rank_grpo_ppo_loss as the actor's loss_fn")
    info = config.global_batch_info
    dp = info.get("dp_size", 1) or 1
    mask = response_mask.bool()
    samples = info.get("global_batch_size")
    samples = (mask.sum(-1) > 0).sum().clamp(min=1) if samples is None else samples
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    policy_loss, where = _get(config, "policy_loss"), "actor_rollout_ref.actor.policy_loss"
    form = _setting("form", policy_loss, where)
    per_sample = loss_agg_mode == "seq-mean-token-mean"
    token_count = None
    if form == "code" and not per_sample and not (loss_agg_mode == "token-mean" and
                                                  info.get("batch_num_tokens") is None):
        denominators = {
            "token-mean": lambda: info["batch_num_tokens"] / dp,
            "token-sum": lambda: 1.0 / dp,
            "seq-mean-token-sum": lambda: samples / dp,
            "seq-mean-token-sum-norm": lambda: samples / dp * (info.get("loss_scale_factor") or mask.shape[-1]),
        }
        if loss_agg_mode not in denominators:
            raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
        token_count = denominators[loss_agg_mode]()
    loss, stats = framework_loss(
        log_prob, old_log_prob, advantages, mask, item_ids, form=form,
        rec_num=_setting("rec_num", policy_loss, where) if form == "rank" else None, per_sample=per_sample,
        token_count=token_count, samples=samples, dp_size=dp, epsilon_low=low, epsilon_high=high,
        delta=config.get("clip_ratio_c", 3.0), policy_weights=rollout_is_weights,
    )
    ppo_kl = verl_F.masked_mean(-(log_prob - old_log_prob).detach(), mask)
    metrics = {
        "actor/pg_clipfrac": stats["clip_ratio_region"].item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/rank_clipfrac_low": stats["clip_ratio_low"].item(),
        "actor/rank_clipfrac_high": stats["clip_ratio_high"].item(),
        "actor/rank_ratio_mean": stats["ratio_mean"].item(),
    }
    return loss, metrics


def _padded(x: torch.Tensor) -> torch.Tensor:
    return x.to_padded_tensor(0) if x.is_nested else x


def rank_grpo_ppo_loss(config, model_output, data, dp_group=None):
    """verl's loss hook (signature of ``verl.workers.utils.losses.ppo_loss``) for Rank-GRPO.

    Segments ``data["responses"]`` (B, T) under ``response_mask`` into N items, turns the packed per-rank
    advantages ``data["advantages"][:, :N]`` into per-token ones (the code form's, length shaping included, or
    ``A[i, k]`` on item tokens for the paper form) and runs ``ppo_loss`` with the item ids bound, so that its
    policy loss ``"rank_grpo"`` (``actor.policy_loss.loss_mode``) sees them. Returns ``ppo_loss``'s
    ``(loss, metrics)``; other loss modes go to ``ppo_loss`` unchanged. Settings: ``install()`` or the actor's
    config (``RankGRPOPolicyLossConfig`` and ``config.model_config.tokenizer``), module docstring.
    """
    if config.policy_loss.get("loss_mode", "vanilla") != NAME:
        return losses.ppo_loss(config, model_output, data, dp_group)
    settings = _segmentation(config)
    responses, mask = _padded(data["responses"]), _padded(data["response_mask"])
    segments = segment_items(responses, mask, settings["table"].to(responses.device), settings["rec_num"],
                             eos_token_id=settings["eos_token_id"], skip_blank_lines=settings["skip_blank_lines"])
    paper = settings["form"] == "rank"
    rank_adv = _padded(data["advantages"])[:, : settings["rec_num"]]
    data = data.copy()
    data["advantages"] = token_advantages(rank_adv, segments, length_shaping=not paper)
    with bind_item_ids(segments.item_ids_for("rank" if paper else "bnpo")):
        return losses.ppo_loss(config, model_output, data, dp_group)


# The logit transform (softcap, scale) of the model whose fused forward is running: verl hands FusedLinearForPPO the
# head's weight only, so the wrapped forwards (``patch_fused_logprobs``) read it from the model's config.
_LOGIT_TRANSFORM: contextvars.ContextVar[dict] = contextvars.ContextVar("rank_grpo_logit_transform", default={})
# verl's modules whose ``forward_with_torch_backend`` calls FusedLinearForPPO (the model types of
# ``monkey_patch.patch_forward_with_backends``; dense_common serves every other model type).
_FUSED_FORWARD_MODULES = ("dense_common", "qwen2_vl", "qwen3_vl", "glm4v", "qwen3_5")


class FusedLogprobsForPPO(torch.nn.Module):
    """Stand-in for ``verl.utils.experimental.torch_functional.FusedLinearForPPO``: the same ``forward`` returning
    ``(log_probs, entropy)`` of ``input_ids`` under ``softmax(S(s * hidden @ W.T) / temperature)``, (B, T) each,
    from ``fused_logprobs``, with the calling model's softcap S and scale s (``hf_model.logit_transform``: Gemma-2's
    ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``, which verl's own class
    leaves out) inside a forward wrapped by ``patch_fused_logprobs``, none outside one. The entropy is
    differentiable: verl's ``actor.entropy_coeff`` bonus reaches the head and the states."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        squeeze = hidden_states.dim() == 2
        hidden = hidden_states.unsqueeze(0) if squeeze else hidden_states
        ids = input_ids.to(torch.int64).reshape(hidden.shape[:-1])
        log_probs, entropy = fused_logprobs(hidden, vocab_weights.to(hidden.dtype), ids,
                                            temperature=float(temperature), return_entropy=True,
                                            **_LOGIT_TRANSFORM.get())
        return (log_probs[0], entropy[0]) if squeeze else (log_probs, entropy)


def _with_logit_transform(forward):
    """verl's fused model forward, running with the model's logit transform set for ``FusedLogprobsForPPO``."""
    if getattr(forward, "rank_grpo_logit_transform", False):
        return forward

    @functools.wraps(forward)
    def forward_with_logit_transform(self, *args, **kwargs):
        token = _LOGIT_TRANSFORM.set(logit_transform(self))
        try:
            return forward(self, *args, **kwargs)
        finally:
            _LOGIT_TRANSFORM.reset(token)

    forward_with_logit_transform.rank_grpo_logit_transform = True
    return forward_with_logit_transform


def patch_fused_logprobs() -> None:
    """Route verl's fused log-prob path (``actor_rollout_ref.model.use_fused_kernels=True``,
    ``fused_kernels_backend=torch``) through ``fused_logprobs``: the model forwards in
    ``verl/models/transformers/*.py`` look ``FusedLinearForPPO`` up in this module at call time, and are wrapped to
    hand it the model's logit transform. Call it before verl builds the model (its ``patch_forward_with_backends``
    installs the forward on the model's class then); verl's ``fused_kernels_backend=triton`` stays verl's."""
    from verl.utils.experimental import torch_functional

    torch_functional.FusedLinearForPPO = FusedLogprobsForPPO
    for name in _FUSED_FORWARD_MODULES:
        try:
            module = importlib.import_module(f"verl.models.transformers.{name}")
        except ImportError:  # a model family this transformers lacks: verl cannot patch it either
            continue
        module.forward_with_torch_backend = _with_logit_transform(module.forward_with_torch_backend)


def install(tokenizer=None, rec_num: int | None = None, *, form: str | None = None,
            skip_blank_lines: bool | None = None) -> None:
    """Register the ``"rank_grpo"`` advantage estimator and policy loss, set the segmentation they use, and make
    ``rank_grpo_ppo_loss`` the actor's loss hook (``verl.workers.engine_workers.ppo_loss``, which the actor worker
    binds with ``set_loss_fn`` when it builds the model).

    Settings left out (None) come from verl's config (module docstring); ``form`` defaults to ``"code"`` and
    ``skip_blank_lines`` to True. Each call replaces the settings of the previous one.
    """
    from verl.workers import engine_workers

    given = {"rec_num": rec_num, "form": form, "skip_blank_lines": skip_blank_lines}
    settings = {key: _check_setting(key, value) for key, value in given.items() if value is not None}
    if tokenizer is not None:
        settings.update(table=line_table(tokenizer), eos_token_id=tokenizer.eos_token_id)
    _SETTINGS.clear()
    _SETTINGS.update(settings)
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(NAME) is not compute_rank_grpo_advantage:
        core_algos.register_adv_est(NAME)(compute_rank_grpo_advantage)
    core_algos.register_policy_loss(NAME)(compute_policy_loss_rank_grpo)
    engine_workers.ppo_loss = rank_grpo_ppo_loss

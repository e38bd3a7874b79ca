"""The settings of the loss hook and the policy loss (N, the tokenizer's newline table and EOS id, ``form``,
``skip_blank_lines``): what ``install()`` was given, or verl's config, ``RankGRPOPolicyLossConfig`` among it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from verl.workers.config.actor import PolicyLossConfig

from ...segments import line_table
from ..common import check_form

NAME = "rank_grpo"
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


def store_settings(tokenizer=None, **given) -> None:
    """Check and keep what ``install()`` was given (the settings that are not None, and the tokenizer's newline table
    and EOS id), in place of the previous call's."""
    settings = {key: _check_setting(key, value) for key, value in given.items() if value is not None}
    if tokenizer is not None:
        settings.update(table=line_table(tokenizer), eos_token_id=tokenizer.eos_token_id)
    _SETTINGS.clear()
    _SETTINGS.update(settings)

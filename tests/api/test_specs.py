"""The settings as specs: ``LossSpec`` and ``HeadSpec`` validate once, name the field they refuse, and mean the same
as the keywords they replace, in the public functions and in ``RankGRPOLoss``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rankgrpo_kernels import (
    HeadSpec, LossConfig, LossSpec, RankGRPOLoss, fused_logprobs, rank_grpo_loss, rank_grpo_loss_from_logps,
)

from ..helpers import random_head, random_loss_batch


@pytest.mark.parametrize("field,value", [
    ("epsilon_low", 1.0), ("epsilon_high", -0.1), ("delta", 1.0), ("beta", float("inf")), ("loss_type", "sum"),
    ("max_completion_length", 0), ("rec_num", 2.5), ("entropy_coef", float("nan")), ("beta", True),
])
def test_loss_spec_names_the_field_it_refuses(field, value):
    with pytest.raises(ValueError, match=field):
        LossSpec(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("temperature", 0.0), ("logit_scale", -1.0), ("logit_softcap", float("inf")), ("temperature", "1"),
    ("backend", None),
])
def test_head_spec_names_the_field_it_refuses(field, value):
    with pytest.raises(ValueError, match=field):
        HeadSpec(**{field: value})


def test_numbers_are_stored_as_floats():
    spec = LossSpec(epsilon_low=np.float32(0.25), beta=0, entropy_coef=np.float64(0.5))
    assert type(spec.epsilon_low) is float and type(spec.beta) is float and type(spec.entropy_coef) is float
    assert LossConfig is LossSpec and HeadSpec(temperature=2).temperature == 2.0


def _inputs(B=3, T=7, H=8, V=50):
    hidden, weight, _, targets = random_head(B, T, H, V, torch.float64, bias=False)
    b = random_loss_batch(B, T, 2, dtype=torch.float64)
    kwargs = dict(item_ids=b["item_ids"], advantages=b["advantages"], completion_mask=b["completion_mask"],
                  old_logps=b["old_logps"], ref_logps=b["ref_logps"])
    return hidden, weight, targets, b["logps"], kwargs


def test_specs_mean_what_the_keywords_mean():
    hidden, weight, targets, logps, kwargs = _inputs()
    settings = dict(epsilon_low=0.06, epsilon_high=0.08, delta=1.5, beta=1e-3, loss_type="rank", rec_num=4,
                    entropy_coef=0.01)
    head = dict(temperature=0.7, logit_scale=1.3, logit_softcap=5.0, memory_budget_bytes=2**16)
    want, want_stats = rank_grpo_loss(hidden, weight, targets, **settings, **head, **kwargs)
    got, got_stats = rank_grpo_loss(hidden, weight, targets, loss=LossSpec(**settings), head=HeadSpec(**head),
                                    **kwargs)
    assert torch.equal(got, want) and all(torch.equal(got_stats[k], want_stats[k]) for k in want_stats)
    no_bonus = {k: v for k, v in settings.items() if k != "entropy_coef"}
    want, _ = rank_grpo_loss_from_logps(logps, **no_bonus, **kwargs)
    got, _ = rank_grpo_loss_from_logps(logps, loss=LossSpec(**no_bonus), **kwargs)
    assert torch.equal(got, want)
    want = fused_logprobs(hidden, weight, targets, **head)
    assert torch.equal(fused_logprobs(hidden, weight, targets, head=HeadSpec(**head)), want)


def test_the_bonus_needs_the_fused_head():
    _, _, _, logps, kwargs = _inputs()
    with pytest.raises(ValueError, match="entropy_coef"):
        rank_grpo_loss_from_logps(logps, loss=LossSpec(beta=1e-3, entropy_coef=0.1), **kwargs)


def test_the_module_holds_the_specs_and_a_call_may_override_a_field():
    hidden, weight, targets, logps, kwargs = _inputs()
    criterion = RankGRPOLoss(epsilon_low=0.06, beta=1e-3, temperature=0.9)
    assert criterion.loss == LossSpec(epsilon_low=0.06, beta=1e-3) and criterion.head == HeadSpec(temperature=0.9)
    assert RankGRPOLoss(loss=criterion.loss, head=criterion.head).loss == criterion.loss
    got, _ = criterion(hidden, weight, targets, entropy_coef=0.05, **kwargs)
    want, _ = rank_grpo_loss(hidden, weight, targets, loss=dataclasses.replace(criterion.loss, entropy_coef=0.05),
                             head=criterion.head, **kwargs)
    assert torch.equal(got, want) and criterion.loss.entropy_coef == 0.0  # the module's spec is unchanged
    want, _ = rank_grpo_loss_from_logps(logps, loss=criterion.loss, **kwargs)
    assert torch.equal(criterion.from_logps(logps, **kwargs)[0], want)
    with pytest.raises(TypeError, match="clip"):
        RankGRPOLoss(clip=0.2)
    with pytest.raises(ValueError, match=r"loss= holds \['beta'\]"):
        RankGRPOLoss(loss=LossSpec(), beta=0.1)


def test_a_float_entropy_mask_is_refused():
    hidden, weight, targets, _, kwargs = _inputs()
    with pytest.raises(TypeError, match="entropy_mask must be a bool or integer tensor"):
        rank_grpo_loss(hidden, weight, targets, entropy_coef=0.1, entropy_mask=torch.full((3, 7), 0.5), **kwargs)


def test_the_loss_from_log_probs_reads_no_memory_budget(monkeypatch):
    """No logits there: a budget set for the head (even one the head would refuse) does not concern it."""
    _, _, _, logps, kwargs = _inputs()
    want, _ = rank_grpo_loss_from_logps(logps, beta=1e-3, **kwargs)
    monkeypatch.setenv("RANKGRPO_MEMORY_BUDGET", "1000")
    got, _ = rank_grpo_loss_from_logps(logps, beta=1e-3, **kwargs)
    assert torch.equal(got, want)

"""Bad input gets a ValueError or TypeError that names the argument."""

from __future__ import annotations

import pytest
import torch

from rankgrpo_kernels import (
    RankGRPOLoss, backends, fused_logprobs, rank_advantages, rank_grpo_loss, rank_grpo_loss_from_logps,
    rank_rewards, segment_items, split_items, token_advantages,
)

from ..helpers import random_loss_batch

B, T, H, V = 2, 4, 8, 11


@pytest.fixture
def batch():
    b = random_loss_batch(B, T, 2, dtype=torch.float32)
    b["hidden"] = torch.randn(B, T, H)
    b["weight"] = torch.randn(V, H)
    b["target_ids"] = torch.randint(0, V, (B, T))
    return b


def _from_logps(b, **changes):
    kwargs = {k: b[k] for k in ("logps", "item_ids", "advantages", "completion_mask", "old_logps", "ref_logps")}
    kwargs.update(changes)
    return rank_grpo_loss_from_logps(kwargs.pop("logps"), **kwargs)


def _fused(b, **changes):
    kwargs = {k: b[k] for k in ("hidden", "weight", "target_ids", "item_ids", "advantages", "completion_mask")}
    kwargs.update(changes)
    return rank_grpo_loss(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("target_ids"), **kwargs)


LOGPS_CASES = [
    (dict(logps=torch.zeros(B, T, dtype=torch.long)), TypeError, "logps"),
    (dict(logps=torch.zeros(B * T)), ValueError, "logps"),
    (dict(item_ids=torch.zeros(B, T)), TypeError, "item_ids"),
    (dict(item_ids=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "item_ids"),
    (dict(advantages=torch.zeros(B + 1, T)), ValueError, "advantages"),
    (dict(advantages=torch.zeros(B, T, dtype=torch.long)), TypeError, "advantages"),
    (dict(completion_mask=torch.ones(B, T + 2)), ValueError, "completion_mask"),
    (dict(old_logps=torch.zeros(B, T - 1)), ValueError, "old_logps"),
    (dict(ref_logps=torch.zeros(B, T, dtype=torch.int32)), TypeError, "ref_logps"),
    (dict(loss_type="ppo"), ValueError, "loss_type"),
    (dict(epsilon_low=1.0), ValueError, "epsilon_low"),
    (dict(epsilon_low=-0.1), ValueError, "epsilon_low"),
    (dict(epsilon_high=float("inf")), ValueError, "epsilon_high"),
    (dict(delta=0.9), ValueError, "delta"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta=0.1, ref_logps=None), ValueError, "ref_logps"),
    (dict(loss_type="dapo"), ValueError, "num_items_in_batch"),
    (dict(loss_type="dapo", num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (dict(loss_type="rank"), ValueError, "rec_num"),
    (dict(loss_type="dr_grpo", max_completion_length=0), ValueError, "max_completion_length"),
    (dict(advantage_level="item"), ValueError, "advantage_level"),
    (dict(policy_weights=torch.ones(B, T + 1)), ValueError, "policy_weights"),
    (dict(policy_weights=torch.ones(B, T, dtype=torch.long)), TypeError, "policy_weights"),
    (dict(policy_weights=-torch.ones(B, T)), ValueError, "policy_weights"),
    (dict(policy_weights=torch.full((B, T), float("nan"))), ValueError, "policy_weights"),
    (dict(policy_weights=torch.full((B, T), float("inf"))), ValueError, "policy_weights"),
]


@pytest.mark.parametrize("changes,exc,name", LOGPS_CASES, ids=[c[2] + str(i) for i, c in enumerate(LOGPS_CASES)])
def test_loss_from_logps_rejects(batch, changes, exc, name):
    with pytest.raises(exc, match=name):
        _from_logps(batch, **changes)


@pytest.mark.parametrize("field", ["logps", "old_logps", "ref_logps", "advantages"])
def test_nan_on_loss_tokens_is_rejected_and_elsewhere_ignored(batch, field):
    batch["completion_mask"][:] = True
    batch["completion_mask"][0, 0] = False
    batch[field][0, 0] = float("nan")  # outside the loss: fine
    loss, _ = _from_logps(batch)
    assert torch.isfinite(loss)
    batch[field][1, 1] = float("nan")
    with pytest.raises(ValueError, match=field):
        _from_logps(batch)


def test_value_checks_can_be_switched_off(batch, monkeypatch):
    monkeypatch.setenv("RANKGRPO_VALIDATE", "0")
    batch["completion_mask"][:] = True
    batch["advantages"][1, 1] = float("nan")
    loss, _ = _from_logps(batch)
    assert torch.isnan(loss)


FUSED_CASES = [
    (dict(hidden=torch.randn(B * T, H)), ValueError, "hidden"),
    (dict(hidden=torch.randn(B, T, H, dtype=torch.float64)), TypeError, "weight"),
    (dict(weight=torch.randn(V, H + 1)), ValueError, "weight"),
    (dict(target_ids=torch.zeros(B, T)), TypeError, "target_ids"),
    (dict(target_ids=torch.full((B, T), V)), ValueError, "target_ids"),
    (dict(target_ids=torch.full((B, T), -1)), ValueError, "target_ids"),
    (dict(bias=torch.zeros(V + 1)), ValueError, "bias"),
    (dict(bias=torch.zeros(V, dtype=torch.float64)), TypeError, "bias"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(memory_budget_bytes=10), ValueError, "memory_budget"),
    (dict(item_ids=torch.zeros(B, T, dtype=torch.long, device="meta")), ValueError, "item_ids"),
]


@pytest.mark.parametrize("changes,exc,name", FUSED_CASES, ids=[c[2] + str(i) for i, c in enumerate(FUSED_CASES)])
def test_fused_loss_rejects(batch, changes, exc, name):
    with pytest.raises(exc, match=name):
        _fused(batch, **changes)


def test_out_of_range_targets_outside_the_loss_are_fine(batch):
    batch["completion_mask"][:, -1] = False
    batch["target_ids"][:, -1] = -100  # the usual ignore index on padding
    loss, _ = _fused(batch)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="target_ids"):
        fused_logprobs(batch["hidden"], batch["weight"], batch["target_ids"])


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="loss_type"):
        RankGRPOLoss(loss_type="sum")


def test_rewards_and_advantages_reject():
    hits = torch.ones(4, 3)
    with pytest.raises(ValueError, match="kind"):
        rank_rewards(hits, "ndcg")
    with pytest.raises(ValueError, match="gamma"):
        rank_rewards(hits, "exp")
    with pytest.raises(ValueError, match="gamma"):
        rank_rewards(hits, "exp", gamma=1.0)
    with pytest.raises(ValueError, match="hits"):
        rank_rewards(torch.ones(3))
    with pytest.raises(ValueError, match="num_generations"):
        rank_advantages(hits, num_generations=1)
    with pytest.raises(ValueError, match="num_generations"):
        rank_advantages(hits, num_generations=3)
    with pytest.raises(ValueError, match="scale"):
        rank_advantages(hits, num_generations=2, scale="global")
    with pytest.raises(ValueError, match="rewards"):
        rank_advantages(torch.full((4, 3), float("nan")), num_generations=2)


def test_segmentation_rejects():
    ids = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3, dtype=torch.bool)
    table = torch.zeros(5, dtype=torch.int32)
    with pytest.raises(ValueError, match="max_items"):
        segment_items(ids, mask, table, 0)
    with pytest.raises(TypeError, match="completion_ids"):
        segment_items(ids.float(), mask, table, 2)
    with pytest.raises(ValueError, match="completion_mask"):
        segment_items(ids, mask[:, :2], table, 2)
    with pytest.raises(ValueError, match="line_table"):
        segment_items(ids, mask, table, 2, skip_blank_lines=True)
    with pytest.raises(TypeError, match="text"):
        split_items(None)
    seg = segment_items(ids, mask, table, 2)
    with pytest.raises(ValueError, match="rank_advantages"):
        token_advantages(torch.zeros(2, 3), seg)


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_logps_on_loss_tokens_are_rejected(batch, value):
    batch["completion_mask"][:] = True
    batch["logps"][1, 1] = value
    with pytest.raises(ValueError, match="logps must be finite"):
        _from_logps(batch)


@pytest.mark.parametrize("backend", backends.available(torch.device("cpu"), torch.float32))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_unchecked_non_finite_logps_give_a_non_finite_loss(batch, monkeypatch, backend, value):
    """With the checks off, a non-finite log-prob in the loss still reaches the loss, on-policy too (where the
    ratio is 1 whatever the log-prob), on every backend: a NaN guard on the loss fires."""
    monkeypatch.setenv("RANKGRPO_VALIDATE", "0")
    batch["completion_mask"][:] = True
    batch["logps"][1, 1] = value
    loss, _ = _from_logps(batch, old_logps=None, backend=backend)
    assert not torch.isfinite(loss)

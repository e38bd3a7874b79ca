"""Rank-GRPO and the paper's baselines and ablations (``ObjectiveSpec``): list rewards by hand, the item ids and
advantages each row gives, and each row's loss on every backend against the authors' formulas, written out here
from their trainer (``importance_sampling_level`` "token", "sequence", "item" in ``libs/trl/rank_grpo_trainer.py``)
rather than through the item ids."""

from __future__ import annotations

import math

import pytest
import torch

from rankgrpo_kernels import ObjectiveSpec, backends, rank_grpo_loss_from_logps, segment_items
from rankgrpo_kernels.objective import IMPORTANCE_SAMPLING_LEVELS, list_rewards
from rankgrpo_kernels.reference import reference_loss_from_logps

from ..helpers import TinyTokenizer

ROWS = {  # the paper's rows: (importance_sampling_level, list_reward)
    "rank-grpo": ("item", None), "token-ratio": ("token", None), "sequence-ratio": ("sequence", None),
    "grpo": ("token", "dcg"), "gspo": ("sequence", "dcg"),
}
EPS_LOW, EPS_HIGH, BETA = 0.06, 0.08, 0.04
BACKENDS = backends.available(torch.device("cpu"), torch.float64) + [
    name for name in backends.available(torch.device("cpu"), torch.float32)
    if name not in backends.available(torch.device("cpu"), torch.float64)]


def test_list_rewards_by_hand():
    hits = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(list_rewards(hits, "dcg"), torch.tensor([1 + 1 / 2, 0, 1 / math.log2(3)],
                                                                       dtype=torch.float64))
    torch.testing.assert_close(list_rewards(hits, "sum"), torch.tensor([2.0, 0, 1], dtype=torch.float64))
    with pytest.raises(ValueError, match="list_reward"):
        list_rewards(hits, "ndcg")


def test_list_advantages_are_one_per_completion_and_scale_free_within_a_group():
    hits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    spec = ObjectiveSpec(list_reward="dcg")
    adv = spec.advantages(hits, num_generations=2)
    assert adv.shape == (4, 1)
    # NDCG divides a group's DCGs by one ideal DCG: the group advantages stay (nearly: eps) the same.
    scaled = spec.advantages(hits * torch.tensor([[0.5], [0.5], [0.25], [0.25]]), num_generations=2)
    torch.testing.assert_close(scaled, adv, rtol=2e-3, atol=2e-3)
    assert ObjectiveSpec().advantages(hits, num_generations=2).shape == (4, 2)


@pytest.mark.parametrize(("settings", "field"), [
    (dict(importance_sampling_level="segment"), "importance_sampling_level"),
    (dict(list_reward="ndcg"), "list_reward"),
    (dict(reward_kind="exp"), "gamma"),
    (dict(scale_rewards="batchwise"), "scale_rewards"),
    (dict(overflow_penalty=float("nan")), "overflow_penalty"),
])
def test_bad_settings_are_refused_by_name(settings, field):
    with pytest.raises(ValueError, match=field):
        ObjectiveSpec(**settings)


@pytest.mark.parametrize("settings", [dict(importance_sampling_level="token"), dict(list_reward="sum")])
def test_the_paper_form_refuses_the_baselines(settings):
    with pytest.raises(ValueError, match="loss_type='rank'"):
        ObjectiveSpec(**settings).check_loss_type("rank")


def _batch():
    """Three lists of N = 2 items over the tokens A, "\\n", EOS: exact (with an EOS bonus), early (one item), and
    overflowing without an EOS; per-rank hits of one group (G = 3)."""
    tok = TinyTokenizer(["A", "\n"])
    ids = torch.tensor([tok.encode(["A", "A", "\n", "A", "<eos>", "<eos>"]),
                        tok.encode(["A", "<eos>", "<eos>", "<eos>", "<eos>", "<eos>"]),
                        tok.encode(["A", "\n", "A", "\n", "A", "A"])])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    segments = segment_items(ids, mask, torch.tensor([0, 1, 0]), 2, eos_token_id=tok.eos_token_id)
    hits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    return segments, mask, hits


@pytest.mark.parametrize("row", ROWS)
def test_item_ids_and_advantages_of_each_row(row):
    level, list_reward = ROWS[row]
    segments, mask, hits = _batch()
    spec = ObjectiveSpec(importance_sampling_level=level, list_reward=list_reward, end_of_list_bonus=0.5,
                         early_stop_penalty=-0.25, overflow_penalty=-0.125)
    advantages = spec.advantages(hits, num_generations=3)
    item_ids, per_token = spec.loss_fields(advantages, segments, "bnpo")
    in_loss = segments.item_ids >= 0
    assert torch.equal(item_ids >= 0, in_loss)  # the same tokens in the loss for every row
    if level == "item":
        assert torch.equal(item_ids, segments.item_ids)
    elif level == "token":
        assert item_ids[in_loss].tolist() == torch.arange(6).expand(3, 6)[in_loss].tolist()
    else:
        assert (item_ids[in_loss] == 0).all()
    shaping = torch.tensor([[0, 0, 0, 0, 0.5, 0], [0, -0.25, 0, 0, 0, 0], [0, 0, 0, 0, -0.125, -0.125]],
                           dtype=torch.float64)
    if list_reward is None:
        rank = advantages.gather(1, segments.item_ids.clamp(0, 1)) * segments.content_mask
    else:
        dcg = torch.tensor([1.0, 1 / math.log2(3), 1 + 1 / math.log2(3)], dtype=torch.float64)
        centred = dcg - dcg.mean()
        rank = (centred / (dcg.std() + 1e-4))[:, None] * in_loss
    torch.testing.assert_close(per_token, rank + shaping)


def _authors_loss(logps, old, ref, advantages, mask, level):
    """The authors' trainer, bnpo aggregation with the k3 KL, written out: log-ratio per token, its mean over the
    row's loss tokens ("sequence") or over each item's ("item", ids of the code form)."""
    log_ratio = logps - old
    m = mask.to(logps.dtype)
    if level == "token":
        log_w = log_ratio
    elif level == "sequence":
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1)
    else:
        raise AssertionError(level)
    w = torch.exp(log_w)
    per_token = -torch.min(w * advantages, w.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * advantages)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    return ((per_token + BETA * kl) * m).sum() / m.sum().clamp(min=1)


def _logps(mask, seed):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(mask.shape, generator=g, dtype=torch.float64) * 3
    row_shift = 0.15 * torch.randn(mask.shape[0], 1, generator=g, dtype=torch.float64)  # some ratios past the clip
    old = logps + row_shift + 0.1 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    ref = logps + 0.2 * torch.randn(mask.shape, generator=g, dtype=torch.float64)
    return logps, old, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", ROWS)
def test_each_row_matches_the_authors_formula_on_every_backend(backend, row):
    level, list_reward = ROWS[row]
    segments, mask, hits = _batch()
    spec = ObjectiveSpec(importance_sampling_level=level, list_reward=list_reward)
    item_ids, advantages = spec.loss_fields(spec.advantages(hits, 3), segments, "bnpo")
    logps, old, ref = _logps(mask, seed=sum(map(ord, row)))
    settings = dict(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA, loss_type="bnpo")

    reference, _ = reference_loss_from_logps(logps, item_ids, advantages, mask, old, ref, **settings)
    if level != "item":  # the item level's own formula is the reference's (tests/maths/test_golden.py)
        in_loss = mask & (segments.item_ids >= 0)
        torch.testing.assert_close(reference, _authors_loss(logps, old, ref, advantages, in_loss, level),
                                   rtol=1e-12, atol=1e-14)

    dtype = torch.float64 if backend in backends.available(torch.device("cpu"), torch.float64) else torch.float32
    x = logps.to(dtype).requires_grad_()
    loss, _ = rank_grpo_loss_from_logps(x, item_ids=item_ids, advantages=advantages.to(dtype), completion_mask=mask,
                                        old_logps=old.to(dtype), ref_logps=ref.to(dtype), backend=backend, **settings)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = logps.clone().requires_grad_()
    want, _ = reference_loss_from_logps(x64, item_ids, advantages, mask, old, ref, **settings)
    (want_grad,) = torch.autograd.grad(want, x64)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), want, **tol)
    torch.testing.assert_close(grad.double(), want_grad, **tol)
    assert torch.any(want_grad != 0)


def test_levels_name_every_row():
    assert {level for level, _ in ROWS.values()} == set(IMPORTANCE_SAMPLING_LEVELS)


def test_gdpo_normalises_each_function_per_rank_then_the_weighted_sum_over_the_batch():
    rewards = torch.rand(6, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)
    got = ObjectiveSpec(multi_objective_aggregation="normalize_then_sum").advantages(rewards, 3, weights)
    for k in range(3):
        grouped = rewards[:, :, k].view(2, 3, 2)
        per_function = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(6, 2)
        summed = per_function @ weights
        torch.testing.assert_close(got[:, k], (summed - summed.mean()) / (summed.std() + 1e-4))
    summed_first = ObjectiveSpec().advantages(rewards, 3, weights)  # sum_then_normalize: the weighted sum's groups
    torch.testing.assert_close(summed_first, ObjectiveSpec().advantages((rewards * weights[:, None]).sum(1), 3))
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        ObjectiveSpec(multi_objective_aggregation="sum")

"""Silent defects of issue 30, each pinned by the test that showed it: statistics of skipped items, named errors of
the importance helpers, non-finite ``old_logps``, temperatures whose inverse overflows float32, and the behaviours
of the same report that were already right (numpy scalars, the entropy in ``fused_logprobs``' docstring).

The statistics run on every backend that runs here (``backends.available``; Triton under its interpreter on a CPU,
so the shapes are tiny). Tolerances: float32 logits against the float64 reference, 2e-5 relative."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankgrpo_kernels import HeadSpec, backends, fused_logprobs, rank_grpo_loss, rank_grpo_loss_from_logps
from rankgrpo_kernels.importance import item_importance_weights, item_means, item_off_policy_mask
from rankgrpo_kernels.reference import reference_logprobs, reference_loss

from ..helpers import random_head

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = backends.available(DEVICE, torch.float32)
TOL = dict(rtol=2e-5, atol=2e-6)
B, T, H, V = 2, 6, 8, 40


def _head_batch(*, off_policy, seed=0):
    """A float32 head, three 2-token items per row, every advantage 0; old log-probs 0.3 off the policy's."""
    hidden, weight, bias, targets = random_head(B, T, H, V, torch.float32, device=DEVICE, seed=seed)
    kwargs = dict(item_ids=(torch.arange(T, device=DEVICE) // 2).expand(B, T).contiguous(),
                  advantages=torch.zeros(B, T, device=DEVICE))
    if off_policy:
        with torch.no_grad():
            logps = reference_logprobs(hidden.double(), weight.double(), targets, bias=bias.double())
        shift = 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        kwargs["old_logps"] = (logps + shift.to(DEVICE)).float()
    return hidden, weight, bias, targets, kwargs


# --- statistics when items are skipped -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("off_policy", [False, True])
def test_every_item_skipped_reports_no_measurement_not_zeros(backend, off_policy):
    """Every advantage 0, skipping on: no log-prob is computed, so ``computed_tokens`` is 0, ``ratio_mean`` the
    neutral 1 (the exact value on-policy) and ``entropy`` NaN (not measured), not the 0s that pulled TRL's logged
    means down. Skipping off, the same call measures every loss token: the reference's statistics."""
    hidden, weight, bias, targets, kwargs = _head_batch(off_policy=off_policy)
    _, skipped = rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend, compute_entropy=True, **kwargs)
    assert skipped["ratio_mean"].item() == 1.0
    assert torch.isnan(skipped["entropy"])
    assert skipped["computed_tokens"].item() == 0

    _, exact = rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend, compute_entropy=True,
                              skip_zero_advantage=False, **kwargs)
    assert exact["computed_tokens"].item() == B * T
    params = [x.detach().double() for x in (hidden, weight, bias)]
    _, entropy = reference_logprobs(*params[:2], targets, bias=params[2], return_entropy=True)
    _, ref_stats = reference_loss(*params[:2], targets, bias=params[2], **kwargs)
    torch.testing.assert_close(exact["ratio_mean"].double(), ref_stats["ratio_mean"], **TOL)
    torch.testing.assert_close(exact["entropy"].double(), entropy.mean(), **TOL)
    if not off_policy:
        assert ref_stats["ratio_mean"].item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_partly_skipped_statistics_are_means_over_the_computed_tokens(backend):
    """One live item per row: ``ratio_mean`` and ``entropy`` are the reference's over its tokens, and
    ``computed_tokens`` says how many, the weight a mean over micro-batches or processes needs."""
    hidden, weight, bias, targets, kwargs = _head_batch(off_policy=True)
    kwargs["advantages"][:, 2:4] = torch.tensor([0.5, -1.0], device=DEVICE)[:, None]
    listed = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    listed[:, 2:4] = True
    _, stats = rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend, compute_entropy=True, **kwargs)
    params = [x.detach().double() for x in (hidden, weight, bias)]
    _, entropy = reference_logprobs(*params[:2], targets, bias=params[2], return_entropy=True)
    _, ref_stats = reference_loss(*params[:2], targets, bias=params[2], **dict(kwargs, completion_mask=listed))
    torch.testing.assert_close(stats["ratio_mean"].double(), ref_stats["ratio_mean"], **TOL)
    torch.testing.assert_close(stats["entropy"].double(), entropy[listed].mean(), **TOL)
    assert stats["computed_tokens"].item() == int(listed.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_loss_from_log_probs_counts_every_loss_token_and_its_statistics_are_detached(backend):
    hidden, weight, bias, targets, kwargs = _head_batch(off_policy=True)
    kwargs["completion_mask"] = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    kwargs["completion_mask"][1, 4:] = False
    logps = fused_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    _, stats = rank_grpo_loss_from_logps(logps, backend=backend, **kwargs)
    assert stats["computed_tokens"].item() == B * T - 2
    _, fused_stats = rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend, **kwargs)
    assert all(not value.requires_grad for value in (*stats.values(), *fused_stats.values()))


def test_a_batch_without_loss_tokens_keeps_the_reference_zeros():
    """Nothing in the loss at all: every statistic 0 on every path, as the reference gives them."""
    hidden, weight, bias, targets, kwargs = _head_batch(off_policy=False)
    kwargs["completion_mask"] = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    _, stats = rank_grpo_loss(hidden, weight, targets, bias=bias, compute_entropy=True, **kwargs)
    assert all(torch.all(value == 0) for value in stats.values())


# --- the importance helpers ----------------------------------------------------------------------------------------

def _importance_inputs():
    g = torch.Generator().manual_seed(0)
    item_ids = torch.tensor([[0, 0, 1], [0, 1, 1], [0, 0, 0]])
    policy = -torch.rand(3, 3, generator=g)
    return dict(policy=policy, sampler=policy + torch.rand(3, 3, generator=g), item_ids=item_ids,
                mask=torch.ones(3, 3, dtype=torch.bool))


def test_off_policy_mask_reads_per_row_advantages_along_rows():
    """B == T: (B,) advantages are one per row, as the loss reads them, not one per position."""
    x = _importance_inputs()
    per_row = torch.tensor([-1.0, 1.0, 1.0])
    got = item_off_policy_mask(x["policy"], x["sampler"], per_row, x["item_ids"], x["mask"], 0.1)
    want = item_off_policy_mask(x["policy"], x["sampler"], per_row[:, None].expand(3, 3), x["item_ids"], x["mask"],
                                0.1)
    assert torch.equal(got, want)
    assert torch.equal(got[1:], torch.ones(2, 3)) and not got[0].all()
    assert torch.equal(item_off_policy_mask(x["policy"], x["sampler"], per_row[:, None], x["item_ids"], x["mask"],
                                            0.1), want)


@pytest.mark.parametrize("argument", ["policy_logps", "sampler_logps", "advantages", "mask"])
def test_off_policy_mask_names_a_mismatched_shape(argument):
    x = _importance_inputs()
    args = dict(policy_logps=x["policy"], sampler_logps=x["sampler"], advantages=torch.ones(3, 3),
                item_ids=x["item_ids"], mask=x["mask"], threshold=0.1)
    args[argument] = args[argument][:, :2]
    with pytest.raises(ValueError, match=argument):
        item_off_policy_mask(**args)


@pytest.mark.parametrize("threshold", [float("nan"), None, "0.1", True])
def test_off_policy_mask_refuses_a_threshold_that_is_not_a_number(threshold):
    x = _importance_inputs()
    with pytest.raises(ValueError, match="threshold"):
        item_off_policy_mask(x["policy"], x["sampler"], torch.ones(3, 3), x["item_ids"], x["mask"], threshold)


@pytest.mark.parametrize("mode", ["item_truncate", "item_mask"])
def test_importance_weights_refuse_crossed_bounds_and_name_mismatched_shapes(mode):
    x = _importance_inputs()
    with pytest.raises(ValueError, match="clip_min.*clip_max"):
        item_importance_weights(x["policy"], x["sampler"], x["item_ids"], x["mask"], mode, 2.0, 0.5)
    with pytest.raises(ValueError, match="sampler_logps"):
        item_importance_weights(x["policy"], x["sampler"][:2], x["item_ids"], x["mask"], mode, 0.5, 2.0)
    with pytest.raises(TypeError, match="old_logps"):
        item_importance_weights(x["policy"].tolist(), x["sampler"], x["item_ids"], x["mask"], mode, 0.5, 2.0)
    with pytest.raises(TypeError, match="item_ids"):
        item_importance_weights(x["policy"], x["sampler"], x["item_ids"].float(), x["mask"], mode, 0.5, 2.0)
    with pytest.raises(ValueError, match="values"):
        item_means(x["policy"][:, :1], x["item_ids"], x["mask"])


# --- non-finite inputs -----------------------------------------------------------------------------------------------

def _logps_batch():
    logps = -torch.rand(B, T, generator=torch.Generator().manual_seed(1))
    old = logps.clone()
    old[0, 0], old[0, 1] = float("inf"), float("-inf")  # one item (id 0 of row 0) holds both
    return logps, dict(item_ids=(torch.arange(T) // 2).expand(B, T), advantages=torch.ones(B, T), old_logps=old)


def test_non_finite_old_logps_are_refused_by_name():
    """+inf and -inf within one item made its mean log-ratio inf - inf: a NaN loss from a value check that let
    infinities through."""
    logps, kwargs = _logps_batch()
    with pytest.raises(ValueError, match="old_logps must be finite"):
        rank_grpo_loss_from_logps(logps, **kwargs)
    hidden, weight, _, targets = random_head(B, T, H, V, torch.float32, bias=False)
    with pytest.raises(ValueError, match="old_logps must be finite"):
        rank_grpo_loss(hidden, weight, targets, **kwargs)
    kwargs["completion_mask"] = torch.ones(B, T, dtype=torch.bool)
    kwargs["completion_mask"][0, :2] = False  # outside the loss, anything goes
    loss, _ = rank_grpo_loss_from_logps(logps, **kwargs)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", backends.available(torch.device("cpu"), torch.float32))
def test_unchecked_non_finite_old_logps_give_a_non_finite_loss(monkeypatch, backend):
    """With the checks off (``RANKGRPO_VALIDATE=0``) the loss is NaN, never a finite loss beside NaN gradients."""
    monkeypatch.setenv("RANKGRPO_VALIDATE", "0")
    logps, kwargs = _logps_batch()
    logps.requires_grad_()
    loss, _ = rank_grpo_loss_from_logps(logps, backend=backend, **kwargs)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("settings", [dict(temperature=1e-39), dict(temperature=1e-30, logit_scale=1e10),
                                      dict(temperature=1e-30, logit_softcap=1e10)])
def test_a_temperature_whose_inverse_overflows_float32_is_refused(settings):
    """1 / 1e-39 is not a float32: the logits became inf - inf = NaN from finite inputs."""
    with pytest.raises(ValueError, match="temperature"):
        HeadSpec(**settings)
    hidden, weight, _, targets = random_head(B, T, H, V, torch.float32, bias=False)
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs(hidden, weight, targets, **settings)


def test_a_softcap_whose_input_scale_overflows_float32_is_refused():
    with pytest.raises(ValueError, match="logit_scale / logit_softcap"):
        HeadSpec(logit_scale=1e30, logit_softcap=1e-10)


def test_the_smallest_temperatures_still_accepted_give_finite_log_probs():
    hidden, weight, _, targets = random_head(B, T, H, V, torch.float32, bias=False, scale=1e-38)
    assert HeadSpec(temperature=3e-39).inv_temperature < torch.finfo(torch.float32).max
    logp = fused_logprobs(hidden, weight, targets, temperature=3e-39)
    assert torch.isfinite(logp).all()


# --- already right: pinned ------------------------------------------------------------------------------------------

def test_a_numpy_scalar_entropy_coef_is_accepted_end_to_end():
    hidden, weight, bias, targets, kwargs = _head_batch(off_policy=True)
    kwargs["advantages"] = torch.randn(B, T, device=DEVICE)
    want, _ = rank_grpo_loss(hidden, weight, targets, bias=bias, entropy_coef=0.05, **kwargs)
    for coef in (np.float32(0.05), np.float64(0.05)):
        got, _ = rank_grpo_loss(hidden, weight, targets, bias=bias, entropy_coef=coef, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_fused_logprobs_documents_its_entropy():
    doc = " ".join(fused_logprobs.__doc__.split())
    assert "the entropy ``-sum_v p log p`` comes back as a second (B, T) tensor with its gradient" in doc

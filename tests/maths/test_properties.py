"""Properties of the loss drawn by hypothesis, each checked on the public function (and its gradients).

Tolerances: float64 draws compare to 1e-10; float32 draws to 1e-5 relative (sums of a few hundred terms).
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from rankgrpo_kernels import rank_grpo_loss_from_logps
from rankgrpo_kernels.contract import FIRST_REINFORCE, LOSS_TYPES, POLICY
from rankgrpo_kernels.specs import LossSpec
from rankgrpo_kernels.reference import reference_loss_from_logps

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


@st.composite
def loss_batches(draw, layout="random"):
    """A batch with drawn shapes, segment layout, mask, dtype and clip regime."""
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 12))
    K = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if layout == "token":
        item_ids = torch.arange(T).expand(B, T).clone()
    elif layout == "row":
        item_ids = torch.zeros(B, T, dtype=torch.long)
    else:  # contiguous items with random lengths, some ids skipped, some tokens outside (-1)
        item_ids = torch.randint(0, K + 1, (B, T), generator=g).sort(dim=1).values
        item_ids[torch.rand(B, T, generator=g) < 0.1] = -1
    mask = torch.rand(B, T, generator=g) > draw(st.sampled_from([0.0, 0.3, 1.0]))
    old_scale = draw(st.sampled_from([0.0, 0.02, 0.3, 3.0]))  # on-policy-like, unclipped, mixed, mostly clipped
    logps = -3 * torch.rand(B, T, generator=g, dtype=dtype)
    loss_type = draw(st.sampled_from(LOSS_TYPES))
    return dict(
        logps=logps,
        item_ids=item_ids,
        completion_mask=mask,
        advantages=torch.randn(B, T, generator=g, dtype=dtype),
        old_logps=logps + old_scale * torch.randn(B, T, generator=g, dtype=dtype),
        ref_logps=logps + 0.3 * torch.randn(B, T, generator=g, dtype=dtype),
        epsilon_low=draw(st.sampled_from([0.0, 0.06, 0.2])),
        epsilon_high=draw(st.sampled_from([0.0, 0.08, 0.28] if loss_type != "cispo" else [0.28, 1.05, 5.0])),
        delta=draw(st.sampled_from([None, 1.5])) if POLICY[loss_type] == 0 else None,  # PPO's term only
        beta=draw(st.sampled_from([0.0, 1e-3, 0.1])),
        loss_type=loss_type,
        num_items_in_batch=3 * B * T,
        rec_num=K,
    )


def loss_and_grad(fn, batch, **changes):
    kwargs = {**batch, **changes}
    logps = kwargs.pop("logps").clone().requires_grad_()
    loss, stats = fn(logps, **kwargs)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss, grad, stats


@given(loss_batches())
def test_matches_reference(batch):
    tol = TOL[batch["logps"].dtype]
    loss, grad, stats = loss_and_grad(rank_grpo_loss_from_logps, batch)
    ref_loss, ref_grad, ref_stats = loss_and_grad(reference_loss_from_logps, batch)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    names = ["clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean", "kl", "clip_ratio_low_per_row",
             "clip_ratio_high_per_row"] + (["weight_mean"] if POLICY[batch["loss_type"]] >= FIRST_REINFORCE else [])
    assert ("weight_mean" in stats) == ("weight_mean" in ref_stats)
    for name in names:
        torch.testing.assert_close(stats[name], ref_stats[name], **tol)


@given(loss_batches(), st.booleans(), st.sampled_from(["item", "token"]))
def test_spec_only_settings_match_reference(batch, corrected_kl, ratio_clip):
    """The settings a ``LossSpec`` carries: ``use_bias_correction_kl`` (the KL weighted by the item ratio, gradient
    included) and ``ratio_clip="token"`` (GMPO's clipping inside the geometric mean; PPO's loss types)."""
    settings = {k: batch.pop(k) for k in ("epsilon_low", "epsilon_high", "delta", "beta", "loss_type", "rec_num")}
    if POLICY[settings["loss_type"]] != 0:
        ratio_clip = "item"
    if ratio_clip == "token":
        settings["delta"] = None
    settings.update(use_bias_correction_kl=corrected_kl, ratio_clip=ratio_clip)
    tol = TOL[batch["logps"].dtype]
    loss, grad, stats = loss_and_grad(rank_grpo_loss_from_logps, batch, loss=LossSpec(**settings))
    ref_loss, ref_grad, ref_stats = loss_and_grad(reference_loss_from_logps, batch, **settings)
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    for name in ("kl", "clip_ratio_low", "clip_ratio_high", "ratio_mean", "clip_ratio_high_per_row"):
        torch.testing.assert_close(stats[name], ref_stats[name], **tol)


@given(loss_batches(layout="row"))
def test_gmpo_with_one_item_per_row_is_gmpo(batch):
    """GMPO (TRL's GMPOTrainer, written out): per row, the geometric mean of the token ratios with each log-ratio
    clipped sign-aware in log space, -w A averaged over rows, plus beta times each row's mean KL (TRL's loss_type
    "grpo" aggregation)."""
    batch = {**batch, "loss_type": "grpo", "delta": None, "epsilon_low": 0.4, "epsilon_high": 0.3}
    m = batch["completion_mask"].to(batch["logps"].dtype)
    logps = batch["logps"].clone().requires_grad_()
    a = batch["advantages"][:, :1]  # GMPO's one advantage per sequence
    x = logps - batch["old_logps"]
    clipped = torch.where(a > 0, torch.minimum(x, x.clamp(-0.4, 0.3)), torch.maximum(x, x.clamp(-0.4, 0.3)))
    w = torch.exp((clipped * m).sum(1) / m.sum(1).clamp(min=1))
    d = batch["ref_logps"] - logps
    seq_kl = ((torch.exp(d) - d - 1) * m).sum(1) / m.sum(1).clamp(min=1)
    # a row without loss tokens holds no item (GMPOTrainer would add -A for it, with a ratio of 1)
    expected = ((-w * a[:, 0] + batch["beta"] * seq_kl) * (m.sum(1) > 0)).mean()
    (expected_grad,) = torch.autograd.grad(expected, logps)
    settings = {k: batch.pop(k) for k in ("epsilon_low", "epsilon_high", "delta", "beta", "loss_type", "rec_num")}
    batch["advantages"] = a.expand_as(batch["logps"])
    loss, grad, _ = loss_and_grad(rank_grpo_loss_from_logps, batch, loss=LossSpec(**settings, ratio_clip="token"))
    torch.testing.assert_close(loss, expected, **TOL[logps.dtype])
    torch.testing.assert_close(grad, expected_grad, **TOL[logps.dtype])


def _token_level_grpo(batch):
    """TRL's token-level PPO-clip loss, written out independently of the library."""
    mask = batch["completion_mask"] & (batch["item_ids"] >= 0)
    logps = batch["logps"]
    ratio = torch.exp(torch.clamp(logps - batch["old_logps"], max=20.0))
    a = batch["advantages"]
    clipped = torch.clamp(ratio, 1 - batch["epsilon_low"], 1 + batch["epsilon_high"])
    unclipped = ratio if batch["delta"] is None else torch.clamp(ratio, max=batch["delta"])
    per_token = -torch.min(unclipped * a, clipped * a)
    if batch["beta"]:
        d = torch.clamp(batch["ref_logps"] - logps, max=20.0)
        per_token = per_token + batch["beta"] * (torch.exp(d) - d - 1)
    m = mask.to(logps.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


@given(loss_batches(layout="token"))
def test_one_item_per_token_is_token_level_grpo(batch):
    batch = {**batch, "loss_type": "bnpo"}
    logps = batch["logps"].clone().requires_grad_()
    expected = _token_level_grpo({**batch, "logps": logps})
    (expected_grad,) = torch.autograd.grad(expected, logps)
    loss, grad, _ = loss_and_grad(rank_grpo_loss_from_logps, batch)
    torch.testing.assert_close(loss, expected, **TOL[logps.dtype])
    torch.testing.assert_close(grad, expected_grad, **TOL[logps.dtype])


@given(loss_batches(layout="row"))
def test_one_item_per_row_is_sequence_level_gspo(batch):
    """GSPO: one ratio per row, exp(mean log-ratio of the row), with per-token advantages."""
    batch = {**batch, "loss_type": "grpo", "beta": 0.0}
    m = batch["completion_mask"].to(batch["logps"].dtype)
    logps = batch["logps"].clone().requires_grad_()
    log_w = ((logps - batch["old_logps"]) * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    w = torch.exp(log_w.clamp(max=20.0))
    a = batch["advantages"]
    unclipped = w if batch["delta"] is None else w.clamp(max=batch["delta"])
    per_token = -torch.min(unclipped * a, w.clamp(1 - batch["epsilon_low"], 1 + batch["epsilon_high"]) * a)
    expected = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    (expected_grad,) = torch.autograd.grad(expected, logps)
    loss, grad, _ = loss_and_grad(rank_grpo_loss_from_logps, batch)
    torch.testing.assert_close(loss, expected, **TOL[logps.dtype])
    torch.testing.assert_close(grad, expected_grad, **TOL[logps.dtype])


@given(loss_batches())
def test_masked_tokens_change_nothing_and_get_no_gradient(batch):
    outside = ~batch["completion_mask"] | (batch["item_ids"] < 0)
    loss, grad, _ = loss_and_grad(rank_grpo_loss_from_logps, batch)
    noisy = {k: (v + 7.0 * outside if k in ("logps", "old_logps", "ref_logps", "advantages") else v)
             for k, v in batch.items()}
    noisy_loss, noisy_grad, _ = loss_and_grad(rank_grpo_loss_from_logps, noisy)
    torch.testing.assert_close(loss, noisy_loss, **TOL[batch["logps"].dtype])
    assert torch.all(grad[outside] == 0)
    torch.testing.assert_close(grad, noisy_grad, **TOL[batch["logps"].dtype])


@given(loss_batches())
def test_on_policy_ratio_is_one(batch):
    on_policy = {**batch, "old_logps": None}
    loss, grad, stats = loss_and_grad(rank_grpo_loss_from_logps, on_policy)
    assert stats["ratio_mean"].item() == (1.0 if (on_policy["completion_mask"] & (batch["item_ids"] >= 0)).any()
                                          else 0.0)
    # every ratio is 1: clipped only by a CISPO bound below 1
    assert stats["clip_ratio_region"].item() == 0.0 or batch["loss_type"] == "cispo" and batch["epsilon_high"] < 1
    same, same_grad, _ = loss_and_grad(rank_grpo_loss_from_logps, {**batch, "old_logps": batch["logps"]})
    torch.testing.assert_close(loss, same)
    torch.testing.assert_close(grad, same_grad)


@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**31 - 1),
       st.sampled_from([0.0, 0.05, 1.0]))
def test_code_and_paper_forms_agree_on_equal_item_lengths(B, N, n, seed, old_scale):
    """bnpo over B rows of N items of n tokens each is -(1/(B N)) sum of item terms: the paper form."""
    g = torch.Generator().manual_seed(seed)
    T = N * n
    item_ids = torch.arange(N).repeat_interleave(n).expand(B, T)
    rank_adv = torch.randn(B, N, generator=g, dtype=torch.float64)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64)
    batch = dict(logps=logps, item_ids=item_ids, advantages=rank_adv,
                 old_logps=logps + old_scale * torch.randn(B, T, generator=g, dtype=torch.float64),
                 epsilon_low=0.06, epsilon_high=0.08, advantage_level="rank")
    code = loss_and_grad(rank_grpo_loss_from_logps, batch, loss_type="bnpo")
    paper = loss_and_grad(rank_grpo_loss_from_logps, batch, loss_type="rank")
    torch.testing.assert_close(code[0], paper[0])
    torch.testing.assert_close(code[1], paper[1])


@given(loss_batches(), st.randoms(use_true_random=False))
def test_bnpo_is_invariant_to_row_order(batch, rnd):
    perm = list(range(batch["logps"].shape[0]))
    rnd.shuffle(perm)
    permuted = {k: (v[perm] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    loss, grad, _ = loss_and_grad(rank_grpo_loss_from_logps, batch, loss_type="bnpo")
    p_loss, p_grad, _ = loss_and_grad(rank_grpo_loss_from_logps, permuted, loss_type="bnpo")
    torch.testing.assert_close(loss, p_loss, **TOL[batch["logps"].dtype])
    torch.testing.assert_close(grad[perm], p_grad, **TOL[batch["logps"].dtype])


def test_saturated_ratios_match_the_reference():
    """An item whose mean log-ratio passes the clamp (20) gets the reference's gradient: none through its ratio."""
    logps = torch.tensor([[-1.0, -2.0, -0.5, -1.5]], dtype=torch.float64)
    batch = dict(logps=logps, item_ids=torch.tensor([[0, 0, 1, 1]]),
                 advantages=torch.tensor([[-1.0, -1.0, 0.5, 0.5]], dtype=torch.float64),
                 old_logps=logps - torch.tensor([[25.0, 25.0, 0.01, 0.01]], dtype=torch.float64),
                 epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo")
    loss, grad, _ = loss_and_grad(rank_grpo_loss_from_logps, batch)
    ref_loss, ref_grad, _ = loss_and_grad(reference_loss_from_logps, batch)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert torch.isfinite(loss) and torch.all(grad[0, :2] == 0) and torch.all(grad[0, 2:] != 0)


def _trl_token_level_loss(logps, old_logps, ref_logps, advantages, mask, is_ratio, beta, eps_low, eps_high,
                          loss_type):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` (token-level ratio, vLLM importance-sampling correction), written
    out: policy loss x IS ratio, then + beta KL, aggregated over the completion mask."""
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages) * is_ratio
    per_token_loss = per_token_loss + beta * (torch.exp(ref_logps - logps) - (ref_logps - logps) - 1)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * per_token_loss.size(1))  # dr_grpo


@given(loss_batches(layout="token"), st.sampled_from(["grpo", "bnpo", "dr_grpo"]))
def test_policy_weights_are_trls_importance_sampling_correction(batch, loss_type):
    """One item per token and per-token policy weights = TRL's loss with ``importance_sampling_ratio``."""
    B, T = batch["logps"].shape
    mask = batch["completion_mask"] & (batch["item_ids"] >= 0)
    g = torch.Generator().manual_seed(B * 100 + T)
    is_ratio = torch.rand(B, T, generator=g, dtype=batch["logps"].dtype) * 2
    settings = {**batch, "delta": None, "loss_type": loss_type, "policy_weights": is_ratio}
    ours, grad, _ = loss_and_grad(rank_grpo_loss_from_logps, settings)
    logps = batch["logps"].clone().requires_grad_()
    trl = _trl_token_level_loss(logps, batch["old_logps"], batch["ref_logps"], batch["advantages"],
                                mask.to(logps.dtype), is_ratio, batch["beta"], batch["epsilon_low"],
                                batch["epsilon_high"], loss_type)
    (trl_grad,) = torch.autograd.grad(trl, logps)
    torch.testing.assert_close(ours, trl.detach(), **TOL[logps.dtype])
    torch.testing.assert_close(grad, trl_grad, **TOL[logps.dtype])

"""Cost follows the gradient: only the tokens the loss needs enter a GEMM, and the results stay the reference's.

Tokens outside the loss never enter a GEMM; with ``beta = 0``, no reference log-probs and no entropy asked, neither
do the items whose every advantage is 0 (a rank every completion of its group missed). Checked here by counting the
rows of every GEMM of the LM head, by NaN hidden states on the skipped tokens, and against the float64 reference
for every loss type, on- and off-policy, with ``beta`` 0 and > 0, rows without a listed token, a batch without any,
zero-advantage items beside EOS-shaped ones (an item whose only non-zero advantage is its EOS bonus) and a long
completion split over chunks. ``ratio_mean`` is a mean over the tokens that entered: the reference's over them.

Tolerances: float64 on the torch backend 1e-12 (the same maths in another order); float32 as in test_backends.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rankgrpo_kernels import backends, fused_logprobs, rank_grpo_loss
from rankgrpo_kernels.contract import LOSS_TYPES, WINDOW_TOKEN_NORMALISED
from rankgrpo_kernels.head import gemms, plan
from rankgrpo_kernels.reference import reference_logprobs, reference_loss

from ..helpers import random_head

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [(name, dtype) for dtype in (torch.float64, torch.float32) for name in backends.available(DEVICE, dtype)]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=2e-4, atol=2e-5)}
B, T, H, V, K = 5, 24, 16, 300, 4


class GemmRows:
    """Counts the token rows of every LM-head GEMM: the logits ``h W^T`` (rows of h) and the gradient GEMMs."""

    def __init__(self, monkeypatch, vocab=V):
        self.logits = self.gradients = 0
        self.logits_calls = []
        mm, addmm = gemms.mm_into, gemms.addmm_into

        def counted_mm(a, b, out):
            if b.shape[1] == vocab:  # h (C, H) @ W^T (H, V): a logits GEMM
                self.logits += a.shape[0]
                self.logits_calls.append(a.shape[0])
            else:  # D (C, V) @ W (V, H): d_hidden
                self.gradients += a.shape[0]
            return mm(a, b, out)

        def counted_addmm(total, a, b, **kwargs):
            self.gradients += a.shape[1]  # D^T (V, C) @ (g h) (C, H), or (g/T)^T (1, C) @ D (C, V)
            return addmm(total, a, b, **kwargs)

        monkeypatch.setattr(gemms, "mm_into", counted_mm)
        monkeypatch.setattr(gemms, "addmm_into", counted_addmm)


def _batch(dtype, *, off_policy, seed=0):
    """Rows of K items plus an EOS token, right-padded; per-token advantages from per-rank ones with zeros (ranks
    every completion missed), row 1 without any signal, row 3 all padding, and row 4's last item zero but for its
    EOS bonus."""
    hidden, weight, bias, targets = random_head(B, T, H, V, dtype, device=DEVICE, seed=seed)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[2] = T
    position = torch.arange(T).expand(B, T)
    mask = position < lengths[:, None]
    mask[3] = False
    item_ids = (position * K // lengths[:, None].clamp(min=1)).clamp(max=K - 1)
    rank_adv = torch.randn(B, K, generator=g, dtype=torch.float64)
    rank_adv[:, 1] = 0.0
    rank_adv[0, 2] = 0.0
    rank_adv[1] = 0.0
    rank_adv[4, K - 1] = 0.0
    advantages = rank_adv.gather(1, item_ids)
    eos = position == (lengths[:, None] - 1)
    advantages[4] = torch.where(eos[4], 0.1, advantages[4])  # EOS bonus on an otherwise silent item
    with torch.no_grad():
        logps = reference_logprobs(hidden.double(), weight.double(), targets, bias=bias.double()).float()
    kwargs = dict(item_ids=item_ids.to(DEVICE), advantages=advantages.to(DEVICE, torch.float32 if dtype !=
                  torch.float64 else dtype), completion_mask=mask.to(DEVICE))
    if off_policy:  # ratios far enough from 1 that clipping is active
        shift = 0.3 * torch.randn(B, T, generator=g)
        kwargs["old_logps"] = (logps.cpu() + shift).to(DEVICE, kwargs["advantages"].dtype)
    return hidden, weight, bias, targets, kwargs


def _listed(kwargs, skip):
    mask = kwargs["completion_mask"] & (kwargs["item_ids"] >= 0)
    if not skip:
        return mask
    adv = kwargs["advantages"]
    live = torch.zeros(B, K, dtype=torch.bool, device=DEVICE).scatter_reduce_(
        1, kwargs["item_ids"].clamp(min=0), (adv != 0) & mask, "amax")
    return mask & live.gather(1, kwargs["item_ids"].clamp(min=0))


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("setting", ["on_policy", "off_policy", "kl"])
@pytest.mark.parametrize("chunks", ["one", "split"])
def test_skipping_matches_reference(monkeypatch, backend, dtype, loss_type, setting, chunks):
    hidden, weight, bias, targets, kwargs = _batch(dtype, off_policy=setting != "on_policy")
    kwargs.update(loss_type=loss_type, epsilon_low=0.06, epsilon_high=0.08)
    if setting == "kl":
        kwargs.update(beta=0.04, ref_logps=kwargs["old_logps"] + 0.1)
    if loss_type in WINDOW_TOKEN_NORMALISED:
        kwargs["num_items_in_batch"] = 3 * B * T
    if loss_type == "rank":
        kwargs["rec_num"] = K
    skip = setting != "kl"
    listed = _listed(kwargs, skip)
    with torch.no_grad():  # what a skipped token holds must not matter
        hidden[~listed] = float("nan")
    per_token = plan.bytes_per_token(backend, V, H, plan.gemm_dtype(hidden), True)
    budget = None if chunks == "one" else max(2**16, 7 * per_token)  # 7 tokens: rows split between chunks
    rows = GemmRows(monkeypatch)
    ours, stats = rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend, memory_budget_bytes=budget,
                                 **kwargs)
    grads = torch.autograd.grad(ours, (hidden, weight, bias))
    assert rows.logits == int(listed.sum())  # each listed token's logits once, nothing else
    assert rows.gradients <= 3 * int(listed.sum())

    params = [x.detach().double().clone().requires_grad_() for x in (hidden, weight, bias)]
    with torch.no_grad():
        params[0][~listed] = 0.0  # the reference reads every row; give the skipped ones finite values
    ref, ref_stats = reference_loss(*params[:2], targets, bias=params[2], **kwargs)
    tol = TOL[dtype]
    torch.testing.assert_close(ours.double(), ref, **tol)
    for got, want in zip(grads, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(got.double(), want, rtol=tol["rtol"], atol=tol["atol"] * 10)
    assert torch.all(grads[0][~listed] == 0)
    listed_only = dict(kwargs, completion_mask=listed)  # the ratio is averaged over the listed tokens
    _, listed_stats = reference_loss(*params[:2], targets, bias=params[2], **listed_only)
    for name, value in ref_stats.items():
        want = listed_stats[name] if name in ("ratio_mean", "weight_mean") else value
        torch.testing.assert_close(stats[name].double(), want, **tol)
    if setting == "off_policy" and loss_type != "vespo":  # VESPO clips nothing
        assert stats["clip_ratio_region"] > 0


@pytest.mark.parametrize("backend", [name for name, dtype in CASES if dtype == torch.float32])
def test_no_listed_token_gives_zero_loss_and_gradients(monkeypatch, backend):
    hidden, weight, bias, targets, kwargs = _batch(torch.float32, off_policy=False)
    kwargs["advantages"] = torch.zeros_like(kwargs["advantages"])
    with torch.no_grad():
        hidden.fill_(float("nan"))
    rows = GemmRows(monkeypatch)
    loss, stats = rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend, **kwargs)
    assert loss.item() == 0.0 and rows.logits == rows.gradients == 0
    assert all(torch.all(g == 0) for g in torch.autograd.grad(loss, (hidden, weight, bias)))
    assert all(torch.isfinite(v).all() for v in stats.values())


@pytest.mark.parametrize("backend", [name for name, dtype in CASES if dtype == torch.float32])
def test_reference_logps_keep_every_loss_token_and_entropy_is_over_the_listed_ones(monkeypatch, backend):
    """A KL statistic (reference log-probs at beta = 0) reads every loss token's log-probs: nothing skipped. The
    entropy statistic does not stop the skipping: it is the mean over the listed tokens, like the ratio."""
    hidden, weight, bias, targets, kwargs = _batch(torch.float32, off_policy=True)
    mask = kwargs["completion_mask"]
    rows = GemmRows(monkeypatch)
    _, stats = rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend,
                              ref_logps=kwargs["old_logps"] - 0.05, **kwargs)
    assert rows.logits == int(mask.sum())
    _, ref_stats = reference_loss(hidden.double(), weight.double(), targets, bias=bias.double(),
                                  ref_logps=kwargs["old_logps"] - 0.05, **kwargs)
    for name in ("ratio_mean", "kl"):
        torch.testing.assert_close(stats[name].double(), ref_stats[name], **TOL[torch.float32])

    listed = _listed(kwargs, skip=True)
    rows = GemmRows(monkeypatch)
    _, stats = rank_grpo_loss(hidden, weight, targets, bias=bias, backend=backend, compute_entropy=True, **kwargs)
    assert rows.logits == int(listed.sum()) < int(mask.sum())
    _, entropy = reference_logprobs(hidden.double(), weight.double(), targets, bias=bias.double(),
                                    return_entropy=True)
    torch.testing.assert_close(stats["entropy"].double(), entropy[listed].mean(), **TOL[torch.float32])


def test_a_long_completion_stays_on_the_fused_path(monkeypatch):
    """One 240-token row of 10-token items, 25 tokens per chunk: chunks of two whole items, no recomputed logits
    (no warning: warnings are errors here)."""
    vocab = 3000
    hidden, weight, bias, targets = random_head(1, 240, H, vocab, torch.float64, device=DEVICE)
    item_ids = (torch.arange(240, device=DEVICE) // 10)[None]
    advantages = torch.randn(1, 24, dtype=torch.float64, device=DEVICE).gather(1, item_ids)
    budget = 25 * plan.bytes_per_token("torch", vocab, H, torch.float64, True)
    rows = GemmRows(monkeypatch, vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, _ = rank_grpo_loss(hidden, weight, targets, bias=bias, item_ids=item_ids, advantages=advantages,
                                 backend="torch", memory_budget_bytes=budget)
    assert rows.logits_calls == [20] * 12
    ref, _ = reference_loss(hidden, weight, targets, bias=bias, item_ids=item_ids, advantages=advantages)
    torch.testing.assert_close(loss, ref, **TOL[torch.float64])
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend,dtype", CASES)
def test_fused_logprobs_with_a_mask(monkeypatch, backend, dtype):
    """Only the masked tokens enter the GEMMs; the others get 0 and no gradient, whatever their hidden states and
    targets hold."""
    hidden, weight, bias, targets, kwargs = _batch(dtype, off_policy=False)
    mask = kwargs["completion_mask"]
    with torch.no_grad():
        hidden[~mask] = float("nan")
    targets = torch.where(mask, targets, -100)
    rows = GemmRows(monkeypatch)
    logp, entropy = fused_logprobs(hidden, weight, targets, bias=bias, mask=mask, return_entropy=True,
                                   backend=backend)
    assert rows.logits == int(mask.sum())
    params = [x.detach().double().clone().requires_grad_() for x in (hidden, weight, bias)]
    with torch.no_grad():
        params[0][~mask] = 0.0
    ref, ref_entropy = reference_logprobs(*params[:2], targets.clamp(min=0), bias=params[2], return_entropy=True)
    ref, ref_entropy = torch.where(mask, ref, 0), torch.where(mask, ref_entropy, 0)
    torch.testing.assert_close(logp.double(), ref, **TOL[dtype])
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **TOL[dtype])
    upstream = torch.randn(B, T, dtype=torch.float64, device=DEVICE)  # non-zero on unmasked tokens too
    grads = torch.autograd.grad((logp * upstream.to(logp.dtype)).sum(), (hidden, weight, bias))
    for got, want in zip(grads, torch.autograd.grad((ref * upstream).sum(), params)):
        torch.testing.assert_close(got.double(), want, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * 10)
    assert torch.all(grads[0][~mask] == 0)


@st.composite
def skipping_batches(draw):
    """Drawn shapes, item layouts (non-contiguous ids included), masks, zero-advantage items, clip regimes, loss
    types, beta and chunk sizes, on a float64 head."""
    rows, length, items = draw(st.integers(1, 5)), draw(st.integers(1, 14)), draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hidden, weight, bias, targets = random_head(rows, length, 6, 40, torch.float64, seed=draw(st.integers(0, 99)))
    item_ids = torch.randint(-1, items, (rows, length), generator=g)
    if draw(st.booleans()):
        item_ids = item_ids.sort(dim=1).values
    rank_adv = torch.randn(rows, items, generator=g, dtype=torch.float64)
    rank_adv[torch.rand(rows, items, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))] = 0.0
    with torch.no_grad():
        logps = reference_logprobs(hidden, weight, targets, bias=bias)
    beta = draw(st.sampled_from([0.0, 0.0, 1e-3]))
    kwargs = dict(item_ids=item_ids, advantages=rank_adv.gather(1, item_ids.clamp(min=0)),
                  completion_mask=torch.rand(rows, length, generator=g) > draw(st.sampled_from([0.0, 0.3])),
                  old_logps=logps + draw(st.sampled_from([0.0, 0.3])) * torch.randn(rows, length, generator=g,
                                                                                   dtype=torch.float64),
                  ref_logps=logps + 0.2 if beta else None, beta=beta, epsilon_low=0.06, epsilon_high=0.08,
                  loss_type=draw(st.sampled_from(LOSS_TYPES)),
                  num_items_in_batch=2 * rows * length, rec_num=items)
    per_token = plan.bytes_per_token("torch", 40, 6, torch.float64, True)
    budget = draw(st.sampled_from([None, 2**16, 2**16 + per_token * draw(st.integers(1, 30))]))
    return hidden, weight, bias, targets, kwargs, budget


@given(skipping_batches())
def test_skipping_property(case):
    hidden, weight, bias, targets, kwargs, budget = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a drawn budget may be below an item: the recomputed item then warns
        ours, stats = rank_grpo_loss(hidden, weight, targets, bias=bias, backend="torch",
                                     memory_budget_bytes=budget, **kwargs)
    ref, ref_stats = reference_loss(hidden, weight, targets, bias=bias, **kwargs)
    torch.testing.assert_close(ours, ref, **TOL[torch.float64])
    for got, want in zip(torch.autograd.grad(ours, (hidden, weight, bias)),
                         torch.autograd.grad(ref, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    for name in ("clip_ratio_low", "clip_ratio_high", "kl"):
        if name in ref_stats:
            torch.testing.assert_close(stats[name], ref_stats[name], **TOL[torch.float64])

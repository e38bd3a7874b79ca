"""The reference, the public loss and the reward helpers against every golden value of the spec."""

from __future__ import annotations

import pytest
import torch

from rankgrpo_kernels import (
    newline_counts, rank_advantages, rank_grpo_loss_from_logps, rank_rewards, segment_items, token_advantages,
)
from rankgrpo_kernels.reference import reference_loss_from_logps

from ..helpers import EPS_HIGH, EPS_LOW, TinyTokenizer, golden_batch, unpad

VECTORS = ["TV1", "TV2", "TV3"]
CODE_CASES = [(lt, beta) for lt in ("grpo", "bnpo", "dr_grpo") for beta in (0.0, 1e-3)]
RTOL = 1e-9  # float64 against 10-significant-digit golden values computed in float64


def _code_kwargs(b, loss_type, beta):
    return dict(item_ids=b["seg"], advantages=b["adv"], completion_mask=b["mask"], old_logps=b["old"],
                ref_logps=b["ref"], epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta, loss_type=loss_type)


def _paper_kwargs(b):
    content = b["mask"] & ~b["eos"] & (b["seg"] < b["rec_num"])
    return dict(item_ids=torch.where(content, b["seg"], -1), advantages=b["advantages"], advantage_level="rank",
                old_logps=b["old"], epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="rank")


def _loss_and_grad(fn, b, kwargs):
    logps = b["logp"].clone().requires_grad_()
    loss, stats = fn(logps, **kwargs)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss, grad, stats


@pytest.mark.parametrize("fn", [reference_loss_from_logps, rank_grpo_loss_from_logps], ids=["reference", "public"])
@pytest.mark.parametrize("name", VECTORS)
@pytest.mark.parametrize("loss_type,beta", CODE_CASES)
def test_code_form(golden, fn, name, loss_type, beta):
    vector = golden[name]
    b = golden_batch(vector)
    kwargs = _code_kwargs(b, loss_type, beta)
    loss, grad, _ = _loss_and_grad(fn, b, kwargs)
    expected = vector["code"][f"{loss_type}_beta{0 if beta == 0 else beta}"]
    assert loss.item() == pytest.approx(expected["loss"], rel=RTOL, abs=1e-15)
    for got, want in zip(unpad(grad, b["mask"]), expected["grad_logp"]):
        assert got == pytest.approx(want, rel=RTOL, abs=1e-15)


@pytest.mark.parametrize("name", VECTORS)
def test_paper_form(golden, name):
    vector = golden[name]
    b = golden_batch(vector)
    expected = vector["paper"]
    kwargs = _paper_kwargs(b)
    public = _loss_and_grad(rank_grpo_loss_from_logps, b, kwargs)
    per_token = b["advantages"].gather(1, kwargs["item_ids"].clamp(min=0)) * (kwargs["item_ids"] >= 0)
    ref_kwargs = dict(kwargs, advantages=per_token, rec_num=b["rec_num"])
    del ref_kwargs["advantage_level"]
    reference = _loss_and_grad(reference_loss_from_logps, b, ref_kwargs)
    for loss, grad, _ in (public, reference):
        assert loss.item() == pytest.approx(expected["loss"], rel=RTOL, abs=1e-15)
        for got, want in zip(unpad(grad, b["mask"]), expected["grad_logp"]):
            assert got == pytest.approx(want, rel=RTOL, abs=1e-15)


@pytest.mark.parametrize("name", VECTORS)
def test_rank_terms_and_clip_stats(golden, name):
    """The per-item ratios of the table, seen through the clip statistics the loss reports."""
    vector = golden[name]
    b = golden_batch(vector)
    _, _, stats = _loss_and_grad(rank_grpo_loss_from_logps, b, _code_kwargs(b, "bnpo", 0.0))
    low = high = tokens = 0
    for i, row in enumerate(vector["tokens"]):
        for tok in row:
            w = vector["code_ratios_per_bin"][i][str(tok["seg"])]
            low += w < 1 - EPS_LOW and tok["adv"] < 0
            high += w > 1 + EPS_HIGH and tok["adv"] > 0
            tokens += 1
    assert stats["clip_ratio_low"].item() == pytest.approx(low / tokens)
    assert stats["clip_ratio_high"].item() == pytest.approx(high / tokens)
    d = (b["ref"] - b["logp"])[b["mask"]]
    assert stats["kl"].item() == pytest.approx((d.exp() - d - 1).mean().item(), rel=1e-12)
    assert "entropy" not in stats


@pytest.mark.parametrize("name", VECTORS)
def test_rewards_and_advantages(golden, name):
    vector = golden[name]
    hits = torch.tensor(vector["hits"], dtype=torch.float64)
    kind = "dcg" if name == "TV2" else "exp_inf"  # TV2 is the DCG example
    rewards = rank_rewards(hits, kind)
    for got, want in zip(rewards.tolist(), vector["rewards"]):
        assert got == pytest.approx(want, rel=1e-9)
    adv = rank_advantages(torch.tensor(vector["rewards"], dtype=torch.float64), num_generations=len(hits))
    for got, want in zip(adv.tolist(), vector["advantages"]):
        assert got == pytest.approx(want, rel=1e-9)  # the golden DCG rewards carry 10 digits


def test_reward_vectors(golden):
    v = golden["reward_vectors"]
    hits = torch.tensor([v["hits"]], dtype=torch.float64)
    assert rank_rewards(hits, "exp_inf")[0].tolist() == v["exp_inf"]
    assert rank_rewards(hits, "dcg")[0].tolist() == pytest.approx(v["dcg_k_to_N"], rel=1e-12)
    assert rank_rewards(hits, "exp", gamma=2.0)[0].tolist() == pytest.approx(v["exp_gamma_2"], rel=1e-12)


@pytest.mark.parametrize("name", VECTORS)
def test_segmentation_and_token_advantages(golden, name):
    """Tokenising the golden rows by name reproduces their bins and the code form's token advantages."""
    b = golden_batch(golden[name])
    tokenizer = TinyTokenizer(sorted({p for row in b["names"] for p in row}))
    B, T = b["seg"].shape
    ids = torch.full((B, T), tokenizer.eos_token_id)
    for i, row in enumerate(b["names"]):
        ids[i, : len(row)] = torch.tensor(tokenizer.encode(row))
    seg = segment_items(ids, b["mask"], newline_counts(tokenizer), b["rec_num"], eos_token_id=tokenizer.eos_token_id)
    assert torch.equal(seg.item_ids, b["seg"])
    adv = token_advantages(b["advantages"], seg)
    for got, want in zip(unpad(adv, b["mask"]), unpad(b["adv"], b["mask"])):
        assert got == pytest.approx(want, rel=1e-12)

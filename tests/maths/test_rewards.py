"""Rewards and advantages against direct loops over ranks and groups."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rankgrpo_kernels import rank_advantages, rank_rewards, segment_items, token_advantages

from ..helpers import TinyTokenizer


@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31 - 1), st.floats(1.1, 5.0))
def test_rewards_match_loops(B, K, seed, gamma):
    hits = (torch.rand(B, K, generator=torch.Generator().manual_seed(seed)) > 0.5).double()
    exp = rank_rewards(hits, "exp", gamma=gamma)
    dcg = rank_rewards(hits, "dcg")
    for i in range(B):
        for k in range(K):
            assert exp[i, k].item() == pytest.approx(sum(hits[i, j].item() / gamma ** (j - k) for j in range(k, K)))
            assert dcg[i, k].item() == pytest.approx(sum(hits[i, j].item() / math.log2(j + 2) for j in range(k, K)))
    assert torch.equal(rank_rewards(hits), hits)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantage_scales(scale):
    rewards = torch.randn(6, 4, dtype=torch.float64)
    adv = rank_advantages(rewards, num_generations=3, scale=scale, eps=1e-4)
    for g in range(2):
        group = rewards[3 * g : 3 * g + 3]
        centred = group - group.mean(0)
        std = {"group": group.std(0), "batch": rewards.std(0), "none": None}[scale]
        expected = centred if std is None else centred / (std + 1e-4)
        torch.testing.assert_close(adv[3 * g : 3 * g + 3], expected)


def test_identical_rewards_give_zero_advantage_not_nan():
    adv = rank_advantages(torch.ones(4, 3), num_generations=4)
    assert torch.all(adv == 0)


def test_length_shaping_switches():
    tok = TinyTokenizer(["A", "\n"])
    e = tok.eos_token_id
    ids = torch.tensor([tok.encode(["A", "\n", "A", "<eos>", "<eos>"]),  # 2 items = N: bonus on EOS
                        tok.encode(["A", "<eos>", "<eos>", "<eos>", "<eos>"]),  # 1 item < N: early-stop penalty
                        tok.encode(["A", "\n", "A", "\n", "A"])])  # a third item: overflow, no EOS
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    seg = segment_items(ids, mask, torch.tensor([0, 1, 0]), 2, eos_token_id=e)
    adv = torch.tensor([[1.0, 2.0]] * 3)
    shaped = token_advantages(adv, seg, end_of_list_bonus=0.5, early_stop_penalty=-0.25, overflow_penalty=-0.125)
    assert shaped.tolist() == [[1, 1, 2, 0.5, 0], [1, -0.25, 0, 0, 0], [1, 1, 2, 2, -0.125]]
    plain = token_advantages(adv, seg, length_shaping=False)
    assert plain.tolist() == [[1, 1, 2, 0, 0], [1, 0, 0, 0, 0], [1, 1, 2, 2, 0]]

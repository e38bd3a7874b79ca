"""The custom ops pass torch.library.opcheck and the public functions trace with torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

from rankgrpo_kernels import fused_logprobs, ops, rank_grpo_loss, rank_grpo_loss_from_logps
from rankgrpo_kernels.contract import dense_groups

from .helpers import random_loss_batch

B, T, H, V = 2, 5, 8, 37


@pytest.fixture
def inputs():
    b = random_loss_batch(B, T, 2, dtype=torch.float32)
    mask = b["completion_mask"] & (b["item_ids"] >= 0)
    b.update(
        hidden=torch.randn(B * T, H, requires_grad=True), weight=torch.randn(V, H, requires_grad=True),
        bias=torch.randn(V, requires_grad=True), targets=torch.randint(0, V, (B * T,)),
        group=dense_groups(b["item_ids"], mask), mask=mask, normaliser=mask.sum().float(),
    )
    return b


def test_opcheck_fused_loss(inputs):
    b = inputs
    args = (b["hidden"], b["weight"], b["bias"], b["targets"], b["old_logps"], b["ref_logps"], b["advantages"],
            b["group"], b["mask"], b["normaliser"], 0.2, 0.28, 1.5, 0.01, "bnpo", 0.9, True, 2**16, "torch")
    torch.library.opcheck(ops.fused_loss, args)


@pytest.mark.parametrize("return_entropy", [False, True])
def test_opcheck_fused_logprobs(inputs, return_entropy):
    b = inputs
    args = (b["hidden"], b["weight"], None, b["targets"], 1.0, 2**16, return_entropy, "torch")
    torch.library.opcheck(ops.fused_logprobs, args)


def test_opcheck_loss_from_logps(inputs):
    b = inputs
    args = (b["logps"].requires_grad_(), None, b["ref_logps"], b["advantages"], b["group"], b["mask"],
            b["normaliser"], None, 0.2, 0.2, None, 0.04, "rank", "torch")
    torch.library.opcheck(ops.loss_from_logps, args)


def test_opcheck_logprob_backward(inputs):
    b = inputs
    lse = torch.logsumexp(b["hidden"].detach() @ b["weight"].detach().T, -1)
    args = (b["hidden"].detach(), b["weight"].detach(), None, b["targets"], 1.0, lse, torch.randn(B * T), 2**16,
            True, True, False, "torch")
    torch.library.opcheck(ops.logprob_backward, args)


def test_compiled_fullgraph_matches_eager(inputs):
    """One graph, no host sync: the value checks are skipped while compiling."""
    b = inputs
    hidden = b["hidden"].detach().view(B, T, H).requires_grad_()
    kwargs = dict(item_ids=b["item_ids"], advantages=b["advantages"], completion_mask=b["completion_mask"],
                  old_logps=b["old_logps"], ref_logps=b["ref_logps"], beta=0.01, backend="torch")

    def step(hidden, weight, targets):
        loss, stats = rank_grpo_loss(hidden, weight, targets, **kwargs)
        with torch.no_grad():
            logps = fused_logprobs(hidden, weight, targets, backend="torch")
        from_logps, _ = rank_grpo_loss_from_logps(logps, **{k: v for k, v in kwargs.items() if k != "backend"})
        return loss, from_logps, stats["clip_ratio_region"]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    targets = b["targets"].view(B, T)
    got = compiled(hidden, b["weight"], targets)
    want = step(hidden, b["weight"], targets)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(*[torch.autograd.grad(x[0], hidden)[0] for x in (got, want)])

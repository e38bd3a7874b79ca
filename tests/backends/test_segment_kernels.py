"""The segment loss at full completion lengths and odd item layouts against the float64 reference: the torch
backend, the Triton launcher ``segment_loss_rows`` on plain tensors (Triton's interpreter on the CPU, natively on a
GPU) and, on a GPU, the CUDA backend.

One item per token (PPO equivalence) at T = 4096 is where a (tokens x items) kernel would do 16M comparisons per row
and pass; items whose tokens interleave, and items spanning several token blocks, check the Triton kernel's per-row
sort and the segmented scan that carries sums across blocks, and the CUDA kernel's per-warp item sums added into
the bins chunk after chunk; rows without items give exact zeros.

Tolerances: the kernels add in fp32 (unit roundoff 6e-8) in another order than the float64 reference: item sums over
up to T tokens, row sums over T and batch sums over B rows agree to ~1e-6 relative, so 1e-5 relative holds with
margin. Sums that cancel (advantages of both signs in one item, a loss near 0) lose their relative accuracy but not
their absolute one, which is relative to the magnitude of the terms: hence an absolute tolerance of 1e-6 times the
largest value compared (the largest gradient, or 1 for the loss and statistics, which are O(1) here).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rankgrpo_kernels import backends, rank_grpo_loss_from_logps
from rankgrpo_kernels.contract import LOG_RATIO_LIMIT, POLICY, VESPO_LOG_W_MIN, WEIGHTING, dense_groups
from rankgrpo_kernels.reference import reference_loss_from_logps
from rankgrpo_kernels.specs import LossSpec

STATS = ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "ratio_mean", "kl", "clip_ratio_low_per_row",
         "clip_ratio_high_per_row", "weight_mean")
SETTINGS = dict(epsilon_low=0.1, epsilon_high=0.2, delta=1.8, beta=0.04)
REC_NUM, NUM_ITEMS_IN_BATCH = 20, 1000
# Every backend through the public function, and the Triton launcher on plain tensors; CUDA-only ones need a GPU.
PATHS = [pytest.param(n, marks=pytest.mark.gpu) if backends.REGISTRY[n].cuda_only and not backends.REGISTRY[n].cpu_env
         else n for n in backends.names()]


def _inputs(item_ids, mask=None, *, seed=0):
    """Random fp32 log-probs, advantages, old/reference log-probs and policy weights (a quarter 0) for the given item
    ids."""
    g = torch.Generator().manual_seed(seed)
    B, T = item_ids.shape
    logps = -3 * torch.rand(B, T, generator=g)
    return dict(logps=logps, item_ids=item_ids, advantages=torch.randn(B, T, generator=g),
                completion_mask=torch.ones(B, T, dtype=torch.bool) if mask is None else mask,
                old_logps=logps + 0.3 * torch.randn(B, T, generator=g),
                ref_logps=logps + 0.2 * torch.randn(B, T, generator=g),
                policy_weights=2 * torch.rand(B, T, generator=g) * (torch.rand(B, T, generator=g) > 0.25))


def _settings(loss_type, ref, **spec_fields):
    """The loss keywords: ``SETTINGS`` (delta only with PPO's clipped surrogate, CISPO's bound eps_high above 1) and
    other ``LossSpec`` fields."""
    settings = {**SETTINGS, "beta": SETTINGS["beta"] if ref else 0.0, **spec_fields}
    if POLICY[loss_type] != 0 or spec_fields.get("ratio_clip") == "token":
        settings["delta"] = None
    if loss_type == "cispo":
        settings["epsilon_high"] = 1.2
    return dict(loss_type=loss_type, rec_num=REC_NUM, num_items_in_batch=NUM_ITEMS_IN_BATCH, **settings)


def _spec_and_rest(settings):
    """The ``LossSpec`` of the loss keywords and the other keywords."""
    names = {f.name for f in dataclasses.fields(LossSpec)}
    return (LossSpec(**{k: v for k, v in settings.items() if k in names}),
            {k: v for k, v in settings.items() if k not in names})


def _reference(inputs, loss_type, old, ref, **spec_fields):
    """Loss, statistics and d loss / d logps of the float64 reference (autograd)."""
    logps = inputs["logps"].double().requires_grad_()
    loss, stats = reference_loss_from_logps(
        logps, inputs["item_ids"], inputs["advantages"].double(), inputs["completion_mask"],
        old_logps=inputs["old_logps"].double() if old else None,
        ref_logps=inputs["ref_logps"].double() if ref else None, policy_weights=inputs["policy_weights"].double(),
        **_settings(loss_type, ref, **spec_fields))
    (grad,) = torch.autograd.grad(loss, logps, allow_unused=True)
    return loss.detach(), stats, torch.zeros_like(logps) if grad is None else grad


def _public(inputs, loss_type, old, ref, backend, **spec_fields):
    """(loss, stats, d loss / d logps) of ``rank_grpo_loss_from_logps`` on ``backend``."""
    device = "cuda" if backend == "cuda" else "cpu"
    x = {k: v.to(device) for k, v in inputs.items()}
    logps = x["logps"].clone().requires_grad_()
    spec, rest = _spec_and_rest(_settings(loss_type, ref, **spec_fields))
    loss, stats = rank_grpo_loss_from_logps(
        logps, item_ids=x["item_ids"], advantages=x["advantages"], completion_mask=x["completion_mask"],
        old_logps=x["old_logps"] if old else None, ref_logps=x["ref_logps"] if ref else None,
        policy_weights=x["policy_weights"], backend=backend, **rest, loss=spec)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.cpu(), {k: v.cpu() for k, v in stats.items()}, grad.cpu(), None


def _launcher(inputs, loss_type, old, ref, **spec_fields):
    """(loss, stats, grad, row_sums) from the Triton launcher, on plain tensors as the Triton backend passes them."""
    pytest.importorskip("triton")
    from rankgrpo_kernels.backends.triton.segment_loss_kernel import segment_loss_rows
    from rankgrpo_kernels.backends.triton.tiles import interpreting

    if not interpreting() and not torch.cuda.is_available():
        pytest.skip("neither a GPU nor TRITON_INTERPRET=1")
    device = "cpu" if interpreting() else "cuda"
    x = {k: v.to(device) for k, v in inputs.items()}
    mask = (x["item_ids"] >= 0) & x["completion_mask"]
    B, T = mask.shape
    rows = torch.arange(B, device=device).unsqueeze(1) * T
    group = torch.where(mask, dense_groups(x["item_ids"], mask) - rows, -1)  # row-relative ids in [0, T)
    tokens = mask.sum().clamp(min=1).float()
    normaliser = {"grpo": B, "bnpo": tokens, "dr_grpo": B * T, "dapo": NUM_ITEMS_IN_BATCH, "rank": B * REC_NUM,
                  "luspo": B, "sapo": B, "cispo": NUM_ITEMS_IN_BATCH, "vespo": NUM_ITEMS_IN_BATCH}[loss_type]
    spec, _ = _spec_and_rest(_settings(loss_type, ref, **spec_fields))
    grad, row_sums = segment_loss_rows(
        x["logps"], x["old_logps"] if old else None, x["ref_logps"] if ref else None, x["advantages"], group,
        torch.as_tensor(normaliser, dtype=torch.float32, device=device), tokens,
        beta=spec.beta, clip_low=spec.clip_bounds[0], clip_high=spec.clip_bounds[1], delta=spec.delta,
        weighting=WEIGHTING[loss_type], log_ratio_limit=LOG_RATIO_LIMIT, policy_weights=x["policy_weights"],
        policy=spec.policy, temperatures=spec.sapo_temperatures, gamma=spec.vespo_gamma,
        log_w_min=VESPO_LOG_W_MIN, kl_corrected=spec.use_bias_correction_kl and ref)
    assert grad.shape == (B, T) and row_sums.shape == (B, 6)
    sums, tokens = row_sums.sum(0).cpu(), tokens.cpu()
    low, high = sums[1] / tokens, sums[2] / tokens
    row_tokens = mask.sum(1).clamp(min=1).cpu()
    row_low, row_high = (row_sums[:, i].cpu() / row_tokens for i in (1, 2))
    stats = dict(zip(STATS, (low, high, low + high, sums[3] / tokens, sums[4] / tokens, row_low, row_high,
                             sums[5] / tokens)))
    return sums[0], stats, grad.cpu(), row_sums.cpu()


def _run(path, inputs, loss_type, old=True, ref=True, **spec_fields):
    if path == "triton":
        return _launcher(inputs, loss_type, old, ref, **spec_fields)
    return _public(inputs, loss_type, old, ref, path, **spec_fields)


def _check(got, want):
    loss, stats, grad, _ = got
    want_loss, want_stats, want_grad = want
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    for name in STATS:
        if name in want_stats:
            torch.testing.assert_close(stats[name].double(), want_stats[name], rtol=1e-5, atol=1e-6)
    scale = max(want_grad.abs().max().item(), 1e-30)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", ["grpo", "rank"])
def test_one_item_per_token(path, loss_type):
    """T = 4096. Row 0: every token its own item; row 1: the same with a quarter of the tokens masked; row 2: no
    items."""
    B, T = 3, 4096
    item_ids = torch.arange(T).repeat(B, 1)
    item_ids[2] = -1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, torch.randperm(T, generator=torch.Generator().manual_seed(1))[: T // 4]] = False
    inputs = _inputs(item_ids, mask)
    got = _run(path, inputs, loss_type)
    _check(got, _reference(inputs, loss_type, True, True))
    assert got[1]["clip_ratio_region"] > 0  # the clip range binds on some tokens
    assert torch.all(got[2][2] == 0)  # the row without items
    if got[3] is not None:
        assert torch.all(got[3][2] == 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type,old,ref", [("bnpo", True, True), ("rank", True, False), ("grpo", False, True),
                                               ("dapo", True, True), ("luspo", True, False), ("sapo", True, True),
                                               ("cispo", True, True), ("vespo", True, True)])
def test_interleaved_items_spanning_blocks(path, loss_type, old, ref):
    """Row 0 cycles through 3 items (each ~330 tokens, over two of the Triton kernel's token blocks and several
    chunks of the CUDA kernel), row 1 has 40 items in a random order, row 2 alternates two ids and ends with tokens
    outside the loss. On a GPU, repeated runs are bit-identical (fixed reduction order)."""
    T = 1000
    t = torch.arange(T)
    item_ids = torch.stack([t % 3, torch.randint(0, 40, (T,), generator=torch.Generator().manual_seed(3)),
                            torch.where(t < 900, t % 2 + 7, -1)])
    inputs = _inputs(item_ids, seed=4)
    got = _run(path, inputs, loss_type, old, ref)
    _check(got, _reference(inputs, loss_type, old, ref))
    if torch.cuda.is_available():
        again = _run(path, inputs, loss_type, old, ref)
        assert torch.equal(got[0], again[0]) and torch.equal(got[2], again[2])


@pytest.mark.parametrize("path", PATHS)
def test_rows_without_items(path):
    loss, stats, grad, row_sums = _run(path, _inputs(torch.full((2, 300), -1)), "bnpo")
    assert loss == 0 and torch.all(grad == 0) and all(torch.all(v == 0) for v in stats.values())
    if row_sums is not None:
        assert torch.all(row_sums == 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type", ["bnpo", "rank", "sapo", "cispo", "vespo"])
def test_bias_corrected_kl(path, loss_type):
    """``use_bias_correction_kl``: the KL weighted by the item ratio, its gradient through the ratio (for CISPO and
    VESPO the only one), on items spanning blocks."""
    T = 700
    t = torch.arange(T)
    item_ids = torch.stack([t % 3, torch.where(t < 600, t // 7, -1)])
    inputs = _inputs(item_ids, seed=5)
    want = _reference(inputs, loss_type, True, True, use_bias_correction_kl=True)
    _check(_run(path, inputs, loss_type, use_bias_correction_kl=True), want)
    assert not torch.allclose(want[2], _reference(inputs, loss_type, True, True)[2])  # the correction counts


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss_type,old,corrected_kl", [("grpo", True, False), ("bnpo", True, True),
                                                        ("rank", True, False), ("dapo", False, False)])
def test_gmpo_token_clipping(path, loss_type, old, corrected_kl):
    """``ratio_clip="token"`` (GMPO): each token's log-ratio clipped inside the item's geometric mean, a clipped
    token without gradient through the ratio, the clip counts of the tokens; items spanning blocks."""
    T = 700
    t = torch.arange(T)
    item_ids = torch.stack([t % 3, torch.where(t < 600, t // 7, -1)])
    inputs = _inputs(item_ids, seed=6)
    fields = dict(ratio_clip="token", use_bias_correction_kl=corrected_kl)
    want = _reference(inputs, loss_type, old, True, **fields)
    got = _run(path, inputs, loss_type, old, True, **fields)
    _check(got, want)
    assert got[1]["clip_ratio_region"] > 0 or not old


@pytest.mark.parametrize("B,T", [(0, 5), (2, 0)])
def test_empty_launch(B, T):
    loss, _, grad, row_sums = _launcher(_inputs(torch.zeros(B, T, dtype=torch.long)), "grpo", True, True)
    assert loss == 0 and grad.shape == (B, T) and row_sums.shape == (B, 6) and torch.all(row_sums == 0)

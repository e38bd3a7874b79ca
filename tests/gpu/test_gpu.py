"""GPU tests (``pytest -m gpu``): the backends against the reference on CUDA at real LM-head sizes, in bf16.

Skipped without a GPU. Tolerances: bf16 inputs, compared with the reference run in fp32 on the same rounded inputs;
the kernels round nothing but the gradients' final cast, so the loss agrees to ~1e-4 relative and the gradients
to bf16's resolution (~1e-2 of their largest entry).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from rankgrpo_kernels import backends, fused_logprobs, rank_grpo_loss
from rankgrpo_kernels.reference import reference_logprobs, reference_loss, reference_loss_from_logps
from rankgrpo_kernels.settings import memory_budget

GPU_BACKENDS = [name for name in backends.names() if backends.REGISTRY[name].cuda_only]

pytestmark = pytest.mark.gpu

HEADS = {"qwen2.5-0.5b": (896, 151936), "llama-3.2-3b": (3072, 128256)}


def _batch(B, T, H, V, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(B, T, H, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), device="cuda", generator=g)
    item_ids = (torch.arange(T, device="cuda") * 20 // T).expand(B, T).contiguous()
    mask = torch.arange(T, device="cuda").expand(B, T) < int(0.9 * T)
    with torch.no_grad():
        logps = fused_logprobs(hidden, weight, targets, backend="torch")
    noise = torch.randn(2, B, T, device="cuda", generator=g)
    kwargs = dict(item_ids=item_ids, advantages=torch.randn(B, T, device="cuda", generator=g), completion_mask=mask,
                  old_logps=logps + 0.05 * noise[0], ref_logps=logps + 0.1 * noise[1], epsilon_low=0.06,
                  epsilon_high=0.08, beta=1e-3, loss_type="bnpo")
    return hidden, weight, targets, kwargs


def _relative(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _recompute_warnings(caught):
    return [w for w in caught if "recomput" in str(w.message).lower()]


def _float64_reference(hidden, weight, targets, kwargs, rows_per_slice=2):
    """The eager loss and gradients in float64 on the (rounded) inputs, without holding all logits: log-probs
    slice by slice, ``g = dL/dlogp`` from the loss on all of them, then each slice's log-probs again with their
    graph and the chain rule (``backward(g)``) into the float64 gradients."""
    h64, w64 = hidden.detach().double(), weight.detach().double().requires_grad_()
    slices = [slice(b, b + rows_per_slice) for b in range(0, hidden.shape[0], rows_per_slice)]
    with torch.no_grad():
        logps = torch.cat([reference_logprobs(h64[s], w64, targets[s]) for s in slices])
    logps.requires_grad_()
    loss, stats = reference_loss_from_logps(logps, **kwargs)
    (g,) = torch.autograd.grad(loss, logps)
    d_hidden = torch.empty_like(h64)
    for s in slices:
        h = h64[s].clone().requires_grad_()
        reference_logprobs(h, w64, targets[s]).backward(g[s])
        d_hidden[s] = h.grad
    return loss.detach(), stats, (d_hidden, w64.grad)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("head", list(HEADS))
def test_bf16_real_head_matches_reference(backend, head):
    H, V = HEADS[head]
    hidden, weight, targets, kwargs = _batch(4, 512, H, V, torch.bfloat16)
    loss, stats = rank_grpo_loss(hidden, weight, targets, backend=backend, **kwargs)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_h, ref_w = (x.detach().float().requires_grad_() for x in (hidden, weight))
    ref_loss, ref_stats = reference_loss(ref_h, ref_w, targets, **kwargs)
    ref_grads = torch.autograd.grad(ref_loss, (ref_h, ref_w))
    assert _relative(loss, ref_loss) < 1e-3
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16 and _relative(got, want) < 2e-2
    torch.testing.assert_close(stats["kl"], ref_stats["kl"].float(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_several_chunks_at_the_default_budget_match_float64(backend):
    """Qwen2.5-0.5B's head with enough tokens for at least two chunks at this GPU's default budget (each token's
    fp32 logits row alone is 4 V bytes), on the fused path (no recompute warning), against float64 eager."""
    H, V = HEADS["qwen2.5-0.5b"]
    T = 1024
    budget = memory_budget(None, torch.device("cuda"))
    B = math.ceil(2.5 * budget / (4 * V * T))
    assert 4 * V * B * T > 2 * budget
    hidden, weight, targets, kwargs = _batch(B, T, H, V, torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, _ = rank_grpo_loss(hidden, weight, targets, backend=backend, **kwargs)
        grads = torch.autograd.grad(loss, (hidden, weight))
    assert not _recompute_warnings(caught), [str(w.message) for w in caught]
    ref_loss, _, ref_grads = _float64_reference(hidden, weight, targets, kwargs)
    assert _relative(loss, ref_loss) < 1e-3
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16 and _relative(got, want) < 2e-2


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fp32_logprobs_match_reference(backend):
    hidden, weight, targets, _ = _batch(2, 256, 896, 32000, torch.float32)
    logp, entropy = fused_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    ref_logp, ref_entropy = reference_logprobs(hidden, weight, targets, return_entropy=True)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("path", ["fused", "recompute"])
def test_memory_is_the_gradients_plus_the_budget(backend, path):
    """Peak memory above the inputs: the bf16 gradients, the fp32 d_weight accumulator and the logits budget (plus
    per-token vectors and one (chunk x H) product), far below the (tokens x vocab) logits."""
    H, V = HEADS["qwen2.5-0.5b"]
    hidden, weight, targets, kwargs = _batch(8, 1024, H, V, torch.bfloat16)
    # A 1024-token row of fp32 logits is 622 MB: 2 GiB holds three such rows with their gradients' scratch (the
    # fused path, in 3 chunks), 64 MiB not even one (the recompute path, with its warning).
    budget = 2**31 if path == "fused" else 2**26
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, _ = rank_grpo_loss(hidden, weight, targets, backend=backend, memory_budget_bytes=budget, **kwargs)
        torch.autograd.grad(loss, (hidden, weight))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert bool(_recompute_warnings(caught)) == (path == "recompute"), [str(w.message) for w in caught]
    gradients = 2 * (hidden.numel() + weight.numel()) + 4 * weight.numel()  # bf16 results, fp32 d_weight sums
    logits = 4 * targets.numel() * V
    assert peak < gradients + budget + 0.02 * logits, (peak, logits)


def test_compiles_fullgraph_on_gpu():
    hidden, weight, targets, kwargs = _batch(2, 128, 256, 5003, torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w: rank_grpo_loss(h, w, targets, backend="triton", **kwargs)[0],
                             fullgraph=True)
    torch.testing.assert_close(compiled(hidden, weight),
                               rank_grpo_loss(hidden, weight, targets, backend="triton", **kwargs)[0])


def test_one_rank_nccl_matches_unsharded(tmp_path):
    """A single GPU shows the NCCL path (collectives on CUDA tensors); several ranks are covered with gloo."""
    import torch.distributed as dist

    hidden, weight, targets, kwargs = _batch(2, 256, 896, 32000, torch.bfloat16)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        sharded, _ = rank_grpo_loss(hidden, weight, targets, process_group=dist.group.WORLD, **kwargs)
        sharded_grads = torch.autograd.grad(sharded, (hidden, weight))
    finally:
        dist.destroy_process_group()
    whole, _ = rank_grpo_loss(hidden, weight, targets, **kwargs)
    torch.testing.assert_close(sharded, whole, rtol=1e-5, atol=1e-6)
    for got, want in zip(sharded_grads, torch.autograd.grad(whole, (hidden, weight))):
        assert _relative(got, want) < 1e-2


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_fp16_tiny_gradients_survive_a_loss_scale(backend):
    """fp16: bnpo over 16k tokens puts g near fp16's smallest normal; the gradients formed in the forward stay in
    fp32 until the backward has applied the loss scale, and enter the fp16 GEMMs rescaled by a power of two."""
    hidden, weight, targets, kwargs = _batch(8, 2048, 256, 5003, torch.float16)
    loss, _ = rank_grpo_loss(hidden, weight, targets, backend=backend, **kwargs)
    grads = torch.autograd.grad(loss * 2.0**16, (hidden, weight))  # what GradScaler does
    ref_h, ref_w = (x.detach().float().requires_grad_() for x in (hidden, weight))
    ref_loss, _ = reference_loss(ref_h, ref_w, targets, **kwargs)
    for got, want in zip(grads, torch.autograd.grad(ref_loss * 2.0**16, (ref_h, ref_w))):
        assert got.dtype == torch.float16 and _relative(got, want) < 1e-2
        assert ((got == 0) & (want.abs() > 1e-3)).sum() == 0

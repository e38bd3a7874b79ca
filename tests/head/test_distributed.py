"""Vocabulary-parallel heads over torch.distributed (gloo, 2 and 3 processes on this machine): sharded loss and
gradients equal the unsharded reference to float64 tolerance (float32 for the Triton interpreter), with an entropy
bonus over masked tokens (TRL's high-entropy ones)."""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rankgrpo_kernels import fused_logprobs, rank_grpo_loss
from rankgrpo_kernels.backends.triton.tiles import interpreting
from rankgrpo_kernels.reference import reference_logprobs, reference_loss

from ..helpers import random_loss_batch

B, T, H, V = 3, 7, 8, 41


def _problem(dtype, targets_in_first_shard):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / H**0.5
    bias = 0.1 * torch.randn(V, generator=g, dtype=dtype)
    high = 5 if targets_in_first_shard else V  # then the other ranks' shards hold none of the targets
    targets = torch.randint(0, high, (B, T), generator=g)
    batch = random_loss_batch(B, T, 3, dtype=dtype, generator=g)
    with torch.no_grad():
        logps = reference_logprobs(hidden, weight, targets, bias=bias, temperature=0.8)
    kwargs = dict(item_ids=batch["item_ids"], advantages=batch["advantages"],
                  completion_mask=batch["completion_mask"], old_logps=logps + 0.1 * batch["old_logps"].sin(),
                  ref_logps=logps + 0.2 * batch["ref_logps"].cos(), beta=0.05, epsilon_low=0.1, epsilon_high=0.1,
                  loss_type="grpo", entropy_coef=0.2, entropy_mask=torch.rand(B, T, generator=g) > 0.4)
    return hidden, weight, bias, targets, kwargs


def _worker(rank, world, init_file, shard_sizes, backend, dtype, targets_in_first_shard, errors):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        hidden, weight, bias, targets, kwargs = _problem(dtype, targets_in_first_shard)
        start = sum(shard_sizes[:rank])
        rows = slice(start, start + shard_sizes[rank])
        params = [x.clone().requires_grad_() for x in (hidden, weight[rows], bias[rows])]
        loss, stats = rank_grpo_loss(params[0], params[1], targets, bias=params[2], temperature=0.8, backend=backend,
                                     compute_entropy=True, process_group=dist.group.WORLD, **kwargs)
        grads = torch.autograd.grad(loss, params)

        full = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        ref_loss, ref_stats = reference_loss(full[0], full[1], targets, bias=full[2], temperature=0.8, **kwargs)
        ref_grads = torch.autograd.grad(ref_loss, full)
        tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss.to(loss.dtype), **tol)
        torch.testing.assert_close(stats["kl"], ref_stats["kl"].to(loss.dtype), **tol)
        torch.testing.assert_close(grads[0], ref_grads[0], **tol)  # d_hidden: all-reduced, the same everywhere
        torch.testing.assert_close(grads[1], ref_grads[1][rows], **tol)  # d_weight and d_bias: this rank's rows
        torch.testing.assert_close(grads[2], ref_grads[2][rows], **tol)

        logp, entropy = fused_logprobs(hidden, weight[rows], targets, bias=bias[rows], temperature=0.8,
                                       return_entropy=True, backend=backend, process_group=dist.group.WORLD)
        ref_logp, ref_entropy = reference_logprobs(hidden, weight, targets, bias=bias, temperature=0.8,
                                                   return_entropy=True)
        torch.testing.assert_close(logp, ref_logp.to(logp.dtype), **tol)
        torch.testing.assert_close(entropy, ref_entropy.to(entropy.dtype), **tol)
        mask = kwargs["completion_mask"] & (kwargs["item_ids"] >= 0)
        torch.testing.assert_close(stats["entropy"], ref_entropy[mask].mean().to(loss.dtype), **tol)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(shard_sizes, backend="torch", dtype=torch.float64, targets_in_first_shard=False):
    assert sum(shard_sizes) == V
    world = len(shard_sizes)
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), shard_sizes, backend, dtype,
                                          targets_in_first_shard, errors), nprocs=world, start_method="spawn")
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("shard_sizes", [(21, 20), (14, 14, 13), (30, 1, 10)], ids=["2-even", "3-uneven", "3-tiny"])
def test_sharded_matches_unsharded(shard_sizes):
    _run(shard_sizes)


def test_ranks_without_any_target_contribute_correctly():
    _run((5, 18, 18), targets_in_first_shard=True)


def test_an_empty_shard_contributes_nothing():
    _run((41, 0))


@pytest.mark.skipif(not interpreting(), reason="Triton backend on CPU needs TRITON_INTERPRET=1")
def test_sharded_triton_backend():
    _run((20, 21), backend="triton", dtype=torch.float32)


def test_fsdp2_and_zero3_heads_are_refused_with_the_fix():
    from torch.distributed.tensor import DeviceMesh, DTensor, Shard

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        try:
            mesh = DeviceMesh("cpu", [0])
            weight = DTensor.from_local(torch.randn(10, 4), mesh, [Shard(0)])
            hidden, targets = torch.randn(1, 2, 4), torch.zeros(1, 2, dtype=torch.long)
            with pytest.raises(TypeError, match=r"full_tensor\(grad_placements=\[Partial\('avg'\)\]"):
                fused_logprobs(hidden, weight, targets)
        finally:
            dist.destroy_process_group()
    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_id = 3  # what DeepSpeed ZeRO-3 leaves on a rank between gathers
    with pytest.raises(TypeError, match="GatheredParameters"):
        fused_logprobs(torch.randn(1, 2, 4), partitioned, torch.zeros(1, 2, dtype=torch.long))

"""The CPU logits scratch kept between calls (``head/scratch.py``): reused, lent to one buffer at a time, never kept
past the budget or off the CPU, freed by ``empty_cache``, per thread, and invisible in the results.

Results are compared bitwise (``torch.equal``) with a call that found no kept memory: the same arithmetic on other
memory, so any difference would be stale scratch read back. Across threads within 1e-5: a BLAS called from several
threads at once may split its sums otherwise; stale scratch would be off by far more.
"""

from __future__ import annotations

import gc
import resource
import threading

import pytest
import torch

from rankgrpo_kernels import empty_cache, fused_logprobs, rank_grpo_loss
from rankgrpo_kernels.head import scratch
from rankgrpo_kernels.head.scratch import LogitsBuffer

from ..helpers import loss_inputs_near_policy, random_head

B, T, H, V, K = 4, 20, 16, 500, 3
BUDGET = 2**20


def case(seed=0):
    """A head and its loss inputs, the same for the same seed."""
    hidden, weight, bias, targets = random_head(B, T, H, V, torch.float32, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inputs = loss_inputs_near_policy(hidden, weight, bias, targets, 1.0, K)
    return hidden, weight, bias, targets, inputs


def loss_and_grads(head_and_inputs, budget=BUDGET):
    hidden, weight, bias, targets, inputs = head_and_inputs
    loss = rank_grpo_loss(hidden, weight, targets, bias=bias, beta=0.04, memory_budget_bytes=budget, **inputs)[0]
    return (loss, *torch.autograd.grad(loss, (hidden, weight, bias)))


def kept() -> torch.Tensor | None:
    return scratch._kept().data


@pytest.fixture(autouse=True)
def fresh():
    empty_cache()
    yield
    empty_cache()


def test_kept_memory_is_reused_and_changes_no_result():
    first = loss_and_grads(case(0))
    memory = kept()
    assert memory is not None and memory.numel() * memory.element_size() <= BUDGET
    again = loss_and_grads(case(0))
    assert kept().data_ptr() == memory.data_ptr()
    other = loss_and_grads(case(1))  # other logits through the kept memory (grown if it needs more)
    third = loss_and_grads(case(0))
    empty_cache()
    assert kept() is None
    fresh = loss_and_grads(case(0))
    for result in (again, third, fresh):
        assert all(torch.equal(a, b) for a, b in zip(first, result))
    assert not torch.equal(first[0], other[0])


def test_chunk_over_the_budget_is_not_kept():
    # one vocabulary row of 2^15 fp32 logits is 128 KiB, over a 64 KiB budget: chunks of one token, not kept
    wide = LogitsBuffer(1, 2**15, torch.float32, "cpu", 2**16)
    assert kept() is None and wide.data.numel() == 2**15
    hidden, weight, bias, targets = random_head(1, 6, H, 2**15, torch.float32)
    inputs = loss_inputs_near_policy(hidden, weight, bias, targets, 1.0, 2)
    with pytest.warns(UserWarning, match="memory_budget_bytes"):
        loss = rank_grpo_loss(hidden, weight, targets, bias=bias, memory_budget_bytes=2**16, **inputs)[0]
    loss.backward()
    assert kept() is None


def test_lent_to_one_buffer_at_a_time():
    one = LogitsBuffer(3, V, torch.float32, "cpu", BUDGET)
    two = LogitsBuffer(3, V, torch.float32, "cpu", BUDGET)  # while one holds the kept memory
    assert one.data.data_ptr() == kept().data_ptr() != two.data.data_ptr()
    del one
    gc.collect()
    three = LogitsBuffer(2, V, torch.float32, "cpu", BUDGET)
    assert three.data.data_ptr() == kept().data_ptr()
    assert three.rows(2).shape == (2, V) and three.rows(2).stride() == (scratch.padded_vocab(V), 1)


def test_grows_and_follows_the_dtype():
    small = LogitsBuffer(1, V, torch.float32, "cpu", BUDGET)
    del small
    large = LogitsBuffer(8, V, torch.float32, "cpu", BUDGET)
    assert kept().numel() == 8 * scratch.padded_vocab(V)
    del large
    double = LogitsBuffer(2, V, torch.float64, "cpu", BUDGET)
    assert kept().dtype == torch.float64 and double.data.dtype == torch.float64


def test_kept_only_on_a_cpu():
    LogitsBuffer(2, V, torch.float32, "meta", BUDGET)
    assert kept() is None


def test_inference_mode_call_then_training():
    hidden, weight, bias, targets = random_head(B, T, H, V, torch.float32)
    with torch.inference_mode():
        fused_logprobs(hidden, weight, targets, bias=bias, memory_budget_bytes=BUDGET)
    assert kept() is not None and not kept().is_inference()
    loss_and_grads(case())  # writes the kept memory in place outside inference mode


def test_threads_keep_their_own():
    cases = [case(seed) for seed in range(4)]
    want = {seed: loss_and_grads(cases[seed]) for seed in range(4)}
    got, errors = {}, []

    def work(seed):
        try:
            for _ in range(3):
                got[seed] = loss_and_grads(cases[seed])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for seed, result in want.items():  # a BLAS called from several threads may sum in another order
        for a, b in zip(result, got[seed]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_no_page_faults_for_the_chunk_after_the_first_call():
    """What keeping it is for: a chunk over 32 MiB (glibc maps any such block afresh) is not paged in again by the
    next call (without keeping, each call faults in its ~12k pages)."""
    budget = 3 * 2**24
    hidden, weight, bias, targets = random_head(2, 1024, 8, 8192, torch.float32)
    inputs = loss_inputs_near_policy(hidden, weight, bias, targets, 1.0, 4)

    def call():
        loss = rank_grpo_loss(hidden, weight, targets, bias=bias, memory_budget_bytes=budget, **inputs)[0]
        torch.autograd.grad(loss, (hidden, weight, bias))

    call()
    assert kept().numel() * 4 > 2**25
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2**25 // 4096 // 4, faults

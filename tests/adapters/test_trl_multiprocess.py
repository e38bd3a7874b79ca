"""``RankGRPOTrainer`` on 2 processes on the CPU (gloo on 127.0.0.1): DDP, FSDP2 and DeepSpeed ZeRO-3.

Each case launches ``tests/adapters/trl_multiprocess_run.py`` with torchrun for a few optimizer steps on the tiny
recommender (fixed completions: every run sees the same data) and checks that the logged losses and metrics and
every trained parameter equal a single-process run on the same global batch, to float32 tolerance, with an SGD
update large enough that a missing or doubled gradient reduction could not hide. FSDP2 runs through accelerate's own
``fsdp2_prepare_model`` (accelerate enables FSDP on accelerator devices only; the helper lets it run on the CPU).
The ZeRO-3 cases need DeepSpeed, built against the installed torch (``pip install --no-build-isolation deepspeed``),
and are skipped without it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from integrations.tiny_recommender import build_tiny_recommender  # noqa: E402

from .trl_multiprocess_run import STEPS, run, save_untied_copy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "tests" / "adapters" / "trl_multiprocess_run.py"
EXAMPLE = ROOT / "integrations" / "trl" / "train_tiny_recommender.py"
LOGGED = ("reward", "rewards/rank_1/mean", "rewards/rank_4/mean", "items/emitted_mean", "grad_norm")
# Token means over all processes, logged per micro-batch and averaged over the step: with gradient accumulation the
# micro-batches hold other rows on 2 processes than on one, so only without it do they match.
LOGGED_PER_MICRO_BATCH = ("kl", "clip_ratio/region_mean", "ratio/mean")
needs_deepspeed = pytest.mark.skipif(find_spec("deepspeed") is None, reason="needs DeepSpeed (pip install deepspeed)")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread) -> dict[str, str]:
    """The warm-started tiny recommender (tied embeddings) and a copy with an LM head of its own."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    directory = tmp_path_factory.mktemp("multiprocess")
    build_tiny_recommender(directory / "tied", rec_num=4, warm_steps=60)
    save_untied_copy(str(directory / "tied"), str(directory / "untied"))
    return {"tied": str(directory / "tied"), "untied": str(directory / "untied")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_loopback(command: Callable[[int], list[str]], cwd: Path) -> subprocess.CompletedProcess:
    """``command(port)`` with a free port on 127.0.0.1, once more with another port if someone took it meanwhile."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for _ in range(2):
        args = command(free_port())
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode == 0 or "EADDRINUSE" not in done.stdout + done.stderr:
            break
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{(done.stdout + done.stderr)[-6000:]}"
    return done


def launch(tmp_path: Path, model: str, mode: str, *options: str) -> dict:
    """The helper on 2 processes with torchrun on 127.0.0.1; returns rank 0's result."""
    out = tmp_path / f"{mode}.pt"
    run_on_loopback(lambda port: [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), str(HELPER), "--model", model, "--out", str(out), "--mode", mode, *options,
    ], tmp_path)
    return torch.load(out, weights_only=False)


@cache
def single_process(model: str, loss_type: str, grad_accum: int, num_iterations: int) -> dict:
    return run(model, "single", loss_type=loss_type, grad_accum=grad_accum, num_iterations=num_iterations)


def assert_same_training(multi: dict, single: dict, initial: dict[str, torch.Tensor], grad_accum: int) -> None:
    assert multi["processes"] == 2 and single["processes"] == 1
    assert len(multi["losses"]) == len(single["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(multi["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-7)
    logged = LOGGED + (LOGGED_PER_MICRO_BATCH if grad_accum == 1 else ())
    for logged_multi, logged_single in zip(multi["logs"], single["logs"], strict=True):
        for name in logged:  # sampling metrics appear on the steps that sample
            assert (name in logged_multi) == (name in logged_single), name
            if name in logged_single:
                torch.testing.assert_close(logged_multi[name], logged_single[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(name in multi["logs"][0] for name in logged)
    assert multi["params"].keys() == single["params"].keys()
    for name, trained in single["params"].items():
        moved = (trained - initial[name]).abs().max().item()
        assert moved > 1e-4, f"{name} barely moved ({moved:.1e}): the comparison would not see a wrong gradient"
        torch.testing.assert_close(multi["params"][name], trained, rtol=1e-5, atol=1e-6, msg=name)


def initial_parameters(model: str) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    return {name: p.detach() for name, p in LlamaForCausalLM.from_pretrained(model).named_parameters()}


# Loss types whose normaliser is global (dapo's token count of the whole batch) or per row with equal rows on every
# process (grpo, dr_grpo): there the mean of the processes' losses, which DDP, FSDP2 and ZeRO-3 average the gradients
# of, is the single-process loss. bnpo, and the KL of the rank form, are token means of each process's batch (TRL's
# convention), so they differ from one process by design.
CASES = [
    # mode, model, loss type, gradient accumulation, num_iterations, options
    pytest.param("ddp", "tied", "dapo", 2, 1, (), id="ddp-tied-dapo-accumulation"),
    pytest.param("fsdp2", "tied", "grpo", 1, 2, (), id="fsdp2-tied-grpo-reused-samples"),
    pytest.param("fsdp2", "untied", "dapo", 1, 1, ("--head-unit",), id="fsdp2-untied-head-its-own-unit"),
    pytest.param("zero3", "tied", "dr_grpo", 1, 2, (), id="zero3-tied-dr_grpo-reused-samples", marks=needs_deepspeed),
    pytest.param("zero3", "untied", "dapo", 2, 1, (), id="zero3-untied-dapo-accumulation", marks=needs_deepspeed),
]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "model", "loss_type", "grad_accum", "num_iterations", "options"), CASES)
def test_two_processes_train_as_one_process_on_the_same_global_batch(models, tmp_path, mode, model, loss_type,
                                                                      grad_accum, num_iterations, options):
    multi = launch(tmp_path, models[model], mode, "--loss-type", loss_type, "--grad-accum", str(grad_accum),
                   "--num-iterations", str(num_iterations), *options)
    single = single_process(models[model], loss_type, grad_accum, num_iterations)
    assert_same_training(multi, single, initial_parameters(models[model]), grad_accum)
    assert multi["tied"] == (model == "tied")
    assert multi["distributed_type"] == {"ddp": "MULTI_CPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED"}[mode]
    if mode == "fsdp2":
        assert multi["head_type"] == "DTensor"  # the trained head is sharded
        # accelerate keeps the head in a unit that FSDP2 has unsharded for the forward; as its own unit it stays
        # a DTensor there, and full_tensor() gathers it.
        assert ("DTensor" in multi["head_types_in_forward"]) == ("--head-unit" in options)
    if mode == "zero3":
        assert multi["head_numel"] == 0  # partitioned outside the forward
    if num_iterations > 1:
        assert any(entry["clip_ratio/region_mean"] > 0 for entry in single["logs"])  # the reused samples clipped


@pytest.mark.slow
def test_the_tiny_example_trains_on_two_processes_with_accelerate_launch(tmp_path):
    done = run_on_loopback(lambda port: [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_ip",
        "127.0.0.1", "--main_process_port", str(port), str(EXAMPLE), "--steps", "2",
    ], tmp_path)
    assert done.stdout.count("training on 2 processes") == 1  # rank 0 alone reports
    assert done.stdout.count("hit rate per rank of sampled lists, after:") == 1
    assert "started a single process" not in done.stderr

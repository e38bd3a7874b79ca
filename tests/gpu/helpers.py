"""What the GPU check's diagnostics share: Qwen2.5-0.5B's head on the GPU, a loss batch at it, times as the benchmark
takes them (CUDA events), and parts measured so that one failing does not hide the others."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from measure import timings  # noqa: E402

QWEN = (896, 151936)  # hidden, vocab
CUDA = torch.device("cuda")


def median_ms(fn, reps=10) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after one warm-up."""
    return 1e3 * statistics.median(timings(fn, reps, CUDA))


def sig(x, digits=4) -> float:
    """``x`` to ``digits`` significant figures, for the report."""
    return float(f"{x:.{digits}g}")


def guarded(fn):
    """``fn()``, or ``{"error": ...}`` if it raises: one part failing is reported and the others still run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return dict(error=f"{type(exc).__name__}: {str(exc)[:500]}")


def errors(parts: dict) -> dict:
    """The parts of ``parts`` (a dict of ``guarded`` results) that failed."""
    return {name: part["error"] for name, part in parts.items() if "error" in part}


def loss_inputs(B, T, dtype, head=QWEN, seed=0):
    """Hidden states and weight (requiring grad), targets and the loss's keyword inputs: 20 items per row, random
    advantages, old log-probs, bnpo."""
    H, V = head
    g = torch.Generator(device=CUDA).manual_seed(seed)
    hidden = torch.randn(B, T, H, device=CUDA, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=CUDA, generator=g) / H**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), device=CUDA, generator=g)
    item_ids = (torch.arange(T, device=CUDA) * 20 // T).expand(B, T).contiguous()
    kwargs = dict(item_ids=item_ids, advantages=torch.randn(B, T, device=CUDA, generator=g),
                  old_logps=-4 * torch.rand(B, T, device=CUDA, generator=g), loss_type="bnpo")
    return hidden, weight, targets, kwargs

"""One worker process of a run (``run.py --child NAME``), alive for one shape and every loss setting of it: the eager
yardstick (``reference``), the GEMM floors (``gemm``) or one provider. A fresh interpreter each, so that allocator
state, thread pools and compile caches in memory do not leak from one provider into the next.

``setup`` does all that is not timed, while every other worker of the shape waits: the yardsticks saved to disk; the
floor's buffers; a provider's batch per setting, its first call (the warm-up, and the ``1st call`` column: any
compilation), its check against the yardstick and its peak memory, then (after every setting) the breakdown of ours
and the forward alone. ``visit`` then times one run of a job, once per round (``rounds.py``): a setting for a
provider, a token count for the floor. ``rounds.serve`` carries the commands over the worker's stdin and stdout."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import workload as wl
from batches import Work, clip_stats
from measure import (
    GemmFloor,
    allocate_as_usual,
    breakdown,
    fwd_bwd,
    fwd_only,
    peak_memory_here,
    synchronize,
    timings,
    visit_seconds,
)
from providers import PROVIDERS, Unavailable, token_level_inputs
from rounds import serve
from shapes import HeadShape

from rankgrpo_kernels.reference import reference_loss

TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def eager_result(batch, loss_inputs):
    """Loss and gradients of hidden and weight by the eager reference (full logits)."""
    loss, _ = reference_loss(batch.hidden, batch.weight, batch.target_ids, **loss_inputs, **batch.settings)
    return [x.detach() for x in (loss, *torch.autograd.grad(loss, (batch.hidden, batch.weight)))]


def relative_error(got, want) -> float:
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp(min=1e-30)).item()
               for g, w in zip(got, want))


@dataclass(frozen=True)
class Job:
    """What every worker of a shape builds alike (from ``run.py``'s flags): the shape, dtype, device and workload,
    the folder of the yardsticks, and what a provider measures besides its visits."""

    shape: HeadShape
    dtype: torch.dtype
    device: torch.device
    work: Work
    ref_dir: Path
    reps: int = 1  # forward-alone runs (``fwd``)
    breakdown: bool = False
    fwd: bool = False
    token_level: bool = False  # the yardstick also on the token-level inputs (a provider needs it)

    def yardstick(self, setting, token_level=False) -> Path:
        return self.ref_dir / setting / ("token_level.pt" if token_level else "eager.pt")

    def batch(self, setting):
        return self.work.batch(self.shape, setting if self.work.realistic else None, self.dtype, self.device)


class Reference:
    """The eager loss and gradients of every setting, saved for the providers' checks (and, on the realistic
    workload, each setting's clip statistics, ``batches.clip_stats``)."""

    def __init__(self, job: Job):
        self.job = job

    def setup(self) -> dict:
        stats = {}
        for setting in self.job.work.setting_names():
            batch = self.job.batch(setting)
            self.job.yardstick(setting).parent.mkdir(parents=True, exist_ok=True)
            torch.save([x.cpu() for x in eager_result(batch, batch.loss_inputs)], self.job.yardstick(setting))
            if self.job.token_level:
                torch.save([x.cpu() for x in eager_result(batch, token_level_inputs(batch))],
                           self.job.yardstick(setting, token_level=True))
            if self.job.work.realistic:
                stats[setting] = clip_stats(batch.logps, batch.loss_inputs, self.job.work.setting(setting))
        return dict(settings=stats)


class Floor:
    """The GEMM floors: over all positions and, on the realistic workload, over each setting's GEMM tokens
    (``workload.gemm_tokens``); a visit's job is the token count."""

    def __init__(self, job: Job):
        self.job = job
        self.gemms = None

    def setup(self) -> dict:
        job, shape = self.job, self.job.shape
        out = dict(positions=shape.tokens)
        if job.work.realistic:
            layout = job.work.layout(shape)
            stats = wl.layout_stats(layout)
            counts = {name: wl.gemm_tokens(layout, job.work.setting(name)) for name in job.work.setting_names()}
            out = dict(positions=stats["positions"], gemm_tokens=counts, layout=stats)
        self.gemms = GemmFloor(out["positions"], shape.hidden, shape.vocab, job.dtype, job.device)
        return out

    def visit(self, job: str) -> dict:
        return self.gemms.visit(max(1, int(job)))


class Provider:
    """One provider at every setting: checked against the yardstick and measured in ``setup``; a visit's job is the
    setting."""

    def __init__(self, name: str, job: Job):
        self.name, self.job, self.provider = name, job, PROVIDERS[name]
        self.ready = {}  # setting -> (loss_fn, batch) of the settings that passed the check

    def _check(self, setting) -> dict:
        """Build, first call, check and peak memory at one setting (with glibc as ``MALLOC_ENV`` left it)."""
        job = self.job
        row = dict(provider=self.name, ours=self.provider.ours,
                   **job.shape.fields(setting if job.work.realistic else None))
        batch = job.batch(setting)
        row["positions"] = batch.target_ids.numel()
        try:
            loss_fn = self.provider.build(batch)
        except Unavailable as exc:
            return dict(row, status=f"skipped: {exc}")
        synchronize(job.device)
        t0 = time.perf_counter()
        got = fwd_bwd(loss_fn, batch)  # the warm-up (and any compilation)
        synchronize(job.device)
        row["first_call_ms"] = 1e3 * (time.perf_counter() - t0)
        want = torch.load(job.yardstick(setting, self.provider.token_level), map_location=job.device)
        error = relative_error(got, want)
        del got, want
        row["max_rel_error"] = error
        if not error <= TOLERANCE[job.dtype]:
            return dict(row, status=f"wrong: relative error {error:.2e} > {TOLERANCE[job.dtype]:.0e}")
        row["peak_mib"] = peak_memory_here(loss_fn, batch, job.device) / 2**20
        self.ready[setting] = (loss_fn, batch)
        return dict(row, status="ok")

    def setup(self) -> dict:
        job = self.job
        rows = {setting: self._check(setting) for setting in job.work.setting_names()}
        if job.device.type == "cpu":
            allocate_as_usual()
        for setting, (loss_fn, batch) in self.ready.items():
            if job.fwd:
                rows[setting]["fwd_ms"] = 1e3 * statistics.median(
                    timings(lambda: fwd_only(loss_fn, batch), job.reps, job.device))
            if job.breakdown and self.provider.backend is not None:
                try:
                    rows[setting]["breakdown"] = breakdown(loss_fn, batch, self.provider.backend, job.device)
                except Exception as exc:  # the figures above stand without it
                    rows[setting]["breakdown"] = dict(error=f"{type(exc).__name__}: {exc}")
        if job.device.type == "cuda":
            torch.cuda.empty_cache()  # idle, the worker holds its live tensors alone (``measure.visit_seconds``)
        return dict(rows=rows)

    def visit(self, job: str) -> dict:
        loss_fn, batch = self.ready[job]
        return visit_seconds(dict(seconds=lambda: fwd_bwd(loss_fn, batch)), self.job.device)


def worker(name: str, job: Job):
    """The worker ``run.py --child NAME`` serves."""
    if name == "reference":
        return Reference(job)
    if name == "gemm":
        return Floor(job)
    if name not in PROVIDERS:
        raise SystemExit(f"unknown worker {name!r}")
    return Provider(name, job)


def child_main(name: str, job: Job):
    """Serve ``setup`` and ``visit`` of worker ``name`` until the controller closes the pipe."""
    served = worker(name, job)
    serve({command: getattr(served, command) for command in ("setup", "visit") if hasattr(served, command)})

"""One job of a run in a fresh process (``run.py --child JOB``), so that allocator state, thread pools and compile
caches in memory do not leak from one provider into the next: the eager yardstick of a shape and setting, the GEMM
floors, or one provider checked against the yardstick, then measured. ``in_child`` is the parent's side: it starts
the process and reads back the JSON object the job prints last."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import workload as wl
from batches import DENSE, Work, clip_stats
from measure import (
    MALLOC_ENV,
    allocate_as_usual,
    breakdown,
    fwd_bwd,
    fwd_only,
    gemm_seconds,
    peak_memory_here,
    percentile,
    synchronize,
    timings,
)
from providers import PROVIDERS, Unavailable, token_level_inputs

from rankgrpo_kernels.reference import reference_loss

RUN_PY = Path(__file__).resolve().parent / "run.py"
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def eager_result(batch, loss_inputs):
    """Loss and gradients of hidden and weight by the eager reference (full logits)."""
    loss, _ = reference_loss(batch.hidden, batch.weight, batch.target_ids, **loss_inputs, **batch.settings)
    return [x.detach() for x in (loss, *torch.autograd.grad(loss, (batch.hidden, batch.weight)))]


def relative_error(got, want) -> float:
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp(min=1e-30)).item()
               for g, w in zip(got, want))


def reference_files(ref_dir) -> dict:
    return dict(eager=Path(ref_dir) / "eager.pt", token_level=Path(ref_dir) / "token_level.pt")


def save_references(shape, dtype, device, ref_dir, token_level, work: Work = DENSE, setting=None) -> dict:
    """The yardsticks of one shape and setting: eager on the batch, and on its token-level form if a provider needs
    it. On the realistic workload also the setting's clip statistics (``batches.clip_stats``)."""
    batch = work.batch(shape, setting, dtype, device)
    files = reference_files(ref_dir)
    torch.save([x.cpu() for x in eager_result(batch, batch.loss_inputs)], files["eager"])
    if token_level:
        torch.save([x.cpu() for x in eager_result(batch, token_level_inputs(batch))], files["token_level"])
    out = {"saved": [str(p) for p in files.values() if p.exists()]}
    if work.realistic:
        out["setting_stats"] = clip_stats(batch.logps, batch.loss_inputs, work.setting(setting))
    return out


def realistic_gemms(shape, work, dtype, device, reps) -> dict:
    """The realistic workload's GEMM floors: over all B x T positions, and per setting over the tokens its loss
    needs in a GEMM (``workload.gemm_tokens``); also the workload's shares (``workload.layout_stats``)."""
    layout = work.layout(shape)
    stats = wl.layout_stats(layout)
    counts = {name: wl.gemm_tokens(layout, work.setting(name)) for name in work.setting_names()}
    timed = {n: gemm_seconds(n, shape.hidden, shape.vocab, dtype, device, reps)
             for n in sorted({stats["positions"], *counts.values()}, reverse=True)}
    return dict(all=timed[stats["positions"]], loss_tokens={name: timed[n] for name, n in counts.items()},
                gemm_tokens=counts, layout=stats)


def provider_row(name, shape, dtype, device, reps, ref_dir, want_breakdown=False, want_fwd=False,
                 work: Work = DENSE, setting=None) -> dict:
    """Check one provider against the saved yardstick, then time it and measure its memory (one process)."""
    provider = PROVIDERS[name]
    row = dict(provider=name, **shape.fields(work.setting(setting).name if work.realistic else None))
    batch = work.batch(shape, setting, dtype, device)
    row["positions"] = batch.target_ids.numel()
    try:
        loss_fn = provider.build(batch)
    except Unavailable as exc:
        return dict(row, status=f"skipped: {exc}")
    synchronize(device)
    t0 = time.perf_counter()
    got = fwd_bwd(loss_fn, batch)  # the warm-up (and any compilation)
    synchronize(device)
    row["first_call_ms"] = 1e3 * (time.perf_counter() - t0)
    want = torch.load(reference_files(ref_dir)["token_level" if provider.token_level else "eager"],
                      map_location=device)
    error = relative_error(got, want)
    del got, want
    row["max_rel_error"] = error
    if not error <= TOLERANCE[dtype]:
        return dict(row, status=f"wrong: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}")
    row["peak_mib"] = peak_memory_here(loss_fn, batch, device) / 2**20
    if device.type == "cpu":
        allocate_as_usual()
    both = timings(lambda: fwd_bwd(loss_fn, batch), reps, device, warm_up=False)  # warm: the check and memory runs
    median = statistics.median(both)
    row.update(status="ok", fwd_bwd_ms=1e3 * median, fwd_bwd_p20_ms=1e3 * percentile(both, 0.2),
               fwd_bwd_p80_ms=1e3 * percentile(both, 0.8), fwd_bwd_runs_ms=[1e3 * t for t in both],
               tokens_per_s=row["positions"] / median)
    if want_fwd:
        row["fwd_ms"] = 1e3 * statistics.median(timings(lambda: fwd_only(loss_fn, batch), reps, device))
    if want_breakdown and provider.backend is not None:
        try:
            row["breakdown"] = breakdown(loss_fn, batch, provider.backend, device)
        except Exception as exc:  # the figures above stand without it
            row["breakdown"] = dict(error=f"{type(exc).__name__}: {exc}")
    return row


def child_main(args, shape, dtype, device, work: Work) -> dict:
    """The job ``args.child`` names, from ``run.py``'s parsed flags."""
    if args.child == "reference":
        return save_references(shape, dtype, device, args.ref_dir, args.token_level, work, args.setting)
    if args.child == "gemm":
        if work.realistic:
            return realistic_gemms(shape, work, dtype, device, args.reps)
        return gemm_seconds(shape.tokens, shape.hidden, shape.vocab, dtype, device, args.reps)
    return provider_row(args.child, shape, dtype, device, args.reps, args.ref_dir, bool(args.breakdown), args.fwd,
                        work, args.setting)


def in_child(job, shape, dtype, device, reps, ref_dir, options=(), timeout=None) -> dict:
    """Run ``job`` (a provider, ``reference`` or ``gemm``) for one shape in a fresh process; its last stdout line is
    a JSON object. A process that fails gives ``{"error": ...}`` with the end of its stderr."""
    cmd = [sys.executable, str(RUN_PY), "--child", job, "--shapes", shape.spec,
           "--dtype", str(dtype).split(".")[-1], "--device", str(device), "--reps", str(reps),
           "--ref-dir", str(ref_dir), *options]
    env = dict(os.environ, **(MALLOC_ENV if device.type == "cpu" else {}))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
    return {"error": f"exit {done.returncode}: " + " | ".join(tail)[-400:]}

"""Throughput and memory of the Rank-GRPO loss: ours against the eager baseline, the peers and the GEMM floor.

    python benchmarks/run.py                      # CPU: the realistic workload at the foundation head, fp32
    python benchmarks/run.py --device cuda        # GPU: the realistic workload at the Qwen2.5-0.5B and Llama-3.2-3B
                                                  # heads, ~16k positions, bf16, every provider
    python benchmarks/run.py --workload dense     # the dense batch (5% padding, an advantage on every item)
    python benchmarks/run.py --shapes qwen2.5-0.5b@16384 --providers eager,triton --dtype bfloat16 --reps 10
    python benchmarks/run.py --shapes 256x4000@512 --out benchmarks/out     # a quick look; JSON kept out of git
    python benchmarks/run.py --settings beta0 --providers eager,torch,trl   # one loss setting, three providers

Workloads (``--workload``). ``realistic`` (the default; ``workload.py``): P prompts x G = 8 completions, each a
20-item list (items of 6-16 tokens ending in a newline), some stopping early, some overflowing, an EOS, right-padded
as TRL pads; items from the library's segmentation, advantages from ``rank_rewards`` -> ``rank_advantages`` ->
``token_advantages`` as ``RankGRPOTrainer`` builds them, with hits correlated within a prompt (``--hits-per-list``)
so that most ranks of a group carry advantage exactly 0. ``HxV@N`` asks for about N padded positions (``--prompts``
sets P instead). Each of its three loss settings is timed: ``beta0`` (beta 0, on-policy, no reference: TRL 1.16's
default), ``beta1e-3`` (reference and old log-probs: the released run), ``offpolicy`` (beta 0, old log-probs far
enough from the policy that PPO clipping binds on a share of items). ``dense``: N tokens in rows of 512, 5% padding,
a random non-zero advantage per item, the released settings (``make_batch``).

One process per provider and shape (a fresh interpreter each, so allocator state, thread pools and compile caches
in memory do not leak from one provider into the next). For each shape, a first process computes the eager loss
and gradients (the yardstick) and saves them; a second times the LM head's GEMMs alone. Then each provider's
process builds the same seeded batch, runs the provider once (the warm-up, and the ``1st call`` column: it holds
any compilation) and checks its loss and gradients against the yardstick (``TOLERANCE`` of the dtype, relative to
the largest entry); a provider that disagrees is reported as wrong and not timed. Times: median and 20th/80th
percentiles over ``--reps`` runs of fwd+bwd (CUDA events on a GPU).

Memory: peak above the inputs, gradients included, of one fwd+bwd right after the check (before the timed runs).
On CUDA that is ``max_memory_allocated``. On the CPU it is the peak resident set (VmHWM, reset through
/proc/self/clear_refs) read against the resident set before the run, in a process started with glibc told to return
every block over 64 KiB to the system when it is freed (``MALLOC_ENV``), so that freed memory is neither reused
unseen nor counted twice; glibc's usual thresholds are then restored (``mallopt``) for the timed runs.

``x 3 GEMM`` divides by the time of the three (N x H x V) GEMMs any exact method needs (logits, d_hidden,
d_weight) measured in the same run; the ``3 GEMMs`` and ``4 GEMMs`` rows (four: the logits recomputed in the
backward, as a small-memory backward does) show them. On the realistic workload two rows per setting: ``3 GEMMs
(all positions)`` over all B x T positions, and ``3 GEMMs (loss tokens)`` over only the tokens the setting's loss
needs in a GEMM (``workload.gemm_tokens``: the loss tokens, less, at beta = 0, those of items whose advantage is 0
on every token); ``x 3 GEMM`` and ``x 3 GEMM (loss tokens)`` divide by each. ``--breakdown`` (default on the CPU,
where ours runs the torch backend) profiles one more fwd+bwd of each of ours: time in the GEMMs (aten::mm / addmm /
addmm_), in the backend's row pass, in its segment loss, and the rest (scaling, casts, Python); on a GPU the kernels'
device time.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import workload as wl  # noqa: E402
from providers import PROVIDERS, Batch, Unavailable, token_level_inputs  # noqa: E402
from report import BREAKDOWN_CAPTION, breakdown_table, results_table, workload_tables  # noqa: E402
from shapes import ALL_SHAPES, HeadShape, default_shapes, parse_shape  # noqa: E402

import rankgrpo_kernels  # noqa: E402
from rankgrpo_kernels import backends, fused_logprobs  # noqa: E402
from rankgrpo_kernels.reference import reference_loss  # noqa: E402

REC_NUM = 20
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 2e-2}
GEMM_ROWS = ("3 GEMMs", "4 GEMMs")
GEMM_NOTE = ("the LM head's GEMMs alone at this shape, in the same run: logits h W^T, d_hidden dZ W, d_weight dZ^T h "
             "(the floor of any exact method); 4 adds the logits once more (recomputed in the backward)")
ALL_POSITIONS, LOSS_TOKENS = "3 GEMMs (all positions)", "3 GEMMs (loss tokens)"
REALISTIC_GEMM_ROWS = (ALL_POSITIONS, LOSS_TOKENS)
REALISTIC_GEMM_NOTE = (f"{ALL_POSITIONS}: the three LM-head GEMMs (logits, d_hidden, d_weight) over all B x T "
                       f"positions, in the same run; {LOSS_TOKENS}: the same three over only the tokens the setting's "
                       "loss needs in a GEMM (gemm_tokens: the completion's loss tokens, less, at beta = 0, the tokens "
                       "of items whose advantage is 0 on every token, which carry no gradient)")
HERE = Path(__file__).resolve().parent
# glibc, in every process of a CPU run until its memory is measured: blocks over 64 KiB come from mmap and go back to
# the system when freed, and the heap is trimmed on every free, so the resident set follows live memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@dataclass(frozen=True)
class Work:
    """Which batch the run builds: the workload, its settings and, for the realistic one, its knobs."""

    kind: str = "realistic"  # or "dense"
    settings: tuple = tuple(wl.SETTINGS)
    prompts: int | None = None  # P; default from the shape's N (about N padded positions)
    hits_per_list: float = wl.HITS_PER_LIST

    @property
    def realistic(self) -> bool:
        return self.kind == "realistic"

    def setting_names(self) -> tuple:
        return self.settings if self.realistic else (wl.RELEASED.name,)

    def setting(self, name=None) -> wl.Setting:
        if not self.realistic:
            return wl.RELEASED
        return wl.SETTINGS[name or self.settings[0]]

    def prompts_for(self, shape: HeadShape) -> int:
        return self.prompts or wl.prompts_for(shape.tokens)

    def options(self) -> list[str]:
        """The flags that make a child process build the same batches."""
        out = ["--workload", self.kind, "--settings", ",".join(self.settings), "--hits-per-list",
               repr(self.hits_per_list)]
        return out + (["--prompts", str(self.prompts)] if self.prompts else [])

    def describe(self) -> dict:
        out = dict(kind=self.kind, settings={n: self.setting(n).describe() for n in self.setting_names()})
        if self.realistic:
            out.update(generations=wl.GENERATIONS, hits_per_list=self.hits_per_list, prompts=self.prompts,
                       rec_num=wl.REC_NUM, item_tokens=list(wl.ITEM_TOKENS), early_stop=wl.EARLY_STOP,
                       overflow=wl.OVERFLOW, scale_rewards=wl.SCALE_REWARDS)
        return out


DENSE = Work("dense")
REALISTIC = Work()


def make_layout(shape: HeadShape, work: Work) -> wl.Layout:
    return wl.make_layout(shape.vocab, work.prompts_for(shape), wl.GENERATIONS, work.hits_per_list)


def make_realistic_batch(shape: HeadShape, work: Work, setting: str | None, dtype, device, seed=0) -> Batch:
    """The realistic workload's batch at one setting (``workload.py``); seeded on the CPU, so every process of a run
    builds the same. ``batch.logps`` keeps the policy's log-probs (the setting's clip statistics use them)."""
    spec = work.setting(setting)
    layout = make_layout(shape, work)
    B, T = layout.target_ids.shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, shape.hidden, generator=g).to(device, dtype)
    weight = (torch.randn(shape.vocab, shape.hidden, generator=g) / shape.hidden**0.5).to(device, dtype)
    target_ids = layout.target_ids.to(device)
    with torch.no_grad():
        logps = fused_logprobs(hidden, weight, target_ids, backend="torch")
    old, ref = wl.old_and_ref(logps, spec, seed=seed + 1)
    loss_inputs = dict(item_ids=layout.item_ids.to(device), advantages=layout.advantages.to(device),
                       completion_mask=layout.completion_mask.to(device), old_logps=old, ref_logps=ref)
    batch = Batch(hidden.requires_grad_(), weight.requires_grad_(), target_ids, loss_inputs,
                  settings=spec.loss_settings(), setting=spec.name)
    batch.logps = logps
    return batch


def build_batch(shape: HeadShape, work: Work, setting, dtype, device) -> Batch:
    if work.realistic:
        return make_realistic_batch(shape, work, setting, dtype, device)
    return make_batch(shape, dtype, device)


def make_batch(shape: HeadShape, dtype, device, seed=0) -> Batch:
    """Rows of 20 items of jittered length, 5% padding, per-rank advantages, old/ref log-probs near the policy.
    Seeded on the CPU: every process of a run builds the same batch."""
    g = torch.Generator().manual_seed(seed)
    B, T = shape.rows, min(shape.row_length, shape.tokens)
    hidden = torch.randn(B, T, shape.hidden, generator=g)
    weight = torch.randn(shape.vocab, shape.hidden, generator=g) / shape.hidden**0.5
    target_ids = torch.randint(0, shape.vocab, (B, T), generator=g)
    lengths = torch.rand(B, REC_NUM, generator=g) + 0.5
    bounds = (lengths.cumsum(1) / lengths.sum(1, keepdim=True) * T).long()  # (B, 20) item ends
    item_ids = (torch.arange(T).view(1, T, 1) >= bounds.unsqueeze(1)).sum(-1).clamp(max=REC_NUM)
    completion_mask = torch.arange(T).expand(B, T) < int(0.95 * T)
    rank_adv = torch.randn(B, REC_NUM + 1, generator=g)
    rank_adv[:, REC_NUM] = -0.1  # overflow bin
    hidden, weight = hidden.to(device, dtype), weight.to(device, dtype)
    target_ids, item_ids, completion_mask = target_ids.to(device), item_ids.to(device), completion_mask.to(device)
    with torch.no_grad():
        logps = fused_logprobs(hidden, weight, target_ids, backend="torch")
    noise = torch.randn(2, B, T, generator=g).to(device)
    loss_inputs = dict(
        item_ids=item_ids, advantages=rank_adv.to(device).gather(1, item_ids), completion_mask=completion_mask,
        old_logps=logps + 0.05 * noise[0], ref_logps=logps + 0.1 * noise[1],
    )
    return Batch(hidden.requires_grad_(), weight.requires_grad_(), target_ids, loss_inputs,
                 settings=wl.RELEASED.loss_settings(), setting=wl.RELEASED.name)


def fwd_bwd(loss_fn, batch):
    loss = loss_fn()
    return (loss.detach(), *torch.autograd.grad(loss, (batch.hidden, batch.weight)))


def fwd_only(loss_fn, batch):
    with torch.no_grad():
        return loss_fn()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings(fn, reps, device, warm_up=True) -> list[float]:
    """Seconds per call, after one warm-up call unless ``fn`` just ran."""
    if warm_up:
        fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def gemm_seconds(tokens, hidden, vocab, dtype, device, reps) -> dict:
    """Times of the LM head's GEMMs over ``tokens`` rows: logits ``h W^T`` alone, and with d_hidden ``dZ W`` and
    d_weight ``dZ^T h`` (three: the floor of any exact method; four adds the logits' recomputation of a small-memory
    backward). Into preallocated outputs: the products alone, without allocating or first touching their memory."""
    tokens = max(1, int(tokens))
    h = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype)
    z = torch.randn(tokens, vocab, device=device, dtype=dtype)
    z_out, h_out, w_out = torch.empty_like(z), torch.empty_like(h), torch.empty_like(w)
    logits, d_hidden, d_weight = (statistics.median(timings(fn, reps, device)) for fn in (
        lambda: torch.mm(h, w.T, out=z_out), lambda: torch.mm(z, w, out=h_out), lambda: torch.mm(z.T, h, out=w_out)))
    three = logits + d_hidden + d_weight
    return dict(tokens=tokens, logits=logits, d_hidden=d_hidden, d_weight=d_weight, three=three, four=three + logits)


def realistic_gemms(shape, work, dtype, device, reps) -> dict:
    """The realistic workload's GEMM floors: over all B x T positions, and per setting over the tokens its loss
    needs in a GEMM (``workload.gemm_tokens``); also the workload's shares (``workload.layout_stats``)."""
    layout = make_layout(shape, work)
    stats = wl.layout_stats(layout)
    counts = {name: wl.gemm_tokens(layout, work.setting(name)) for name in work.setting_names()}
    timed = {n: gemm_seconds(n, shape.hidden, shape.vocab, dtype, device, reps)
             for n in sorted({stats["positions"], *counts.values()}, reverse=True)}
    return dict(all=timed[stats["positions"]], loss_tokens={name: timed[n] for name, n in counts.items()},
                gemm_tokens=counts, layout=stats)


# --- memory ---------------------------------------------------------------------------------------------------------

def _status_bytes(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def allocate_as_usual():
    """After the memory measurement, glibc back to its usual steady state for the timed runs: blocks up to 32 MiB
    (its largest dynamic mmap threshold) reused from the heap, the heap trimmed past 64 MiB free; larger blocks
    still mapped afresh. False where the C library has no ``mallopt`` (the timed runs then keep ``MALLOC_ENV``)."""
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 64 * 2**20))
    except (OSError, AttributeError):
        return False


def peak_memory_here(loss_fn, batch, device) -> int:
    """Peak bytes above the inputs for one fwd+bwd after a warm-up (the module docstring has the method; on the CPU
    the process runs with ``MALLOC_ENV`` up to here)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = fwd_bwd(loss_fn, batch)
        torch.cuda.synchronize()
        del grads
        return torch.cuda.max_memory_allocated() - base
    base = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    grads = fwd_bwd(loss_fn, batch)
    peak = _status_bytes("VmHWM")
    del grads
    return peak - base


# --- the breakdown of ours ------------------------------------------------------------------------------------------

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::addmv_",
            "aten::mv", "aten::matmul", "aten::linear", "aten::_addmm_activation")
RANGES = {"bench::row_pass": "row_pass", "bench::segment_loss": "segment_loss"}


def _category(event):
    while event is not None:
        if event.name in GEMM_OPS or event.name.startswith("aten::_mm"):
            return "gemm"
        if event.name in RANGES:
            return RANGES[event.name]
        event = event.cpu_parent
    return "rest"


def breakdown(loss_fn, batch, backend, device) -> dict:
    """One profiled fwd+bwd: milliseconds in the GEMMs, the backend's row pass, its segment loss and the rest.

    The backend module's ``row_pass`` and ``segment_loss`` are wrapped in ``record_function`` ranges for the run
    (``lm_head`` and the ops look them up on the module at each call); every profiled op's self time goes to the
    GEMMs if it is one (or runs inside one), else to the range it runs in, else to the rest, which also takes what
    the profiler does not see (Python between ops). On CUDA the same split is of the kernels' device time, and
    ``idle_ms`` is the wall time without any kernel."""
    from torch.profiler import ProfilerActivity, profile, record_function

    impl = backends.load(backend)
    originals = {name: getattr(impl, name) for name in ("row_pass", "segment_loss")}

    def wrap(name, fn):
        def wrapped(*args, **kwargs):
            with record_function(f"bench::{name}"):
                return fn(*args, **kwargs)
        return wrapped

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, fn in originals.items():
        setattr(impl, name, wrap(name, fn))
    try:
        with profile(activities=activities) as prof:
            synchronize(device)
            t0 = time.perf_counter()
            fwd_bwd(loss_fn, batch)
            synchronize(device)
            wall = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(impl, name, fn)
    on_device = device.type == "cuda"
    totals = dict(gemm=0.0, row_pass=0.0, segment_loss=0.0, rest=0.0)
    gemm_calls = 0
    for event in prof.events():
        if getattr(event, "device_type", None) is not None and event.device_type != torch.autograd.DeviceType.CPU:
            continue  # kernels themselves: their time is counted through the op that launched them
        self_us = event.self_device_time_total if on_device else event.self_cpu_time_total
        category = _category(event)
        totals[category] += self_us / 1e3
        gemm_calls += event.name in GEMM_OPS and event.name not in ("aten::matmul", "aten::linear")
    out = dict(backend=backend, wall_ms=1e3 * wall, gemm_ms=totals["gemm"], row_pass_ms=totals["row_pass"],
               segment_loss_ms=totals["segment_loss"], gemm_calls=gemm_calls)
    if on_device:
        busy = sum(totals.values())
        out.update(rest_ms=totals["rest"], idle_ms=max(0.0, 1e3 * wall - busy), clock="device")
    else:
        out.update(rest_ms=max(0.0, 1e3 * wall - totals["gemm"] - totals["row_pass"] - totals["segment_loss"]),
                   clock="cpu")
    return out


# --- one provider, in its own process -------------------------------------------------------------------------------

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
    it. On the realistic workload also the setting's clip statistics (``workload.clip_stats``)."""
    batch = build_batch(shape, work, setting, dtype, device)
    files = reference_files(ref_dir)
    torch.save([x.cpu() for x in eager_result(batch, batch.loss_inputs)], files["eager"])
    if token_level:
        torch.save([x.cpu() for x in eager_result(batch, token_level_inputs(batch))], files["token_level"])
    out = {"saved": [str(p) for p in files.values() if p.exists()]}
    if work.realistic:
        out["setting_stats"] = wl.clip_stats(batch.logps, batch.loss_inputs, work.setting(setting))
    return out


def shape_fields(shape, setting=None) -> dict:
    return dict(shape=shape.key, hidden=shape.hidden, vocab=shape.vocab, tokens=shape.tokens,
                scaled_from=shape.scaled_from, **({} if setting is None else dict(setting=setting)))


def provider_row(name, shape, dtype, device, reps, ref_dir, want_breakdown=False, want_fwd=False,
                 work: Work = DENSE, setting=None) -> dict:
    """Check one provider against the saved yardstick, then time it and measure its memory (one process)."""
    provider = PROVIDERS[name]
    row = dict(provider=name, **shape_fields(shape, work.setting(setting).name if work.realistic else None))
    batch = build_batch(shape, work, setting, dtype, device)
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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", job, "--shapes", shape.spec,
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


# --- the parent: every shape, every provider ------------------------------------------------------------------------

def _gemm_rows(shape, setting, gemm, work) -> list[dict]:
    """The GEMM floor's rows of one shape (and setting, on the realistic workload)."""
    fields = shape_fields(shape, setting if work.realistic else None)
    if "error" in gemm:
        names = REALISTIC_GEMM_ROWS if work.realistic else GEMM_ROWS
        return [dict(provider=g, **fields, status=f"error: {gemm['error']}") for g in names]

    def row(name, timed, key="three"):
        return dict(provider=name, **fields, status="ok", fwd_bwd_ms=1e3 * timed[key], gemm_tokens=timed["tokens"],
                    gemm_ms={part: 1e3 * timed[part] for part in ("logits", "d_hidden", "d_weight")})
    if not work.realistic:
        return [row(name, gemm, key) for name, key in zip(GEMM_ROWS, ("three", "four"))]
    return [row(ALL_POSITIONS, gemm["all"]), row(LOSS_TOKENS, gemm["loss_tokens"][setting])]


def _attach_gemms(rows, setting, gemm, work):
    """Each row's GEMM floors and its time's ratios to them."""
    if "error" in gemm:
        return
    floor = gemm["all"] if work.realistic else gemm
    for row in rows:
        row["three_gemm_ms"], row["four_gemm_ms"] = 1e3 * floor["three"], 1e3 * floor["four"]
        if work.realistic:
            row["three_gemm_loss_tokens_ms"] = 1e3 * gemm["loss_tokens"][setting]["three"]
            row.setdefault("gemm_tokens", gemm["gemm_tokens"][setting])  # a GEMM row keeps its own count
            row.setdefault("positions", gemm["layout"]["positions"])
        if row["status"] == "ok":
            row["vs_three_gemm"] = row["fwd_bwd_ms"] / row["three_gemm_ms"]
            row["vs_four_gemm"] = row["fwd_bwd_ms"] / row["four_gemm_ms"]
            if work.realistic:
                row["vs_three_gemm_loss_tokens"] = row["fwd_bwd_ms"] / row["three_gemm_loss_tokens_ms"]


def bench_shape(shape, names, dtype, device, reps, progress, options=(), timeout=None, work: Work = DENSE):
    """Rows of one shape: the GEMMs first, then per setting the yardstick and each provider in its own process.
    Returns the rows and, on the realistic workload, the workload's statistics (shares, GEMM tokens, clipping)."""
    rows, runnable = [], []
    setting_field = (lambda s: s) if work.realistic else (lambda s: None)
    for name in names:
        reason = PROVIDERS[name].refuse(device.type, dtype)
        if reason is None:
            runnable.append(name)
        else:
            rows += [dict(provider=name, **shape_fields(shape, setting_field(s)), status=f"skipped: {reason}")
                     for s in work.setting_names()]
            progress(f"{shape.key} {name} (skipped)")
    progress(f"{shape.key} GEMMs")
    gemm = in_child("gemm", shape, dtype, device, reps, ".", work.options(), timeout)
    info = None
    if work.realistic:
        info = dict(gemm.get("layout") or {}, gemm_tokens=gemm.get("gemm_tokens"), settings={})
        if "error" in gemm:
            info["error"] = gemm["error"]
    token_level = ["--token-level"] if any(PROVIDERS[n].token_level for n in runnable) else []
    for setting in work.setting_names():
        here = f"{shape.key} {setting}" if work.realistic else shape.key
        extra = work.options() + (["--setting", setting] if work.realistic else [])
        setting_rows = [r for r in rows if r.get("setting") == setting_field(setting)]
        with tempfile.TemporaryDirectory(prefix="rankgrpo-bench-") as ref_dir:
            progress(f"{here} eager yardstick")
            ref = in_child("reference", shape, dtype, device, reps, ref_dir, token_level + extra,
                           timeout) if runnable else {}
            if info is not None and "setting_stats" in ref:
                info["settings"][setting] = dict(ref["setting_stats"], gemm_tokens=(gemm.get("gemm_tokens")
                                                                                   or {}).get(setting))
            setting_rows += _gemm_rows(shape, setting, gemm, work)
            for name in runnable:
                progress(f"{here} {name}")
                if "error" in ref:
                    setting_rows.append(dict(provider=name, **shape_fields(shape, setting_field(setting)),
                                             status=f"error: eager yardstick: {ref['error']}"))
                    continue
                row = in_child(name, shape, dtype, device, reps, ref_dir, list(options) + extra, timeout)
                setting_rows.append(row if "error" not in row else
                                    dict(provider=name, **shape_fields(shape, setting_field(setting)),
                                         status=f"error: {row['error']}"))
        _attach_gemms(setting_rows, setting, gemm, work)
        if work.realistic:
            rows = [r for r in rows if r.get("setting") != setting] + setting_rows
        else:
            rows = setting_rows
    return rows, info


def bench_loss(shapes, names, dtype, device, reps, progress, options=(), timeout=None, work: Work = DENSE):
    """Rows of every shape (and setting), with their ratios to eager of the same shape and setting; and the
    realistic workload's statistics per shape."""
    rows, workloads = [], {}
    for shape in shapes:
        shape_rows, info = bench_shape(shape, names, dtype, device, reps, progress, options, timeout, work)
        rows += shape_rows
        if info is not None:
            workloads[shape.key] = info
    for row in rows:  # ratios to eager, measured in the same run
        base = next((r for r in rows if r["shape"] == row["shape"] and r.get("setting") == row.get("setting")
                     and r["provider"] == "eager" and r["status"] == "ok"), None)
        if base and row["status"] == "ok":
            row["time_vs_eager"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            if row.get("peak_mib") is not None:
                row["memory_vs_eager"] = row["peak_mib"] / base["peak_mib"]
    return rows, workloads


def bench_segmentation(device, rows=64, length=1024, reps=5):
    """The authors' per-token decode loop against ``segment_items``, in rows x tokens per second."""
    from rankgrpo_kernels import newline_counts, segment_items

    pieces = [f"w{i}" for i in range(1000)] + ["\n", "\n\n", ")\n", " (", "2001"]

    class ListTokenizer:  # decoding is a list lookup: the loop's cost here is a lower bound of a real tokenizer's
        def __len__(self):
            return len(pieces)

        def decode(self, ids, clean_up_tokenization_spaces=False, skip_special_tokens=False):
            return "".join(pieces[i] for i in ids)

    tokenizer = ListTokenizer()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(pieces), (rows, length), generator=g).to(device)
    mask = torch.ones(rows, length, dtype=torch.bool, device=device)
    table = newline_counts(tokenizer)

    def loop():
        out = torch.full((rows, length), -1, dtype=torch.long)
        for b in range(rows):
            valid = int(mask[b].sum().item())
            item = 0
            for t in range(valid):
                out[b, t] = item
                item += tokenizer.decode([int(ids[b, t].item())]).count("\n")
        return out

    vectorised = lambda: segment_items(ids, mask, table, REC_NUM)  # noqa: E731
    loop_s = statistics.median(timings(loop, 1, torch.device("cpu")))
    vec_s = statistics.median(timings(vectorised, reps, device))
    assert torch.equal(loop().clamp(max=REC_NUM), vectorised().item_ids.cpu()), "segmentations disagree"
    return dict(rows=rows, tokens_per_row=length, loop_ms=1e3 * loop_s, vectorised_ms=1e3 * vec_s,
                loop_tokens_per_s=rows * length / loop_s, vectorised_tokens_per_s=rows * length / vec_s,
                speedup=loop_s / vec_s)


def package_version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device, argv):
    def git_sha():
        try:
            return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                  cwd=HERE).stdout.strip() or None
        except OSError:
            return None

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=" ".join(["python", "benchmarks/run.py", *argv]), git_sha=git_sha(),
               python=platform.python_version(), torch=torch.__version__, rankgrpo_kernels=rankgrpo_kernels.__version__,
               device=str(device), cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
               cpu_count=os.cpu_count(), load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               triton=package_version("triton"), liger_kernel=package_version("liger-kernel"),
               cut_cross_entropy=package_version("cut-cross-entropy"))
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            env["driver"] = None
    return env


def markdown(rows, segmentation, env, workloads=None, work: Work = DENSE):
    lines = [f"Device: {env.get('gpu', env['cpu'])} ({env['device']}, {env['cpu_threads']} threads), "
             f"torch {env['torch']}, {env['date']}, workload {work.kind}", "", *results_table(rows)]
    notes = sorted({f"{r['shape']}: scaled down, stands for {r['scaled_from']}" for r in rows
                    if r.get("scaled_from")})
    for name in dict.fromkeys(r["provider"] for r in rows):
        if name in PROVIDERS:
            notes.append(f"{name}: {PROVIDERS[name].note}")
        elif name == GEMM_ROWS[0]:
            notes.append(f"{' and '.join(GEMM_ROWS)}: {GEMM_NOTE}")
        elif name == ALL_POSITIONS:
            notes.append(REALISTIC_GEMM_NOTE)
    if work.realistic:
        for n in work.setting_names():
            spec = work.setting(n)
            values = ", ".join(f"{k} {v}" for k, v in spec.loss_settings().items())
            notes.append(f"setting {n}: {spec.note} ({values})")
    lines += [""] + [f"- {n}" for n in notes]
    if workloads:
        lines += ["", *workload_tables(workloads)]
    split = breakdown_table(rows)
    if split:
        lines += ["", BREAKDOWN_CAPTION + ":", "", *split]
    if segmentation:
        s = segmentation
        lines += ["", f"Segmentation of {s['rows']} rows x {s['tokens_per_row']} tokens: per-token decode loop "
                      f"{s['loop_ms']:.0f} ms, vectorised {s['vectorised_ms']:.2f} ms ({s['speedup']:.0f}x)"]
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [dict(r, shape=f"{r['shape']} {r['setting']}" if r.get("setting") else r["shape"])
          for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        for ax, key in zip(axes, ("fwd_bwd_ms", "peak_mib")):
            values = [next((r.get(key) or 0 for r in ok if r["shape"] == s and r["provider"] == p), 0) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], values, width, label=p)
    for ax, title in zip(axes, ("fwd+bwd time (ms)", "peak memory above inputs (MiB)")):
        ax.set_title(title)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=15, fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", help=f"comma-separated: {', '.join(sorted(ALL_SHAPES))}, or HxV@N (N: tokens of the "
                                    "dense batch; about N padded positions of the realistic one)")
    p.add_argument("--workload", choices=("realistic", "dense"), default="realistic",
                   help="realistic (default): P prompts x 8 completions of 20-item lists, TRL's padding, advantages "
                        "from the library's reward functions, three loss settings; dense: the dense batch (5%% "
                        "padding, an advantage on every item, the released settings)")
    p.add_argument("--settings", default=",".join(wl.SETTINGS),
                   help=f"realistic workload: comma-separated subset of {', '.join(wl.SETTINGS)} (default all)")
    p.add_argument("--prompts", type=int, default=None,
                   help="realistic workload: P prompts (default: about N padded positions / (8 x 255))")
    p.add_argument("--hits-per-list", type=float, default=wl.HITS_PER_LIST,
                   help=f"realistic workload: expected hits per 20-item list (default {wl.HITS_PER_LIST})")
    p.add_argument("--providers", help=f"comma-separated subset of {', '.join(PROVIDERS)} (default: all; those "
                                       "that cannot run here are listed as skipped)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default), float16")
    p.add_argument("--reps", type=int, default=None, help="timed runs per figure (CPU 3, GPU 10)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=None,
                   help="profile one more fwd+bwd of ours with the torch backend: GEMMs vs row pass vs segment loss "
                        "vs the rest (default: on for the CPU)")
    p.add_argument("--fwd", action="store_true", help="also time the forward alone (no_grad)")
    p.add_argument("--timeout", type=float, default=None, help="seconds one provider's process may take")
    p.add_argument("--out", default=str(HERE / "results"),
                   help="folder for the JSON and the plot (default benchmarks/results/, which summarize.py reads; "
                        "benchmarks/out/ is kept out of git)")
    p.add_argument("--no-segmentation", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ref-dir", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--token-level", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    settings = tuple(n for n in args.settings.split(",") if n)
    unknown = set(settings) - set(wl.SETTINGS)
    if unknown or not settings:
        raise SystemExit(f"unknown settings {sorted(unknown)}; choose from {list(wl.SETTINGS)}")
    work = Work(args.workload, settings, args.prompts, args.hits_per_list)
    shapes = ([parse_shape(s) for s in args.shapes.split(",") if s] if args.shapes
              else default_shapes(device.type, work.kind))
    reps = args.reps or (10 if device.type == "cuda" else 3)
    if args.child:  # one job of the parent below, in this fresh process
        args.reps = reps
        print(json.dumps(child_main(args, shapes[0], dtype, device, work)))
        return 0
    names = [n for n in args.providers.split(",") if n] if args.providers else list(PROVIDERS)
    unknown = set(names) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {list(PROVIDERS)}")
    want_breakdown = device.type == "cpu" if args.breakdown is None else args.breakdown
    options = (["--breakdown"] if want_breakdown else ["--no-breakdown"]) + (["--fwd"] if args.fwd else [])

    try:
        from tqdm import tqdm

        bar = tqdm(total=len(shapes) * (1 + len(work.setting_names()) * (len(names) + 1)), file=sys.stderr,
                   leave=False)
        progress = lambda text: (bar.set_description(text), bar.update(1))  # noqa: E731
    except ImportError:
        progress = lambda text: print(f"... {text}", file=sys.stderr, flush=True)  # noqa: E731

    started = time.time()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows, workloads = bench_loss(shapes, names, dtype, device, reps, progress, options, args.timeout, work)
    segmentation = None if args.no_segmentation else bench_segmentation(device)
    env = dict(environment(device, argv), date=date)  # after the children: this process stays off the GPU till now
    env["wall_seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    tag = env.get("gpu", device.type).replace(" ", "_")
    json_path = out / f"bench_{tag}_{stamp}.json"
    plot_path = plot(rows, out / f"bench_{tag}_{stamp}.png")
    json_path.write_text(json.dumps(dict(environment=env, dtype=str(dtype).split(".")[-1], reps=reps,
                                         tolerance=TOLERANCE[dtype], breakdown=want_breakdown,
                                         notes={n: PROVIDERS[n].note for n in names},
                                         gemm_note=REALISTIC_GEMM_NOTE if work.realistic else GEMM_NOTE,
                                         workload=work.describe(), workloads=workloads or None,
                                         results=rows, segmentation=segmentation), indent=2))
    print(markdown(rows, segmentation, env, workloads, work))
    print(f"\nwrote {json_path}" + (f" and {plot_path}" if plot_path else " (no plot: matplotlib missing)")
          + f" in {env['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How the benchmark measures, in the process being measured: fwd+bwd times, the LM head's GEMM floor, the peak
memory of one fwd+bwd, the profiled split of ours, and the segmentation's speed-up (``run.py``'s docstring has the
methods)."""

from __future__ import annotations

import ctypes
import statistics
import time
from pathlib import Path

import torch
from workload import REC_NUM

from rankgrpo_kernels import backends, empty_cache

# glibc, in every process of a CPU run until its memory is measured: blocks over 64 KiB come from mmap and go back to
# the system when freed, and the heap is trimmed on every free, so the resident set follows live memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
VISIT_RUNS, VISIT_S = 10, 0.6  # a visit of the rounds: up to this many tries of each call while under this many s


# --- time -----------------------------------------------------------------------------------------------------------

def fwd_bwd(loss_fn, batch):
    loss = loss_fn()
    return (loss.detach(), *torch.autograd.grad(loss, (batch.hidden, batch.weight)))


def fwd_only(loss_fn, batch):
    with torch.no_grad():
        return loss_fn()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device) -> float:
    """Seconds of one call of ``fn`` (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timings(fn, reps, device, warm_up=True) -> list[float]:
    """Seconds per call, after one warm-up call unless ``fn`` just ran."""
    if warm_up:
        fn()
    return [seconds(fn, device) for _ in range(reps)]


def visit_seconds(calls: dict, device) -> dict:
    """Seconds of each of ``calls`` (name -> function) in a round's visit (``rounds.py``): the calls in turn, again
    and again, up to ``VISIT_RUNS`` times each and as often as fits in ``VISIT_S`` (at least once), and of each the
    fastest. Other processes only ever slow a call down, so the fastest is the least disturbed, and taking turns
    spreads each call's tries over the whole visit. On a GPU one untimed turn first and the allocator's cache emptied
    after: an idle worker holds its live tensors alone, so every worker of a shape fits on the device at once, and
    the timed calls find the cache as warm as back-to-back calls do. On the CPU glibc returns large blocks to the
    system anyway."""
    if device.type == "cuda":
        for fn in calls.values():
            fn()
    runs = {name: [] for name in calls}
    spent = 0.0
    while spent < VISIT_S and len(runs[next(iter(runs))]) < VISIT_RUNS:
        for name, fn in calls.items():
            runs[name].append(seconds(fn, device))
            spent += runs[name][-1]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {name: min(times) for name, times in runs.items()}


class GemmFloor:
    """The LM head's GEMMs over the first ``n`` of up to ``tokens`` rows: logits ``h W^T``, d_hidden ``dZ W`` and
    d_weight ``dZ^T h`` (three: the floor of any exact method; four adds the logits' recomputation of a small-memory
    backward). Into outputs allocated once at the largest ``n``: the products alone, without allocating or first
    touching their memory, and one set of buffers for every floor of a shape."""

    def __init__(self, tokens, hidden, vocab, dtype, device):
        self.device = device
        self.h = torch.randn(tokens, hidden, device=device, dtype=dtype)
        self.w = torch.randn(vocab, hidden, device=device, dtype=dtype)
        self.z = torch.randn(tokens, vocab, device=device, dtype=dtype)
        self.outputs = [torch.empty_like(x) for x in (self.z, self.h, self.w)]

    def visit(self, n: int) -> dict:
        """One visit: seconds of each GEMM over ``n`` rows, and their sum (``seconds``)."""
        h, z, w = self.h[:n], self.z[:n], self.w
        z_out, h_out, w_out = self.outputs
        out = visit_seconds(dict(logits=lambda: torch.mm(h, w.T, out=z_out[:n]),
                                 d_hidden=lambda: torch.mm(z, w, out=h_out[:n]),
                                 d_weight=lambda: torch.mm(z.T, h, out=w_out)), self.device)
        return dict(out, tokens=n, seconds=sum(out.values()))


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
    """Peak bytes above the inputs for one fwd+bwd after a warm-up: ``max_memory_allocated`` on CUDA; on the CPU the
    peak resident set (VmHWM, reset through /proc/self/clear_refs) against the resident set before, in a process
    that runs with ``MALLOC_ENV`` up to here. Ours keeps its CPU logits scratch from one call to the next
    (``rankgrpo_kernels.empty_cache``): freed first, so that the measured call holds it again and it counts."""
    empty_cache()
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
    (the head and the ops look them up on the module at each call); every profiled op's self time goes to the
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


# --- segmentation ---------------------------------------------------------------------------------------------------

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

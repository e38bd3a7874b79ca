"""The GPU check: one command, time-boxed phases, done within 8 minutes on one H200, one JSON written after every
phase (a run cut short still leaves what it measured).

    python benchmarks/gpu_check.py              # on the GPU machine: JSON under benchmarks/results/
    python benchmarks/gpu_check.py --dry-run    # on a CPU: every phase at tiny size, JSON under benchmarks/out/
    python benchmarks/gpu_check.py --phases torch_probe,host_syncs --phase-timeout timings=120

Phases, in order, each in its own process (its own process group, killed at its timeout; recorded as "timeout" and
the next one runs), none started with less than ``MIN_PHASE_S`` left of ``--deadline``:

gpu_tests         ``pytest -m gpu`` (tests/test_gpu.py and the other GPU-marked tests)
native_kernels    tests/test_backends.py, test_row_pass_kernels.py, test_segment_kernels.py natively on CUDA (no
                  Triton interpreter: conftest picks it only without a GPU)
torch_probe       whether this torch takes the in-place ``out_dtype=`` GEMMs (``gemms.probe``; torch 2.8/2.9 refuse
                  ``addmm(..., out_dtype=, out=)``), and TF32 under ``ieee_fp32``
timings           per part at Qwen2.5-0.5B's head (H=896, V=151936, bf16): the three GEMMs per chunk size in
                  TFLOP/s, the Triton row pass in GB/s, the segment loss, fwd+bwd of ``rank_grpo_loss`` at two budgets
host_syncs        syncs of one ``rank_grpo_loss`` fwd and bwd with RANKGRPO_VALIDATE=0, counted as the warnings of
                  ``torch.cuda.set_sync_debug_mode("warn")`` (after a warm-up call)
int64_rows        a logits chunk with N*V > 2^31 elements through the Triton row pass: the rows past element 2^31
                  against torch (int64 offsets)
triton_registers  registers and spills of the Triton kernels as JIT-compiled on this device
benchmark         ``benchmarks/run.py``: the realistic workload (TRL's default beta 0 and the released beta 1e-3) at
                  the Qwen2.5-0.5B head against eager, TRL's fused head, Liger and CCE, then the dense batch at
                  both heads

The dry run runs the same phases at tiny size on the CPU: pytest phases only collect (``--co``), the timings and
checks use tiny shapes, and what cannot run on a CPU says why.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # this checkout's rankgrpo_kernels, in the workers too (not an installed copy)

GPU_SHAPES = "qwen2.5-0.5b@16384,llama-3.2-3b@16384"
PROVIDERS = "eager,triton,cuda,triton-recompute"
REALISTIC_SHAPE = "qwen2.5-0.5b@16384"
REALISTIC_PROVIDERS = "eager,triton,cuda,trl,liger,cce"
PROCESS_TIMEOUT_S = 120  # one provider's process at one shape inside run.py
DEADLINE_S = 470  # the whole check: under 8 minutes with the time to start
MIN_PHASE_S = 15  # a phase is not started with less time than this left
PHASES = ("gpu_tests", "native_kernels", "torch_probe", "timings", "host_syncs", "int64_rows", "triton_registers",
          "benchmark")
PHASE_TIMEOUT_S = dict(gpu_tests=110, native_kernels=80, torch_probe=40, timings=60, host_syncs=40, int64_rows=50,
                       triton_registers=40, benchmark=240)
WORKER_PHASES = ("torch_probe", "timings", "host_syncs", "int64_rows", "triton_registers")
RESULT_TAG = "GPU_CHECK_RESULT "
QWEN = (896, 151936)
TINY = (64, 1001)


# --- the parent: phases as processes, the JSON after each ----------------------------------------------------------

def _run_process(cmd, timeout, env=None):
    """(status, returncode, stdout, stderr, seconds); the whole process group is killed at the timeout."""
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        status = "timeout"
    return status, proc.returncode, out or "", err or "", round(time.time() - started, 1)


def _pytest_cmd(paths, dry_run, marker=None):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, paths)]
    if marker:
        cmd += ["-m", marker]
    return cmd + (["--co"] if dry_run else ["-rf"])


def _worker_cmd(name, dry_run):
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name] + (["--dry-run"] if dry_run else [])


def _summary(stdout):
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _benchmark_runs(dry_run, out):
    """[(label, argv)] of run.py for the benchmark phase: the realistic workload at TRL's default and the released
    setting on the Qwen2.5-0.5B head against the peers, then the dense batch at both heads (ours and eager)."""
    common = ["--out", str(out), "--no-segmentation", "--timeout", str(PROCESS_TIMEOUT_S), "--no-breakdown"]
    if dry_run:
        common += ["--device", "cpu", "--shapes", "32x503@64", "--providers", "torch", "--reps", "1"]
        return [("realistic", [*common, "--workload", "realistic", "--settings", "beta0"])]
    common += ["--device", "cuda", "--dtype", "bfloat16", "--reps", "10"]
    return [("realistic", [*common, "--workload", "realistic", "--shapes", REALISTIC_SHAPE, "--settings",
                           "beta0,beta1e-3", "--providers", REALISTIC_PROVIDERS]),
            ("dense", [*common, "--workload", "dense", "--shapes", GPU_SHAPES, "--providers", PROVIDERS])]


def _phase_benchmark(dry_run, out, remaining, env=None):
    runs = _benchmark_runs(dry_run, out)
    result, status, started = {}, "ok", time.time()
    for i, (label, argv) in enumerate(runs):
        left = remaining - (time.time() - started)
        if left < MIN_PHASE_S:
            result[label] = dict(status="skipped: out of time")
            status = "timeout"
            continue
        share = left / (len(runs) - i)  # what is left, split over the runs still to come
        before = set(out.glob("bench_*.json"))
        st, rc, so, se, secs = _run_process([sys.executable, str(HERE / "run.py"), *argv], share, env)
        new = sorted(set(out.glob("bench_*.json")) - before)
        result[label] = dict(status=st, returncode=rc, seconds=secs, argv=argv,
                             json=[str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in new],
                             output_tail=(so + se)[-2500:])
        if new:
            report = json.loads(new[-1].read_text())
            result[label]["results"] = [{k: r.get(k) for k in ("shape", "provider", "status", "fwd_bwd_ms",
                                                                "vs_three_gemm", "peak_mib", "memory_vs_eager")}
                                        for r in report.get("results", [])]
        if st != "ok":
            status = st
    if dry_run:
        result["dense"] = result.get("dense", dict(status="skipped: the dry run times one workload"))
    return status, result


def _environment(dry_run):
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               python=platform.python_version(), dry_run=dry_run,
               command=" ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]))
    try:
        env["git_sha"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        env["git_sha"] = None
    import torch  # the parent stays off the GPU: version and name only

    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    env["gpu_available"] = torch.cuda.is_available()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _write(path, report):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: every phase end to end")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--phase-timeout", action="append", default=[], metavar="NAME=SECONDS")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help=f"seconds for the whole check ({DEADLINE_S})")
    p.add_argument("--out", default=None, help="folder of the JSON (benchmarks/results/, dry run benchmarks/out/)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.dry_run)

    started = time.time()
    phases = [n for n in args.phases.split(",") if n]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)}; choose from {list(PHASES)}")
    timeouts = dict(PHASE_TIMEOUT_S)
    for item in args.phase_timeout:
        name, _, seconds = item.partition("=")
        timeouts[name] = float(seconds)
    out = Path(args.out) if args.out else HERE / ("out" if args.dry_run else "results")
    out.mkdir(parents=True, exist_ok=True)
    env = _environment(args.dry_run)
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    path = out / f"gpu_check_{'dry_' if args.dry_run else ''}{stamp}.json"
    report = dict(environment=env, deadline_s=args.deadline, phases={})
    _write(path, report)

    child_env = dict(os.environ, RANKGRPO_GPU_CHECK="1",
                     PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for name in PHASES:
        if name not in phases:
            continue
        left = args.deadline - (time.time() - started)
        if left < MIN_PHASE_S:
            report["phases"][name] = dict(status="skipped: out of time", seconds=0.0)
            _write(path, report)
            continue
        timeout = min(timeouts[name], left)
        print(f"[{time.time() - started:5.0f} s] {name} (up to {timeout:.0f} s)", flush=True)
        if name == "benchmark":
            t0 = time.time()
            try:
                status, result = _phase_benchmark(args.dry_run, out, timeout, child_env)
            except Exception as exc:  # noqa: BLE001  (a broken run.py is a result, not the end of the check)
                status, result = "failed", dict(error=f"{type(exc).__name__}: {exc}")
            entry = dict(status=status, seconds=round(time.time() - t0, 1), result=result)
        else:
            if name == "gpu_tests":  # the dry run collects the GPU module only: collecting all tests takes 10 s
                cmd = _pytest_cmd([ROOT / "tests" / ("test_gpu.py" if args.dry_run else "")], args.dry_run,
                                  marker="gpu")
            elif name == "native_kernels":
                cmd = _pytest_cmd([ROOT / "tests" / f for f in ("test_backends.py", "test_row_pass_kernels.py",
                                                                "test_segment_kernels.py")], args.dry_run)
            else:
                cmd = _worker_cmd(name, args.dry_run)
            env_for = dict(child_env)
            if name == "native_kernels" and not args.dry_run:
                env_for.pop("TRITON_INTERPRET", None)  # natively: conftest leaves it unset on a GPU
            status, rc, so, se, secs = _run_process(cmd, timeout, env_for)
            entry = dict(status=status, returncode=rc, seconds=secs, command=" ".join(map(str, cmd[1:])))
            if name in WORKER_PHASES:
                tagged = [line[len(RESULT_TAG):] for line in so.splitlines() if line.startswith(RESULT_TAG)]
                entry["result"] = json.loads(tagged[-1]) if tagged else None
                if status != "ok" or not tagged:
                    entry["output_tail"] = (so + se)[-3000:]
            else:
                entry["summary"] = _summary(so)
                entry["output_tail"] = so[-3000:] + ("\n" + se[-1000:] if se.strip() else "")
                if args.dry_run:
                    entry["note"] = "dry run: collected only (--co)"
                if status == "failed" and rc == 5:  # pytest: nothing collected/selected
                    entry["status"] = "ok"
        report["phases"][name] = entry
        print(f"[{time.time() - started:5.0f} s] {name}: {entry['status']} ({entry['seconds']} s)", flush=True)
        report["wall_seconds"] = round(time.time() - started, 1)
        _write(path, report)
    report["wall_seconds"] = round(time.time() - started, 1)
    report["complete"] = True
    _write(path, report)
    print(f"wrote {path} ({report['wall_seconds']} s)")
    return 0 if all(e["status"] == "ok" or e["status"].startswith("skipped") for e in report["phases"].values()) \
        else 1


# --- the workers: one phase each, in their own process ------------------------------------------------------------

def worker_main(name, dry_run):
    import torch

    if dry_run and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    result = WORKERS[name](device, dry_run)
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)
    return 0


def _timer(device, reps):
    """``measure(fn)``: median milliseconds of ``fn()`` over ``reps`` runs after one warm-up (run.py's timings:
    CUDA events on a GPU)."""
    import statistics

    import run

    def measure(fn):
        return 1e3 * statistics.median(run.timings(fn, reps, device))
    return measure


def _sig(x, digits=4):
    """``x`` to ``digits`` significant figures (tiny dry-run rates stay non-zero)."""
    return float(f"{x:.{digits}g}")


def _guarded(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (one part failing is reported; the others still run)
        return dict(error=f"{type(exc).__name__}: {str(exc)[:500]}")


def _head(device, dry_run, tokens, dtype=None, seed=0):
    import torch

    H, V = TINY if dry_run else QWEN
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(tokens, H, device=device, generator=g).to(dtype)
    weight = (torch.randn(V, H, device=device, generator=g) / H**0.5).to(dtype)
    return hidden, weight, H, V


def _loss_inputs(device, B, T, H, V, dtype, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(B, T, H, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device, generator=g) / H**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), device=device, generator=g)
    item_ids = (torch.arange(T, device=device) * 20 // T).expand(B, T).contiguous()
    kwargs = dict(item_ids=item_ids, advantages=torch.randn(B, T, device=device, generator=g),
                  old_logps=-4 * torch.rand(B, T, device=device, generator=g), loss_type="bnpo")
    return hidden, weight, targets, kwargs


def worker_torch_probe(device, dry_run):
    import torch

    from rankgrpo_kernels import gemms

    result = dict(torch=torch.__version__, device=device.type)
    for dtype in (torch.bfloat16, torch.float16):
        result[str(dtype).split(".")[-1]] = gemms.native_out_dtype(device, dtype)
    result["native_addmm_out_dtype"] = result["bfloat16"]["addmm"] == "native"
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with gemms.ieee_fp32():
            result["precision_inside_ieee_fp32"] = torch.get_float32_matmul_precision()
        result["precision_after"] = torch.get_float32_matmul_precision()
        if device.type == "cuda":  # the TF32 error of a 4096-deep fp32 GEMM, with and without ieee_fp32
            a, b = torch.randn(1024, 4096, device=device), torch.randn(4096, 1024, device=device)
            exact = a.double() @ b.double()
            tf32 = (a @ b).double()
            out = torch.empty(1024, 1024, device=device)
            ieee = gemms.mm_into(a, b, out).double()
            result["fp32_gemm_rel_error"] = dict(
                tf32_global=((tf32 - exact).abs().max() / exact.abs().max()).item(),
                mm_into=((ieee - exact).abs().max() / exact.abs().max()).item())
    finally:
        torch.set_float32_matmul_precision(before)
    return result


def worker_timings(device, dry_run):
    import torch

    from rankgrpo_kernels import backends, gemms, rank_grpo_loss
    from rankgrpo_kernels.contract import LossConfig
    from rankgrpo_kernels.inputs import token_batch
    from rankgrpo_kernels.settings import memory_budget

    reps = 2 if dry_run else 10
    measure = _timer(device, reps)
    chunks = (16, 32) if dry_run else (512, 1024, 2048, 4096, 8192)
    hidden, weight, H, V = _head(device, dry_run, max(chunks))
    acc = torch.float32
    result = dict(shape=dict(hidden=H, vocab=V, dtype=str(hidden.dtype).split(".")[-1]), reps=reps, gemms={})

    def gemm_rates(C):
        h = hidden[:C]
        logits = torch.empty(C, V, device=device, dtype=acc)
        d = torch.randn(C, V, device=device).to(hidden.dtype)
        rows = torch.empty(C, H, device=device, dtype=acc)
        d_weight = torch.zeros(V, H, device=device, dtype=acc)
        flop = 2 * C * V * H
        times = dict(logits=measure(lambda: gemms.mm_into(h, weight.T, logits)),
                     d_hidden=measure(lambda: gemms.mm_into(d, weight, rows)),
                     d_weight=measure(lambda: gemms.addmm_into(d_weight, d.T, h, beta=1.0)))
        return {k: dict(ms=_sig(t), tflops=_sig(flop / (t * 1e-3) / 1e12)) for k, t in times.items()}

    for C in chunks:
        result["gemms"][str(C)] = _guarded(lambda: gemm_rates(C))

    def row_pass_rate(backend):
        C = chunks[-1] if dry_run else 4096
        logits = torch.randn(C, V, device=device, dtype=acc)
        targets = torch.randint(0, V, (C,), device=device)
        grad_dtype = hidden.dtype
        fn = backends.load(backend).row_pass
        t = measure(lambda: fn(logits, None, targets, 1.0, None, grad_dtype, False))
        moved = C * V * (acc.itemsize + grad_dtype.itemsize)  # read fp32 logits, write D
        return dict(tokens=C, ms=_sig(t), gb_per_s=_sig(moved / (t * 1e-3) / 1e9))

    result["row_pass"] = {b: _guarded(lambda b=b: row_pass_rate(b)) for b in ("triton", "torch")}

    def segment_time(backend):
        B, T = (4, 64) if dry_run else (32, 512)
        g = torch.Generator(device=device).manual_seed(1)
        logps = -4 * torch.rand(B, T, device=device, generator=g)
        cfg = LossConfig()
        batch, _ = token_batch(B, T, device, cfg, item_ids=(torch.arange(T, device=device) * 20 // T).expand(B, T),
                               advantages=torch.randn(B, T, device=device, generator=g), completion_mask=None,
                               old_logps=logps + 0.05, ref_logps=None, advantage_level="auto",
                               max_completion_length=None, num_items_in_batch=None, rec_num=None, logps=logps)
        fn = backends.load(backend).segment_loss
        return dict(tokens=B * T, ms=_sig(measure(lambda: fn(batch, cfg))))

    result["segment_loss"] = {b: _guarded(lambda b=b: segment_time(b)) for b in ("triton", "torch")}

    def full_loss(budget):
        B, T = (4, 64) if dry_run else (32, 512)
        h, w, y, kwargs = _loss_inputs(device, B, T, H, V, hidden.dtype)

        def step():
            loss, _ = rank_grpo_loss(h, w, y, memory_budget_bytes=budget, **kwargs)
            torch.autograd.grad(loss, (h, w))
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = measure(step)
        row = dict(tokens=B * T, budget_mib=round(budget / 2**20, 1), fwd_bwd_ms=_sig(t))
        if device.type == "cuda":
            row["peak_mib_above_inputs"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        return row

    default = memory_budget(None, device)
    small = max(2**20, default // 8) if not dry_run else 2**20
    result["full_loss"] = {name: _guarded(lambda b=b: full_loss(b)) for name, b in (("default", default),
                                                                                     ("small", small))}
    return result


def worker_host_syncs(device, dry_run):
    import warnings

    import torch

    os.environ["RANKGRPO_VALIDATE"] = "0"
    from rankgrpo_kernels import rank_grpo_loss

    H, V = TINY if dry_run else QWEN
    B, T = (2, 32) if dry_run else (8, 512)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    h, w, y, kwargs = _loss_inputs(device, B, T, H, V, dtype)

    def call():
        loss, _ = rank_grpo_loss(h, w, y, **kwargs)
        return loss

    torch.autograd.grad(call(), (h, w))  # warm-up: JIT compiles, the GEMM probe, caches
    if device.type != "cuda":
        return dict(status="skipped: torch.cuda.set_sync_debug_mode needs a GPU", warm_up_call="ok")
    torch.cuda.synchronize()

    def syncs_of(fn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [str(c.message).splitlines()[0] for c in caught if "synchroniz" in str(c.message).lower()]
        return out, dict(count=len(syncs), first=syncs[:5])

    loss, forward = syncs_of(call)
    _, backward = syncs_of(lambda: torch.autograd.grad(loss, (h, w)))
    counts = dict(forward=forward, backward=backward)
    return dict(validate=os.environ["RANKGRPO_VALIDATE"], tokens=B * T, **counts)


def worker_int64_rows(device, dry_run):
    import torch

    from rankgrpo_kernels import backends

    V = TINY[1] if dry_run else QWEN[1]
    C = 40 if dry_run else math.ceil(2**31 / V) + 8
    check = 4  # the last rows, wholly past element 2^31 on the GPU
    if device.type == "cuda":
        torch.cuda.empty_cache()
    logits = torch.empty(C, V, device=device, dtype=torch.float32)
    g = torch.Generator(device=device).manual_seed(3)
    for r in range(0, C, 1024):  # filled in slices: no second (C, V) temporary
        logits[r:r + 1024].normal_(generator=g).mul_(3.0)
    targets = torch.randint(0, V, (C,), device=device, generator=g)
    tail = logits[-check:].clone()
    logp, lse, entropy, grad = backends.load("triton").row_pass(logits, None, targets, 1.0, None, torch.bfloat16,
                                                               True)
    want_lse = torch.logsumexp(tail.double(), 1)
    want_logp = tail.double().gather(1, targets[-check:, None].long())[:, 0] - want_lse
    p = torch.softmax(tail.double(), 1)
    want_d = -p
    want_d[torch.arange(check, device=device), targets[-check:].long()] += 1
    first_elem = (C - check) * V
    return dict(rows=C, vocab=V, elements=C * V, past_2_31=C * V > 2**31, checked_rows_start_at=first_elem,
                checked_rows_past_2_31=first_elem > 2**31,
                lse_max_abs_err=(lse[-check:].double() - want_lse).abs().max().item(),
                logp_max_abs_err=(logp[-check:].double() - want_logp).abs().max().item(),
                d_max_abs_err=(grad[-check:].double() - want_d).abs().max().item(),
                ok=bool((lse[-check:].double() - want_lse).abs().max() < 1e-3
                        and (grad[-check:].double() - want_d).abs().max() < 1e-2))


def worker_triton_registers(device, dry_run):
    import torch

    if device.type != "cuda":
        return dict(status="skipped: needs the device's JIT (tests/test_triton_aot.py reports the ahead-of-time "
                           "compile for sm_90a and sm_80 in CI)")
    from rankgrpo_kernels import backends, rank_grpo_loss
    from rankgrpo_kernels.kernels import row_pass, segment_loss

    H, V = QWEN
    h, w, y, kwargs = _loss_inputs(device, 4, 512, H, V, torch.bfloat16)
    loss, _ = rank_grpo_loss(h, w, y, backend="triton", **kwargs)
    torch.autograd.grad(loss, (h, w))
    for grad_dtype in (None, torch.bfloat16, torch.float32):  # the row pass's variants, each compiled once
        for width in (V, 5003):
            logits = torch.randn(64, width, device=device)
            backends.load("triton").row_pass(logits, None, torch.zeros(64, dtype=torch.long, device=device), 1.0,
                                             None, grad_dtype, True)
    torch.cuda.synchronize()
    kernels = []
    for name, fn in (("row_pass", row_pass._row_pass_kernel), ("segment_loss", segment_loss._segment_loss_kernel)):
        caches = getattr(fn, "device_caches", {})
        for entry in caches.values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for compiled in getattr(cache, "values", lambda: [])():
                meta = getattr(compiled, "metadata", None)
                kernels.append(dict(kernel=name, registers=getattr(compiled, "n_regs", None),
                                    spills=getattr(compiled, "n_spills", None),
                                    num_warps=getattr(meta, "num_warps", None),
                                    shared=getattr(meta, "shared", None)))
    return dict(kernels=kernels, any_spills=any((k["spills"] or 0) > 0 for k in kernels),
                device=torch.cuda.get_device_name(device))


WORKERS = dict(torch_probe=worker_torch_probe, timings=worker_timings, host_syncs=worker_host_syncs,
               int64_rows=worker_int64_rows, triton_registers=worker_triton_registers)


if __name__ == "__main__":
    sys.exit(main())

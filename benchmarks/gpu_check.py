"""The GPU check: one command, time-boxed phases whose caps add up to less than its 9-minute deadline on one
H100/H200, one JSON written after every phase (a run cut short still leaves what it measured).

    python benchmarks/gpu_check.py              # on the GPU machine: JSON under benchmarks/results/
    python benchmarks/gpu_check.py --dry-run    # on a CPU: every phase, tests collected only; JSON in benchmarks/out/
    python benchmarks/gpu_check.py --phases torch_probe,host_syncs --phase-timeout timings=120

Phases, in order, each in its own process (its own process group, killed at its cap; recorded as "timeout" and the
next one runs), none started with less than ``MIN_PHASE_S`` left of ``--deadline``. The caps (``PHASE_TIMEOUT_S``)
sum to less than the deadline, so every phase gets its whole cap; the check prints them first and refuses caps
(``--phase-timeout``) that no longer fit:

wheels            ``--wheels DIR`` (default ``.whl/`` where it exists; ``scripts/gpu_wheels.sh`` gathers them): its
                  wheels installed offline into a folder that every later phase has on its path (TRL, Liger and
                  Cut Cross-Entropy, which the GPU image lacks); skipped without wheels
cuda_build        ``python -m rankgrpo_kernels.backends.cuda.build``: the CUDA extension for this GPU, under the
                  build's own time limit, so that no test phase compiles (the tests load the built extension or
                  find the backend refused, with the build log's tail)
gpu_tests         ``pytest -m gpu`` (tests/gpu/test_gpu.py and the other GPU-marked tests, less the diagnostics)
native_kernels    tests/backends/: test_backends.py, test_row_pass_kernels.py, test_segment_kernels.py natively (no
                  Triton interpreter: conftest picks it only without a GPU)
torch_probe       whether this torch takes the in-place ``out_dtype=`` GEMMs, and TF32 under ``ieee_fp32``
timings           per part at Qwen2.5-0.5B's head (bf16): the three GEMMs per chunk size in TFLOP/s, the row pass in
                  GB/s, the segment loss, fwd+bwd of ``rank_grpo_loss`` at two budgets
host_syncs        syncs of one ``rank_grpo_loss`` fwd and bwd with RANKGRPO_VALIDATE=0 (after a warm-up call)
int64_rows        a logits chunk with N*V > 2^31 elements through the Triton row pass (int64 offsets)
triton_registers  registers and spills of the Triton kernels as JIT-compiled on this device
benchmark         ``benchmarks/run.py``: the realistic workload (TRL's default beta 0 and the released beta 1e-3) at
                  the Qwen2.5-0.5B head against eager, TRL's fused head, Liger and CCE, then the dense batch at
                  both heads

The five diagnostics are GPU tests, ``tests/gpu/test_<phase>.py``: what one measured is its phase's ``result``.
The dry run goes through the same phases on the CPU: the build phase only prints what it would build, the pytest
phases only collect (``--co``), and the benchmark phase runs one tiny realistic setting.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ROOT / "tests"

GPU_SHAPES = "qwen2.5-0.5b@16384,llama-3.2-3b@16384"
PROVIDERS = "eager,triton,cuda,triton-recompute"
REALISTIC_SHAPE = "qwen2.5-0.5b@16384"
REALISTIC_PROVIDERS = "eager,triton,cuda,trl,liger,cce"
PROCESS_TIMEOUT_S = 120  # one request to a worker process inside run.py (its setup, or one timed run)
DEADLINE_S = 530  # the whole check: under 9 minutes, with the time to start inside a 10-minute call
MIN_PHASE_S = 15  # a phase is not started with less time than this left
PHASES = ("wheels", "cuda_build", "gpu_tests", "native_kernels", "torch_probe", "timings", "host_syncs", "int64_rows",
          "triton_registers", "benchmark")
# Caps, seconds: a few MB of pure-Python wheels; the build of one architecture's extension (~1 min with ninja); ~250
# GPU tests and ~900 native kernel tests at small shapes, over pytest-xdist workers where the image has it; one
# diagnostic each; two run.py invocations (every worker of a shape in parallel).
PHASE_TIMEOUT_S = dict(wheels=15, cuda_build=80, gpu_tests=100, native_kernels=70, torch_probe=20, timings=40,
                       host_syncs=20, int64_rows=30, triton_registers=25, benchmark=125)
XDIST_WORKERS = 4  # test processes sharing the GPU in the two suite phases (small shapes: memory is no concern)
WHEELS = ROOT / ".whl"
DIAGNOSTICS = ("torch_probe", "timings", "host_syncs", "int64_rows", "triton_registers")  # tests/gpu/test_<name>.py
RESULT_ENV = "RANKGRPO_GPU_CHECK_RESULT"  # where tests/gpu/conftest.py writes what a diagnostic measured


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


def _pytest_cmd(paths, dry_run, marker=None, parallel=False):
    """pytest over ``paths``; ``parallel``: over ``XDIST_WORKERS`` processes where pytest-xdist is installed (a
    suite, not a diagnostic that times something)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, paths)]
    if marker:
        cmd += ["-m", marker]
    if parallel and not dry_run and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(XDIST_WORKERS)]
    return cmd + (["--co"] if dry_run else ["-rf"])


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


def _pytest_phase(name, dry_run, timeout, env):
    """A phase that is a pytest run: the GPU tests, the kernels' tests natively, or one diagnostic of tests/gpu/
    (its ``result``: what the test measured, written to the file named by ``RESULT_ENV``)."""
    env = dict(env)
    if name == "gpu_tests":  # the dry run collects the GPU module only: collecting all tests takes 10 s
        diagnostics = [f"--ignore={TESTS / 'gpu' / f'test_{d}.py'}" for d in DIAGNOSTICS]
        cmd = _pytest_cmd([TESTS / "gpu" / "test_gpu.py"] if dry_run else [TESTS, *diagnostics], dry_run, marker="gpu",
                          parallel=True)
    elif name == "native_kernels":
        cmd = _pytest_cmd([TESTS / "backends" / f for f in ("test_backends.py", "test_row_pass_kernels.py",
                                                             "test_segment_kernels.py")], dry_run, parallel=True)
        if not dry_run:
            env.pop("TRITON_INTERPRET", None)  # natively: conftest leaves it unset on a GPU
    else:
        cmd = _pytest_cmd([TESTS / "gpu" / f"test_{name}.py"], dry_run)
    with tempfile.TemporaryDirectory(prefix="rankgrpo-gpu-check-") as tmp:
        result_file = Path(tmp) / "result.json"
        status, rc, so, se, secs = _run_process(cmd, timeout, dict(env, **{RESULT_ENV: str(result_file)}))
        result = json.loads(result_file.read_text()) if result_file.exists() else None
    entry = dict(status=status, returncode=rc, seconds=secs, command=" ".join(map(str, cmd[1:])), summary=_summary(so),
                 output_tail=so[-3000:] + ("\n" + se[-1000:] if se.strip() else ""))
    if name in DIAGNOSTICS:
        entry["result"] = result
    if dry_run:
        entry["note"] = "dry run: collected only (--co)"
    if status == "failed" and rc == 5:  # pytest: nothing collected/selected
        entry["status"] = "ok"
    return entry


def _wheels_phase(wheels, timeout, env):
    """Install the wheels of the folder ``wheels`` offline (no index, no dependencies) into a new folder and put it
    first on ``env``'s PYTHONPATH, which every later phase inherits. The dry run installs them too (offline, fast)."""
    found = sorted(Path(wheels).glob("*.whl")) if wheels else []
    if not found:
        return dict(status=f"skipped: no wheels in {wheels}" if wheels else "skipped: no --wheels", seconds=0.0)
    site = tempfile.mkdtemp(prefix="rankgrpo-gpu-check-site-")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--upgrade", "--target", site, *map(str, found)]
    status, rc, so, se, secs = _run_process(cmd, timeout, env)
    if status == "ok":
        env["PYTHONPATH"] = os.pathsep.join([site, *filter(None, [env.get("PYTHONPATH")])])
    return dict(status=status, returncode=rc, seconds=secs, wheels=[p.name for p in found], site=site,
                output_tail=(so + se)[-2000:])


def _cuda_build_phase(dry_run, timeout, env):
    """Build the CUDA extension for the visible GPU under the build's own limit (a little inside the phase's cap, so
    that the build reports its own timeout with its log); the dry run names the command only."""
    cmd = [sys.executable, "-m", "rankgrpo_kernels.backends.cuda.build"]
    command = " ".join(cmd[1:])
    if dry_run:
        return dict(status="ok", seconds=0.0, command=command, note="dry run: not built")
    env = dict(env, RANKGRPO_CUDA_BUILD_TIMEOUT=str(max(1.0, timeout - 10)))
    status, rc, so, se, secs = _run_process(cmd, timeout, env)
    return dict(status=status, returncode=rc, seconds=secs, command=command, summary=_summary(so + se),
                output_tail=(so + se)[-3000:])


def plan(phases, timeouts, deadline) -> list[str]:
    """The phases' caps, printed before the first: each cap and the running sum against the deadline. A
    ValueError when the caps add up to more than the deadline (a later phase would lose part of its cap)."""
    lines, total = [], 0.0
    for name in phases:
        total += timeouts[name]
        lines.append(f"  {name:17s} cap {timeouts[name]:5.0f} s   by {total:5.0f} s")
    if total > deadline:
        raise ValueError(f"the phases' caps add up to {total:.0f} s, more than the deadline of {deadline:.0f} s: "
                         "lower a --phase-timeout or raise --deadline")
    return lines + [f"  caps {total:.0f} s within the deadline of {deadline:.0f} s"]


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
    p.add_argument("--dry-run", action="store_true", help="CPU: every phase end to end, the tests collected only")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--phase-timeout", action="append", default=[], metavar="NAME=SECONDS")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help=f"seconds for the whole check ({DEADLINE_S})")
    p.add_argument("--out", default=None, help="folder of the JSON (benchmarks/results/, dry run benchmarks/out/)")
    p.add_argument("--wheels", default=str(WHEELS) if WHEELS.is_dir() else None,
                   help="folder of wheels to install offline first (default .whl/ where it exists; "
                        "scripts/gpu_wheels.sh gathers them)")
    args = p.parse_args(argv)

    started = time.time()
    phases = [n for n in args.phases.split(",") if n]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)}; choose from {list(PHASES)}")
    timeouts = dict(PHASE_TIMEOUT_S)
    for item in args.phase_timeout:
        name, _, seconds = item.partition("=")
        if name not in timeouts:
            raise SystemExit(f"unknown phase in --phase-timeout {item!r}; choose from {list(PHASES)}")
        timeouts[name] = float(seconds)
    try:
        print("\n".join(plan(phases, timeouts, args.deadline)), flush=True)
    except ValueError as exc:
        raise SystemExit(f"gpu_check.py: {exc}") from None
    out = Path(args.out) if args.out else HERE / ("out" if args.dry_run else "results")
    out.mkdir(parents=True, exist_ok=True)
    env = _environment(args.dry_run)
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    path = out / f"gpu_check_{'dry_' if args.dry_run else ''}{stamp}.json"
    report = dict(environment=env, deadline_s=args.deadline, caps_s={n: timeouts[n] for n in phases}, phases={})
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
        elif name == "wheels":
            entry = _wheels_phase(args.wheels, timeout, child_env)
        elif name == "cuda_build":
            entry = _cuda_build_phase(args.dry_run, timeout, child_env)
        else:
            entry = _pytest_phase(name, args.dry_run, timeout, child_env)
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


if __name__ == "__main__":
    sys.exit(main())

"""The GPU check, in one call of under 8 minutes: the GPU tests (``pytest -m gpu``), then fwd+bwd at the
Qwen2.5-0.5B head (H=896, V=151936) and the Llama-3.2-3B head (H=3072, V=128256) with N=16384 completion tokens in
bf16, each provider in its own process (``run.py``): eager (full logits), ours on the fused path with each backend
(torch, triton, cuda), ours on the recompute path with Triton (``fused_logprobs`` + ``rank_grpo_loss_from_logps``,
what OpenRLHF and verl run), Liger's LigerFusedLinearGRPOLoss and Cut Cross-Entropy + our loss from log-probs, with
the bf16 times of the three and four LM-head GEMMs measured in the same run. Writes one JSON under
benchmarks/results/.

    python benchmarks/gpu_check.py              # on the GPU machine
    python benchmarks/gpu_check.py --breakdown  # also split ours' device time: GEMMs, row pass, segment loss, rest
    python benchmarks/gpu_check.py --dry-run    # on a CPU: tiny shapes, same code path, JSON to benchmarks/out/

Liger and CCE are optional: where ``liger-kernel`` / ``cut-cross-entropy`` are not installed the table says so
(``pip install ".[bench]"`` brings both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402

GPU_SHAPES = "qwen2.5-0.5b@16384,llama-3.2-3b@16384"
PROVIDERS = "eager,torch,triton,cuda,triton-recompute,liger,cce"
PROCESS_TIMEOUT_S = 300  # one provider's process at one shape; a hang costs this much, not the whole check


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: proves the script end to end")
    p.add_argument("--breakdown", action="store_true", help="profile one more fwd+bwd of each of ours (run.py)")
    p.add_argument("--providers", default=PROVIDERS, help=f"default {PROVIDERS}")
    args = p.parse_args(argv)
    started = time.time()

    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                  str(HERE.parent / "tests")]
    tests = subprocess.run(pytest_cmd, capture_output=True, text=True, cwd=HERE.parent)
    summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"GPU tests: {summary}", flush=True)

    out = HERE / ("out" if args.dry_run else "results")
    breakdown = "--breakdown" if args.breakdown or args.dry_run else "--no-breakdown"  # the dry run proves it too
    bench_args = ["--out", str(out), "--no-segmentation", "--providers", args.providers,
                  "--timeout", str(PROCESS_TIMEOUT_S), breakdown]
    if args.dry_run:
        bench_args += ["--device", "cpu", "--shapes", "64x1001@256,96x2003@256", "--reps", "2"]
    else:
        bench_args += ["--device", "cuda", "--dtype", "bfloat16", "--shapes", GPU_SHAPES, "--reps", "10"]
    before = set(out.glob("bench_*.json"))
    run.main(bench_args)
    (report_path,) = set(out.glob("bench_*.json")) - before
    report = json.loads(report_path.read_text())
    report["gpu_tests"] = dict(command=" ".join(pytest_cmd[1:]), returncode=tests.returncode, summary=summary,
                               output_tail=tests.stdout[-3000:])
    report["environment"]["command"] = " ".join(["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])])
    report["wall_seconds"] = round(time.time() - started, 1)
    report_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {report_path} ({report['wall_seconds']} s)")
    return 0 if tests.returncode in (0, 5) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Throughput and memory of the Rank-GRPO loss: ours against the eager baseline, the peers and the GEMM floor.

    python benchmarks/run.py                      # CPU: about 5 minutes on 2 cores with the peers installed (6
                                                  # with the verl and OpenRLHF venvs): the realistic workload at a
                                                  # scaled-down Qwen2.5-0.5B head, fp32
    python benchmarks/run.py --full               # CPU: the long sweep, the foundation head too (about 22 minutes)
    python benchmarks/run.py --device cuda        # GPU: the Qwen2.5-0.5B and Llama-3.2-3B heads, ~16k positions,
                                                  # bf16, every provider; --full: every model head at 4k and 16k
    python benchmarks/run.py --workload dense --shapes 256x4000@512 --reps 5   # a quick look: 512 positions, ~1 min
    python benchmarks/run.py --settings beta0 --providers eager,torch,trl   # one loss setting, three providers
    python benchmarks/run.py --save               # into benchmarks/results/ (summarize.py's input), not benchmarks/out/

Results (a JSON and a plot) go to ``benchmarks/out/``, which git ignores; ``--save`` writes them into
``benchmarks/results/``, the committed runs that ``summarize.py`` turns into docs/results.md and the README's results.
The JSON is rewritten after each shape (``complete`` false until the end): a run cut short keeps its finished rows.

Workloads (``--workload``). ``realistic`` (the default; ``workload.py``): P prompts x G = 8 completions, each a
20-item list (items of 6-16 tokens ending in a newline), some stopping early, some overflowing, an EOS, right-padded
as TRL pads; items from the library's segmentation, advantages from ``rank_rewards`` -> ``rank_advantages`` ->
``token_advantages`` as ``RankGRPOTrainer`` builds them, with hits correlated within a prompt (``--hits-per-list``)
so that most ranks of a group carry advantage exactly 0. ``HxV@N`` asks for about N padded positions, at least one
prompt's 8 completions (about 2000; ``--prompts`` sets P instead). Each of its three loss settings is timed: ``beta0``
(beta 0, on-policy, no reference: TRL 1.16's default), ``beta1e-3`` (reference and old log-probs: the released run),
``offpolicy`` (beta 0, old log-probs far enough from the policy that PPO clipping binds on a share of items).
``dense``: N tokens in rows of 512, 5% padding, a random non-zero advantage per item, the released settings
(``make_batch``).

Interleaved rounds (``sweep.py``, ``rounds.py``). Per shape, one process per provider (a fresh interpreter each, so
allocator state, thread pools and compile caches in memory do not leak from one provider into the next), one that
saves the eager loss and gradients of every setting (the yardstick) and one that times the LM head's GEMMs: all
started at once, then set up one at a time while the others wait on their pipes. A provider's setup builds the same
seeded batch of each setting, runs the provider once (the warm-up, and the ``1st call`` column: any compilation; a
later setting's first call finds the earlier ones' caches), checks its loss and gradients against the yardstick
(``TOLERANCE`` of the dtype, relative to the largest entry; a provider that disagrees is reported as wrong and not
timed) and measures its memory. Then ``--reps`` rounds: each round visits every provider and floor at every setting,
one process at a time, the settings in turn and the lanes of a setting in an order shuffled per round; a visit times
fwd+bwd (CUDA events on a GPU; the floor: each of its GEMMs in turn) up to 10 times, as often as fits in 0.6 s, and
keeps the fastest (others' work only ever slows a call down: ``measure.visit_seconds``). Every ratio (``x 3 GEMM``,
``time vs eager``) is taken within a round, so that whatever else the machine does lands on both of its terms; the
table gives medians over the rounds with their 20th-80th percentiles, and a warning where that spread is over 10% of
the median or other processes took over a quarter of the CPUs during the rounds (the JSON's ``rounds``, with the
load average before and after).

Memory: peak above the inputs, gradients included, of one fwd+bwd right after the check (before the timed runs).
On CUDA that is ``max_memory_allocated``. On the CPU it is the peak resident set (VmHWM, reset through
/proc/self/clear_refs) read against the resident set before the run, in a process started with glibc told to return
every block over 64 KiB to the system when it is freed (``MALLOC_ENV``), so that freed memory is neither reused
unseen nor counted twice; glibc's usual thresholds are then restored (``mallopt``) for the timed runs.

``x 3 GEMM`` divides by the time of the three (N x H x V) GEMMs any exact method needs (logits, d_hidden,
d_weight) measured in the same rounds; the ``3 GEMMs`` and ``4 GEMMs`` rows (four: the logits recomputed in the
backward, as a small-memory backward does) show them. On the realistic workload two rows per setting: ``3 GEMMs
(all positions)`` over all B x T positions, and ``3 GEMMs (loss tokens)`` over only the tokens the setting's loss
needs in a GEMM (``workload.gemm_tokens``: the loss tokens, less, at beta = 0, those of items whose advantage is 0
on every token); ``x 3 GEMM`` and ``x 3 GEMM (loss tokens)`` divide by each. ``--breakdown`` (default on the CPU,
where ours runs the torch backend) profiles one more fwd+bwd of each of ours in its setup: time in the GEMMs
(aten::mm / addmm / addmm_), in the backend's row pass, in its segment loss, and the rest (scaling, casts, Python);
on a GPU the kernels' device time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import workload as wl  # noqa: E402
from batches import Work  # noqa: E402
from child import TOLERANCE, Job, child_main  # noqa: E402
from measure import bench_segmentation  # noqa: E402
from progress import Progress  # noqa: E402
from providers import PROVIDERS  # noqa: E402
from report import GEMM_NOTE, REALISTIC_GEMM_NOTE, markdown, plot  # noqa: E402
from rounds import load_average  # noqa: E402
from shapes import ALL_SHAPES, default_shapes, parse_shape  # noqa: E402
from sweep import Sweep  # noqa: E402

import rankgrpo_kernels  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT, SAVED = HERE / "out", HERE / "results"


def package_version(name):
    """The installed version of distribution ``name`` (None if it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device, argv):
    """The machine, versions and command of the run, for its JSON."""
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
               cpu_count=os.cpu_count(),
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


def device_error(text) -> str | None:
    """Why ``--device text`` cannot run here (None if it can): checked before anything starts."""
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        return str(exc)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"no CUDA device here (torch {torch.__version__}: torch.cuda.is_available() is False); use cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"no such CUDA device: {torch.cuda.device_count()} visible"
    elif device.type != "cpu":
        return "the benchmark runs on cpu or cuda"
    return None


def out_folder(args) -> Path:
    """Where the JSON and the plot go: benchmarks/out/ (ignored by git), benchmarks/results/ with ``--save``, or
    ``--out``."""
    return SAVED if args.save else Path(args.out) if args.out else OUT


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", help=f"comma-separated: {', '.join(sorted(ALL_SHAPES))}, or HxV@N (N: tokens of the "
                                    "dense batch; about N padded positions of the realistic one, at least ~2000)")
    p.add_argument("--full", action="store_true",
                   help="the long sweep: on a CPU the foundation head (N=4096, H=512, V=32000) too, about 22 minutes "
                        "on 2 cores; on a GPU every model head at 4k and 16k tokens")
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
    p.add_argument("--reps", type=int, default=None,
                   help="rounds: each times every provider and floor once (the fastest of up to 10 calls within "
                        "0.6 s); CPU 8, GPU 20")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=None,
                   help="profile one more fwd+bwd of ours with the torch backend: GEMMs vs row pass vs segment loss "
                        "vs the rest (default: on for the CPU)")
    p.add_argument("--fwd", action="store_true", help="also time the forward alone (no_grad; in the provider's setup, "
                                                      "not in the rounds)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds one request to a worker process (its setup, or one timed run) may take")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--save", action="store_true",
                       help="write the JSON and the plot into benchmarks/results/ (committed; summarize.py reads it)")
    where.add_argument("--out", default=None, help="folder for the JSON and the plot (default benchmarks/out/, which "
                                                   "git ignores)")
    p.add_argument("--no-segmentation", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ref-dir", help=argparse.SUPPRESS)
    p.add_argument("--token-level", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    why = device_error(args.device)
    if why:
        print(f"run.py: error: --device {args.device}: {why}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    settings = tuple(n for n in args.settings.split(",") if n)
    unknown = set(settings) - set(wl.SETTINGS)
    if unknown or not settings:
        raise SystemExit(f"unknown settings {sorted(unknown)}; choose from {list(wl.SETTINGS)}")
    work = Work(args.workload, settings, args.prompts, args.hits_per_list)
    shapes = ([parse_shape(s) for s in args.shapes.split(",") if s] if args.shapes
              else default_shapes(device.type, args.full))
    reps = args.reps or (20 if device.type == "cuda" else 8)
    want_breakdown = device.type == "cpu" if args.breakdown is None else args.breakdown
    if args.child:  # one worker of the parent below, in this fresh process
        child_main(args.child, Job(shapes[0], dtype, device, work, Path(args.ref_dir), reps, want_breakdown, args.fwd,
                                   args.token_level))
        return 0
    names = [n for n in args.providers.split(",") if n] if args.providers else list(PROVIDERS)
    unknown = set(names) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {list(PROVIDERS)}")

    started = time.time()
    env = dict(environment(device, argv), load_average=load_average())  # dated and loaded at the start
    out = out_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    tag = env.get("gpu", device.type).replace(" ", "_")
    json_path = out / f"bench_{tag}_{stamp}.json"
    labels = {n: p.label or n for n, p in PROVIDERS.items()}
    report = dict(environment=env, dtype=str(dtype).split(".")[-1], reps=reps, tolerance=TOLERANCE[dtype],
                  breakdown=want_breakdown, notes={n: PROVIDERS[n].note for n in names},
                  labels={n: labels[n] for n in names},
                  gemm_note=REALISTIC_GEMM_NOTE if work.realistic else GEMM_NOTE, workload=work.describe(),
                  complete=False)

    def write(rows, workloads, rounds, **more):
        """The JSON as it stands: rewritten after each shape, so a run cut short keeps its finished rows."""
        env.update(wall_seconds=round(time.time() - started, 1), load_average_end=load_average())
        report.update(workloads=workloads or None, rounds=rounds, results=rows, **more)
        tmp = json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(json_path)

    progress = Progress()
    sweep = Sweep(names, dtype, device, reps, work, want_breakdown, args.fwd, args.timeout, progress)
    rows, workloads, rounds = sweep.run(shapes, write)
    progress.done()
    segmentation = None if args.no_segmentation else bench_segmentation(device)
    write(rows, workloads, rounds, segmentation=segmentation, complete=True)
    plot_path = plot(rows, out / f"bench_{tag}_{stamp}.png", labels)
    print(markdown(rows, segmentation, env, workloads, work.kind, {n: p.note for n, p in PROVIDERS.items()},
                   work.setting_notes(), rounds))
    print(f"\nwrote {json_path}" + (f" and {plot_path}" if plot_path else " (no plot: matplotlib missing)")
          + f" in {env['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

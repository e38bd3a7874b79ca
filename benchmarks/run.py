"""Throughput and memory of the Rank-GRPO loss: ours against the eager baseline and the peers.

    python benchmarks/run.py                      # CPU: the foundation shape, eager vs torch, plus segmentation
    python benchmarks/run.py --device cuda        # GPU: every model head at 4k and 16k tokens, every provider
    python benchmarks/run.py --shapes qwen2.5-0.5b@16384 --providers eager,torch --dtype bfloat16 --reps 10

Each provider's loss and gradients are first checked against the eager result; a provider that disagrees is
reported as wrong and not timed. Times: median and 20th/80th percentiles over ``--reps`` runs after a warm-up
(CUDA events on GPU). Memory: peak above the inputs, gradients included. On CUDA that is
``max_memory_allocated``; on the CPU each provider runs once more in a fresh process whose peak resident set
(VmHWM, reset through /proc/self/clear_refs after a warm-up) is read against its resident set before the run,
with glibc told to return every block over 64 KiB to the system at once so freed memory is not counted twice.
The ``x 3 GEMM`` column divides by the time of the three (N x H x V) GEMMs any exact method needs (logits,
d_hidden, d_weight), measured in the same run; the JSON also holds the ratio to four (the logits recomputed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import providers  # noqa: E402
from providers import (  # noqa: E402
    LOSS_SETTINGS, PROVIDERS, TOKEN_LEVEL, Batch, Unavailable, token_level_inputs,
)
from shapes import ALL_SHAPES, HeadShape, default_shapes, parse_shape  # noqa: E402

import rankgrpo_kernels  # noqa: E402
from rankgrpo_kernels import fused_logprobs  # noqa: E402
from rankgrpo_kernels.reference import reference_loss  # noqa: E402

REC_NUM = 20
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def make_batch(shape: HeadShape, dtype, device, seed=0) -> Batch:
    """Rows of 20 items of jittered length, 5% padding, per-rank advantages, old/ref log-probs near the policy."""
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
        logps = fused_logprobs(hidden, weight, target_ids)
    noise = torch.randn(2, B, T, generator=g).to(device)
    loss_inputs = dict(
        item_ids=item_ids, advantages=rank_adv.to(device).gather(1, item_ids), completion_mask=completion_mask,
        old_logps=logps + 0.05 * noise[0], ref_logps=logps + 0.1 * noise[1],
    )
    return Batch(hidden.requires_grad_(), weight.requires_grad_(), target_ids, loss_inputs)


def fwd_bwd(loss_fn, batch):
    return torch.autograd.grad(loss_fn(), (batch.hidden, batch.weight))


def fwd_only(loss_fn, batch):
    with torch.no_grad():
        return loss_fn()


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


def gemm_seconds(shape, dtype, device, reps) -> dict:
    """Times of the LM head's GEMMs at this shape: logits ``h W^T`` alone, and with d_hidden ``dZ W`` and d_weight
    ``dZ^T h`` (three: the floor of any exact method; four adds the logits' recomputation of a small-memory
    backward)."""
    h = torch.randn(shape.tokens, shape.hidden, device=device, dtype=dtype)
    w = torch.randn(shape.vocab, shape.hidden, device=device, dtype=dtype)
    z = torch.randn(shape.tokens, shape.vocab, device=device, dtype=dtype)
    logits, d_hidden, d_weight = (statistics.median(timings(fn, reps, device))
                                  for fn in (lambda: h @ w.T, lambda: z @ w, lambda: z.T @ h))
    three = logits + d_hidden + d_weight
    return dict(three=three, four=three + logits)


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_here(loss_fn, batch, device) -> int:
    """Peak bytes above the inputs for one fwd+bwd (see the module docstring for the method)."""
    fwd_bwd(loss_fn, batch)  # warm-up: thread pools and one-time buffers are not the loss's memory
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = fwd_bwd(loss_fn, batch)
        torch.cuda.synchronize()
        del grads
        return torch.cuda.max_memory_allocated() - base
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    grads = fwd_bwd(loss_fn, batch)
    peak = _status_kb("VmHWM")
    del grads
    return peak - base


def peak_memory_in_child(provider, shape_spec, dtype_name, device) -> int:
    """CPU memory of one provider, measured in a fresh process (``--measure-memory``)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--measure-memory", provider, "--shapes", shape_spec, "--dtype", dtype_name,
           "--device", str(device), "--providers", provider]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def eager_result(batch, loss_inputs):
    """Loss and gradients of hidden and weight by the eager reference (full logits)."""
    loss, _ = reference_loss(batch.hidden, batch.weight, batch.target_ids, **loss_inputs, **LOSS_SETTINGS)
    return [x.detach() for x in (loss, *torch.autograd.grad(loss, (batch.hidden, batch.weight)))]


def relative_error(got, want) -> float:
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp(min=1e-30)).item()
               for g, w in zip(got, want))


def bench_shape(shape, provider_names, dtype, device, reps, progress) -> list[dict]:
    """Rows of one shape: each provider checked against eager, then timed and measured (its inputs freed after)."""
    rows, key = [], shape.key
    batch = make_batch(shape, dtype, device)
    built = {}
    for name in provider_names:
        try:
            built[name] = PROVIDERS[name][1](batch)
        except Unavailable as exc:
            rows.append(dict(provider=name, shape=key, status=f"skipped: {exc}"))
    # The eager result is the yardstick for every provider (itself included, as a determinism check).
    expected = eager_result(batch, batch.loss_inputs)
    gemm = gemm_seconds(shape, dtype, device, reps)
    for name, loss_fn in built.items():
        progress(f"{key} {name}")
        loss = loss_fn()
        got = (loss.detach(), *torch.autograd.grad(loss, (batch.hidden, batch.weight)))
        want = eager_result(batch, token_level_inputs(batch)) if name in TOKEN_LEVEL else expected
        error = relative_error(got, want)
        row = dict(provider=name, shape=key, hidden=shape.hidden, vocab=shape.vocab, tokens=shape.tokens,
                   scaled_from=shape.scaled_from, max_rel_error=error)
        if not error <= TOLERANCE[dtype]:
            rows.append(dict(row, status=f"wrong: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"))
            continue
        both = timings(lambda: fwd_bwd(loss_fn, batch), reps, device, warm_up=False)  # the check warmed up
        fwd = timings(lambda: fwd_only(loss_fn, batch), reps, device)
        if device.type == "cuda":
            peak = peak_memory_here(loss_fn, batch, device)
        else:
            peak = peak_memory_in_child(name, shape.spec, str(dtype).split(".")[-1], device)
        median = statistics.median(both)
        rows.append(dict(
            row, status="ok", fwd_bwd_ms=1e3 * median, fwd_bwd_p20_ms=1e3 * percentile(both, 0.2),
            fwd_bwd_p80_ms=1e3 * percentile(both, 0.8), fwd_ms=1e3 * statistics.median(fwd),
            tokens_per_s=shape.tokens / median, peak_mib=peak / 2**20, three_gemm_ms=1e3 * gemm["three"],
            four_gemm_ms=1e3 * gemm["four"], vs_three_gemm=median / gemm["three"], vs_four_gemm=median / gemm["four"],
        ))
    return rows


def bench_loss(shapes, provider_names, dtype, device, reps, progress):
    rows = [row for shape in shapes for row in bench_shape(shape, provider_names, dtype, device, reps, progress)]
    for row in rows:  # ratios to eager, measured in the same run
        base = next((r for r in rows if r["shape"] == row["shape"] and r["provider"] == "eager"
                     and r["status"] == "ok"), None)
        if base and row["status"] == "ok":
            row["time_vs_eager"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            row["memory_vs_eager"] = row["peak_mib"] / base["peak_mib"]
    return rows


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


def environment(device, argv):
    def git_sha():
        try:
            return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                  cwd=Path(__file__).parent).stdout.strip() or None
        except OSError:
            return None

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=" ".join(["python", "benchmarks/run.py", *argv]), git_sha=git_sha(),
               python=platform.python_version(), torch=torch.__version__, rankgrpo_kernels=rankgrpo_kernels.__version__,
               device=str(device), cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            env["driver"] = None
    return env


def markdown(rows, segmentation, env):
    def fmt(x, spec):
        return "" if x is None else format(x, spec)

    lines = [f"Device: {env.get('gpu', env['cpu'])} ({env['device']}), torch {env['torch']}, {env['date']}", "",
             "| shape | provider | fwd+bwd ms (p20-p80) | fwd ms | tokens/s | peak MiB | time vs eager "
             "| memory vs eager | x 3 GEMM | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = (f"{r['fwd_bwd_ms']:.1f} ({r['fwd_bwd_p20_ms']:.1f}-{r['fwd_bwd_p80_ms']:.1f})"
                  if r["status"] == "ok" else "")
        lines.append(
            f"| {r['shape']} | {r['provider']} | {spread} | {fmt(r.get('fwd_ms'), '.1f')} "
            f"| {fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('peak_mib'), '.1f')} "
            f"| {fmt(r.get('time_vs_eager'), '.2f')} | {fmt(r.get('memory_vs_eager'), '.3f')} "
            f"| {fmt(r.get('vs_three_gemm'), '.2f')} | {r['status']} |")
    notes = sorted({f"{r['shape']}: scaled down, stands for {r['scaled_from']}" for r in rows
                    if r.get("scaled_from")})
    notes += [f"{name}: {PROVIDERS[name][0]}" for name in dict.fromkeys(r["provider"] for r in rows)]
    lines += [""] + [f"- {n}" for n in notes]
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
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        for ax, key in zip(axes, ("fwd_bwd_ms", "peak_mib")):
            values = [next((r[key] for r in ok if r["shape"] == s and r["provider"] == p), 0) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], values, width, label=p)
    for ax, title in zip(axes, ("fwd+bwd time (ms)", "peak memory above inputs (MiB)")):
        ax.set_title(title)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=15, fontsize=8)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", help=f"comma-separated: {', '.join(sorted(ALL_SHAPES))}, or HxV@N")
    p.add_argument("--providers", help=f"comma-separated subset of {', '.join(PROVIDERS)}")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default), float16")
    p.add_argument("--reps", type=int, default=None, help="timed runs per figure (CPU 3, GPU 10)")
    p.add_argument("--out", default=str(Path(__file__).parent / "out"), help="folder for the JSON and the plot")
    p.add_argument("--no-segmentation", action="store_true")
    p.add_argument("--measure-memory", metavar="PROVIDER", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    else:
        shapes = default_shapes(device.type)
    providers.COMPILE_ON_CPU = bool(args.providers) and "compile" in args.providers.split(",")
    if args.measure_memory:  # child process of peak_memory_in_child
        batch = make_batch(shapes[0], dtype, device)
        loss_fn = PROVIDERS[args.measure_memory][1](batch)
        print(json.dumps({"peak_bytes": peak_memory_here(loss_fn, batch, device)}))
        return 0
    names = args.providers.split(",") if args.providers else list(PROVIDERS)
    unknown = set(names) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; choose from {list(PROVIDERS)}")
    reps = args.reps or (10 if device.type == "cuda" else 3)

    try:
        from tqdm import tqdm

        bar = tqdm(total=len(shapes) * len(names), file=sys.stderr, leave=False)
        progress = lambda text: (bar.set_description(text), bar.update(1))  # noqa: E731
    except ImportError:
        progress = lambda text: print(f"... {text}", file=sys.stderr)  # noqa: E731

    rows = bench_loss(shapes, names, dtype, device, reps, progress)
    segmentation = None if args.no_segmentation else bench_segmentation(device)
    env = environment(device, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    tag = env.get("gpu", device.type).replace(" ", "_")
    json_path = out / f"bench_{tag}_{stamp}.json"
    plot_path = plot(rows, out / f"bench_{tag}_{stamp}.png")
    json_path.write_text(json.dumps(dict(environment=env, dtype=str(dtype).split(".")[-1], reps=reps, results=rows,
                                         segmentation=segmentation), indent=2))
    print(markdown(rows, segmentation, env))
    print(f"\nwrote {json_path}" + (f" and {plot_path}" if plot_path else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

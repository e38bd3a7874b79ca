"""Rewrite the results of docs/results.md and of the README from the JSON files under benchmarks/results/ (never by
hand): the text between the results markers of each.

    python benchmarks/summarize.py          # updates both; tests/packaging/test_bench_rounds.py fails when stale

docs/results.md, per report: the run's machine and command, then per shape and provider the fwd+bwd time, its ratio
to the three LM-head GEMMs and to eager, the extra peak memory and its ratio to eager's (``report.results_table``),
and where ``--breakdown`` profiled ours, the split of its time between GEMMs, row pass, segment loss and the rest.
The README: the latest CPU run and the latest GPU run, each as time and memory against eager per provider and
setting, ours against the GEMM floors, and the run's warnings (``report.trust_warnings``).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import (  # noqa: E402
    BREAKDOWN_CAPTION,
    breakdown_table,
    fmt,
    pct,
    results_table,
    scaled_notes,
    trust_warnings,
    with_spread,
    workload_tables,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LEGEND = ("fwd+bwd ms: median over the run's reps, each provider in its own process after its loss and gradients "
          "matched eager's (from 2026-12-06 on: the median over interleaved rounds of each visit's fastest call, "
          "each ratio taken within a round); x 3 GEMM: that "
          "time over the three LM-head GEMMs (logits, d_hidden, d_weight) timed in the same run (the `3 GEMMs` / `4 "
          "GEMMs` rows; on the realistic workload `3 GEMMs (all positions)`, and x 3 GEMM (loss tokens) over the `3 "
          "GEMMs (loss tokens)` row: only the tokens the setting's loss needs in a GEMM); time and memory vs eager: "
          "ratios to the eager row of the same shape and setting; extra peak MiB: peak memory above the inputs, "
          "gradients included.")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
WIDTH = 116  # the README's prose width


def reports(results_dir: Path) -> list[tuple[Path, dict]]:
    """The committed runs of ``run.py`` (``bench_*.json``), oldest first; a run cut short (``complete`` false: the
    shapes it finished) is left out (runs before that field was written are whole)."""
    found = [(path, json.loads(path.read_text())) for path in sorted(results_dir.glob("bench_*.json"))]
    return [(path, report) for path, report in found if report.get("complete", True)]


def heading(report, path) -> str:
    env = report["environment"]
    where = env.get("gpu") or f"CPU {env.get('cpu', '')}, {env.get('cpu_threads', '?')} threads"
    versions = [f"torch {env['torch']}"] + [f"{name} {env[key]}" for name, key in
                                           (("triton", "triton"), ("liger-kernel", "liger_kernel"),
                                            ("cut-cross-entropy", "cut_cross_entropy")) if env.get(key)]
    return (f"**{where}** ({env['device']}), {env['date']}, {', '.join(versions)}, git {str(env.get('git_sha'))[:8]}, "
            f"`{env['command']}` ({path.name}, {report['dtype']}, {report.get('reps', '?')} reps"
            + (f", workload {report['workload']['kind']}" if isinstance(report.get("workload"), dict) else "")
            + "):")


def summary(results_dir: Path) -> str:
    """docs/results.md's text between the markers: every committed run."""
    found = reports(results_dir)
    if not found:
        return "No results are committed yet."
    lines = [LEGEND, ""]
    for path, report in found:
        rows = report["results"]
        lines += [heading(report, path), "", *results_table(rows, detail=False), ""]
        warnings = trust_warnings(rows, report.get("rounds"), report["environment"].get("cpu_count"))
        lines += [*warnings, ""] if warnings else []
        shown = dict.fromkeys(r["provider"] for r in rows if r["status"] == "ok")
        notes = scaled_notes(rows)
        notes += [f"{name}: {report['notes'][name]}" for name in shown if name in report.get("notes", {})]
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
        shares = workload_tables(report.get("workloads"))
        if shares:
            lines += [*shares, ""]
        split = breakdown_table(rows)
        if split:
            lines += [BREAKDOWN_CAPTION + ":", "", *split, ""]
    return "\n".join(lines).rstrip()


# --- the README -----------------------------------------------------------------------------------------------------

def _latest(found, gpu: bool):
    runs = [(path, r) for path, r in found if str(r["environment"]["device"]).startswith("cuda") == gpu]
    return max(runs, key=lambda run: run[1]["environment"]["date"], default=None)


def _run_line(path, report, shape) -> str:
    env = report["environment"]
    where = env.get("gpu") or f"a {env.get('cpu_threads', '?')}-thread {env.get('cpu', '')} CPU"
    row = next(r for r in report["results"] if r["shape"] == shape)
    head = f"`{shape}` (H={row.get('hidden')}, V={row.get('vocab')}"
    w = (report.get("workloads") or {}).get(shape)
    if w and "positions" in w:
        head += (f"; {w['prompts'] * w['generations']} completions of 20-item lists in {w['positions']} positions, "
                 f"{pct(w['completion_tokens'] / w['positions'])} of them completion tokens, "
                 f"{pct(w['gradient_share_beta0'])} carrying a gradient at beta 0")
    if row.get("scaled_from"):
        head += f"; scaled down from {row['scaled_from']}"
    reps = f"{report.get('reps', '?')} {'rounds' if report.get('rounds') else 'reps'}"
    return (f"Measured by `{env['command']}` on {where} ({report['dtype']}, {reps}, torch "
            f"{env['torch']}, git {str(env.get('git_sha'))[:8]}, {env['date'][:10]}) at {head}), from "
            f"`benchmarks/results/{path.name}`. Each provider's loss and gradients were checked against eager's "
            "before timing.")


def _pivot(report, shape) -> list[str]:
    """Providers x settings: time vs eager (eager's own cell: its ms), then extra peak memory at the first setting."""
    rows = [r for r in report["results"] if r["shape"] == shape]
    settings = list(dict.fromkeys(r.get("setting") for r in rows))
    labels = report.get("labels") or {}
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows)
                 if p in labels or p in report.get("notes", {})]
    cell = {(r["provider"], r.get("setting")): r for r in rows}
    head = ["provider", *(s or "time vs eager" for s in settings), "extra peak MiB", "memory vs eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in providers:
        mine = [cell.get((p, s), {}) for s in settings]
        if not any(r.get("status") == "ok" for r in mine):
            continue
        times = [(f"1.00 ({r['fwd_bwd_ms']:.0f} ms)" if p == "eager" else with_spread(r, "time_vs_eager"))
                 if r.get("status") == "ok" else r.get("status", "").split(":")[0] for r in mine]
        first = mine[0]
        lines.append(f"| {labels.get(p, p)} | " + " | ".join(times)
                     + f" | {fmt(first.get('peak_mib'), '.0f')} | {fmt(first.get('memory_vs_eager'), '.3f')} |")
    return lines


def _ours_line(report, shape) -> list[str]:
    """Each of ours against the GEMM floors, per setting, median and p20-p80 over the rounds."""
    rows = [r for r in report["results"] if r["shape"] == shape and r.get("ours") and r["status"] == "ok"]
    labels = report.get("labels") or {}
    out = []
    for p in dict.fromkeys(r["provider"] for r in rows):
        mine = [r for r in rows if r["provider"] == p]
        parts = []
        for r in mine:
            at = f" at {r['setting']}" if r.get("setting") else ""
            loss = (f"{with_spread(r, 'vs_three_gemm_loss_tokens')} over the loss tokens, "
                    if r.get("vs_three_gemm_loss_tokens") is not None else "")
            parts.append(f"{loss}{with_spread(r, 'vs_three_gemm')} over all positions{at}")
        out.append(f"- {labels.get(p, p)} against the three LM-head GEMMs (x, p20-p80 over the rounds): "
                   + "; ".join(parts) + ".")
    return out


def readme_summary(results_dir: Path) -> str:
    """The README's text between the markers: the latest CPU run and the latest GPU run."""
    found = reports(results_dir)
    lines = []
    for gpu in (False, True):
        latest = _latest(found, gpu)
        if latest is None:
            lines += [f"No {'GPU' if gpu else 'CPU'} run is committed yet.", ""]
            continue
        path, report = latest
        for shape in dict.fromkeys(r["shape"] for r in report["results"]):
            lines += [_run_line(path, report, shape), "",
                      "fwd+bwd time relative to eager at each loss setting (the median over the rounds of the ratio "
                      "taken within each round, p20-p80 in brackets), and the extra peak memory at the first setting:",
                      "", *_pivot(report, shape), "", *_ours_line(report, shape), ""]
        warnings = trust_warnings(report["results"], report.get("rounds"), report["environment"].get("cpu_count"))
        lines += [*warnings, ""] if warnings else []
    lines.append("All committed runs, with the workload's shares and the time split of ours: "
                 "[docs/results.md](docs/results.md).")
    return "\n".join(line if line.startswith("|") else textwrap.fill(
        line, WIDTH, subsequent_indent="  " if line.startswith("- ") else "", break_on_hyphens=False)
        for line in lines)


def section(text: str) -> str:
    """The text between the markers."""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def update(path: Path, body: str) -> str:
    """``path`` with ``body`` between its markers (written back); the new text."""
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{body}\n{END}{tail}"
    path.write_text(new)
    return new


if __name__ == "__main__":
    update(ROOT / "docs" / "results.md", summary(RESULTS))
    update(ROOT / "README.md", readme_summary(RESULTS))
    sys.exit(0)

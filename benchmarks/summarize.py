"""Rewrite the results section of docs/results.md from the JSON files under benchmarks/results/ (never by hand).

    python benchmarks/summarize.py          # updates docs/results.md between the results markers

Per report: the run's machine and command, then per shape and provider the fwd+bwd time, its ratio to the three
LM-head GEMMs and to eager, the extra peak memory and its ratio to eager's (``report.results_table``), and where
``--breakdown`` profiled ours, the split of its time between GEMMs, row pass, segment loss and the rest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import BREAKDOWN_CAPTION, breakdown_table, results_table, scaled_notes, workload_tables  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LEGEND = ("fwd+bwd ms: median over the run's reps, each provider in its own process after its loss and gradients "
          "matched eager's; x 3 GEMM: that time over the three LM-head GEMMs (logits, d_hidden, d_weight) timed in "
          "the same run (the `3 GEMMs` / `4 GEMMs` rows; on the realistic workload `3 GEMMs (all positions)`, and x 3 "
          "GEMM (loss tokens) over the `3 GEMMs (loss tokens)` row: only the tokens the setting's loss needs in a "
          "GEMM); time and memory vs eager: ratios to the eager row of the same shape and setting; extra peak MiB: "
          "peak memory above the inputs, gradients included.")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


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
    reports = sorted(results_dir.glob("*.json"))
    if not reports:
        return "No GPU results are committed yet."
    lines = [LEGEND, ""]
    for path in reports:
        report = json.loads(path.read_text())
        rows = report["results"]
        lines += [heading(report, path), "", *results_table(rows, detail=False), ""]
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


def update(readme: Path, results_dir: Path) -> str:
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{summary(results_dir)}\n{END}{tail}"
    readme.write_text(new)
    return new


if __name__ == "__main__":
    update(ROOT / "docs" / "results.md", ROOT / "benchmarks" / "results")
    sys.exit(0)

"""Rewrite the README's results section from the JSON files under benchmarks/results/ (never by hand).

    python benchmarks/summarize.py          # updates README.md between the results markers
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def summary(results_dir: Path) -> str:
    reports = sorted(results_dir.glob("*.json"))
    if not reports:
        return "No GPU results are committed yet."
    lines = []
    for path in reports:
        report = json.loads(path.read_text())
        env = report["environment"]
        lines += [f"**{env.get('gpu', env['device'])}**, {env['date']}, torch {env['torch']}, triton {env['triton']}, "
                  f"git {str(env['git_sha'])[:8]}, `{env['command']}` ({path.name}, {report['dtype']}):", "",
                  "| shape | provider | fwd+bwd ms | peak MiB | time vs eager | memory vs eager | x 3 GEMM |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["results"]:
            if r["status"] != "ok":
                lines.append(f"| {r['shape']} | {r['provider']} | {r['status']} | | | | |")
                continue
            lines.append(f"| {r['shape']} | {r['provider']} | {r['fwd_bwd_ms']:.1f} | {r['peak_mib']:.0f} "
                         f"| {r.get('time_vs_eager', float('nan')):.2f} | {r.get('memory_vs_eager', float('nan')):.3f} "
                         f"| {r['vs_three_gemm']:.2f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def update(readme: Path, results_dir: Path) -> str:
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{summary(results_dir)}\n{END}{tail}"
    readme.write_text(new)
    return new


if __name__ == "__main__":
    update(ROOT / "README.md", ROOT / "benchmarks" / "results")
    sys.exit(0)

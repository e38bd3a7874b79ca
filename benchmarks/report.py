"""Markdown of the benchmark's rows, shared by run.py (the printed table) and summarize.py (the README's results).

Plain JSON rows in, lines of markdown out; no torch, so summarize.py runs anywhere.
"""

from __future__ import annotations


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def results_table(rows, detail=True) -> list[str]:
    """One line per row: time, its ratios to the three GEMMs and to eager, extra peak memory and its ratio to
    eager's. ``detail`` adds the spread, the first call, the forward alone (when timed) and the check's error."""
    with_fwd = detail and any("fwd_ms" in r for r in rows)
    head = ["shape", "provider", "fwd+bwd ms" + (" (p20-p80)" if detail else ""), "x 3 GEMM", "time vs eager",
            "extra peak MiB", "memory vs eager"]
    if detail:
        head += ["1st call s"] + (["fwd ms"] if with_fwd else []) + ["max rel err", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ok = r["status"] == "ok"
        if ok:
            time_cell = f"{r['fwd_bwd_ms']:.1f}"
            if detail and "fwd_bwd_p20_ms" in r:
                time_cell += f" ({r['fwd_bwd_p20_ms']:.1f}-{r['fwd_bwd_p80_ms']:.1f})"
        else:
            time_cell = "" if detail else r["status"]
        cells = [r["shape"], r["provider"], time_cell, fmt(r.get("vs_three_gemm"), ".2f"),
                 fmt(r.get("time_vs_eager"), ".2f"), fmt(r.get("peak_mib"), ".1f" if detail else ".0f"),
                 fmt(r.get("memory_vs_eager"), ".3f")]
        if detail:
            first = r.get("first_call_ms")
            cells += [fmt(first / 1e3 if first is not None else None, ".2f")]
            cells += [fmt(r.get("fwd_ms"), ".1f")] if with_fwd else []
            cells += [fmt(r.get("max_rel_error"), ".1e"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def breakdown_table(rows) -> list[str]:
    """Where ours spends one profiled fwd+bwd (``run.py --breakdown``); no lines if nothing was profiled."""
    done = [r for r in rows if isinstance(r.get("breakdown"), dict) and "wall_ms" in r["breakdown"]]
    failed = [r for r in rows if isinstance(r.get("breakdown"), dict) and "error" in r["breakdown"]]
    if not done and not failed:
        return []
    lines = []
    if done:
        device = any(r["breakdown"].get("clock") == "device" for r in done)
        lines += ["| shape | provider | wall ms | GEMMs | row pass | segment loss | rest"
                  + (" | GPU idle" if device else "") + " | GEMM calls | 3 GEMMs alone ms |",
                  "|" + "---|" * (9 + device)]
        for r in done:
            b = r["breakdown"]

            def share(key, b=b):
                return f"{b[key]:.1f} ({100 * b[key] / b['wall_ms']:.0f}%)" if b.get(key) is not None else ""
            lines.append(f"| {r['shape']} | {r['provider']} | {b['wall_ms']:.1f} | {share('gemm_ms')} "
                         f"| {share('row_pass_ms')} | {share('segment_loss_ms')} | {share('rest_ms')} "
                         + (f"| {share('idle_ms')} " if device else "")
                         + f"| {b.get('gemm_calls', '')} | {fmt(r.get('three_gemm_ms'), '.1f')} |")
    lines += [f"- {r['shape']} {r['provider']}: breakdown failed: {r['breakdown']['error']}" for r in failed]
    return lines


BREAKDOWN_CAPTION = ("Where ours spends one profiled fwd+bwd (`--breakdown`), ms and share of its wall time: GEMMs "
                     "are aten::mm / addmm / addmm_, row pass and segment loss the backend's two functions, the rest "
                     "everything else (scaling, casts, Python between ops)")

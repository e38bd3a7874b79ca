"""Markdown of the benchmark's rows, shared by run.py (the printed table and the plot) and summarize.py (the README's
results).

Plain JSON rows in, lines of markdown (or a PNG) out; no torch, so summarize.py runs anywhere.
"""

from __future__ import annotations

from rounds import BUSY_LIMIT, SPREAD_LIMIT

GEMM_ROWS = ("3 GEMMs", "4 GEMMs")
GEMM_NOTE = ("the LM head's GEMMs alone at this shape, in the same run: logits h W^T, d_hidden dZ W, d_weight dZ^T h "
             "(the floor of any exact method); 4 adds the logits once more (recomputed in the backward)")
ALL_POSITIONS, LOSS_TOKENS = "3 GEMMs (all positions)", "3 GEMMs (loss tokens)"
REALISTIC_GEMM_ROWS = (ALL_POSITIONS, LOSS_TOKENS)
REALISTIC_GEMM_NOTE = (f"{ALL_POSITIONS}: the three LM-head GEMMs (logits, d_hidden, d_weight) over all B x T "
                       f"positions, in the same run; {LOSS_TOKENS}: the same three over only the tokens the setting's "
                       "loss needs in a GEMM (gemm_tokens: the completion's loss tokens, less, at beta = 0, the tokens "
                       "of items whose advantage is 0 on every token, which carry no gradient)")


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def with_spread(row, key, spec=".2f") -> str:
    """A row's ratio ``key`` and, where the rounds gave them, its 20th-80th percentiles: ``1.23 (1.20-1.27)``."""
    if row.get(key) is None:
        return ""
    if row.get(f"{key}_p20") is None:
        return format(row[key], spec)
    return f"{row[key]:{spec}} ({row[f'{key}_p20']:{spec}}-{row[f'{key}_p80']:{spec}})"


def results_table(rows, detail=True) -> list[str]:
    """One line per row: time, its ratios to the three GEMMs and to eager, extra peak memory and its ratio to
    eager's. ``detail`` adds the spreads over the rounds (20th-80th percentiles of the time and of each ratio taken
    within a round), the first call, the forward alone (when timed) and the check's error.
    Rows of the realistic workload (with a ``setting``) add the setting and the ratio to the three GEMMs over the
    loss tokens only."""
    with_fwd = detail and any("fwd_ms" in r for r in rows)
    with_setting = any("setting" in r for r in rows)
    spread = " (p20-p80)" if detail else ""
    head = ["shape"] + (["setting"] if with_setting else []) + [
        "provider", f"fwd+bwd ms{spread}", f"x 3 GEMM{spread}"]
    head += [f"x 3 GEMM (loss tokens){spread}"] if with_setting else []
    head += [f"time vs eager{spread}", "extra peak MiB", "memory vs eager"]
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
        ratio = with_spread if detail else (lambda row, key: fmt(row.get(key), ".2f"))
        cells = [r["shape"]] + ([r.get("setting", "")] if with_setting else []) + [
            r["provider"], time_cell, ratio(r, "vs_three_gemm")]
        cells += [ratio(r, "vs_three_gemm_loss_tokens")] if with_setting else []
        cells += [ratio(r, "time_vs_eager"), fmt(r.get("peak_mib"), ".1f" if detail else ".0f"),
                  fmt(r.get("memory_vs_eager"), ".3f")]
        if detail:
            first = r.get("first_call_ms")
            cells += [fmt(first / 1e3 if first is not None else None, ".2f")]
            cells += [fmt(r.get("fwd_ms"), ".1f")] if with_fwd else []
            cells += [fmt(r.get("max_rel_error"), ".1e"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def trust_warnings(rows, rounds, cpu_count=None) -> list[str]:
    """Warning lines where the rounds say a ratio is not to be trusted: its 20th-80th percentiles over the rounds
    spread by more than ``SPREAD_LIMIT`` of its median, or other processes took more than ``BUSY_LIMIT`` of the CPUs
    during a shape's rounds (``rounds``: ``run.py``'s record per shape). No lines for a run without rounds."""
    wide = []
    for r in rows:
        spreads = [(r[f"{k}_p80"] - r[f"{k}_p20"]) / r[k] for k in ("vs_three_gemm", "vs_three_gemm_loss_tokens")
                   if r.get(f"{k}_p20") is not None and r[k]]
        if spreads and max(spreads) > SPREAD_LIMIT:
            wide.append((max(spreads), " ".join(x for x in (r["shape"], r.get("setting"), r["provider"]) if x)))
    lines = []
    if wide:
        wide.sort(reverse=True)
        named = ", ".join(f"{where} ({100 * x:.0f}%)" for x, where in wide[:5])
        more = f" and {len(wide) - 5} more rows" if len(wide) > 5 else ""
        lines.append(f"WARNING: the ratio to the 3 GEMMs spreads by more than {100 * SPREAD_LIMIT:.0f}% of its median "
                     f"(p20-p80 over the rounds) at {named}{more}: do not trust those medians to that precision "
                     "(rerun on a quieter machine, or with more --reps)")
    for key, record in (rounds or {}).items():
        share = record.get("other_cpu_share")
        if share is not None and share > BUSY_LIMIT:
            loads = " -> ".join(f"{x:.1f}" for x in (record.get("load_average_before"),
                                                      record.get("load_average_after")) if x is not None)
            cpus = f" on {cpu_count} CPUs" if cpu_count else ""
            lines.append(f"WARNING: other processes took {100 * share:.0f}% of the CPUs' time during the rounds of "
                         f"{key} (load average {loads}{cpus}): the ratios hold only as far as that load was steady, "
                         "and the times are slower than on a quiet machine")
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
        with_setting = any("setting" in r for r in done)
        lines += [("| shape" + (" | setting" if with_setting else "") + " | provider | wall ms | GEMMs | row pass "
                   "| segment loss | rest" + (" | GPU idle" if device else "") + " | GEMM calls | 3 GEMMs alone ms |"),
                  "|" + "---|" * (9 + device + with_setting)]
        for r in done:
            b = r["breakdown"]

            def share(key, b=b):
                return f"{b[key]:.1f} ({100 * b[key] / b['wall_ms']:.0f}%)" if b.get(key) is not None else ""
            where = f"{r['shape']} | {r['setting']}" if with_setting else r["shape"]
            lines.append(f"| {where} | {r['provider']} | {b['wall_ms']:.1f} | {share('gemm_ms')} "
                         f"| {share('row_pass_ms')} | {share('segment_loss_ms')} | {share('rest_ms')} "
                         + (f"| {share('idle_ms')} " if device else "")
                         + f"| {b.get('gemm_calls', '')} | {fmt(r.get('three_gemm_ms'), '.1f')} |")
    lines += [f"- {r['shape']} {r.get('setting', '')} {r['provider']}: breakdown failed: {r['breakdown']['error']}"
              for r in failed]
    return lines


BREAKDOWN_CAPTION = ("Where ours spends one profiled fwd+bwd (`--breakdown`), ms and share of its wall time: GEMMs "
                     "are aten::mm / addmm / addmm_, row pass and segment loss the backend's two functions, the rest "
                     "everything else (scaling, casts, Python between ops)")


def pct(x):
    return "" if x is None else f"{100 * x:.1f}%"


def workload_tables(workloads) -> list[str]:
    """The realistic workload of each shape (``run.py``'s ``workloads``): its layout and shares, then per setting the
    tokens that enter a GEMM and how much PPO clipping does. No lines without a realistic workload."""
    if not workloads:
        return []
    caption = ("Workload (realistic): padding share = positions outside completion_mask / all B x T positions; "
               "zero-advantage share = loss tokens whose advantage is exactly 0 / loss tokens; gradient share at "
               "beta = 0 = loss tokens of items with a non-zero advantage / all positions:")
    head = ("| shape | prompts x G | rows x T | positions | completion tokens | padding share | zero-advantage share "
            "| gradient share (beta 0) | ranks with advantage 0 | hits / list | items / list | early stop | overflow |")
    lines = [caption, "", head, "|" + "---|" * 13]
    for key, w in workloads.items():
        if "positions" not in w:
            lines.append(f"| {key} | {w.get('error', 'no statistics')} |" + " |" * 11)
            continue
        lines.append(f"| {key} | {w['prompts']} x {w['generations']} | {w['rows']} x {w['row_length']} "
                     f"| {w['positions']} | {w['completion_tokens']} | {pct(w['padding_share'])} "
                     f"| {pct(w['zero_advantage_share'])} | {pct(w['gradient_share_beta0'])} "
                     f"| {pct(w['zero_advantage_rank_share'])} | {w['hits_per_list']:.2f} "
                     f"| {w['items_emitted_mean']:.1f} | {pct(w['early_stop_share'])} | {pct(w['overflow_share'])} |")
    settings = [(key, name, st, w) for key, w in workloads.items() for name, st in (w.get("settings") or {}).items()]
    if settings:
        caption = ("Per setting: GEMM tokens = tokens that must enter a GEMM (the `3 GEMMs (loss tokens)` row); "
                   "clip fraction = loss items whose ratio lies outside [1 - eps_low, 1 + eps_high]; clip ratio "
                   "region = the loss's token share where the clip binds (sign of the advantage included); of items "
                   "with advantage: the clip fraction among items whose advantage is not 0 everywhere:")
        head = ("| shape | setting | GEMM tokens | of positions | clip fraction | of items with advantage "
                "| clip ratio region | ratio mean | kl |")
        lines += ["", caption, "", head, "|" + "---|" * 9]
        for key, name, st, w in settings:
            tokens = st.get("gemm_tokens")
            share = tokens / w["positions"] if tokens is not None and w.get("positions") else None
            lines.append(f"| {key} | {name} | {fmt(tokens, 'd')} | {pct(share)} | {pct(st.get('clip_fraction'))} "
                         f"| {pct(st.get('clip_fraction_with_advantage'))} "
                         f"| {pct(st.get('clip_ratio_region'))} | {fmt(st.get('ratio_mean'), '.4f')} "
                         f"| {fmt(st.get('kl'), '.2e')} |")
    return lines


def scaled_notes(rows) -> list[str]:
    """One note per scaled-down shape: the real head it stands for."""
    return sorted({f"{r['shape']}: scaled down, stands for {r['scaled_from']}" for r in rows if r.get("scaled_from")})


def rounds_line(env, rounds) -> str:
    """How the rounds went: per shape, their number and seconds, the other processes' share of the CPUs and the
    load average before and after."""
    parts = []
    for key, record in (rounds or {}).items():
        share = record.get("other_cpu_share")
        loads = " -> ".join(f"{x:.2f}" for x in (record.get("load_average_before"), record.get("load_average_after"))
                            if x is not None)
        parts.append(f"{key}: {record['rounds']} rounds in {record['seconds']:.0f} s"
                     + (f", other processes {100 * share:.0f}% of the CPUs" if share is not None else "")
                     + (f", load average {loads} on {env.get('cpu_count')} CPUs" if loads else ""))
    return "Rounds: " + "; ".join(parts) if parts else ""


def markdown(rows, segmentation, env, workloads, kind, provider_notes, setting_notes, rounds=None) -> str:
    """What run.py prints: the device, the results table, warnings where the rounds say a ratio is not to be
    trusted, how the rounds went, the table's notes (shapes, providers and GEMM rows as they appear, the settings),
    the workload's shares, the breakdown of ours and the segmentation's speed-up."""
    lines = [f"Device: {env.get('gpu', env['cpu'])} ({env['device']}, {env['cpu_threads']} threads), "
             f"torch {env['torch']}, {env['date']}, workload {kind}", "", *results_table(rows)]
    warnings = trust_warnings(rows, rounds, env.get("cpu_count"))
    lines += [""] + warnings if warnings else []
    lines += ["", rounds_line(env, rounds)] if rounds else []
    notes = scaled_notes(rows)
    for name in dict.fromkeys(r["provider"] for r in rows):
        if name in provider_notes:
            notes.append(f"{name}: {provider_notes[name]}")
        elif name == GEMM_ROWS[0]:
            notes.append(f"{' and '.join(GEMM_ROWS)}: {GEMM_NOTE}")
        elif name == ALL_POSITIONS:
            notes.append(REALISTIC_GEMM_NOTE)
    lines += [""] + [f"- {n}" for n in notes + list(setting_notes)]
    if workloads:
        lines += ["", *workload_tables(workloads)]
    split = breakdown_table(rows)
    if split:
        lines += ["", BREAKDOWN_CAPTION + ":", "", *split]
    if segmentation:
        s = segmentation
        lines += ["", f"Segmentation of {s['rows']} rows x {s['tokens_per_row']} tokens: per-token decode loop "
                      f"{s['loop_ms']:.0f} ms, vectorised {s['vectorised_ms']:.2f} ms ({s['speedup']:.0f}x)"]
    return "\n".join(lines)


def plot(rows, path, labels=None):
    """Bars of fwd+bwd time, with the 20th-80th percentiles over the rounds as error bars, and of extra peak memory,
    per shape (and setting) and provider; ours hatched and named "(ours)" (``labels``: provider -> name), the legend
    below the axes. None without matplotlib or without a row that ran."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [dict(r, shape=f"{r['shape']} {r['setting']}" if r.get("setting") else r["shape"])
          for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    labels = labels or {}
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    colours = plt.get_cmap("tab20" if len(providers) > 10 else "tab10")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        mine = [next((r for r in ok if r["shape"] == s and r["provider"] == p), {}) for s in shapes]
        x = [j + i * width for j in range(len(shapes))]
        style = dict(color=colours(i), hatch="//" if any(r.get("ours") for r in mine) else None, edgecolor="white")
        times = [r.get("fwd_bwd_ms") or 0 for r in mine]
        low = [t - (r.get("fwd_bwd_p20_ms") or t) for t, r in zip(times, mine)]
        high = [(r.get("fwd_bwd_p80_ms") or t) - t for t, r in zip(times, mine)]
        axes[0].bar(x, times, width, yerr=[low, high], capsize=2, error_kw=dict(lw=0.8), label=labels.get(p, p),
                    **style)
        axes[1].bar(x, [r.get("peak_mib") or 0 for r in mine], width, **style)
    for ax, title in zip(axes, ("fwd+bwd time (ms; median, p20-p80 over the rounds)",
                                "peak memory above inputs (MiB)")):
        ax.set_title(title, fontsize=10)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=15, fontsize=8)
    rows_of_legend = -(-len(providers) // 4)
    fig.legend(loc="lower center", ncol=min(4, len(providers)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * rows_of_legend + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

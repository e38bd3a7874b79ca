"""The parent's side of a run: for every shape, the GEMM floors, then per setting the eager yardstick and each
provider, each in its own process (``child.py``); the rows that come back, with their ratios to the GEMM floors and
to eager of the same shape and setting."""

from __future__ import annotations

import tempfile

from batches import DENSE, Work
from child import in_child
from providers import PROVIDERS
from report import ALL_POSITIONS, GEMM_ROWS, LOSS_TOKENS, REALISTIC_GEMM_ROWS


def _gemm_rows(shape, setting, gemm, work) -> list[dict]:
    """The GEMM floor's rows of one shape (and setting, on the realistic workload)."""
    fields = shape.fields(setting if work.realistic else None)
    if "error" in gemm:
        names = REALISTIC_GEMM_ROWS if work.realistic else GEMM_ROWS
        return [dict(provider=g, **fields, status=f"error: {gemm['error']}") for g in names]

    def row(name, timed, key="three"):
        return dict(provider=name, **fields, status="ok", fwd_bwd_ms=1e3 * timed[key], gemm_tokens=timed["tokens"],
                    gemm_ms={part: 1e3 * timed[part] for part in ("logits", "d_hidden", "d_weight")})
    if not work.realistic:
        return [row(name, gemm, key) for name, key in zip(GEMM_ROWS, ("three", "four"))]
    return [row(ALL_POSITIONS, gemm["all"]), row(LOSS_TOKENS, gemm["loss_tokens"][setting])]


def _attach_gemms(rows, setting, gemm, work):
    """Each row's GEMM floors and its time's ratios to them."""
    if "error" in gemm:
        return
    floor = gemm["all"] if work.realistic else gemm
    for row in rows:
        row["three_gemm_ms"], row["four_gemm_ms"] = 1e3 * floor["three"], 1e3 * floor["four"]
        if work.realistic:
            row["three_gemm_loss_tokens_ms"] = 1e3 * gemm["loss_tokens"][setting]["three"]
            row.setdefault("gemm_tokens", gemm["gemm_tokens"][setting])  # a GEMM row keeps its own count
            row.setdefault("positions", gemm["layout"]["positions"])
        if row["status"] == "ok":
            row["vs_three_gemm"] = row["fwd_bwd_ms"] / row["three_gemm_ms"]
            row["vs_four_gemm"] = row["fwd_bwd_ms"] / row["four_gemm_ms"]
            if work.realistic:
                row["vs_three_gemm_loss_tokens"] = row["fwd_bwd_ms"] / row["three_gemm_loss_tokens_ms"]


def bench_shape(shape, names, dtype, device, reps, progress, options=(), timeout=None, work: Work = DENSE):
    """Rows of one shape: the GEMMs first, then per setting the yardstick and each provider in its own process.
    Returns the rows and, on the realistic workload, the workload's statistics (shares, GEMM tokens, clipping)."""
    rows, runnable = [], []
    setting_field = (lambda s: s) if work.realistic else (lambda s: None)
    for name in names:
        reason = PROVIDERS[name].refuse(device, dtype)
        if reason is None:
            runnable.append(name)
        else:
            rows += [dict(provider=name, **shape.fields(setting_field(s)), status=f"skipped: {reason}")
                     for s in work.setting_names()]
            progress(f"{shape.key} {name} (skipped)")
    progress(f"{shape.key} GEMMs")
    gemm = in_child("gemm", shape, dtype, device, reps, ".", work.options(), timeout)
    info = None
    if work.realistic:
        info = dict(gemm.get("layout") or {}, gemm_tokens=gemm.get("gemm_tokens"), settings={})
        if "error" in gemm:
            info["error"] = gemm["error"]
    token_level = ["--token-level"] if any(PROVIDERS[n].token_level for n in runnable) else []
    for setting in work.setting_names():
        here = f"{shape.key} {setting}" if work.realistic else shape.key
        extra = work.options() + (["--setting", setting] if work.realistic else [])
        setting_rows = [r for r in rows if r.get("setting") == setting_field(setting)]
        with tempfile.TemporaryDirectory(prefix="rankgrpo-bench-") as ref_dir:
            progress(f"{here} eager yardstick")
            ref = in_child("reference", shape, dtype, device, reps, ref_dir, token_level + extra,
                           timeout) if runnable else {}
            if info is not None and "setting_stats" in ref:
                info["settings"][setting] = dict(ref["setting_stats"], gemm_tokens=(gemm.get("gemm_tokens")
                                                                                   or {}).get(setting))
            setting_rows += _gemm_rows(shape, setting, gemm, work)
            for name in runnable:
                progress(f"{here} {name}")
                if "error" in ref:
                    setting_rows.append(dict(provider=name, **shape.fields(setting_field(setting)),
                                             status=f"error: eager yardstick: {ref['error']}"))
                    continue
                row = in_child(name, shape, dtype, device, reps, ref_dir, list(options) + extra, timeout)
                setting_rows.append(row if "error" not in row else
                                    dict(provider=name, **shape.fields(setting_field(setting)),
                                         status=f"error: {row['error']}"))
        _attach_gemms(setting_rows, setting, gemm, work)
        if work.realistic:
            rows = [r for r in rows if r.get("setting") != setting] + setting_rows
        else:
            rows = setting_rows
    return rows, info


def bench_loss(shapes, names, dtype, device, reps, progress, options=(), timeout=None, work: Work = DENSE):
    """Rows of every shape (and setting), with their ratios to eager of the same shape and setting; and the
    realistic workload's statistics per shape."""
    rows, workloads = [], {}
    for shape in shapes:
        shape_rows, info = bench_shape(shape, names, dtype, device, reps, progress, options, timeout, work)
        rows += shape_rows
        if info is not None:
            workloads[shape.key] = info
    for row in rows:  # ratios to eager, measured in the same run
        base = next((r for r in rows if r["shape"] == row["shape"] and r.get("setting") == row.get("setting")
                     and r["provider"] == "eager" and r["status"] == "ok"), None)
        if base and row["status"] == "ok":
            row["time_vs_eager"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            if row.get("peak_mib") is not None:
                row["memory_vs_eager"] = row["peak_mib"] / base["peak_mib"]
    return rows, workloads

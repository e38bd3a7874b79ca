"""The controller of a run: per shape, every worker of it (``child.py``: the yardstick, the GEMM floors, each
provider) started at once, set up one at a time while the others wait, then timed together in interleaved rounds
(``rounds.py``); the rows that come back, with their ratios to the GEMM floors and to eager of the same setting taken
within each round."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from batches import DENSE, Work
from measure import MALLOC_ENV
from providers import PROVIDERS
from report import ALL_POSITIONS, GEMM_ROWS, LOSS_TOKENS
from rounds import Lane, Process, Rounds, WorkerFailed, load_average, per_round, summary

RUN_PY = Path(__file__).resolve().parent / "run.py"
# Each ratio of a row: its key and the floor (or eager) it divides by, round by round.
RATIOS = ("vs_three_gemm", "vs_four_gemm", "vs_three_gemm_loss_tokens", "time_vs_eager")


def _time_fields(series) -> dict:
    stats = summary(series)
    return dict(fwd_bwd_ms=1e3 * stats["median"], fwd_bwd_p20_ms=1e3 * stats["p20"], fwd_bwd_p80_ms=1e3 * stats["p80"],
                fwd_bwd_runs_ms=[1e3 * t for t in series])


def _ratio_fields(series, bases: dict) -> dict:
    """Each ratio's median and 20th/80th percentiles over the rounds (a ratio without its base is left out)."""
    out = {}
    for key, base in bases.items():
        ratios = per_round(series, base)
        if ratios:
            stats = summary(ratios)
            out.update({key: stats["median"], f"{key}_p20": stats["p20"], f"{key}_p80": stats["p80"]})
    return out


@dataclass
class Sweep:
    """One run's settings: the providers, dtype, device and workload, rounds (``reps``), what a provider measures
    besides its time, the seconds one request to a worker may take, and where the progress goes."""

    names: list
    dtype: torch.dtype
    device: torch.device
    reps: int
    work: Work = DENSE
    breakdown: bool = False
    fwd: bool = False
    timeout: float | None = None
    progress: Callable[[str], None] = field(default=lambda text: None)

    def run(self, shapes, finished=lambda rows, workloads, rounds: None) -> tuple[list, dict, dict]:
        """Rows of every shape (and setting); the realistic workload's statistics and the rounds' record per shape.
        ``finished`` gets the three so far after each shape (the caller writes them: a cut run keeps its rows)."""
        rows, workloads, rounds = [], {}, {}
        for shape in shapes:
            shape_rows, info, record = self.shape(shape)
            rows += shape_rows
            rounds[shape.key] = record
            if info is not None:
                workloads[shape.key] = info
            finished(rows, workloads, rounds)
        return rows, workloads, rounds

    # --- one shape ---------------------------------------------------------------------------------------------------

    def _fields(self, shape, setting) -> dict:
        return shape.fields(setting if self.work.realistic else None)

    def _start(self, name, shape, ref_dir, token_level) -> Process:
        python = PROVIDERS[name].python() if name in PROVIDERS else sys.executable
        cmd = [python, str(RUN_PY), "--child", name, "--shapes", shape.spec, "--dtype",
               str(self.dtype).split(".")[-1], "--device", str(self.device), "--reps", str(self.reps),
               "--ref-dir", str(ref_dir), *self.work.options(),
               "--breakdown" if self.breakdown else "--no-breakdown"]
        cmd += (["--fwd"] if self.fwd else []) + (["--token-level"] if token_level else [])
        env = dict(os.environ, **(MALLOC_ENV if self.device.type == "cpu" else {}))
        return Process(cmd, env, self.timeout)

    def _setup(self, shape, workers) -> dict:
        """Each worker's ``setup`` reply in turn (``{"error": ...}`` for one that failed); the yardstick's worker is
        closed once it saved them, and no provider is set up without them."""
        replies = {}
        for i, (name, worker) in enumerate(workers.items()):
            self.progress(f"{shape.key}: setting up {name} ({i + 1}/{len(workers)}; the rounds follow)")
            if name in PROVIDERS and "error" in replies.get("reference", {}):
                replies[name] = dict(error=f"eager yardstick: {replies['reference']['error']}")
                continue
            try:
                replies[name] = worker.ask("setup")
            except WorkerFailed as exc:
                replies[name] = dict(error=str(exc))
            if name == "reference":
                worker.close()
        return replies

    def shape(self, shape) -> tuple[list, dict | None, dict]:
        """Rows of one shape, its realistic workload's statistics (None on the dense one), and the rounds' record."""
        settings = self.work.setting_names()
        runnable, skipped = [], {s: [] for s in settings}
        for name in self.names:
            reason = PROVIDERS[name].refuse(self.device, self.dtype)
            if reason is None:
                runnable.append(name)
            else:
                for s in settings:
                    skipped[s].append(dict(provider=name, ours=PROVIDERS[name].ours,
                                           **self._fields(shape, s), status=f"skipped: {reason}"))
                self.progress(f"{shape.key}: {name} skipped")
        token_level = any(PROVIDERS[n].token_level for n in runnable)
        with tempfile.TemporaryDirectory(prefix="rankgrpo-bench-") as ref_dir, contextlib.ExitStack() as stack:
            workers = {}
            for name in (["reference"] if runnable else []) + ["gemm"] + runnable:  # all start (import) at once
                workers[name] = self._start(name, shape, ref_dir, token_level)
                stack.callback(workers[name].close)
            replies = self._setup(shape, workers)
            workers.pop("reference", None)
            lanes = self._lanes(replies, settings)
            load_before = load_average()
            timed = Rounds([lane for group in lanes.values() for lane in group.values()], self.reps).run(
                workers, lambda text: self.progress(f"{shape.key} {text}"))
        record = dict(rounds=self.reps, seconds=round(timed.seconds, 1), other_cpu_share=timed.other_cpu_share,
                      load_average_before=load_before,
                      load_average_after=load_average(),
                      failed=timed.failed or None)
        rows = []
        for s in settings:
            rows += skipped[s] + self._rows(shape, s, replies, lanes[s], timed, runnable)
        return rows, self._workload(replies) if self.work.realistic else None, record

    def _lanes(self, replies, settings) -> dict:
        """Per setting, its lanes by row name: the floor(s) and every provider that passed its check there."""
        floor = replies["gemm"]
        out = {}
        for s in settings:
            here = f"{s} " if self.work.realistic else ""
            lanes = {}
            if "error" not in floor:
                counts = ({ALL_POSITIONS: floor["positions"], LOSS_TOKENS: floor["gemm_tokens"][s]}
                          if self.work.realistic else {GEMM_ROWS[0]: floor["positions"]})
                lanes.update({name: Lane("gemm", str(n), s, f"{here}{name}") for name, n in counts.items()})
            for name, reply in replies.items():
                if name in PROVIDERS and reply.get("rows", {}).get(s, {}).get("status") == "ok":
                    lanes[name] = Lane(name, s, s, f"{here}{name}")
            out[s] = lanes
        return out

    def _rows(self, shape, setting, replies, lanes, timed, runnable) -> list[dict]:
        """The rows of one setting: the floors', then each provider's, with times and ratios from the rounds."""
        floor_error = replies["gemm"].get("error") or timed.failed.get("gemm")
        main = lanes.get(ALL_POSITIONS if self.work.realistic else GEMM_ROWS[0])
        three = None if floor_error else timed.seconds_of(main)
        four = None if floor_error else [t + x for t, x in zip(three, timed.seconds_of(main, "logits"))]
        loss = None if floor_error or not self.work.realistic else timed.seconds_of(lanes[LOSS_TOKENS])
        eager = timed.seconds_of(lanes["eager"]) if "eager" in lanes else None
        bases = {k: v for k, v in zip(RATIOS, (three, four, loss, eager)) if v is not None}
        floors = ({ALL_POSITIONS: (main, three), LOSS_TOKENS: (lanes.get(LOSS_TOKENS), loss)} if self.work.realistic
                  else {GEMM_ROWS[0]: (main, three), GEMM_ROWS[1]: (main, four)})
        eager_peak = replies.get("eager", {}).get("rows", {}).get(setting, {}).get("peak_mib")
        rows = []
        for name, (lane, series) in floors.items():
            row = dict(provider=name, **self._fields(shape, setting))
            if floor_error:
                row["status"] = f"error: {floor_error}"
            else:
                row.update(status="ok", gemm_tokens=int(lane.job), gemm_ms={
                    part: 1e3 * statistics.median(timed.seconds_of(lane, part))
                    for part in ("logits", "d_hidden", "d_weight")})
            rows.append(self._measured(row, series, bases, eager_peak, replies["gemm"]))
        for name in runnable:
            row = replies[name].get("rows", {}).get(setting) or dict(
                provider=name, ours=PROVIDERS[name].ours, **self._fields(shape, setting),
                status=f"error: {replies[name].get('error')}")
            if name in timed.failed and row["status"] == "ok":  # it died in the rounds
                row = dict(row, status=f"error: {timed.failed[name]}")
            series = timed.seconds_of(lanes[name]) if name in lanes else None
            rows.append(self._measured(row, series, bases, eager_peak, replies["gemm"]))
        return rows

    def _measured(self, row, series, bases, eager_peak, floor) -> dict:
        """``row`` with its times and ratios over the rounds (if it ran), its memory against eager's, and the
        floors' medians; on the realistic workload also the setting's GEMM tokens and the positions."""
        if row["status"] == "ok" and series is not None:
            row.update(_time_fields(series), **_ratio_fields(series, bases))
            if row["provider"] in PROVIDERS:
                row["tokens_per_s"] = row["positions"] / (row["fwd_bwd_ms"] / 1e3)
            if row.get("peak_mib") is not None and eager_peak:
                row["memory_vs_eager"] = row["peak_mib"] / eager_peak
        for key, base in (("three_gemm_ms", "vs_three_gemm"), ("four_gemm_ms", "vs_four_gemm"),
                          ("three_gemm_loss_tokens_ms", "vs_three_gemm_loss_tokens")):
            if base in bases:
                row[key] = 1e3 * statistics.median(bases[base])
        if self.work.realistic and "error" not in floor:
            row.setdefault("gemm_tokens", floor["gemm_tokens"][row["setting"]])  # a GEMM row keeps its own count
            row.setdefault("positions", floor["positions"])
        return row

    def _workload(self, replies) -> dict:
        """The realistic workload's statistics: its layout and shares, and per setting its GEMM tokens and clipping."""
        floor, ref = replies["gemm"], replies.get("reference", {})
        info = dict(floor.get("layout") or {}, gemm_tokens=floor.get("gemm_tokens"), settings={})
        for s, stats in ref.get("settings", {}).items():
            info["settings"][s] = dict(stats, gemm_tokens=(floor.get("gemm_tokens") or {}).get(s))
        if "error" in floor:
            info["error"] = floor["error"]
        return info

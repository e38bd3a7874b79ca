"""Interleaved rounds: every timed thing measured once per round, all of them in the same stretch of time, so that
whatever else the machine does lands on all of them alike and cancels in their ratios.

A *lane* is one thing timed: a job (``Lane.job``) of one live *worker* (``Lane.worker``), a process that times what
it is asked, one time per visit, and blocks on its pipe in between. A round visits every lane once, one lane at a time:
the groups (``Lane.group``: the lanes whose ratios are taken to each other, e.g. the providers and GEMM floors of one
loss setting) one after the other, in an order rotated from round to round, and the lanes of a group in an order
shuffled per round (seeded). A ratio of two lanes is taken within each round (``per_round``), and summarised over
the rounds by its median and 20th/80th percentiles (``summary``); ``SPREAD_LIMIT`` says when that spread is too wide to
trust the median, ``BUSY_LIMIT`` when other processes took too much of the CPUs during the rounds (``other_cpu_share``).

Both ends of the pipe are here: ``Process`` (the controller's side: JSON commands on the worker's stdin, one JSON
reply line each on its stdout) and ``serve`` (the worker's side). No torch, so the scheduler is tested with fake
workers in a second.
"""

from __future__ import annotations

import json
import os
import random
import select
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

SPREAD_LIMIT = 0.10  # (p80 - p20) / median of a per-round ratio above which the report warns
BUSY_LIMIT = 0.25  # share of all CPUs' time other processes took during the rounds above which the report warns


# --- statistics -----------------------------------------------------------------------------------------------------

def percentile(values, q):
    """The nearest-rank ``q`` quantile of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values) -> dict:
    """Median and 20th/80th percentiles."""
    return dict(median=statistics.median(values), p20=percentile(values, 0.2), p80=percentile(values, 0.8))


# --- the schedule ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lane:
    """One thing timed once per round: ``job`` of worker ``worker``; ``label`` names it in the progress line."""

    worker: str
    job: str
    group: str
    label: str = ""


class Worker(Protocol):
    def visit(self, job: str) -> dict:
        """One timed run of ``job``: a dict with its ``seconds`` (and whatever else the worker measured)."""


class WorkerFailed(Exception):
    """A worker died, timed out or answered with an error; the message says which and why."""


@dataclass
class Timed:
    """What the rounds measured: each surviving lane's replies, one per round in round order; the workers that failed
    (their lanes dropped); the share of the CPUs other processes took meanwhile (None where it cannot be read)."""

    visits: dict = field(default_factory=dict)  # Lane -> [reply, ...]
    failed: dict = field(default_factory=dict)  # worker -> why
    other_cpu_share: float | None = None
    seconds: float = 0.0

    def seconds_of(self, lane: Lane, key: str = "seconds") -> list[float] | None:
        replies = self.visits.get(lane)
        return None if replies is None else [r[key] for r in replies]



def per_round(times, base) -> list[float] | None:
    """Round by round, ``times`` over ``base`` (two series from ``Timed.seconds_of``); None if either is missing."""
    if times is None or base is None:
        return None
    return [t / b for t, b in zip(times, base)]


@dataclass
class Rounds:
    """``rounds`` rounds over ``lanes`` (module docstring); ``seed`` fixes the shuffles."""

    lanes: list
    rounds: int
    seed: int = 0

    def orders(self) -> list[list[Lane]]:
        """The visiting order of every round: the groups rotated by one each round, each group's lanes shuffled."""
        groups = list(dict.fromkeys(lane.group for lane in self.lanes))
        rng = random.Random(self.seed)
        out = []
        for r in range(self.rounds):
            order = []
            for group in groups[r % len(groups):] + groups[: r % len(groups)]:
                members = [lane for lane in self.lanes if lane.group == group]
                rng.shuffle(members)
                order += members
            out.append(order)
        return out

    def run(self, workers: Mapping[str, Worker], progress: Callable[[str], None] = lambda text: None) -> Timed:
        """Visit every lane once per round, one at a time; a worker that fails loses its lanes and the rest go on.
        ``progress`` hears the round, the lane's label and the time left, estimated from the visits so far."""
        timed = Timed(visits={lane: [] for lane in self.lanes})
        orders = self.orders()
        took: dict = {}  # lane -> wall seconds of its visits, for the estimate
        meter = CpuMeter([getattr(w, "pid", None) for w in workers.values()])
        started = time.perf_counter()
        for r, order in enumerate(orders):
            for i, lane in enumerate(order):
                if lane.worker in timed.failed:
                    continue
                left = _seconds_left(took, [x for x in order[i:] + sum(orders[r + 1:], [])
                                            if x.worker not in timed.failed])
                progress(f"round {r + 1}/{self.rounds}: {lane.label or lane.job}"
                         + (f", about {left:.0f} s left" if left is not None else ""))
                t0 = time.perf_counter()
                try:
                    timed.visits[lane].append(workers[lane.worker].visit(lane.job))
                except WorkerFailed as exc:
                    timed.failed[lane.worker] = str(exc)
                took.setdefault(lane, []).append(time.perf_counter() - t0)
        timed.seconds = time.perf_counter() - started
        timed.other_cpu_share = meter.other_share()
        timed.visits = {lane: v for lane, v in timed.visits.items() if lane.worker not in timed.failed}
        return timed


def _seconds_left(took, remaining) -> float | None:
    """The remaining visits' time: each lane's mean so far, a lane not yet visited at the mean of all visits so far."""
    if not took:
        return None
    everything = [t for times in took.values() for t in times]
    mean = sum(everything) / len(everything)
    return sum(statistics.fmean(took[lane]) if lane in took else mean for lane in remaining)


# --- how busy the machine was ---------------------------------------------------------------------------------------

def load_average() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


class CpuMeter:
    """The share of all CPUs' time that processes other than this one and ``pids`` took from now until
    ``other_share()`` (Linux: /proc/stat against /proc/PID/stat); None elsewhere."""

    def __init__(self, pids):
        self.pids = [os.getpid(), *(p for p in pids if p is not None)]
        self.start = self._read()

    def _read(self):
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        ours = 0
        for pid in self.pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # gone (a worker that failed): its time counts as others'
                continue
            ours += sum(int(x) for x in stat.rsplit(")", 1)[1].split()[11:13])  # utime, stime
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle, iowait
        total = sum(fields[:8])  # user .. steal (guest time is already in user)
        return total, total - idle, ours

    def other_share(self) -> float | None:
        end = self._read()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        total, busy, ours = (b - a for a, b in zip(self.start, end))
        return max(0.0, (busy - ours) / total)


# --- the pipe -------------------------------------------------------------------------------------------------------

class Process:
    """A live worker process, the controller's side: ``ask`` writes one JSON command line to its stdin and reads its
    one JSON reply line from its stdout (within ``timeout`` seconds); its stderr goes to a file whose end explains a
    failure. ``visit`` is ``ask("visit", job=...)``."""

    def __init__(self, cmd, env=None, timeout=None):
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self._proc.pid

    def ask(self, command: str, **fields) -> dict:
        try:
            self._proc.stdin.write((json.dumps(dict(fields, command=command)) + "\n").encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise WorkerFailed(self._died()) from None
        reply = json.loads(self._line())
        if "error" in reply:
            raise WorkerFailed(reply["error"])
        return reply

    def visit(self, job: str) -> dict:
        return self.ask("visit", job=job)

    def _line(self) -> bytes:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                self._proc.kill()
                raise WorkerFailed(f"timed out after {self.timeout:.0f} s")
            if select.select([fd], [], [], wait)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise WorkerFailed(self._died())
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _died(self) -> str:
        code = self._proc.wait()
        self._stderr.seek(0)
        tail = [line for line in self._stderr.read().decode(errors="replace").splitlines() if line.strip()][-3:]
        return f"exit {code}: " + " | ".join(tail)[-400:]

    def close(self):
        """End the worker (EOF on its stdin), killing it if it has not gone within 10 s."""
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


def serve(handlers: Mapping[str, Callable[..., dict]]):
    """The worker's side, until its stdin closes: each command line ``{"command": name, ...}`` calls
    ``handlers[name](**rest)`` and its dict goes back as one line; an exception goes back as ``{"error": ...}`` (its
    traceback to stderr). Anything else the process prints, from Python or C, goes to stderr, so stdout carries the
    replies alone. Between commands the worker blocks on the read: idle while the others are timed."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = handlers[request.pop("command")](**request)
        except Exception as exc:  # noqa: BLE001  (the controller reports it and goes on without this worker)
            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        replies.write(json.dumps(reply) + "\n")

"""The benchmark's round scheduler (``benchmarks/rounds.py``) with fake workers: every lane once per round in a
shuffled order, a slowdown of the whole machine cancelling in the ratios taken within a round, a provider slow only
in some rounds showing in its spread and firing the report's warning, a failing worker dropped, and real worker
processes over pipes, idle between their visits. Also what the run promises its user: a clear error for a device
that is not there, results out of git by default, the quick look's size, and the README's results section
regenerated from the committed JSON."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import rounds  # noqa: E402
from rounds import Lane, Rounds, WorkerFailed  # noqa: E402


class FakeWorker:
    """Times nothing: its time for a job is ``base[job]`` times the machine's slowdown in the current round, times
    ``slow`` in the rounds listed in ``slow_rounds``; the round is the number of its earlier visits of that job."""

    def __init__(self, base, machine=None, slow=1.0, slow_rounds=(), fail_at=None):
        self.base, self.machine, self.slow, self.slow_rounds = base, machine or {}, slow, slow_rounds
        self.fail_at, self.seen = fail_at, {}

    def visit(self, job):
        r = self.seen.get(job, 0)
        self.seen[job] = r + 1
        if r == self.fail_at:
            raise WorkerFailed("exit -9: killed")
        factor = self.machine.get(r, 1.0) * (self.slow if r in self.slow_rounds else 1.0)
        return dict(seconds=self.base[job] * factor)


def _lanes():
    """Two settings, each with a floor and two providers."""
    return [Lane(worker, job=s if worker != "floor" else f"floor-{s}", group=s, label=f"{s} {worker}")
            for s in ("a", "b") for worker in ("floor", "ours", "peer")]


def _lane(lanes, group, worker):
    return next(lane for lane in lanes if lane.group == group and lane.worker == worker)


def test_every_round_visits_each_lane_once_a_group_at_a_time_in_a_changing_order():
    lanes = _lanes()
    orders = Rounds(lanes, 8, seed=3).orders()
    assert len(orders) == 8
    for order in orders:
        assert sorted(order, key=lanes.index) == lanes  # each lane exactly once
        groups = [lane.group for lane in order]
        assert groups in (["a"] * 3 + ["b"] * 3, ["b"] * 3 + ["a"] * 3)  # a group's lanes together
    assert {order[0].group for order in orders} == {"a", "b"}  # the groups take turns going first
    assert len({tuple(order) for order in orders}) > 2  # shuffled within a group
    assert Rounds(lanes, 8, seed=3).orders() == orders  # seeded


def _workers(machine=None, **peer):
    base = {"a": 2.0, "b": 3.0, "floor-a": 1.0, "floor-b": 1.0}
    return dict(floor=FakeWorker(base, machine), ours=FakeWorker(base, machine),
                peer=FakeWorker({k: 2 * v for k, v in base.items()}, machine, **peer))


def _row(timed, lanes, group, worker):
    """A report row of one lane, as the sweep builds it: the time and the ratio to the floor, over the rounds."""
    times = timed.seconds_of(_lane(lanes, group, worker))
    ratios = rounds.per_round(times, timed.seconds_of(_lane(lanes, group, "floor")))
    stats, ratio = rounds.summary(times), rounds.summary(ratios)
    return dict(shape="s", setting=group, provider=worker, status="ok", fwd_bwd_ms=1e3 * stats["median"],
                fwd_bwd_p20_ms=1e3 * stats["p20"], fwd_bwd_p80_ms=1e3 * stats["p80"], vs_three_gemm=ratio["median"],
                vs_three_gemm_p20=ratio["p20"], vs_three_gemm_p80=ratio["p80"])


def test_a_slowdown_of_the_whole_machine_in_some_rounds_cancels_in_the_ratios():
    lanes = _lanes()
    machine = {1: 3.0, 4: 2.0, 5: 4.0}  # every worker slower in these rounds (another job on the machine)
    timed = Rounds(lanes, 10).run(_workers(machine))
    assert not timed.failed and all(len(v) == 10 for v in timed.visits.values())
    rows = [_row(timed, lanes, g, w) for g in ("a", "b") for w in ("ours", "peer")]
    ours_a = rows[0]
    assert ours_a["fwd_bwd_p80_ms"] > 1.5 * ours_a["fwd_bwd_p20_ms"]  # the times spread ...
    assert ours_a["vs_three_gemm_p20"] == ours_a["vs_three_gemm_p80"] == pytest.approx(2.0)  # ... their ratios do not
    assert [r["vs_three_gemm"] for r in rows] == pytest.approx([2.0, 4.0, 3.0, 6.0])
    assert report.trust_warnings(rows, {"s": dict(other_cpu_share=0.05)}) == []


def test_a_provider_slow_only_in_some_rounds_shows_in_its_spread_and_the_warning_fires():
    lanes = _lanes()
    timed = Rounds(lanes, 10).run(_workers(slow=2.0, slow_rounds=(1, 4, 7)))
    rows = [_row(timed, lanes, g, w) for g in ("a", "b") for w in ("ours", "peer")]
    ours, peer = rows[0], rows[1]
    assert ours["vs_three_gemm_p20"] == ours["vs_three_gemm_p80"] == pytest.approx(2.0)
    assert peer["vs_three_gemm"] == pytest.approx(4.0)  # the median holds the usual ratio
    assert peer["vs_three_gemm_p80"] == pytest.approx(8.0)  # the slow rounds show in the spread
    warnings = report.trust_warnings(rows, {})
    assert len(warnings) == 1 and "s a peer (100%)" in warnings[0] and "s b peer (100%)" in warnings[0]
    assert "ours" not in warnings[0]
    # The table shows the spread, and the run's text carries the warning.
    assert "| 4.00 (4.00-8.00) |" in "\n".join(report.results_table(rows))
    env = dict(cpu="x86_64", device="cpu", cpu_threads=2, torch="2", date="today", cpu_count=2)
    record = {"s": dict(rounds=10, seconds=60.0, other_cpu_share=0.4, load_average_before=1.2, load_average_after=2.5)}
    text = report.markdown(rows, None, env, None, "realistic", {}, [], record)
    assert warnings[0] in text and "other processes took 40% of the CPUs' time during the rounds of s" in text
    assert "Rounds: s: 10 rounds in 60 s, other processes 40% of the CPUs, load average 1.20 -> 2.50 on 2 CPUs" in text


def test_a_failing_worker_loses_its_lanes_and_the_others_go_on():
    lanes = _lanes()
    workers = _workers()
    workers["peer"].fail_at = 3
    heard = []
    timed = Rounds(lanes, 6).run(workers, heard.append)
    assert timed.failed == {"peer": "exit -9: killed"}
    assert {lane.worker for lane in timed.visits} == {"floor", "ours"}
    assert all(len(v) == 6 for v in timed.visits.values())
    assert sum("peer" in text for text in heard) == 2 * 3 + 1  # visited until it failed, then no more
    # Progress names the lane and, once something was timed, the time left.
    assert heard[0].startswith("round 1/6: ") and "left" not in heard[0]
    assert any(text.startswith("round 6/6: ") and text.endswith(" s left") for text in heard)


WORKER = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {bench!r})
    from rounds import serve

    def visit(job):
        if job == "crash":
            sys.exit(3)
        if job == "hang":
            time.sleep(60)
        print("noise on stdout that must not reach the controller")
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < float(job):  # busy: CPU time only while visited
            pass
        return dict(seconds=time.perf_counter() - t0, cpu=time.process_time())

    serve(dict(setup=lambda: dict(ready=True), visit=visit))
''')


def _process(tmp_path, timeout=20):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(bench=str(BENCH)))
    return rounds.Process([sys.executable, str(script)], timeout=timeout)


def test_worker_processes_over_pipes_are_idle_between_their_visits(tmp_path):
    workers = {f"w{i}": _process(tmp_path) for i in range(3)}
    try:
        assert all(w.ask("setup") == {"ready": True} for w in workers.values())
        lanes = [Lane(name, "0.02", "g", name) for name in workers]
        timed = Rounds(lanes, 5).run(workers)
        assert not timed.failed and timed.seconds > 3 * 5 * 0.02
        for lane in lanes:
            seconds, cpu = timed.seconds_of(lane), timed.seconds_of(lane, "cpu")
            assert all(s >= 0.02 for s in seconds)
            # Between its first and last visit the worker used CPU for its own visits alone (four of them), not
            # while the others were timed: it waited on its pipe.
            assert cpu[-1] - cpu[0] < 4 * 0.02 + 0.05
        assert timed.other_cpu_share is None or 0.0 <= timed.other_cpu_share <= 1.0
        with pytest.raises(WorkerFailed, match="KeyError"):
            workers["w0"].ask("no-such-command")
        assert workers["w0"].visit("0.001")["seconds"] > 0  # an error leaves the worker serving
        with pytest.raises(WorkerFailed, match="exit 3"):
            workers["w1"].visit("crash")
    finally:
        for w in workers.values():
            w.close()


def test_a_worker_that_hangs_is_killed_at_the_timeout(tmp_path):
    worker = _process(tmp_path, timeout=1)
    started = time.time()
    try:
        with pytest.raises(WorkerFailed, match="timed out after 1 s"):
            worker.visit("hang")
    finally:
        worker.close()
    assert time.time() - started < 15


# --- what run.py promises ------------------------------------------------------------------------------------------

def test_a_device_that_is_not_there_fails_at_once_with_one_line():
    torch = pytest.importorskip("torch")

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    started = time.time()
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--device", "cuda"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("run.py")]
    assert line.startswith("run.py: error: --device cuda: no CUDA device here")
    assert time.time() - started < 60  # torch's import, nothing else


def test_the_quick_look_in_the_help_is_about_512_positions():
    """The help's quick-look command, built as the run builds it."""
    torch = pytest.importorskip("torch")
    from batches import Work
    from shapes import parse_shape

    (line,) = [x for x in (BENCH / "run.py").read_text().splitlines() if "# a quick look" in x]
    argv = shlex.split(line.split("#")[0])[2:]
    shape = parse_shape(argv[argv.index("--shapes") + 1])
    work = Work(argv[argv.index("--workload") + 1] if "--workload" in argv else "realistic")
    positions = work.batch(shape, None, torch.float32, torch.device("cpu")).target_ids.numel()
    assert 400 <= positions <= 650


def test_results_stay_out_of_git_unless_saved(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_run_for_rounds", BENCH / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert run.out_folder(run.parse_args([])) == BENCH / "out"
    assert run.out_folder(run.parse_args(["--save"])) == BENCH / "results"
    assert run.out_folder(run.parse_args(["--out", str(tmp_path)])) == tmp_path
    with pytest.raises(SystemExit):  # one or the other
        run.parse_args(["--save", "--out", str(tmp_path)])
    ignored = subprocess.run(["git", "check-ignore", "-q", "benchmarks/out/bench_cpu_x.json"], cwd=ROOT)
    assert ignored.returncode == 0


def test_the_readme_and_results_md_are_generated_from_the_committed_json():
    """Stale when a JSON was added or the generator changed: ``python benchmarks/summarize.py`` rewrites both."""
    import summarize

    assert summarize.section((ROOT / "README.md").read_text()) == summarize.readme_summary(summarize.RESULTS)
    assert summarize.section((ROOT / "docs" / "results.md").read_text()) == summarize.summary(summarize.RESULTS)

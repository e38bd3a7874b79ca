"""``benchmarks/gpu_check.py``: the dry run goes through every phase on the CPU and writes the JSON; a phase that
times out is recorded and the next one runs; the JSON is rewritten after each phase; the benchmark phase passes
``--workload`` exactly when run.py takes it; a diagnostic's measurements come back as its phase's result."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_wheel(tmp_path):
    """A folder with one pure-Python wheel, ``tinypkg``, whose module prints where it was imported from."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    files = {"tinypkg/__init__.py": "print(__file__)\n",
             "tinypkg-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
             "tinypkg-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            "Tag: py3-none-any\n"}
    files["tinypkg-0.1.dist-info/RECORD"] = "".join(f"{name},,\n" for name in [*files, "tinypkg-0.1.dist-info/RECORD"])
    with zipfile.ZipFile(folder / "tinypkg-0.1-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    return folder


def test_carried_wheels_are_installed_offline_for_every_later_phase(gpu_check, tmp_path):
    env = dict(os.environ, PYTHONPATH="/elsewhere")
    entry = gpu_check._wheels_phase(_tiny_wheel(tmp_path), 60, env)
    assert entry["status"] == "ok", entry
    assert env["PYTHONPATH"].split(os.pathsep) == [entry["site"], "/elsewhere"]
    where = subprocess.run([sys.executable, "-c", "import tinypkg"], env=env, capture_output=True, text=True).stdout
    assert where.strip().startswith(entry["site"])
    assert gpu_check._wheels_phase(None, 60, env)["status"] == "skipped: no --wheels"
    assert gpu_check._wheels_phase(tmp_path / "none", 60, env)["status"].startswith("skipped: no wheels in")


def _report(folder):
    (path,) = Path(folder).glob("gpu_check_*.json")
    return json.loads(path.read_text())


def test_dry_run_goes_through_every_phase(gpu_check, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--wheels", str(_tiny_wheel(tmp_path))]) == 0
    report = _report(tmp_path)
    assert report["complete"] and report["environment"]["dry_run"] is True
    assert report["caps_s"] == gpu_check.PHASE_TIMEOUT_S and sum(report["caps_s"].values()) <= report["deadline_s"]
    phases = report["phases"]
    assert phases["wheels"]["wheels"] == ["tinypkg-0.1-py3-none-any.whl"]
    assert phases["cuda_build"]["command"] == "-m rankgrpo_kernels.backends.cuda.build"
    assert list(phases) == list(gpu_check.PHASES)
    for name, entry in phases.items():
        assert entry["status"] == "ok", (name, entry)
    for name in ("gpu_tests", "native_kernels", *gpu_check.DIAGNOSTICS):  # the dry run only collects the tests
        assert "collected" in phases[name]["summary"], (name, phases[name])
    for name in gpu_check.DIAGNOSTICS:  # one GPU test file each, which measured nothing here
        assert f"tests/gpu/test_{name}.py" in phases[name]["command"] and phases[name]["result"] is None
    runs = phases["benchmark"]["result"]
    ran = [r for r in runs.values() if r["status"] == "ok"]
    assert len(ran) == 1 and ran[0]["json"] and ran[0]["results"]


def test_a_timed_out_phase_is_recorded_and_the_next_runs(gpu_check, tmp_path, monkeypatch):
    real = gpu_check._run_process
    writes = []

    def slow_probe(cmd, timeout, env=None):
        if any("torch_probe" in str(part) for part in cmd):
            return real([sys.executable, "-c", "import time; time.sleep(60)"], 1.0, env)
        return real(cmd, timeout, env)

    def write(path, report):
        writes.append(json.loads(json.dumps(report, default=str)))
        real_write(path, report)

    real_write = gpu_check._write
    monkeypatch.setattr(gpu_check, "_run_process", slow_probe)
    monkeypatch.setattr(gpu_check, "_write", write)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--phases", "torch_probe,int64_rows"]) == 1
    phases = _report(tmp_path)["phases"]
    assert phases["torch_probe"]["status"] == "timeout" and phases["torch_probe"]["seconds"] < 30
    assert phases["int64_rows"]["status"] == "ok"
    # Written before the first phase and after each: a check cut short still leaves what it measured.
    assert [list(w["phases"]) for w in writes[:3]] == [[], ["torch_probe"], ["torch_probe", "int64_rows"]]


def test_a_timeout_kills_the_whole_process_group(gpu_check):
    started = time.time()
    status, _, _, _, _ = gpu_check._run_process(["bash", "-c", "sleep 60 & sleep 60; wait"], 1.0)
    assert status == "timeout" and time.time() - started < 20
    left = subprocess.run(["pgrep", "-f", "sleep 60 & sleep 60"], capture_output=True, text=True).stdout
    assert not left.strip()


def test_past_the_deadline_phases_are_skipped(gpu_check, tmp_path):
    """No phase starts with less than MIN_PHASE_S left (the safety net when phases overrun their caps)."""
    caps = [f"--phase-timeout={name}=5" for name in ("torch_probe", "int64_rows")]
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--deadline", "10", "--phases",
                           "torch_probe,int64_rows", *caps]) == 0
    phases = _report(tmp_path)["phases"]
    assert list(phases) == ["torch_probe", "int64_rows"]
    assert all(e["status"] == "skipped: out of time" for e in phases.values())


def test_the_benchmark_phase_runs_both_workloads_as_run_py_parses_them(gpu_check, tmp_path):
    sys.path.insert(0, str(BENCH))
    import run

    runs = gpu_check._benchmark_runs(False, tmp_path)
    assert [label for label, _ in runs] == ["realistic", "dense"]
    for label, argv in runs:
        args = run.parse_args(argv)
        assert args.workload == label and args.device == "cuda" and args.dtype == "bfloat16"
    assert run.parse_args(runs[0][1]).settings == "beta0,beta1e-3"


def test_a_diagnostic_phase_records_what_its_test_measured(gpu_check, tmp_path, monkeypatch):
    """The phase runs its file with pytest; what the test hands to ``record`` is the phase's result."""
    test = tmp_path / "test_probe.py"
    test.write_text("def test_probe(record):\n    record(answer=42, parts={'a': 1})\n\n\n"
                    "def test_more(record):\n    record(more=[1, 2])\n")
    (tmp_path / "conftest.py").write_text((BENCH.parent / "tests" / "gpu" / "conftest.py").read_text())
    monkeypatch.setattr(gpu_check, "_pytest_cmd", lambda paths, dry_run, marker=None: [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(test)])
    entry = gpu_check._pytest_phase("torch_probe", False, 60, dict(os.environ))
    assert entry["status"] == "ok" and "2 passed" in entry["summary"], entry
    assert entry["result"] == {"answer": 42, "parts": {"a": 1}, "more": [1, 2]}


def test_the_caps_fit_the_deadline_by_construction(gpu_check, tmp_path, capsys):
    """Every phase gets its whole cap: the caps add up to less than the deadline (under 9 minutes), the dry run
    prints them first, and caps that no longer fit are refused before anything runs."""
    assert list(gpu_check.PHASE_TIMEOUT_S) == list(gpu_check.PHASES)
    assert sum(gpu_check.PHASE_TIMEOUT_S.values()) <= gpu_check.DEADLINE_S <= 9 * 60
    lines = gpu_check.plan(gpu_check.PHASES, gpu_check.PHASE_TIMEOUT_S, gpu_check.DEADLINE_S)
    assert len(lines) == len(gpu_check.PHASES) + 1 and "within the deadline" in lines[-1]
    with pytest.raises(ValueError, match="more than the deadline"):
        gpu_check.plan(["benchmark"], gpu_check.PHASE_TIMEOUT_S, 100)
    with pytest.raises(SystemExit, match="lower a --phase-timeout"):
        gpu_check.main(["--dry-run", "--out", str(tmp_path), "--phase-timeout", "benchmark=600"])
    with pytest.raises(SystemExit, match="unknown phase"):
        gpu_check.main(["--dry-run", "--out", str(tmp_path), "--phase-timeout", "nope=1"])
    assert not list(tmp_path.glob("gpu_check_*.json"))

"""The benchmark runs end to end on a tiny CPU shape: table, JSON fields and plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run(bench, tmp_path, capsys):
    assert bench.main(["--device", "cpu", "--shapes", "64x4001@256", "--providers", "eager,torch,cuda,liger",
                       "--reps", "2", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| custom-64x4001@256 | torch |" in table
    assert "skipped: " in table and "Segmentation of 64 rows" in table
    (json_file,) = tmp_path.glob("bench_*.json")
    report = json.loads(json_file.read_text())
    env = report["environment"]
    for field in ("date", "command", "git_sha", "torch", "device", "python"):
        assert field in env
    rows = {r["provider"]: r for r in report["results"]}
    assert rows["eager"]["status"] == "ok" and rows["torch"]["status"] == "ok"
    assert rows["cuda"]["status"].startswith("skipped") and rows["liger"]["status"].startswith("skipped")
    for key in ("fwd_bwd_ms", "fwd_ms", "tokens_per_s", "peak_mib", "time_vs_eager", "memory_vs_eager"):
        assert rows["torch"][key] > 0
    assert rows["torch"]["max_rel_error"] < 1e-3
    assert report["segmentation"]["speedup"] > 1
    if "matplotlib" in sys.modules or importlib.util.find_spec("matplotlib"):
        assert list(tmp_path.glob("bench_*.png"))


def test_summary_comes_from_the_json(bench, tmp_path):
    spec = importlib.util.spec_from_file_location("summarize", RUN.with_name("summarize.py"))
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{summarize.BEGIN}\nold\n{summarize.END}\nend\n")
    results = tmp_path / "results"
    results.mkdir()
    assert "No GPU results" in summarize.update(readme, results)
    row = dict(shape="s@1", provider="triton", status="ok", fwd_bwd_ms=12.5, peak_mib=64.0, time_vs_eager=0.4,
               memory_vs_eager=0.01, vs_three_gemm=1.2)
    env = dict(gpu="NVIDIA H100", device="cuda", date="2026-11-26", torch="2.13.0", triton="3.9.0", git_sha="abc",
               command="python benchmarks/gpu_check.py")
    (results / "r.json").write_text(json.dumps(dict(environment=env, dtype="bfloat16", results=[row])))
    text = summarize.update(readme, results)
    assert "| s@1 | triton | 12.5 | 64 | 0.40 | 0.010 | 1.20 |" in text and "NVIDIA H100" in text
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text

"""``benchmarks/quality.py --quick``: every method trains and is evaluated, and the JSON holds what the README's
comparison is read from."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import METHODS, summarise  # noqa: E402


def test_quick_run_trains_and_evaluates_every_method(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob("quality_cpu_*.json")
    record = json.loads(path.read_text())
    assert set(record["runs"]) == set(METHODS) and record["ks"] == [2, 4, 6]
    for name, seeds in record["runs"].items():
        curve = seeds["0"]["curve"]
        assert [point["step"] for point in curve] == [0, 2, 4]
        for point in curve:
            for k in record["ks"]:
                assert 0.0 <= point[f"recall@{k}"] <= 1.0 and 0.0 <= point[f"ndcg@{k}"] <= 1.0
        assert curve[0] == next(iter(record["runs"].values()))["0"]["curve"][0]  # one start for every method
    assert "first step mean NDCG@6" in out.stdout


def test_summary_gives_spread_over_seeds_and_the_first_step_reaching_the_target():
    def run(values):
        return {"curve": [{"step": step, "ndcg@2": v, "recall@2": v / 2} for step, v in zip((0, 10, 20), values)]}

    runs = {"a": {0: run([0.2, 0.5, 0.7]), 1: run([0.2, 0.3, 0.5])}, "b": {0: run([0.2, 0.2, 0.3])}}
    lines, summary = summarise(runs, (2,), target=0.4)
    assert summary["a"]["first_step_reaching_target"] == 10  # mean 0.4 at step 10
    assert summary["b"]["first_step_reaching_target"] is None
    assert summary["a"]["final"]["ndcg@2"]["mean"] == pytest.approx(0.6)
    assert summary["a"]["final"]["ndcg@2"]["std"] == pytest.approx(math.sqrt(0.02))
    assert "not reached" in lines[2] and "0.600 ± 0.141" in lines[1]

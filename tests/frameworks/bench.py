"""The benchmark's provider for a framework (``benchmarks/framework_providers.py``), run in this framework's venv as
the benchmark's worker runs it: on the realistic workload at every setting, checked against the eager yardstick."""

from __future__ import annotations

import torch

from ..helpers import load_benchmark_module


def check_benchmark_provider(name, tmp_path):
    run = load_benchmark_module("run")  # puts benchmarks/ on the path
    import child
    import providers
    from batches import Work
    from workload import SETTINGS

    assert providers.PROVIDERS[name].refuse(torch.device("cpu"), torch.float32) is None
    job = child.Job(run.parse_shape("16x503@256"), torch.float32, torch.device("cpu"), Work(settings=tuple(SETTINGS)),
                    tmp_path)
    child.Reference(job).setup()
    rows = child.Provider(name, job).setup()["rows"]
    assert set(rows) == set(SETTINGS)
    for setting, row in rows.items():
        assert row["status"] == "ok" and row["max_rel_error"] < 1e-4 and row["ours"], (setting, row)

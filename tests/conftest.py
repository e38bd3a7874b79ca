"""Shared fixtures: seeds, the golden values of the spec, a tiny local tokenizer, and the GPU marker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's numpy interpreter. torch tells (its import does not import
# triton, and is_available does not initialise CUDA); TRITON_INTERPRET must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Collecting tests never compiles: the CUDA backend loads a prebuilt or already-built extension only, else refuses
# ("not built yet"); a GPU run builds it first (python -m rankgrpo_kernels.backends.cuda.build, under a time limit).
os.environ.setdefault("RANKGRPO_CUDA_JIT", "0")

from hypothesis import settings  # noqa: E402

# Derandomised so that CI is reproducible; RANKGRPO_HYPOTHESIS_PROFILE=explore draws fresh examples.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("explore", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("RANKGRPO_HYPOTHESIS_PROFILE", "ci"))

# The golden values of the spec (docs/rank-grpo-math.md, tables in docs/golden_tables.md), inside the repository.
GOLDEN_PATH = Path(__file__).resolve().parent / "data" / "golden.json"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models (hidden size 64) run fastest on one thread, and it keeps parallel CI jobs from oversubscribing
    the cores; a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def golden():
    return json.loads(GOLDEN_PATH.read_text())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

"""The GPU check's diagnostics: ``benchmarks/gpu_check.py`` runs each ``test_<phase>.py`` here as one phase. A test
hands what it measured to ``record``; with ``RANKGRPO_GPU_CHECK_RESULT`` naming a file, the session writes all of it
there as one JSON object (the phase's ``result``). Skipped without a GPU, as every ``gpu`` test is."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

RESULT_ENV = "RANKGRPO_GPU_CHECK_RESULT"


@pytest.fixture(scope="session")
def _results():
    results = {}
    yield results
    if os.environ.get(RESULT_ENV):
        Path(os.environ[RESULT_ENV]).write_text(json.dumps(results, default=str))


@pytest.fixture
def record(_results):
    """``record(**fields)``: add measured fields to the phase's result."""
    return _results.update

"""The README's code as a new user runs it: the quickstart as written, and the TRL section's config on a CPU."""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section whose heading is ``section``."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_quickstart_runs_as_written():
    (code,) = _python_blocks("Quickstart")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md (Quickstart)", "exec"), {"__name__": "__readme__"})
    assert re.fullmatch(r"loss -?\d+\.\d{4}, kl \S+, ratio \d\.\d{3}\n", printed.getvalue())


def test_trl_config_line_constructs_on_a_cpu(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    (code,) = _python_blocks("Training with TRL, OpenRLHF, verl or your own loop")
    tree = ast.parse(code)
    assignment = next(node for node in tree.body if isinstance(node, ast.Assign)
                      and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "RankGRPOConfig")
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    monkeypatch.chdir(tmp_path)  # output_dir="out" lands here
    namespace = {}
    exec(compile(ast.Module(body=imports + [assignment], type_ignores=[]), "README.md (TRL)", "exec"), namespace)
    assert namespace["args"].objective.importance_sampling_level == "item"


def test_every_paper_row_in_the_readme_table_is_a_valid_setting():
    from rankgrpo_kernels import ObjectiveSpec

    rows = re.findall(r"^\| ([^|]+) \| `importance_sampling_level=\"(\w+)\"` \| `list_reward=(None|\"\w+\")` \|",
                      README, flags=re.M)
    assert len(rows) == 5, rows
    for _, level, list_reward in rows:
        ObjectiveSpec(importance_sampling_level=level, list_reward=ast.literal_eval(list_reward))


def test_evaluation_example_prints_what_its_comment_says():
    (code,) = _python_blocks("The paper's baselines, ablations and metrics")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md (metrics)", "exec"), {"__name__": "__readme__"})
    shown = code.split("# ", 1)[1].strip().rstrip(".")
    assert printed.getvalue().startswith(shown.replace("...}", "")), printed.getvalue()

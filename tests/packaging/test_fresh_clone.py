"""A copy of the repository with nothing beside it passes the golden tests: no file may read outside the tree.

The copy holds what ``git`` would put in a clone: the tracked files plus the untracked ones that are not ignored
(files about to be committed), never ``.venv*``, ``.git`` or other ignored build outputs. Without git (or outside a
checkout) the tree is copied without those folders. The golden tests then run there in a subprocess with this
interpreter, ``PYTHONPATH`` set to the copy so that its ``rankgrpo_kernels`` is the one imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", "__pycache__", ".hypothesis", ".pytest_cache", "build", "dist"}


def _clone_files() -> list[str] | None:
    """Paths (relative to ROOT) a clone would hold, from git; None when git or the checkout is unavailable."""
    if shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, check=True, timeout=60,
        ).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        return None
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]  # deleted tracked files left out


def _walk_files() -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames
                       if d not in SKIP_DIRS and not d.startswith(".venv") and not d.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(dirpath, name), ROOT) for name in filenames]
    return files


def _copy_tree(dest: Path) -> None:
    files = _clone_files()
    for rel in _walk_files() if files is None else files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def test_golden_tests_pass_in_a_copy_with_nothing_beside_it(tmp_path):
    copy = tmp_path / "rankgrpo-kernels"
    _copy_tree(copy)
    assert (copy / "tests" / "maths" / "test_golden.py").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [copy.name]  # nothing else beside the copy
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKGRPO_") and k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(copy)
    script = ("import sys, pytest, rankgrpo_kernels; "
              "print('imported', rankgrpo_kernels.__file__, flush=True); "
              "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/maths/test_golden.py']))")
    result = subprocess.run([sys.executable, "-c", script], cwd=copy, env=env, capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    imported = Path(output.split("imported ", 1)[1].split("\n", 1)[0]).resolve()
    assert imported.is_relative_to(copy.resolve()), f"the copy imported {imported}, not its own package"
    assert " passed" in output, output[-2000:]


def test_without_git_the_copy_leaves_out_venvs_and_git(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert _clone_files() is None
    files = _walk_files()
    assert "tests/data/golden.json" in files and "tests/maths/test_golden.py" in files
    top = {Path(f).parts[0] for f in files}
    assert not {name for name in top if name == ".git" or name.startswith(".venv")}

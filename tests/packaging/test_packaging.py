"""The CUDA sources travel with the package: the sdist holds ``csrc/``, a wheel built from that sdist holds them
under ``rankgrpo_kernels/csrc/``, and ``backends/cuda/loader.py`` finds them there before a source checkout's ``csrc/``.

The build runs on a copy of the files an sdist needs (never in the repository, whose ``build/`` others may be
using), without build isolation and without the CUDA extension (``RANKGRPO_BUILD_CUDA=0``): a few seconds.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p.name for pattern in ("*.cu", "*.cuh", "*.h", "*.cpp") for p in (ROOT / "csrc").glob(pattern))
FAKE_EXTENSION = "rankgrpo_kernels.backends.cuda._C"  # the prebuilt extension is imported first; a stand-in
BACKEND = "rankgrpo_kernels.backends.cuda"
LOADER = f"{BACKEND}.loader"


def _run(cmd, cwd):
    env = dict(os.environ, RANKGRPO_BUILD_CUDA="0", PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("wheel") is None:
        pytest.skip("setuptools and wheel are needed to build without isolation")
    tmp = tmp_path_factory.mktemp("packaging")
    tree = tmp / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md"):
        shutil.copy2(ROOT / name, tree / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_C*")
    shutil.copytree(ROOT / "rankgrpo_kernels", tree / "rankgrpo_kernels", ignore=ignore)
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "sdist")], tree)
    (sdist,) = (tmp / "sdist").glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
        archive.extractall(tmp / "unpacked", **safe)
    (unpacked,) = (tmp / "unpacked").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel"),
          str(unpacked)], tmp)
    (wheel,) = (tmp / "wheel").glob("*.whl")
    return sdist, wheel, tmp


def test_sdist_holds_the_sources(built):
    sdist, _, _ = built
    with tarfile.open(sdist) as archive:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in archive.getnames() if "/" in n}
    assert SOURCES and {f"csrc/{name}" for name in SOURCES} <= names


def test_wheel_holds_the_sources_as_package_data(built):
    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"rankgrpo_kernels/csrc/{name}" for name in SOURCES} <= names
    assert not any(n.startswith("csrc/") for n in names)  # no top-level csrc package in site-packages


def test_installed_wheel_finds_its_own_sources(built):
    """The wheel unpacked as site-packages would hold it, imported from elsewhere: CSRC is inside the package."""
    _, wheel, tmp = built
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    script = (f"import sys, types; sys.modules[{FAKE_EXTENSION!r}] = types.ModuleType('_cuda'); "
              f"import {LOADER} as b; print(b.CSRC)")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(site)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.split()[-1]) == site / "rankgrpo_kernels" / "csrc"


@pytest.fixture
def cuda_loader(monkeypatch):
    """The CUDA backend's loader imported in this process with a stand-in extension; sys.modules and the package
    attribute restored afterwards (without a CUDA torch the real import must keep raising for
    test_cuda_backend.py)."""
    import types

    import rankgrpo_kernels.backends as package

    saved = {name: sys.modules.pop(name, None) for name in (BACKEND, LOADER)}
    had_attr, attr = hasattr(package, "cuda"), getattr(package, "cuda", None)
    monkeypatch.setitem(sys.modules, FAKE_EXTENSION, types.ModuleType("_C"))
    try:
        yield importlib.import_module(LOADER)
    finally:
        for name, module in saved.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module
        if had_attr:
            package.cuda = attr
        elif hasattr(package, "cuda"):
            delattr(package, "cuda")


def test_package_sources_come_before_the_checkout(cuda_loader, tmp_path):
    package, checkout, empty = tmp_path / "package", tmp_path / "checkout", tmp_path / "empty"
    for folder in (package, checkout, empty):
        folder.mkdir()
    for folder in (package, checkout):
        (folder / "binding.cpp").write_text("")
    assert cuda_loader.find_csrc((package, checkout)) == package
    assert cuda_loader.find_csrc((empty, checkout)) == checkout
    assert cuda_loader.find_csrc((empty, tmp_path / "missing")) == empty  # named in the error message
    # In this checkout (no copy inside the package) the top-level csrc/ is the one found.
    assert cuda_loader.CSRC == ROOT / "csrc"

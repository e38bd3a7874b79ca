"""Build script. Metadata lives in pyproject.toml; today the install is pure Python.

The optional CUDA extension (csrc/) is built here once it exists, and only when both a CUDA toolchain and a
CUDA-enabled torch are present; every other machine gets the plain install.
"""

from setuptools import setup

setup()

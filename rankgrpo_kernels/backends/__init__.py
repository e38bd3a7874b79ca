"""Backends: the row pass, gradient pass and segment loss around the head's vendor GEMMs.

``protocol.py`` says what a backend implements and how it refuses, ``registry.py`` lists them (one line each) and
picks one; each backend is a folder: ``torch/`` (plain torch ops, any device), ``triton/`` (Triton kernels),
``cuda/`` (a thin wrapper over the extension built from the top-level ``csrc/``). The folders are imported lazily,
through the registry only.
"""

from .registry import REGISTRY, available, choose, load, names, refusal

__all__ = ["REGISTRY", "available", "choose", "load", "names", "refusal"]

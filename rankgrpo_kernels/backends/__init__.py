"""Backends compute log-probs of the LM head and their gradients (see ``autograd.py`` for the interface).

``torch`` runs anywhere (chunked, bounded memory). ``auto`` picks the fastest backend available for the device.
"""

from __future__ import annotations

import torch

from . import torch_chunked

BACKENDS = {"torch": torch_chunked}


def resolve(name: str, device: torch.device):
    """The backend module for ``name`` ("auto" or a key of ``BACKENDS``) on ``device``."""
    if name == "auto":
        return BACKENDS["torch"]
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name]

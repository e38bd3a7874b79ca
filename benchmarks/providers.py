"""What the benchmark compares: each provider turns one batch into a loss whose backward reaches the LM head.

A provider is ``(name, note, build)`` where ``build(batch) -> loss_fn`` or raises ``Unavailable(reason)``;
``loss_fn()`` returns the scalar loss from ``batch.hidden`` and ``batch.weight``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from rankgrpo_kernels import rank_grpo_loss
from rankgrpo_kernels.reference import reference_loss

# The released Rank-GRPO run: bnpo, eps 0.06 / 0.08, k3 KL with beta 1e-3.
LOSS_SETTINGS = dict(epsilon_low=0.06, epsilon_high=0.08, beta=1e-3, loss_type="bnpo")


class Unavailable(Exception):
    """The provider cannot run here; the message says why."""


@dataclass
class Batch:
    hidden: torch.Tensor  # (B, T, H), requires grad
    weight: torch.Tensor  # (V, H), requires grad
    target_ids: torch.Tensor
    loss_inputs: dict  # item_ids, advantages, completion_mask, old_logps, ref_logps


def _eager(batch):
    return lambda: reference_loss(batch.hidden, batch.weight, batch.target_ids, **batch.loss_inputs,
                                  **LOSS_SETTINGS)[0]


def _ours(backend):
    def build(batch):
        return lambda: rank_grpo_loss(batch.hidden, batch.weight, batch.target_ids, backend=backend,
                                      **batch.loss_inputs, **LOSS_SETTINGS)[0]
    return build


def _compiled(batch):
    compiled = torch.compile(reference_loss)
    return lambda: compiled(batch.hidden, batch.weight, batch.target_ids, **batch.loss_inputs, **LOSS_SETTINGS)[0]


def _missing(reason):
    def build(batch):
        raise Unavailable(reason)
    return build


def _package_gate(package, reason_if_present):
    if importlib.util.find_spec(package) is None:
        return _missing(f"package {package} not installed")
    return _missing(reason_if_present)


PROVIDERS = {
    "eager": ("full logits -> log_softmax -> gather -> loss (the authors' trainer, TRL 0.21)", _eager),
    "torch": ("ours, chunked torch backend", _ours("torch")),
    "compile": ("torch.compile of the eager loss", _compiled),
    "triton": ("ours, fused Triton kernels", _missing("the Triton backend is not in this version yet")),
    "cuda": ("ours, CUDA extension", _missing("the CUDA extension is not in this version yet")),
    "liger": ("LigerFusedLinearGRPOLoss: token-level ratio, different maths",
              _package_gate("liger_kernel", "the Liger adapter is not in this version yet")),
    "cce": ("Cut Cross-Entropy log-probs + our loss",
            _package_gate("cut_cross_entropy", "the CCE adapter is not in this version yet")),
}


def default_providers(device_type: str) -> list[str]:
    # torch.compile of a (N x V) graph compiles for minutes on a 2-core CPU: asked for explicitly there.
    names = list(PROVIDERS)
    return names if device_type == "cuda" else [n for n in names if n != "compile"]

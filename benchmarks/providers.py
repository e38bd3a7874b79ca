"""What the benchmark compares: each provider turns one batch into a loss whose backward reaches the LM head.

A provider is ``(name, note, build)`` where ``build(batch) -> loss_fn`` or raises ``Unavailable(reason)``;
``loss_fn()`` returns the scalar loss from ``batch.hidden`` and ``batch.weight``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from rankgrpo_kernels import backends, rank_grpo_loss, rank_grpo_loss_from_logps
from rankgrpo_kernels.kernels.tiles import interpreting
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
        if backend == "triton" and batch.hidden.device.type != "cuda" and not interpreting():
            raise Unavailable("needs a CUDA GPU (or TRITON_INTERPRET=1)")
        if importlib.util.find_spec(backend) is None:
            raise Unavailable(f"package {backend} not installed")
        return lambda: rank_grpo_loss(batch.hidden, batch.weight, batch.target_ids, backend=backend,
                                      **batch.loss_inputs, **LOSS_SETTINGS)[0]
    return build


def _ours_cuda(batch):
    if batch.hidden.device.type != "cuda":
        raise Unavailable("needs a CUDA GPU")
    try:
        backends.load("cuda")
    except ValueError as exc:
        raise Unavailable(str(exc)) from exc
    return lambda: rank_grpo_loss(batch.hidden, batch.weight, batch.target_ids, backend="cuda",
                                  **batch.loss_inputs, **LOSS_SETTINGS)[0]


def _compiled(batch):
    if batch.hidden.device.type == "cpu" and not COMPILE_ON_CPU:
        raise Unavailable("compiling the (N x V) graph takes minutes on a CPU: ask for it with --providers")
    compiled = torch.compile(reference_loss)
    return lambda: compiled(batch.hidden, batch.weight, batch.target_ids, **batch.loss_inputs, **LOSS_SETTINGS)[0]


def _needs_cuda_package(batch, package):
    if importlib.util.find_spec(package) is None:
        raise Unavailable(f"package {package} not installed")
    if batch.hidden.device.type != "cuda":
        raise Unavailable(f"{package} runs on CUDA only")


def token_level_inputs(batch):
    """Liger's maths as ours: one item per token and one advantage per row (the row's mean) is token-level GRPO."""
    B, T = batch.target_ids.shape
    inputs = dict(batch.loss_inputs)
    mask = inputs["completion_mask"]
    row_advantages = (inputs["advantages"] * mask).sum(1) / mask.sum(1).clamp(min=1)
    inputs.update(item_ids=torch.arange(T, device=mask.device).expand(B, T), advantages=row_advantages)
    return inputs


def _liger(batch):
    _needs_cuda_package(batch, "liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    s = LOSS_SETTINGS
    loss = LigerFusedLinearGRPOLoss(beta=s["beta"], epsilon_low=s["epsilon_low"], epsilon_high=s["epsilon_high"],
                                    loss_type=s["loss_type"], use_ref_model=True)
    inputs = token_level_inputs(batch)
    return lambda: loss(batch.hidden, batch.weight, batch.target_ids, inputs["completion_mask"],
                        inputs["advantages"], ref_per_token_logps=inputs["ref_logps"],
                        old_per_token_logps=inputs["old_logps"])[0]


def _cce(batch):
    _needs_cuda_package(batch, "cut_cross_entropy")
    from cut_cross_entropy import linear_cross_entropy

    def loss():
        # filter_eps=None: exact gradients (CCE's default drops those of tiny probabilities).
        logps = -linear_cross_entropy(batch.hidden, batch.weight, batch.target_ids, reduction="none",
                                      filter_eps=None)
        return rank_grpo_loss_from_logps(logps, **batch.loss_inputs, **LOSS_SETTINGS)[0]
    return loss


PROVIDERS = {
    "eager": ("full logits -> log_softmax -> gather -> loss (the authors' trainer, TRL 0.21)", _eager),
    "torch": ("ours, chunked torch backend", _ours("torch")),
    "compile": ("torch.compile of the eager loss", _compiled),
    "triton": ("ours, fused Triton kernels", _ours("triton")),
    "cuda": ("ours, CUDA extension (csrc/: cuBLAS GEMMs on vocabulary slabs + CUDA epilogues)", _ours_cuda),
    "liger": ("LigerFusedLinearGRPOLoss: token-level ratio (different maths; checked against ours with one item "
              "per token)", _liger),
    "cce": ("Cut Cross-Entropy log-probs (exact gradients) + our loss from log-probs", _cce),
}
# Providers whose maths is token-level GRPO: checked against the eager loss on token_level_inputs.
TOKEN_LEVEL = {"liger"}


COMPILE_ON_CPU = False  # set by run.py when --providers names "compile"

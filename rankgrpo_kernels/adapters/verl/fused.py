"""``patch_fused_logprobs``: verl's fused log-prob path (``FusedLinearForPPO``) through ``fused_logprobs``, with the
model's logit transform, and, at the actor's update, through the Rank-GRPO loss computed in the forward
(``forward_loss``)."""

from __future__ import annotations

import contextvars
import functools
import importlib

import torch

from ...functional import fused_logprobs
from ..hf_model import logit_transform
from .forward_loss import current_forward_loss
from .hook import patch_forward_step

# The logit transform (softcap, scale) of the model whose fused forward is running: verl hands FusedLinearForPPO the
# head's weight only, so the wrapped forwards (``patch_fused_logprobs``) read it from the model's config.
_LOGIT_TRANSFORM: contextvars.ContextVar[dict] = contextvars.ContextVar("rank_grpo_logit_transform", default={})
# verl's modules whose ``forward_with_torch_backend`` calls FusedLinearForPPO (the model types of
# ``monkey_patch.patch_forward_with_backends``; dense_common serves every other model type).
_FUSED_FORWARD_MODULES = ("dense_common", "qwen2_vl", "qwen3_vl", "glm4v", "qwen3_5")


class FusedLogprobsForPPO(torch.nn.Module):
    """Stand-in for ``verl.utils.experimental.torch_functional.FusedLinearForPPO``: the same ``forward`` returning
    ``(log_probs, entropy)`` of ``input_ids`` under ``softmax(S(s * hidden @ W.T) / temperature)``, (B, T) each,
    from ``fused_logprobs``, with the calling model's softcap S and scale s (``hf_model.logit_transform``: Gemma-2's
    ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``, which verl's own class
    leaves out) inside a forward wrapped by ``patch_fused_logprobs``, none outside one. The entropy is
    differentiable: verl's ``actor.entropy_coeff`` bonus reaches the head and the states. Inside a Rank-GRPO
    training step (``bind_forward_loss``) the bound ``ForwardLoss`` computes the loss here, or the log-probs of only
    the tokens the loss reads."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        squeeze = hidden_states.dim() == 2
        hidden = hidden_states.unsqueeze(0) if squeeze else hidden_states
        ids = input_ids.to(torch.int64).reshape(hidden.shape[:-1])
        head = {"temperature": float(temperature), **_LOGIT_TRANSFORM.get()}
        bound = current_forward_loss()
        if bound is not None:
            log_probs, entropy = bound.run(hidden, vocab_weights, ids, head)
        else:
            log_probs, entropy = fused_logprobs(hidden, vocab_weights.to(hidden.dtype), ids, return_entropy=True,
                                                **head)
        return (log_probs[0], entropy[0]) if squeeze else (log_probs, entropy)


def _with_logit_transform(forward):
    """verl's fused model forward, running with the model's logit transform set for ``FusedLogprobsForPPO``."""
    if getattr(forward, "rank_grpo_logit_transform", False):
        return forward

    @functools.wraps(forward)
    def forward_with_logit_transform(self, *args, **kwargs):
        token = _LOGIT_TRANSFORM.set(logit_transform(self))
        try:
            return forward(self, *args, **kwargs)
        finally:
            _LOGIT_TRANSFORM.reset(token)

    forward_with_logit_transform.rank_grpo_logit_transform = True
    return forward_with_logit_transform


def patch_fused_logprobs() -> None:
    """Route verl's fused log-prob path (``actor_rollout_ref.model.use_fused_kernels=True``,
    ``fused_kernels_backend=torch``) through ``fused_logprobs``: the model forwards in
    ``verl/models/transformers/*.py`` look ``FusedLinearForPPO`` up in this module at call time, and are wrapped to
    hand it the model's logit transform. Call it before verl builds the model (its ``patch_forward_with_backends``
    installs the forward on the model's class then); verl's ``fused_kernels_backend=triton`` stays verl's. Also
    binds the actor's training micro-batches for the loss in the forward (``hook.patch_forward_step``)."""
    from verl.utils.experimental import torch_functional

    patch_forward_step()

    torch_functional.FusedLinearForPPO = FusedLogprobsForPPO
    for name in _FUSED_FORWARD_MODULES:
        try:
            module = importlib.import_module(f"verl.models.transformers.{name}")
        except ImportError:  # a model family this transformers lacks: verl cannot patch it either
            continue
        module.forward_with_torch_backend = _with_logit_transform(module.forward_with_torch_backend)

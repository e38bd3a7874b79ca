"""What the fused loss needs from a Hugging Face causal LM: the hidden states that predict the completion tokens and
the LM head, plus how the model transforms its logits (softcapping, a scale: ``logit_transform``).

For trainers that wrap the model (DDP, FSDP2, DeepSpeed), ``run_inside_forward`` runs a function inside the
wrapper's call of the model's forward, without replacing the forward, and ``full_head_tensor`` turns an FSDP2
(``DTensor``) head into the plain tensor the fused loss takes, with its gradient averaged back into the shards.

Works on ``transformers`` models and on PEFT wrappers of them; nothing here imports ``transformers``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Config attributes of logit transforms the fused loss does not apply (multipliers of the hidden states or the head
# inside the model's forward); Gemma's softcapping, Cohere's logit_scale and Granite's logits_scaling it does.
_UNSUPPORTED_TRANSFORMS = ("output_multiplier", "lm_head_multiplier")
# What a PEFT adapter layer wrapping a Linear holds (LoRA, its variants, IA3): the head is then not its weight alone.
_ADAPTER_LAYERS = ("base_layer", "lora_A", "ia3_l")


def unwrap_peft(model):
    """The ``transformers`` model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logit_transform(model) -> dict:
    """How the model's config transforms its logits beyond ``hidden @ W.T + b``, as the fused loss's keyword
    arguments ``{"logit_scale": s, "logit_softcap": c}``: Gemma-2's ``final_logit_softcapping`` (c), Cohere's
    ``logit_scale`` (s) and Granite's ``logits_scaling`` (s = 1 / it). ``NotImplementedError`` for a transform the
    fused loss does not apply (``_UNSUPPORTED_TRANSFORMS``), naming it."""
    config = unwrap_peft(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _UNSUPPORTED_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(unwrap_peft(model)).__name__} sets {name}={value!r}: its logits are not "
                "softcap(scale * (hidden @ W.T + b)), so the fused Rank-GRPO log-probs would differ from the model's")
    scale = float(getattr(text_config, "logit_scale", None) or 1.0)
    divisor = getattr(text_config, "logits_scaling", None)
    if divisor not in (None, 0):
        scale /= float(divisor)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return {"logit_scale": scale, "logit_softcap": None if softcap is None else float(softcap)}


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head as ``(weight (V, H), bias (V,) or None)``.

    With tied embeddings ``weight`` *is* the input-embedding Parameter, so the fused loss's gradient of the head
    and the backbone's gradient of the embedding accumulate in the same ``.grad``, exactly as with the model's own
    ``lm_head`` call.
    """
    head = unwrap_peft(model).get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(unwrap_peft(model)).__name__} has no output embeddings with a weight: the fused "
                         "Rank-GRPO loss needs a causal LM head (get_output_embeddings())")
    if any(hasattr(head, name) for name in _ADAPTER_LAYERS):
        raise TypeError(f"the LM head of {type(unwrap_peft(model)).__name__} is a PEFT adapter layer "
                        f"({type(head).__name__}): the fused loss reads its base weight only and would drop the "
                        "adapter's update. Leave lm_head out of the LoRA target_modules (or merge the adapter first)")
    return head.weight, getattr(head, "bias", None)


def completion_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             num_completion_tokens: int) -> torch.Tensor:
    """(B, T, H) last hidden states (after the final norm) that predict the last T tokens of ``input_ids``.

    ``input_ids`` / ``attention_mask`` (B, P + T) hold the prompt (left-padded) then the completion (right-padded),
    as TRL lays them out; position ``P - 1 + t`` predicts completion token t. Only the backbone runs: no logits.
    """
    if not 1 <= num_completion_tokens < input_ids.shape[1]:
        raise ValueError(f"num_completion_tokens must be in [1, {input_ids.shape[1]}) (the prompt needs at least "
                         f"one token), got {num_completion_tokens}")
    backbone = unwrap_peft(model).base_model
    if backbone is unwrap_peft(model):
        raise ValueError(f"{type(backbone).__name__} exposes no backbone under base_model_prefix: the fused loss needs "
                         "the last hidden states of a transformers causal LM")
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return outputs.last_hidden_state[:, -num_completion_tokens - 1 : -1]


def call_head(fn, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``fn(hidden, weight, bias)`` in the head's dtype with autocast off.

    The fused kernels run matmuls of their own (and may recompute logits in the backward); autocast would run them in
    another precision than the head's. Casting the states to the head's dtype also serves heads kept in float32
    (TRL's ``cast_lm_head_to_fp32``) under a bfloat16 backbone.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        return fn(hidden.to(weight.dtype), weight, bias)


def head_rows(weight: torch.Tensor) -> int:
    """The vocabulary size V of a head weight (V, H), also for a DeepSpeed ZeRO-3 partitioned one (its ``ds_shape``;
    the partitioned tensor itself is empty) and an FSDP2 ``DTensor`` (its global shape)."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def full_head_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A head parameter as a plain tensor: an FSDP2 ``DTensor`` (a shard, outside an unsharded FSDP group) becomes
    ``full_tensor()``, whose backward reduce-scatters the gradient into the shard as the *average* over the mesh,
    the gradient FSDP2 gives its own unsharded parameters (``Partial("avg")`` on every mesh dimension; without it the
    backward would keep this rank's gradient only). Anything else is returned as it is."""
    if tensor is None or not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(tensor, DTensor):
        return tensor
    if not torch.is_grad_enabled() or not tensor.requires_grad:
        return tensor.full_tensor()
    return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)


_NO_FORWARD = object()


def run_inside_forward(wrapper: torch.nn.Module, module: torch.nn.Module, fn: Callable[..., Any], *args, **kwargs):
    """``fn(*args, **kwargs)``, run in place of ``module.forward`` inside ``wrapper(*args, **kwargs)``.

    ``wrapper`` is what a trainer calls (a DDP or DeepSpeed engine wrapping ``module``, or ``module`` itself, e.g.
    an FSDP2 module); ``fn`` receives the arguments as the wrapper hands them to the forward. Running inside the
    wrapper's forward is what lets DDP prepare its gradient reduction, FSDP2 unshard the root's parameters (and
    reshard and reduce-scatter after the backward) and DeepSpeed arm its hooks, for a function that calls the
    backbone and reads the LM head directly instead of calling the model. ``module.forward`` is swapped for this
    one call only and restored exactly (also on errors): the model is left as it was.
    """
    saved = module.__dict__.get("forward", _NO_FORWARD)
    ran = False

    def restore() -> None:
        if saved is _NO_FORWARD:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = saved

    def forward(*inner_args, **inner_kwargs):
        nonlocal ran
        restore()  # fn may call the real forward
        ran = True
        return fn(*inner_args, **inner_kwargs)

    module.__dict__["forward"] = forward
    try:
        output = wrapper(*args, **kwargs)
    finally:
        restore()
    if not ran:
        raise RuntimeError(f"{type(wrapper).__name__} did not call the forward of the {type(module).__name__} it was "
                           "given as wrapping: pass the model the trainer calls and the module inside it")
    return output

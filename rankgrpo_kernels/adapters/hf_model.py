"""What the fused loss needs from a Hugging Face causal LM: the hidden states that predict the completion tokens and
the LM head, plus how the model transforms its logits (softcapping, a scale: ``logit_transform``).

For trainers that wrap the model (DDP, FSDP2, DeepSpeed), ``run_inside_forward`` runs a function inside the
wrapper's call of the model's forward, without replacing the forward, and ``full_head_tensor`` turns an FSDP2
(``DTensor``) head into the plain tensor the fused loss takes, with its gradient averaged back into the shards.

Works on ``transformers`` models and on PEFT wrappers of them; nothing here imports ``transformers``.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from typing import Any

import torch

# How each family's modeling code applies a logit-scale attribute of its (text) config, by ``model_type``: the power
# of the value that multiplies the logits (before the softcap, as the fused loss applies it). Granite's logits_scaling
# divides them (MiniCPM3's divides the hidden states before its bias-free head: the same), HyperCLOVAX's multiplies
# them ("unlike Granite, a multiplier"), Cohere's logit_scale, Falcon-H1's lm_head_multiplier and the Muse models'
# output_multiplier multiply them. The name alone does not say which, so a family not listed that sets one is refused.
_SCALE_POWERS = {
    "logits_scaling": {
        **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid",
                         "granitemoeshared", "granite4_vision_text", "granite_docling_text", "minicpm3"), -1),
        "hyperclovax": 1,
    },
    "logit_scale": dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"), 1),
    "lm_head_multiplier": {"falcon_h1": 1},
    "output_multiplier": dict.fromkeys(("muse_glimmer_text", "muse_spark_text"), 1),
}
# What a PEFT adapter layer wrapping a Linear holds (LoRA, its variants, IA3): the head is then not its weight alone.
_ADAPTER_LAYERS = ("base_layer", "lora_A", "ia3_l")


def unwrap_peft(model):
    """The ``transformers`` model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logit_transform(model) -> dict:
    """How the model's config transforms its logits beyond ``hidden @ W.T + b``, as the fused loss's keyword
    arguments ``{"logit_scale": s, "logit_softcap": c}``: Gemma-2's ``final_logit_softcapping`` (c), Cohere's
    ``logit_scale`` (s), ``logits_scaling`` (s = 1 / it for Granite and MiniCPM3, s = it for HyperCLOVAX), Falcon-H1's
    ``lm_head_multiplier`` and the Muse models' ``output_multiplier`` (s), by the config's ``model_type``
    (``_SCALE_POWERS``); ``NotImplementedError`` naming a scale attribute of a family not known here."""
    config = unwrap_peft(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    name_of_model = type(unwrap_peft(model)).__name__
    family = getattr(text_config, "model_type", None)
    scale = 1.0
    for name, powers in _SCALE_POWERS.items():
        value = getattr(text_config, name, None)
        if value in (None, 1, 1.0):
            continue
        if family not in powers:
            raise NotImplementedError(
                f"{name_of_model} (model_type {family!r}) sets {name}={value!r}, and whether its logits are "
                f"multiplied or divided by it is known only for {sorted(powers)}: the fused Rank-GRPO log-probs "
                "would not be the model's")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise ValueError(f"{name_of_model} sets {name}={value!r}: expected a finite number > 0")
        scale *= float(value) ** powers[family]
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
                             num_completion_tokens: int, router_logits: bool = False):
    """(B, T) last hidden states (after the final norm) that predict the last T tokens of ``input_ids``, shape
    (B, T, H); with ``router_logits=True`` also the MoE router logits of every layer (a tuple, as the model's forward
    hands them to its load-balancing loss: ``router_aux_loss``).

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
    extra = {"output_router_logits": True} if router_logits else {}
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    hidden = outputs.last_hidden_state[:, -num_completion_tokens - 1 : -1]
    return (hidden, outputs.router_logits) if router_logits else hidden


def router_aux_loss(model, router_logits, attention_mask: torch.Tensor) -> torch.Tensor:
    """The MoE load-balancing loss the model's own forward adds with ``output_router_logits=True``: its modeling
    module's ``load_balancing_loss_func`` over the router logits of the backbone call, with the model's expert
    count and top-k, over the same attention mask (TRL adds ``router_aux_loss_coef`` times it to the loss)."""
    inner = unwrap_peft(model)
    loss_func = getattr(sys.modules[type(inner).__module__], "load_balancing_loss_func", None)
    experts, top_k = getattr(inner, "num_experts", None), getattr(inner, "num_experts_per_tok", None)
    if loss_func is None or experts is None or top_k is None:
        raise NotImplementedError(f"{type(inner).__name__}: its router loss is not the load_balancing_loss_func of "
                                  "its modeling code over num_experts and num_experts_per_tok; set "
                                  "router_aux_loss_coef=0.0")
    return loss_func(router_logits, experts, top_k, attention_mask)


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

"""What the fused loss needs from a Hugging Face causal LM: the hidden states that predict the completion tokens and
the LM head, plus the check that the model's logits are plain ``hidden @ W.T + b`` (no softcapping, no scale).

Works on ``transformers`` models and on PEFT wrappers of them; nothing here imports ``transformers``.
"""

from __future__ import annotations

import torch

# Config attributes with which a model transforms its logits beyond ``hidden @ W.T + b`` (Gemma's softcapping,
# Cohere's logit_scale, Granite's logits_scaling, ...): the fused log-probs would differ from the model's own.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def unwrap_peft(model):
    """The ``transformers`` model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_plain_logits(model) -> None:
    """Raise ``NotImplementedError`` if the model's config transforms its logits (softcapping or a logit scale)."""
    config = unwrap_peft(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        harmless = value is None or (name != "final_logit_softcapping" and value == 1)  # a scale of 1 is no scale
        if not harmless:
            raise NotImplementedError(
                f"{type(unwrap_peft(model)).__name__} sets {name}={value!r}: its logits are not hidden @ W.T + b, so "
                "the fused Rank-GRPO log-probs would differ from the model's. Models with logit softcapping or "
                "scaling are not supported."
            )


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

    The fused kernels recompute logits in the backward; autocast would run those matmuls in another precision than
    the forward's. Casting the states to the head's dtype also serves heads kept in float32
    (TRL's ``cast_lm_head_to_fp32``) under a bfloat16 backbone.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        return fn(hidden.to(weight.dtype), weight, bias)

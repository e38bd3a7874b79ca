"""``fused_actor_forward``: OpenRLHF's ``Actor.forward`` with the action log-probs from ``fused_logprobs`` or, inside
a Rank-GRPO training step, the whole actor loss (``forward_loss``), and ``patch_actor_forward``, which installs it."""

from __future__ import annotations

import torch
from openrlhf.models.actor import Actor

from ...functional import fused_logprobs
from ..hf_model import call_head, logit_transform, output_head, unwrap_peft
from .forward_loss import current_forward_loss


def fused_actor_forward(self, sequences, action_mask=None, attention_mask=None, return_output=False,
                        allgather_logits=False, return_logprobs=False, ring_attn_group=None, packed_seq_lens=None,
                        return_entropy=False, **mm_inputs):
    """``Actor.forward`` for the action log-probs (B, A) of padded text batches, through ``fused_logprobs``.

    ``log p(sequences[:, t + 1] | <= t) = log softmax(h_t W^T / temperature)``, with ``h`` the backbone's last hidden
    states; only positions ``S - A - 1 .. S - 2`` that ``action_mask`` keeps go through the head (the others get
    0). Packed samples, vision-language models and calls without ``action_mask`` take OpenRLHF's own forward.
    ``output.entropy`` (B, A) is differentiable (OpenRLHF's ``entropy_coef`` bonus reaches the head and the
    states); the model's logit softcapping or scale applies (``logit_transform``). Inside a Rank-GRPO training step
    (``forward_loss.bind_forward_loss``) the bound ``ForwardLoss`` computes the loss here and the log-probs and
    entropies returned are its placeholders, or, where it cannot, every action token is scored as above.
    """
    if self.packing_samples or getattr(self, "is_vlm", False) or action_mask is None or return_logprobs:
        return _ACTOR_FORWARD(self, sequences, action_mask, attention_mask, return_output, allgather_logits,
                              return_logprobs, ring_attn_group, packed_seq_lens, return_entropy, **mm_inputs)
    transform = logit_transform(self.model)
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    backbone = unwrap_peft(self.model).base_model
    output = backbone(sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    A = action_mask.shape[1]
    hidden, targets = output.last_hidden_state[:, -A - 1 : -1], sequences[:, -A:]
    weight, bias = output_head(self.model)
    head = {"temperature": self.temperature, **transform}
    bound = current_forward_loss()
    placeholder = None if bound is None else bound.run(hidden, weight, bias, targets, head)
    if placeholder is not None:
        log_probs, entropy = placeholder, torch.zeros_like(placeholder) if return_entropy else None
    else:
        result = call_head(lambda h, w, b: fused_logprobs(h, w, targets, bias=b, return_entropy=return_entropy,
                                                          mask=action_mask, **head), hidden, weight, bias)
        log_probs, entropy = result if return_entropy else (result, None)
    action_log_probs = log_probs * action_mask.float()
    if not return_output:
        return action_log_probs
    output.entropy = entropy
    return action_log_probs, output


_ACTOR_FORWARD = Actor.forward  # OpenRLHF's own, for the cases the fused forward leaves to it


def patch_actor_forward() -> None:
    """Make ``openrlhf.models.actor.Actor.forward`` the fused one."""
    Actor.forward = fused_actor_forward

"""Models whose logits are not ``hidden @ W.T``: the fused log-probs, entropies and gradients equal the model's own
(eager, full logits) for Gemma-2's final_logit_softcapping, Cohere's logit_scale and Granite's logits_scaling,
read from the config by ``adapters.hf_model.logit_transform``. Tiny random models built locally (no download).

Tolerance: float64 models, 1e-10 (the same maths summed in another order)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rankgrpo_kernels import fused_logprobs, rank_grpo_loss  # noqa: E402
from rankgrpo_kernels.adapters.hf_model import (  # noqa: E402
    completion_hidden_states,
    logit_transform,
    output_head,
)

SMALL = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8)
MODELS = {
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **SMALL, final_logit_softcapping=3.0, query_pre_attn_scalar=8)),
    "cohere": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=0.3)),
    "granite": lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(**SMALL, logits_scaling=4.0)),
}


@pytest.mark.parametrize("name", MODELS)
def test_fused_head_equals_the_models_own_logits(name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    with torch.no_grad():  # logits large enough for the softcap to bend them
        model.get_output_embeddings().weight.mul_(20.0)
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones_like(ids)
    T = 7
    transform = logit_transform(model)
    assert transform != {"logit_scale": 1.0, "logit_softcap": None}
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -T - 1 : -1]
    want = logits.log_softmax(-1)
    want_logp = want.gather(-1, ids[:, -T:, None])[..., 0]
    want_entropy = -(want.exp() * want).sum(-1)

    hidden = completion_hidden_states(model, ids, mask, T)
    weight, bias = output_head(model)
    logp, entropy = fused_logprobs(hidden, weight, ids[:, -T:], bias=bias, return_entropy=True, **transform)
    torch.testing.assert_close(logp, want_logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-10, atol=1e-10)

    params = [p for p in model.parameters() if p.requires_grad]
    advantages = torch.randn(2, T, dtype=torch.float64)
    item_ids = torch.arange(T).expand(2, T) // 3
    ours, _ = rank_grpo_loss(hidden, weight, ids[:, -T:], bias=bias, item_ids=item_ids, advantages=advantages,
                             entropy_coef=0.1, **transform)
    from rankgrpo_kernels.reference import reference_loss_from_logps

    ref, _ = reference_loss_from_logps(want_logp, item_ids, advantages, entropy=want_entropy, entropy_coef=0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(ours, params, allow_unused=True),
                             torch.autograd.grad(ref, params, allow_unused=True)):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_unsupported_transforms_are_refused_by_name():
    model = MODELS["cohere"]()
    model.config.lm_head_multiplier = 0.5
    with pytest.raises(NotImplementedError, match="lm_head_multiplier"):
        logit_transform(model)

"""Models whose logits are not ``hidden @ W.T``: the fused log-probs, entropies and gradients equal the model's own
(eager, full logits) for Gemma-2's final_logit_softcapping, Cohere's logit_scale and ``logits_scaling``, which
Granite and MiniCPM3 divide by and HyperCLOVAX multiplies by, read from the config by
``adapters.hf_model.logit_transform``; an unknown family with such an attribute is refused, not guessed. Tiny random
models built locally (no download).

Tolerance: float64 models, 1e-10 (the same maths summed in another order)."""

from __future__ import annotations

from types import SimpleNamespace

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
    "hyperclovax": lambda: _model("HyperCLOVAX", **SMALL, logits_scaling=4.0),
    "falcon_h1": lambda: _model("FalconH1", **SMALL, mamba_d_ssm=16, mamba_n_heads=2, mamba_d_head=8, mamba_d_state=8,
                                mamba_chunk_size=8, lm_head_multiplier=0.5),
    "minicpm3": lambda: _model("MiniCPM3", **{**SMALL, "num_key_value_heads": 2}, q_lora_rank=8, kv_lora_rank=8,
                               qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, dim_model_base=4),
}


def _model(family, **config):
    """A tiny ``<family>ForCausalLM``, skipped where this transformers release lacks the family."""
    model_cls = getattr(transformers, f"{family}ForCausalLM", None)
    if model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family}ForCausalLM")
    return model_cls(getattr(transformers, f"{family}Config")(**config))


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


def test_a_multiplier_of_another_family_is_refused_by_name():
    model = MODELS["cohere"]()
    model.config.lm_head_multiplier = 0.5
    with pytest.raises(NotImplementedError, match="lm_head_multiplier"):
        logit_transform(model)


@pytest.mark.parametrize("family", ["MuseGlimmer", "MuseSpark"])
def test_muse_output_multiplier_scales_before_the_softcap(family):
    """The Muse models (vision-language, no tiny text-only model to run) multiply the head's logits by
    ``output_multiplier`` and then softcap them (their modeling code): the fused loss's order."""
    config_cls = getattr(transformers, f"{family}TextConfig", None)
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family}TextConfig")
    model = SimpleNamespace(config=config_cls(output_multiplier=0.25, final_logit_softcapping=20.0))
    assert logit_transform(model) == {"logit_scale": 0.25, "logit_softcap": 20.0}


def test_hyperclovax_multiplies_where_granite_divides():
    """The same ``logits_scaling=4`` is a factor 4 for HyperCLOVAX and 1/4 for Granite (their modeling code)."""
    assert logit_transform(MODELS["hyperclovax"]())["logit_scale"] == 4.0
    assert logit_transform(MODELS["granite"]())["logit_scale"] == 0.25


def test_a_logit_scale_attribute_of_an_unknown_family_is_refused():
    """Whether a family's ``logits_scaling`` multiplies or divides is in its modeling code, not its config: a family
    not known here is refused by name rather than guessed (1 is no transform, whatever the family)."""
    model = MODELS["granite"]()
    model.config.model_type = "granite_like"
    with pytest.raises(NotImplementedError, match="granite_like.*logits_scaling"):
        logit_transform(model)
    model.config.logits_scaling = 1.0
    assert logit_transform(model) == {"logit_scale": 1.0, "logit_softcap": None}
    cohere = MODELS["cohere"]()
    cohere.config.model_type = "cohere_like"
    with pytest.raises(NotImplementedError, match="cohere_like.*logit_scale"):
        logit_transform(cohere)

"""The verl 0.9 adapter against verl's own code (run in .venv-verl, see conftest.py). No stubs: verl's base
dependencies all install on a CPU machine."""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from verl.trainer.ppo import core_algos
from verl.utils import tensordict_utils as tu
from verl.utils import torch_functional as verl_F
from verl.workers.config.actor import ActorConfig, PolicyLossConfig
from verl.workers.utils import losses

from rankgrpo_kernels import rank_advantages, segment_items, token_advantages
from rankgrpo_kernels.adapters import verl as adapter
from rankgrpo_kernels.adapters.verl import config as adapter_config
from rankgrpo_kernels.reference import reference_loss_from_logps

from . import batch
from .bench import check_benchmark_provider

PROMPT = 4
MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.fixture(scope="module")
def tok():
    tok = batch.tokenizer()
    adapter.install(tok, batch.N)
    return tok


def config(loss_agg_mode="token-mean", low=0.2, high=0.28, loss_mode=adapter.NAME, actor=None, **info):
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size=2, clip_ratio=0.2, clip_ratio_low=low,
                      clip_ratio_high=high, loss_agg_mode=loss_agg_mode,
                      policy_loss=PolicyLossConfig(loss_mode=loss_mode), **(actor or {}))
    cfg.global_batch_info.update(info)
    return cfg


def verl_batch(tok, seed=0):
    """Right-padded responses (B, T), their mask, log-probs."""
    g = torch.Generator().manual_seed(seed)
    rows = batch.responses(tok, g)
    T = max(map(len, rows))
    responses = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, row in enumerate(rows):
        responses[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
    logps, old = batch.log_probs(mask, g)
    return SimpleNamespace(responses=responses, mask=mask, logps=logps, old=old, g=g)


def grads(loss, x):
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def assert_same(ours, theirs, x, metrics=("actor/pg_clipfrac", "actor/ppo_kl")):
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads(ours[0], x), grads(theirs[0], x), rtol=1e-9, atol=1e-12)
    for key in metrics:
        assert ours[1][key] == pytest.approx(theirs[1][key], rel=1e-6, abs=1e-9), key


INFO = [{}, {"dp_size": 2, "batch_num_tokens": 70.0, "global_batch_size": 13.0, "loss_scale_factor": 25}]


@pytest.mark.parametrize("info", INFO)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_one_item_per_sequence_is_gspo(tok, mode, info):
    b = verl_batch(tok)
    adv = torch.randn(b.logps.shape[0], 1, dtype=torch.float64, generator=b.g).expand_as(b.logps) * b.mask
    args = dict(old_log_prob=b.old, log_prob=b.logps, advantages=adv, response_mask=b.mask, loss_agg_mode=mode,
                config=config(mode, **info))
    theirs = core_algos.get_policy_loss_fn("gspo")(**args)
    with adapter.bind_item_ids(torch.where(b.mask, 0, -1)):
        ours = core_algos.get_policy_loss_fn(adapter.NAME)(**args)
    assert theirs[1]["actor/pg_clipfrac"] > 0
    assert_same(ours, theirs, b.logps)


@pytest.mark.parametrize("info", INFO)
@pytest.mark.parametrize("mode", MODES)
def test_one_item_per_token_is_vanilla_ppo(tok, mode, info):
    b = verl_batch(tok, seed=1)
    adv = torch.randn(b.logps.shape, dtype=torch.float64, generator=b.g) * b.mask
    b.logps.data[0, :3] = b.old[0, :3] + 1.5  # ratios above clip_ratio_c = 3 with negative advantages: dual clip
    adv[0, :3] = -1.0
    args = dict(old_log_prob=b.old, log_prob=b.logps, advantages=adv, response_mask=b.mask, loss_agg_mode=mode,
                config=config(mode, **info))
    theirs = core_algos.get_policy_loss_fn("vanilla")(**args)
    with adapter.bind_item_ids(torch.where(b.mask, torch.arange(b.mask.shape[1]).expand_as(b.mask), -1)):
        ours = core_algos.get_policy_loss_fn(adapter.NAME)(**args)
    assert_same(ours, theirs, b.logps)


@pytest.mark.parametrize("mode", MODES)
def test_rollout_is_weights_weight_the_policy_terms_as_vanilla_ppo(tok, mode):
    """verl's rollout correction weights (precomputed by verl, some 0: rejected tokens) multiply each token's
    policy term: one item per token equals verl's vanilla loss with the same weights."""
    b = verl_batch(tok, seed=2)
    adv = torch.randn(b.logps.shape, dtype=torch.float64, generator=b.g) * b.mask
    weights = torch.rand(b.logps.shape, dtype=torch.float64, generator=b.g) * 2
    weights[weights > 1.6] = 0.0
    args = dict(old_log_prob=b.old, log_prob=b.logps, advantages=adv, response_mask=b.mask, loss_agg_mode=mode,
                config=config(mode), rollout_is_weights=weights)
    theirs = core_algos.get_policy_loss_fn("vanilla")(**args)
    with adapter.bind_item_ids(torch.where(b.mask, torch.arange(b.mask.shape[1]).expand_as(b.mask), -1)):
        ours = core_algos.get_policy_loss_fn(adapter.NAME)(**args)
        unweighted = core_algos.get_policy_loss_fn(adapter.NAME)(**{**args, "rollout_is_weights": None})
    assert_same(ours, theirs, b.logps)
    assert not torch.allclose(ours[0], unweighted[0])


def loss_data(b, advantages, prompt_ids, response_mask=None):
    """The micro-batch verl's loss hook receives: a TensorDict, log-probs flat over prompt + response tokens.
    ``response_mask``: verl's after a rejection (``rollout_rs``), the attention mask keeping the whole response."""
    B, T = b.mask.shape
    response_mask = b.mask if response_mask is None else response_mask
    attention = torch.cat([torch.ones(B, PROMPT, dtype=torch.long), b.mask.long()], 1)
    data = tu.get_tensordict(
        {"prompts": prompt_ids, "responses": b.responses, "attention_mask": attention,
         "response_mask": response_mask.long(), "old_log_probs": b.old, "advantages": advantages},
        {"dp_size": 1, "batch_num_tokens": float(response_mask.sum()), "global_batch_size": float(B)},
    )
    pieces = []
    for i in range(B):  # log-prob of token p + 1 sits at p (verl's left shift), outside the response: anything
        n = int(b.mask[i].sum())
        pieces += [torch.zeros(PROMPT - 1, dtype=b.logps.dtype), b.logps[i, :n], torch.zeros(1, dtype=b.logps.dtype)]
    return data, {"log_probs": torch.cat(pieces)}


@pytest.mark.parametrize("form", ["code", "rank"])
def test_loss_hook_with_real_items_matches_reference(tok, form):
    adapter.install(tok, batch.N, form=form)
    try:
        b = verl_batch(tok, seed=2)
        rank_adv = rank_advantages(batch.hits(b.g).double(), batch.G)
        packed = adapter.pack_rank_values(rank_adv, b.mask.shape[1])
        data, output = loss_data(b, packed, torch.randint(0, len(tok), (b.mask.shape[0], PROMPT), generator=b.g))
        loss, metrics = adapter.rank_grpo_ppo_loss(config("token-mean", low=0.06, high=0.08), output, data)

        seg = segment_items(b.responses, b.mask, adapter._SETTINGS["table"], batch.N, eos_token_id=tok.eos_token_id,
                            skip_blank_lines=True)
        item_ids = seg.item_ids_for("rank" if form == "rank" else "bnpo")
        adv = token_advantages(rank_adv, seg, length_shaping=form == "code")
        kwargs = {"rec_num": batch.N} if form == "rank" else {"num_items_in_batch": float(b.mask.sum())}
        ref, _ = reference_loss_from_logps(b.logps, item_ids, adv, b.mask, b.old, epsilon_low=0.06, epsilon_high=0.08,
                                           delta=3.0, loss_type="rank" if form == "rank" else "dapo", **kwargs)
    finally:
        adapter.install(tok, batch.N)
    loss_value = loss.value if hasattr(loss, "value") else loss
    torch.testing.assert_close(loss_value, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads(loss_value, b.logps), grads(ref, b.logps), rtol=1e-9, atol=1e-12)
    assert seg.item_ids.max() == batch.N  # the overflow row reaches bin N


def newline_positions(tok, responses, mask):
    """(B, T) True on the newline tokens of the responses."""
    newline = tok.encode("A\nB")[1]
    assert tok.decode([newline]) == "\n"
    return (responses == newline) & mask


@pytest.mark.parametrize("form", ["code", "rank"])
def test_token_rejection_masks_the_loss_not_the_items(tok, form):
    """verl's token-level rejection (rollout_rs token_k1/k2/k3) zeroes single tokens of response_mask, here a newline
    between two items: the items still come from the whole response (the attention mask up to EOS), every rank keeps
    its own advantage, and the rejected token only leaves the loss."""
    adapter.install(tok, batch.N, form=form)
    try:
        b = verl_batch(tok, seed=9)
        rank_adv = rank_advantages(batch.hits(b.g).double(), batch.G)
        rejected = b.mask.clone()
        col = int(newline_positions(tok, b.responses, b.mask)[0].nonzero()[0, 0])  # row 0's first: it ends item 0
        rejected[0, col] = False
        packed = adapter.pack_rank_values(rank_adv, b.mask.shape[1])
        data, output = loss_data(b, packed, torch.randint(0, len(tok), (b.mask.shape[0], PROMPT), generator=b.g),
                                 response_mask=rejected)
        loss, _ = adapter.rank_grpo_ppo_loss(config("token-mean", low=0.06, high=0.08), output, data)

        seg = segment_items(b.responses, b.mask, adapter._SETTINGS["table"], batch.N, eos_token_id=tok.eos_token_id,
                            skip_blank_lines=True)
        assert seg.item_ids[0, col + 1] == 1  # the token after the newline starts rank 1
        adv = token_advantages(rank_adv, seg, length_shaping=form == "code")
        kwargs = {"rec_num": batch.N} if form == "rank" else {"num_items_in_batch": float(rejected.sum())}
        ref, _ = reference_loss_from_logps(b.logps, seg.item_ids_for("rank" if form == "rank" else "bnpo"), adv,
                                           rejected, b.old, epsilon_low=0.06, epsilon_high=0.08, delta=3.0,
                                           loss_type="rank" if form == "rank" else "dapo", **kwargs)
    finally:
        adapter.install(tok, batch.N)
    loss_value = loss.value if hasattr(loss, "value") else loss
    torch.testing.assert_close(loss_value, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads(loss_value, b.logps), grads(ref, b.logps), rtol=1e-9, atol=1e-12)


def test_install_sets_the_actor_loss_hook(tok):
    from verl.workers import engine_workers

    assert engine_workers.ppo_loss is adapter.rank_grpo_ppo_loss
    assert core_algos.get_policy_loss_fn(adapter.NAME) is adapter.compute_policy_loss_rank_grpo
    b = verl_batch(tok, seed=5)  # other loss modes pass through to verl's ppo_loss untouched
    adv = torch.randn(b.logps.shape, dtype=torch.float64, generator=b.g) * b.mask
    data, output = loss_data(b, adv, torch.randint(0, len(tok), (b.mask.shape[0], PROMPT), generator=b.g))
    cfg = config(loss_mode="vanilla")
    ours = adapter.rank_grpo_ppo_loss(cfg, output, data)
    theirs = losses.ppo_loss(cfg, output, data)
    torch.testing.assert_close(ours[0], theirs[0])


def test_advantage_estimator_gives_rank_advantages(tok):
    g = torch.Generator().manual_seed(3)
    rewards = batch.hits(g)
    B, T = rewards.shape[0], 9
    uids = np.repeat(np.array([f"prompt-{p}" for p in range(batch.PROMPTS)], dtype=object), batch.G)
    perm = torch.randperm(B, generator=g)  # verl's batches need not keep a prompt's samples together
    estimator = core_algos.get_adv_estimator_fn(adapter.NAME)
    adv, returns = estimator(token_level_rewards=adapter.pack_rank_values(rewards[perm], T),
                             response_mask=torch.ones(B, T), index=uids[perm.numpy()], config=None)
    torch.testing.assert_close(adv[:, : batch.N], rank_advantages(rewards, batch.G)[perm])
    assert (adv[:, batch.N :] == 0).all() and returns is adv


def test_missing_setup_is_an_error_that_names_install(tok, monkeypatch):
    """No install() settings and a config without them: the hook says how to set them up, not KeyError."""
    monkeypatch.setattr(adapter_config, "_SETTINGS", {})
    b = verl_batch(tok, seed=6)
    packed = adapter.pack_rank_values(rank_advantages(batch.hits(b.g).double(), batch.G), b.mask.shape[1])
    data, output = loss_data(b, packed, torch.randint(0, len(tok), (b.mask.shape[0], PROMPT), generator=b.g))
    with pytest.raises(RuntimeError, match=r"install\(tokenizer, rec_num\).*RankGRPOPolicyLossConfig"):
        adapter.rank_grpo_ppo_loss(config(), output, data)
    with pytest.raises(RuntimeError, match=r"no rec_num .*install\(tokenizer, rec_num\)"):
        cfg = config()
        cfg.model_config = SimpleNamespace(tokenizer=tok)  # as verl's actor worker sets it
        adapter.rank_grpo_ppo_loss(cfg, output, data)


def test_advantage_estimator_needs_no_settings(tok, monkeypatch):
    monkeypatch.setattr(adapter_config, "_SETTINGS", {})
    rewards = batch.hits(torch.Generator().manual_seed(7))
    uids = np.repeat(np.array([f"p{p}" for p in range(batch.PROMPTS)], dtype=object), batch.G)
    adv, _ = core_algos.get_adv_estimator_fn(adapter.NAME)(
        token_level_rewards=adapter.pack_rank_values(rewards, 7), response_mask=torch.ones(len(uids), 7), index=uids,
        config=None)
    torch.testing.assert_close(adv, adapter.pack_rank_values(rank_advantages(rewards, batch.G), 7))


@pytest.fixture(scope="module")
def verl_run_config(tok, tmp_path_factory):
    """verl's own ppo_trainer config (hydra) with the Rank-GRPO settings in it, and a local model path (the tiny
    tokenizer, a 1-layer Llama config) from which verl loads the actor's tokenizer."""
    import os

    import verl
    from hydra import compose, initialize_config_dir
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("verl_model")
    tok.save_pretrained(path)
    LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, architectures=["LlamaForCausalLM"]).save_pretrained(path)

    def compose_with(*overrides):
        with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                                   version_base=None):
            return compose("ppo_trainer", overrides=[
                "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                f"actor_rollout_ref.model.path={path}", "actor_rollout_ref.actor.policy_loss.loss_mode=rank_grpo",
                "actor_rollout_ref.actor.clip_ratio_low=0.06", "actor_rollout_ref.actor.clip_ratio_high=0.08",
                *overrides])

    return compose_with


def actor_config_from(cfg):
    """The ActorConfig verl's actor worker builds (engine_workers.py: omega_conf_to_dataclass, then model_config)."""
    from verl.utils.config import omega_conf_to_dataclass

    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    actor.model_config = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
    return actor


@pytest.mark.parametrize("form", ["code", "rank"])
def test_settings_from_verls_config(tok, verl_run_config, monkeypatch, form):
    """Without install()'s settings, the hook and the policy loss take them from verl's config: rec_num and form from
    actor_rollout_ref.actor.policy_loss (a RankGRPOPolicyLossConfig), the tokenizer from actor_rollout_ref.model."""
    cfg = verl_run_config(
        "actor_rollout_ref.actor.policy_loss._target_=rankgrpo_kernels.adapters.verl.RankGRPOPolicyLossConfig",
        f"+actor_rollout_ref.actor.policy_loss.rec_num={batch.N}", f"+actor_rollout_ref.actor.policy_loss.form={form}")
    actor = actor_config_from(cfg)
    assert isinstance(actor.policy_loss, adapter.RankGRPOPolicyLossConfig) and actor.policy_loss.rec_num == batch.N
    b = verl_batch(tok, seed=8)
    packed = adapter.pack_rank_values(rank_advantages(batch.hits(b.g).double(), batch.G), b.mask.shape[1])
    data, output = loss_data(b, packed, torch.randint(0, len(tok), (b.mask.shape[0], PROMPT), generator=b.g))
    adapter.install(tok, batch.N, form=form)
    try:
        expected, _ = adapter.rank_grpo_ppo_loss(config("token-mean", low=0.06, high=0.08), output, data)
    finally:
        adapter.install(tok, batch.N)
    monkeypatch.setattr(adapter_config, "_SETTINGS", {})
    loss, _ = adapter.rank_grpo_ppo_loss(actor, output, data)
    value = lambda x: x.value if hasattr(x, "value") else x  # noqa: E731
    torch.testing.assert_close(value(loss), value(expected), rtol=1e-12, atol=0)
    monkeypatch.setattr(adapter_config, "_SETTINGS", {})
    adapter.install(rec_num=batch.N + 1)  # a setting given both ways must agree
    with pytest.raises(ValueError, match=r"rec_num is 3 in verl's config .* install\(\) was given 4"):
        adapter.rank_grpo_ppo_loss(actor, output, data)
    adapter.install(tok, batch.N)


def test_fused_logprobs_patch_matches_verl(tok, monkeypatch):
    from verl.utils.experimental import torch_functional

    monkeypatch.setattr(torch_functional, "FusedLinearForPPO", torch_functional.FusedLinearForPPO)  # undone after

    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, 37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (1, 37), generator=g)
    theirs = torch_functional.FusedLinearForPPO()(hidden, weight, ids, temperature=0.7)
    adapter.patch_fused_logprobs()
    ours = torch_functional.FusedLinearForPPO()(hidden, weight, ids, temperature=0.7)
    assert isinstance(torch_functional.FusedLinearForPPO(), adapter.FusedLogprobsForPPO)
    for a, b_ in zip(ours, theirs):  # float32 both: verl's chunked autograd function against the fused kernels
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
    upstream, entropy_coeff = torch.randn(1, 37, generator=g), 0.3  # the log-prob's and the entropy bonus's
    ours_grads = torch.autograd.grad((ours[0] * upstream).sum() - entropy_coeff * ours[1].sum(), (hidden, weight))
    theirs_grads = torch.autograd.grad((theirs[0] * upstream).sum() - entropy_coeff * theirs[1].sum(),
                                       (hidden, weight))
    for a, b_ in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def _fused_verl_forward(model, monkeypatch):
    """The model with verl's fused forward (use_fused_kernels=True, backend torch) through the patch; every patch
    undone after the test."""
    from verl.models.transformers.monkey_patch import patch_forward_with_backends
    from verl.utils.experimental import torch_functional
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    monkeypatch.setattr(torch_functional, "FusedLinearForPPO", torch_functional.FusedLinearForPPO)
    for name in adapter._FUSED_FORWARD_MODULES:
        module = importlib.import_module(f"verl.models.transformers.{name}")
        monkeypatch.setattr(module, "forward_with_torch_backend", module.forward_with_torch_backend)
    monkeypatch.setattr(type(model), "forward", type(model).forward)
    monkeypatch.setattr(FSDPEngineWithLMHead, "forward_step", FSDPEngineWithLMHead.forward_step)
    adapter.patch_fused_logprobs()
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    return model


def _tiny_causal_lm(family: str):
    import transformers

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    if family == "gemma2":  # final_logit_softcapping 0.1: the tiny model's logits (about 0.1) reach past it
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**sizes, head_dim=8,
                                                                        final_logit_softcapping=0.1))
    return transformers.CohereForCausalLM(transformers.CohereConfig(**sizes, logit_scale=0.37))  # cohere


@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere"])
def test_fused_model_forward(monkeypatch, family):
    """verl's own fused forward of a tiny model through the patch equals the log-probs of the model's own logits:
    Gemma-2's softcap and Cohere's logit scale included (which verl's FusedLinearForPPO leaves out)."""
    torch.manual_seed(0)
    model = _tiny_causal_lm(family).double()
    ids = torch.randint(0, 64, (2, 11))
    logits = model(input_ids=ids).logits / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, ids.roll(-1, -1).unsqueeze(-1)).squeeze(-1)
    if family == "gemma2":
        raw = model.lm_head(model.model(input_ids=ids).last_hidden_state) / 0.7
        plain = torch.log_softmax(raw, -1).gather(-1, ids.roll(-1, -1).unsqueeze(-1)).squeeze(-1)
        assert (plain - expected).abs().max() > 1e-2  # the softcap matters here
    output = _fused_verl_forward(model, monkeypatch)(input_ids=ids, return_dict=True, temperature=0.7)
    torch.testing.assert_close(output.log_probs, expected, rtol=1e-9, atol=1e-9)
    output.log_probs.sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.embed_tokens.weight.grad is not None


def test_import_is_lazy():
    code = "import sys, rankgrpo_kernels; print(sorted({'verl', 'ray', 'tensordict'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# --- The loss in the model's forward, through verl's own FSDP forward step ---------------------------------------


def _engine(model, monkeypatch):
    """verl's ``FSDPEngineWithLMHead`` around a plain model on the CPU (no process group, no FSDP wrapping): its own
    ``forward_step``, ``prepare_model_inputs`` and ``prepare_model_outputs`` run as in a training step."""
    from verl.workers.engine.fsdp import transformer_impl

    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(transformer_impl, "get_device_name", lambda: "cpu")
    engine = object.__new__(transformer_impl.FSDPEngineWithLMHead)
    engine.module, engine.pad_to_length, engine.use_ulysses_sp = model, False, False
    engine._autocast_dtype = torch.float32
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    engine.get_data_parallel_group = lambda: None
    return engine


def actor_micro_batch(tok, b, rejected, g, *, fused: bool, calculate_entropy: bool, dp_size=1, log_probs=None):
    """The micro-batch verl's actor update hands the engine (``left_right_2_no_padding`` of the padded batch):
    left-padded prompts of varying length, right-padded responses, per-rank advantages packed, rollout
    importance-sampling weights and, around the model's own ``log_probs`` (B, T), old and reference log-probs."""
    from verl.workers.utils.padding import left_right_2_no_padding

    B, T = b.mask.shape
    prompt_lengths = torch.randint(1, PROMPT + 1, (B,), generator=g)
    prompt_mask = torch.arange(PROMPT)[None] >= PROMPT - prompt_lengths[:, None]
    prompts = torch.where(prompt_mask, torch.randint(0, len(tok), (B, PROMPT), generator=g), tok.pad_token_id)
    attention = torch.cat([prompt_mask, b.mask], 1).long()
    rank_adv = rank_advantages(batch.hits(g).double(), batch.G)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    weights[weights > 1.7] = 0.0
    log_probs = torch.zeros(B, T, dtype=torch.float64) if log_probs is None else log_probs
    noise = torch.randn(2, B, T, generator=g, dtype=torch.float64)
    td = tu.get_tensordict({
        "input_ids": torch.cat([prompts, b.responses], 1), "attention_mask": attention,
        "position_ids": (attention.cumsum(1) - 1).clamp(min=0), "prompts": prompts, "responses": b.responses,
        "response_mask": rejected.long(), "old_log_probs": log_probs + 0.1 * noise[0],
        "ref_log_prob": log_probs + 0.3 * noise[1], "rollout_is_weights": weights,
        "advantages": adapter.pack_rank_values(rank_adv, T),
    })
    td = left_right_2_no_padding(td)
    # 0.5: verl divides its logits by the temperature in float32, exact for 0.5
    tu.assign_non_tensor(td, temperature=0.5, use_remove_padding=True, use_fused_kernels=fused,
                         calculate_entropy=calculate_entropy, dp_size=dp_size,
                         batch_num_tokens=float(rejected.sum()) * dp_size, global_batch_size=float(B * dp_size))
    return td


def _tiny_llama(tok):
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).double()


FORWARD_CASES = [  # (form, loss_agg_mode, use_kl_loss, kl_loss_type, entropy_coeff, dp_size)
    *[("code", mode, False, "low_var_kl", 0.0, 1) for mode in MODES],
    ("code", "token-mean", True, "low_var_kl", 0.05, 2),
    ("code", "seq-mean-token-sum", True, "k3", 0.05, 1),
    ("code", "seq-mean-token-mean", True, "low_var_kl", 0.0, 2),
    ("rank", "token-mean", False, "low_var_kl", 0.0, 1),
    # verl's loss on the log-probs of the response tokens: a KL type the fused loss lacks, an entropy bonus over
    # sequence means, the paper form with a KL
    ("code", "token-mean", True, "mse", 0.0, 1),
    ("code", "seq-mean-token-mean", False, "low_var_kl", 0.05, 1),
    ("rank", "token-mean", True, "low_var_kl", 0.05, 1),
]


@pytest.mark.parametrize("form, mode, use_kl, kl_type, entropy_coeff, dp_size", FORWARD_CASES)
def test_loss_in_the_forward_matches_verls_loss(tok, monkeypatch, form, mode, use_kl, kl_type, entropy_coeff,
                                                dp_size):
    """verl's own training forward step with ``use_fused_kernels`` through the patch (the loss computed in the
    model's forward, or the response tokens' log-probs) equals verl's logits path into its ``ppo_loss`` with the
    hook: loss and gradients of every parameter, for each option (rollout weights, a token rejection, dual clip,
    KL, entropy bonus, aggregation and global normalisers)."""
    from functools import partial

    from verl.workers.utils.padding import no_padding_2_padding

    adapter.install(tok, batch.N, form=form)
    try:
        model = _tiny_llama(tok)
        b = verl_batch(tok, seed=10)
        rejected = b.mask.clone()
        rejected[0, int(newline_positions(tok, b.responses, b.mask)[0].nonzero()[0, 0])] = False
        cfg = config(mode, low=0.06, high=0.08, actor=dict(use_kl_loss=use_kl, kl_loss_type=kl_type, kl_loss_coef=0.3,
                                                            entropy_coeff=entropy_coeff))
        loss_fn = partial(adapter.rank_grpo_ppo_loss, config=cfg)
        engine = _engine(model, monkeypatch)

        def micro_batch(fused, log_probs=None):
            return actor_micro_batch(tok, b, rejected, torch.Generator().manual_seed(11), fused=fused,
                                     calculate_entropy=entropy_coeff != 0, dp_size=dp_size, log_probs=log_probs)

        with torch.no_grad():  # the model's own log-probs, around which the old and reference ones lie
            data = micro_batch(False)
            _, output = engine.forward_step(data, loss_function=None, forward_only=True)
            log_probs = no_padding_2_padding(output["model_output"]["log_probs"], data)

        def step(fused):
            model.zero_grad()
            loss, output = engine.forward_step(micro_batch(fused, log_probs), loss_function=loss_fn,
                                               forward_only=False)
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, output["metrics"]

        theirs = step(fused=False)
        _fused_verl_forward(model, monkeypatch)
        ours = step(fused=True)
    finally:
        adapter.install(tok, batch.N)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-9, atol=1e-12)
    for name, grad in theirs[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-7, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    fused_path = "actor/ppo_kl" not in ours[2]
    assert fused_path == (not (use_kl and (kl_type == "mse" or form == "rank"))
                          and not (entropy_coeff and mode == "seq-mean-token-mean"))
    assert ours[2]["actor/pg_clipfrac"].values[0] == pytest.approx(theirs[2]["actor/pg_clipfrac"].values[0])


def test_benchmark_provider_matches_eager(tmp_path):
    check_benchmark_provider("verl", tmp_path)

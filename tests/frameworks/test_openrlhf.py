"""The OpenRLHF 0.11 adapter against OpenRLHF's own code (run in .venv-openrlhf, see conftest.py).

Stubbed by scripts/framework_venv.sh, never called here: flash_attn (imported by openrlhf.models.ring_attn_utils)
and vllm (imported by openrlhf.trainer.ray.vllm_engine); every stub attribute raises when used.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from openrlhf.models.loss import PolicyLoss
from openrlhf.trainer.ppo_utils.experience import Experience

from rankgrpo_kernels import rank_advantages, segment_items, token_advantages
from rankgrpo_kernels.adapters import openrlhf as adapter
from rankgrpo_kernels.recommender import item_hits
from rankgrpo_kernels.reference import reference_loss_from_logps

from . import batch

PROMPT = 4  # prompt tokens before every response


@pytest.fixture(scope="module")
def tok():
    return batch.tokenizer()


def openrlhf_batch(tok, seed=0):
    """OpenRLHF's layout: sequences (B, S) = prompt + right-padded response, action_mask (B, S - 1) shifted."""
    g = torch.Generator().manual_seed(seed)
    rows = batch.responses(tok, g)
    S = PROMPT + max(map(len, rows))
    sequences = torch.full((len(rows), S), tok.pad_token_id)
    action_mask = torch.zeros(len(rows), S - 1, dtype=torch.bool)
    for i, row in enumerate(rows):
        sequences[i, :PROMPT] = torch.randint(0, len(tok), (PROMPT,), generator=g)
        sequences[i, PROMPT : PROMPT + len(row)] = torch.tensor(row)
        action_mask[i, PROMPT - 1 : PROMPT - 1 + len(row)] = True
    logps, old = batch.log_probs(action_mask, g)
    return SimpleNamespace(sequences=sequences, action_mask=action_mask, logps=logps, old=old, g=g)


def grads(loss, x):
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def assert_same(ours, theirs, x):
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads(ours[0], x), grads(theirs[0], x), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1])  # clip_ratio
    torch.testing.assert_close(ours[2], theirs[2])  # ppo_kl


AGGREGATION = [{}, {"dp_size": 2, "batch_num_tokens": torch.tensor(70.0), "global_batch_size": torch.tensor(13.0)}]


@pytest.mark.parametrize("info", AGGREGATION)
def test_one_item_per_sequence_is_gspo(tok, info):
    b = openrlhf_batch(tok)
    adv = torch.randn(b.logps.shape[0], 1, dtype=torch.float64, generator=b.g).expand_as(b.logps) * b.action_mask
    items = torch.where(b.action_mask, 0, -1)
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, policy_loss_type="gspo")
    theirs = PolicyLoss(**kwargs)(b.logps, b.old, adv, action_mask=b.action_mask, **info)
    ours = adapter.RankGRPOPolicyLoss(**kwargs)(b.logps, b.old, adv, action_mask=b.action_mask, item_ids=items, **info)
    assert theirs[1] > 0  # some sequences clip
    assert_same(ours, theirs, b.logps)
    assert ours[3] is None and ours[4] is None


@pytest.mark.parametrize("info", AGGREGATION)
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_one_item_per_token_is_ppo(tok, info, token_level_loss, dual_clip):
    b = openrlhf_batch(tok, seed=1)
    adv = torch.randn(b.logps.shape, dtype=torch.float64, generator=b.g) * b.action_mask
    items = torch.where(b.action_mask, torch.arange(b.logps.shape[1]).expand_as(b.logps), -1)
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level_loss)
    theirs = PolicyLoss(**kwargs)(b.logps, b.old, adv, action_mask=b.action_mask, **info)
    ours = adapter.RankGRPOPolicyLoss(**kwargs)(b.logps, b.old, adv, action_mask=b.action_mask, item_ids=items, **info)
    assert_same(ours, theirs, b.logps)


@pytest.mark.parametrize("form", ["code", "rank"])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_real_items_match_reference(tok, form, token_level_loss):
    b = openrlhf_batch(tok, seed=2)
    items = adapter.RankItems.from_tokenizer(tok, batch.N, form=form)
    rank_adv = rank_advantages(batch.hits(b.g), batch.G)
    adv = items.token_advantages(rank_adv, b.sequences, b.action_mask)
    item_ids = items.item_ids(b.sequences, b.action_mask)
    loss_fn = adapter.RankGRPOPolicyLoss(clip_eps_low=0.06, clip_eps_high=0.08, token_level_loss=token_level_loss,
                                         form=form, rec_num=batch.N)
    with loss_fn.bind_item_ids(item_ids):
        ours = loss_fn(b.logps, b.old, adv, action_mask=b.action_mask)
    loss_type = "rank" if form == "rank" else ("bnpo" if token_level_loss else "grpo")
    ref, stats = reference_loss_from_logps(b.logps, item_ids, adv, b.action_mask, b.old, epsilon_low=0.06,
                                           epsilon_high=0.08, loss_type=loss_type, rec_num=batch.N)
    torch.testing.assert_close(ours[0], ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads(ours[0], b.logps), grads(ref, b.logps), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours[1], stats["clip_ratio_region"].float())
    assert (item_ids[b.action_mask] >= 0).all() or form == "rank"
    assert item_ids.max() == batch.N or form == "rank"  # the overflow row reaches bin N


def test_experience_maker_gives_rank_advantages(tok):
    b = openrlhf_batch(tok, seed=3)
    rewards = batch.hits(b.g)
    order = torch.randperm(rewards.shape[0], generator=b.g)  # experiences arrive out of rollout order
    experiences = [
        Experience(sequences=b.sequences[rows], action_mask=b.action_mask[rows], rewards=rewards[rows],
                   index=rows.tolist(), info={})
        for rows in order.split(3)
    ]
    maker = object.__new__(type("Maker", (adapter.RankGRPOExperienceMaker,),
                                {"items": adapter.RankItems.from_tokenizer(tok, batch.N)}))
    args = SimpleNamespace(algo=SimpleNamespace(kl=SimpleNamespace(use_loss=True)),
                           rollout=SimpleNamespace(n_samples_per_prompt=batch.G))
    maker.strategy, maker.kl_ctl = SimpleNamespace(args=args), SimpleNamespace(value=1e-3)
    maker.compute_advantages_and_returns(experiences)

    expected_rank = rank_advantages(rewards, batch.G)
    grouped = adapter.group_rank_advantages(experiences, batch.G)
    for rows, exp, got in zip(order.split(3), experiences, grouped):
        torch.testing.assert_close(got, expected_rank[rows])
        seg = maker.items.segments(exp.sequences, exp.action_mask)
        torch.testing.assert_close(exp.advantages, token_advantages(expected_rank[rows], seg))


def test_install_routes_training_step(tok, monkeypatch):
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ray import ppo_actor

    seen = {}

    def original(self, experience, kl_ctl, step, loss_batch_info=None):
        seen["item_ids"] = self.actor_loss_fn.bound_item_ids
        return {"ok": 1}

    for module, name in ((ppo_trainer, "RemoteExperienceMaker"), (ppo_actor, "PolicyLoss")):
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(ppo_actor.ActorPPOTrainer, "training_step", original)
    items = adapter.install(tok, batch.N)
    assert issubclass(ppo_trainer.RemoteExperienceMaker, adapter.RankGRPOExperienceMaker)
    trainer = SimpleNamespace(actor_loss_fn=ppo_actor.PolicyLoss(clip_eps_low=0.06, clip_eps_high=0.08))
    b = openrlhf_batch(tok)
    experience = SimpleNamespace(sequences=b.sequences, action_mask=b.action_mask)
    assert ppo_actor.ActorPPOTrainer.training_step(trainer, experience, 0.0, 0) == {"ok": 1}
    torch.testing.assert_close(seen["item_ids"], items.item_ids(b.sequences, b.action_mask))
    assert trainer.actor_loss_fn.bound_item_ids is None


def test_fused_actor_forward_matches_openrlhf(tok, monkeypatch):
    from openrlhf.models.actor import Actor
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    actor = Actor(model, temperature=0.7)
    actor.packing_samples = False  # set by Actor.__init__ only when it loads a model by name
    b = openrlhf_batch(tok)
    attention = torch.ones_like(b.sequences)
    attention[b.sequences == tok.pad_token_id] = 0

    def run():
        logps, output = actor(b.sequences, b.action_mask, attention_mask=attention, return_output=True,
                              return_entropy=True)
        entropy = output.entropy[:, -b.action_mask.shape[1]:] * b.action_mask
        # with OpenRLHF's entropy bonus (entropy_coef): its gradient reaches the model through the fused head too
        grad = torch.autograd.grad(logps.sum() - 0.1 * entropy.sum(), model.model.layers[0].mlp.up_proj.weight)[0]
        return logps, entropy, grad

    theirs = run()
    monkeypatch.setattr(Actor, "forward", Actor.forward)
    adapter.patch_actor_forward()
    ours = run()
    for a, b_ in zip(ours, theirs):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


# --- Chat-templated prompts through OpenRLHF 0.11's own rollout code --------------------------------------------

README = Path(__file__).resolve().parents[2] / "integrations" / "openrlhf" / "README.md"
RELEVANT = ["Orbit Nine", "Grave Tide", "Pizza Kings", "Moon Drift", "Silent Field"]
CHATS = [  # (user message, response, finished with EOS): N = 3
    ("Three sci-fi films?", "Star Harbor\nMoon Drift\nOrbit Nine", True),   # exactly N items
    ("Horror please.", "Night Cellar\nGrave Tide", True),                     # 2 items: early stop
    ("Some comedies?", "Lucky Socks\nDinner Chaos\nUncle Bernie\nPizza Kings", True),  # overflow
    ("Dramas?", "Quiet River\nSilent Field\nLetters", False),                # cut off at max_tokens
]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    """Qwen-like tiny tokenizer (EOS <|im_end|>, written by the chat template after every turn), saved to disk."""
    tok = batch.chat_tokenizer()
    path = tmp_path_factory.mktemp("chat_tokenizer")
    tok.save_pretrained(path)
    return tok, path


def readme_reward_module(path, tmp_path):
    """The README's reward_func.py, with its tokenizer path pointed at the local tokenizer."""
    text = README.read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (code,) = [b for b in blocks if b.lstrip().startswith("# reward_func.py")]
    code = textwrap.dedent(code)
    assert '"path/to/sft"' in code
    module = tmp_path / "reward_func.py"
    module.write_text(code.replace('"path/to/sft"', repr(str(path))))
    return module


def rollout(tok, reward_module, chats, pad_token_id):
    """Each chat through OpenRLHF's SingleTurnAgentExecutor.execute (the reward function called as OpenRLHF calls
    it, on the query it decodes) with a stand-in for vLLM that answers the scripted response, then
    SamplesGenerator._process_response_into_experience and Experience.concat_experiences: the batch layout the
    experience maker and the actor see."""
    import asyncio

    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    executor = SingleTurnAgentExecutor(remote_rm_url=str(reward_module))
    experiences, responses = [], []
    for user, response, finished in chats:
        messages = [{"role": "system", "content": "You recommend movies."}, {"role": "user", "content": user}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        action = tok.encode(response) + ([tok.eos_token_id] if finished else [])

        class Engine:  # vLLM's answer: the response tokens, EOS included when it stopped on it
            async def generate(self, prompt_token_ids, params, multi_modal_data=None):
                out = SimpleNamespace(token_ids=action, finish_reason="stop" if finished else "length", logprobs=None)
                return SimpleNamespace(outputs=[out])

        params = SimpleNamespace(max_tokens=64, logprobs=None)
        output = asyncio.run(executor.execute(prompt, "|".join(RELEVANT), params, 512, tok, Engine()))
        experiences.append(SamplesGenerator._process_response_into_experience(None, output, max_len=512))
        responses.append(action)
    return Experience.concat_experiences(experiences, pad_token_id), responses


@pytest.mark.parametrize("pad", ["pad", "eos"])
def test_chat_prompts_holding_the_eos_id(chat_tok, tmp_path, pad):
    """Prompts from a chat template that writes the EOS id: the response's own EOS gets the length shaping, each
    item its rank's advantage, exactly as when the response is segmented alone; rows padded with pad == EOS after
    a cut-off response get no shaping."""
    tok, path = chat_tok
    pad_id = tok.pad_token_id if pad == "pad" else tok.eos_token_id
    exp, responses = rollout(tok, readme_reward_module(path, tmp_path), CHATS, pad_id)
    A = exp.action_mask.shape[1]
    assert ((exp.sequences[:, -A:] == tok.eos_token_id) & ~exp.action_mask.bool()).sum(1).min() >= 2  # prompts
    items = adapter.RankItems.from_tokenizer(tok, batch.N)
    rank_adv = torch.tensor([[1.0, 2.0, 3.0]]).repeat(len(CHATS), 1)
    adv = items.token_advantages(rank_adv, exp.sequences, exp.action_mask)
    item_ids = items.item_ids(exp.sequences, exp.action_mask)
    for i, (response, (_, text, finished)) in enumerate(zip(responses, CHATS)):
        where = exp.action_mask[i].bool()
        assert exp.sequences[i, -A:][where].tolist() == response
        ids = torch.tensor([response])
        alone = segment_items(ids, torch.ones_like(ids, dtype=torch.bool), items.table, batch.N,
                              eos_token_id=tok.eos_token_id, skip_blank_lines=True)
        assert adv[i][where].tolist() == token_advantages(rank_adv[:1], alone)[0].tolist()
        assert item_ids[i][where].tolist() == alone.item_ids[0].tolist()
        assert (adv[i][~where] == 0).all() and (item_ids[i][~where] == -1).all()
        n_items = len(text.split("\n"))
        # EOS: +0.1 after exactly N items, -0.1 after fewer (early stop), -0.1 in the overflow bin after more
        shaping = (0.1 if n_items == batch.N else -0.1) if finished else None
        last = adv[i][where][-1].item()
        if shaping is None:  # cut off: the last token is an item token with its rank's advantage
            assert last == 3.0
        else:
            assert last == pytest.approx(shaping)


def test_readme_reward_function_on_openrlhf_queries(chat_tok, tmp_path):
    """The README's reward function, called by OpenRLHF 0.11 on the query it decodes (special tokens kept): the
    last item of a finished list is read without the EOS text, and its hit counts; the rewards become (B, N)."""
    tok, path = chat_tok
    exp, _ = rollout(tok, readme_reward_module(path, tmp_path), CHATS, tok.pad_token_id)
    rec_num = 20  # the README's
    assert exp.rewards is not None and exp.rewards.shape == (len(CHATS), rec_num)
    expected = [item_hits(text, RELEVANT, rec_num=rec_num) for _, text, _ in CHATS]
    assert exp.rewards.tolist() == expected
    assert expected[0][:3] == [0.0, 1.0, 1.0] and expected[1][:2] == [0.0, 1.0]  # last items of finished lists hit
    torch.testing.assert_close(exp.scores, torch.tensor(expected).mean(-1))


def test_import_is_lazy():
    code = "import sys, rankgrpo_kernels; print(sorted({'openrlhf', 'deepspeed', 'ray'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


IS_CORRECTIONS = [dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=(0.7, 1.4)),
                  dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.7, 1.4)),
                  dict(is_correction_level="seq", is_correction_mode="mask", is_correction_threshold=(0.97, 1.03)),
                  dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0.0, 0.05)),
                  dict(is_correction_level="seq", is_correction_gating="binary_kl",
                       is_correction_threshold=(0.0, 0.02))]


@pytest.mark.parametrize("correction", IS_CORRECTIONS)
@pytest.mark.parametrize("info", AGGREGATION)
def test_rollout_importance_sampling_correction_is_openrlhfs(tok, info, correction):
    """One item per token: OpenRLHF's PPO loss with its rollout correction, vLLM KL and filtered fraction."""
    b = openrlhf_batch(tok, seed=3)
    adv = torch.randn(b.logps.shape, dtype=torch.float64, generator=b.g) * b.action_mask
    rollout = b.old + 0.3 * torch.randn(b.old.shape, dtype=torch.float64, generator=b.g)
    items = torch.where(b.action_mask, torch.arange(b.logps.shape[1]).expand_as(b.logps), -1)
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, **correction)
    theirs = PolicyLoss(**kwargs)(b.logps, b.old, adv, action_mask=b.action_mask, rollout_log_probs=rollout, **info)
    ours = adapter.RankGRPOPolicyLoss(**kwargs)(b.logps, b.old, adv, action_mask=b.action_mask,
                                                rollout_log_probs=rollout, item_ids=items, **info)
    assert_same(ours, theirs, b.logps)
    torch.testing.assert_close(ours[3].double(), theirs[3].double())  # vLLM KL
    torch.testing.assert_close(ours[4].double(), theirs[4].double())  # filtered fraction
    assert 0 < theirs[4] < 1  # some units filtered, not all


def test_item_level_rollout_correction_weights_each_item_by_its_geometric_mean(tok):
    b = openrlhf_batch(tok, seed=4)
    items = adapter.RankItems.from_tokenizer(tok, 3).item_ids(b.sequences, b.action_mask)
    adv = torch.randn(b.logps.shape, dtype=torch.float64, generator=b.g) * b.action_mask
    rollout = b.old + 0.2 * torch.randn(b.old.shape, dtype=torch.float64, generator=b.g)
    loss_fn = adapter.RankGRPOPolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, is_correction_level="item",
                                         is_correction_threshold=(0.8, 1.25))
    ours = loss_fn(b.logps, b.old, adv, action_mask=b.action_mask, rollout_log_probs=rollout, item_ids=items)
    mask = b.action_mask & (items >= 0)
    from rankgrpo_kernels.importance import item_means

    geometric = item_means(b.old - rollout, items, mask).exp()
    keep = (geometric >= 0.8) & (geometric <= 1.25)
    assert keep[mask].any() and not keep[mask].all()
    weights = torch.where(keep, (b.old - rollout).exp(), 0.0)
    want, _ = reference_loss_from_logps(b.logps, items, adv, b.action_mask, b.old, epsilon_low=0.2,
                                        epsilon_high=0.28, loss_type="bnpo", policy_weights=weights)
    torch.testing.assert_close(ours[0], want)

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
from .bench import check_benchmark_provider

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


def trainer_args(kl_coef=0.0, entropy_coef=None, estimator="k3", unbiased_gradient=False):
    kl = SimpleNamespace(use_loss=True, init_coef=kl_coef, estimator=estimator, unbiased_gradient=unbiased_gradient)
    return SimpleNamespace(algo=SimpleNamespace(kl=kl), actor=SimpleNamespace(entropy_coef=entropy_coef,
                                                                             aux_loss_coef=0.0),
                           train=SimpleNamespace(dynamic_batch_enable=False))


@pytest.mark.parametrize("passed", [True, False])
def test_install_routes_training_step(tok, monkeypatch, passed):
    """The training step binds the item ids to the loss and the micro-batch to the fused forward, with the step's
    normalisers (computed as OpenRLHF's step does when the trainer passes none), and passes them on."""
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ray import ppo_actor

    from rankgrpo_kernels.adapters.openrlhf.forward_loss import current_forward_loss

    seen = {}

    def original(self, experience, kl_ctl, step, loss_batch_info=None):
        seen.update(item_ids=self.actor_loss_fn.bound_item_ids, bound=current_forward_loss(), info=loss_batch_info)
        return {"ok": 1}

    for module, name in ((ppo_trainer, "RemoteExperienceMaker"), (ppo_actor, "PolicyLoss")):
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(ppo_actor.ActorPPOTrainer, "training_step", original)
    items = adapter.install(tok, batch.N)
    assert issubclass(ppo_trainer.RemoteExperienceMaker, adapter.RankGRPOExperienceMaker)
    trainer = SimpleNamespace(actor_loss_fn=ppo_actor.PolicyLoss(clip_eps_low=0.06, clip_eps_high=0.08),
                              args=trainer_args(1e-3), strategy=SimpleNamespace(), replay_buffer=None)
    b = openrlhf_batch(tok)
    experience = SimpleNamespace(sequences=b.sequences, action_mask=b.action_mask)
    info = {"dp_size": 2, "batch_num_tokens": torch.tensor(70.0), "global_batch_size": torch.tensor(13.0)}
    status = ppo_actor.ActorPPOTrainer.training_step(trainer, experience, 1e-3, 0, *([info] if passed else []))
    assert status == {"ok": 1}
    torch.testing.assert_close(seen["item_ids"], items.item_ids(b.sequences, b.action_mask))
    bound = seen["bound"]
    assert bound.experience is experience and bound.kl_coef == 1e-3 and bound.policy_loss is trainer.actor_loss_fn
    assert seen["info"] is bound.batch_info and bound.result is None
    if passed:
        assert bound.batch_info is info
    else:
        assert bound.batch_info["dp_size"] == 1 and bound.batch_info["batch_num_tokens"] == b.action_mask.sum()
    assert trainer.actor_loss_fn.bound_item_ids is None and current_forward_loss() is None


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


class _Strategy:
    """OpenRLHF's strategy as its training step uses it on one process: the backward records the loss."""

    ring_attn_group = None

    def backward(self, loss, model, optimizer):
        self.loss = loss.detach()
        loss.backward()

    def optimizer_step(self, *args, **kwargs):
        pass

    def get_grad_norm(self, model):
        return 0.0


CORRECTIONS = {
    None: {},
    "token": dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=(0.93, 1.07)),
    "seq": dict(is_correction_level="seq", is_correction_mode="mask", is_correction_threshold=(0.99, 1.01)),
    "item": dict(is_correction_level="item", is_correction_threshold=(0.97, 1.03)),
}
INFO = {"dp_size": 2, "batch_num_tokens": 150.0, "global_batch_size": 13.0}
FORWARD_CASES = [  # (form, token_level_loss, dual_clip, correction, kl_coef, kl_estimator, unbiased_gradient,
    #                 entropy_coef, loss_batch_info); the first five compute the loss in the forward
    ("code", True, 3.0, "token", 0.0, "k3", False, None, INFO),
    ("code", True, None, "seq", 0.3, "k3", False, 0.05, INFO),
    ("code", True, None, None, 0.3, "k3", False, 0.0, None),
    ("code", False, 3.0, "item", 0.0, "k3", False, None, INFO),
    ("rank", True, None, None, 0.0, "k3", False, None, INFO),
    # the recompute path: a KL estimator or gradient the fused loss lacks, a KL or entropy term over the per-sample
    # aggregation, the paper form with a KL or entropy term
    ("code", True, None, None, 0.3, "k1", False, None, INFO),
    ("code", True, None, None, 0.3, "k2", False, None, INFO),
    ("code", True, None, None, 0.3, "k3", True, None, INFO),
    ("code", False, None, None, 0.3, "k3", False, None, INFO),
    ("code", False, None, None, 0.0, "k3", False, 0.05, INFO),
    ("rank", True, None, None, 0.0, "k3", False, 0.0, INFO),
]


@pytest.mark.parametrize("form, token_level_loss, dual_clip, correction, kl_coef, estimator, unbiased, entropy_coef, "
                         "info", FORWARD_CASES)
def test_loss_in_the_forward_matches_openrlhfs_step(tok, monkeypatch, form, token_level_loss, dual_clip, correction,
                                                    kl_coef, estimator, unbiased, entropy_coef, info):
    """OpenRLHF's own ``training_step``, installed, with the loss computed in the fused actor forward (or, where the
    options rule it out, every action token's log-prob) equals the same step on the recompute path (``options``
    None: the log-probs into the policy loss, OpenRLHF's KL and entropy terms after; in float64, where OpenRLHF's
    own forward casts its logits to float32, ``test_fused_actor_forward_matches_openrlhf``): loss, gradients of every
    parameter and metrics, for each option (clip range, dual clip, rollout correction, KL estimator, entropy term,
    aggregation and global normalisers, form)."""
    from openrlhf.models.actor import Actor
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ray import ppo_actor
    from transformers import LlamaConfig, LlamaForCausalLM

    for module, name in ((ppo_trainer, "RemoteExperienceMaker"), (ppo_actor, "PolicyLoss")):
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(ppo_actor.ActorPPOTrainer, "training_step", ppo_actor.ActorPPOTrainer.training_step)
    monkeypatch.setattr(Actor, "forward", Actor.forward)
    items = adapter.install(tok, batch.N, form=form)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2)).double()
    actor = Actor(model, temperature=0.7)
    actor.packing_samples = False
    b = openrlhf_batch(tok, seed=6)
    attention = (b.sequences != tok.pad_token_id).long()
    rank_adv = rank_advantages(batch.hits(b.g), batch.G).double()
    rank_adv[:, 1] = 0.0  # rank 1 without advantage anywhere: skipped at beta 0
    mask = b.action_mask.float()
    with torch.no_grad():
        logps = actor(b.sequences, b.action_mask, attention_mask=attention)
    noise = torch.randn((3, *mask.shape), generator=b.g, dtype=torch.float64) * mask
    old, ref = logps + 0.05 * noise[0], logps + 0.3 * noise[1]
    loss_fn = ppo_actor.PolicyLoss(clip_eps_low=0.06, clip_eps_high=0.08, dual_clip=dual_clip,
                                   token_level_loss=token_level_loss, **CORRECTIONS[correction])
    args = trainer_args(kl_coef, entropy_coef, estimator, unbiased)
    trainer = SimpleNamespace(actor=actor, actor_loss_fn=loss_fn, args=args, strategy=_Strategy(), aux_loss=False,
                              ema_model=None, actor_optim=None, replay_buffer=None,
                              actor_scheduler=SimpleNamespace(get_last_lr=lambda: [0.0]))

    def step():
        model.zero_grad()
        experience = Experience(
            sequences=b.sequences, attention_mask=attention, action_mask=b.action_mask, action_log_probs=old,
            base_action_log_probs=ref, rollout_log_probs=old + 0.05 * noise[2],
            advantages=items.token_advantages(rank_adv, b.sequences, b.action_mask), info={})
        status = ppo_actor.ActorPPOTrainer.training_step(trainer, experience, kl_coef, 0,
                                                         None if info is None else dict(info))
        return trainer.strategy.loss, {n: p.grad.clone() for n, p in model.named_parameters()}, status["metrics"]

    from rankgrpo_kernels.adapters.openrlhf.forward_loss import ForwardLoss

    adapter.patch_actor_forward()
    with monkeypatch.context() as recompute:
        recompute.setattr(ForwardLoss, "options", lambda self: None)
        theirs = step()
    ours = step()
    # OpenRLHF's KL (compute_approx_kl) runs in float32
    loss_tol, grad_tol = ((1e-6, 1e-8), (1e-5, 1e-7)) if kl_coef else ((1e-9, 1e-12), (1e-7, 1e-10))
    torch.testing.assert_close(ours[0], theirs[0], rtol=loss_tol[0], atol=loss_tol[1])
    for name, grad in theirs[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=grad_tol[0], atol=grad_tol[1],
                                   msg=lambda m, name=name: f"{name}: {m}")
    fused_path = "ppo_kl" not in ours[2]
    assert fused_path == (FORWARD_CASES.index((form, token_level_loss, dual_clip, correction, kl_coef, estimator,
                                                unbiased, entropy_coef, info)) < 5)
    dropped = {"ppo_kl", "logprobs_diff"} if fused_path and kl_coef else {"ppo_kl"} if fused_path else set()
    assert set(ours[2]) == set(theirs[2]) - dropped
    for name in set(ours[2]) - {"actor_lr", "actor_grad_norm"}:
        torch.testing.assert_close(torch.as_tensor(ours[2][name]).double(), torch.as_tensor(theirs[2][name]).double(),
                                   rtol=loss_tol[0], atol=loss_tol[1], msg=lambda m, name=name: f"{name}: {m}")
    assert theirs[2]["ppo_clip_ratio"] > 0


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


def test_benchmark_provider_matches_eager(tmp_path):
    check_benchmark_provider("openrlhf", tmp_path)

"""The TRL 1.16 adapter and the plain-loop helpers on the tiny local recommender (CPU, no download).

End to end training, equality with the reference loss from full logits and with TRL's own sequence-level loss,
segmentation against the reward's ``split_items``, and the errors for bad rewards and settings.
"""

from __future__ import annotations

import copy
import subprocess
import warnings
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.experimental.gmpo import GMPOConfig, GMPOTrainer  # noqa: E402

from rankgrpo_kernels import ObjectiveSpec, rank_advantages, split_items, token_advantages  # noqa: E402
from rankgrpo_kernels.adapters.hf_model import full_head_tensor, head_rows, run_inside_forward  # noqa: E402
from rankgrpo_kernels.recommender import item_hits  # noqa: E402
from rankgrpo_kernels.adapters.plain import (  # noqa: E402
    per_rank_tensor,
    rank_grpo_loss_for_model,
    rank_grpo_step_inputs,
)
from integrations.tiny_recommender import (  # noqa: E402
    ALL_TITLES,
    build_model,
    build_tiny_recommender,
    hit_reward,
)
from rankgrpo_kernels.adapters.trl import (  # noqa: E402
    RankGRPOConfig,
    RankGRPOTrainer,
    check_fsdp_plugin,
    check_trl_version,
)
from rankgrpo_kernels.contract import LOSS_TYPES, POLICY  # noqa: E402
from rankgrpo_kernels.reference import reference_loss_from_logps  # noqa: E402

REC_NUM = 4
SAMPLING_METRICS = ("rewards/rank_1/mean", "rewards/rank_4/mean", "items/emitted_mean", "items/exact_ratio",
                    "rewards/rank_1/frac_zero_std", "frac_rank_reward_zero_std")
LOSS_METRICS = ("clip_ratio/region_mean", "ratio/mean", "kl", "entropy")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    """The tiny recommender after a short warm start: lists of titles, not yet good ones (enough for these tests)."""
    return build_tiny_recommender(tmp_path_factory.mktemp("tiny") / "model", rec_num=REC_NUM, warm_steps=60)


def fresh_model(world):
    return LlamaForCausalLM.from_pretrained(world.path)


def trl_settings(tmp_path, **overrides) -> dict:
    """Small, fast, float32 CPU settings shared by RankGRPOConfig and GRPOConfig."""
    return dict(
        output_dir=str(tmp_path / "run"), num_generations=4, per_device_train_batch_size=8, max_completion_length=24,
        max_steps=3, logging_steps=1, learning_rate=1e-3, beta=0.04, seed=0, bf16=False,
        activation_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
    ) | overrides


def rank_config(tmp_path, **overrides) -> RankGRPOConfig:
    return RankGRPOConfig(**trl_settings(tmp_path, rec_num=REC_NUM) | overrides)


def rank_trainer(world, tmp_path, reward=None, **overrides) -> RankGRPOTrainer:
    return RankGRPOTrainer(model=fresh_model(world), reward_funcs=reward or hit_reward(REC_NUM),
                           args=rank_config(tmp_path, **overrides), train_dataset=Dataset.from_list(world.rows),
                           processing_class=world.tokenizer)


def scored_batch(trainer, world, prompts: int = 2):
    """One generation batch as the loss sees it, with the window size ``Trainer.train`` would have set."""
    torch.manual_seed(0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [row for row in world.rows[::7][:prompts] for _ in range(trainer.num_generations)]
    return trainer._generate_and_score_completions(rows)


def test_import_of_the_core_library_needs_neither_trl_nor_transformers():
    code = ("import sys, rankgrpo_kernels, rankgrpo_kernels.adapters; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'trl', 'transformers', 'datasets'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_the_adapter_without_trl_says_how_to_install_it():
    code = ("import importlib.metadata as metadata\n"
            "def missing(name):\n    raise metadata.PackageNotFoundError(name)\n"
            "metadata.version = missing\n"
            "import rankgrpo_kernels.adapters.trl\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "ImportError: rankgrpo_kernels.adapters.trl needs TRL: pip install" in result.stderr


@pytest.mark.parametrize("installed", ["1.15.2", "1.17.0", "2.0.0"])
def test_trl_outside_the_supported_range_is_refused(installed):
    with pytest.raises(ImportError, match=r"trl>=1.16,<1.17"):
        check_trl_version(installed)
    check_trl_version("1.16.4")


def test_fsdp_version_1_is_refused_with_the_fix():
    with pytest.raises(NotImplementedError, match=r"FSDP version 2 .*fsdp_version: 2.*Found fsdp_version=1"):
        check_fsdp_plugin(SimpleNamespace(fsdp_version=1))
    check_fsdp_plugin(SimpleNamespace(fsdp_version=2))


class _Doubler(torch.nn.Module):
    """A stand-in for DDP / DeepSpeed wrappers: it changes the inputs, then calls the wrapped module's forward."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, scale=1.0):
        return self.module(2 * x, scale=scale)


def test_run_inside_forward_runs_in_the_wrappers_call_and_leaves_the_model_as_it_was():
    inner = torch.nn.Linear(3, 3)
    wrapper = _Doubler(inner)
    x = torch.ones(3)
    seen, own = [], {}

    def fn(y, scale):
        seen.append((y, scale))
        assert vars(inner).get("forward") is own.get("forward")  # the model's forward is back while fn runs
        return inner(y) * scale

    torch.testing.assert_close(run_inside_forward(wrapper, inner, fn, x, scale=3.0), inner(2 * x) * 3.0)
    torch.testing.assert_close(seen[0][0], 2 * x)  # fn got the arguments as the wrapper passed them on
    assert "forward" not in vars(inner)  # no instance attribute left behind

    def own_forward(y, scale=1.0):
        return y
    inner.forward = own["forward"] = own_forward  # set on the instance by someone else (as TRL's fused LM head is)
    run_inside_forward(wrapper, inner, fn, x, scale=1.0)
    assert vars(inner)["forward"] is own_forward

    def failing(y, scale):
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        run_inside_forward(wrapper, inner, failing, x)
    assert vars(inner)["forward"] is own_forward

    with pytest.raises(RuntimeError, match="did not call the forward"):
        run_inside_forward(torch.nn.Identity(), inner, fn, x)
    assert vars(inner)["forward"] is own_forward


def test_head_helpers_pass_plain_heads_through_and_read_partitioned_sizes():
    weight = torch.randn(5, 3)
    assert full_head_tensor(weight) is weight and full_head_tensor(None) is None
    assert head_rows(weight) == 5
    partitioned = torch.empty(0)
    partitioned.ds_shape = torch.Size([11, 3])  # what DeepSpeed ZeRO-3 leaves on a partitioned parameter
    assert head_rows(partitioned) == 11


@pytest.mark.parametrize(("overrides", "match"), [
    (dict(num_generations=1), "at least 2 generations"),
    (dict(loss_type="gmpo"), "loss_type must be one of"),
    (dict(loss_type="cispo", delta=2.0), "leave delta None"),
    (dict(loss_type="sapo", sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True), "gamma weight"),
    (dict(ratio_clip="token", top_entropy_quantile=0.5), "geometric mean"),
    (dict(ratio_clip="token", loss_type="cispo"), "ratio_clip='token'"),
    (dict(importance_sampling_level="segment"), "importance_sampling_level"),
    (dict(loss_type="rank", list_reward="dcg"), "list_reward"),
    (dict(loss_type="rank", importance_sampling_level="token"), "importance_sampling_level"),
    (dict(reward_kind="exp"), "gamma"),
    (dict(rec_num=0), "rec_num"),
])
def test_config_rejects_unsupported_settings(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        rank_config(tmp_path, **overrides)


def test_trainer_rejects_one_eval_generation_and_reward_models(world, tmp_path):
    with pytest.raises(ValueError, match="num_generations_eval must be >= 2"):
        rank_trainer(world, tmp_path, num_generations_eval=1)
    with pytest.raises(TypeError, match="per-rank rewards"):
        RankGRPOTrainer(model=fresh_model(world), reward_funcs=fresh_model(world), args=rank_config(tmp_path),
                        train_dataset=Dataset.from_list(world.rows), processing_class=world.tokenizer)


@pytest.mark.parametrize(("output", "match"), [
    ([[1.0, 0.0, 0.0], [0.0] * REC_NUM], "gave 3 values for completion 0, expected rec_num=4"),
    ([[0.0] * REC_NUM, None], "gave None for completion 1"),
    ([[0.0, float("nan"), 0.0, 0.0], [0.0] * REC_NUM], "nan at rank 1 of completion 0"),
    ([[0.0, None, 0.0, 0.0], [0.0] * REC_NUM], "None at rank 1 of completion 0"),
    ([1.0, 0.0], "not one number"),
    ([[0.0] * REC_NUM], "returned 1 entries for 2 completions"),
])
def test_bad_reward_outputs_get_clear_errors(world, tmp_path, output, match):
    def bad_reward(completions, **kwargs):
        return output

    trainer = rank_trainer(world, tmp_path, reward=bad_reward, beta=0.0)
    with pytest.raises(ValueError, match=match) as error:
        trainer._calculate_rewards([{"prompt": "p"}] * 2, ["p"] * 2, ["a", "b"], [[1], [2]])
    assert "bad_reward" in str(error.value)


def test_rewards_are_weighted_per_rank_and_summarised_for_trl(world, tmp_path):
    def first_rank(completions, **kwargs):
        return [[1.0, 0.0, 0.0, 0.0] for _ in completions]

    def all_hits(completions, **kwargs):
        return [[1.0] * REC_NUM for _ in completions]

    trainer = rank_trainer(world, tmp_path, reward=[first_rank, all_hits], reward_weights=[2.0, 0.5], beta=0.0,
                           reward_kind="dcg")
    summary = trainer._calculate_rewards([{"prompt": "p"}] * 2, ["p"] * 2, ["a", "b"], [[1], [2]])
    dcg = 1 / torch.log2(torch.arange(REC_NUM) + 2.0)
    expected = 2.0 * torch.tensor([dcg[0], 0, 0, 0]) + 0.5 * dcg.flip(0).cumsum(0).flip(0)
    weighted = (trainer._rank_rewards * trainer.reward_weights[None, :, None]).sum(1)  # (B, F, N) kept per function
    torch.testing.assert_close(weighted, expected.expand(2, REC_NUM))
    assert summary.shape == (2, 2)  # one mean over ranks per reward function, for TRL's logs


@pytest.mark.parametrize("list_reward", [None, "sum"])
def test_gdpo_normalises_each_reward_function_per_rank_then_sums(world, tmp_path, list_reward):
    """``multi_objective_aggregation="normalize_then_sum"`` (GDPO) per rank, as GRPOTrainer does per completion:
    each function's group-normalised rewards, weighted, summed, then normalised over the batch. With one rank (or a
    list reward) it is TRL's own formula, written out here from GRPOTrainer."""
    rec_num = 1 if list_reward is None else REC_NUM
    trainer = rank_trainer(world, tmp_path, reward=[hit_reward(rec_num), hit_reward(rec_num)], rec_num=rec_num,
                           reward_weights=[2.0, 0.5], multi_objective_aggregation="normalize_then_sum",
                           list_reward=list_reward, length_shaping=False, beta=0.0)
    inputs = scored_batch(trainer, world)
    B = inputs["completion_ids"].shape[0]
    rewards = torch.rand(B, 2, rec_num, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    fields = trainer._rank_fields(inputs["completion_ids"], inputs["completion_mask"], rewards, "train")

    per_function = rewards.sum(2)  # (B, F): the one rank, or the list reward "sum"
    grouped = per_function.view(-1, 4, 2)
    normalised = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(B, 2)
    summed = (normalised * torch.tensor([2.0, 0.5], dtype=torch.float64)).sum(1)
    trl_advantages = (summed - summed.mean()) / (summed.std() + 1e-4)
    content = fields["item_ids"] >= 0
    if list_reward is None:  # the code form: only the item's tokens carry the rank's advantage (no shaping)
        content = trainer._segment(inputs["completion_ids"], inputs["completion_mask"]).content_mask
    expected = trl_advantages[:, None] * content
    torch.testing.assert_close(fields["advantages"], expected, rtol=1e-12, atol=1e-12)


def any_title_hits(completions, **kwargs):
    """Per-rank hits for any catalogue title: the barely warm-started model scores some, so advantages are not 0."""
    return [item_hits(text, ALL_TITLES, REC_NUM) for text in completions]


@pytest.mark.parametrize(("loss_type", "num_iterations", "objective"), [
    ("bnpo", 1, {}), ("rank", 2, {}), ("grpo", 2, dict(importance_sampling_level="sequence", list_reward="dcg"))])
def test_end_to_end_training_steps(world, tmp_path, loss_type, num_iterations, objective):
    trainer = rank_trainer(world, tmp_path, reward=any_title_hits, loss_type=loss_type, num_iterations=num_iterations,
                           **objective)
    forward = vars(trainer.model).get("forward")  # TRL's own fused LM head patches it; the fused loss does not
    seen_old_logps, compute_loss = [], trainer._compute_loss

    def recording_compute_loss(model, inputs):
        seen_old_logps.append("old_per_token_logps" in inputs)
        return compute_loss(model, inputs)

    trainer._compute_loss = recording_compute_loss
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert all(name in entry for entry in logs for name in LOSS_METRICS)
    assert all(name in logs[0] for name in SAMPLING_METRICS)  # logged where completions were sampled
    assert logs[0]["rewards/any_title_hits/std"] > 0
    assert any((b != a).any() for b, a in zip(before, trainer.model.parameters()))
    assert all(seen_old_logps) == (num_iterations > 1)  # off-policy reuse needs the behaviour log-probs
    assert vars(trainer.model).get("forward") is forward


def reference_from_full_logits(model, inputs, temperature, **loss_kwargs):
    """The spec's loss from the model's own full logits (B, T, V), nothing fused."""
    completion_ids = inputs["completion_ids"]
    T = completion_ids.shape[1]
    logits = model(input_ids=torch.cat([inputs["prompt_ids"], completion_ids], 1),
                   attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)).logits
    logps = (logits[:, -T - 1 : -1] / temperature).log_softmax(-1).gather(-1, completion_ids[..., None])[..., 0]
    return reference_loss_from_logps(
        logps, inputs["item_ids"], inputs["advantages"], inputs["completion_mask"], inputs["old_per_token_logps"],
        inputs["ref_per_token_logps"], **loss_kwargs,
    )[0]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_loss_and_gradients_equal_the_reference_from_full_logits(world, tmp_path, loss_type):
    trainer = rank_trainer(world, tmp_path, loss_type=loss_type, temperature=0.7, epsilon=0.06, epsilon_high=0.08)
    inputs = scored_batch(trainer, world)
    trainer.model.double()
    noise = torch.Generator().manual_seed(1)
    # Per-rank rewards drawn here: the tiny model's completions may hit no rank, leaving every advantage 0.
    rewards = torch.rand(inputs["completion_ids"].shape[0], REC_NUM, generator=noise, dtype=torch.float64)
    inputs.update(trainer._rank_fields(inputs["completion_ids"], inputs["completion_mask"], rewards, "train"))
    inputs["ref_per_token_logps"] = inputs["ref_per_token_logps"].double()
    # Behaviour log-probs off the current ones, so that item ratios move and some clip.
    with torch.no_grad():
        current = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])[0]
    row_shift = 0.2 * torch.randn(current.shape[0], 1, generator=noise, dtype=torch.float64)  # ratios past the clip
    inputs["old_per_token_logps"] = current + row_shift + 0.1 * torch.randn(current.shape, generator=noise,
                                                                            dtype=torch.float64)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    fused = trainer._compute_loss(trainer.model, inputs)
    fused_grads = torch.autograd.grad(fused, params)
    reference = reference_from_full_logits(
        trainer.model, inputs, 0.7, epsilon_low=0.06, epsilon_high=0.08, beta=0.04, loss_type=loss_type,
        max_completion_length=trainer.max_completion_length, num_items_in_batch=inputs["num_items_in_batch"].item(),
        rec_num=REC_NUM,
    )
    reference_grads = torch.autograd.grad(reference, params)

    torch.testing.assert_close(fused, reference, rtol=1e-9, atol=1e-12)
    for fused_grad, reference_grad in zip(fused_grads, reference_grads):
        torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-7, atol=1e-10)
    if POLICY[loss_type] == 0:
        assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] > 0  # the clipped branch was exercised


# TRL has no "rank"; "gmpo": TRL's experimental GMPOTrainer against loss_type="grpo" with ratio_clip="token"
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "rank"] + ["gmpo"])
@pytest.mark.parametrize("entropy_coef,option", [(0.0, None), (0.05, None), (0.0, "vllm_is"),
                                                 (0.0, "off_policy_mask"), (0.05, "top_entropy_adaptive"),
                                                 (0.0, "bias_corrected_kl")])
@pytest.mark.parametrize("items", ["completion", "token"])
def test_one_item_per_completion_or_token_equals_trls_loss(world, tmp_path, loss_type, entropy_coef, option, items):
    """With one item per completion (no newline, no EOS) the item ratio is TRL's sequence-level ratio (GSPO; for
    VESPO the product ratio, its own); with one item per token, TRL's token-level ratio. TRL's entropy bonus (a
    token mean, scaled for accumulation only) with its gradient; TRL's vLLM importance-sampling ratio
    ("sequence_mask", as GRPOTrainer hands it over) and its off-policy sequence mask, here per item; the
    high-entropy mask with the adaptive bonus on the same tokens and its controller; the KL weighted by the
    ratio (``use_bias_correction_kl``); GMPO's clipping inside the geometric mean; each loss type's metrics."""
    if loss_type == "vespo" and option == "vllm_is":
        pytest.skip("refused: TRL folds the sampler's ratio into VESPO's weight "
                    "(test_config_rejects_unsupported_settings)")
    if items == "token" and (loss_type == "vespo" or option in ("vllm_is", "off_policy_mask")):
        pytest.skip("TRL's VESPO weight, sequence IS ratio and off-policy mask are per sequence, not per token item")
    settings = dict(loss_type=loss_type, epsilon=0.1, epsilon_high=0.15 if loss_type != "cispo" else 1.05,
                    temperature=0.8, entropy_coef=entropy_coef,
                    off_policy_mask_threshold=0.01 if option == "off_policy_mask" else None)
    if option == "top_entropy_adaptive":
        settings.update(top_entropy_quantile=0.5, use_adaptive_entropy=True, entropy_coef_delta=0.02,
                        entropy_target=100.0)
    settings.update(use_bias_correction_kl=option == "bias_corrected_kl", beta=0.04 if option else 0.0)
    trainer_class, config_class, ours = GRPOTrainer, GRPOConfig, {}
    if loss_type == "gmpo":  # GMPO's loss has no entropy bonus, masks, IS ratio or KL correction
        if items == "token" or option is not None or entropy_coef:
            pytest.skip("GMPOTrainer: one sequence-level form, no options")
        trainer_class, config_class, ours = GMPOTrainer, GMPOConfig, {"ratio_clip": "token"}
        settings.update(loss_type="grpo", epsilon=0.3, epsilon_high=0.2, beta=0.04)
    rank = rank_trainer(world, tmp_path, reward=hit_reward(1), rec_num=1, length_shaping=False, **settings, **ours)
    trl_args = config_class(**trl_settings(tmp_path, importance_sampling_level="sequence" if items == "completion"
                                           else "token", **settings))
    trl = trainer_class(model=fresh_model(world), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                        args=trl_args, train_dataset=Dataset.from_list(world.rows), processing_class=world.tokenizer)
    inputs = scored_batch(rank, world)
    trl.model.train()
    trl.current_gradient_accumulation_steps = 1

    # Completions of content tokens only: one item each, and no EOS, so no length shaping either.
    completion_ids = inputs["completion_ids"]
    eos_ids = torch.tensor(rank.eos_token_ids)
    content = (rank._line_table[completion_ids, 0] == 0) & ~torch.isin(completion_ids, eos_ids)
    completion_ids = torch.where(content, completion_ids, world.tokenizer.convert_tokens_to_ids("Star"))
    inputs["completion_ids"] = completion_ids
    rank.model.double(), trl.model.double()
    sequences = torch.cat([inputs["prompt_ids"], completion_ids], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        current, _, _ = rank._get_per_token_logps_and_entropies(rank.model, sequences, attention_mask,
                                                                completion_ids.shape[1])
    noise = torch.Generator().manual_seed(2)
    row_shift = 0.2 * torch.randn(current.shape[0], 1, generator=noise, dtype=current.dtype)  # ratios beyond the clip
    inputs["old_per_token_logps"] = current + row_shift + 0.1 * torch.randn(current.shape, generator=noise,
                                                                            dtype=current.dtype)
    inputs["ref_per_token_logps"] = current + 0.1 * torch.randn(current.shape, generator=noise, dtype=current.dtype)
    rewards = torch.rand(completion_ids.shape[0], 1, generator=noise, dtype=torch.float64)
    rank_inputs = {**inputs, **rank._rank_fields(completion_ids, inputs["completion_mask"], rewards, "train")}
    assert (rank_inputs["item_ids"][inputs["completion_mask"].bool()] == 0).all()
    if items == "token":
        positions = torch.arange(completion_ids.shape[1]).expand_as(completion_ids)
        rank_inputs["item_ids"] = torch.where(rank_inputs["item_ids"] >= 0, positions, -1)
    trl_inputs = {**inputs, "advantages": rank_advantages(rewards, num_generations=4)[:, 0]}  # TRL's (B,) form
    if option is not None:  # sampler log-probs off the old ones, as vLLM's are
        sampler = inputs["old_per_token_logps"] + 0.3 * torch.randn(current.shape, generator=noise,
                                                                    dtype=current.dtype)
        if option == "off_policy_mask":  # one sequence with a negative advantage far off the policy, the rest near
            negative = trl_inputs["advantages"] < 0
            far = negative & (negative.cumsum(0) == 1)
            sampler = current + 0.05 * torch.randn(current.shape, generator=noise, dtype=current.dtype)
            sampler = sampler + torch.where(far, 0.5, -0.05)[:, None]
        for batch in (rank_inputs, trl_inputs):
            batch["sampling_per_token_logps"] = sampler
    if option == "vllm_is":
        mask = inputs["completion_mask"]
        ratio = ((inputs["old_per_token_logps"] - sampler) * mask).sum(-1, keepdim=True).exp()
        ratio = ratio.masked_fill(ratio > 3.0, 0.0)
        assert (ratio == 0).any() and (ratio != 0).any()
        for trainer, batch in ((rank, rank_inputs), (trl, trl_inputs)):
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
            batch["importance_sampling_ratio"] = ratio

    if option == "top_entropy_adaptive":
        rank._last_world_entropy = trl._last_world_entropy = 0.0  # below the target: the bonus applies this step
    rank_loss = rank._compute_loss(rank.model, rank_inputs)
    trl_loss = trl._compute_loss(trl.model, trl_inputs)
    if option == "top_entropy_adaptive":  # the controller measured the same tokens
        assert rank._last_world_entropy == pytest.approx(trl._last_world_entropy, rel=1e-5)
        assert rank.entropy_coef == pytest.approx(trl.entropy_coef) == pytest.approx(0.07)
        rank.entropy_coef = trl.entropy_coef = 0.05  # the coefficient the loss applied
    # Each loss type's metric names as TRL's (token means here, sequence means in TRL at this level: not compared);
    # the per-sequence clip fractions.
    type_metrics = {"clip_ratio/low_mean", "clip_ratio/low_min", "cispo_clip_ratio", "vespo/phi_seq_mean"}
    logged = {name for name, values in trl._metrics["train"].items() if values}
    assert type_metrics & logged == type_metrics & {name for name, v in rank._metrics["train"].items() if v}
    for name in {"clip_ratio/low_min", "clip_ratio/high_max"} & logged:
        assert rank._metrics["train"][name][-1] == pytest.approx(trl._metrics["train"][name][-1], abs=1e-6), name
    if option == "off_policy_mask":  # the mask drops the far sequence
        rank.off_policy_mask_threshold = None
        assert not torch.allclose(rank._compute_loss(rank.model, rank_inputs), rank_loss)
        rank.off_policy_mask_threshold = 0.01
    # TRL's chunked log-prob kernel works in float32 even for a float64 model: float32 tolerances.
    torch.testing.assert_close(rank_loss, trl_loss, rtol=1e-5, atol=1e-8)
    for mine, theirs in zip(torch.autograd.grad(rank_loss, list(rank.model.parameters())),
                            torch.autograd.grad(trl_loss, list(trl.model.parameters()))):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())
    clip_metric = {"sapo": None, "cispo": "cispo_clip_ratio", "vespo": None}.get(loss_type, "clip_ratio/region_mean")
    if clip_metric is not None:
        assert trl._metrics["train"][clip_metric][-1] > 0  # some sequence ratios were clipped


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_list_reward_baselines_equal_trls_own_loss(world, tmp_path, level, loss_type):
    """The paper's baselines, GRPO (token ratios) and GSPO (sequence ratios) with one DCG reward per list: the loss
    and gradients of RankGRPOTrainer are those of TRL's GRPOTrainer at the same importance_sampling_level, given the
    same completions and the group advantages of the lists' DCG."""
    settings = dict(loss_type=loss_type, epsilon=0.1, epsilon_high=0.15, temperature=0.8,
                    importance_sampling_level=level)
    rank = rank_trainer(world, tmp_path, list_reward="dcg", length_shaping=False, **settings)
    trl = GRPOTrainer(model=fresh_model(world), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                      args=GRPOConfig(**trl_settings(tmp_path, use_bias_correction_kl=False, **settings)),
                      train_dataset=Dataset.from_list(world.rows), processing_class=world.tokenizer)
    inputs = scored_batch(rank, world)
    trl.model.train()
    trl.current_gradient_accumulation_steps = 1
    rank.model.double(), trl.model.double()
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    with torch.no_grad():
        current, _, _ = rank._get_per_token_logps_and_entropies(
            rank.model, torch.cat([inputs["prompt_ids"], completion_ids], 1),
            torch.cat([inputs["prompt_mask"], completion_mask], 1), completion_ids.shape[1])
    noise = torch.Generator().manual_seed(4)
    row_shift = 0.2 * torch.randn(current.shape[0], 1, generator=noise, dtype=current.dtype)  # ratios past the clip
    inputs["old_per_token_logps"] = current + row_shift + 0.1 * torch.randn(current.shape, generator=noise,
                                                                            dtype=current.dtype)
    inputs["ref_per_token_logps"] = current + 0.1 * torch.randn(current.shape, generator=noise, dtype=current.dtype)
    rewards = torch.rand(completion_ids.shape[0], REC_NUM, generator=noise, dtype=torch.float64)
    rank_inputs = {**inputs, **rank._rank_fields(completion_ids, completion_mask, rewards, "train")}
    dcg = (rewards / torch.log2(torch.arange(REC_NUM, dtype=torch.float64) + 2)).sum(1)
    trl_inputs = {**inputs, "advantages": rank_advantages(dcg[:, None], num_generations=4)[:, 0]}  # TRL's (B,)

    rank_loss = rank._compute_loss(rank.model, rank_inputs)
    trl_loss = trl._compute_loss(trl.model, trl_inputs)
    # TRL's chunked log-prob kernel works in float32 even for a float64 model: float32 tolerances.
    torch.testing.assert_close(rank_loss, trl_loss, rtol=1e-5, atol=1e-8)
    for mine, theirs in zip(torch.autograd.grad(rank_loss, list(rank.model.parameters())),
                            torch.autograd.grad(trl_loss, list(trl.model.parameters()))):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())
    assert trl._metrics["train"]["clip_ratio/region_mean"][-1] > 0  # some ratios were clipped


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ratio_ablations_keep_the_per_rank_advantages(world, tmp_path, level):
    """The ablations change the unit of the ratio only: the trainer hands the loss the item level's per-token
    advantages, with one id per token or per row on the same tokens."""
    item = rank_trainer(world, tmp_path, beta=0.0)
    ablation = rank_trainer(world, tmp_path, beta=0.0, importance_sampling_level=level)
    inputs = scored_batch(item, world)
    rewards = torch.rand(inputs["completion_ids"].shape[0], REC_NUM, generator=torch.Generator().manual_seed(5))
    fields = [trainer._rank_fields(inputs["completion_ids"], inputs["completion_mask"], rewards, "train")
              for trainer in (item, ablation)]
    torch.testing.assert_close(fields[1]["advantages"], fields[0]["advantages"], rtol=0, atol=0)
    in_loss = fields[0]["item_ids"] >= 0
    assert torch.equal(fields[1]["item_ids"] >= 0, in_loss)
    ids = fields[1]["item_ids"]
    expected = torch.arange(ids.shape[1]).expand_as(ids) if level == "token" else torch.zeros_like(ids)
    assert torch.equal(ids[in_loss], expected[in_loss])


ALIGNMENT_TEXTS = [
    "Here are my picks:\n\nStar Harbor\n\n\nMoon Drift\nOrbit Nine",  # preamble, "\n\n" tokens, blank lines
    "\n\nStar Harbor\nMoon Drift\n\n",  # leading and trailing blank lines
    "Star Harbor\n \nMoon Drift\nOrbit Nine\nVoid Runner\nGalaxy Ward",  # a whitespace line, overflow past N
    "Quiet River\nLetters Home\nPaper Crowns\nSilent Field",  # exactly N
]


def test_segments_agree_with_the_items_the_reward_sees(world, tmp_path):
    trainer = rank_trainer(world, tmp_path, beta=0.0, num_generations=2, skip_blank_lines=True, length_shaping=False)
    tokenizer = world.tokenizer
    rows = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in ALIGNMENT_TEXTS]
    assert any("\n\n" in tokenizer.decode([t]) for row in rows for t in row), "the test needs '\\n\\n' tokens"
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    segments = trainer._segment(ids, mask)

    for i, text in enumerate(ALIGNMENT_TEXTS):
        items = split_items(text)
        assert segments.items_emitted[i] == len(items)
        for k, item in enumerate(items[:REC_NUM]):
            tokens = ids[i][(segments.item_ids[i] == k) & segments.content_mask[i]]
            assert tokenizer.decode(tokens).strip() == item

    # A hit at rank 2 that the reward function finds lands on the tokens of item 2, and only there.
    reward = hit_reward(REC_NUM)
    for i, text in enumerate(ALIGNMENT_TEXTS):
        relevant = [split_items(text)[1]]
        hits = reward(completions=[text, ""], relevant=[relevant, relevant])
        assert hits[0] == [0.0, 1.0, 0.0, 0.0]
        pair = torch.stack([ids[i], torch.full_like(ids[i], tokenizer.pad_token_id)])
        pair_mask = torch.stack([mask[i], torch.zeros_like(mask[i])])
        pair_mask[1, 0], pair[1, 0] = 1, tokenizer.eos_token_id  # an empty list: EOS only
        fields = trainer._rank_fields(pair, pair_mask, per_rank_tensor(hits, REC_NUM), "train")
        on_item_2 = (trainer._segment(pair, pair_mask).item_ids[0] == 1) & (pair != tokenizer.eos_token_id)[0]
        assert (fields["advantages"][0][on_item_2] > 0).all()
        assert (fields["advantages"][0][~on_item_2] == 0).all()


def _expected_fields(batch, loss_type, level, list_reward):
    """The item ids and advantages each paper row should hand the loss, built here from the batch's segmentation
    and rewards: the code form's per-token advantages (or the paper form's item tokens), one DCG advantage per list
    for the baselines, the ids of the item, of each token or of the whole row."""
    segments = batch.segments
    item_ids = segments.item_ids_for(loss_type)
    in_loss = item_ids >= 0
    if list_reward is None:
        advantages = rank_advantages(batch.rewards.double(), 2).gather(1, segments.item_ids.clamp(0, REC_NUM - 1))
        advantages = advantages * segments.content_mask
    else:
        dcg = (batch.rewards.double() / torch.log2(torch.arange(REC_NUM, dtype=torch.float64) + 2)).sum(1)
        advantages = rank_advantages(dcg[:, None], 2) * in_loss
    if loss_type != "rank":  # the code form's length shaping, as token_advantages adds it
        advantages = advantages + token_advantages(torch.zeros(len(batch.rewards), REC_NUM).double(), segments)
    if level == "token":
        item_ids = torch.where(in_loss, torch.arange(item_ids.shape[1]), -1)
    elif level == "sequence":
        item_ids = torch.where(in_loss, 0, -1)
    return item_ids, advantages


PAPER_ROWS = [("rank", "item", None), ("bnpo", "item", None), ("bnpo", "token", None), ("grpo", "sequence", None),
              ("grpo", "token", "dcg"), ("bnpo", "sequence", "dcg")]


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
@pytest.mark.parametrize(("loss_type", "level", "list_reward"), PAPER_ROWS)
def test_plain_loop_loss_equals_the_reference_from_full_logits(world, tie_word_embeddings, loss_type, level,
                                                               list_reward):
    model = build_model(world.tokenizer, tie_word_embeddings=tie_word_embeddings).double()
    tokenizer = world.tokenizer
    texts = ["Star Harbor\nMoon Drift\nOrbit Nine\nVoid Runner", "Star Harbor\n\nGrave Tide",
             "Lucky Socks\nStar Harbor\nMoon Drift\nSignal Lost\nQuiet River", "Here:\nMoon Drift"]
    completions = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    prompts = [tokenizer(world.rows[i]["prompt"])["input_ids"] for i in (0, 0, 50, 50)]
    hits = [item_hits(text, world.rows[0]["relevant"], REC_NUM) for text in texts]
    batch = rank_grpo_step_inputs(tokenizer, prompts, completions, hits, num_generations=2, rec_num=REC_NUM,
                                  importance_sampling_level=level, list_reward=list_reward)
    assert batch.advantages.dtype == torch.float32
    batch.rewards = batch.rewards.double()  # float64 from here on, so that the comparison can be tight
    batch.advantages = batch.objective.advantages(batch.rewards, num_generations=2)
    assert batch.advantages.abs().sum() > 0
    assert batch.advantages.shape == (4, REC_NUM if list_reward is None else 1)

    T = batch.completion_ids.shape[1]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -T - 1 : -1]
    logps = (logits / 0.9).log_softmax(-1).gather(-1, batch.completion_ids[..., None])[..., 0]
    # Off-policy, so that the unit of the ratio shows in the loss (on-policy, item and token ratios give the same
    # gradient when an item's tokens share an advantage), with some ratios past the clip.
    noise = torch.Generator().manual_seed(3)
    old = logps.detach() + 0.1 * torch.randn(logps.shape, generator=noise, dtype=logps.dtype)

    loss, _ = rank_grpo_loss_for_model(model, batch, old_logps=old, temperature=0.9, loss_type=loss_type)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    item_ids, advantages = _expected_fields(batch, loss_type, level, list_reward)
    reference, _ = reference_loss_from_logps(logps, item_ids, advantages, batch.completion_mask, old,
                                             loss_type=loss_type, rec_num=REC_NUM, epsilon_low=0.06,
                                             epsilon_high=0.08)
    torch.testing.assert_close(loss, reference, rtol=1e-9, atol=1e-12)
    for fused_grad, reference_grad in zip(grads, torch.autograd.grad(reference, list(model.parameters()))):
        torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-7, atol=1e-10)


def test_plain_loop_takes_an_objective_spec_whole():
    tokenizer = TinyTokenizerForPlain()
    spec = ObjectiveSpec(importance_sampling_level="sequence", list_reward="sum")
    batch = rank_grpo_step_inputs(tokenizer, [[1], [1]], [[0, 1], [0, 0, 1]], [[1.0, 0.0], [0.0, 0.0]],
                                  num_generations=2, rec_num=2, objective=spec)
    assert batch.objective is spec and batch.advantages.shape == (2, 1)
    with pytest.raises(ValueError, match="objective= holds"):
        rank_grpo_step_inputs(tokenizer, [[1], [1]], [[0, 1], [0, 1]], [[1.0, 0.0], [0.0, 0.0]], num_generations=2,
                              rec_num=2, objective=spec, list_reward="dcg")


class TinyTokenizerForPlain:
    """Two tokens, "A" and the EOS: enough for ``rank_grpo_step_inputs``."""

    eos_token_id, pad_token_id = 1, None

    def __len__(self):
        return 2

    def decode(self, ids, **kwargs):
        return "".join("A" if i == 0 else "<eos>" for i in ids)


def test_vllm_config_with_trls_defaults_constructs(tmp_path):
    """TRL 1.16 turns the vLLM importance-sampling correction on by default ("sequence_mask", clip_max 3)."""
    args = rank_config(tmp_path, use_vllm=True)
    assert args.vllm_importance_sampling_correction and args.vllm_importance_sampling_mode == "sequence_mask"
    rank_config(tmp_path, use_vllm=True, vllm_importance_sampling_mode="item_truncate")
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        rank_config(tmp_path, use_vllm=True, vllm_importance_sampling_mode="token")


def _sampler_step(trainer, world, mode):
    """A scored batch as TRL leaves it with vLLM on (this CPU has no vLLM server): old log-probs, sampler
    log-probs near them, and TRL's importance-sampling ratio of ``mode`` computed as GRPOTrainer computes it."""
    inputs = scored_batch(trainer, world)
    with torch.no_grad():
        old = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])[0]
    mask = inputs["completion_mask"]
    sampler = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(2))
    inputs.update(old_per_token_logps=old, sampling_per_token_logps=sampler)
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    diff = (old - sampler) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = diff.exp()
    if mode.endswith("truncate"):
        ratio = ratio.clamp(max=trainer.vllm_importance_sampling_clip_max)
    else:
        ratio = ratio.masked_fill(ratio > trainer.vllm_importance_sampling_clip_max, 0.0)
    inputs["importance_sampling_ratio"] = ratio
    return inputs


@pytest.mark.parametrize("option", ["sequence_mask", "token_truncate", "item_truncate", "item_mask",
                                    "off_policy_mask", "top_entropy_quantile"])
def test_importance_sampling_and_masks_weight_the_policy_terms(world, tmp_path, option):
    """Each option reaches the loss as policy weights, equal to the reference with TRL's order (policy x masks x
    IS ratio, then + beta KL); item modes weight each item by the geometric mean of its tokens' ratios."""
    overrides = dict(beta=0.04)
    if option == "off_policy_mask":
        overrides["off_policy_mask_threshold"] = 0.02
    if option == "top_entropy_quantile":
        overrides["top_entropy_quantile"] = 0.5
    trainer = rank_trainer(world, tmp_path, **overrides)
    mode = option if "_" in option and option.split("_")[0] in ("sequence", "token", "item") else "token_truncate"
    inputs = _sampler_step(trainer, world, "token_" + mode.split("_")[1] if mode.startswith("item") else mode)
    mask = inputs["completion_mask"].bool() & (inputs["item_ids"] >= 0)
    weights = inputs["importance_sampling_ratio"].expand_as(mask).clone()
    if option.startswith("item"):
        trainer._item_is_mode = option
        for name in ("min", "mean", "max"):  # GRPOTrainer's token-level figures, which the item ones replace
            trainer._metrics["train"][f"sampling/importance_sampling_ratio/{name}"].append(float("nan"))
        inputs["importance_sampling_ratio"] = trainer._item_importance_sampling(inputs, "train")
        weights = inputs["importance_sampling_ratio"]
        assert trainer._metrics["train"]["sampling/importance_sampling_ratio/max"][-1] == weights[mask].max()
        row, item = mask.nonzero()[0].tolist()[0], inputs["item_ids"][mask][0].item()
        tokens = mask[row] & (inputs["item_ids"][row] == item)
        geometric = (inputs["old_per_token_logps"][row, tokens] - inputs["sampling_per_token_logps"][row, tokens]
                     ).mean().exp()
        geometric = geometric.clamp(max=3.0) if option == "item_truncate" else geometric * (geometric <= 3.0)
        torch.testing.assert_close(weights[row, tokens], geometric.expand(int(tokens.sum())))
    with torch.no_grad():
        current = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1],
            compute_entropy=True)
    if option == "off_policy_mask":
        from rankgrpo_kernels.importance import item_means

        kl = item_means(inputs["sampling_per_token_logps"] - current[0], inputs["item_ids"], mask)
        keep = (inputs["advantages"] >= 0) | (kl <= 0.02)
        assert not keep[mask].all() and keep[mask].any()  # the mask drops some items and keeps others
        weights = weights * keep
    if option == "top_entropy_quantile":
        weights = weights * trainer.get_high_entropy_mask(current[1], inputs["completion_mask"], 0.5)
    fused = trainer._compute_loss(trainer.model, inputs)
    reference = reference_from_full_logits(
        trainer.model, inputs, 1.0, epsilon_low=0.06, epsilon_high=0.08, beta=0.04, loss_type="bnpo",
        policy_weights=weights)
    unweighted = reference_from_full_logits(
        trainer.model, inputs, 1.0, epsilon_low=0.06, epsilon_high=0.08, beta=0.04, loss_type="bnpo")
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(reference, unweighted)


def test_a_peft_adapter_on_the_lm_head_is_refused_by_name(world):
    """A LoRA-wrapped head (PEFT's lora.Linear keeps the base Linear as base_layer) would lose its update."""
    from rankgrpo_kernels.adapters.hf_model import output_head

    model = fresh_model(world)

    class LoraLinear(torch.nn.Module):  # the attributes PEFT's LoRA layer has
        def __init__(self, base):
            super().__init__()
            self.base_layer, self.lora_A, self.lora_B = base, torch.nn.ModuleDict(), torch.nn.ModuleDict()
            self.weight = base.weight

    model.lm_head = LoraLinear(model.lm_head)
    with pytest.raises(TypeError, match="LoraLinear.*target_modules"):
        output_head(model)


def test_zero_std_is_logged_per_rank(world, tmp_path):
    """Groups that differ only in which ranks hit have signal at those ranks and none at the others."""
    from rankgrpo_kernels.segments import segment_items

    trainer = rank_trainer(world, tmp_path, beta=0.0)
    G = trainer.num_generations
    rewards = torch.zeros(2 * G, REC_NUM)
    rewards[0, 0] = 1.0  # group 0: rank 1 differs between completions; group 1: no signal anywhere
    ids = torch.zeros(2 * G, 3, dtype=torch.long)
    segments = segment_items(ids, torch.ones_like(ids, dtype=torch.bool), trainer._line_table, REC_NUM)
    trainer._log_rank_metrics("train", rewards, segments, G)
    metrics = trainer._metrics["train"]
    assert metrics["rewards/rank_1/frac_zero_std"][-1] == 0.5 and metrics["rewards/rank_2/frac_zero_std"][-1] == 1.0
    assert metrics["frac_rank_reward_zero_std"][-1] == (2 * REC_NUM - 1) / (2 * REC_NUM)


def test_a_reward_splitting_items_otherwise_than_the_trainer_is_refused(world, tmp_path):
    """The trainer segments with skip_blank_lines=False; item_hits' default (True) would move hits between ranks."""
    def default_split(completions, **kwargs):
        return [item_hits(text, ALL_TITLES, REC_NUM) for text in completions]

    def same_split(completions, **kwargs):
        return [item_hits(text, ALL_TITLES, REC_NUM, skip_blank_lines=False) for text in completions]

    trainer = rank_trainer(world, tmp_path, reward=default_split, skip_blank_lines=False, beta=0.0)
    with pytest.raises(ValueError, match="skip_blank_lines=False.*default_split|default_split.*skip_blank_lines"):
        trainer._calculate_rewards([{"prompt": "p"}] * 2, ["p"] * 2, ["a\n\nb", "c"], [[1], [2]])
    trainer = rank_trainer(world, tmp_path, reward=same_split, skip_blank_lines=False, beta=0.0)
    trainer._calculate_rewards([{"prompt": "p"}] * 2, ["p"] * 2, ["a\n\nb", "c"], [[1], [2]])


def test_adaptive_entropy_moves_the_coefficient_as_trl_does(world, tmp_path):
    """First step: no bonus (no measured entropy yet); the measured entropy is below the target, so the coefficient
    grows by entropy_coef_delta and the next step applies it."""
    trainer = rank_trainer(world, tmp_path, beta=0.0, use_adaptive_entropy=True, entropy_coef=0.01,
                           entropy_coef_delta=0.02, entropy_target=100.0)
    inputs = scored_batch(trainer, world)
    first = trainer._compute_loss(trainer.model, inputs)
    assert trainer.entropy_coef == pytest.approx(0.03) and trainer._metrics["train"]["entropy_coef"][-1] == 0.03
    entropy = trainer._metrics["train"]["entropy"][-1]
    assert trainer._last_world_entropy == pytest.approx(entropy, rel=1e-5)
    second = trainer._compute_loss(trainer.model, inputs)
    torch.testing.assert_close(second, first - 0.03 * entropy, rtol=1e-4, atol=1e-6)


def test_ratio_and_entropy_means_count_only_the_tokens_the_loss_computed():
    """Two processes' statistics summed as accelerate reduces them: one computed 4 of its 8 loss tokens, the other
    none (every item skipped: ratio 1, entropy NaN); the ratio and entropy means are over the 4, the clip means
    over all 16 tokens."""
    from collections import defaultdict

    from rankgrpo_kernels.adapters.trl.metrics import log_token_means

    processes = [dict(clip_ratio_low=0.5, clip_ratio_high=0.0, clip_ratio_region=0.5, ratio_mean=0.9, entropy=2.0,
                      computed_tokens=4),
                 dict(clip_ratio_low=0.0, clip_ratio_high=0.0, clip_ratio_region=0.0, ratio_mean=1.0,
                      entropy=float("nan"), computed_tokens=0)]
    sent = []

    def reduce(stacked, reduction):
        sent.append(stacked)
        return stacked if len(sent) < 2 else sent[0] + sent[1]

    accelerator = SimpleNamespace(reduce=reduce)
    for stats in processes:
        metrics = defaultdict(list)
        log_token_means(metrics, accelerator, {k: torch.tensor(v) for k, v in stats.items()}, torch.tensor(8))
    assert metrics["ratio/mean"] == [pytest.approx(0.9)] and metrics["entropy"] == [pytest.approx(2.0)]
    assert metrics["clip_ratio/low_mean"] == [pytest.approx(0.25)]


def test_a_tokenizer_without_eos_is_refused_with_the_fix(world, tmp_path):
    tokenizer = copy.deepcopy(world.tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="tokenizer has no eos_token"):
        RankGRPOTrainer(model=fresh_model(world), reward_funcs=hit_reward(REC_NUM), args=rank_config(tmp_path),
                        train_dataset=Dataset.from_list(world.rows), processing_class=tokenizer)


@pytest.mark.parametrize(("sampling", "warns"), [(dict(top_p=0.9), True), (dict(top_k=50), True),
                                                 (dict(min_p=0.05), True), ({}, False)])
def test_truncated_sampling_with_the_importance_sampling_correction_warns(tmp_path, sampling, warns):
    from rankgrpo_kernels.adapters.trl.config import warn_truncated_sampling

    args = rank_config(tmp_path, use_vllm=True, **sampling)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_truncated_sampling(args)
        warn_truncated_sampling(rank_config(tmp_path, use_vllm=True, vllm_importance_sampling_correction=False,
                                            **sampling))
    assert [str(w.message).split(" truncate")[0] for w in caught] == ([next(iter(sampling))] if warns else [])


def test_moe_router_loss_is_added_as_grpo_trainer_adds_it(world, tmp_path):
    """A tiny Qwen2-MoE: the loss is the Rank-GRPO loss plus ``router_aux_loss_coef`` times the model's own
    load-balancing loss (its forward with ``output_router_logits=True``), scaled for accumulation, with its
    gradient reaching the routers."""
    import transformers

    config = transformers.Qwen2MoeConfig(
        vocab_size=len(world.tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, router_aux_loss_coef=0.05,
        pad_token_id=world.tokenizer.pad_token_id, eos_token_id=world.tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config)
    trainer = RankGRPOTrainer(model=model, reward_funcs=hit_reward(REC_NUM), args=rank_config(tmp_path, beta=0.0),
                              train_dataset=Dataset.from_list(world.rows), processing_class=world.tokenizer)
    assert trainer.aux_loss_enabled
    inputs = scored_batch(trainer, world)
    rewards = torch.rand(inputs["completion_ids"].shape[0], REC_NUM, generator=torch.Generator().manual_seed(7))
    inputs.update(trainer._rank_fields(inputs["completion_ids"], inputs["completion_mask"], rewards, "train"))
    trainer.current_gradient_accumulation_steps = 2
    with_aux = trainer._compute_loss(trainer.model, inputs)
    trainer.aux_loss_enabled = False
    without = trainer._compute_loss(trainer.model, inputs)
    own = trainer.model(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                        attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                        output_router_logits=True).aux_loss
    torch.testing.assert_close(with_aux - without, 0.05 * own / 2, rtol=1e-5, atol=1e-7)
    assert trainer._metrics["train"]["aux_loss"][-1] == pytest.approx(own.item(), rel=1e-5)
    gate = trainer.model.model.layers[0].mlp.gate.weight
    assert torch.autograd.grad(with_aux - without, gate)[0].abs().sum() > 0

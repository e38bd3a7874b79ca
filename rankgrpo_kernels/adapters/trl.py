"""Rank-GRPO in TRL 1.16: ``RankGRPOConfig`` and ``RankGRPOTrainer``, a ``GRPOTrainer`` whose reward functions
return one list of per-rank values per completion and whose loss is the fused Rank-GRPO loss.

Usage::

    from rankgrpo_kernels.recommender import item_hits
    from rankgrpo_kernels.adapters.trl import RankGRPOConfig, RankGRPOTrainer

    def hits(completions, relevant, **kwargs):  # ``relevant``: a column of the data set
        return [item_hits(text, titles, rec_num=20) for text, titles in zip(completions, relevant)]

    args = RankGRPOConfig(output_dir="out", rec_num=20, num_generations=8, beta=1e-3)
    RankGRPOTrainer(model="path/to/sft", reward_funcs=hits, args=args, train_dataset=dataset).train()

A reward function gets TRL's keyword arguments (``prompts``, ``completions``, ``completion_ids``, the data set's
columns, ``trainer_state``, ``log_extra``, ``log_metric``) and returns, for every completion, exactly ``rec_num``
real numbers: hits (or relevances) that ``reward_kind`` turns into per-rank rewards, or per-rank rewards as they are
with the default ``reward_kind="exp_inf"``. None, NaN, a single number or a list of another length is a
``ValueError`` naming the function, the completion and the rank. Score the items that ``split_items(text,
skip_blank_lines=args.skip_blank_lines)`` returns (``item_hits`` does): they are the items the loss segments.

How it hooks into TRL 1.16 (generation, batching, the reference model, gradient accumulation and logging stay
GRPOTrainer's); four methods are overridden:

* ``_calculate_rewards``: calls the reward functions as TRL does, takes per-rank lists, and keeps the weighted
  per-rank rewards of the whole batch (all processes); TRL gets each function's mean over ranks, which it logs as
  ``reward`` and turns into scalar advantages that only its completions table shows.
* ``_generate_and_score_completions``: runs TRL's, then swaps its scalar advantages for per-rank group advantages
  spread over each item's tokens (``segment_items`` with a newline table built once from the tokenizer) and adds
  ``item_ids``; logs the per-rank rewards and the items emitted.
* ``_get_per_token_logps_and_entropies``: old and reference log-probs by ``fused_logprobs`` at the sampling
  temperature, the kernels of the loss itself, so an on-policy ratio is exactly 1.
* ``_compute_loss``: ``rank_grpo_loss`` on the last hidden states and the LM head, scaled for gradient accumulation
  as TRL scales each loss type; logs the clip ratios (token means, and TRL's ``clip_ratio/low_min`` and
  ``clip_ratio/high_max`` over the sequences of all processes), the mean ratio, the KL and the entropy (the mean
  ratio and the entropy over the tokens whose log-probs the loss computes: at ``beta=0`` without an entropy bonus,
  not those of items with advantage 0). TRL's entropy bonus (``entropy_coef``, ``use_adaptive_entropy`` with its
  controller, which measures the entropy of every loss token) is the fused loss's ``entropy_coef``; with
  ``top_entropy_quantile < 1`` both act on the high-entropy tokens only (the fused loss's ``entropy_mask``), as
  GRPOTrainer's do.

TRL's corrections reach the loss as ``policy_weights`` (each token's policy term times the weight, then + beta KL,
TRL's order): the vLLM importance-sampling ratio of TRL's four modes exactly as GRPOTrainer computes it
(``vllm_importance_sampling_mode``, ``_clip_min``, ``_clip_max``; on by default with ``use_vllm=True``), or per item
with ``"item_truncate"`` / ``"item_mask"`` (the item's geometric mean of the trainer/sampler ratio, truncated or
masked by the same bounds; ``importance.py``); ``off_policy_mask_threshold`` per item (an item with a negative
advantage whose mean KL to the sampler passes the threshold is dropped); ``top_entropy_quantile`` (TRL's
high-entropy token mask). The two masks read the current policy's log-probs and entropies before the loss: one more
logits GEMM without gradient.

The fused head runs as TRL runs its chunked distillation loss: inside the forward of the model the trainer calls
(the DDP, FSDP2 or DeepSpeed wrapper), for that one call, without replacing the model's ``forward``
(``run_inside_forward``), on the backbone's last hidden states and the LM head read directly. Multi-process training
(``accelerate launch``):

* DDP: the head is whole on every rank; DDP all-reduces its gradient with the others.
* FSDP2 (``fsdp_version: 2``): the head is used as FSDP2 unshards it for the forward (accelerate puts it in a unit
  with the final norm, or with the embedding when tied, that stays unsharded until the backward); a head still
  sharded there (a ``DTensor``, e.g. its own ``fully_shard`` unit) is gathered with ``full_tensor()``, whose backward
  reduce-scatters the averaged gradient into the shards.
* DeepSpeed ZeRO-3: inside the engine's forward DeepSpeed gathers the partitioned head when the loss reads it;
  TRL's ``maybe_gather_lm_head_ctx`` (``deepspeed.zero.GatheredParameters``) gathers it for the call if it is still
  partitioned. The fused loss forms the head's gradient while the head is whole; the backward hands it to ZeRO-3's
  partitioned reduction.

Tied embeddings are one parameter throughout: the embedding weight is the head.

Not supported (rejected with a message): reward models and async reward functions, tools and environments,
vision-language models, FSDP version 1, MoE router losses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch
from packaging.version import Version

from ..contract import LOSS_TYPES, LossConfig
from ..functional import fused_logprobs, rank_grpo_loss
from ..importance import ITEM_IS_MODES, item_importance_weights, item_off_policy_mask
from ..rewards import ADVANTAGE_SCALES, rank_advantages, rank_rewards, token_advantages
from ..segments import Segments, line_table, segment_items, segmentation_in_use
from .hf_model import (
    call_head,
    completion_hidden_states,
    full_head_tensor,
    head_rows,
    logit_transform,
    output_head,
    run_inside_forward,
)
from .plain import per_rank_tensor

SUPPORTED_TRL = (Version("1.16"), Version("1.17"))  # [low, high): the private GRPOTrainer methods overridden here
TRL_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def check_trl_version(installed: str) -> None:
    """Raise ``ImportError`` unless ``installed`` lies in the supported TRL range (>=1.16,<1.17)."""
    low, high = SUPPORTED_TRL
    if not low <= Version(installed) < high:
        raise ImportError(
            f"rankgrpo_kernels.adapters.trl supports trl>={low},<{high}, found trl {installed}: it overrides "
            f"private GRPOTrainer methods whose signatures change between releases. Install a supported release: "
            f"pip install 'trl>={low},<{high}'"
        )


try:
    check_trl_version(version("trl"))
except PackageNotFoundError:
    raise ImportError("rankgrpo_kernels.adapters.trl needs TRL: pip install 'rankgrpo-kernels[trl]' "
                      "(or pip install 'trl>=1.16,<1.17')") from None

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import is_async_callable, maybe_gather_lm_head_ctx, nanmax, nanmin  # noqa: E402

FSDP1_MESSAGE = (
    "RankGRPOTrainer supports FSDP version 2 (fully_shard, DTensor parameters), not FSDP version 1: set "
    "fsdp_version: 2 in the accelerate config (or fsdp_config={{'version': 2}} in the training arguments). "
    "Found fsdp_version={version}."
)


@dataclass
class RankGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the Rank-GRPO settings.

    Inherited fields with new defaults: ``loss_type="bnpo"``, ``epsilon=0.06``, ``epsilon_high=0.08`` (the released
    runs) and ``use_bias_correction_kl=False`` (the spec's plain k3 KL). ``beta`` keeps TRL's default 0.0; the
    released runs used 1e-3, which needs a reference model (TRL loads it from the policy's path). ``scale_rewards``
    ("group" | "batch" | "none") scales the per-rank advantages; ``reward_weights`` weight the per-rank rewards of
    several reward functions. ``temperature`` is the sampling temperature, used by the loss's log-probs too.
    """

    rec_num: int = field(default=20, metadata={"help": "N, the number of ranks (items) each completion lists."})
    reward_kind: str = field(
        default="exp_inf",
        metadata={"help": "How per-rank hits become per-rank rewards: 'exp_inf' (as they are), 'exp' (discounted "
                          "by reward_gamma) or 'dcg' (causal DCG)."},
    )
    reward_gamma: float | None = field(default=None, metadata={"help": "Gamma > 1 of reward_kind='exp'."})
    skip_blank_lines: bool = field(
        default=True,
        metadata={"help": "Aligned segmentation: blank lines start no item, as split_items(text) splits. False "
                          "counts every newline (the authors' segmentation)."},
    )
    length_shaping: bool = field(
        default=True, metadata={"help": "Code form only: add the three length-shaping terms below."}
    )
    overflow_penalty: float = field(default=-0.1, metadata={"help": "Added to every token past item N."})
    end_of_list_bonus: float = field(default=0.1, metadata={"help": "Added to the EOS of a list of exactly N items."})
    early_stop_penalty: float = field(default=-0.1, metadata={"help": "Added to the EOS of a list of < N items."})
    loss_type: str = field(
        default="bnpo",
        metadata={"help": "'grpo', 'bnpo', 'dr_grpo', 'dapo' (the code form, TRL's aggregations) or 'rank' (the "
                          "paper form: -(1/(B N)) sum over items, EOS and overflow tokens outside the loss)."},
    )
    epsilon: float = field(default=0.06, metadata={"help": "Lower clip range of the item ratio."})
    epsilon_high: float | None = field(default=0.08, metadata={"help": "Upper clip range of the item ratio."})
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={"help": "Must stay False: Rank-GRPO's KL is the plain k3 estimator (TRL's default True weights "
                          "it by the token ratio)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.rec_num, int) or isinstance(self.rec_num, bool) or self.rec_num < 1:
            raise ValueError(f"rec_num must be an int >= 1, got {self.rec_num!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"RankGRPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        rank_rewards(torch.zeros(1, self.rec_num), self.reward_kind, self.reward_gamma)  # validates kind and gamma
        epsilon_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        LossConfig(self.epsilon, epsilon_high, self.delta, self.beta, self.loss_type)  # validates the loss settings
        if self.scale_rewards not in ADVANTAGE_SCALES:
            raise ValueError(f"scale_rewards must be one of {ADVANTAGE_SCALES}, got {self.scale_rewards!r}")
        unsupported = [
            (self.importance_sampling_level != "token",
             "importance_sampling_level: Rank-GRPO's ratio is per item (the geometric mean over the item's tokens); "
             "leave it at 'token'"),
            (self.multi_objective_aggregation != "sum_then_normalize",
             "multi_objective_aggregation: per-rank rewards are summed with reward_weights, then normalised per rank"),
            (self.use_bias_correction_kl, "use_bias_correction_kl"),
            (self.vllm_importance_sampling_mode not in TRL_IS_MODES + ITEM_IS_MODES,
             f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r}: use one of "
             f"{TRL_IS_MODES + ITEM_IS_MODES}"),
        ]
        for is_set, what in unsupported:
            if is_set:
                raise ValueError(f"RankGRPOConfig does not support {what}")


def check_fsdp_plugin(fsdp_plugin) -> None:
    """Raise ``NotImplementedError`` (``FSDP1_MESSAGE``) unless accelerate's FSDP plugin runs FSDP version 2."""
    version = getattr(fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise NotImplementedError(FSDP1_MESSAGE.format(version=version))


def _head_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int, head):
    """``head(hidden (B, T, H), weight (V, H), bias)`` on the last ``num_tokens`` positions of a causal LM, the head
    whole: gathered under DeepSpeed ZeRO-3 for the call, ``full_tensor()`` of an FSDP2 ``DTensor``. Runs inside the
    model's forward (``run_inside_forward``), where the frameworks' hooks are armed."""
    hidden = completion_hidden_states(model, input_ids, attention_mask, num_tokens)
    weight, bias = output_head(model)
    with maybe_gather_lm_head_ctx(weight, bias):  # a null context unless ZeRO-3 partitions the head
        return call_head(head, hidden, full_head_tensor(weight), full_head_tensor(bias))


class RankGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with per-rank rewards, per-rank group advantages and the fused Rank-GRPO loss.

    ``model`` is a path, a hub id or a causal LM (TRL builds the reference model for ``beta > 0`` from its
    ``config._name_or_path``); ``reward_funcs`` are callables returning ``rec_num`` values per completion (module
    docstring); ``args`` a ``RankGRPOConfig``. The other arguments are ``GRPOTrainer``'s.
    """

    _tag_names = ["trl", "grpo", "rank-grpo"]
    _name = "RankGRPO"

    def __init__(self, model, reward_funcs, args: RankGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None):
        if args is None:
            args = RankGRPOConfig(output_dir="RankGRPO")
        if not isinstance(args, RankGRPOConfig):
            raise TypeError(f"args must be a RankGRPOConfig (it holds rec_num and the Rank-GRPO settings), got "
                            f"{type(args).__name__}")
        for func in reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]:
            if isinstance(func, (str, torch.nn.Module)):
                raise TypeError("reward models give one score per completion; RankGRPOTrainer needs per-rank "
                                f"rewards: wrap the model in a function that returns rec_num values, got {func!r}")
            if is_async_callable(func):
                raise TypeError(f"async reward functions are not supported, got {func!r}")
        super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        if self._is_vlm:
            raise NotImplementedError("RankGRPOTrainer supports text-only models (a tokenizer as processing_class)")
        if self.is_fsdp_enabled:
            check_fsdp_plugin(self.accelerator.state.fsdp_plugin)
        if self.aux_loss_enabled:
            raise NotImplementedError("MoE router losses are not supported: set router_aux_loss_coef=0.0")
        if self.num_generations_eval < 2:
            raise ValueError(f"num_generations_eval must be >= 2 (group advantages of one completion are "
                             f"undefined), got {self.num_generations_eval}")
        self._logit_transform = logit_transform(self.model)  # softcapping, a logit scale: in the fused loss too

        self._item_is_mode = None
        if self.vllm_importance_sampling_mode in ITEM_IS_MODES:  # TRL computes (and logs) token ratios, replaced
            self._item_is_mode = self.vllm_importance_sampling_mode  # per item in _generate_and_score_completions
            self.vllm_importance_sampling_mode = "token_" + self._item_is_mode.split("_")[1]
        device = self.accelerator.device
        vocab_size = head_rows(output_head(self.model)[0])
        self._line_table = line_table(self._tokenizer, vocab_size).to(device)  # decodes the vocabulary once
        self._rank_rewards = None  # (B_all, N), set by _calculate_rewards for _generate_and_score_completions

    def _fused_head(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int, head):
        """``head(hidden, weight, bias)`` on the last ``num_tokens`` positions of ``model`` (the trainer's wrapper or
        the plain model), run inside the wrapper's forward under the trainer's autocast."""
        inner = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            # Only the tensors pass through the wrapper (which may move or cast them, as for the model's forward).
            fn = functools.partial(_head_forward, inner, num_tokens=num_tokens, head=head)
            return run_inside_forward(model, inner, fn, input_ids, attention_mask)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """Call the reward functions with TRL's keyword arguments; keep the weighted per-rank rewards of all
        processes (B_all, N) and return each function's mean over ranks (B_all, F) for TRL's scalar bookkeeping."""
        keys = [key for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")]
        reward_kwargs = {key: [example[key] for example in inputs] for key in keys}
        reward_kwargs.update(trainer_state=self.state, log_extra=self._log_completion_extra,
                             log_metric=self._log_metric)
        per_function = []
        for func, name in zip(self.reward_funcs, self.reward_func_names, strict=True):
            with segmentation_in_use(self.args.skip_blank_lines, f"RankGRPOTrainer (reward function {name!r})"):
                output = func(prompts=prompts, completions=completions, completion_ids=completion_ids_list,
                              **reward_kwargs)
            if output is None or len(output) != len(prompts):
                raise ValueError(f"reward function {name!r} returned {'None' if output is None else len(output)} "
                                 f"entries for {len(prompts)} completions; return one list of rec_num="
                                 f"{self.args.rec_num} values per completion")
            values = per_rank_tensor(output, self.args.rec_num, source=f"reward function {name!r}")
            per_function.append(rank_rewards(values, self.args.reward_kind, self.args.reward_gamma))
        rewards = self.accelerator.gather(torch.stack(per_function, 1).to(self.accelerator.device))  # (B_all, F, N)
        self._rank_rewards = (rewards * self.reward_weights.to(rewards.device)[None, :, None]).sum(1)
        return rewards.mean(2)

    def _generate_and_score_completions(self, inputs):
        """TRL's generation and scoring, then the rank-level fields: ``advantages`` (B, T) per token in place of
        TRL's (B,) and ``item_ids`` (B, T) for the loss."""
        output = super()._generate_and_score_completions(inputs)
        rewards, self._rank_rewards = self._rank_rewards, None
        mode = "train" if self.model.training else "eval"
        output.update(self._rank_fields(output["completion_ids"], output["completion_mask"], rewards, mode))
        if self._item_is_mode is not None and "importance_sampling_ratio" in output:
            output["importance_sampling_ratio"] = self._item_importance_sampling(output, mode)
        return output

    def _item_importance_sampling(self, output, mode: str) -> torch.Tensor:
        """The item-level vLLM importance-sampling weights (B, T) (``importance.item_importance_weights``), with
        TRL's ``sampling/importance_sampling_ratio/{min,mean,max}`` metrics over the loss tokens in place of its
        token-level ones."""
        mask = output["completion_mask"].bool() & (output["item_ids"] >= 0)
        weights = item_importance_weights(
            output["old_per_token_logps"], output["sampling_per_token_logps"], output["item_ids"], mask,
            self._item_is_mode, self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max)
        flat = weights[mask]
        empty = torch.zeros((), device=weights.device)
        summary = [flat.min() if flat.numel() else empty, flat.mean() if flat.numel() else empty,
                   flat.max() if flat.numel() else empty]
        for name, value, reduce in zip(("min", "mean", "max"), summary, (torch.min, torch.mean, torch.max)):
            values = self._metrics[mode][f"sampling/importance_sampling_ratio/{name}"]
            values[-1] = reduce(self.accelerator.gather(value)).item()  # TRL appended the token-level figure
        return weights

    def _segment(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> Segments:
        """Items of completions (B, T); every EOS id the model declares ends the list."""
        return segment_items(completion_ids, completion_mask, self._line_table, self.args.rec_num,
                             eos_token_id=list(self.eos_token_ids), skip_blank_lines=self.args.skip_blank_lines)

    def _rank_fields(self, completion_ids, completion_mask, rewards, mode: str) -> dict[str, torch.Tensor]:
        """Per-token advantages and item ids (B, T) of this process's completions, from the per-rank rewards of the
        batch on all processes (B_all, N): a prompt's G completions may lie on several processes."""
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = rank_advantages(rewards, num_generations, scale=self.scale_rewards)
        rows = completion_ids.size(0)
        start = self.accelerator.process_index * rows
        segments = self._segment(completion_ids, completion_mask)
        args = self.args
        per_token = token_advantages(
            advantages[start : start + rows], segments, length_shaping=args.length_shaping and self.loss_type != "rank",
            overflow_penalty=args.overflow_penalty, end_of_list_bonus=args.end_of_list_bonus,
            early_stop_penalty=args.early_stop_penalty,
        )
        self._log_rank_metrics(mode, rewards, segments, num_generations)
        return {"advantages": per_token, "item_ids": segments.item_ids_for(self.loss_type)}

    def _log_rank_metrics(self, mode: str, rewards: torch.Tensor, segments: Segments, num_generations: int) -> None:
        """Mean reward of each rank over the whole batch, the share of groups in which a rank's reward has zero std
        (no signal at that rank: TRL's ``frac_reward_zero_std`` sees only the sum over ranks), and how many items the
        completions emitted."""
        zero_std = rewards.view(-1, num_generations, rewards.shape[1]).std(1, unbiased=False) == 0  # (groups, N)
        per_rank = torch.stack([rewards.mean(0), zero_std.float().mean(0)], 1).tolist()
        for rank, (mean, frac_zero_std) in enumerate(per_rank, start=1):
            self._metrics[mode][f"rewards/rank_{rank}/mean"].append(mean)
            self._metrics[mode][f"rewards/rank_{rank}/frac_zero_std"].append(frac_zero_std)
        self._metrics[mode]["frac_rank_reward_zero_std"].append(zero_std.float().mean().item())
        overflow = segments.overflow_mask.any(1)
        exact = (segments.items_emitted == segments.max_items) & segments.terminated & ~overflow
        per_row = torch.stack([segments.items_emitted.float(), exact.float(), overflow.float(),
                               (segments.terminated & (segments.items_emitted < segments.max_items)).float()], 1)
        means = self.accelerator.gather(per_row).mean(0).tolist()
        for name, value in zip(("emitted_mean", "exact_ratio", "overflow_ratio", "early_stop_ratio"), means):
            self._metrics[mode][f"items/{name}"].append(value)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal_inputs):
        """Log-probs (B, T) of the last ``logits_to_keep`` tokens at the sampling temperature by ``fused_logprobs``
        (and entropies (B, T) if asked), ``batch_size`` rows at a time; TRL calls it for the old and reference
        log-probs. Only the completion mask's tokens enter the GEMMs (the others get 0, and TRL masks them).
        Returns ``(logps, entropies or None, None)``."""
        if compute_aux_loss or any(value is not None for value in multimodal_inputs.values()):
            raise NotImplementedError("RankGRPOTrainer scores text-only, non-MoE models")
        targets = input_ids[:, -logits_to_keep:]
        completion_mask = attention_mask[:, -logits_to_keep:]  # TRL's: the completion up to EOS; only it is scored
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)

            def head(hidden, weight, bias, rows=rows):
                return fused_logprobs(hidden, weight, targets[rows], bias=bias, temperature=self.temperature,
                                      return_entropy=compute_entropy, mask=completion_mask[rows],
                                      **self._logit_transform)

            out = self._fused_head(model, input_ids[rows], attention_mask[rows], logits_to_keep, head)
            logps.append(out[0] if compute_entropy else out)
            entropies.append(out[1] if compute_entropy else None)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _compute_loss(self, model, inputs):
        """The fused Rank-GRPO loss of one micro-batch, scaled for gradient accumulation as TRL scales each loss
        type (``dapo`` by the accumulation window's token count, the others by the number of micro-batches)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], 1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], 1)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items = None
        if self.loss_type == "dapo":
            # TRL's count covers the whole generation batch on all processes: rescale it to one accumulation window
            # of this process, as GRPOTrainer does.
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation

        entropy_coef = self._entropy_coef_now(accumulation)
        high_entropy = {}  # TRL's high-entropy mask and the entropies it was drawn from, when it is on

        def head(hidden, weight, bias):
            weights, high_entropy["mask"], high_entropy["entropies"] = self._policy_weights(
                inputs, hidden, weight, bias, mode)
            return rank_grpo_loss(
                hidden, weight, completion_ids, bias=bias, temperature=self.temperature,
                item_ids=inputs["item_ids"], advantages=inputs["advantages"], completion_mask=completion_mask,
                old_logps=inputs.get("old_per_token_logps"), ref_logps=inputs.get("ref_per_token_logps"),
                epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta, beta=self.beta,
                loss_type=self.loss_type, max_completion_length=self.max_completion_length,
                num_items_in_batch=num_items, rec_num=self.args.rec_num,
                policy_weights=weights, compute_entropy=True, entropy_coef=entropy_coef,
                entropy_mask=high_entropy["mask"], skip_zero_advantage=not self.use_adaptive_entropy,
                **self._logit_transform,
            )

        loss, stats = self._fused_head(model, input_ids, attention_mask, completion_ids.size(1), head)
        loss_mask = (inputs["item_ids"] >= 0) & completion_mask.bool()
        tokens = loss_mask.sum()
        self._log_token_means(mode, stats, tokens)
        self._log_sequence_clip_ratios(mode, stats, loss_mask)
        if self._entropy_bonus_enabled:
            if high_entropy["mask"] is None:
                self._entropy_control(mode, stats["entropy"].detach() * tokens, tokens)
            else:  # the controller measures the tokens the bonus acts on, as GRPOTrainer's does
                bonus_tokens = high_entropy["mask"] & loss_mask
                self._entropy_control(mode, torch.where(bonus_tokens, high_entropy["entropies"], 0).sum(),
                                      bonus_tokens.sum())
        return loss if self.loss_type == "dapo" else loss / accumulation

    def _entropy_coef_now(self, accumulation: int) -> float:
        """The entropy bonus's coefficient for this micro-batch, as GRPOTrainer applies it: ``entropy_coef``, in
        adaptive mode only while the last step's entropy is at most ``entropy_target``; a mean over the loss tokens
        scaled for gradient accumulation only (``dapo``'s loss is not divided by the window afterwards)."""
        if not self._entropy_bonus_enabled:
            return 0.0
        coef = self.entropy_coef
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            coef = 0.0
        return coef / accumulation if self.loss_type == "dapo" else coef

    def _entropy_control(self, mode: str, entropy_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        """GRPOTrainer's adaptive entropy controller: the accumulation window's token-weighted entropy over all
        processes moves ``entropy_coef`` by ``entropy_coef_delta`` towards ``entropy_target`` at each optimizer
        step, within ``[entropy_coef_min, entropy_coef_max]``; ``entropy_coef`` is logged at those steps."""
        args = self.args
        if self.use_adaptive_entropy and mode == "train":
            window = torch.stack([entropy_sum.float(), tokens.float()])
            self._entropy_window_stats = window if self._entropy_window_stats is None else (
                self._entropy_window_stats + window)
            if self.accelerator.sync_gradients:
                total, count = self.accelerator.reduce(self._entropy_window_stats, reduction="sum").tolist()
                world_entropy = total / max(count, 1.0)
                step = args.entropy_coef_delta if world_entropy <= args.entropy_target else -args.entropy_coef_delta
                self.entropy_coef = min(max(self.entropy_coef + step, args.entropy_coef_min), args.entropy_coef_max)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _policy_weights(self, inputs, hidden, weight, bias, mode: str):
        """What multiplies each token's policy term, in TRL's order: the off-policy mask (per item here), the
        high-entropy mask, the vLLM importance-sampling ratio; None when none is on. The two masks need the
        current policy's log-probs or entropies before the loss: one more logits GEMM, without gradient.
        Returns (weights, high-entropy mask (B, T) bool, entropies (B, T)); the last two None unless
        ``top_entropy_quantile < 1``."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights = inputs["importance_sampling_ratio"].expand_as(completion_mask).float()
        if self.off_policy_mask_threshold is None and self.top_entropy_quantile >= 1.0:
            return weights, None, None
        with torch.no_grad():
            logps, entropies = fused_logprobs(hidden, weight, completion_ids, bias=bias, temperature=self.temperature,
                                              return_entropy=True, mask=completion_mask, **self._logit_transform)
        masks = []
        if self.off_policy_mask_threshold is not None:
            old = inputs.get("old_per_token_logps")
            sampler = inputs.get("sampling_per_token_logps", logps if old is None else old)
            masks.append(item_off_policy_mask(logps, sampler, inputs["advantages"], inputs["item_ids"],
                                              completion_mask, self.off_policy_mask_threshold))
        high_entropy = None
        if self.top_entropy_quantile < 1.0:
            high_entropy = self.get_high_entropy_mask(entropies, completion_mask, 1 - self.top_entropy_quantile)
            masks.append(high_entropy.float())
        for extra in masks:
            weights = extra if weights is None else weights * extra
        return weights, high_entropy, None if high_entropy is None else entropies

    def _log_token_means(self, mode: str, stats: dict[str, torch.Tensor], tokens: torch.Tensor) -> None:
        """Log the loss statistics as token means over all processes (each process's mean weighted by its tokens)."""
        names = {"clip_ratio_low": "clip_ratio/low_mean", "clip_ratio_high": "clip_ratio/high_mean",
                 "clip_ratio_region": "clip_ratio/region_mean", "ratio_mean": "ratio/mean", "kl": "kl",
                 "entropy": "entropy"}
        present = [key for key in names if key in stats]  # no kl without reference log-probs
        weighted = [stats[key].float() * tokens for key in present] + [tokens.float()]
        totals = self.accelerator.reduce(torch.stack(weighted), reduction="sum").tolist()
        for key, total in zip(present, totals[:-1]):
            self._metrics[mode][names[key]].append(total / max(totals[-1], 1.0))

    def _log_sequence_clip_ratios(self, mode: str, stats: dict[str, torch.Tensor], loss_mask: torch.Tensor) -> None:
        """TRL's ``clip_ratio/low_min`` and ``clip_ratio/high_max``: the least low-clipped and the most high-clipped
        share of a sequence's loss tokens over the sequences of all processes (sequences without loss tokens left
        out, as TRL's NaN means are)."""
        has_tokens = loss_mask.any(1)
        for key, name, reduce in (("clip_ratio_low_per_row", "clip_ratio/low_min", nanmin),
                                  ("clip_ratio_high_per_row", "clip_ratio/high_max", nanmax)):
            per_row = torch.where(has_tokens, stats[key].float(), float("nan"))
            self._metrics[mode][name].append(reduce(self.accelerator.gather(per_row)).item())

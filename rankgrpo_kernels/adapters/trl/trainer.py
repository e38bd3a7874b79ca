"""``RankGRPOTrainer``: GRPOTrainer's overrides, which hand the work to the modules beside this one."""

from __future__ import annotations

import functools

import torch
from trl import GRPOTrainer
from trl.trainer.utils import is_async_callable, maybe_gather_lm_head_ctx

from ...contract import POLICY, WINDOW_TOKEN_NORMALISED
from ...functional import fused_logprobs, rank_grpo_loss
from ...segments import Segments, line_table, segment_items
from ..hf_model import (
    call_head, completion_hidden_states, full_head_tensor, head_rows, logit_transform, output_head, router_aux_loss,
    run_inside_forward,
)
from .config import RankGRPOConfig, check_fsdp_plugin, warn_truncated_sampling
from .corrections import item_sampling_weights, policy_weights, split_is_mode
from .entropy import adapt_entropy_coef, bonus_coef, bonus_entropy
from .metrics import (
    log_rank_metrics, log_sampling_ratios, log_sequence_clip_ratios, log_token_means, token_mean_names,
)
from .scoring import per_rank_rewards, rank_fields


def _head_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int, head,
                  aux_loss: bool = False):
    """``head(hidden (B, T, H), weight (V, H), bias)`` on the last ``num_tokens`` positions of a causal LM, the head
    whole: gathered under DeepSpeed ZeRO-3 for the call, ``full_tensor()`` of an FSDP2 ``DTensor``. Runs inside the
    model's forward (``run_inside_forward``), where the frameworks' hooks are armed. With ``aux_loss`` returns
    ``(head's result, the MoE router loss of the same backbone call)``."""
    states = completion_hidden_states(model, input_ids, attention_mask, num_tokens, router_logits=aux_loss)
    hidden = states[0] if aux_loss else states
    weight, bias = output_head(model)
    with maybe_gather_lm_head_ctx(weight, bias):  # a null context unless ZeRO-3 partitions the head
        out = call_head(head, hidden, full_head_tensor(weight), full_head_tensor(bias))
    return (out, router_aux_loss(model, states[1], attention_mask)) if aux_loss else out


class RankGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with per-rank rewards, per-rank group advantages and the fused Rank-GRPO loss.

    ``model`` is a path, a hub id or a causal LM (TRL builds the reference model for ``beta > 0`` from its
    ``config._name_or_path``); ``reward_funcs`` are callables returning ``rec_num`` values per completion (package
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
        if self._tokenizer.eos_token_id is None:  # TRL would fail inside generate; a list ends at its EOS
            raise ValueError("the tokenizer has no eos_token: a ranked list ends at its EOS token. Set one "
                             "(tokenizer.eos_token = '<|endoftext|>' or your model's end token) and pass the "
                             "tokenizer as processing_class")
        warn_truncated_sampling(args)
        if self.is_fsdp_enabled:
            check_fsdp_plugin(self.accelerator.state.fsdp_plugin)
        if self.num_generations_eval < 2:
            raise ValueError(f"num_generations_eval must be >= 2 (group advantages of one completion are "
                             f"undefined), got {self.num_generations_eval}")
        self._logit_transform = logit_transform(self.model)  # softcapping, a logit scale: in the fused loss too
        # TRL computes (and logs) token ratios for an item mode; _generate_and_score_completions replaces them.
        self._item_is_mode, self.vllm_importance_sampling_mode = split_is_mode(self.vllm_importance_sampling_mode)
        vocab_size = head_rows(output_head(self.model)[0])
        self._line_table = line_table(self._tokenizer, vocab_size).to(self.accelerator.device)  # decoded once
        self._rank_rewards = None  # (B_all, N), set by _calculate_rewards for _generate_and_score_completions
        self._objective = args.objective

    def _fused_head(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int, head,
                    aux_loss: bool = False):
        """``head(hidden, weight, bias)`` on the last ``num_tokens`` positions of ``model`` (the trainer's wrapper or
        the plain model), run inside the wrapper's forward under the trainer's autocast; with ``aux_loss`` also the
        MoE router loss (``_head_forward``)."""
        inner = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            # Only the tensors pass through the wrapper (which may move or cast them, as for the model's forward).
            fn = functools.partial(_head_forward, inner, num_tokens=num_tokens, head=head, aux_loss=aux_loss)
            return run_inside_forward(model, inner, fn, input_ids, attention_mask)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """Call the reward functions with TRL's keyword arguments; keep the per-rank rewards of all processes
        (B_all, F, N) and return each function's mean over ranks (B_all, F) for TRL's scalar bookkeeping."""
        keys = [key for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")]
        reward_kwargs = {key: [example[key] for example in inputs] for key in keys}
        reward_kwargs.update(trainer_state=self.state, log_extra=self._log_completion_extra,
                             log_metric=self._log_metric)
        rewards = per_rank_rewards(self.reward_funcs, self.reward_func_names, self.args, prompts, completions,
                                   completion_ids_list, reward_kwargs)
        rewards = self.accelerator.gather(rewards.to(self.accelerator.device))  # (B_all, F, N)
        self._rank_rewards = rewards
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
        """The item-level vLLM importance-sampling weights (B, T), logged as TRL logs its token-level ones."""
        weights, on_loss_tokens = item_sampling_weights(output, self._item_is_mode,
                                                        self.vllm_importance_sampling_clip_min,
                                                        self.vllm_importance_sampling_clip_max)
        log_sampling_ratios(self._metrics[mode], self.accelerator, on_loss_tokens)
        return weights

    def _segment(self, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> Segments:
        """Items of completions (B, T); every EOS id the model declares ends the list."""
        return segment_items(completion_ids, completion_mask, self._line_table, self.args.rec_num,
                             eos_token_id=list(self.eos_token_ids), skip_blank_lines=self.args.skip_blank_lines)

    def _rank_fields(self, completion_ids, completion_mask, rewards, mode: str) -> dict[str, torch.Tensor]:
        """Per-token advantages and item ids (B, T) of this process's completions from the per-rank rewards of the
        batch on all processes, (B_all, F, N) per reward function or (B_all, N); logs the rank metrics of their
        weighted sum."""
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        start = self.accelerator.process_index * completion_ids.size(0)
        segments = self._segment(completion_ids, completion_mask)
        weights = self.reward_weights.to(rewards.device)
        fields = rank_fields(rewards, weights, segments, slice(start, start + completion_ids.size(0)),
                             num_generations, self._objective, self.loss_type)
        weighted = (rewards * weights[None, :, None]).sum(1) if rewards.dim() == 3 else rewards
        self._log_rank_metrics(mode, weighted, segments, num_generations)
        return fields

    def _log_rank_metrics(self, mode: str, rewards: torch.Tensor, segments: Segments, num_generations: int) -> None:
        log_rank_metrics(self._metrics[mode], self.accelerator, rewards, segments, num_generations)

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
        type (``dapo``, ``cispo`` and ``vespo`` by the accumulation window's token count, the others by the number
        of micro-batches)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], 1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], 1)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items = None
        if self.loss_type in WINDOW_TOKEN_NORMALISED:
            # TRL's count covers the whole generation batch on all processes: rescale it to one accumulation window
            # of this process, as GRPOTrainer does.
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation

        entropy_coef = bonus_coef(self.entropy_coef, enabled=self._entropy_bonus_enabled,
                                  adaptive=self.use_adaptive_entropy, last_world_entropy=self._last_world_entropy,
                                  target=self.args.entropy_target, loss_type=self.loss_type, accumulation=accumulation)
        high_entropy = {}  # TRL's high-entropy mask and the entropies it was drawn from, when it is on

        def head(hidden, weight, bias):
            weights, high_entropy["mask"], high_entropy["entropies"] = policy_weights(
                inputs, hidden, weight, bias, vllm_ratio=self.use_vllm and self.vllm_importance_sampling_correction,
                off_policy_threshold=self.off_policy_mask_threshold, top_entropy_quantile=self.top_entropy_quantile,
                high_entropy_mask=self.get_high_entropy_mask, temperature=self.temperature,
                logit_transform=self._logit_transform)
            return rank_grpo_loss(
                hidden, weight, completion_ids, bias=bias, temperature=self.temperature,
                item_ids=inputs["item_ids"], advantages=inputs["advantages"], completion_mask=completion_mask,
                old_logps=inputs.get("old_per_token_logps"), ref_logps=inputs.get("ref_per_token_logps"),
                loss=self.args.loss_spec(entropy_coef), num_items_in_batch=num_items, policy_weights=weights,
                compute_entropy=True,
                entropy_mask=high_entropy["mask"], skip_zero_advantage=not self.use_adaptive_entropy,
                **self._logit_transform,
            )

        out = self._fused_head(model, input_ids, attention_mask, completion_ids.size(1), head, self.aux_loss_enabled)
        (loss, stats), aux_loss = out if self.aux_loss_enabled else (out, None)
        loss_mask = (inputs["item_ids"] >= 0) & completion_mask.bool()
        tokens = loss_mask.sum()
        log_token_means(self._metrics[mode], self.accelerator, stats, tokens, token_mean_names(self.loss_type))
        if POLICY[self.loss_type] == 0:  # TRL logs the per-sequence clip fractions of PPO's clipped surrogate only
            log_sequence_clip_ratios(self._metrics[mode], self.accelerator, stats, loss_mask)
        if self._entropy_bonus_enabled and mode == "train":
            if self.use_adaptive_entropy:
                self.entropy_coef, self._last_world_entropy, self._entropy_window_stats = adapt_entropy_coef(
                    self.entropy_coef, self._last_world_entropy, self._entropy_window_stats,
                    *bonus_entropy(stats["entropy"], tokens, high_entropy["mask"], high_entropy["entropies"],
                                   loss_mask),
                    window_ends=self.accelerator.sync_gradients,
                    reduce_sum=functools.partial(self.accelerator.reduce, reduction="sum"), args=self.args)
            if self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        loss = loss if self.loss_type in WINDOW_TOKEN_NORMALISED else loss / accumulation
        if aux_loss is not None:  # as GRPOTrainer adds it: scaled for accumulation whatever the loss type
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss

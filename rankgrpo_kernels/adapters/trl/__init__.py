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

The objective follows ``RankGRPOConfig.objective`` (an ``ObjectiveSpec``): ``importance_sampling_level`` "item"
(Rank-GRPO, the default), "token" or "sequence" sets the unit of the ratio, and ``list_reward`` ("dcg", "sum") turns
the per-rank rewards into one reward and one advantage per completion: the paper's GRPO and GSPO baselines.

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
vision-language models, FSDP version 1, a tokenizer without an EOS token. The MoE router loss
(``router_aux_loss_coef``) comes from the same backbone call as the fused loss and is added as GRPOTrainer adds it.

Modules: ``config`` (the settings, the supported TRL and FSDP versions), ``trainer`` (the overrides), ``scoring``
(reward functions to per-rank rewards and per-token advantages), ``corrections`` (the policy weights), ``entropy``
(the entropy bonus and its controller), ``metrics`` (what is logged).
"""

from .config import FSDP1_MESSAGE, SUPPORTED_TRL, TRL_IS_MODES, RankGRPOConfig, check_fsdp_plugin, check_trl_version
from .trainer import RankGRPOTrainer

__all__ = ["FSDP1_MESSAGE", "SUPPORTED_TRL", "TRL_IS_MODES", "RankGRPOConfig", "RankGRPOTrainer", "check_fsdp_plugin",
           "check_trl_version"]

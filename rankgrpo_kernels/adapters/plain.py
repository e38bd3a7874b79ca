"""Rank-GRPO in a hand-written loop over a Hugging Face causal LM (single process, no trainer framework).

One step, given G sampled completions per prompt and per-rank hits from your reward::

    batch = rank_grpo_step_inputs(tokenizer, prompt_ids, completion_ids, hits, num_generations=G, rec_num=N)
    old = completion_logprobs(model, batch, temperature=T)  # only when the samples are reused after an update
    ref = completion_logprobs(ref_model, batch, temperature=T)  # only with a KL term (beta > 0)
    loss, stats = rank_grpo_loss_for_model(model, batch, old_logps=old, ref_logps=ref, beta=1e-3, temperature=T)
    loss.backward(); optimizer.step(); optimizer.zero_grad()

``prompt_ids`` and ``completion_ids`` are lists of token-id lists (a completion up to and including its EOS;
``trim_completions`` cuts them out of ``model.generate`` output). Use the sampling temperature everywhere: the
log-probs are those of ``softmax(logits / T)``, the policy that drew the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..functional import fused_logprobs, rank_grpo_loss, spec_from
from ..objective import ObjectiveSpec
from ..rewards import per_rank_tensor
from ..segments import Segments, line_table, segment_items
from .hf_model import call_head, completion_hidden_states, logit_transform, output_head


def trim_completions(sequences: torch.Tensor, prompt_length: int, eos_token_id: int | Sequence[int]) -> list[list[int]]:
    """Completion ids out of ``model.generate`` output (B, P + T): the tokens after the prompt up to and including
    the first EOS (all of them when a row has none)."""
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    completions = []
    for row in sequences[:, prompt_length:].tolist():
        end = next((t + 1 for t, token in enumerate(row) if token in eos_ids), len(row))
        completions.append(row[:end])
    return completions


@dataclass
class RankGRPOStepInputs:
    """One Rank-GRPO batch, all tensors on one device. B completions, prompts padded to P, completions to T.

    input_ids, attention_mask  (B, P + T): left-padded prompt, then right-padded completion.
    completion_ids, completion_mask  (B, T).
    segments          the items of each completion (``Segments``, ``segments.max_items`` = N).
    rewards           (B, N) per-rank rewards.
    advantages        (B, N) group advantages per rank, or (B, 1) per list with ``objective.list_reward``.
    objective         the ``ObjectiveSpec`` that made them; ``loss_fields`` applies it for a loss type.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    segments: Segments
    rewards: torch.Tensor
    advantages: torch.Tensor
    objective: ObjectiveSpec

    def loss_fields(self, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(item_ids, advantages)`` (B, T) of the loss: ``objective.loss_fields`` for ``loss_type``."""
        return self.objective.loss_fields(self.advantages, self.segments, loss_type)


def _pad(rows: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def rank_grpo_step_inputs(
    tokenizer,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    hits,
    *,
    num_generations: int,
    rec_num: int,
    objective: ObjectiveSpec | None = None,
    reward_kind: str = "exp_inf",
    gamma: float | None = None,
    scale: str = "group",
    list_reward: str | None = None,
    importance_sampling_level: str = "item",
    skip_blank_lines: bool = True,
    length_shaping: bool = True,
    overflow_penalty: float = -0.1,
    end_of_list_bonus: float = 0.1,
    early_stop_penalty: float = -0.1,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> RankGRPOStepInputs:
    """Pad, segment and score one batch: rows ``[g*G, (g+1)*G)`` are the G completions of prompt g.

    ``hits`` (B lists of N numbers, or a (B, N) tensor) become per-rank rewards (``reward_kind``, ``gamma``) and
    group advantages (``scale``): per rank, or per list with ``list_reward``; ``importance_sampling_level`` is the
    unit of the ratio. These settings and the length shaping may come whole as ``objective`` (an ``ObjectiveSpec``,
    whose module docstring maps them to the paper's Rank-GRPO, ablations and GRPO/GSPO baselines) instead.
    The newline table is built once per tokenizer (``line_table`` caches it); pass the model's ``vocab_size`` when
    it exceeds ``len(tokenizer)``. ``skip_blank_lines`` must match the one the reward's ``split_items`` used.
    ``device``: where the tensors go (the model's device; default CPU).
    """
    objective = spec_from(
        ObjectiveSpec, objective, "objective", reward_kind=reward_kind, reward_gamma=gamma, scale_rewards=scale,
        list_reward=list_reward, importance_sampling_level=importance_sampling_level, length_shaping=length_shaping,
        overflow_penalty=overflow_penalty, end_of_list_bonus=end_of_list_bonus, early_stop_penalty=early_stop_penalty,
    )
    if not (len(prompt_ids) == len(completion_ids) == len(hits)):
        raise ValueError(f"prompt_ids, completion_ids and hits must have one entry per completion, got "
                         f"{len(prompt_ids)}, {len(completion_ids)} and {len(hits)}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs an eos_token_id: the end of a list is found by its EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt, prompt_mask = _pad(prompt_ids, pad_id, left=True)
    completion, completion_mask = _pad(completion_ids, pad_id, left=False)
    prompt, prompt_mask, completion, completion_mask = (x.to(device) for x in (prompt, prompt_mask, completion,
                                                                               completion_mask))
    segments = segment_items(completion, completion_mask, line_table(tokenizer, vocab_size), rec_num,
                             eos_token_id=tokenizer.eos_token_id, skip_blank_lines=skip_blank_lines)
    rewards = objective.rewards(per_rank_tensor(hits, rec_num).to(completion.device))
    return RankGRPOStepInputs(
        input_ids=torch.cat([prompt, completion], 1), attention_mask=torch.cat([prompt_mask, completion_mask], 1),
        completion_ids=completion, completion_mask=completion_mask, segments=segments, rewards=rewards,
        advantages=objective.advantages(rewards, num_generations), objective=objective,
    )


def _hidden_and_head(model, batch: RankGRPOStepInputs):
    hidden = completion_hidden_states(model, batch.input_ids, batch.attention_mask, batch.completion_ids.shape[1])
    return (hidden, *output_head(model))


@torch.no_grad()
def completion_logprobs(model, batch: RankGRPOStepInputs, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log-probs of the completion tokens under ``model`` at ``temperature``, without a logits tensor: the
    old (behaviour) log-probs before an update, or the reference log-probs from a frozen copy."""
    hidden, weight, bias = _hidden_and_head(model, batch)
    return call_head(lambda h, w, b: fused_logprobs(h, w, batch.completion_ids, bias=b, temperature=temperature,
                                                    mask=batch.completion_mask, **logit_transform(model)),
                     hidden, weight, bias)


def rank_grpo_loss_for_model(
    model,
    batch: RankGRPOStepInputs,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    temperature: float = 1.0,
    loss_type: str = "bnpo",
    epsilon_low: float = 0.06,
    epsilon_high: float = 0.08,
    delta: float | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    policy_weights: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fused Rank-GRPO loss of ``model`` on ``batch``: backbone forward, then ``rank_grpo_loss`` on the last
    hidden states (B, T, H) and the LM head (tied embeddings included), never holding (B, T, V) logits.

    ``loss_type`` in ``"grpo" | "bnpo" | "dr_grpo" | "dapo" | "luspo" | "sapo" | "cispo" | "vespo"`` is the code
    form (per-token advantages, length shaping, EOS and overflow tokens in the loss; SAPO's and VESPO's settings at
    TRL's defaults, ``rank_grpo_loss`` with a ``LossSpec`` sets them); ``"rank"`` is the paper form (per-rank
    advantages over the item tokens only). The batch's ``objective`` sets the advantages and the unit of the ratio
    (``RankGRPOStepInputs.loss_fields``). ``old_logps`` None means on-policy (every ratio 1); ``beta > 0`` needs
    ``ref_logps``. Defaults are the released run's clip range. ``entropy_coef`` and ``policy_weights`` as in
    ``rank_grpo_loss``; the model's logit softcapping or scale (``logit_transform``) applies. Returns the loss and
    the statistics of ``rank_grpo_loss``.
    """
    hidden, weight, bias = _hidden_and_head(model, batch)
    item_ids, advantages = batch.loss_fields(loss_type)

    def loss_from_head(h, w, b):
        return rank_grpo_loss(
            h, w, batch.completion_ids, bias=b, temperature=temperature, item_ids=item_ids, advantages=advantages,
            completion_mask=batch.completion_mask, old_logps=old_logps, ref_logps=ref_logps,
            epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, beta=beta, loss_type=loss_type,
            max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
            rec_num=batch.segments.max_items, backend=backend, entropy_coef=entropy_coef,
            policy_weights=policy_weights, **logit_transform(model),
        )

    return call_head(loss_from_head, hidden, weight, bias)

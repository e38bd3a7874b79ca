"""Rank-GRPO in OpenRLHF 0.11 (``openrlhf==0.11.*``), without forking it.

Three pieces, each a drop-in for an OpenRLHF object:

* ``RankGRPOPolicyLoss``: ``openrlhf.models.loss.PolicyLoss`` with the same constructor and ``forward`` signature and
  the same five return values, computing the item-level ratio of Rank-GRPO. It takes the item of each action token
  as the keyword ``item_ids`` or, inside OpenRLHF's training step, from ``bind_item_ids``.
* ``RankGRPOExperienceMaker``: ``RemoteExperienceMaker`` whose ``compute_advantages_and_returns`` turns per-rank
  rewards (B, N), one list of N numbers per sample from the reward function, into per-rank group advantages
  (``rank_advantages``) and then into per-token advantages on the items of each response.
* ``fused_actor_forward``: ``openrlhf.models.Actor.forward`` computing the action log-probs with ``fused_logprobs``
  from the last hidden states and the LM head, never holding (B, S, V) float32 logits (``patch_actor_forward``).
* ``install(tokenizer, rec_num)`` puts the first two into OpenRLHF
  (``openrlhf.trainer.ppo_trainer.RemoteExperienceMaker``, ``openrlhf.trainer.ray.ppo_actor.PolicyLoss`` and
  ``ActorPPOTrainer.training_step``); run it in every process, the Ray workers included (see
  ``integrations/openrlhf/README.md``).

Layout (OpenRLHF's): ``sequences`` (B, S) prompt and response, ``action_mask`` (B, A) with A = S - 1 over the shifted
sequence, so action token a is ``sequences[:, 1 + a]``; log-probs, advantages and item ids are (B, A).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass

import torch
from openrlhf.models.actor import Actor
from openrlhf.models.loss import PolicyLoss
from openrlhf.models.utils import masked_mean
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

from ..functional import fused_logprobs
from ..importance import item_means
from ..rewards import rank_advantages, token_advantages
from ..segments import Segments, line_table, segment_items
from .common import check_form, framework_loss
from .hf_model import call_head, logit_transform, output_head, unwrap_peft


@dataclass(frozen=True)
class RankItems:
    """How responses split into ranked items: N = ``rec_num``, the tokenizer's newline table and EOS id.

    ``form="code"`` is the released code form (per-token advantages, EOS and overflow in the loss, length shaping),
    ``"rank"`` the paper form (item tokens only, ``-(1/(B N)) sum_k min(w A, clip(w) A)``).
    """

    table: torch.Tensor
    rec_num: int
    eos_token_id: int | None
    skip_blank_lines: bool = True
    form: str = "code"

    @classmethod
    def from_tokenizer(cls, tokenizer, rec_num: int, **kwargs) -> RankItems:
        return cls(line_table(tokenizer), rec_num, tokenizer.eos_token_id, **kwargs)

    def __post_init__(self):
        check_form(self.form)

    def segments(self, sequences: torch.Tensor, action_mask: torch.Tensor) -> Segments:
        """Items of the action tokens ``sequences[:, -A:]`` under ``action_mask`` (B, A). The window also holds
        prompt tokens (A = S - 1), outside the mask: the EOS id a chat template writes there (Qwen's
        ``<|im_end|>``) ends nothing, since ``segment_items`` looks for the EOS inside the mask only."""
        actions = sequences[:, -action_mask.shape[1]:]
        return segment_items(actions, action_mask, self.table.to(actions.device), self.rec_num,
                             eos_token_id=self.eos_token_id, skip_blank_lines=self.skip_blank_lines)

    def item_ids(self, sequences: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
        """(B, A) item of each action token for the loss; -1 outside it."""
        return self.segments(sequences, action_mask).item_ids_for("rank" if self.form == "rank" else "bnpo")

    def token_advantages(self, rank_adv: torch.Tensor, sequences: torch.Tensor,
                         action_mask: torch.Tensor) -> torch.Tensor:
        """(B, A) per-token advantages from per-rank advantages (B, N): the code form's (length shaping on) or,
        for the paper form, ``A[i, k]`` on the tokens of item k and 0 elsewhere."""
        segments = self.segments(sequences, action_mask)
        return token_advantages(rank_adv, segments, length_shaping=self.form == "code")


class RankGRPOPolicyLoss(PolicyLoss):
    """``PolicyLoss`` with the rank-level (item-level) ratio ``w_k = exp(mean_{t in k} (l_t - o_t))``.

    Constructor as ``PolicyLoss`` plus ``form`` ("code" or "rank") and, for the paper form, ``rec_num`` (N).
    ``dual_clip`` becomes Rank-GRPO's ``delta``: for ``A < 0`` both cap the ratio at ``dual_clip``, the same
    function when ``dual_clip >= 1 + clip_eps_high``.
    ``policy_loss_type`` only keeps its effect on the aggregation ("gspo" forces the per-sample mean); the ratio
    is always per item.

    Rollout importance-sampling correction (``is_correction_level`` "token" or "seq", and "item": the item's
    geometric mean of ``pi_train / pi_rollout``), with OpenRLHF's ``is_correction_mode``, ``_gating`` and
    ``_threshold``, weights each token's policy term as OpenRLHF's ``PolicyLoss`` does (``rollout_is_weights``);
    ``forward`` then also returns OpenRLHF's vLLM KL and filtered fraction.

    Aggregation (as OpenRLHF's ``aggregate_loss``): per token, ``sum_t M L_t / batch_num_tokens * dp_size``
    (``loss_type="dapo"``; a plain token mean without ``batch_num_tokens``); per sample, ``sum_i mean_t L_t /
    global_batch_size * dp_size`` (``"grpo"`` rescaled). The paper form divides by ``B N`` with ``B`` the global
    number of samples. Item ids one per sequence give GSPO, one per token give PPO.
    """

    def __init__(self, *args, form: str = "code", rec_num: int | None = None, **kwargs):
        item_level = kwargs.get("is_correction_level") == "item"
        if item_level:  # OpenRLHF's checks know token and seq; item is seq's gate over each item's tokens
            kwargs["is_correction_level"] = "seq"
        super().__init__(*args, **kwargs)
        if item_level:
            self.is_correction_level = "item"
        if self.dual_clip is not None and self.dual_clip < 1 + self.clip_eps_high:
            raise ValueError(f"dual_clip={self.dual_clip} must be >= 1 + clip_eps_high with Rank-GRPO")
        check_form(form)
        if form == "rank" and rec_num is None:
            raise ValueError("form='rank' (the paper form) needs rec_num, the N of -(1/(B N)) sum_k ...")
        self.form, self.rec_num = form, rec_num
        self.bound_item_ids = None

    @contextlib.contextmanager
    def bind_item_ids(self, item_ids: torch.Tensor):
        """Within the block, ``forward`` without ``item_ids`` uses these (B, A) item ids."""
        self.bound_item_ids = item_ids
        try:
            yield self
        finally:
            self.bound_item_ids = None

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | torch.Tensor | None = None,
        global_batch_size: float | torch.Tensor | None = None,
        *,
        item_ids: torch.Tensor | None = None,
    ):
        """All tensors (B, A); ``advantages`` per token. Returns ``(loss, clip_ratio, ppo_kl, None, None)`` like
        ``PolicyLoss`` (the last two are its importance-sampling statistics, off here)."""
        item_ids = self.bound_item_ids if item_ids is None else item_ids
        if item_ids is None:
            raise ValueError("RankGRPOPolicyLoss needs item_ids: pass them or call it inside bind_item_ids(...)")
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask.bool()
        samples = (mask.sum(-1) > 0).sum().clamp(min=1) if global_batch_size is None else global_batch_size
        weights = vllm_kl = filtered = None
        if self.is_correction_level != "off":
            if rollout_log_probs is None:
                raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs")
            weights, filtered = rollout_is_weights(
                old_log_probs, rollout_log_probs, mask, item_ids, level=self.is_correction_level,
                mode=self.is_correction_mode, gating=self.is_correction_gating,
                threshold=self.is_correction_threshold)
            vllm_kl = masked_mean((rollout_log_probs - old_log_probs).detach(), mask, dim=None)
        loss, stats = framework_loss(
            log_probs, old_log_probs, advantages, mask, item_ids, form=self.form, rec_num=self.rec_num,
            per_sample=not self.token_level_loss, samples=samples, dp_size=dp_size,
            token_count=None if batch_num_tokens is None else batch_num_tokens / dp_size,
            epsilon_low=self.clip_eps_low, epsilon_high=self.clip_eps_high, delta=self.dual_clip,
            policy_weights=weights,
        )
        ppo_kl = masked_mean(-(log_probs - old_log_probs).detach(), mask, dim=None)
        return loss, stats["clip_ratio_region"].float(), ppo_kl, vllm_kl, filtered


def rollout_is_weights(old_log_probs, rollout_log_probs, mask, item_ids, *, level: str, mode: str, gating: str,
                       threshold):
    """OpenRLHF 0.11's rollout correction as policy weights (B, A), and the fraction of units it filters.

    A unit is a token (``level="token"``), a sequence (``"seq"``) or an item (``"item"``); its statistic is the
    ratio ``r = pi_train / pi_rollout`` (its geometric mean over the unit) or, per token and then averaged over the
    unit, the binary KL or total variation between the two probabilities of the sampled token. ``mode="clip"``
    (token ratios only) clamps r into ``[low, high]``; ``"mask"`` keeps each token's own ratio on units whose
    statistic lies in ``[low, high]`` and 0 elsewhere. The fraction filtered is over units (per sequence at the
    sequence level, per loss token otherwise, as OpenRLHF reports it)."""
    low, high = threshold
    dtype = torch.promote_types(old_log_probs.dtype, torch.float32)
    log_ratio = (old_log_probs - rollout_log_probs).detach().to(dtype)
    m = mask.to(dtype)
    if gating == "ratio":
        per_token = log_ratio
    else:
        p = rollout_log_probs.detach().to(dtype).exp().clamp(1e-6, 1 - 1e-6)
        q = old_log_probs.detach().to(dtype).exp().clamp(1e-6, 1 - 1e-6)
        per_token = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log() if gating == "binary_kl"
                     else (p - q).abs())
    if level == "seq":
        stat = ((per_token * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(m)
    elif level == "item":
        stat = item_means(per_token, item_ids, mask)
    else:
        stat = per_token
    if gating == "ratio":
        stat = stat.exp()
    outside = (stat < low) | (stat > high)
    weights = stat.clamp(min=low, max=high) if mode == "clip" else torch.where(outside, 0.0, log_ratio.exp())
    if level == "seq":
        filtered = outside[:, 0].float().mean()
    else:
        filtered = (outside.float() * m).sum() / m.sum().clamp(min=1)
    return weights, filtered


class RankGRPOExperienceMaker(RemoteExperienceMaker):
    """``RemoteExperienceMaker`` with per-rank group advantages. ``experience.rewards`` must be (b, N) per rank.

    ``A[i, k] = (r[i, k] - mean_g r[g, k]) / (std_g r[g, k] + 1e-4)`` over the ``n_samples_per_prompt`` samples of
    a prompt (``rank_advantages``), spread over the tokens of item k (``RankItems.token_advantages``). The KL goes
    into the loss (``--use_kl_loss``), not into the reward; OpenRLHF's length penalties are replaced by the code
    form's length shaping.
    """

    items: RankItems  # set by install()

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences):
        args = self.strategy.args
        if not args.algo.kl.use_loss and self.kl_ctl.value > 0:
            raise ValueError("Rank-GRPO adds the KL to the loss: set --use_kl_loss (or a zero KL coefficient)")
        rank_adv = group_rank_advantages(experiences, args.rollout.n_samples_per_prompt)
        for experience, adv in zip(experiences, rank_adv):
            experience.advantages = self.items.token_advantages(adv, experience.sequences, experience.action_mask)
            experience.returns = experience.advantages.clone()
            experience.info["return"] = experience.rewards.sum(-1)
            experience.kl = None
        return experiences


def group_rank_advantages(experiences, n_samples_per_prompt: int) -> list[torch.Tensor]:
    """Per-rank group advantages, one (b_j, N) tensor per experience, from their (b_j, N) per-rank rewards.

    Samples are regrouped by ``experience.index`` (the original rollout order, where the ``n_samples_per_prompt``
    samples of a prompt are consecutive), normalised with ``rank_advantages`` and split back.
    """
    sizes = [len(e.index) for e in experiences]
    order = torch.tensor(list(itertools.chain.from_iterable(e.index for e in experiences)))
    raw = torch.cat([e.rewards.float() for e in experiences])
    if raw.dim() != 2:
        raise ValueError(f"Rank-GRPO needs per-rank rewards (b, N) per experience, got shape {tuple(raw.shape)}: "
                         "let the reward function return one list of N rewards per sample")
    rewards = torch.empty_like(raw)
    rewards[order] = raw
    return list(rank_advantages(rewards, n_samples_per_prompt)[order].split(sizes))


def fused_actor_forward(self, sequences, action_mask=None, attention_mask=None, return_output=False,
                        allgather_logits=False, return_logprobs=False, ring_attn_group=None, packed_seq_lens=None,
                        return_entropy=False, **mm_inputs):
    """``Actor.forward`` for the action log-probs (B, A) of padded text batches, through ``fused_logprobs``.

    ``log p(sequences[:, t + 1] | <= t) = log softmax(h_t W^T / temperature)``, with ``h`` the backbone's last hidden
    states; only positions ``S - A - 1 .. S - 2`` that ``action_mask`` keeps go through the head (the others get
    0). Packed samples, vision-language models and calls without ``action_mask`` take OpenRLHF's own forward.
    ``output.entropy`` (B, A) is differentiable (OpenRLHF's ``entropy_coef`` bonus reaches the head and the
    states); the model's logit softcapping or scale applies (``logit_transform``).
    """
    if self.packing_samples or getattr(self, "is_vlm", False) or action_mask is None or return_logprobs:
        return _ACTOR_FORWARD(self, sequences, action_mask, attention_mask, return_output, allgather_logits,
                              return_logprobs, ring_attn_group, packed_seq_lens, return_entropy, **mm_inputs)
    transform = logit_transform(self.model)
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    backbone = unwrap_peft(self.model).base_model
    output = backbone(sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    A = action_mask.shape[1]
    hidden, targets = output.last_hidden_state[:, -A - 1 : -1], sequences[:, -A:]
    weight, bias = output_head(self.model)
    result = call_head(lambda h, w, b: fused_logprobs(h, w, targets, bias=b, temperature=self.temperature,
                                                      return_entropy=return_entropy, mask=action_mask, **transform),
                       hidden, weight, bias)
    log_probs, entropy = result if return_entropy else (result, None)
    action_log_probs = log_probs * action_mask.float()
    if not return_output:
        return action_log_probs
    output.entropy = entropy
    return action_log_probs, output


_ACTOR_FORWARD = Actor.forward  # OpenRLHF's own, for the cases the fused forward leaves to it


def patch_actor_forward() -> None:
    """Make ``openrlhf.models.actor.Actor.forward`` the fused one."""
    Actor.forward = fused_actor_forward


def install(tokenizer, rec_num: int, *, form: str = "code", skip_blank_lines: bool = True) -> RankItems:
    """Route OpenRLHF's PPO through Rank-GRPO in this process (the driver and every actor worker).

    Patches ``openrlhf.trainer.ppo_trainer.RemoteExperienceMaker`` (per-rank advantages),
    ``openrlhf.trainer.ray.ppo_actor.PolicyLoss`` (the item-level loss) and
    ``ActorPPOTrainer.training_step`` (segments each micro-batch and binds its item ids to the loss).
    """
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ray import ppo_actor

    items = RankItems.from_tokenizer(tokenizer, rec_num, skip_blank_lines=skip_blank_lines, form=form)
    ppo_trainer.RemoteExperienceMaker = type("RankGRPOExperienceMaker", (RankGRPOExperienceMaker,), {"items": items})
    ppo_actor.PolicyLoss = functools.partial(RankGRPOPolicyLoss, form=form, rec_num=rec_num)
    trainer = ppo_actor.ActorPPOTrainer
    original = getattr(trainer.training_step, "__wrapped__", trainer.training_step)

    def training_step(self, experience, *args, **kwargs):
        with self.actor_loss_fn.bind_item_ids(items.item_ids(experience.sequences, experience.action_mask)):
            return original(self, experience, *args, **kwargs)

    training_step.__wrapped__ = original
    trainer.training_step = training_step
    return items

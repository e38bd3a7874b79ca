"""Public functions: input checks at the boundary (``inputs.py``), the choice of backend and path, and the
docstrings users read."""

from __future__ import annotations

import torch

from . import backends, distributed, lm_head, ops
from .contract import LossConfig, stats_dict
from .inputs import (
    check_entropy_coef, check_head, check_logit_transform, check_tensor, raise_on_bad_values, target_checks,
    token_batch,
)
from .settings import memory_budget

_LOSS_DOC = """
    The loss (a 0-dim float32 tensor, float64 for float64 inputs) and a dict of detached 0-dim statistics:
    ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_region`` (fractions of loss tokens whose item ratio is
    clipped; a token with advantage 0 is never clipped), ``ratio_mean`` (token mean of the item ratios over the
    loss tokens whose log-probs are computed: all of them, except that ``rank_grpo_loss`` leaves out the items it
    skips, see below; ``skip_zero_advantage=False`` computes them all), ``kl`` (mean k3 KL over the loss tokens,
    only with ``ref_logps``), ``entropy`` (only when given or computed; over the same tokens as ``ratio_mean``),
    and per row (B,) ``clip_ratio_low_per_row`` and ``clip_ratio_high_per_row``: the fractions of the row's loss
    tokens that are clipped (0 for a row without loss tokens; TRL logs their minimum and maximum).

    Maths, per row i and item k (a group of tokens with the same id ``>= 0``), with ``l`` the log-probs, ``o``
    ``old_logps`` (``l.detach()`` when None: on-policy, every ratio is 1) and ``M`` the mask::

        w_k      = exp(mean_{t in k, M_t} (l_t - o_t))
        policy_t = -min(min(w_k, delta) * a_t, clamp(w_k, 1 - epsilon_low, 1 + epsilon_high) * a_t)
        KL_t     = exp(r_t - l_t) - (r_t - l_t) - 1
        loss     = sum_t c_t * policy_t + beta * sum_t kw_t * KL_t

    with ``c_t`` by ``loss_type``: ``"grpo"`` 1/(B M_i), ``"bnpo"`` 1/sum M, ``"dr_grpo"``
    1/(B max_completion_length), ``"dapo"`` 1/num_items_in_batch (the code form, ``kw = c``), and ``"rank"``
    1/(B N n_k), the paper form ``-(1/(B N)) sum_i sum_k min(w A, clip(w) A)`` with ``kw_t = 1/sum M``.

    Args:
        item_ids: (B, T) integer. Ids ``>= 0`` group the tokens of a row into items (each distinct id is one
            group); negative ids are outside the loss. ``Segments.item_ids_for(loss_type)`` gives them.
        advantages: (B, T) per token (the code form: ``token_advantages`` gives them, EOS and length shaping
            included), (B,) or (B, 1) per row, or with ``advantage_level="rank"`` (B, K) per rank: token t takes
            ``advantages[b, item_ids[b, t]]`` (0 for ids >= K), which is the paper form's input with
            ``Segments.item_ids_for("rank")``; for the code form use ``token_advantages``.
        completion_mask: (B, T) bool/int, 1 on tokens in the loss (default: ``item_ids >= 0``).
        old_logps, ref_logps: (B, T) float, log-probs of the behaviour and the reference policy (constants).
        epsilon_low, epsilon_high: the clip range ``[1 - epsilon_low, 1 + epsilon_high]`` (released: 0.06, 0.08).
        delta: optional upper bound of the unclipped ratio (two-sided clipping), > 1.
        beta: weight of the k3 KL to ``ref_logps`` (released: 1e-3); > 0 needs ``ref_logps``.
        loss_type: ``"grpo"``, ``"bnpo"`` (released runs), ``"dr_grpo"``, ``"dapo"`` or ``"rank"`` (paper).
        max_completion_length: ``dr_grpo``'s L_max (default T).
        num_items_in_batch: ``dapo``'s token count of the whole optimizer step (int or 0-dim tensor), required there.
        policy_weights: optional (B, T) constants ``pw_t`` (finite, >= 0) multiplying each token's policy term
            only: ``policy_t -> pw_t * policy_t``, the item ratios, normalisers, KL term and statistics unchanged
            (TRL's order: policy loss x masks x importance-sampling ratio, then + beta KL). A truncated
            importance-sampling correction (vLLM's sampler against the trainer), an off-policy or entropy mask.
        rec_num: N of the paper form (default K of per-rank advantages; required with per-token advantages).
        entropy: optional (B, T) per-token entropies, only averaged into the statistics.
"""

_NON_FINITE_DOC = """
    Non-finite inputs: a NaN or infinite log-prob of a token in the loss (from ``hidden``, ``weight`` or ``bias``)
    makes the loss NaN or infinite, so every NaN guard on the loss fires; tokens outside the loss never reach the
    loss or the gradients (their gradient rows are exactly 0, whatever they hold). Given log-probs, advantages and
    ``old_logps``/``ref_logps`` are checked instead: a non-finite ``logps`` or advantage, or a NaN old/reference
    log-prob, on a token in the loss is a ``ValueError`` (``RANKGRPO_VALIDATE=0`` skips the check and the loss is
    NaN). Finite inputs never give a NaN.
"""


def _doc(*parts: str):
    """Assemble a docstring from shared parts (a string expression in the body would not be one)."""

    def attach(fn):
        fn.__doc__ = "".join(parts)
        return fn

    return attach


def _loss_operands(batch, cfg):
    """The tensors and settings of the loss ops, in their argument order (after the log-probs or the head)."""
    return (batch.old_logps, batch.ref_logps, batch.advantages, batch.policy_weights, batch.group, batch.mask,
            batch.normaliser, batch.tokens, cfg.epsilon_low, cfg.epsilon_high, cfg.delta, cfg.beta, cfg.loss_type)


def _loss_from_logps(logps, batch, entropy, cfg, backend):
    *tensors, epsilon_low, epsilon_high, delta, beta, loss_type = _loss_operands(batch, cfg)
    loss, stats, row_clipped, _ = ops.loss_from_logps(logps, *tensors, entropy, epsilon_low, epsilon_high, delta,
                                                      beta, loss_type, backend)
    return loss, stats, row_clipped


@_doc("""Rank-GRPO loss from per-token log-probs (B, T), for frameworks that already have them (OpenRLHF, verl).

    Gradients flow to ``logps`` only; O(B T) work, no host synchronisation beyond the optional value checks.
    ``backend``: ``"auto"`` (Triton for CUDA tensors where it imports, else torch), ``"torch"``, ``"triton"`` or
    ``"cuda"``: which implementation of the segment loss runs.

    Returns:""", _LOSS_DOC, _NON_FINITE_DOC, """
    Equivalent PyTorch: ``reference.reference_loss_from_logps`` with per-token advantages.
    """)
def rank_grpo_loss_from_logps(
    logps: torch.Tensor,
    *,
    item_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    loss_type: str = "bnpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    rec_num: int | None = None,
    entropy: torch.Tensor | None = None,
    policy_weights: torch.Tensor | None = None,
    advantage_level: str = "auto",
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = LossConfig(epsilon_low, epsilon_high, delta, beta, loss_type)
    check_tensor(logps, "logps", None, "float")
    if logps.dim() != 2:
        raise ValueError(f"logps must be (B, T), got shape {tuple(logps.shape)}")
    B, T = logps.shape
    batch, checks = token_batch(
        B, T, logps.device, cfg, item_ids=item_ids, advantages=advantages, completion_mask=completion_mask,
        old_logps=old_logps, ref_logps=ref_logps, advantage_level=advantage_level,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch, rec_num=rec_num,
        entropy=entropy, logps=logps, policy_weights=policy_weights,
    )
    raise_on_bad_values(checks)
    loss, stats, row_clipped = _loss_from_logps(logps, batch, entropy, cfg,
                                                backends.choose(backend, logps.device, logps.dtype))
    return loss, stats_dict(stats.detach(), row_clipped, batch.mask, ref_logps is not None, entropy is not None)


def _needs_grads(hidden, weight, bias):
    if not torch.is_grad_enabled():
        return False, False, False
    return hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


@_doc("""Fused Rank-GRPO loss from the last hidden states and the LM head, without a (tokens x vocab) logits tensor.

    ``hidden`` (B, T, H) are the states that predict ``target_ids`` (B, T) (already shifted: position t predicts
    token t of the completion), ``weight`` (V, H) the LM head (the embedding Parameter when tied), ``bias`` (V,)
    optional, all of one float dtype (float32, bfloat16, float16 or float64). The log-probs are those of
    ``softmax(S(logit_scale (hidden @ weight.T + bias)) / temperature)`` with fp32 logits (float64 for float64
    inputs), ``S(u) = logit_softcap tanh(u / logit_softcap)`` (Gemma-2's final_logit_softcapping; the identity when
    None); gradients flow to ``hidden``, ``weight`` and ``bias``.

    Cost follows the gradient (``lm_head.py``): only the tokens the loss needs enter the GEMMs, those in the loss
    (``completion_mask`` and ``item_ids >= 0``) and, when nothing else needs them (``beta=0``, no ``ref_logps``,
    no ``entropy_coef``, ``skip_zero_advantage=True``), not the items whose every advantage is 0 (a rank every
    completion of the group missed), which carry no loss and no gradient; their ``hidden`` rows are never read and
    get exactly zero gradient. Listing them costs one host sync per call. The gradients are formed in the forward
    over chunks of whole items: each logit is computed once, and ``loss.backward()`` only scales them by the
    incoming gradient (so the graph runs backward once). An item whose logits alone exceed the budget has them
    recomputed for its gradients, with a warning.

    ``entropy_coef``: the entropy bonus ``loss -= entropy_coef * mean_t H_t`` over the loss tokens (TRL's, verl's
    and OpenRLHF's), with its gradient; ``entropy_mask`` (B, T) bool/int restricts that mean to the loss tokens it
    marks (TRL's ``top_entropy_quantile`` with its bonus: the high-entropy tokens). ``compute_entropy=True`` adds
    the mean entropy over the tokens whose log-probs are computed to the statistics. ``backend``: ``"auto"`` (Triton
    for CUDA tensors where it imports, else torch), ``"torch"``, ``"triton"`` or ``"cuda"``: which implementation of
    the row pass and the segment loss runs around the vendor GEMMs. ``memory_budget_bytes`` bounds the logits
    scratch (default ``RANKGRPO_MEMORY_BUDGET``, else 64 MiB on a CPU and 1/32 of a GPU's memory; ``settings.py``).
    ``process_group``: with a vocabulary-parallel head, ``weight`` and ``bias`` hold this rank's rows (shards in
    rank order, uneven allowed) and ``target_ids`` stay global; ``d_weight`` stays local, ``d_hidden`` is
    all-reduced, and every rank gets the same loss (``distributed.py``; the recompute path over the loss tokens,
    not traceable by ``torch.compile``).

    Returns:""", _LOSS_DOC, _NON_FINITE_DOC, """
    Equivalent PyTorch (holding all logits)::

        logps = ((hidden @ weight.T + bias).float() / temperature).log_softmax(-1).gather(-1, target_ids[..., None])
        loss, stats = rank_grpo_loss_from_logps(logps[..., 0], item_ids=item_ids, advantages=advantages, ...)
    """)
def rank_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    item_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    loss_type: str = "bnpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    rec_num: int | None = None,
    policy_weights: torch.Tensor | None = None,
    advantage_level: str = "auto",
    compute_entropy: bool = False,
    entropy_coef: float = 0.0,
    entropy_mask: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    skip_zero_advantage: bool = True,
    backend: str = "auto",
    memory_budget_bytes: int | None = None,
    process_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = LossConfig(epsilon_low, epsilon_high, delta, beta, loss_type)
    B, T = check_head(hidden, weight, target_ids, bias, temperature)
    transform = check_logit_transform(temperature, logit_scale, logit_softcap)
    entropy_coef = check_entropy_coef(entropy_coef)
    with_entropy = bool(compute_entropy) or entropy_coef != 0.0
    batch, checks = token_batch(
        B, T, hidden.device, cfg, item_ids=item_ids, advantages=advantages, completion_mask=completion_mask,
        old_logps=old_logps, ref_logps=ref_logps, advantage_level=advantage_level,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch, rec_num=rec_num,
        policy_weights=policy_weights,
    )
    check_tensor(entropy_mask, "entropy_mask", (B, T), None, hidden.device, optional=True)
    entropy_mask = None if entropy_mask is None else entropy_mask.bool()
    vocab_start, vocab = _vocabulary(weight, process_group)
    raise_on_bad_values(checks + target_checks(target_ids, vocab, batch.mask))
    # Targets outside the loss may be anything (padding, -100): point them at row 0 so gathers stay in range.
    targets = torch.where(batch.mask, target_ids, 0).reshape(-1)
    hidden2d = hidden.reshape(B * T, hidden.shape[-1])
    backend = backends.choose(backend, hidden.device, hidden.dtype)
    budget = memory_budget(memory_budget_bytes, hidden.device)
    if process_group is None:
        loss, stats, row_clipped, *_ = ops.fused_loss(
            hidden2d, weight, bias, targets, *_loss_operands(batch, cfg), transform.temperature,
            transform.logit_scale, transform.softcap, bool(compute_entropy), entropy_coef, entropy_mask,
            bool(skip_zero_advantage), budget, *_needs_grads(hidden, weight, bias), backend)
        return loss, stats_dict(stats.detach(), row_clipped, batch.mask, ref_logps is not None, with_entropy)
    logp, entropy = distributed.sharded_logprobs(hidden2d, weight, bias, targets, batch.mask.reshape(-1), vocab_start,
                                                 transform, budget, backend, with_entropy, process_group)
    entropy = entropy.view(B, T) if entropy is not None else None
    loss, stats, row_clipped = _loss_from_logps(logp.view(B, T), batch, entropy, cfg, backend)
    if entropy_coef != 0.0:
        weights, count = lm_head.entropy_bonus_weights(batch.mask, entropy_mask, loss.dtype)
        loss = loss - entropy_coef * torch.where(weights != 0, entropy.reshape(-1), 0).sum() / count
    return loss, stats_dict(stats.detach(), row_clipped, batch.mask, ref_logps is not None, with_entropy)


def _vocabulary(weight, process_group):
    """(first row of this rank's head, total vocabulary size)."""
    if process_group is None:
        return 0, weight.shape[0]
    return distributed.shard_range(weight, process_group)


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    backend: str = "auto",
    memory_budget_bytes: int | None = None,
    process_group=None,
):
    """Per-token log-probs (B, T) of ``target_ids`` (and entropies if asked) without a (tokens x vocab) tensor.

    ``logp[b, t] = log softmax((hidden[b, t] @ weight.T + bias) / temperature)[target_ids[b, t]]``, returned in
    float32 (float64 for float64 inputs); the entropy ``-sum_v p log p`` comes back as a second (B, T) tensor
    without gradient. Gradients of the log-probs flow to ``hidden``, ``weight`` and ``bias``: the backward
    recomputes the logits of the tokens with a non-zero gradient (``lm_head.py``, the recompute path). Use it under
    ``torch.no_grad()`` for old and reference log-probs. ``mask`` (B, T) bool/int (e.g. the completion mask):
    only its tokens enter the GEMMs, the others get log-prob and entropy 0 and no gradient (their targets may be
    anything); listing them costs one host sync. Shapes, dtypes, ``backend``, ``memory_budget_bytes`` and
    ``process_group`` (a vocabulary-parallel head) as in ``rank_grpo_loss``.
    """
    B, T = check_head(hidden, weight, target_ids, bias, temperature)
    transform = check_logit_transform(temperature, logit_scale, logit_softcap)
    check_tensor(mask, "mask", (B, T), None, hidden.device, optional=True)
    listed = None if mask is None else mask.bool().reshape(-1)
    vocab_start, vocab = _vocabulary(weight, process_group)
    in_range = torch.ones_like(target_ids, dtype=torch.bool) if mask is None else mask.bool()
    raise_on_bad_values(target_checks(target_ids, vocab, in_range))
    targets = target_ids.reshape(-1) if listed is None else torch.where(listed, target_ids.reshape(-1), vocab_start)
    head = (hidden.reshape(B * T, hidden.shape[-1]), weight, bias, targets)
    budget = memory_budget(memory_budget_bytes, hidden.device)
    backend = backends.choose(backend, hidden.device, hidden.dtype)
    if process_group is None:
        logp, _, entropy = ops.fused_logprobs(*head, listed, transform.temperature, transform.logit_scale,
                                              transform.softcap, budget, bool(return_entropy), backend)
    else:
        logp, entropy = distributed.sharded_logprobs(*head, listed, vocab_start, transform, budget, backend,
                                                     bool(return_entropy), process_group)
    logp = logp.view(B, T)
    return (logp, entropy.view(B, T)) if return_entropy else logp

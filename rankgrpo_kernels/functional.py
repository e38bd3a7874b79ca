"""Public functions: the settings as specs, the inputs checked at the boundary (``inputs.py``), then one call per
path into the custom ops (``ops.py``)."""

from __future__ import annotations

import torch

from . import backends
from .contract import stats_dict
from .docstrings import LOSS_DOC, NON_FINITE_DOC, doc
from .head.sharded import shard_range, sharded_logprobs
from .inputs import check_head, check_tensor, raise_on_bad_values, resolve_head, target_checks, token_batch
from .ops import OPS
from .specs import HeadSpec, LossSpec


def spec_from(cls, given, argument: str, **keywords):
    """The ``cls`` spec of a call: ``given`` (the ``argument`` keyword), or one built from ``keywords``. With a
    spec given, a keyword of its fields that is not at its default is a ValueError (given twice)."""
    if given is None:
        return cls(**keywords)
    if not isinstance(given, cls):
        raise TypeError(f"{argument} must be a {cls.__name__} or None, got {type(given).__name__}")
    default = cls()
    clash = sorted(name for name, value in keywords.items() if value != getattr(default, name))
    if clash:
        raise ValueError(f"{argument}= holds {clash} already: set them in the {cls.__name__} "
                         f"(dataclasses.replace) or leave {argument}=None")
    return given


def _needs_grads(hidden, weight, bias):
    if not torch.is_grad_enabled():
        return False, False, False
    return hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


def _vocabulary(weight, process_group):
    """(first row of this rank's head, total vocabulary size)."""
    if process_group is None:
        return 0, weight.shape[0]
    return shard_range(weight, process_group)


@doc("""Rank-GRPO loss from per-token log-probs (B, T), for frameworks that already have them (OpenRLHF, verl).

    Gradients flow to ``logps`` only; O(B T) work, no host synchronisation beyond the optional value checks.
    ``backend``: ``"auto"`` (Triton for CUDA tensors where it imports, else torch), ``"torch"``, ``"triton"`` or
    ``"cuda"``: which implementation of the segment loss runs.

    Returns:""", LOSS_DOC, NON_FINITE_DOC, """
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
    loss: LossSpec | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    spec = spec_from(LossSpec, loss, "loss", epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                     beta=beta, loss_type=loss_type, max_completion_length=max_completion_length, rec_num=rec_num)
    if spec.entropy_coef != 0.0:
        raise ValueError("entropy_coef needs the entropies' gradient: use rank_grpo_loss (the fused head), or "
                         "subtract the bonus from the entropies of fused_logprobs")
    check_tensor(logps, "logps", None, "float")
    if logps.dim() != 2:
        raise ValueError(f"logps must be (B, T), got shape {tuple(logps.shape)}")
    B, T = logps.shape
    batch, checks = token_batch(
        B, T, logps.device, spec, item_ids=item_ids, advantages=advantages, completion_mask=completion_mask,
        old_logps=old_logps, ref_logps=ref_logps, advantage_level=advantage_level,
        num_items_in_batch=num_items_in_batch, entropy=entropy, logps=logps, policy_weights=policy_weights,
    )
    raise_on_bad_values(checks)
    head = HeadSpec(backend=backends.choose(backend, logps.device, logps.dtype))  # no logits here: no budget
    total, stats, row_clipped, _ = OPS.loss_from_logps(batch, spec, head)
    return total, stats_dict(stats, row_clipped, batch.mask, ref_logps is not None, entropy is not None,
                             has_weight=spec.reinforce)


@doc("""Fused Rank-GRPO loss from the last hidden states and the LM head, without a (tokens x vocab) logits tensor.

    ``hidden`` (B, T, H) are the states that predict ``target_ids`` (B, T) (already shifted: position t predicts
    token t of the completion), ``weight`` (V, H) the LM head (the embedding Parameter when tied), ``bias`` (V,)
    optional, all of one float dtype (float32, bfloat16, float16 or float64). The log-probs are those of
    ``softmax(S(logit_scale (hidden @ weight.T + bias)) / temperature)`` with fp32 logits (float64 for float64
    inputs), ``S(u) = logit_softcap tanh(u / logit_softcap)`` (Gemma-2's final_logit_softcapping; the identity when
    None); gradients flow to ``hidden``, ``weight`` and ``bias``.

    Cost follows the gradient (``head/``): only the tokens the loss needs enter the GEMMs, those in the loss
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
    the mean entropy over the tokens whose log-probs are computed to the statistics (``computed_tokens`` says how
    many; where every item is skipped it is NaN, not measured, and ``ratio_mean`` 1). ``backend``: ``"auto"`` (Triton
    for CUDA tensors where it imports, else torch), ``"torch"``, ``"triton"`` or ``"cuda"``: which implementation of
    the row pass and the segment loss runs around the vendor GEMMs. ``memory_budget_bytes`` bounds the logits
    scratch (default ``RANKGRPO_MEMORY_BUDGET``, else 64 MiB on a CPU and 1/32 of a GPU's memory; ``settings.py``).
    ``process_group``: with a vocabulary-parallel head, ``weight`` and ``bias`` hold this rank's rows (shards in
    rank order, uneven allowed) and ``target_ids`` stay global; ``d_weight`` stays local, ``d_hidden`` is
    all-reduced, and every rank gets the same loss (``head/sharded.py``; the recompute path over the loss tokens,
    not traceable by ``torch.compile``).

    Returns:""", LOSS_DOC, NON_FINITE_DOC, """
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
    loss: LossSpec | None = None,
    head: HeadSpec | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    spec = spec_from(LossSpec, loss, "loss", epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                     beta=beta, loss_type=loss_type, max_completion_length=max_completion_length, rec_num=rec_num,
                     entropy_coef=entropy_coef)
    head = spec_from(HeadSpec, head, "head", temperature=temperature, logit_scale=logit_scale,
                     logit_softcap=logit_softcap, memory_budget_bytes=memory_budget_bytes, backend=backend,
                     skip_zero_advantage=skip_zero_advantage)
    B, T = check_head(hidden, weight, target_ids, bias)
    batch, checks = token_batch(
        B, T, hidden.device, spec, item_ids=item_ids, advantages=advantages, completion_mask=completion_mask,
        old_logps=old_logps, ref_logps=ref_logps, advantage_level=advantage_level,
        num_items_in_batch=num_items_in_batch, policy_weights=policy_weights, entropy_mask=entropy_mask,
    )
    vocab_start, vocab = _vocabulary(weight, process_group)
    raise_on_bad_values(checks + target_checks(target_ids, vocab, batch.mask))
    # Targets outside the loss may be anything (padding, -100): point them at row 0 so gathers stay in range.
    targets = torch.where(batch.mask, target_ids, 0).reshape(-1)
    hidden2d = hidden.reshape(B * T, hidden.shape[-1])
    head = resolve_head(head, hidden.device, hidden.dtype)
    compute_entropy = bool(compute_entropy)
    if process_group is None:
        total, stats, row_clipped, computed, *_ = OPS.fused_loss(hidden2d, weight, bias, targets, batch, spec, head,
                                                                 compute_entropy=compute_entropy,
                                                                 needs=_needs_grads(hidden, weight, bias))
    else:  # every loss token's log-prob is computed
        computed = None
        total, stats, row_clipped = OPS.sharded_loss(hidden2d, weight, bias, targets, batch, spec, head,
                                                     vocab_start=vocab_start, compute_entropy=compute_entropy,
                                                     group=process_group)
    has_entropy = compute_entropy or spec.entropy_coef != 0.0
    return total, stats_dict(stats, row_clipped, batch.mask, ref_logps is not None, has_entropy, computed,
                             has_weight=spec.reinforce)


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
    head: HeadSpec | None = None,
):
    """Per-token log-probs (B, T) of ``target_ids`` (and entropies if asked) without a (tokens x vocab) tensor.

    ``logp[b, t] = log softmax((hidden[b, t] @ weight.T + bias) / temperature)[target_ids[b, t]]``, returned in
    float32 (float64 for float64 inputs); the entropy ``-sum_v p log p`` comes back as a second (B, T) tensor
    with its gradient. Gradients of the log-probs flow to ``hidden``, ``weight`` and ``bias``: the backward
    recomputes the logits of the tokens with a non-zero gradient (``head/recompute.py``). Use it under
    ``torch.no_grad()`` for old and reference log-probs. ``mask`` (B, T) bool/int (e.g. the completion mask):
    only its tokens enter the GEMMs, the others get log-prob and entropy 0 and no gradient (their targets may be
    anything); listing them costs one host sync. Shapes, dtypes, ``backend``, ``memory_budget_bytes``,
    ``process_group`` (a vocabulary-parallel head) and ``head`` (the head's settings as a ``HeadSpec``) as in
    ``rank_grpo_loss``.
    """
    head = spec_from(HeadSpec, head, "head", temperature=temperature, logit_scale=logit_scale,
                     logit_softcap=logit_softcap, memory_budget_bytes=memory_budget_bytes, backend=backend)
    B, T = check_head(hidden, weight, target_ids, bias)
    check_tensor(mask, "mask", (B, T), None, hidden.device, optional=True)
    listed = None if mask is None else mask.bool().reshape(-1)
    vocab_start, vocab = _vocabulary(weight, process_group)
    in_range = torch.ones_like(target_ids, dtype=torch.bool) if mask is None else mask.bool()
    raise_on_bad_values(target_checks(target_ids, vocab, in_range))
    targets = target_ids.reshape(-1) if listed is None else torch.where(listed, target_ids.reshape(-1), vocab_start)
    hidden2d = hidden.reshape(B * T, hidden.shape[-1])
    head = resolve_head(head, hidden.device, hidden.dtype)
    compute_entropy = bool(return_entropy)
    if process_group is None:
        logp, _, entropy = OPS.fused_logprobs(hidden2d, weight, bias, targets, listed, head,
                                              compute_entropy=compute_entropy)
    else:
        logp, entropy = sharded_logprobs(hidden2d, weight, bias, targets, listed, vocab_start, head, compute_entropy,
                                         process_group)
    logp = logp.view(B, T)
    return (logp, entropy.view(B, T)) if return_entropy else logp

"""Public functions: input checks at the boundary, backend choice, and the docstrings users read."""

from __future__ import annotations

import math

import torch

from . import backends, distributed, ops
from .settings import memory_budget, validate_values
from .contract import LossConfig, TokenBatch, dense_groups, stats_dict

_LOSS_DOC = """
    The loss (a 0-dim float32 tensor, float64 for float64 inputs) and a dict of detached 0-dim statistics:
    ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_region`` (fractions of loss tokens whose item ratio is
    clipped), ``ratio_mean`` (token mean of the item ratios), ``kl`` (mean k3 KL, NaN without ``ref_logps``) and
    ``entropy`` (NaN unless given).

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
        rec_num: N of the paper form (default K of per-rank advantages; required with per-token advantages).
        entropy: optional (B, T) per-token entropies, only averaged into the statistics.
"""


def _check_tensor(x, name, shape=None, kind="float", device=None, optional=False):
    """Check type, dtype kind ('float' | 'int' | 'mask'), shape and device of one argument."""
    if x is None:
        if not optional:
            raise ValueError(f"{name} is required")
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if kind == "float" and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if kind == "int" and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device}")


def _raise_on_bad_values(checks):
    """One host sync for all value checks: ``checks`` is a list of (message, bool 0-dim tensor that is True if bad)."""
    if not checks or not validate_values() or torch.compiler.is_compiling():
        return
    flags = torch.stack([flag for _, flag in checks]).tolist()
    for (message, _), bad in zip(checks, flags):
        if bad:
            raise ValueError(message)


def _token_batch(B, T, device, *, item_ids, advantages, completion_mask, old_logps, ref_logps, cfg, advantage_level,
                 max_completion_length, num_items_in_batch, rec_num, entropy, logps_for_check=None):
    """Validate the loss inputs and bring them to the token level (``TokenBatch``); returns it and value checks."""
    _check_tensor(item_ids, "item_ids", (B, T), "int", device)
    _check_tensor(advantages, "advantages", None, "float", device)
    _check_tensor(completion_mask, "completion_mask", (B, T), None, device, optional=True)
    _check_tensor(old_logps, "old_logps", (B, T), "float", device, optional=True)
    _check_tensor(ref_logps, "ref_logps", (B, T), "float", device, optional=True)
    _check_tensor(entropy, "entropy", (B, T), "float", device, optional=True)
    if cfg.beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={cfg.beta} needs ref_logps (or set beta=0.0)")
    if advantage_level not in ("auto", "rank"):
        raise ValueError(f"advantage_level must be 'auto' or 'rank', got {advantage_level!r}")

    mask = item_ids >= 0
    if completion_mask is not None:
        mask = mask & completion_mask.bool()

    per_rank = None
    if advantage_level == "rank":
        if advantages.dim() != 2 or advantages.shape[0] != B or advantages.shape[1] < 1:
            raise ValueError(f"advantages per rank must be (B, K) with B={B}, K >= 1; got {tuple(advantages.shape)}")
        K = advantages.shape[1]
        in_range = (item_ids >= 0) & (item_ids < K)
        per_token = torch.where(in_range, advantages.gather(1, item_ids.long().clamp(0, K - 1)), 0)
        per_rank = advantages
    elif tuple(advantages.shape) in ((B,), (B, 1)):  # one advantage per row, as TRL passes them
        per_token = advantages.reshape(B, 1).expand(B, T)
    elif tuple(advantages.shape) == (B, T):
        per_token = advantages
    else:
        raise ValueError(
            f"advantages must be (B,) or (B, 1) per row or (B, T) per token with B={B}, T={T}, or (B, K) per rank "
            f"with advantage_level='rank'; got {tuple(advantages.shape)}"
        )

    dtype = torch.promote_types(advantages.dtype, torch.float32)
    if cfg.loss_type == "grpo":
        normaliser = torch.ones((), dtype=dtype, device=device)
    elif cfg.loss_type == "bnpo":
        normaliser = mask.sum().clamp(min=1).to(dtype)
    elif cfg.loss_type == "dr_grpo":
        length = T if max_completion_length is None else max_completion_length
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"max_completion_length must be an int >= 1, got {max_completion_length!r}")
        normaliser = torch.tensor(float(B * length), dtype=dtype, device=device)
    elif cfg.loss_type == "dapo":
        if num_items_in_batch is None:
            raise ValueError("loss_type='dapo' needs num_items_in_batch (the step's total count of loss tokens)")
        normaliser = torch.as_tensor(num_items_in_batch, dtype=dtype, device=device).reshape(())
        if not isinstance(num_items_in_batch, torch.Tensor) and not (0 < float(num_items_in_batch) < math.inf):
            raise ValueError(f"num_items_in_batch must be a finite number > 0, got {num_items_in_batch!r}")
    else:  # rank
        n_ranks = rec_num if rec_num is not None else (per_rank.shape[1] if per_rank is not None else None)
        if n_ranks is None:
            raise ValueError("loss_type='rank' needs rec_num (N) when advantages are not per rank")
        if not isinstance(n_ranks, int) or isinstance(n_ranks, bool) or n_ranks < 1:
            raise ValueError(f"rec_num must be an int >= 1, got {n_ranks!r}")
        normaliser = torch.tensor(float(B * n_ranks), dtype=dtype, device=device)

    checks = [("advantages must be finite on tokens in the loss", (~torch.isfinite(per_token) & mask).any())]
    for name, x in (("logps", logps_for_check), ("old_logps", old_logps), ("ref_logps", ref_logps)):
        if x is not None:
            checks.append((f"{name} contain NaN on tokens in the loss", (torch.isnan(x) & mask).any()))
    if cfg.loss_type == "dapo" and isinstance(num_items_in_batch, torch.Tensor):
        checks.append(("num_items_in_batch must be finite and > 0", ~((normaliser > 0) & torch.isfinite(normaliser))))

    batch = TokenBatch(
        logps=None, old_logps=old_logps, ref_logps=ref_logps, advantages=per_token,
        group=dense_groups(item_ids, mask), mask=mask, normaliser=normaliser, entropy=entropy,
    )
    return batch, checks


def _loss_operands(batch, cfg):
    """The tensors and settings of the loss ops, in their argument order."""
    return (batch.old_logps, batch.ref_logps, batch.advantages, batch.group, batch.mask, batch.normaliser,
            batch.entropy, cfg.epsilon_low, cfg.epsilon_high, cfg.delta, cfg.beta, cfg.loss_type)


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
    advantage_level: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rank-GRPO loss from per-token log-probs (B, T), for frameworks that already have them (OpenRLHF, verl).

    Gradients flow to ``logps`` only; O(B T) work, no host synchronisation beyond the optional value checks.

    Returns:""" + _LOSS_DOC + """
    Equivalent PyTorch: ``reference.reference_loss_from_logps`` with per-token advantages.
    """
    cfg = LossConfig(epsilon_low, epsilon_high, delta, beta, loss_type)
    _check_tensor(logps, "logps", None, "float")
    if logps.dim() != 2:
        raise ValueError(f"logps must be (B, T), got shape {tuple(logps.shape)}")
    B, T = logps.shape
    batch, checks = _token_batch(
        B, T, logps.device, item_ids=item_ids, advantages=advantages, completion_mask=completion_mask,
        old_logps=old_logps, ref_logps=ref_logps, cfg=cfg, advantage_level=advantage_level,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch, rec_num=rec_num,
        entropy=entropy, logps_for_check=logps,
    )
    _raise_on_bad_values(checks)
    # The O(B T) segment loss runs in Triton only where the fused path would: CUDA tensors, Triton importable.
    backend = backends.choose("auto", logps.device, logps.dtype)
    loss, stats, _ = ops.loss_from_logps(logps, *_loss_operands(batch, cfg), backend)
    return loss, stats_dict(stats.detach(), ref_logps is not None, entropy is not None)


def _check_head(hidden, weight, target_ids, bias, temperature):
    """Validate the LM-head inputs; returns (B, T) and the value checks on the target ids."""
    _check_tensor(hidden, "hidden", None, "float")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    B, T, H = hidden.shape
    _check_tensor(weight, "weight", None, "float", hidden.device)
    distributed.check_not_sharded_parameter(weight)
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be (V, H) with H={H} (hidden's last dim), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    _check_tensor(target_ids, "target_ids", (B, T), "int", hidden.device)
    if target_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"target_ids must be int64 or int32, got {target_ids.dtype}")
    _check_tensor(bias, "bias", (weight.shape[0],), "float", hidden.device, optional=True)
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return B, T


def _target_checks(target_ids, vocab, mask):
    out_of_range = ((target_ids < 0) | (target_ids >= vocab)) & mask
    return [(f"target_ids must lie in [0, V) = [0, {vocab}) on tokens in the loss", out_of_range.any())]


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
    advantage_level: str = "auto",
    compute_entropy: bool = False,
    backend: str = "auto",
    memory_budget_bytes: int | None = None,
    process_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fused Rank-GRPO loss from the last hidden states and the LM head, without a (tokens x vocab) logits tensor.

    ``hidden`` (B, T, H) are the states that predict ``target_ids`` (B, T) (already shifted: position t predicts
    token t of the completion), ``weight`` (V, H) the LM head (the embedding Parameter when tied), ``bias`` (V,)
    optional, all of one float dtype (float32, bfloat16, float16 or float64). The log-probs are those of
    ``softmax((hidden @ weight.T + bias) / temperature)``; gradients flow to ``hidden``, ``weight`` and ``bias``.
    ``backend``: ``"auto"`` (the fastest available for the device) or ``"torch"`` (chunked, any device).
    ``memory_budget_bytes`` bounds the logits scratch (default ``RANKGRPO_MEMORY_BUDGET`` or 32 MiB).
    ``compute_entropy=True`` adds the mean entropy of the policy over the loss tokens to the statistics.
    ``process_group``: with a vocabulary-parallel head, ``weight`` and ``bias`` hold this rank's rows (shards in
    rank order, uneven allowed) and ``target_ids`` stay global; ``d_weight`` stays local, ``d_hidden`` is
    all-reduced, and every rank gets the same loss (``distributed.py``).

    Returns:""" + _LOSS_DOC + """
    Equivalent PyTorch (holding all logits)::

        logps = ((hidden @ weight.T + bias).float() / temperature).log_softmax(-1).gather(-1, target_ids[..., None])
        loss, stats = rank_grpo_loss_from_logps(logps[..., 0], item_ids=item_ids, advantages=advantages, ...)
    """
    cfg = LossConfig(epsilon_low, epsilon_high, delta, beta, loss_type)
    B, T = _check_head(hidden, weight, target_ids, bias, temperature)
    batch, checks = _token_batch(
        B, T, hidden.device, item_ids=item_ids, advantages=advantages, completion_mask=completion_mask,
        old_logps=old_logps, ref_logps=ref_logps, cfg=cfg, advantage_level=advantage_level,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch, rec_num=rec_num,
        entropy=None,
    )
    vocab_start, vocab = _vocabulary(weight, process_group)
    _raise_on_bad_values(checks + _target_checks(target_ids, vocab, batch.mask))
    # Targets outside the loss may be anything (padding, -100): point them at row 0 so gathers stay in range.
    targets = torch.where(batch.mask, target_ids, 0).reshape(-1)
    hidden2d = hidden.reshape(B * T, hidden.shape[-1])
    backend = backends.choose(backend, hidden.device, hidden.dtype)
    budget = memory_budget(memory_budget_bytes)
    old, ref, adv, group, mask, normaliser, _, *settings = _loss_operands(batch, cfg)
    if process_group is None:
        loss, stats, _, _ = ops.fused_loss(hidden2d, weight, bias, targets, old, ref, adv, group, mask, normaliser,
                                           *settings, float(temperature), bool(compute_entropy), budget, backend)
    else:
        logp, entropy = distributed.sharded_logprobs(hidden2d, weight, bias, targets, vocab_start, float(temperature),
                                                     budget, backend, bool(compute_entropy), process_group)
        entropy = entropy.view(B, T) if entropy is not None else None
        loss, stats, _ = ops.loss_from_logps(logp.view(B, T), old, ref, adv, group, mask, normaliser, entropy,
                                             *settings, backends.choose("auto", logp.device, logp.dtype))
    return loss, stats_dict(stats.detach(), ref_logps is not None, compute_entropy)


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
    backend: str = "auto",
    memory_budget_bytes: int | None = None,
    process_group=None,
):
    """Per-token log-probs (B, T) of ``target_ids`` (and entropies if asked) without a (tokens x vocab) tensor.

    ``logp[b, t] = log softmax((hidden[b, t] @ weight.T + bias) / temperature)[target_ids[b, t]]``, returned in
    float32 (float64 for float64 inputs); the entropy ``-sum_v p log p`` comes back as a second (B, T) tensor
    without gradient. Gradients of the log-probs flow to ``hidden``, ``weight`` and ``bias``. Use it under
    ``torch.no_grad()`` for old and reference log-probs. Shapes and dtypes as in ``rank_grpo_loss``, and so is
    ``process_group`` (a vocabulary-parallel head).
    """
    B, T = _check_head(hidden, weight, target_ids, bias, temperature)
    mask = torch.ones_like(target_ids, dtype=torch.bool)
    vocab_start, vocab = _vocabulary(weight, process_group)
    _raise_on_bad_values(_target_checks(target_ids, vocab, mask))
    head = (hidden.reshape(B * T, hidden.shape[-1]), weight, bias, target_ids.reshape(-1))
    budget = memory_budget(memory_budget_bytes)
    backend = backends.choose(backend, hidden.device, hidden.dtype)
    if process_group is None:
        logp, _, entropy = ops.fused_logprobs(*head, float(temperature), budget, bool(return_entropy), backend)
    else:
        logp, entropy = distributed.sharded_logprobs(*head, vocab_start, float(temperature), budget, backend,
                                                     bool(return_entropy), process_group)
    logp = logp.view(B, T)
    return (logp, entropy.view(B, T).detach()) if return_entropy else logp

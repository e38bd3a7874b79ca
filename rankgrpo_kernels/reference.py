"""The Rank-GRPO maths in plain, readable torch: the spec every backend is tested against.

Nothing here is fast and nothing is clever. Gradients come from autograd, groups from ``torch.unique``, and the
eager baseline holds the full (tokens x vocab) logits. Every function computes in the dtype of its inputs (the
logits in at least float32): give it float64 inputs for the spec's precision, as the tests do.

Notation (see ``docs/rank-grpo-math.md``): ``l_t`` log-prob of token t under the policy, ``o_t`` under the
behaviour (old) policy, ``r_t`` under the reference policy, ``a_t`` the token's advantage, ``M_t`` the loss mask.
Tokens of one row that share an item id ``k >= 0`` form one group with the rank-level ratio

    w_k = exp( mean_{t in k, M_t} (l_t - o_t) )

and the per-token policy term ``-min(w' a_t, clip(w, 1 - eps_low, 1 + eps_high) a_t)`` with ``w' = min(w, delta)``
(``w' = w`` without delta). The aggregation weights ``c_t`` of each loss type turn per-token terms into the loss:

=========  ===================================================  ==============================
loss_type  policy weight c_t                                    KL weight
=========  ===================================================  ==============================
grpo       1 / (B * max(1, M_i))            (row i of token t)  c_t
bnpo       1 / max(1, sum M)                                    c_t
dr_grpo    1 / (B * max_completion_length)                      c_t
dapo       1 / num_items_in_batch                               c_t
rank       1 / (B * N * n_k)     (paper form, n_k = |item k|)   1 / max(1, sum M)
=========  ===================================================  ==============================

so ``loss = sum_t c_t * policy_t + beta * sum_t kl_weight_t * KL_t`` over the masked tokens. The paper form is the
code form with a per-item instead of a per-token average: ``-(1/(B N)) sum_i sum_k min(w A, clip(w) A)``.

TRL's other loss types keep the item ratio in place of the token (or sequence) ratio:

=========  =================================================================  =======================
loss_type  policy_t                                                           c_t as
=========  =================================================================  =======================
luspo      PPO's term (LUSPO: each sequence's token sum, then the batch mean)  1 / B
sapo       ``-(4 / tau) sigmoid(tau (w - 1)) a_t``, tau = tau_pos if a_t > 0  grpo
           else tau_neg (SAPO's soft gate)
cispo      ``-sg(min(w, eps_high)) a_t l_t`` (CISPO, MiniMax-M1)              dapo
vespo      ``-sg(phi_t) a_t l_t``, ``phi = e^lam W^k e^(-lam W)`` with ``W``  dapo
           the item's product of token ratios, ``log W = clamp(sum_{t in k}
           (l - o), log 1e-8, 20)``, (k, lam) = (k_pos, lam_pos) if a_t >= 0
           else (k_neg, lam_neg), lam at least 1e-4, non-finite phi -> 0
=========  =================================================================  =======================

With one item per completion these are TRL's losses at ``importance_sampling_level="sequence"`` (VESPO's W is
TRL's sequence weight, up to TRL's clamp of each token's log-ratio to [-20, 20] before the sum); with one item
per token, its token-level losses. ``sg`` stops the gradient: CISPO's and VESPO's ratio only weights the
REINFORCE term.

Two guards keep finite inputs finite: the log of every ratio (the item's mean log-ratio and ``r_t - l_t`` in the
k3 KL) is clamped to at most ``LOG_RATIO_LIMIT`` (e^20 ~ 4.9e8, far beyond any ratio PPO clipping lets through).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import LOG_RATIO_LIMIT, LOSS_TYPES, VESPO_LAMBDA_MIN, VESPO_LOG_W_MIN


def reference_loss_from_logps(
    logps: torch.Tensor,
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
    num_items_in_batch: float | None = None,
    rec_num: int | None = None,
    entropy: torch.Tensor | None = None,
    policy_weights: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_mask: torch.Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    use_bias_correction_kl: bool = False,
    ratio_clip: str = "item",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rank-GRPO loss from per-token log-probs; all tensors (B, T), ``advantages`` per token.

    ``item_ids >= 0`` name the groups of a row; tokens with a negative id or ``completion_mask == 0`` are outside
    the loss. ``rec_num`` (N) is needed by ``loss_type="rank"`` only. ``policy_weights`` (constants, e.g. an
    importance-sampling correction) multiply each token's policy term, nothing else: ``loss = sum_t c_t pw_t
    policy_t + beta sum_t kw_t KL_t`` (TRL's order). ``entropy_coef`` subtracts the entropy bonus
    ``entropy_coef * mean_t entropy_t`` over the loss tokens (``entropy`` then required, differentiable), or over
    the loss tokens that ``entropy_mask`` marks. Returns the scalar loss and detached statistics (token means over
    the tokens in the loss; ``kl`` only with ``ref_logps``, ``entropy`` only when given, ``weight_mean``, the
    REINFORCE term's weight, for cispo and vespo), with the per-row clip fractions ``clip_ratio_low_per_row`` and
    ``clip_ratio_high_per_row`` (B,) over each row's loss tokens. The clip counts are PPO's (also for sapo); for
    cispo ``clip_ratio_high`` counts w > eps_high with a > 0 (TRL's ``cispo_clip_ratio``); vespo clips nothing.
    ``use_bias_correction_kl`` weights each token's KL (term and statistic) by its item ratio ``w`` (not detached).
    ``ratio_clip="token"`` (GMPO): each token's log-ratio ``x = l - o`` is clipped inside the item's mean, to
    ``min(x, eps_high)`` where ``a > 0`` and ``max(x, -eps_low)`` elsewhere (log-space bounds), and the policy term
    is ``-w a`` with that ratio; its clip counts are GMPO's, of the tokens' log-ratios.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    B, T = logps.shape
    mask = item_ids >= 0
    if completion_mask is not None:
        mask = mask & completion_mask.bool()
    rows = torch.arange(B, device=logps.device).unsqueeze(1).expand(B, T)[mask]

    # One group per distinct (row, item id) among the tokens in the loss.
    key = rows * (int(item_ids.max()) + 1) + item_ids[mask]
    _, group = torch.unique(key, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0

    l = logps[mask]
    o = l.detach() if old_logps is None else old_logps[mask]
    a = advantages[mask].to(l.dtype)

    group_size = torch.zeros(num_groups, dtype=l.dtype, device=l.device).index_add(0, group, torch.ones_like(l))
    x = l - o
    if ratio_clip == "token":  # GMPO: each token's log-ratio clipped, sign-aware, inside the geometric mean
        x = torch.where(a > 0, torch.clamp(x, max=epsilon_high), torch.clamp(x, min=-epsilon_low))
    log_ratio_sum = torch.zeros(num_groups, dtype=l.dtype, device=l.device).index_add(0, group, x)
    log_w = torch.clamp(log_ratio_sum / group_size, max=LOG_RATIO_LIMIT)
    w = torch.exp(log_w)[group]  # every token of an item shares its item's ratio

    w_unclipped = w if delta is None else torch.clamp(w, max=delta)
    weight = None  # the detached weight of a REINFORCE term
    lo, hi = 1 - epsilon_low, 1 + epsilon_high
    if loss_type == "sapo":
        tau = torch.where(a > 0, sapo_temperature_pos, sapo_temperature_neg).to(l.dtype)
        policy = -torch.sigmoid(tau * (w - 1)) * 4 / tau * a
    elif loss_type == "cispo":
        lo, hi = 0.0, epsilon_high
        weight = torch.clamp(w, max=epsilon_high).detach()
    elif loss_type == "vespo":
        lo, hi = 0.0, float("inf")
        log_big_w = torch.clamp(log_ratio_sum, VESPO_LOG_W_MIN, LOG_RATIO_LIMIT)[group]
        nonneg = a >= 0
        k = torch.where(nonneg, vespo_k_pos, vespo_k_neg).to(l.dtype)
        lam = torch.where(nonneg, vespo_lambda_pos, vespo_lambda_neg).to(l.dtype).clamp(min=VESPO_LAMBDA_MIN)
        phi = torch.exp(lam + k * log_big_w - lam * torch.exp(log_big_w))
        weight = phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).detach()
    elif ratio_clip == "token":
        policy = -w * a
    else:
        policy = -torch.min(w_unclipped * a, torch.clamp(w, lo, hi) * a)
    if weight is not None:
        policy = -weight * a * l
    if policy_weights is not None:
        policy = policy * policy_weights[mask].detach().to(l.dtype)

    tokens = mask.sum().clamp(min=1).to(l.dtype)
    row_tokens = mask.sum(1).clamp(min=1).to(l.dtype)
    if loss_type in ("grpo", "sapo"):
        c = 1.0 / (B * row_tokens[rows])
    elif loss_type == "bnpo":
        c = (1.0 / tokens).expand_as(l)
    elif loss_type == "dr_grpo":
        c = torch.full_like(l, 1.0 / (B * (T if max_completion_length is None else max_completion_length)))
    elif loss_type == "luspo":
        c = torch.full_like(l, 1.0 / B)
    elif loss_type in ("dapo", "cispo", "vespo"):
        c = torch.full_like(l, 1.0 / float(num_items_in_batch))
    else:  # rank: the paper's -(1/(B N)) sum over items of the item's term, spread over its n_k tokens
        c = 1.0 / (B * rec_num * group_size[group])
    loss = (c * policy).sum()

    kl = None
    if ref_logps is not None:
        log_ref_ratio = torch.clamp(ref_logps[mask] - l, max=LOG_RATIO_LIMIT)
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        if use_bias_correction_kl:  # TRL's importance-sampling correction of the KL, by the (item) ratio
            kl = kl * w
        if beta != 0.0:
            kl_weight = (1.0 / tokens) if loss_type == "rank" else c
            loss = loss + beta * (kl_weight * kl).sum()

    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef needs the per-token entropy")
        bonus_mask = mask if entropy_mask is None else mask & entropy_mask.bool()
        loss = loss - entropy_coef * entropy[bonus_mask].to(l.dtype).sum() / bonus_mask.sum().clamp(min=1)

    with torch.no_grad():
        if ratio_clip == "token":  # GMPO's: the tokens whose log-ratio is clipped
            low, high = ((l - o) < -epsilon_low) & (a < 0), ((l - o) > epsilon_high) & (a > 0)
        else:
            low, high = (w_unclipped < lo) & (a < 0), (w_unclipped > hi) & (a > 0)
        stats = {
            "clip_ratio_low": low.sum() / tokens,
            "clip_ratio_high": high.sum() / tokens,
            "clip_ratio_region": (low | high).sum() / tokens,
            "ratio_mean": w.sum() / tokens,
            "clip_ratio_low_per_row": torch.zeros(B, dtype=l.dtype, device=l.device).index_add(
                0, rows, low.to(l.dtype)) / row_tokens,
            "clip_ratio_high_per_row": torch.zeros(B, dtype=l.dtype, device=l.device).index_add(
                0, rows, high.to(l.dtype)) / row_tokens,
        }
        if kl is not None:
            stats["kl"] = kl.sum() / tokens
        if entropy is not None:
            stats["entropy"] = entropy[mask].to(l.dtype).sum() / tokens
        if weight is not None:
            stats["weight_mean"] = weight.sum() / tokens
    return loss, stats


def reference_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
):
    """Eager log-probs: full logits ``S(logit_scale (hidden @ weight.T + bias)) / temperature`` -> log_softmax ->
    gather, with ``S(u) = logit_softcap tanh(u / logit_softcap)`` (or u).

    hidden (..., H), weight (V, H), target_ids (...). The logits are upcast to float32 (float64 stays float64)
    before the softmax, as TRL does. Returns log-probs (...) and, if asked, the entropy (...).
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logps
    return logps, -(logp_all.exp() * logp_all).sum(-1)


def reference_loss(hidden, weight, target_ids, *, bias=None, temperature=1.0, logit_scale=1.0, logit_softcap=None,
                   **loss_kwargs):
    """The eager baseline: ``reference_logprobs`` then ``reference_loss_from_logps``; holds all logits. With
    ``entropy_coef`` the entropy comes from the same logits."""
    head = dict(bias=bias, temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap)
    if loss_kwargs.get("entropy_coef", 0.0) != 0.0:
        logps, entropy = reference_logprobs(hidden, weight, target_ids, return_entropy=True, **head)
        return reference_loss_from_logps(logps, entropy=entropy, **loss_kwargs)
    return reference_loss_from_logps(reference_logprobs(hidden, weight, target_ids, **head), **loss_kwargs)

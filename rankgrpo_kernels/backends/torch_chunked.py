"""The torch backend: log-probs of the LM head chunk by chunk, never more than one bounded tile of logits.

With ``z = (h W^T + b) / T`` for N tokens and V vocabulary rows:

forward   one pass over (token chunk x vocabulary chunk) tiles keeps a running max ``m``, ``s = sum exp(z - m)``
          and, for the entropy, ``sum exp(z - m) z``; ``lse = m + log s``, ``logp = z_y - lse``.
backward  given ``g = dL/dlogp`` it recomputes the tiles for the tokens with ``g != 0`` only and forms
          ``dZ = g (onehot(y) - softmax(z)) / T``, ``dh = dZ W``, ``dW = dZ^T h``, ``db = sum dZ``.

Equivalent PyTorch (what it replaces)::

    z = (hidden @ weight.T + bias).float() / T
    logp = z.log_softmax(-1).gather(-1, y[:, None])[:, 0]

Tiles are float32 (float64 for float64 inputs); GEMMs run in the input dtype with the results accumulated in
float32, and each gradient is cast once at the end.
"""

from __future__ import annotations

import torch

from ..config import plan_chunks
from ..segment_loss import segment_loss

__all__ = ["logprob_forward", "logprob_backward", "segment_loss"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _logits_tile(h, weight, bias, v0, v1, inv_temperature, acc):
    z = (h @ weight[v0:v1].T).to(acc)
    if bias is not None:
        z += bias[v0:v1].to(acc)
    return z.mul_(inv_temperature)


def logprob_forward(hidden, weight, bias, targets, temperature, budget_bytes, return_entropy=False):
    """hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) -> logp, lse, entropy-or-None, each (N,).

    A target outside [0, V) (one in another rank's vocabulary shard) has target logit 0: logp = -lse.
    """
    N, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    inv_t = 1.0 / temperature
    acc_bytes = torch.finfo(acc).bits // 8
    live_tiles = 3 if return_entropy else 2  # logits and their exponentials (and p * z)
    token_chunk, vocab_chunk = plan_chunks(N, V, budget_bytes, live_tiles * acc_bytes)
    lse = torch.empty(N, dtype=acc, device=hidden.device)
    logp = torch.empty_like(lse)
    entropy = torch.empty(N, dtype=acc, device=hidden.device) if return_entropy else None
    for t0 in range(0, N, token_chunk):
        h = hidden[t0 : t0 + token_chunk]
        running_max = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=h.device)
        sum_exp = torch.zeros_like(running_max)
        sum_exp_z = torch.zeros_like(running_max) if return_entropy else None
        for v0 in range(0, V, vocab_chunk):
            z = _logits_tile(h, weight, bias, v0, v0 + vocab_chunk, inv_t, acc)
            new_max = torch.maximum(running_max, z.amax(1))
            rescale = torch.exp(running_max - new_max)
            if return_entropy:
                sum_exp_z = sum_exp_z * rescale + (torch.exp(z - new_max[:, None]) * z).sum(1)
            sum_exp = sum_exp * rescale + torch.exp_(z.sub_(new_max[:, None])).sum(1)
            running_max = new_max
        lse[t0 : t0 + token_chunk] = running_max + torch.log(sum_exp)
        if return_entropy:
            entropy[t0 : t0 + token_chunk] = lse[t0 : t0 + token_chunk] - sum_exp_z / sum_exp
        # The target logit from the target's weight row: a dot product per token, no tile needed.
        y = targets[t0 : t0 + token_chunk]
        in_vocab = (y >= 0) & (y < V)
        y = y.clamp(0, V - 1)
        target_logit = (h.unsqueeze(1) @ weight[y].unsqueeze(2)).view(-1).to(acc)
        if bias is not None:
            target_logit += bias[y].to(acc)
        target_logit = torch.where(in_vocab, target_logit, 0)
        logp[t0 : t0 + token_chunk] = target_logit * inv_t - lse[t0 : t0 + token_chunk]
    return logp, lse, entropy


def logprob_backward(hidden, weight, bias, targets, temperature, lse, grad_logp, budget_bytes, needs):
    """Gradients (d_hidden, d_weight, d_bias) of ``sum_t grad_logp[t] * logp[t]``; ``needs`` says which to form.

    Only the tokens with ``grad_logp != 0`` are recomputed (one host sync to count them).
    """
    need_h, need_w, need_b = needs
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    inv_t = 1.0 / temperature
    active = grad_logp.nonzero().squeeze(1)
    h, y = hidden[active], targets[active]
    coef = grad_logp[active].to(acc) * inv_t  # dZ = coef * (onehot(y) - p)
    lse_active = lse[active].to(acc)
    n_active = active.numel()

    d_hidden = torch.zeros(n_active, hidden.shape[1], dtype=acc, device=hidden.device) if need_h else None
    d_weight = torch.zeros_like(weight) if need_w else None
    d_bias = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
    if n_active:
        acc_bytes, in_bytes = torch.finfo(acc).bits // 8, hidden.element_size()
        # Live: the logits tile (reused for dZ) and its cast; per vocabulary row the fp32 d_weight slab and the
        # product that is added into it.
        token_chunk, vocab_chunk = plan_chunks(n_active, V, budget_bytes, acc_bytes + in_bytes,
                                               hidden.shape[1] * (acc_bytes + in_bytes) if need_w else 0)
        for v0 in range(0, V, vocab_chunk):
            v1 = min(V, v0 + vocab_chunk)
            d_weight_tile = torch.zeros(v1 - v0, weight.shape[1], dtype=acc, device=weight.device) if need_w else None
            for t0 in range(0, n_active, token_chunk):
                t1 = min(n_active, t0 + token_chunk)
                z = _logits_tile(h[t0:t1], weight, bias, v0, v1, inv_t, acc)
                d_z = torch.exp_(z.sub_(lse_active[t0:t1, None])).mul_(-coef[t0:t1, None])  # -coef * p
                in_tile = (y[t0:t1] >= v0) & (y[t0:t1] < v1)
                d_z.scatter_add_(1, (y[t0:t1] - v0).clamp(0, v1 - v0 - 1)[:, None], (coef[t0:t1] * in_tile)[:, None])
                if need_b:
                    d_bias[v0:v1] += d_z.sum(0)
                d_z = d_z.to(hidden.dtype)
                if need_h:
                    d_hidden[t0:t1] += d_z @ weight[v0:v1]
                if need_w:
                    d_weight_tile += d_z.T @ h[t0:t1]
            if need_w:
                d_weight[v0:v1] = d_weight_tile.to(weight.dtype)

    if need_h:
        d_hidden = torch.zeros_like(hidden).index_copy_(0, active, d_hidden.to(hidden.dtype))
    if need_b:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias

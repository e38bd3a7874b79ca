"""The torch backend's row and gradient passes (see ``backends/torch/__init__.py``).

row_pass     ``D`` over the logits and the row's log-prob, log-sum-exp and entropy.
grad_pass    ``D'`` with an entropy term over logits a statistics-only row pass left untouched.

Both take the ``HeadSpec`` (``protocol.py``) for the temperature, logit scale and softcap; the spec was validated
when it was built.
"""

from __future__ import annotations

import torch

from ...specs import HeadSpec
from ..protocol import RowPass


def _transform_(acc, bias, head: HeadSpec):
    """``z = S(s (acc + b)) / T`` over ``acc`` in place, and ``S'(u)`` (a new (C, V) tensor; None without a
    softcap). Without a softcap one multiply by ``s / T`` (none when it is 1)."""
    inv_temperature, logit_scale, softcap = head.inv_temperature, head.logit_scale, head.logit_softcap
    z = acc
    if bias is not None:
        z.add_(bias.to(z.dtype))
    if softcap is None:
        if logit_scale * inv_temperature != 1.0:
            z.mul_(logit_scale * inv_temperature)
        return z, None
    z.mul_(logit_scale / softcap)  # x = u / c
    slope = torch.cosh(z).square_().reciprocal_()  # 1 - tanh(x)^2 = 1 / cosh(x)^2: 0 where cosh overflows
    z.tanh_().mul_(softcap * inv_temperature)
    return z, slope


def _target(targets, V):
    """(the target column clamped into [0, V), as (C, 1); whether it lies in [0, V))."""
    in_vocab = (targets >= 0) & (targets < V)
    return torch.where(in_vocab, targets, 0).long()[:, None], in_vocab


def row_pass(logits, *, bias, targets, head: HeadSpec, lse=None, grad_dtype=None, grad_scale=1.0,
             compute_entropy=False) -> RowPass:
    """logits (C, V) float32/64, overwritten; bias (V,) or None; targets (C,), outside [0, V): no target logit;
    lse (C,) or None: use it as the log-sum-exp (the entropy is then not formed); ``head``: ``z = S(s (logits + b))
    / T`` with ``S(u) = c tanh(u / c)`` (or u). Returns logp, lse, entropy (or None), ``D = (onehot(y) - softmax(z))
    S'(u) k`` in ``grad_dtype`` (or None), k = ``grad_scale`` (a power of two or its negative): the caller scales its
    rows by ``g s / (T k)``. With a softcap one more (C, V) temporary holds ``S'``."""
    lse_in = lse
    z, slope = _transform_(logits, bias, head)
    column, in_vocab = _target(targets, z.shape[1])
    target_logit = torch.where(in_vocab, z.gather(1, column)[:, 0], 0)
    entropy = None
    if lse_in is None:
        # softmax in place is the one CPU kernel that keeps each row in cache for max, exp, sum and scale; the
        # largest p = exp(max z - lse) >= 1/V gives lse back without underflow (amax twice: max with its index
        # costs six times one amax on a CPU).
        row_max = z.amax(1)
        torch.softmax(z, 1, out=z)
        lse = row_max - torch.log(z.amax(1))
        if compute_entropy:  # -sum p log p: one more (C, V) temporary, only when asked
            entropy = torch.special.entr(z).sum(1)
    else:  # a given (global) lse: exp(z - lse) is p already
        lse = lse_in.to(z.dtype)
        z.sub_(lse[:, None]).exp_()
    logp = target_logit - lse
    grad = None
    if grad_dtype is not None:
        if grad_scale != -1.0:  # k = -1 (the head's choice): D = p - onehot, the softmax as it is
            z.mul_(-grad_scale)
        z.scatter_add_(1, column, in_vocab.to(z.dtype)[:, None] * grad_scale)
        if slope is not None:
            z.mul_(slope)
        grad = z if grad_dtype == z.dtype else z.to(grad_dtype)
    return RowPass(logp, lse, entropy, grad)


def grad_pass(logits, *, bias, targets, head: HeadSpec, lse, entropy, g, e, grad_dtype):
    """The gradient of a loss with an entropy term, over the logits (C, V) a statistics-only ``row_pass`` left
    untouched (overwritten here): per-row lse, entropy H, g = dL/dlogp and e = dL/dH, each (C,). Returns, in
    ``grad_dtype`` (over the logits when it is their dtype)::

        D' = [ g (onehot(y) - p) - e p (z - lse + H) ] S'(u)       p = exp(z - lse)

    that is ``dL/dz S'(u)``; the caller scales its rows by ``s / T``. Formed as ``g onehot - (g + e H) p +
    e entr(p)`` (``entr(p) = -p log p``, 0 at p = 0): rows with g = e = 0 are zeros. Equivalent PyTorch::

        z = S(s (logits + b)) / T;  p = (z - lse[:, None]).exp()
        D_ = (g[:, None] * (onehot - p) - e[:, None] * p * (z - lse[:, None] + H[:, None])) * slope
    """
    z, slope = _transform_(logits, bias, head)
    column, in_vocab = _target(targets, z.shape[1])
    g, e, lse, entropy = (x.to(z.dtype) for x in (g, e, lse, entropy))
    p = z.sub_(lse[:, None]).exp_()
    p_log_p = torch.special.entr(p).mul_(e[:, None])
    p.mul_((g + e * entropy).neg_()[:, None]).add_(p_log_p)
    p.scatter_add_(1, column, (g * in_vocab)[:, None])
    if slope is not None:
        p.mul_(slope)
    return p if grad_dtype == p.dtype else p.to(grad_dtype)

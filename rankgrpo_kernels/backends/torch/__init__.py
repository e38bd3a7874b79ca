"""The torch backend: the row pass, gradient pass and segment loss in plain torch ops, on any device and in float64.

It is the CPU path of the head (which runs the GEMMs for every backend) and the readable statement of what the
Triton (``backends/triton``) and CUDA (``csrc/``) backends compute; the calls are ``protocol.py``'s.

row_pass     over a chunk of raw logits ``acc = h W^T`` (C, V): ``z = S(s (acc + b)) / T`` (logit scale s, softcap
             ``S(u) = c tanh(u / c)`` or none), ``lse``, ``logp = z_y - lse``, the entropy ``-sum p log p`` and
             ``D = (onehot(y) - softmax(z)) S'(u)``, written over ``acc`` in place when the gradient dtype is the
             logits' (else into one new tensor). Four streaming passes over the chunk on a CPU (max, softmax in
             place, max of p, negate), plus bias, scale and softcap when given.
grad_pass    over the same logits, untouched since a statistics-only row pass: with per-row ``g = dL/dlogp`` and
             ``e = dL/dH`` (an entropy term), ``D' = [g (onehot(y) - p) - e p (z - lse + H)] S'(u)`` in place.
segment_loss the O(B T) loss with its analytic gradient ``g = dL/dlogp``, without autograd or host sync
             (``loss.py`` gives the formula).

Equivalent PyTorch (what the tests check)::

    logp = ((acc + b) / T).log_softmax(-1).gather(-1, y[:, None])[:, 0]
    logps.requires_grad_(); loss, _ = reference_loss_from_logps(logps, ...); g = torch.autograd.grad(loss, logps)
"""

from .passes import grad_pass, row_pass
from .loss import segment_loss

__all__ = ["row_pass", "grad_pass", "segment_loss"]

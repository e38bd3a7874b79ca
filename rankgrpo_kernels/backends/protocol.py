"""What a backend is: the three calls it implements around the head's vendor GEMMs, and how it refuses to run.

A backend is a module (one folder under ``backends/``) exporting, keyword-only after the tensor it works on::

    row_pass(logits, *, bias, targets, head, lse=None, grad_dtype=None, grad_scale=1.0, compute_entropy=False)
        -> RowPass
    grad_pass(logits, *, bias, targets, head, lse, entropy, g, e, grad_dtype) -> D'
    segment_loss(batch, *, spec) -> SegmentLoss

over a chunk of raw fp32 logits ``acc = h W^T`` (C, V), overwritten. ``head`` is the ``HeadSpec``: ``z =
S(s (acc + b)) / T`` with ``S(u) = c tanh(u / c)`` (``logit_softcap`` c, or the identity), ``lse`` (C,) a given
log-sum-exp (then no entropy is formed), ``targets`` (C,) outside [0, V): no target logit. ``D = (onehot(y) -
softmax(z)) S'(u)`` and ``D' = [g (onehot(y) - p) - e p (z - lse + H)] S'(u)`` hold ``dL/dz S'(u)`` per row up to
the caller's row scale (``g s / T`` for D, ``s / T`` for D'); both come back in ``grad_dtype``, over the logits
where the backend can (``Capabilities``), D times ``grad_scale`` (+- a power of two, at most 2^15: fp16's D is written
scaled so that small probabilities stay normal; the caller's row scale divides it out). ``segment_loss`` takes a
``TokenBatch`` and the ``LossSpec`` whole, so a new loss option reaches it without any layer in between changing.
``backends/torch`` is the readable statement of all three; ``tests/backends`` runs every registered backend through
one conformance suite against it.

Refusing: the registry's ``Capabilities`` say statically which devices and dtypes a backend takes; a backend whose
module cannot import here (no Triton, no CUDA toolchain, a failed build) raises ``BackendUnavailable`` (or any
ImportError) naming the fix, and the registry turns that into the refusal users see.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

HALF = (torch.bfloat16, torch.float16)


class BackendUnavailable(ImportError):
    """A backend cannot run here; the message names the fix."""


class RowPass(NamedTuple):
    logp: torch.Tensor  # (C,) fp32 (fp64 for fp64 logits)
    lse: torch.Tensor  # (C,)
    entropy: Optional[torch.Tensor]  # (C,) when compute_entropy and no lse was given
    grad: Optional[torch.Tensor]  # D (C, V) in grad_dtype, when grad_dtype is given


class SegmentLoss(NamedTuple):
    loss: torch.Tensor  # 0-dim
    stats: torch.Tensor  # (len(STAT_NAMES),)
    grad: torch.Tensor  # dL/dlogps (B, T)
    row_clipped: torch.Tensor  # (B, 2): loss tokens clipped low, high


@dataclass(frozen=True)
class Capabilities:
    """Where a backend runs, known without importing it.

    ``dtypes``: the input dtypes it takes; ``cuda_only``: CUDA tensors only, unless the environment variable
    ``cpu_env`` is "1" (Triton's interpreter); ``d_in_place_any_dtype``: the row pass writes D over the fp32 logits
    in any dtype (else only in fp32); ``stats_pass_overwrites``: a row pass without D still overwrites the logits
    (the entropy bonus's gradient pass then needs a copy)."""

    dtypes: tuple[torch.dtype, ...]
    cuda_only: bool
    d_in_place_any_dtype: bool
    stats_pass_overwrites: bool
    cpu_env: str | None = None

    def grad_in_place(self, acc_dtype: torch.dtype, grad_dtype: torch.dtype | None) -> bool:
        """Whether D overwrites the logits buffer (else the row pass needs one (C, V) tensor of ``grad_dtype``)."""
        return grad_dtype is None or grad_dtype == acc_dtype or self.d_in_place_any_dtype


CALLS = {
    "row_pass": ("bias", "targets", "head", "lse", "grad_dtype", "grad_scale", "compute_entropy"),
    "grad_pass": ("bias", "targets", "head", "lse", "entropy", "g", "e", "grad_dtype"),
    "segment_loss": ("spec",),
}


def check(module) -> None:
    """TypeError unless ``module`` implements every call of ``CALLS`` with those keyword-only parameters."""
    for name, keywords in CALLS.items():
        fn = getattr(module, name, None)
        if not callable(fn):
            raise TypeError(f"backend {module.__name__} does not define {name}()")
        params = inspect.signature(fn).parameters
        keyword_only = {p for p, param in params.items() if param.kind is inspect.Parameter.KEYWORD_ONLY}
        if set(keywords) - keyword_only:
            raise TypeError(f"backend {module.__name__}.{name} must take {sorted(set(keywords) - keyword_only)} "
                            "as keyword-only parameters")

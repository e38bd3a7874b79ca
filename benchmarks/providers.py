"""What the benchmark compares: each provider turns one batch into a loss whose backward reaches the LM head.

A provider is a ``Provider(note, build, ...)``: ``build(batch) -> loss_fn`` or raises ``Unavailable(reason)``;
``loss_fn()`` returns the scalar loss from ``batch.hidden`` and ``batch.weight`` with the loss settings of the batch's
workload (``batch.settings``: eps, beta, loss type; ``batch.loss_inputs`` hold ``None`` for the old or reference
log-probs a setting goes without). ``refuse(device_type, dtype)`` is
the cheap check ``run.py`` makes before starting a process for it (no batch, no GPU touched); ``build`` makes the
full one. ``backend`` names our backend for ``--breakdown``; ``token_level`` providers are checked against the eager
loss on ``token_level_inputs`` (their maths is token-level GRPO).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from rankgrpo_kernels import backends, fused_logprobs, rank_grpo_loss, rank_grpo_loss_from_logps
from rankgrpo_kernels.reference import reference_loss

# The released Rank-GRPO run: bnpo, eps 0.06 / 0.08, k3 KL with beta 1e-3 (the dense workload's one setting; a
# batch carries its own in ``Batch.settings``).
LOSS_SETTINGS = dict(epsilon_low=0.06, epsilon_high=0.08, beta=1e-3, loss_type="bnpo")
# TRL 1.16's vocabulary width per tile of ChunkedLogProbFunction (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE).
TRL_CHUNK_SIZE = 32768
TRL_MIN_VERSION = (1, 16)


class Unavailable(Exception):
    """The provider cannot run here; the message says why."""


@dataclass
class Batch:
    hidden: torch.Tensor  # (B, T, H), requires grad
    weight: torch.Tensor  # (V, H), requires grad
    target_ids: torch.Tensor
    loss_inputs: dict  # item_ids, advantages, completion_mask, old_logps, ref_logps (either may be None)
    settings: dict = field(default_factory=lambda: dict(LOSS_SETTINGS))  # epsilon_low/high, beta, loss_type
    setting: str = "released"  # the setting's name


@dataclass(frozen=True)
class Provider:
    note: str
    build: Callable[[Batch], Callable[[], torch.Tensor]]
    refuse: Callable[[str, torch.dtype], Optional[str]] = lambda device_type, dtype: None
    backend: Optional[str] = None  # ours: the backend whose row pass and segment loss --breakdown times
    token_level: bool = False


def _interpreting():  # Triton's CPU interpreter, what the tests use without a GPU
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _missing(package):
    return f"package {package} not installed" if importlib.util.find_spec(package) is None else None


# --- the baseline ---------------------------------------------------------------------------------------------------

def _eager(batch):
    return lambda: reference_loss(batch.hidden, batch.weight, batch.target_ids, **batch.loss_inputs,
                                  **batch.settings)[0]


def _compiled(batch):
    compiled = torch.compile(reference_loss)
    return lambda: compiled(batch.hidden, batch.weight, batch.target_ids, **batch.loss_inputs, **batch.settings)[0]


# --- ours -----------------------------------------------------------------------------------------------------------

def _refuse_backend(backend):
    def refuse(device_type, dtype):
        spec = backends.REGISTRY[backend]
        if spec.needs_cuda and device_type != "cuda" and not (backend == "triton" and _interpreting()):
            return "needs a CUDA GPU" + (" (or TRITON_INTERPRET=1)" if backend == "triton" else "")
        if dtype not in spec.dtypes:
            return f"takes {', '.join(str(d).split('.')[-1] for d in spec.dtypes)}"
        return _missing("triton") if backend == "triton" else None
    return refuse


def _check_backend(batch, backend):
    reason = backends.REGISTRY[backend].refusal(batch.hidden.device, batch.hidden.dtype)
    if reason is not None:
        raise Unavailable(reason)


def _ours(backend):
    """The fused path: the tokens the loss needs, gradients formed in the forward over chunks of whole items
    (3 GEMMs)."""
    def build(batch):
        _check_backend(batch, backend)
        return lambda: rank_grpo_loss(batch.hidden, batch.weight, batch.target_ids, backend=backend,
                                      **batch.loss_inputs, **batch.settings)[0]
    return build


def _ours_recompute(backend):
    """What a framework with its own log-probs runs (OpenRLHF, verl): ``fused_logprobs`` (the backward recomputes
    the logits: 4 GEMMs) and ``rank_grpo_loss_from_logps``."""
    def build(batch):
        _check_backend(batch, backend)

        def loss():
            logps = fused_logprobs(batch.hidden, batch.weight, batch.target_ids, backend=backend)
            return rank_grpo_loss_from_logps(logps, backend=backend, **batch.loss_inputs, **batch.settings)[0]
        return loss
    return build


# --- peers ----------------------------------------------------------------------------------------------------------

def token_level_inputs(batch):
    """Liger's maths as ours: one item per token and one advantage per row (the row's mean over its loss tokens)
    is token-level GRPO. Advantages come back per token (B, T), each row holding its mean."""
    B, T = batch.target_ids.shape
    inputs = dict(batch.loss_inputs)
    mask = inputs["completion_mask"]
    row_advantages = (inputs["advantages"] * mask).sum(1) / mask.sum(1).clamp(min=1)
    inputs.update(item_ids=torch.arange(T, device=mask.device).expand(B, T),
                  advantages=row_advantages[:, None].expand(B, T))
    return inputs


def _liger(batch):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    s = batch.settings
    inputs = token_level_inputs(batch)
    # Liger's defaults otherwise (chunk_size=1 row, compiled=True: its loss maths goes through torch.compile, on
    # the CPU too); its log-probs stream the vocabulary in 4096-column chunks and its backward recomputes them.
    loss = LigerFusedLinearGRPOLoss(beta=s["beta"], epsilon_low=s["epsilon_low"], epsilon_high=s["epsilon_high"],
                                    loss_type=s["loss_type"], use_ref_model=inputs["ref_logps"] is not None)
    row_advantages = inputs["advantages"][:, 0].contiguous()
    return lambda: loss(batch.hidden, batch.weight, batch.target_ids, inputs["completion_mask"], row_advantages,
                        ref_per_token_logps=inputs["ref_logps"], old_per_token_logps=inputs["old_logps"])[0]


def _cce_impl(device_type):
    # CCE's own kernels are Triton on CUDA; on a CPU its torch_compile implementation runs (full logits, compiled).
    return "cce" if device_type == "cuda" else "torch_compile"


def _cce(batch):
    from cut_cross_entropy import linear_cross_entropy

    impl = _cce_impl(batch.hidden.device.type)
    # filter_eps=None: exact gradients (CCE's default drops those of tiny probabilities); torch_compile has no filter.
    extra = dict(filter_eps=None) if impl == "cce" else {}

    def loss():
        logps = -linear_cross_entropy(batch.hidden, batch.weight, batch.target_ids, reduction="none", impl=impl,
                                      **extra)
        return rank_grpo_loss_from_logps(logps, **batch.loss_inputs, **batch.settings)[0]
    return loss


def _refuse_trl(device_type, dtype):
    from importlib import metadata

    missing = _missing("trl")
    if missing:
        return missing
    version = metadata.version("trl")
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        major_minor = TRL_MIN_VERSION
    if major_minor < TRL_MIN_VERSION:
        return f"trl {version} has no trl.kernels.chunked_logprob (needs trl >= 1.16)"
    return None


def _trl_chunk_size():
    """TRL's own vocabulary width per tile, read from its source (importing ``trl.trainer.utils`` takes seconds)."""
    spec = importlib.util.find_spec("trl")
    for root in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = Path(root, "trainer", "utils.py").read_text()
        except OSError:
            continue
        found = re.search(r"^_CHUNKED_LOGPROB_CHUNK_SIZE\s*=\s*(\d+)", text, re.MULTILINE)
        if found:
            return int(found.group(1))
    return TRL_CHUNK_SIZE


def _trl(batch):
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton
    except ImportError as exc:
        raise Unavailable(f"trl.kernels.chunked_logprob: {exc}") from None

    chunk = _trl_chunk_size()
    hidden, weight, targets = batch.hidden, batch.weight, batch.target_ids
    B, T, H = hidden.shape
    mask = batch.loss_inputs["completion_mask"].bool()
    # As TRL's fused forward: on Triton devices only the completion's positions are scored (compacted), elsewhere
    # every position (fixed tile shapes) and the padding's log-probs are zeroed.
    compact = _use_triton(hidden.device)

    def loss():
        if compact:
            logp = ChunkedLogProbFunction.apply(hidden[mask], weight, None, targets[mask], 1.0, chunk, None, 1.0, ())[0]
            logps = logp.new_zeros(B, T).masked_scatter(mask, logp)
        else:
            logp = ChunkedLogProbFunction.apply(hidden.reshape(B * T, H), weight, None, targets.reshape(-1), 1.0,
                                                chunk, None, 1.0, ())[0]
            logps = logp.view(B, T).masked_fill(~mask, 0)
        return rank_grpo_loss_from_logps(logps, **batch.loss_inputs, **batch.settings)[0]
    return loss


PROVIDERS = {
    "eager": Provider("full logits -> log_softmax -> gather -> loss (the authors' trainer, TRL 0.21)", _eager),
    "torch": Provider("ours, fused path, torch backend: the tokens the loss needs, gradients in the forward over "
                      "chunks of whole items (3 GEMMs)", _ours("torch"), _refuse_backend("torch"), backend="torch"),
    "torch-recompute": Provider("ours, recompute path, torch backend: fused_logprobs (backward recomputes the "
                                "logits: 4 GEMMs) + rank_grpo_loss_from_logps, as OpenRLHF/verl run it",
                                _ours_recompute("torch"), _refuse_backend("torch"), backend="torch"),
    "compile": Provider("torch.compile of the eager loss (compiled in the first call, which is not timed: its time is "
                        "first_call_ms)", _compiled),
    "triton": Provider("ours, fused path, Triton row pass and segment loss around cuBLAS GEMMs",
                       _ours("triton"), _refuse_backend("triton"), backend="triton"),
    "triton-recompute": Provider("ours, recompute path, Triton backend: fused_logprobs + rank_grpo_loss_from_logps "
                                 "(what OpenRLHF/verl run)", _ours_recompute("triton"), _refuse_backend("triton"),
                                 backend="triton"),
    "cuda": Provider("ours, fused path, CUDA extension (csrc/: cuBLAS GEMMs + CUDA row pass and segment loss)",
                     _ours("cuda"), _refuse_backend("cuda"), backend="cuda"),
    "liger": Provider("Liger-Kernel LigerFusedLinearGRPOLoss (torch, chunked; token-level ratio: different maths, "
                      "checked against eager with one item per token and one advantage per row)", _liger,
                      lambda device_type, dtype: _missing("liger_kernel"), token_level=True),
    "cce": Provider("Cut Cross-Entropy log-probs (exact gradients; on a CPU its torch_compile impl, which holds the "
                    "full logits) + our rank_grpo_loss_from_logps", _cce,
                    lambda device_type, dtype: _missing("cut_cross_entropy")),
    "trl": Provider("TRL 1.16's fused LM head: trl.kernels.chunked_logprob.ChunkedLogProbFunction (exact log-probs "
                    "over 4096-token x 32768-column tiles, Triton fold on a GPU and torch on a CPU, backward "
                    "recomputes each tile: 4 GEMMs; on a GPU only the completion's positions, on a CPU all) + our "
                    "rank_grpo_loss_from_logps", _trl, _refuse_trl),
}

"""What the benchmark compares: each provider turns one batch into a loss whose backward reaches the LM head.

A provider is a ``Provider(note, build, ...)``: ``build(batch) -> loss_fn`` or raises ``Unavailable(reason)``;
``loss_fn()`` returns the scalar loss from ``batch.hidden`` and ``batch.weight`` with the loss settings of the
batch's workload (``batch.settings``: eps, beta, loss type; ``batch.loss_inputs`` hold ``None`` for the old or
reference log-probs a setting goes without; ``batches.Batch``). ``refuse(device, dtype)`` says why it cannot run
here (None if it can), without a batch: the sweep asks before starting a process for it; for ours it is the backend
registry's ``backends.refusal``. ``backend`` names our backend for ``--breakdown``; ``token_level`` providers are
checked against the eager loss on ``token_level_inputs`` (their maths is token-level GRPO); ``label`` is the
provider's name in the plot and the README (ours say "(ours)"; the key where it is empty), ``ours`` whether it is
this library's code (set against the GEMM floors in the README); ``python()`` is the interpreter its worker process
runs in (this one, or a framework's own venv).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from batches import Batch
from framework_providers import openrlhf_loss, verl_loss

from rankgrpo_kernels import backends, fused_logprobs, rank_grpo_loss, rank_grpo_loss_from_logps
from rankgrpo_kernels.reference import reference_loss

# TRL 1.16's vocabulary width per tile of ChunkedLogProbFunction (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE).
TRL_CHUNK_SIZE = 32768
TRL_MIN_VERSION = (1, 16)
ROOT = Path(__file__).resolve().parents[1]


class Unavailable(Exception):
    """The provider cannot run here; the message says why."""


@dataclass(frozen=True)
class Provider:
    note: str
    build: Callable[[Batch], Callable[[], torch.Tensor]]
    refuse: Callable[[torch.device, torch.dtype], str | None] = lambda device, dtype: None
    backend: str | None = None  # ours: the backend whose row pass and segment loss --breakdown times
    token_level: bool = False
    label: str = ""  # the name a reader sees in the plot and the README (ours say so)
    ours: bool = False  # this library's code (a backend's paths, an adapter's): against the GEMM floors in the README
    python: Callable[[], str] = lambda: sys.executable


def _missing(package):
    return f"package {package} not installed" if importlib.util.find_spec(package) is None else None


def framework_python(package) -> str | None:
    """The interpreter that imports ``package``: this one, else the framework's venv that
    ``scripts/framework_venv.sh PACKAGE`` builds in the repository root (None: neither)."""
    if importlib.util.find_spec(package) is not None:
        return sys.executable
    venv = ROOT / f".venv-{package}" / "bin" / "python"
    return str(venv) if venv.exists() else None


def _framework(package, note, build, label) -> Provider:
    """A provider that times a framework adapter's loss path in a worker run by that framework's interpreter."""
    def refuse(device, dtype):
        if framework_python(package) is None:
            return (f"package {package} not installed here and no .venv-{package} (scripts/framework_venv.sh "
                    f"{package} builds it)")
        return None
    return Provider(note, build, refuse, label=label, ours=True, python=lambda: framework_python(package))


# --- the baseline ---------------------------------------------------------------------------------------------------

def _eager(batch):
    return lambda: reference_loss(batch.hidden, batch.weight, batch.target_ids, **batch.loss_inputs,
                                  **batch.settings)[0]


def _compiled(batch):
    compiled = torch.compile(reference_loss)
    return lambda: compiled(batch.hidden, batch.weight, batch.target_ids, **batch.loss_inputs, **batch.settings)[0]


# --- ours -----------------------------------------------------------------------------------------------------------

def _fused(batch, backend):
    """The fused path: the tokens the loss needs, gradients formed in the forward over chunks of whole items
    (3 GEMMs)."""
    return lambda: rank_grpo_loss(batch.hidden, batch.weight, batch.target_ids, backend=backend, **batch.loss_inputs,
                                  **batch.settings)[0]


def _recompute(batch, backend):
    """What a framework with its own log-probs runs (OpenRLHF, verl): ``fused_logprobs`` (the backward recomputes
    the logits: 4 GEMMs) and ``rank_grpo_loss_from_logps``."""
    def loss():
        logps = fused_logprobs(batch.hidden, batch.weight, batch.target_ids, backend=backend)
        return rank_grpo_loss_from_logps(logps, backend=backend, **batch.loss_inputs, **batch.settings)[0]
    return loss


def _ours(note, backend, path=_fused) -> Provider:
    """Ours on ``backend``, which runs where the backend registry says it can."""
    def refuse(device, dtype):
        return backends.refusal(backend, device, dtype)
    kind = "fused" if path is _fused else "recompute"
    return Provider(note, lambda batch: path(batch, backend), refuse, backend=backend,
                    label=f"rankgrpo {kind}, {backend} backend (ours)", ours=True)


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


def _refuse_trl(device, dtype):
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
    "eager": Provider("full logits -> log_softmax -> gather -> loss (the authors' trainer, TRL 0.21)", _eager,
                      label="eager (full logits, the authors' trainer)"),
    "torch": _ours("ours, fused path, torch backend: the tokens the loss needs, gradients in the forward over chunks "
                   "of whole items (3 GEMMs)", "torch"),
    "torch-recompute": _ours("ours, recompute path, torch backend: fused_logprobs (backward recomputes the logits: 4 "
                             "GEMMs) + rank_grpo_loss_from_logps, for a loop that has only log-probs", "torch",
                             _recompute),
    "compile": Provider("torch.compile of the eager loss (compiled in the first call, which is not timed: its time is "
                        "first_call_ms)", _compiled, label="torch.compile of eager"),
    "triton": _ours("ours, fused path, Triton row pass and segment loss around cuBLAS GEMMs", "triton"),
    "triton-recompute": _ours("ours, recompute path, Triton backend: fused_logprobs + rank_grpo_loss_from_logps "
                              "(for a loop that has only log-probs)", "triton", _recompute),
    "cuda": _ours("ours, fused path, CUDA extension (csrc/: cuBLAS GEMMs + CUDA row pass and segment loss)", "cuda"),
    "liger": Provider("Liger-Kernel LigerFusedLinearGRPOLoss (torch, chunked; token-level ratio: different maths, "
                      "checked against eager with one item per token and one advantage per row)", _liger,
                      lambda device, dtype: _missing("liger_kernel"), token_level=True,
                      label="Liger LigerFusedLinearGRPOLoss"),
    "cce": Provider("Cut Cross-Entropy log-probs (exact gradients; on a CPU its torch_compile impl, which holds the "
                    "full logits) + our rank_grpo_loss_from_logps", _cce,
                    lambda device, dtype: _missing("cut_cross_entropy"), label="Cut Cross-Entropy + our loss"),
    "trl": Provider("TRL 1.16's fused LM head: trl.kernels.chunked_logprob.ChunkedLogProbFunction (exact log-probs "
                    "over 4096-token x 32768-column tiles, Triton fold on a GPU and torch on a CPU, backward "
                    "recomputes each tile: 4 GEMMs; on a GPU only the completion's positions, on a CPU all) + our "
                    "rank_grpo_loss_from_logps", _trl, _refuse_trl,
                    label="TRL 1.16 ChunkedLogProbFunction + our loss"),
    "verl": _framework("verl", "the verl adapter's loss in the model's forward (framework_fused_loss with verl's "
                       "token-mean, clip range and low_var_kl KL: 3 GEMMs over the tokens the loss needs), in "
                       ".venv-verl", verl_loss, "verl adapter (ours)"),
    "openrlhf": _framework("openrlhf", "the OpenRLHF adapter's loss in the actor's forward (ForwardLoss with "
                           "OpenRLHF's token mean, clip range and k3 KL loss: 3 GEMMs over the tokens the loss "
                           "needs), in .venv-openrlhf", openrlhf_loss, "OpenRLHF adapter (ours)"),
}

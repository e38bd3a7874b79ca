"""Helpers the tests share: golden vectors as padded tensors, random loss batches, the benchmark's modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

EPS_LOW, EPS_HIGH = 0.06, 0.08  # the released run's clip range, used by the golden vectors


def golden_batch(vector, dtype=torch.float64):
    """Pad one golden test vector's ragged rows into (B, T) tensors."""
    rows = vector["tokens"]
    B, T = len(rows), max(len(r) for r in rows)
    out = {k: torch.zeros(B, T, dtype=dtype) for k in ("logp", "old", "ref", "adv")}
    out["seg"] = torch.full((B, T), -1, dtype=torch.long)
    out["eos"] = torch.zeros(B, T, dtype=torch.bool)
    out["names"] = [[tok["name"].replace("\\n", "\n") for tok in r] for r in rows]
    for i, r in enumerate(rows):
        for t, tok in enumerate(r):
            for k in ("logp", "old", "ref", "adv"):
                out[k][i, t] = tok[k]
            out["seg"][i, t] = tok["seg"]
            out["eos"][i, t] = tok["name"] == "<eos>"
    out["mask"] = out["seg"] >= 0
    out["advantages"] = torch.tensor(vector["advantages"], dtype=dtype)
    out["rec_num"] = out["advantages"].shape[1]
    return out


def unpad(x, mask):
    """Rows of a padded (B, T) tensor as ragged lists, for comparison with golden lists."""
    return [x[i][mask[i]].tolist() for i in range(x.shape[0])]


def random_loss_batch(B, T, K, *, dtype=torch.float64, generator=None, old_scale=0.1, mask_prob=0.2):
    """Random item ids in [0, K] (K = overflow), a mask, per-token advantages and old/ref log-probs."""
    g = generator
    item_ids = torch.sort(torch.randint(0, K + 1, (B, T), generator=g), dim=1).values
    mask = torch.rand(B, T, generator=g) > mask_prob
    logps = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    return dict(
        logps=logps,
        item_ids=item_ids,
        completion_mask=mask,
        advantages=torch.randn(B, T, generator=g, dtype=dtype),
        old_logps=logps + old_scale * torch.randn(B, T, generator=g, dtype=dtype),
        ref_logps=logps + 0.2 * torch.randn(B, T, generator=g, dtype=dtype),
    )


class TinyTokenizer:
    """A tokenizer over a fixed list of token strings: enough for ``newline_counts`` and ``segment_items``."""

    def __init__(self, pieces, eos="<eos>"):
        self.pieces = list(pieces)
        if eos not in self.pieces:
            self.pieces.append(eos)
        self.eos_token_id = self.pieces.index(eos)
        self.index = {p: i for i, p in enumerate(self.pieces)}

    def __len__(self):
        return len(self.pieces)

    def decode(self, ids, clean_up_tokenization_spaces=False, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == self.eos_token_id))

    def encode(self, pieces):
        return [self.index[p] for p in pieces]


def random_head(B, T, H, V, dtype, *, bias=True, scale=1.0, device="cpu", seed=0):
    """hidden (B, T, H), weight (V, H), bias (V,) or None (all requiring grad) and targets (B, T) in [0, V)."""
    g = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(B, T, H, generator=g, dtype=torch.float64)).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(device, dtype).requires_grad_()
    b = (0.1 * torch.randn(V, generator=g, dtype=torch.float64)).to(device, dtype).requires_grad_() if bias else None
    return hidden, weight, b, torch.randint(0, V, (B, T), generator=g).to(device)


def loss_inputs_near_policy(hidden, weight, bias, targets, temperature, K, *, old_scale=0.1, mask_prob=0.2):
    """Random items, a mask and advantages, with old/ref log-probs near the model's own (as in real training)."""
    from rankgrpo_kernels.reference import reference_logprobs

    B, T, _ = hidden.shape
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    batch = random_loss_batch(B, T, K, dtype=dtype, old_scale=old_scale, mask_prob=mask_prob)
    with torch.no_grad():
        logps = reference_logprobs(hidden.double(), weight.double(), targets,
                                   bias=None if bias is None else bias.double(), temperature=temperature).to(dtype)
    batch["old_logps"] = logps.cpu() + (batch["old_logps"] - batch["logps"])
    batch["ref_logps"] = logps.cpu() + (batch["ref_logps"] - batch["logps"])
    del batch["logps"]
    return {k: v.to(hidden.device) for k, v in batch.items()}


def launcher_form(backend):
    """A backend's protocol calls (``backends/protocol.py``) in the Triton launchers' positional form, so one test
    drives the launchers and the backends alike: ``row_pass(logits, bias, targets, inv_t, lse_in, grad_dtype,
    compute_entropy, *, logit_scale, softcap, grad_scale)`` and ``grad_pass(logits, bias, targets, inv_t, lse,
    entropy, g, e, grad_dtype, *, logit_scale, softcap)``."""
    from rankgrpo_kernels.specs import HeadSpec

    def head(inv_t, logit_scale, softcap):
        return HeadSpec(temperature=1 / inv_t, logit_scale=logit_scale, logit_softcap=softcap)

    def row_pass(logits, bias, targets, inv_t, lse_in, grad_dtype, compute_entropy, *, logit_scale=1.0, softcap=None,
                 grad_scale=1.0):
        return tuple(backend.row_pass(logits, bias=bias, targets=targets, head=head(inv_t, logit_scale, softcap),
                                      lse=lse_in, grad_dtype=grad_dtype, grad_scale=grad_scale,
                                      compute_entropy=compute_entropy))

    def grad_pass(logits, bias, targets, inv_t, lse, entropy, g, e, grad_dtype, *, logit_scale=1.0, softcap=None):
        return backend.grad_pass(logits, bias=bias, targets=targets, head=head(inv_t, logit_scale, softcap), lse=lse,
                                 entropy=entropy, g=g, e=e, grad_dtype=grad_dtype)

    return row_pass, grad_pass


def load_benchmark_module(name):
    """``benchmarks/NAME.py`` as a module (loading ``run`` puts benchmarks/ on the path: its modules then import by
    their names, as in its worker processes)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module

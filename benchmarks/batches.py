"""The batch every process of a run builds alike (seeded on the CPU): which workload (``Work``), the batch of a shape
and setting that a provider turns into a loss (``Batch``), and how much PPO clipping the setting does on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import workload as wl
from shapes import HeadShape

from rankgrpo_kernels import fused_logprobs
from rankgrpo_kernels.reference import reference_loss_from_logps


@dataclass
class Batch:
    """What a provider turns into a loss: the LM head's inputs, the loss inputs and the setting's loss settings."""

    hidden: torch.Tensor  # (B, T, H), requires grad
    weight: torch.Tensor  # (V, H), requires grad
    target_ids: torch.Tensor
    loss_inputs: dict  # item_ids, advantages, completion_mask, old_logps, ref_logps (either may be None)
    settings: dict  # the loss's epsilon_low/high, beta, loss_type
    setting: str  # the setting's name
    logps: torch.Tensor | None = None  # the policy's log-probs (the realistic setting's clip statistics use them)


@dataclass(frozen=True)
class Work:
    """Which batch the run builds: the workload, its settings and, for the realistic one, its knobs."""

    kind: str = "realistic"  # or "dense"
    settings: tuple = tuple(wl.SETTINGS)
    prompts: int | None = None  # P; default from the shape's N (about N padded positions)
    hits_per_list: float = wl.HITS_PER_LIST

    @property
    def realistic(self) -> bool:
        return self.kind == "realistic"

    def setting_names(self) -> tuple:
        return self.settings if self.realistic else (wl.RELEASED.name,)

    def setting(self, name=None) -> wl.Setting:
        if not self.realistic:
            return wl.RELEASED
        return wl.SETTINGS[name or self.settings[0]]

    def prompts_for(self, shape: HeadShape) -> int:
        return self.prompts or wl.prompts_for(shape.tokens)

    def layout(self, shape: HeadShape) -> wl.Layout:
        return wl.make_layout(shape.vocab, self.prompts_for(shape), wl.GENERATIONS, self.hits_per_list)

    def options(self) -> list[str]:
        """The flags that make a child process build the same batches."""
        out = ["--workload", self.kind, "--settings", ",".join(self.settings), "--hits-per-list",
               repr(self.hits_per_list)]
        return out + (["--prompts", str(self.prompts)] if self.prompts else [])

    def describe(self) -> dict:
        out = dict(kind=self.kind, settings={n: self.setting(n).describe() for n in self.setting_names()})
        if self.realistic:
            out.update(generations=wl.GENERATIONS, hits_per_list=self.hits_per_list, prompts=self.prompts,
                       rec_num=wl.REC_NUM, item_tokens=list(wl.ITEM_TOKENS), early_stop=wl.EARLY_STOP,
                       overflow=wl.OVERFLOW, scale_rewards=wl.SCALE_REWARDS)
        return out

    def setting_notes(self) -> list[str]:
        """One line per timed setting of the realistic workload, for the table's notes."""
        if not self.realistic:
            return []
        notes = []
        for name in self.setting_names():
            spec = self.setting(name)
            values = ", ".join(f"{k} {v}" for k, v in spec.loss_settings().items())
            notes.append(f"setting {name}: {spec.note} ({values})")
        return notes

    def batch(self, shape: HeadShape, setting, dtype, device) -> Batch:
        """The batch of ``shape`` at ``setting`` (the dense workload has one)."""
        if self.realistic:
            return make_realistic_batch(shape, self, setting, dtype, device)
        return make_batch(shape, dtype, device)


DENSE = Work("dense")
REALISTIC = Work()


def make_realistic_batch(shape: HeadShape, work: Work, setting: str | None, dtype, device, seed=0) -> Batch:
    """The realistic workload's batch at one setting (``workload.py``)."""
    spec = work.setting(setting)
    layout = work.layout(shape)
    B, T = layout.target_ids.shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, shape.hidden, generator=g).to(device, dtype)
    weight = (torch.randn(shape.vocab, shape.hidden, generator=g) / shape.hidden**0.5).to(device, dtype)
    target_ids = layout.target_ids.to(device)
    with torch.no_grad():
        logps = fused_logprobs(hidden, weight, target_ids, backend="torch")
    old, ref = old_and_ref(logps, spec, seed=seed + 1)
    loss_inputs = dict(item_ids=layout.item_ids.to(device), advantages=layout.advantages.to(device),
                       completion_mask=layout.completion_mask.to(device), old_logps=old, ref_logps=ref)
    return Batch(hidden.requires_grad_(), weight.requires_grad_(), target_ids, loss_inputs,
                 settings=spec.loss_settings(), setting=spec.name, logps=logps)


def make_batch(shape: HeadShape, dtype, device, seed=0) -> Batch:
    """Rows of 20 items of jittered length, 5% padding, per-rank advantages, old/ref log-probs near the policy."""
    g = torch.Generator().manual_seed(seed)
    B, T = shape.rows, min(shape.row_length, shape.tokens)
    hidden = torch.randn(B, T, shape.hidden, generator=g)
    weight = torch.randn(shape.vocab, shape.hidden, generator=g) / shape.hidden**0.5
    target_ids = torch.randint(0, shape.vocab, (B, T), generator=g)
    lengths = torch.rand(B, wl.REC_NUM, generator=g) + 0.5
    bounds = (lengths.cumsum(1) / lengths.sum(1, keepdim=True) * T).long()  # (B, 20) item ends
    item_ids = (torch.arange(T).view(1, T, 1) >= bounds.unsqueeze(1)).sum(-1).clamp(max=wl.REC_NUM)
    completion_mask = torch.arange(T).expand(B, T) < int(0.95 * T)
    rank_adv = torch.randn(B, wl.REC_NUM + 1, generator=g)
    rank_adv[:, wl.REC_NUM] = -0.1  # overflow bin
    hidden, weight = hidden.to(device, dtype), weight.to(device, dtype)
    target_ids, item_ids, completion_mask = target_ids.to(device), item_ids.to(device), completion_mask.to(device)
    with torch.no_grad():
        logps = fused_logprobs(hidden, weight, target_ids, backend="torch")
    noise = torch.randn(2, B, T, generator=g).to(device)
    loss_inputs = dict(
        item_ids=item_ids, advantages=rank_adv.to(device).gather(1, item_ids), completion_mask=completion_mask,
        old_logps=logps + 0.05 * noise[0], ref_logps=logps + 0.1 * noise[1],
    )
    return Batch(hidden.requires_grad_(), weight.requires_grad_(), target_ids, loss_inputs,
                 settings=wl.RELEASED.loss_settings(), setting=wl.RELEASED.name)


def old_and_ref(logps: torch.Tensor, setting: wl.Setting, seed: int = 1):
    """Old and reference log-probs of a setting from the policy's (B, T) log-probs (None where it has none); noise
    drawn on the CPU, so every process builds the same."""
    g = torch.Generator().manual_seed(seed)
    B = logps.shape[0]
    noise = torch.randn(2, *logps.shape, generator=g)
    drift = torch.randn(B, 1, generator=g)
    old = ref = None
    if setting.old_logps:
        old = logps + (setting.old_noise * noise[0] + setting.old_row_drift * drift).to(logps.device, logps.dtype)
    if setting.ref_logps:
        ref = logps + (setting.ref_noise * noise[1]).to(logps.device, logps.dtype)
    return old, ref


def clip_stats(logps, loss_inputs, setting: wl.Setting) -> dict:
    """How much PPO clipping does at this setting: ``clip_fraction`` is the share of loss items (row, item) whose
    ratio ``exp(mean (logp - old))`` lies outside [1 - eps_low, 1 + eps_high] (``clip_fraction_with_advantage``
    the same among items with a non-zero advantage); ``clip_ratio_region`` etc. the library's statistics (token
    shares where the clip binds, the advantage's sign taken into account)."""
    inputs = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in loss_inputs.items()}
    _, stats = reference_loss_from_logps(logps.double(), **inputs, **setting.loss_settings())
    item_ids, mask = loss_inputs["item_ids"], loss_inputs["completion_mask"].bool() & (loss_inputs["item_ids"] >= 0)
    old = loss_inputs["old_logps"]
    out = {k: float(v) for k, v in stats.items() if v.dim() == 0}  # not the per-row fractions
    if old is None:
        out["clip_fraction"] = out["clip_fraction_with_advantage"] = 0.0
        return out
    B = item_ids.shape[0]
    rows = torch.arange(B, device=item_ids.device).unsqueeze(1).expand_as(item_ids)
    key = (rows * (int(item_ids.max()) + 1) + item_ids)[mask]
    _, group = torch.unique(key, return_inverse=True)
    n = int(group.max()) + 1 if group.numel() else 0
    diff = (logps.double() - old.double())[mask]
    sums = torch.zeros(n, dtype=torch.float64, device=diff.device).index_add(0, group, diff)
    sizes = torch.zeros(n, dtype=torch.float64, device=diff.device).index_add(0, group, torch.ones_like(diff))
    ratio = torch.exp(sums / sizes)
    outside = (ratio < 1 - wl.EPSILON_LOW) | (ratio > 1 + wl.EPSILON_HIGH)
    with_advantage = torch.zeros(n, dtype=torch.bool, device=diff.device)
    with_advantage[group[loss_inputs["advantages"][mask] != 0]] = True
    out["clip_fraction"] = float(outside.double().mean()) if n else 0.0
    out["clip_fraction_with_advantage"] = (float(outside[with_advantage].double().mean()) if with_advantage.any()
                                           else 0.0)
    return out

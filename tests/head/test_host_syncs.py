"""The input layer makes no host sync with ``RANKGRPO_VALIDATE=0``: on a CPU a sync cannot be seen, so every way to
make one (reading a tensor's value on the host, building a tensor from host data on the device) raises here.
On a GPU ``benchmarks/gpu_check.py`` counts the syncs of a whole call with ``torch.cuda.set_sync_debug_mode``."""

from __future__ import annotations

import pytest
import torch

from rankgrpo_kernels.contract import LOSS_TYPES
from rankgrpo_kernels.inputs import raise_on_bad_values, token_batch
from rankgrpo_kernels.specs import LossSpec


def _sync(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"host sync: {name}")
    return refuse


@pytest.fixture
def no_syncs(monkeypatch):
    monkeypatch.setenv("RANKGRPO_VALIDATE", "0")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, _sync(f"Tensor.{name}"))
    for name in ("tensor", "as_tensor", "unique", "nonzero"):
        monkeypatch.setattr(torch, name, _sync(f"torch.{name}"))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("advantages", ["token", "row", "rank"])
def test_token_batch_has_no_host_sync(no_syncs, loss_type, advantages):
    B, T = 3, 7
    gen = torch.Generator().manual_seed(0)
    item_ids = torch.randint(-1, 4, (B, T), generator=gen)
    adv = {"token": torch.randn(B, T, generator=gen), "row": torch.randn(B, generator=gen),
           "rank": torch.randn(B, 4, generator=gen)}[advantages]
    num_items = torch.full((), 17.0) if loss_type == "dapo" and advantages == "token" else 17
    batch, checks = token_batch(
        B, T, item_ids.device, LossSpec(loss_type=loss_type, rec_num=4), item_ids=item_ids, advantages=adv,
        completion_mask=torch.ones(B, T, dtype=torch.bool), old_logps=torch.randn(B, T, generator=gen),
        ref_logps=None, advantage_level="rank" if advantages == "rank" else "auto", num_items_in_batch=num_items)
    raise_on_bad_values(checks)  # skipped: RANKGRPO_VALIDATE=0
    assert batch.normaliser.dim() == 0 and batch.normaliser.dtype == torch.float32

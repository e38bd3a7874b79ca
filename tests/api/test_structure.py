"""The structure holds: a setting is one spec field, and it reaches every backend through every layer untouched.

A loss spec with one more field (made here, nowhere in the package) and custom ops built from it under another
namespace: ``rank_grpo_loss`` (the fused path) and ``rank_grpo_loss_from_logps`` hand the field's
value to each available backend's ``segment_loss``, with no change to the public functions, the argument checks,
the ops or the head. Also: no custom op reads its inputs by index, the backends implement the protocol, and the
package's layers import downwards only.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from rankgrpo_kernels import backends, functional, ops, rank_grpo_loss, rank_grpo_loss_from_logps
from rankgrpo_kernels.backends import protocol
from rankgrpo_kernels.boundary import op_fields
from rankgrpo_kernels.specs import HeadSpec, LossSpec

from ..helpers import random_head, random_loss_batch

PACKAGE = Path(__file__).resolve().parents[2] / "rankgrpo_kernels"
DEVICE = torch.device("cpu")
ProbeSpec = dataclasses.make_dataclass("ProbeSpec", [("probe", float, dataclasses.field(default=0.0))],
                                       bases=(LossSpec,), frozen=True)
ProbeSpec.__dataclass_fields__["probe"].type = "float"  # as ``from __future__ import annotations`` writes it


@pytest.fixture(scope="module")
def probe_ops():
    return ops.Ops("rankgrpo_probe", loss_cls=ProbeSpec)


@pytest.mark.parametrize("backend", backends.available(DEVICE, torch.float32))
def test_a_new_loss_field_reaches_every_backend(probe_ops, monkeypatch, backend):
    seen = []
    module = backends.load(backend)
    original = module.segment_loss

    def spy(batch, *, spec):
        seen.append(getattr(spec, "probe", None))
        return original(batch, spec=spec)

    B, T = 2, 6
    hidden, weight, _, targets = random_head(B, T, 8, 40, torch.float32, bias=False)
    b = random_loss_batch(B, T, 2, dtype=torch.float32)
    inputs = dict(item_ids=b["item_ids"], advantages=b["advantages"], completion_mask=b["completion_mask"],
                  old_logps=b["old_logps"])
    want, _ = rank_grpo_loss(hidden, weight, targets, epsilon_high=0.28, backend=backend, **inputs)
    monkeypatch.setattr(module, "segment_loss", spy)
    monkeypatch.setattr(functional, "OPS", probe_ops)
    spec = ProbeSpec(epsilon_high=0.28, probe=2.5)
    fused, _ = rank_grpo_loss(hidden, weight, targets, loss=spec, backend=backend, **inputs)
    rank_grpo_loss_from_logps(b["logps"], loss=spec, backend=backend, **inputs)
    assert len(seen) >= 2 and set(seen) == {2.5}
    torch.testing.assert_close(fused, want)  # the same loss: the op carried every other field too


def test_op_arguments_come_from_the_spec_fields():
    for boundary in (ops.OPS.fused_loss_args, ops.OPS.loss_from_logps_args):
        for cls in (LossSpec, HeadSpec):
            names = [name for name, _ in op_fields(cls)]
            assert all(name in boundary.names for name in names)
    args = ops.OPS.loss_from_logps_args
    assert "probe" in ops.Ops("rankgrpo_probe_names", loss_cls=ProbeSpec).loss_from_logps_args.names
    assert "probe" not in args.names


def test_specs_and_keywords_are_not_given_twice():
    hidden, weight, _, targets = random_head(1, 4, 4, 10, torch.float32, bias=False)
    kw = dict(item_ids=torch.zeros(1, 4, dtype=torch.long), advantages=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"loss= holds \['beta'\]"):
        rank_grpo_loss(hidden, weight, targets, loss=LossSpec(), beta=0.1, **kw)
    with pytest.raises(ValueError, match=r"head= holds \['temperature'\]"):
        rank_grpo_loss(hidden, weight, targets, head=HeadSpec(), temperature=0.5, **kw)
    with pytest.raises(TypeError, match="loss must be a LossSpec"):
        rank_grpo_loss(hidden, weight, targets, loss=HeadSpec(), **kw)


def test_no_op_reads_its_inputs_by_index():
    """``inputs[...]`` and ``args[...]`` nowhere in ops.py: everything goes through ``Boundary.rebuild``."""
    tree = ast.parse((PACKAGE / "ops.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            assert node.value.id not in ("inputs", "args"), ast.unparse(node)


@pytest.mark.parametrize("name", backends.names())
def test_backends_implement_the_protocol(name):
    if backends.refusal(name, DEVICE, torch.float32) is not None and name != "torch":
        folder = PACKAGE / "backends" / name  # the calls live in __init__.py or (loaded lazily) kernels.py
        defined = {n.name: n for path in (folder / "__init__.py", folder / "kernels.py") if path.is_file()
                   for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        for call, keywords in protocol.CALLS.items():
            assert call in defined, f"{name} does not define {call}"
            assert set(keywords) <= {a.arg for a in defined[call].args.kwonlyargs}
        return
    protocol.check(backends.load(name))


# Layers, top to bottom: a module may import its own layer and the ones below, never the ones above.
LAYERS = [
    {"adapters", "modules", "recommender"},
    {"functional", "docstrings"},
    {"ops", "inputs"},
    {"head"},
    {"backends"},
    {"contract", "specs", "boundary", "reference", "settings", "segments", "rewards", "objective", "importance"},
]


def _layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if module.split(".")[0] in names)


def test_imports_point_downwards():
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).with_suffix("")
        parts = relative.parts
        if parts[0] == "__init__":
            continue
        own = _layer(parts[0])
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            package = list(parts[:-1])
            base = package[: len(package) - (node.level - 1)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            targets = [target] if node.module else [f"{target}.{alias.name}".strip(".") for alias in node.names]
            for name in targets:
                if name and name.split(".")[0] in {n for layer in LAYERS for n in layer}:
                    assert _layer(name) >= own, f"{relative} imports {name}, a layer above it"

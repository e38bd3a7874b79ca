"""The custom-op boundary: a dataclass's fields as op arguments, flattened once and rebuilt once, by name.

``op_fields`` gives the schema type of each field from its annotation, so an op's argument list (``Boundary``)
follows the specs of ``specs.py``: a field added there is an argument of every op that takes that spec.
"""

from __future__ import annotations

import dataclasses

# The schema type of each field annotation of the specs (``specs.py``; ``from __future__ import annotations`` keeps
# them as strings).
_SCHEMA_TYPES = {"float": "float", "float | None": "float?", "int": "int", "int | None": "int?", "bool": "bool",
                 "str": "str", "torch.Tensor": "Tensor", "torch.Tensor | None": "Tensor?"}


def op_fields(cls) -> list[tuple[str, str]]:
    """(name, schema type) of each field of the dataclass ``cls`` (its base classes' fields included), in order."""
    fields = []
    for field in dataclasses.fields(cls):
        annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        if annotation not in _SCHEMA_TYPES:
            raise TypeError(f"{cls.__name__}.{field.name}: annotation {annotation!r} has no custom-op schema type "
                            f"(one of {tuple(_SCHEMA_TYPES)})")
        fields.append((field.name, _SCHEMA_TYPES[annotation]))
    return fields


def flatten(spec) -> tuple:
    """The field values of a dataclass instance, in ``op_fields`` order."""
    return tuple(getattr(spec, field.name) for field in dataclasses.fields(spec))


class Boundary:
    """The argument list of one custom op: ``leading`` plain (name, schema type) pairs, then the fields of each
    ``specs`` (key, dataclass) in turn, then ``trailing`` pairs. Names are unique across all of them."""

    def __init__(self, leading, specs, trailing=()):
        self.leading, self.specs, self.trailing = tuple(leading), tuple(specs), tuple(trailing)
        self.fields = {key: op_fields(cls) for key, cls in self.specs}
        self.arguments = [*self.leading, *(f for key, _ in self.specs for f in self.fields[key]), *self.trailing]
        self.names = [name for name, _ in self.arguments]
        if len(set(self.names)) != len(self.names):
            raise TypeError(f"custom-op arguments must have unique names, got {self.names}")

    def schema(self, returns: str) -> str:
        return "(" + ", ".join(f"{kind} {name}" for name, kind in self.arguments) + ") -> " + returns

    def flatten(self, **values) -> tuple:
        """The op's positional arguments from plain values and spec instances, all by name."""
        out = [values[name] for name, _ in self.leading]
        for key, cls in self.specs:
            if not isinstance(values[key], cls):
                raise TypeError(f"{key} must be a {cls.__name__}, got {type(values[key]).__name__}")
            out.extend(flatten(values[key]))
        return (*out, *(values[name] for name, _ in self.trailing))

    def rebuild(self, args) -> dict:
        """Plain values by name, and each spec rebuilt from its fields by name."""
        named = dict(zip(self.names, args))
        out = {name: named[name] for name, _ in (*self.leading, *self.trailing)}
        for key, cls in self.specs:
            out[key] = cls(**{name: named[name] for name, _ in self.fields[key]})
        return out

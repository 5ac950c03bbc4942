"""The call contract: one frozen dataclass per family carries a call from the public API to a kernel.

A family's call class (`softmax.call.SoftmaxCall`, `linear.call.LinearCall`) lists, as
dataclass fields in order, every argument its custom ops take after the data tensors.
From that one list come the ops' schema, the argument tuple of an op call, the call
rebuilt inside the op, the tensors saved for backward and the None-gradients, so adding
a feature is adding a field here (plus the reference and the kernels), not editing a
dozen signatures.

The public API builds a call with the class's `build(...)`, which validates the user's
arguments once; rebuilding it from op arguments (`from_op_args`) does not validate again.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Optional, Sequence

import torch
from torch import Tensor

# Python field type -> torch.library schema type.
_SCHEMA_TYPES = {
    float: "float",
    int: "int",
    bool: "bool",
    str: "str",
    Tensor: "Tensor",
    Optional[Tensor]: "Tensor?",
}

_FIELDS: dict[type, tuple[tuple[str, object], ...]] = {}  # OpCall._fields per class


class OpCall:
    """Base of the per-family call dataclasses (subclasses are `@dataclass(frozen=True)`)."""

    # Tensor fields that receive a gradient (e.g. an attention bias); all others get None.
    GRAD_FIELDS: tuple[str, ...] = ()

    @classmethod
    def _fields(cls) -> tuple[tuple[str, object], ...]:
        # Cached per class: typing.get_type_hints re-evaluates every string annotation (a compile()
        # per field), ~0.6 ms a call, and each op call (from_op_args, op_args, saved_tensors) reads
        # the fields: 1.7 ms of a 25 ms linear causal fwd+bwd at N=1024 (cProfile, 1 thread).
        fields = _FIELDS.get(cls)
        if fields is None:
            hints = typing.get_type_hints(cls)
            fields = _FIELDS[cls] = tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))
        return fields

    @classmethod
    def schema_args(cls) -> str:
        """The fields as torch.library schema arguments: "float scale, int window_left=-1, ...": a field
        with a default has it in the schema too, so a direct op call may leave trailing fields out."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

        def argument(name, kind):
            text = f"{_SCHEMA_TYPES[kind]} {name}"
            if name not in defaults:
                return text
            return f"{text}={'None' if defaults[name] is None else repr(defaults[name])}"

        return ", ".join(argument(name, kind) for name, kind in cls._fields())

    @classmethod
    def tensor_fields(cls) -> tuple[str, ...]:
        return tuple(name for name, kind in cls._fields() if kind in (Tensor, Optional[Tensor]))

    @classmethod
    def from_op_args(cls, args: Sequence) -> "OpCall":
        return cls(*args)

    @classmethod
    def none_grads(cls) -> tuple[None, ...]:
        """One None per field: no argument of the call carries a gradient."""
        return (None,) * len(dataclasses.fields(cls))

    @classmethod
    def field_index(cls, name: str) -> int:
        """Position of field `name` among the op arguments that follow the data tensors."""
        return [f.name for f in dataclasses.fields(cls)].index(name)

    @classmethod
    def field_grads(cls, **grads) -> tuple[Optional[Tensor], ...]:
        """One entry per field: the gradient given for a GRAD_FIELDS name, None elsewhere."""
        unknown = set(grads) - set(cls.GRAD_FIELDS)
        if unknown:
            raise KeyError(f"{sorted(unknown)} are not gradient fields of {cls.__name__}")
        return tuple(grads.get(f.name) for f in dataclasses.fields(cls))

    def op_args(self) -> tuple:
        """The field values in schema order (what follows the data tensors in an op call)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def saved_tensors(self) -> tuple[Optional[Tensor], ...]:
        """The call's tensor fields, for ctx.save_for_backward."""
        return tuple(getattr(self, name) for name in self.tensor_fields())

    def with_saved(self, tensors: Sequence[Optional[Tensor]]) -> "OpCall":
        """This call with its tensor fields replaced by `tensors` (ctx.saved_tensors, in order)."""
        return dataclasses.replace(self, **dict(zip(self.tensor_fields(), tensors)))

    def without_tensors(self) -> "OpCall":
        """This call with its tensor fields set to None (what ctx keeps besides the saved tensors)."""
        return dataclasses.replace(self, **{name: None for name in self.tensor_fields()})


def op_schema(call_cls: type[OpCall], data: str, returns: str) -> str:
    """"(Tensor q, ..., <the call's fields>) -> returns" for torch.library.custom_op."""
    return f"({data}, {call_cls.schema_args()}) -> {returns}"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for fp16/bf16/fp32 (DESIGN.md's precision rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32

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
from typing import Callable, Optional, Sequence

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
_TENSOR_FIELDS: dict[type, tuple[str, ...]] = {}  # OpCall.tensor_fields per class
_NAMES: dict[type, tuple[str, ...]] = {}  # the field names per class, in schema order


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
    def _names(cls) -> tuple[str, ...]:
        # Cached per class as _fields: dataclasses.fields() builds a new tuple each call, and a
        # tiny attention fwd+bwd read it ~10 times (op_args, field_index, field_grads, replace).
        names = _NAMES.get(cls)
        if names is None:
            names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
        return names

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
        names = _TENSOR_FIELDS.get(cls)
        if names is None:
            names = _TENSOR_FIELDS[cls] = tuple(
                name for name, kind in cls._fields() if kind in (Tensor, Optional[Tensor]))
        return names

    @classmethod
    def from_op_args(cls, args: Sequence) -> "OpCall":
        names = cls._names()
        if len(args) != len(names):  # a direct op call that left trailing defaults out
            return cls(*args)
        return cls._from_values(names, args)

    @classmethod
    def _from_values(cls, names: tuple[str, ...], values) -> "OpCall":
        # The frozen dataclass's __init__ sets each field through object.__setattr__ (~0.15 us a
        # field, 16 fields, 4-6 calls rebuilt per fwd+bwd); the instance dict filled at once is the
        # same object (no field has a default factory or __post_init__).
        call = object.__new__(cls)
        call.__dict__.update(zip(names, values))
        return call

    @classmethod
    def none_grads(cls) -> tuple[None, ...]:
        """One None per field: no argument of the call carries a gradient."""
        return (None,) * len(cls._names())

    @classmethod
    def field_index(cls, name: str) -> int:
        """Position of field `name` among the op arguments that follow the data tensors."""
        return cls._names().index(name)

    @classmethod
    def field_grads(cls, **grads) -> tuple[Optional[Tensor], ...]:
        """One entry per field: the gradient given for a GRAD_FIELDS name, None elsewhere."""
        if not grads:
            return cls.none_grads()
        unknown = set(grads) - set(cls.GRAD_FIELDS)
        if unknown:
            raise KeyError(f"{sorted(unknown)} are not gradient fields of {cls.__name__}")
        return tuple(grads.get(name) for name in cls._names())

    def op_args(self) -> tuple:
        """The field values in schema order (what follows the data tensors in an op call)."""
        return tuple(getattr(self, name) for name in self._names())

    def saved_tensors(self) -> tuple[Optional[Tensor], ...]:
        """The call's tensor fields, for ctx.save_for_backward."""
        return tuple(getattr(self, name) for name in self.tensor_fields())

    def with_saved(self, tensors: Sequence[Optional[Tensor]]) -> "OpCall":
        """This call with its tensor fields replaced by `tensors` (ctx.saved_tensors, in order)."""
        return self._replace(dict(zip(self.tensor_fields(), tensors)))

    def without_tensors(self) -> "OpCall":
        """This call with its tensor fields set to None (what ctx keeps besides the saved tensors)."""
        return self._replace(dict.fromkeys(self.tensor_fields()))

    def _replace(self, changes: dict) -> "OpCall":
        # dataclasses.replace without its walk over dataclasses.fields() and its keyword __init__ call.
        values = self.__dict__
        return self._from_values(self._names(), [changes[name] if name in changes else values[name]
                                                 for name in self._names()])


# --- eager calls ----------------------------------------------------------------------------

# Every kernel is a torch.library custom op (DESIGN.md: torch.compile traces it, opcheck checks it,
# modes and subclasses dispatch through it), but an eager call through one pays torch.library's
# Python wrappers: the dynamo-disable decorators, the dispatcher's round trip into Python and, with
# autograd, `fill_defaults` walking the schema (quadratic in its ~20 arguments: ~100 us) before
# setup_context runs: without them a B1 H8 N16 D64 causal fwd+bwd (1 thread) takes 0.7x the time.
# So a plain eager CPU call (EagerOp) runs the op's own implementation directly, and with autograd
# a torch.autograd.Function built from the SAME setup_context and backward the op registers: one
# implementation, two entry points, never two behaviours. Anything else (compiling, exporting,
# tracing, a dispatch or function mode such as FakeTensorMode, functorch transforms, a tensor
# subclass, another device) takes the op, so everything the op gives is kept where it matters.
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _plain_eager(inputs: Sequence) -> bool:
    """True when an op call on `inputs` would only reach its CPU implementation (and autograd)."""
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None):
        return False
    for x in inputs:
        if isinstance(x, Tensor) and (type(x) not in _PLAIN_TENSORS or not x.is_cpu):
            return False
    return True


class EagerOp:
    """How the package calls custom op `op` whose implementation is `implementation`: through the op
    when compiling or anything but a plain eager CPU call, else the implementation directly (under
    a torch.autograd.Function made of `setup_context` / `backward`, the op's own, when a gradient is
    needed). Callers pass every argument (setup_context then sees the inputs the op would give it)."""

    def __init__(self, op, implementation: Callable, setup_context: Callable | None = None,
                 backward: Callable | None = None):
        self.op = op
        self.implementation = implementation
        self.function = None
        if backward is not None:
            def forward(ctx, *inputs):
                output = implementation(*inputs)
                setup_context(ctx, inputs, output)
                return output

            name = "Eager_" + op._qualname.replace("::", "_")
            self.function = type(name, (torch.autograd.Function,),
                                 {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *inputs):
        if torch.compiler.is_compiling() or not _plain_eager(inputs):
            return self.op(*inputs)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*inputs):
            # An op without a backward: the op itself records that it has none (its error on backward).
            return self.op(*inputs) if self.function is None else self.function.apply(*inputs)
        return self.implementation(*inputs)


def op_schema(call_cls: type[OpCall], data: str, returns: str) -> str:
    """"(Tensor q, ..., <the call's fields>) -> returns" for torch.library.custom_op."""
    return f"({data}, {call_cls.schema_args()}) -> {returns}"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for fp16/bf16/fp32 (DESIGN.md's precision rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32

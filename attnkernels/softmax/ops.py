"""torch.library custom ops for softmax attention (dense, window, block-sparse, key padding).

`torch.ops.attnkernels.attention_fwd(q, k, v, <SoftmaxCall fields>)` and
`attention_bwd(dout, q, k, v, out, lse, <SoftmaxCall fields>)`: the schema after
the data tensors is generated from `SoftmaxCall` (call.py), the one place the
argument list is spelled out. Each op rebuilds the call, handles the empty call
(conventions.py), and runs the backend the registry picks when it runs (backends.py):
C++ for CPU tensors, Triton for CUDA tensors, or the one forced by
`attnkernels.backend(...)`. Each op has a fake (so torch.compile traces through
without graph breaks) and the pair is wired together with `register_autograd`.

Outputs: out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32 (float64 for
float64 inputs); grads in the inputs' dtypes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, conventions
from ..op_call import accumulation_dtype, op_schema
from .call import SoftmaxCall
from .reference import attention_reference, attention_reference_backward

FAMILY = "softmax"


# --- the backends -------------------------------------------------------------------------


def _reference_forward(call: SoftmaxCall, q: Tensor, k: Tensor, v: Tensor):
    out, lse = attention_reference(q, k, v, window_size=call.window, block_mask=call.layout(),
                                   key_padding_mask=call.key_padding_mask, scale=call.scale)
    return out.to(q.dtype), lse.to(accumulation_dtype(q.dtype))


def _reference_backward(call: SoftmaxCall, dout, q, k, v, out, lse):
    grads = attention_reference_backward(dout, q, k, v, window_size=call.window, block_mask=call.layout(),
                                         key_padding_mask=call.key_padding_mask, scale=call.scale)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


def _triton_forward(call, q, k, v):
    from . import triton_launch

    return triton_launch.forward(call, q, k, v)


def _triton_backward(call, dout, q, k, v, out, lse):
    from . import triton_launch

    return triton_launch.backward(call, dout, q, k, v, out, lse)


def _cpu_forward(call, q, k, v):
    from . import cpu_launch

    return cpu_launch.forward(call, q, k, v)


def _cpu_backward(call, dout, q, k, v, out, lse):
    from . import cpu_launch

    return cpu_launch.backward(call, dout, q, k, v, out, lse)


backends.register(FAMILY, backends.Backend("cpu", _cpu_forward, _cpu_backward, backends.cpu_declines))
backends.register(FAMILY, backends.Backend("triton", _triton_forward, _triton_backward, backends.triton_declines))
backends.register(FAMILY, backends.Backend("reference", _reference_forward, _reference_backward,
                                           backends.reference_declines))


# --- the ops ------------------------------------------------------------------------------


def _forward(q: Tensor, k: Tensor, v: Tensor, *args) -> tuple[Tensor, Tensor]:
    if conventions.is_empty_call(q.shape[2], k.shape[2]):
        return conventions.empty_softmax_outputs(q, v)
    call = SoftmaxCall.from_op_args(args)
    return backends.select(FAMILY, q.device).forward(call, q, k, v)


def _backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *args):
    if conventions.is_empty_call(q.shape[2], k.shape[2]):
        return conventions.zero_grads(q, k, v)
    call = SoftmaxCall.from_op_args(args)
    return backends.select(FAMILY, q.device).backward(call, dout, q, k, v, out, lse)


attention_fwd = torch.library.custom_op(
    "attnkernels::attention_fwd", _forward, mutates_args=(),
    schema=op_schema(SoftmaxCall, "Tensor q, Tensor k, Tensor v", "(Tensor, Tensor)"),
)
attention_bwd = torch.library.custom_op(
    "attnkernels::attention_bwd", _backward_op, mutates_args=(),
    schema=op_schema(SoftmaxCall, "Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse",
                     "(Tensor, Tensor, Tensor)"),
)


@attention_fwd.register_fake
def _(q, k, v, *args):
    batch, q_heads, q_len, _ = q.shape
    out = q.new_empty(batch, q_heads, q_len, v.shape[-1])
    lse = q.new_empty(batch, q_heads, q_len, dtype=accumulation_dtype(q.dtype))
    return out, lse


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    call = SoftmaxCall.from_op_args(args)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *call.saved_tensors())
    ctx.call = call.without_tensors()
    # The LSE output carries no gradient (as in FlashAttention): the public API
    # returns it detached, so a grad for it never reaches here.
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *tables = ctx.saved_tensors
    call = ctx.call.with_saved(tables)
    dq, dk, dv = attention_bwd(grad_out, q, k, v, out, lse, *call.op_args())
    return (dq, dk, dv, *SoftmaxCall.none_grads())


attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def run(call: SoftmaxCall, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of `call` on q, k, v through the custom op."""
    return attention_fwd(q, k, v, *call.op_args())

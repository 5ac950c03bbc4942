"""torch.library custom ops for linear attention, with fakes, autograd and backend dispatch.

`torch.ops.attnkernels.linear_attention_fwd(q, k, v, <LinearCall fields>)` and
`linear_attention_bwd(dout, q, k, v, <LinearCall fields>)`: the schema after the
data tensors is generated from `LinearCall` (call.py). Each op rebuilds the call
and runs the backend the registry picks when it runs (backends.py): C++ for CPU
tensors, Triton for CUDA tensors, or the one forced by `attnkernels.backend(...)`
("reference" upcasts to float64 and runs the literal sums of reference.py, then
casts back). A call with Nq == 0 or Nk == 0 has nothing to fuse: the reference
runs it whatever the backend (it gives the state and the zero output of an
empty sum).

Outputs: out (B, Hq, Nq, Dv) in q's dtype and the final state
S0 + Σ_j φ(k_j) v_jᵀ (B, Hk, M, Dv), z0 + Σ_j φ(k_j) (B, Hk, M) over every key
(causal or not), float32 (float64 for float64 inputs). Gradients flow to q, k, v
only; the final state is not differentiable.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, conventions
from ..op_call import EagerOp, accumulation_dtype, op_schema
from .call import LinearCall
from .reference import linear_attention_reference, linear_attention_reference_backward

FAMILY = "linear"


# --- the backends -------------------------------------------------------------------------


def _reference_state(call: LinearCall):
    return None if call.initial_s is None else (call.initial_s.double(), call.initial_z.double())


def _reference_forward(call: LinearCall, q: Tensor, k: Tensor, v: Tensor):
    out, (s, z) = linear_attention_reference(
        q.double(), k.double(), v.double(), feature_map=call.feature_map, causal=call.causal,
        normalize=call.normalize, eps=call.eps, scale=call.scale, initial_state=_reference_state(call),
    )
    sdt = accumulation_dtype(q.dtype)
    return out.to(q.dtype), s.to(sdt), z.to(sdt)


def _reference_backward(call: LinearCall, dout, q, k, v):
    grads = linear_attention_reference_backward(
        dout.double(), q.double(), k.double(), v.double(), feature_map=call.feature_map, causal=call.causal,
        normalize=call.normalize, eps=call.eps, scale=call.scale, initial_state=_reference_state(call),
    )
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


def _triton_forward(call, q, k, v):
    from . import triton_launch

    return triton_launch.forward(call, q, k, v)


def _triton_backward(call, dout, q, k, v):
    from . import triton_launch

    return triton_launch.backward(call, dout, q, k, v)


def _cpu_forward(call, q, k, v):
    from . import cpu_launch

    return cpu_launch.forward(call, q, k, v)


def _cpu_backward(call, dout, q, k, v):
    from . import cpu_launch

    return cpu_launch.backward(call, dout, q, k, v)


backends.register(FAMILY, backends.Backend("cpu", _cpu_forward, _cpu_backward, backends.cpu_declines))
backends.register(FAMILY, backends.Backend("triton", _triton_forward, _triton_backward, backends.triton_declines))
backends.register(FAMILY, backends.Backend("reference", _reference_forward, _reference_backward,
                                           backends.reference_declines))


# --- the ops ------------------------------------------------------------------------------


def _forward(q: Tensor, k: Tensor, v: Tensor, *args):
    call = LinearCall.from_op_args(args)
    if conventions.is_empty_call(q.shape[2], k.shape[2]):
        return _reference_forward(call, q, k, v)
    return backends.select(FAMILY, q.device).forward(call, q, k, v)


def _backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, *args):
    call = LinearCall.from_op_args(args)
    if conventions.is_empty_call(q.shape[2], k.shape[2]):
        return _reference_backward(call, dout, q, k, v)
    return backends.select(FAMILY, q.device).backward(call, dout, q, k, v)


linear_attention_fwd = torch.library.custom_op(
    "attnkernels::linear_attention_fwd", _forward, mutates_args=(),
    schema=op_schema(LinearCall, "Tensor q, Tensor k, Tensor v", "(Tensor, Tensor, Tensor)"),
)
linear_attention_bwd = torch.library.custom_op(
    "attnkernels::linear_attention_bwd", _backward_op, mutates_args=(),
    schema=op_schema(LinearCall, "Tensor dout, Tensor q, Tensor k, Tensor v", "(Tensor, Tensor, Tensor)"),
)


@linear_attention_fwd.register_fake
def _(q, k, v, *args):
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    sdt = accumulation_dtype(q.dtype)
    out = q.new_empty(batch, q_heads, q_len, value_dim)
    final_s = q.new_empty(batch, kv_heads, head_dim, value_dim, dtype=sdt)
    final_z = q.new_empty(batch, kv_heads, head_dim, dtype=sdt)
    return out, final_s, final_z


@linear_attention_bwd.register_fake
def _(dout, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    call = LinearCall.from_op_args(args)
    _, final_s, final_z = output
    ctx.save_for_backward(q, k, v, *call.saved_tensors())
    ctx.call = call.without_tensors()
    # The carried state is an output for streaming, not a differentiable one
    # (call.py refuses an initial_state that requires grad, for the same reason).
    ctx.mark_non_differentiable(final_s, final_z)


def _autograd_backward(ctx, grad_out, grad_s, grad_z):
    q, k, v, *state = ctx.saved_tensors
    call = ctx.call.with_saved(state)
    dq, dk, dv = _linear_attention_bwd(grad_out, q, k, v, *call.op_args())
    return (dq, dk, dv, *LinearCall.none_grads())


linear_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)
# The ops as the package calls them (op_call.EagerOp: the implementations directly in plain eager CPU calls).
_linear_attention_fwd = EagerOp(linear_attention_fwd, _forward, _setup_context, _autograd_backward)
_linear_attention_bwd = EagerOp(linear_attention_bwd, _backward_op)


def run(call: LinearCall, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(out, final S, final z) of `call` on the features q, k and v through the custom op."""
    return _linear_attention_fwd(q, k, v, *call.op_args())

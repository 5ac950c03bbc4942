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

import dataclasses

import torch
from torch import Tensor

from .. import backends, conventions
from ..op_call import EagerOp, accumulation_dtype, op_schema
from .call import FEATURES, SoftmaxCall
from .reference import attention_reference, attention_reference_backward

FAMILY = "softmax"


# --- the backends -------------------------------------------------------------------------


def _reference_kwargs(call: SoftmaxCall) -> dict:
    """The call as the reference's keywords (the forward's call has sinks=None: the ops apply them)."""
    return dict(window_size=call.window, block_mask=call.layout(), key_padding_mask=call.key_padding_mask,
                scale=call.scale, softcap=call.softcap, alibi_slopes=call.alibi_slopes, sinks=call.sinks,
                attn_bias=call.attn_bias, dropout_p=call.dropout_p, dropout_seed=call.seed())


def _reference_forward(call: SoftmaxCall, q: Tensor, k: Tensor, v: Tensor):
    out, lse = attention_reference(q, k, v, **_reference_kwargs(call))
    return out.to(q.dtype), lse.to(accumulation_dtype(q.dtype))


def _reference_backward(call: SoftmaxCall, dout, q, k, v, out, lse, bias_grad: bool):
    # The backward's call keeps its sinks: the reference recomputes P with them.
    dq, dk, dv, _, dbias = attention_reference_backward(dout, q, k, v, **_reference_kwargs(call))
    dbias = dbias.to(accumulation_dtype(q.dtype)) if bias_grad else None
    return tuple(g.to(t.dtype) for g, t in zip((dq, dk, dv), (q, k, v))) + (dbias,)


def _triton_forward(call, q, k, v):
    from . import triton_launch

    return triton_launch.forward(call, q, k, v)


def _triton_backward(call, dout, q, k, v, out, lse, bias_grad):
    from . import triton_launch

    return triton_launch.backward(call, dout, q, k, v, out, lse, bias_grad)


def _cpu_forward(call, q, k, v):
    from . import cpu_launch

    # The general kernel fuses the sinks; the decode kernel takes none, so its outputs get them here.
    if call.sinks is not None and cpu_launch.uses_decode(call, q, k, v):
        return _with_sinks(call.sinks, *cpu_launch.forward(dataclasses.replace(call, sinks=None), q, k, v))
    return cpu_launch.forward(call, q, k, v)


def _cpu_backward(call, dout, q, k, v, out, lse, bias_grad):
    from . import cpu_launch

    return cpu_launch.backward(call, dout, q, k, v, out, lse, bias_grad)


# The modifiers (call.FEATURES) each backend's kernels implement; a call using another is
# refused by the registry with the reason. Sinks are not among them: every backend runs them,
# in its forward when it is listed in FUSES_SINKS (the C++ kernel's finalisation, no extra
# pass over the output), else applied by the ops around it (_with_sinks).
CPU_FEATURES = frozenset(FEATURES)
FUSES_SINKS = frozenset({"cpu"})
TRITON_FEATURES = frozenset(FEATURES)

backends.register(FAMILY, backends.Backend("cpu", _cpu_forward, _cpu_backward, backends.cpu_declines, CPU_FEATURES))
backends.register(FAMILY, backends.Backend("triton", _triton_forward, _triton_backward, backends.triton_declines,
                                           TRITON_FEATURES))
backends.register(FAMILY, backends.Backend("reference", _reference_forward, _reference_backward,
                                           backends.reference_declines, frozenset(FEATURES)))


# --- the ops ------------------------------------------------------------------------------


def _with_sinks(sinks: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Each head's sink logit joins every row's softmax denominator: lse' = logaddexp(lse, sink),
    out' = out · exp(lse - lse'). Exact, and O(B·H·N·Dv) beside the kernel's O(B·H·N·Nk·D);
    rows that see no key keep out 0 and get lse' = the sink. The backward needs nothing more:
    P = exp(S - lse') and delta = rowsum(dO ∘ out') already account for the sink."""
    sink = sinks.detach().to(lse.dtype)[None, :, None]  # [1, Hq, 1]
    new_lse = torch.logaddexp(lse, sink)
    # Computed in lse's dtype and rounded once to out's; in place on the widened copy (out itself when
    # the dtypes agree: it is this op's own fresh tensor). A mixed-dtype in-place multiply is 4x slower.
    scaled = out.to(lse.dtype).mul_(torch.exp(lse - new_lse)[..., None])
    return scaled.to(out.dtype), new_lse


def _sink_grad(sinks: Tensor, dout: Tensor, out: Tensor, lse: Tensor) -> Tensor:
    """dsinks[h] = -Σ_b,i P_sink · delta, P_sink = exp(sink - lse'), delta = rowsum(dO ∘ out')."""
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # [B, Hq, Nq]
    sink_probs = torch.exp(sinks.detach().to(lse.dtype)[None, :, None] - lse)
    return -(sink_probs * delta).sum(dim=(0, 2)).to(sinks.dtype)


def _forward(q: Tensor, k: Tensor, v: Tensor, *args) -> tuple[Tensor, Tensor]:
    call = SoftmaxCall.from_op_args(args)
    if conventions.is_empty_call(q.shape[2], k.shape[2]):
        out, lse = conventions.empty_softmax_outputs(q, v)
    else:
        backend = backends.select(FAMILY, q.device, call.features())
        if call.sinks is None or backend.name in FUSES_SINKS:
            return backend.forward(call, q, k, v)
        out, lse = backend.forward(dataclasses.replace(call, sinks=None), q, k, v)
    return _with_sinks(call.sinks, out, lse) if call.sinks is not None else (out, lse)


def _backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias_grad: bool, *args):
    call = SoftmaxCall.from_op_args(args)
    if conventions.is_empty_call(q.shape[2], k.shape[2]):
        dq, dk, dv = conventions.zero_grads(q, k, v)
        dbias = None
    else:
        backend = backends.select(FAMILY, q.device, call.features())
        # The kernels read P from the saved lse, which includes the sinks, and never read call.sinks.
        dq, dk, dv, dbias = backend.backward(call, dout, q, k, v, out, lse, bias_grad)
    if bias_grad and dbias is None:  # the empty call
        dbias = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=accumulation_dtype(q.dtype))
    return dq, dk, dv, dbias if bias_grad else q.new_empty(0, dtype=accumulation_dtype(q.dtype))


attention_fwd = torch.library.custom_op(
    "attnkernels::attention_fwd", _forward, mutates_args=(),
    schema=op_schema(SoftmaxCall, "Tensor q, Tensor k, Tensor v", "(Tensor, Tensor)"),
)
# dbias: the full (B, Hq, Nq, Nk) gradient of the bias (float32; float64 for float64 inputs) when
# bias_grad, else an empty tensor.
attention_bwd = torch.library.custom_op(
    "attnkernels::attention_bwd", _backward_op, mutates_args=(),
    schema=op_schema(SoftmaxCall, "Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool bias_grad",
                     "(Tensor, Tensor, Tensor, Tensor)"),
)


@attention_fwd.register_fake
def _(q, k, v, *args):
    batch, q_heads, q_len, _ = q.shape
    out = q.new_empty(batch, q_heads, q_len, v.shape[-1])
    lse = q.new_empty(batch, q_heads, q_len, dtype=accumulation_dtype(q.dtype))
    return out, lse


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, bias_grad, *args):
    dbias_shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if bias_grad else (0,)
    dbias = q.new_empty(dbias_shape, dtype=accumulation_dtype(q.dtype))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


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
    bias_grad = call.attn_bias is not None and ctx.needs_input_grad[3 + SoftmaxCall.field_index("attn_bias")]
    dq, dk, dv, dbias = _attention_bwd(grad_out, q, k, v, out, lse, bias_grad, *call.op_args())
    grads = {}
    if bias_grad:  # reduced over the dims the bias broadcasts along
        grads["attn_bias"] = dbias.sum_to_size(call.attn_bias.shape).to(call.attn_bias.dtype)
    if call.sinks is not None and ctx.needs_input_grad[3 + SoftmaxCall.field_index("sinks")]:
        grads["sinks"] = _sink_grad(call.sinks, grad_out, out, lse)
    return (dq, dk, dv, *SoftmaxCall.field_grads(**grads))


attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)
# The ops as the package calls them: a plain eager CPU call runs _forward / _backward_op directly
# (with the autograd above), any other call the op (op_call.EagerOp says why).
_attention_fwd = EagerOp(attention_fwd, _forward, _setup_context, _autograd_backward)
_attention_bwd = EagerOp(attention_bwd, _backward_op)


def run(call: SoftmaxCall, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of `call` on q, k, v through the custom op."""
    return _attention_fwd(q, k, v, *call.op_args())

"""The C++ softmax kernels (csrc/softmax.cpp, csrc/decode.cpp) run a SoftmaxCall: the call's fields as their arguments.

The general ops (`attention_fwd` / `attention_bwd`) take contiguous (B, H, N, D) tensors.
A forward with few query rows (Nq <= DECODE_MAX_Q_LEN: a decode step, speculative
decoding, a small prefill chunk), no block tables and no modifiers but softcap / ALiBi
(DECODE_FEATURES: the decode kernel implements those two) runs the split-KV decode kernel
(`attention_decode_fwd`, csrc/decode.cpp), and hands it k / v as they are when their last
dim is contiguous (a KV-cache prefix `k_cache[:, :, :n]`, a (B, N, H, D) cache transposed
to (B, H, N, D)): no copy. Training forwards with so few rows take it too: its out and LSE
are the quantities the general forward saves, so the backward (`attention_bwd`) is the
same (tests/test_cpu_decode.py checks those gradients). A build without the decode op (an older
.so) takes the general
path. The ops check only the invariants that keep a direct call in bounds (the public API
validated everything else).
"""
from __future__ import annotations

import functools

from torch import Tensor

from .. import backends
from ..backends import cpu_kernels
from .call import SoftmaxCall

# Query rows up to which a forward takes the decode kernel.
DECODE_MAX_Q_LEN = 16
# The score modifiers (call.FEATURES) the decode kernel implements.
DECODE_FEATURES = frozenset({"softcap", "alibi"})


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _decode_takes_modifiers() -> bool:
    """The decode op of this build takes softcap / alibi_slopes (an older .so's does not)."""
    schema = backends.cpu_kernels().attention_decode_fwd.default._schema
    return any(a.name == "softcap" for a in schema.arguments)


def uses_decode(call: SoftmaxCall, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True when `forward` runs this call on the decode kernel (which implements softcap and ALiBi,
    DECODE_FEATURES: a call using another modifier runs the general kernel)."""
    ops = cpu_kernels()
    if q.shape[2] > DECODE_MAX_Q_LEN or call.is_sparse or not hasattr(ops, "attention_decode_fwd"):
        return False
    features = call.features()
    return not features or (features <= DECODE_FEATURES and _decode_takes_modifiers())


def _modifier_args(call: SoftmaxCall) -> tuple:
    """The trailing modifier arguments of attention_fwd / attention_bwd: softcap, alibi_slopes (B, Hq),
    attn_bias (a 4-D view, size 1 where it broadcasts: never expanded), dropout_p, the seed as an int."""
    return call.softcap, call.alibi_slopes, call.attn_bias, call.dropout_p, call.seed()


def forward(call: SoftmaxCall, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    if uses_decode(call, q, k, v):
        return cpu_kernels().attention_decode_fwd(
            q, _rows_contiguous(k), _rows_contiguous(v), call.scale, call.window_left, call.window_right,
            call.key_padding_mask, *((call.softcap, call.alibi_slopes) if call.features() else ()),
        )
    return cpu_kernels().attention_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), call.scale, call.window_left, call.window_right,
        call.kv_num_blocks, call.kv_indices, call.sparse_block_size, call.key_padding_mask, *_modifier_args(call),
        call.sinks,  # fused into the kernel's finalisation (the saved lse includes them)
    )


def backward(call: SoftmaxCall, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             bias_grad: bool = False):
    """(dq, dk, dv, dbias): dbias (B, Hq, Nq, Nk) float32 (float64 for float64 inputs) when bias_grad, else None."""
    bias_grad = bool(bias_grad) and call.attn_bias is not None
    dq, dk, dv, dbias = cpu_kernels().attention_bwd(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous(),
        call.scale, call.window_left, call.window_right, call.kv_num_blocks, call.kv_indices,
        call.q_num_blocks, call.q_indices, call.sparse_block_size, call.key_padding_mask, *_modifier_args(call),
        bias_grad,
    )
    return dq, dk, dv, dbias if bias_grad else None

"""The C++ softmax kernels (csrc/softmax.cpp) run a SoftmaxCall: the call's fields as their arguments.

The C++ ops take contiguous (B, H, N, D) tensors; they check only the invariants
that keep a direct call in bounds (the public API validated everything else).
"""
from __future__ import annotations

from torch import Tensor

from ..backends import cpu_kernels
from .call import SoftmaxCall


def forward(call: SoftmaxCall, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return cpu_kernels().attention_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), call.scale, call.window_left, call.window_right,
        call.kv_num_blocks, call.kv_indices, call.sparse_block_size, call.key_padding_mask,
    )


def backward(call: SoftmaxCall, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor):
    return cpu_kernels().attention_bwd(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous(),
        call.scale, call.window_left, call.window_right, call.kv_num_blocks, call.kv_indices,
        call.q_num_blocks, call.q_indices, call.sparse_block_size, call.key_padding_mask,
    )

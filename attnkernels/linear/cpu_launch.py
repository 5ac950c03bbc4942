"""The C++ linear kernels (csrc/linear.cpp) run a LinearCall: the call's fields as their arguments."""
from __future__ import annotations

from torch import Tensor

from ..backends import cpu_kernels
from .call import LinearCall


def forward(call: LinearCall, q: Tensor, k: Tensor, v: Tensor):
    return cpu_kernels().linear_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), *call.op_args())


def backward(call: LinearCall, dout: Tensor, q: Tensor, k: Tensor, v: Tensor):
    return cpu_kernels().linear_attention_bwd(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), *call.op_args()
    )

"""Placeholder adapter until the split Triton launcher lands: runs the kernels in attnkernels.kernels."""
from ..kernels import attention as _k


def forward(call, q, k, v):
    return _k.attention_forward(q, k, v, call.scale, call.window_left, call.window_right,
                                call.kv_num_blocks, call.kv_indices, call.sparse_block_size, call.key_padding_mask)


def backward(call, dout, q, k, v, out, lse):
    return _k.attention_backward(dout, q, k, v, out, lse, call.scale, call.window_left, call.window_right,
                                 call.kv_num_blocks, call.kv_indices, call.q_num_blocks, call.q_indices,
                                 call.sparse_block_size, call.key_padding_mask)

"""torch.library custom ops for softmax attention (dense, window, block-sparse).

`torch.ops.attnkernels.attention_fwd` / `attention_bwd` take already-validated
arguments (see api.py) and pick the implementation when they run:
C++ for CPU tensors, Triton for CUDA tensors, or the one forced by
`attnkernels.backend(...)`. Each op has a fake implementation (so torch.compile
traces through without graph breaks) and the pair is wired together with
`register_autograd`.

Argument conventions shared by every backend:
- q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv); `scale` resolved.
- (window_left, window_right): bottom-right aligned band, -1 unbounded; causal
  arrives as window_right = 0.
- kv_num_blocks/kv_indices/q_num_blocks/q_indices: int32 block tables of a
  BlockMask (or None), with `sparse_block_size` (0 when there are none).
- key_padding_mask: bool (B, Nk), True = key ignored (or None).
- Returns out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) float32
  (float64 for float64 inputs).
"""
from __future__ import annotations

import types
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .reference import TableLayout, attention_reference, attention_reference_backward


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """A call with Nq == 0 or Nk == 0: every row sees no key -> out 0, lse -inf."""
    batch, q_heads, q_len, _ = q.shape
    out = q.new_zeros(batch, q_heads, q_len, v.shape[-1])
    lse = torch.full((batch, q_heads, q_len), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    return out, lse


def _call(scale, window_left, window_right, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
          sparse_block_size, key_padding_mask) -> types.SimpleNamespace:
    """The call object the Triton launchers take (a stand-in for the SoftmaxCall to come)."""
    return types.SimpleNamespace(
        scale=scale, window_left=window_left, window_right=window_right, kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices, q_num_blocks=q_num_blocks, q_indices=q_indices,
        sparse_block_size=sparse_block_size, key_padding_mask=key_padding_mask,
    )


def _reference(q, k, v, scale, window_left, window_right, kv_num_blocks, kv_indices, sparse_block_size, key_padding_mask):
    layout = None if kv_num_blocks is None else TableLayout(kv_num_blocks, kv_indices, sparse_block_size)
    return attention_reference(
        q, k, v, window_size=(window_left, window_right), block_mask=layout,
        key_padding_mask=key_padding_mask, scale=scale,
    )


@torch.library.custom_op("attnkernels::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    window_left: int,
    window_right: int,
    kv_num_blocks: Optional[Tensor],
    kv_indices: Optional[Tensor],
    q_num_blocks: Optional[Tensor],
    q_indices: Optional[Tensor],
    sparse_block_size: int,
    key_padding_mask: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    if q.shape[2] == 0 or k.shape[2] == 0:
        return _empty_outputs(q, v)
    name = backends.select(q.device)
    if name == "cpu":
        ops = backends.cpu_kernels()
        return ops.attention_fwd(
            q.contiguous(), k.contiguous(), v.contiguous(), scale, window_left, window_right,
            kv_num_blocks, kv_indices, sparse_block_size, key_padding_mask,
        )
    if name == "triton":
        from .softmax import triton_launch

        return triton_launch.forward(
            _call(scale, window_left, window_right, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
                  sparse_block_size, key_padding_mask), q, k, v
        )
    out, lse = _reference(q, k, v, scale, window_left, window_right, kv_num_blocks, kv_indices, sparse_block_size, key_padding_mask)
    return out.to(q.dtype), lse.to(lse_dtype(q.dtype))


@attention_fwd.register_fake
def _(q, k, v, scale, window_left, window_right, kv_num_blocks, kv_indices, q_num_blocks, q_indices, sparse_block_size, key_padding_mask):
    batch, q_heads, q_len, _ = q.shape
    out = q.new_empty(batch, q_heads, q_len, v.shape[-1])
    lse = q.new_empty(batch, q_heads, q_len, dtype=lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("attnkernels::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    window_left: int,
    window_right: int,
    kv_num_blocks: Optional[Tensor],
    kv_indices: Optional[Tensor],
    q_num_blocks: Optional[Tensor],
    q_indices: Optional[Tensor],
    sparse_block_size: int,
    key_padding_mask: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    if q.shape[2] == 0 or k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    name = backends.select(q.device)
    if name == "cpu":
        ops = backends.cpu_kernels()
        return ops.attention_bwd(
            dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous(),
            scale, window_left, window_right, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
            sparse_block_size, key_padding_mask,
        )
    if name == "triton":
        from .softmax import triton_launch

        return triton_launch.backward(
            _call(scale, window_left, window_right, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
                  sparse_block_size, key_padding_mask), dout, q, k, v, out, lse
        )
    layout = None if kv_num_blocks is None else TableLayout(kv_num_blocks, kv_indices, sparse_block_size)
    grads = attention_reference_backward(
        dout, q, k, v, window_size=(window_left, window_right), block_mask=layout,
        key_padding_mask=key_padding_mask, scale=scale,
    )
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, window_left, window_right, kv_num_blocks, kv_indices, q_num_blocks, q_indices, sparse_block_size, key_padding_mask):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_NON_TENSOR_ARGS = ("scale", "window_left", "window_right", "sparse_block_size")


def _setup_context(ctx, inputs, output):
    (q, k, v, scale, window_left, window_right, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
     sparse_block_size, key_padding_mask) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, key_padding_mask)
    ctx.scale, ctx.window_left, ctx.window_right, ctx.sparse_block_size = scale, window_left, window_right, sparse_block_size
    # The LSE output carries no gradient (as in FlashAttention): the public API
    # returns it detached, so a grad for it never reaches here.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = attention_bwd(
        grad_out, q, k, v, out, lse, ctx.scale, ctx.window_left, ctx.window_right,
        kv_num_blocks, kv_indices, q_num_blocks, q_indices, ctx.sparse_block_size, key_padding_mask,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)

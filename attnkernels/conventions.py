"""The rules every family, backend and test shares, written once.

* Who sees whom: causal and windows are bottom-right aligned (FlashAttention's rule):
  query i sees key j iff  i + Nk - Nq - left <= j <= i + Nk - Nq + right,
  `UNBOUNDED` (-1) meaning no limit on that side; causal is right = 0.
* Empty rows: a query row with no visible key gets output 0, LSE -inf and zero
  gradients; a call with Nq == 0 or Nk == 0 is all empty rows and runs no kernel.
* Scale: None means 1/sqrt(D); otherwise a finite float >= 0.

The float64 references, `nn.MultiheadAttention(need_weights=True)` and the tests read
these functions; the kernels implement the same rules in their own language (the
offset `diagonal_offset` is the `Nk - Nq` every kernel adds to a query index).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .op_call import accumulation_dtype

UNBOUNDED = -1


def diagonal_offset(q_len: int, kv_len: int) -> int:
    """Key index on query 0's diagonal: bottom-right alignment puts query i on key i + Nk - Nq."""
    return kv_len - q_len


def window_visibility(q_len: int, kv_len: int, window: tuple[int, int], device=None) -> Tensor:
    """Bool (Nq, Nk): query i sees key j iff i+Nk-Nq-left <= j <= i+Nk-Nq+right."""
    left, right = window
    rows = torch.arange(q_len, device=device)[:, None] + diagonal_offset(q_len, kv_len)  # [Nq, 1] diagonal key
    cols = torch.arange(kv_len, device=device)[None, :]  # [1, Nk]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if left != UNBOUNDED:
        visible &= cols >= rows - left
    if right != UNBOUNDED:
        visible &= cols <= rows + right
    return visible


def visibility_mask(
    q_len: int,
    kv_len: int,
    *,
    window: tuple[int, int] = (UNBOUNDED, UNBOUNDED),
    block_mask=None,
    key_padding_mask: Tensor | None = None,
    device=None,
) -> Tensor:
    """Bool mask broadcastable to (B, Hq, Nq, Nk): True where a query sees a key.

    The window (causal folded in as right = 0), a block layout (anything with
    `element_mask(q_len, kv_len)`: a BlockMask applies its own causal flag) and a
    key padding mask (B, Nk), True = ignore, as torch.
    """
    visible = window_visibility(q_len, kv_len, window, device)[None, None]  # [1, 1, Nq, Nk]
    if block_mask is not None:
        visible = visible & block_mask.element_mask(q_len, kv_len).to(device)  # [Bm, Hm, Nq, Nk]
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask.to(device)[:, None, None, :]  # [B, 1, 1, Nk]
    return visible


def is_empty_call(q_len: int, kv_len: int) -> bool:
    """No query or no key: every row is empty and no kernel runs."""
    return q_len == 0 or kv_len == 0


def empty_softmax_outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out 0 (B, Hq, Nq, Dv), lse -inf (B, Hq, Nq)) of a call whose every row is empty."""
    batch, q_heads, q_len, _ = q.shape
    out = q.new_zeros(batch, q_heads, q_len, v.shape[-1])
    lse = torch.full((batch, q_heads, q_len), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    return out, lse


def zero_grads(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Gradients of a call whose every row is empty: zeros shaped like the inputs."""
    return tuple(torch.zeros_like(t) for t in tensors)


def resolve_scale(scale, default: float) -> float:
    """`scale` as a float: None -> `default`; refuses anything but a finite float >= 0."""
    if scale is None:
        return default
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale: expected a finite, non-negative float (None = the default {default:g}), got {scale}")
    return scale


def default_softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def softmax_scale(scale, head_dim: int) -> float:
    """The softmax logit scale of a user's call: None -> 1/sqrt(D), else checked by resolve_scale."""
    return resolve_scale(scale, default_softmax_scale(head_dim))

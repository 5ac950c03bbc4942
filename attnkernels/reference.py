"""The oracle: softmax attention written the obvious way, in float64.

It materialises the (Nq, Nk) score matrix and the boolean visibility mask that
every kernel must reproduce: window/causal (bottom-right aligned), block-sparse
layout, key padding. Every kernel test compares against this file; no public
entry point uses it unless `attnkernels.backend("reference")` asks for it.
"""
from __future__ import annotations

import math

import torch

from .windows import UNBOUNDED, resolve_window


def window_visibility(q_len: int, kv_len: int, window: tuple[int, int], device=None) -> torch.Tensor:
    """Bool (Nq, Nk): query i sees key j iff i+Nk-Nq-left <= j <= i+Nk-Nq+right."""
    left, right = window
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)  # diagonal position of each query
    cols = torch.arange(kv_len, device=device)[None, :]
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
    key_padding_mask: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Bool mask broadcastable to (B, Hq, Nq, Nk): True where a query sees a key."""
    visible = window_visibility(q_len, kv_len, window, device)[None, None]
    if block_mask is not None:
        visible = visible & block_mask.element_mask(q_len, kv_len).to(device)
    if key_padding_mask is not None:  # (B, Nk), True = ignore (torch's convention)
        visible = visible & ~key_padding_mask.to(device)[:, None, None, :]
    return visible


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window_size=None,
    block_mask=None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, Hq, Nq, Dv), lse (B, Hq, Nq)) in float64 (or q's dtype when upcast=False).

    A query row that sees no key gets out 0 and lse -inf, and its gradients are
    zero, never NaN. `upcast=False` computes in the input dtype: the "same-dtype
    PyTorch computation" of FlashAttention's tolerance rule.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if block_mask is not None and getattr(block_mask, "causal", False):
        causal = True
    window = resolve_window(window_size, causal)
    compute_dtype = torch.float64 if upcast else q.dtype
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    group = q_heads // kv_heads
    k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)

    visible = visibility_mask(
        q_len, kv_len, window=window, block_mask=block_mask, key_padding_mask=key_padding_mask, device=q.device
    ).expand(batch, q_heads, q_len, kv_len)
    row_has_key = visible.any(dim=-1, keepdim=True)  # (B, Hq, Nq, 1)

    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    scores = scores.masked_fill(~visible, float("-inf"))
    # Rows with no visible key are replaced by zeros so that logsumexp and its
    # gradient stay finite; their probabilities are then zeroed explicitly.
    scores = torch.where(row_has_key, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse) * row_has_key
    out = torch.matmul(probs, v)
    lse = lse.masked_fill(~row_has_key, float("-inf")).squeeze(-1)
    return out, lse

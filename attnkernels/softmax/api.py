"""Public entry points for softmax attention: attention(), window_attention(), sparse_attention().

They build a `SoftmaxCall` (call.py: the inputs validated once, the options resolved
to the kernels' conventions — scale, a (left, right) window, block tables) and run
it through the `torch.ops.attnkernels.attention_fwd` custom op (ops.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .call import SoftmaxCall
from .varlen import varlen_attention


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window_size=None,
    block_mask=None,
    key_padding_mask: Tensor | None = None,
    return_lse: bool = False,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    attn_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
):
    """Softmax attention softmax(q kᵀ · scale) v, fused: no (Nq, Nk) matrix is ever stored.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hk, Nk, D); v: (B, Hk, Nk, Dv). Hq % Hk == 0
            (GQA/MQA: query head h reads kv head h // (Hq // Hk)).
        causal: bottom-right aligned causal mask (query i sees key j iff
            j <= i + Nk - Nq), as FlashAttention.
        scale: logit scale; None means 1/sqrt(D).
        window_size: None (no window), an int w = (w, w), or (left, right):
            query i sees keys i + Nk - Nq - left ... i + Nk - Nq + right; -1 is
            unbounded on that side. `causal=True` forces right = 0.
        block_mask: an `attnkernels.masks.BlockMask` block-sparse layout.
        key_padding_mask: bool (B, Nk), True = the key is ignored.
        return_lse: also return the natural-log logsumexp of each row,
            (B, Hq, Nq), float32 (float64 for float64 inputs), detached.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: a packed
            variable-length batch (FlashAttention's varlen layout, see varlen.py):
            q (total_q, Hq, D), k/v (total_k, Hk, D); sequence i is rows
            cu[i]:cu[i+1] and attends only to itself (causal and windows per
            sequence); out (total_q, Hq, Dv), lse (Hq, total_q).
        softcap: > 0 caps the scaled logits, s = softcap · tanh(s / softcap)
            (Gemma2); None or 0 = off.
        alibi_slopes: (Hq,) or (B, Hq): adds -slope · |i + Nk - Nq - j| to the
            logits (FlashAttention's ALiBi), computed in the kernel.
        sinks: (Hq,) learned per-head logits that join every row's softmax
            denominator (gpt-oss's s_aux); they get a gradient, and the LSE
            returned includes them.
        attn_bias: a float tensor broadcastable to (B, Hq, Nq, Nk) added to the
            logits (T5's relative bias, any float mask), with its gradient when it
            requires grad; a bool tensor is SDPA's attn_mask (True = attend).
        dropout_p: attention dropout on the probabilities (scaled by 1/(1-p)); the
            mask is a counter-based function of a seed drawn from `generator`
            (torch's default when None), regenerated in the backward (dropout.py).
            Pass 0 in evaluation: this function has no training flag.
        The modifiers apply in the order softcap, ALiBi, bias, mask (modifiers.py).

    A query row that sees no key gets output 0 (and LSE -inf), with zero gradients.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, lse) when return_lse.
    """
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("cu_seqlens_q, cu_seqlens_k: a packed batch needs both")
        for name, value in (("block_mask", block_mask), ("key_padding_mask", key_padding_mask),
                            ("attn_bias", attn_bias)):
            if value is not None:
                raise ValueError(f"{name}: not supported with a packed (cu_seqlens) batch; each sequence is its own "
                                 "batch row already")

        sequence_slopes = _per_sequence_slopes(alibi_slopes, cu_seqlens_q, q.shape[1])

        def attend(q_i, k_i, v_i, index):
            call = SoftmaxCall.build(q_i, k_i, v_i, causal=causal, scale=scale, window_size=window_size,
                                     softcap=softcap, alibi_slopes=sequence_slopes(index), sinks=sinks,
                                     dropout_p=dropout_p, generator=generator)
            return ops.run(call, q_i, k_i, v_i)

        out, lse = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attend)
    else:
        call = SoftmaxCall.build(q, k, v, causal=causal, scale=scale, window_size=window_size,
                                 block_mask=block_mask, key_padding_mask=key_padding_mask, softcap=softcap,
                                 alibi_slopes=alibi_slopes, sinks=sinks, attn_bias=attn_bias, dropout_p=dropout_p,
                                 generator=generator)
        out, lse = ops.run(call, q, k, v)
    return (out, lse.detach()) if return_lse else out


def _per_sequence_slopes(alibi_slopes, cu_seqlens_q, q_heads):
    """index -> sequence index's slopes (Hq,) of a packed batch's (Hq,) or (batch, Hq) alibi_slopes."""
    if alibi_slopes is None or not isinstance(alibi_slopes, Tensor) or alibi_slopes.dim() != 2:
        return lambda index: alibi_slopes
    batch = cu_seqlens_q.numel() - 1
    if tuple(alibi_slopes.shape) != (batch, q_heads):
        raise ValueError(f"alibi_slopes: expected (Hq,) = ({q_heads},) or (batch, Hq) = ({batch}, {q_heads}) for a "
                         f"packed batch, got {tuple(alibi_slopes.shape)}")
    return lambda index: alibi_slopes[index]


def window_attention(q: Tensor, k: Tensor, v: Tensor, window_size, *, causal: bool = False, scale: float | None = None, return_lse: bool = False):
    """Sliding-window attention: `attention(q, k, v, window_size=window_size, ...)`.

    Cost O(N·w·D): the kernels visit only the key blocks that intersect each
    query block's band. See README for converting other libraries' window sizes.
    """
    if window_size is None:
        raise TypeError("window_size: expected an int or a (left, right) pair, got None (use attention() for dense)")
    return attention(q, k, v, causal=causal, scale=scale, window_size=window_size, return_lse=return_lse)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, *, causal: bool = False, scale: float | None = None, return_lse: bool = False):
    """Block-sparse attention over the layout `block_mask` (BigBird, Longformer, any BlockMask)."""
    if block_mask is None:
        raise TypeError("block_mask: expected an attnkernels.masks.BlockMask, got None (use attention() for dense)")
    return attention(q, k, v, causal=causal, scale=scale, block_mask=block_mask, return_lse=return_lse)


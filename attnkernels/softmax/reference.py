"""The oracle: softmax attention written the obvious way, in float64.

It materialises the (Nq, Nk) score matrix and the boolean visibility mask that
every kernel must reproduce: window/causal (bottom-right aligned), block-sparse
layout, key padding. Every kernel test compares against this file; no public
entry point uses it unless `attnkernels.backend("reference")` asks for it.
"""
from __future__ import annotations

import torch

from ..conventions import default_softmax_scale, visibility_mask
from .windows import resolve_window


def _scores(q, k, v, causal, window_size, block_mask, key_padding_mask, scale):
    """(scores (B, Hq, Nq, Nk), row_has_key (B, Hq, Nq, 1), v per query head (B, Hq, Nk, Dv)).

    Scores are scale·q·kᵀ, -inf where a key is not visible; rows with no visible key
    hold zeros instead, so that logsumexp and its gradient stay finite (their
    probabilities are zeroed by the callers through row_has_key).
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = default_softmax_scale(head_dim) if scale is None else scale  # any float: the spec, unchecked
    if block_mask is not None and getattr(block_mask, "causal", False):
        causal = True
    group = q_heads // kv_heads
    k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    visible = visibility_mask(
        q_len, kv_len, window=resolve_window(window_size, causal), block_mask=block_mask,
        key_padding_mask=key_padding_mask, device=q.device,
    ).expand(batch, q_heads, q_len, kv_len)
    row_has_key = visible.any(dim=-1, keepdim=True)  # (B, Hq, Nq, 1)
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf"))
    scores = torch.where(row_has_key, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    return scores, row_has_key, v


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
    compute_dtype = torch.float64 if upcast else q.dtype
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    scores, row_has_key, v = _scores(q, k, v, causal, window_size, block_mask, key_padding_mask, scale)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse) * row_has_key
    out = torch.matmul(probs, v)
    lse = lse.masked_fill(~row_has_key, float("-inf")).squeeze(-1)
    return out, lse


class TableLayout:
    """A block layout given as kernel tables (kv_num_blocks, kv_indices), seen as a mask.

    Lets the reference run on exactly what the kernels receive. kv_num_blocks:
    int32 (Bm, Hm, nQb); kv_indices: int32 (Bm, Hm, nQb, nKb).
    """

    causal = False

    def __init__(self, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_size: int):
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.block_size = block_size

    def to_dense(self) -> torch.Tensor:
        """Bool (Bm, Hm, nQb, nKb)."""
        num_kv_blocks = self.kv_indices.shape[-1]
        listed = torch.arange(num_kv_blocks, device=self.kv_indices.device) < self.kv_num_blocks[..., None].long()
        # Padding entries are sent to an extra sink column that is dropped.
        target = torch.where(listed, self.kv_indices.long(), num_kv_blocks)
        dense = torch.zeros(*self.kv_indices.shape[:-1], num_kv_blocks + 1, dtype=torch.bool, device=target.device)
        dense.scatter_(-1, target, True)
        return dense[..., :num_kv_blocks]

    def element_mask(self, q_len: int, kv_len: int) -> torch.Tensor:
        """Bool (Bm, Hm, Nq, Nk)."""
        dense = self.to_dense()
        expanded = dense.repeat_interleave(self.block_size, dim=-2).repeat_interleave(self.block_size, dim=-1)
        return expanded[..., :q_len, :kv_len]


def attention_reference_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, window_size=None,
    block_mask=None, key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in float64, written out as the kernels compute them.

    P = softmax(S) on visible entries; dV = Pᵀ dO; dP = dO Vᵀ;
    delta = rowsum(dO ∘ O); dS = P ∘ (dP − delta); dQ = scale · dS K;
    dK = scale · dSᵀ Q; GQA sums dK/dV over each group's query heads.
    (Used by the "reference" backend, where autograd is not available inside
    a custom op; tests check it against autograd of attention_reference.)
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = default_softmax_scale(head_dim) if scale is None else scale  # any float: the spec, unchecked
    dout, q, k, v = (t.to(torch.float64) for t in (dout, q, k, v))
    scores, row_has_key, v_rep = _scores(q, k, v, causal, window_size, block_mask, key_padding_mask, scale)
    k_rep = k.repeat_interleave(group, dim=1)
    probs = torch.softmax(scores, dim=-1) * row_has_key  # (B, Hq, Nq, Nk)
    out = torch.matmul(probs, v_rep)
    dv = torch.matmul(probs.transpose(-1, -2), dout)
    dprobs = torch.matmul(dout, v_rep.transpose(-1, -2))
    delta = (dout * out).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta)
    dq = torch.matmul(dscores, k_rep) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), q) * scale
    fold = lambda t: t.view(batch, kv_heads, group, kv_len, t.shape[-1]).sum(2)  # noqa: E731
    return dq, fold(dk), fold(dv)

"""The oracle: softmax attention written the obvious way, in float64.

It materialises the (Nq, Nk) score matrix and the boolean visibility mask that
every kernel must reproduce: window/causal (bottom-right aligned), block-sparse
layout, key padding, and the score modifiers (modifiers.py). Every kernel test compares against this file; no public
entry point uses it unless `attnkernels.backend("reference")` asks for it.
"""
from __future__ import annotations

import torch

from ..conventions import default_softmax_scale, visibility_mask
from .dropout import keep_mask, keep_scale
from .modifiers import alibi_bias
from .windows import resolve_window


def _scores(q, k, v, causal, window_size, block_mask, key_padding_mask, scale, softcap=0.0, alibi_slopes=None,
            attn_bias=None):
    """(scores (B, Hq, Nq, Nk), row_has_key (B, Hq, Nq, 1), v per query head (B, Hq, Nk, Dv), capped).

    Scores are modifiers.py's logits: scale·q·kᵀ, softcapped, minus ALiBi, plus the
    bias, -inf where a key is not visible (or the bias is -inf); rows with no finite
    score hold zeros instead, so that logsumexp and its gradient stay finite (their
    probabilities are zeroed by the callers through row_has_key). `capped` is
    tanh(s / softcap) (None without softcap), for the backward's chain rule.
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
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    capped = None
    if softcap:
        capped = torch.tanh(scores / softcap)
        scores = softcap * capped
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes.to(scores.dtype), q_len, kv_len)
    if attn_bias is not None:
        scores = scores + attn_bias.to(scores.dtype)
    visible = visible & ~torch.isneginf(scores)  # a -inf bias hides the key; NaN stays and poisons the row
    row_has_key = visible.any(dim=-1, keepdim=True)  # (B, Hq, Nq, 1)
    scores = scores.masked_fill(~visible, float("-inf"))
    scores = torch.where(row_has_key, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    return scores, row_has_key, v, capped


def _dropout_scale(dropout_p, dropout_seed, scores):
    """(B, Hq, Nq, Nk) keep / (1 - t / 256) of dropout.py's mask (t its byte threshold), or
    None without dropout."""
    if not dropout_p:
        return None
    batch, heads, q_len, kv_len = scores.shape
    keep = keep_mask(dropout_seed, dropout_p, batch, heads, q_len, kv_len, device=scores.device)
    return keep.to(scores.dtype) * keep_scale(dropout_p)


def _row_lse(scores, row_has_key, sinks):
    """(B, Hq, Nq, 1) logsumexp of each row's visible scores and its head's sink; a row with no
    visible key gets the sink's logit (-inf without sinks) and its scores are never exponentiated
    against it (callers zero those probabilities through row_has_key)."""
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # finite: empty rows hold zeros
    empty = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
    if sinks is not None:
        sink = sinks.to(scores.dtype)[None, :, None, None]
        lse, empty = torch.logaddexp(lse, sink), sink
    return torch.where(row_has_key, lse, empty)


def _probs(scores, row_has_key, lse):
    """exp(S - lse) on rows that see a key, 0 on the others (their lse may be -inf)."""
    finite_lse = torch.where(row_has_key, lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
    return torch.exp(scores - finite_lse) * row_has_key


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
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, Hq, Nq, Dv), lse (B, Hq, Nq)) in float64 (or q's dtype when upcast=False).

    The modifiers are modifiers.py's (alibi_slopes (B, Hq), attn_bias broadcastable to
    (B, Hq, Nq, Nk), sinks (Hq,): differentiable through autograd here). A query row
    that sees no key gets out 0 and lse -inf (the sink's logit with sinks), and its
    gradients are zero, never NaN. `upcast=False` computes in the input dtype: the
    "same-dtype PyTorch computation" of FlashAttention's tolerance rule.
    """
    compute_dtype = torch.float64 if upcast else q.dtype
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    scores, row_has_key, v, _ = _scores(q, k, v, causal, window_size, block_mask, key_padding_mask, scale,
                                        softcap, alibi_slopes, attn_bias)
    lse = _row_lse(scores, row_has_key, sinks)
    probs = _probs(scores, row_has_key, lse)
    dropped = _dropout_scale(dropout_p, dropout_seed, scores)
    out = torch.matmul(probs if dropped is None else probs * dropped, v)
    return out, lse.squeeze(-1)


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
    block_mask=None, key_padding_mask: torch.Tensor | None = None, scale: float | None = None, softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None, dropout_p: float = 0.0, dropout_seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dsinks (Hq,) or None, dbias (B, Hq, Nq, Nk) or None) in float64, as the kernels compute them.

    P = softmax(S) on visible entries (and the sink); Z = keep / (1 - p) (1 without
    dropout); dV = (P∘Z)ᵀ dO; dP = Z ∘ dO Vᵀ; delta = rowsum(dO ∘ O);
    dS = P ∘ (dP − delta) is dbias; through the softcap, dS ·= 1 − tanh²;
    dQ = scale · dS K; dK = scale · dSᵀ Q; GQA sums dK/dV over each group's query heads;
    dsinks[h] = −Σ P_sink · delta. dbias is the full (B, Hq, Nq, Nk) gradient (reduce it
    to the bias's own shape with `sum_to_size`).
    (Used by the "reference" backend, where autograd is not available inside
    a custom op; tests check it against autograd of attention_reference.)
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = default_softmax_scale(head_dim) if scale is None else scale  # any float: the spec, unchecked
    dout, q, k, v = (t.to(torch.float64) for t in (dout, q, k, v))
    scores, row_has_key, v_rep, capped = _scores(q, k, v, causal, window_size, block_mask, key_padding_mask, scale,
                                                 softcap, alibi_slopes, attn_bias)
    k_rep = k.repeat_interleave(group, dim=1)
    lse = _row_lse(scores, row_has_key, sinks)
    probs = _probs(scores, row_has_key, lse)  # (B, Hq, Nq, Nk)
    dropped = _dropout_scale(dropout_p, dropout_seed, scores)
    probs_out = probs if dropped is None else probs * dropped
    out = torch.matmul(probs_out, v_rep)
    dv = torch.matmul(probs_out.transpose(-1, -2), dout)
    dprobs = torch.matmul(dout, v_rep.transpose(-1, -2))
    if dropped is not None:
        dprobs = dprobs * dropped
    delta = (dout * out).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta)
    dbias = dscores if attn_bias is not None else None
    dsinks = None
    if sinks is not None:
        sink_probs = torch.exp(sinks.to(torch.float64)[None, :, None, None] - lse)  # (B, Hq, Nq, 1)
        dsinks = -(sink_probs * delta).sum(dim=(0, 2, 3))
    if capped is not None:
        dscores = dscores * (1 - capped * capped)
    dq = torch.matmul(dscores, k_rep) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), q) * scale
    fold = lambda t: t.view(batch, kv_heads, group, kv_len, t.shape[-1]).sum(2)  # noqa: E731
    return dq, fold(dk), fold(dv), dsinks, dbias

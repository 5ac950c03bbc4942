"""Score modifiers of softmax attention: what each one means, and the checks of the user's values.

With s = scale · q·kᵀ (B, Hq, Nq, Nk), the logits a kernel softmaxes are, in this order:

    s = softcap · tanh(s / softcap)                 if softcap > 0   (Gemma2: cap the *scaled* logits)
    s = s - slope[b, h] · |i + Nk - Nq - j|         if alibi_slopes  (FlashAttention's ALiBi, in logit units)
    s = s + attn_bias[b, h, i, j]                   if attn_bias     (broadcast from any of B, Hq, Nq, Nk = 1)
    s = -inf where the key is not visible           (window / causal / block layout / key padding)

then P = softmax over the row's visible keys *and* the head's sink logit `sinks[h]` (gpt-oss's
s_aux: it joins the denominator and has no value row), so the returned LSE includes the sink;
and with dropout_p > 0, out = Σ_j P_j · keep_j / (1 - t/256) · v_j (dropout.py's mask and byte threshold t,
the rate dropout_p rounded to a multiple of 1/256).
The float64 reference (reference.py) applies exactly this; the kernels fuse it per tile.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..conventions import diagonal_offset
from .dropout import keep_threshold


def alibi_bias(slopes: Tensor, q_len: int, kv_len: int) -> Tensor:
    """(B or 1, Hq, Nq, Nk): -slope · |i + Nk - Nq - j| for slopes (B, Hq)."""
    rows = torch.arange(q_len, device=slopes.device, dtype=slopes.dtype)[:, None] + diagonal_offset(q_len, kv_len)
    cols = torch.arange(kv_len, device=slopes.device, dtype=slopes.dtype)[None, :]
    return -slopes[:, :, None, None] * (rows - cols).abs()


def check_softcap(softcap) -> float:
    """0 (off) or a finite float > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a float (0 = off), got {type(softcap).__name__}")
    softcap = float(softcap)
    if softcap == 0.0:
        return 0.0
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap: expected a finite float > 0 (0 or None = off), got {softcap}")
    return softcap


def _check_float_tensor(name: str, tensor, q: Tensor, expected: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a float torch.Tensor {expected}, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {tensor.dtype}")
    if tensor.device != q.device:
        raise ValueError(f"{name}: device {tensor.device} differs from q's {q.device}")


def check_alibi_slopes(slopes, q: Tensor) -> Tensor | None:
    """(Hq,) or (B, Hq) float -> contiguous float32 (B, Hq) (float64 for float64 inputs)."""
    if slopes is None:
        return None
    batch, q_heads = q.shape[:2]
    _check_float_tensor("alibi_slopes", slopes, q, "(Hq,) or (B, Hq)")
    if tuple(slopes.shape) not in ((q_heads,), (batch, q_heads)):
        raise ValueError(f"alibi_slopes: expected shape (Hq,) = ({q_heads},) or (B, Hq) = ({batch}, {q_heads}), "
                         f"got {tuple(slopes.shape)}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return slopes.detach().to(dtype).expand(batch, q_heads).contiguous()


def check_sinks(sinks, q: Tensor) -> Tensor | None:
    """(Hq,) float, one learned logit per query head; keeps its autograd history (it gets a gradient)."""
    if sinks is None:
        return None
    _check_float_tensor("sinks", sinks, q, "(Hq,)")
    if tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks: expected shape (Hq,) = ({q.shape[1]},), one logit per query head, "
                         f"got {tuple(sinks.shape)}")
    return sinks


def check_attn_bias(bias, q: Tensor, k: Tensor) -> Tensor | None:
    """A float bias broadcastable to (B, Hq, Nq, Nk) -> a 4-D view (sizes 1 where it broadcasts), its
    autograd history kept. A bool mask is SDPA's attn_mask (True = attend) and becomes 0 / -inf."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"attn_bias: expected a float or bool torch.Tensor broadcastable to (B, Hq, Nq, Nk), "
                        f"got {type(bias).__name__}")
    if bias.device != q.device:
        raise ValueError(f"attn_bias: device {bias.device} differs from q's {q.device}")
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
    elif not bias.is_floating_point():
        raise TypeError(f"attn_bias: expected a floating dtype (or bool, SDPA's attn_mask), got {bias.dtype}")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if bias.dim() > 4:
        raise ValueError(f"attn_bias: expected at most 4 dims, broadcastable to (B, Hq, Nq, Nk) = {full}, "
                         f"got shape {tuple(bias.shape)}")
    view = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    for name, size, want in zip(("B", "Hq", "Nq", "Nk"), view.shape, full):
        if size not in (1, want):
            raise ValueError(f"attn_bias: shape {tuple(bias.shape)} does not broadcast to (B, Hq, Nq, Nk) = {full}: "
                             f"dim {name} is {size}, expected 1 or {want}")
    return view


def check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    keep_threshold(dropout_p)  # [0, 1), and p > 0 must not round to no dropout (ValueError naming dropout_p)
    return dropout_p

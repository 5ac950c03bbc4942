"""Linformer (Wang et al. 2020) for `MultiheadAttention(attention="linformer")`.

Learned sequence projections E, F (k, max_seq_len), shared by all heads (F = E when
`share_kv`), compress keys and values to k slots: K' = E[:, :Nk] K, V' = F[:, :Nk] V,
then the dense softmax kernel runs on the k slots. Non-causal by construction (a
projection mixes every position). The parameters live on the module as
`linformer_E` / `linformer_F`, so its state dict keeps those names.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from ..softmax.api import attention

DEFAULTS = {"linformer_k": 256, "max_seq_len": None, "share_kv": False}


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def check_options(causal: bool, linformer_k, max_seq_len, share_kv) -> tuple[int, int, bool]:
    """The constructor's options, checked: (linformer_k, max_seq_len, share_kv)."""
    if causal:
        raise ValueError("causal: attention='linformer' is non-causal (its projection mixes all positions); use causal=False")
    if max_seq_len is None:
        raise ValueError("max_seq_len: attention='linformer' needs max_seq_len, the longest key sequence (E, F are (k, max_seq_len))")
    if not isinstance(share_kv, bool):
        raise TypeError(f"share_kv: expected a bool, got {share_kv!r}")
    return _positive_int("linformer_k", linformer_k), _positive_int("max_seq_len", max_seq_len), share_kv


def check_unused(attention_name: str, **options) -> None:
    """Linformer's options given to another family are an error, not silently ignored."""
    for name, value in options.items():
        if value != DEFAULTS[name]:
            raise ValueError(f"{name}: only used with attention='linformer', got attention={attention_name!r}")


def make_projections(linformer_k: int, max_seq_len: int, share_kv: bool, **factory) -> tuple[nn.Parameter, nn.Parameter | None]:
    """(E, F) parameters (k, max_seq_len), uninitialised; F is None when shared."""
    proj_e = nn.Parameter(torch.empty(linformer_k, max_seq_len, **factory))
    proj_f = None if share_kv else nn.Parameter(torch.empty(linformer_k, max_seq_len, **factory))
    return proj_e, proj_f


def reset_projections(proj_e: Tensor, proj_f: Tensor | None) -> None:
    """Linformer's initialisation: normal, std 1/sqrt(k)."""
    for proj in (proj_e, proj_f):
        if proj is not None:
            nn.init.normal_(proj, std=1.0 / math.sqrt(proj.shape[0]))


def check_call(causal: bool, kv_len: int, max_seq_len: int) -> None:
    if causal:
        raise ValueError("causal: attention='linformer' is non-causal; pass is_causal=False and no causal attn_mask")
    if kv_len > max_seq_len:
        raise ValueError(f"max_seq_len: the key sequence has Nk={kv_len} > max_seq_len={max_seq_len} "
                         "(E, F were built for at most max_seq_len positions)")


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, proj_e: Tensor, proj_f: Tensor | None,
                        key_padding_mask: Tensor | None) -> Tensor:
    """q (B, Hq, Nq, Dh), k/v (B, Hk, Nk, Dh) -> (B, Hq, Nq, Dh) over the k projected slots.

    Padded keys/values are zeroed before the projection, so they add nothing to K' and V'.
    """
    kv_len = k.shape[2]
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, :, None]  # (B, 1, Nk, 1)
        k, v = torch.where(keep, k, torch.zeros_like(k)), torch.where(keep, v, torch.zeros_like(v))
    proj_e = proj_e[:, :kv_len]
    proj_f = proj_e if proj_f is None else proj_f[:, :kv_len]
    k = torch.matmul(proj_e, k)  # (k, Nk) @ (B, Hk, Nk, Dh) -> (B, Hk, k, Dh)
    v = torch.matmul(proj_f, v)
    return attention(q, k, v)

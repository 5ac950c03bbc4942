"""Validation of the user's arguments, shared by the families' call builders (softmax/call.py,
linear/call.py): the one place user-facing checks live.

Every check raises before any kernel runs, with a message that names the
argument and says what was expected (README's bad-input table lists them).
"""
from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def check_tensor(name: str, tensor, ndim: int = 4, layout: str = "(B, H, N, D)") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {tensor.dtype}"
        )


def check_same_dtype_and_device(**tensors) -> None:
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.dtype != first.dtype:
            raise TypeError(f"{name}: dtype {tensor.dtype} differs from {first_name}'s {first.dtype}; pass one dtype")
        if tensor.device != first.device:
            raise ValueError(f"{name}: device {tensor.device} differs from {first_name}'s {first.device}")


def check_qkv(q, k, v) -> None:
    """Shapes (README, Conventions): q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv)."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, tensor)
    check_same_dtype_and_device(q=q, k=k, v=v)
    (batch, q_heads, _, head_dim), (k_batch, kv_heads, kv_len, k_dim) = q.shape, k.shape
    if k_batch != batch or v.shape[0] != batch:
        raise ValueError(f"k, v: batch size must match q's {batch}; got k {k_batch}, v {v.shape[0]}")
    if k_dim != head_dim:
        raise ValueError(f"k: head dim {k_dim} must equal q's head dim {head_dim}")
    if v.shape[1] != kv_heads or v.shape[2] != kv_len:
        raise ValueError(
            f"v: expected (B, Hk, Nk, Dv) with Hk={kv_heads}, Nk={kv_len} like k; got {tuple(v.shape)}"
        )
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"q, k: the number of query heads ({q_heads}) must be a multiple of the number of key/value heads "
            f"({kv_heads}) (GQA/MQA)"
        )
    for name, dim in (("q/k head dim D", head_dim), ("v head dim Dv", v.shape[-1])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name}: expected 1 <= D <= {MAX_HEAD_DIM}, got {dim}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def check_key_padding_mask(key_padding_mask, q, k) -> None:
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask: expected a bool torch.Tensor (B, Nk), got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = ignore the key), got {key_padding_mask.dtype}")
    expected = (k.shape[0], k.shape[2])
    if tuple(key_padding_mask.shape) != expected:
        raise ValueError(f"key_padding_mask: expected shape (B, Nk) = {expected}, got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask: device {key_padding_mask.device} differs from q's {q.device}")

"""SoftmaxCall: everything a softmax-attention kernel needs besides q, k, v.

Built once by the public API (`SoftmaxCall.build`, which validates the user's
arguments), then the only thing that travels: its fields, in order, are the
arguments of `torch.ops.attnkernels.attention_fwd/bwd` after the data tensors
(see ops.py), and every backend's launcher takes it whole.

Fields (shapes for q (B, Hq, Nq, D), k (B, Hk, Nk, D)):
- scale: the logit scale, resolved (None -> 1/sqrt(D) happened in build).
- window_left, window_right: the bottom-right aligned band, -1 unbounded;
  causal arrives as window_right = 0 (conventions.py).
- kv_num_blocks (Bm, Hm, nQb), kv_indices (Bm, Hm, nQb, nKb), q_num_blocks
  (Bm, Hm, nKb), q_indices (Bm, Hm, nKb, nQb): int32 block tables of a BlockMask
  (masks.py) or None; sparse_block_size their block size (0 without tables).
- key_padding_mask: bool (B, Nk), True = key ignored, or None.
- softcap (0 = off), alibi_slopes float32 (B, Hq) or None, sinks (Hq,) or None,
  attn_bias a 4-D view broadcastable to (B, Hq, Nq, Nk) or None, dropout_p and
  dropout_seed (int64 0-d tensor, None when dropout_p == 0): the score modifiers,
  defined in modifiers.py and dropout.py. `sinks` and `attn_bias` receive gradients
  (GRAD_FIELDS); sinks are applied by the ops (ops.py) around any backend, so the
  kernels never read that field.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from ..conventions import UNBOUNDED, softmax_scale
from ..op_call import OpCall
from . import modifiers
from .dropout import draw_seed
from .masks import BlockMask
from .windows import resolve_window

# The score modifiers a kernel must implement to run a call that uses them (call.features()).
FEATURES = ("softcap", "alibi", "attn_bias", "dropout")


@dataclasses.dataclass(frozen=True)
class SoftmaxCall(OpCall):
    scale: float
    window_left: int = UNBOUNDED
    window_right: int = UNBOUNDED
    kv_num_blocks: Optional[Tensor] = None
    kv_indices: Optional[Tensor] = None
    q_num_blocks: Optional[Tensor] = None
    q_indices: Optional[Tensor] = None
    sparse_block_size: int = 0
    key_padding_mask: Optional[Tensor] = None
    softcap: float = 0.0
    alibi_slopes: Optional[Tensor] = None
    sinks: Optional[Tensor] = None
    attn_bias: Optional[Tensor] = None
    dropout_p: float = 0.0
    dropout_seed: Optional[Tensor] = None

    GRAD_FIELDS = ("sinks", "attn_bias")

    @classmethod
    def build(cls, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None,
              window_size=None, block_mask=None, key_padding_mask: Tensor | None = None,
              softcap: float | None = None, alibi_slopes: Tensor | None = None, sinks: Tensor | None = None,
              attn_bias: Tensor | None = None, dropout_p: float = 0.0,
              generator: torch.Generator | None = None) -> "SoftmaxCall":
        """The user's arguments checked (errors name the argument) and resolved to kernel form."""
        _checks.check_qkv(q, k, v)
        scale = softmax_scale(scale, q.shape[-1])
        _checks.check_bool("causal", causal)
        _checks.check_key_padding_mask(key_padding_mask, q, k)
        tables = {}
        if block_mask is not None:
            if not isinstance(block_mask, BlockMask):
                raise TypeError(f"block_mask: expected an attnkernels.masks.BlockMask, got {type(block_mask).__name__}")
            block_mask.check_compatible(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            if block_mask.kv_indices.device != q.device:
                block_mask = block_mask.to(q.device)
            causal = causal or block_mask.causal
            tables = dict(
                kv_num_blocks=block_mask.kv_num_blocks, kv_indices=block_mask.kv_indices,
                q_num_blocks=block_mask.q_num_blocks, q_indices=block_mask.q_indices,
                sparse_block_size=block_mask.block_size,
            )
        window_left, window_right = resolve_window(window_size, causal)
        dropout_p = modifiers.check_dropout_p(dropout_p)
        return cls(
            scale, window_left, window_right, key_padding_mask=key_padding_mask, **tables,
            softcap=modifiers.check_softcap(softcap),
            alibi_slopes=modifiers.check_alibi_slopes(alibi_slopes, q),
            sinks=modifiers.check_sinks(sinks, q),
            attn_bias=modifiers.check_attn_bias(attn_bias, q, k),
            dropout_p=dropout_p,
            dropout_seed=draw_seed(generator, q.device) if dropout_p > 0 else None,
        )

    def features(self) -> frozenset[str]:
        """The score modifiers this call uses that a kernel must implement (FEATURES)."""
        used = dict(softcap=self.softcap > 0, alibi=self.alibi_slopes is not None,
                    attn_bias=self.attn_bias is not None, dropout=self.dropout_p > 0)
        return frozenset(name for name, on in used.items() if on)

    def seed(self) -> int:
        """The dropout seed as a Python int (0 without dropout)."""
        return 0 if self.dropout_seed is None else int(self.dropout_seed.item())

    @property
    def window(self) -> tuple[int, int]:
        return self.window_left, self.window_right

    @property
    def is_sparse(self) -> bool:
        return self.kv_num_blocks is not None

    def layout(self):
        """The block tables as a mask object for the reference (`TableLayout`), or None."""
        if not self.is_sparse:
            return None
        from .reference import TableLayout

        return TableLayout(self.kv_num_blocks, self.kv_indices, self.sparse_block_size)

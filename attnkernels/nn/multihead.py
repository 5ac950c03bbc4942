"""`MultiheadAttention`: a drop-in for `torch.nn.MultiheadAttention` on the fused kernels.

Parameters have torch's names and shapes (`in_proj_weight` (3E, E),
`in_proj_bias` (3E,), `out_proj`), so a `torch.nn.MultiheadAttention` state dict
loads unchanged when `num_kv_heads == num_heads`. With GQA
(`num_kv_heads < num_heads`) the packed projection is
((Hq + 2·Hk)·Dh, E): rows [q | k | v], and the kernels read the kv heads
natively (no repeat).

Conventions, chosen once (see the README section "Drop-in modules"):
- `key_padding_mask` is bool (B, Nk), True = the key is ignored (torch's rule);
  a float mask holding only 0 / -inf is accepted and converted.
- Attention-probability dropout (`dropout=`) runs in training for the softmax
  families (the kernels' counter-based dropout, torch's default generator);
  the linear/Performer/Linformer families have none and refuse it in training.
- `attn_mask` is torch's: bool (True = blocked) or float (added to the logits),
  (Nq, Nk) or (B·Hq, Nq, Nk). The plain causal mask runs as the causal flag;
  any other runs through the kernels' additive-bias path (softmax families).
- `need_weights=True` returns the attention weights computed by a separate
  reference path (softmax families only): slow, it materialises (Nq, Nk) per
  head. The default stays `need_weights=False` (torch's is True) so that a
  plain call never pays for it.
- `causal` is bottom-right aligned (FlashAttention's rule); for self-attention
  (Nq == Nk) that is the same as torch's top-left `is_causal`.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conventions import visibility_mask
from ..softmax import masks as _masks
from ..softmax.api import attention as _attention
from ..softmax.windows import resolve_window
from . import linformer

ATTENTION_FAMILIES = ("dense", "window", "bigbird", "block_sparse", "linear", "performer", "linformer")
_LINEAR_FAMILIES = ("linear", "performer")
_NO_WEIGHTS_FAMILIES = ("linear", "performer", "linformer")
_FEATURE_MAPS = ("elu", "relu", "identity")


def _linear_api():
    """(linear_attention, PerformerFeatures) from attnkernels, or a clear error when not built in."""
    import attnkernels

    fn = getattr(attnkernels, "linear_attention", None)
    if fn is None:
        raise NotImplementedError(
            "attention='linear'/'performer' needs attnkernels.linear_attention, which this build of "
            "attnkernels does not provide"
        )
    return fn, getattr(attnkernels, "PerformerFeatures", None)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


class MultiheadAttention(nn.Module):
    """Multi-head attention whose core runs on attnkernels' fused kernels.

    Args:
        embed_dim: model width E; must be divisible by `num_heads`.
        num_heads: query heads Hq. Head dim Dh = E // Hq.
        num_kv_heads: key/value heads Hk (GQA/MQA); None means Hq. Hq % Hk == 0.
        attention: "dense", "window" (needs `window_size`), "bigbird"
            (block-sparse; needs Nq == Nk), "linear" (feature map
            `feature_map`) or "performer" (FAVOR+ with `num_features` features).
        causal: default causal setting for `forward` (overridden by `is_causal`).
        window_size: for "window": int w = (w, w) or (left, right), -1 unbounded.
        block_size, num_global_blocks, num_window_blocks, num_random_blocks:
            BigBird layout (see `attnkernels.masks.bigbird`). The layout is drawn
            once per sequence length and cached; `redraw()` draws new ones.
        block_mask: for "block_sparse": the user's `attnkernels.masks.BlockMask`
            layout (not saved in the state dict); `forward(..., block_mask=)`
            overrides it per call. One of the two is required.
        seed: makes BigBird layouts (and Performer features) reproducible.
        feature_map: for "linear": "elu" (elu+1), "relu" or "identity".
        num_features: for "performer": random features M.
        linformer_k, max_seq_len, share_kv: for "linformer" (non-causal):
            keys and values are projected along the sequence by learned
            E, F (linformer_k, max_seq_len) (shared by all heads; F = E when
            `share_kv`), then the dense kernel runs on the k projected slots.
            `max_seq_len` is required; longer inputs raise.
        kdim, vdim: widths of key / value inputs (None = embed_dim). When either
            differs from embed_dim the q/k/v projections are separate
            parameters `q_proj_weight` (E, E), `k_proj_weight` (Hk·Dh, kdim),
            `v_proj_weight` (Hk·Dh, vdim) and `in_proj_weight` is None, as in torch.
        bias: biases on the input and output projections.
        dropout: attention-probability dropout in training mode (softmax
            families; the others raise NotImplementedError in training).
        batch_first: (B, N, E) inputs when True (the default here; torch's
            default is False), else (N, B, E).
        process_group: context parallelism (attnkernels.distributed): each rank
            passes its shard of the sequence (self-attention, equal shard lengths)
            and gets its shard of the output; "dense" runs ring attention,
            "window" the halo exchange (ring when a side is unbounded). None = off.
        context_parallel_layout: "contiguous" (rank r holds positions [rL, (r+1)L))
            or "zigzag" (balanced causal; see attnkernels.distributed.zigzag_shard).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        attention: str = "dense",
        causal: bool = False,
        window_size=None,
        block_size: int = 64,
        num_global_blocks: int = 1,
        num_window_blocks: int = 3,
        num_random_blocks: int = 3,
        block_mask: "_masks.BlockMask | None" = None,
        feature_map: str = "elu",
        num_features: int = 256,
        linformer_k: int = 256,
        max_seq_len: int | None = None,
        share_kv: bool = False,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        batch_first: bool = True,
        seed: int | None = None,
        process_group=None,
        context_parallel_layout: str = "contiguous",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        embed_dim = _check_positive_int("embed_dim", embed_dim)
        num_heads = _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim: {embed_dim} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else _check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if attention not in ATTENTION_FAMILIES:
            raise ValueError(f"attention: expected one of {ATTENTION_FAMILIES}, got {attention!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {causal!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")

        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.attention, self.causal, self.batch_first = attention, causal, bool(batch_first)
        self.dropout = float(dropout)
        self.seed = seed
        factory = {"device": device, "dtype": dtype}

        # Packed [q | k | v] projection, torch's parameter names (separate q/k/v weights when kdim/vdim differ).
        self.kdim = embed_dim if kdim is None else _check_positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else _check_positive_int("vdim", vdim)
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        kv_dim = num_kv_heads * self.head_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, embed_dim, **factory))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

        # Family options, validated now so a bad config fails at construction.
        self.window_size = None
        if attention == "window":
            if window_size is None:
                raise ValueError("window_size: attention='window' needs an int or a (left, right) pair")
            resolve_window(window_size, causal)  # raises naming window_size
            self.window_size = window_size
        elif window_size is not None:
            raise ValueError(f"window_size: only used with attention='window', got attention={attention!r}")

        self.bigbird_options = None
        self._block_masks: dict = {}  # (seq_len, device) -> BlockMask; not saved in the state dict
        self._draws = 0
        if attention == "bigbird":
            self.bigbird_options = {
                "block_size": _check_positive_int("block_size", block_size),
                "num_global_blocks": num_global_blocks,
                "num_window_blocks": num_window_blocks,
                "num_random_blocks": num_random_blocks,
            }
            _masks.bigbird(block_size, **self.bigbird_options, num_heads=1, seed=0)  # validates the options

        if block_mask is not None:
            if attention != "block_sparse":
                raise ValueError(f"block_mask: only used with attention='block_sparse', got attention={attention!r}")
            _check_block_mask_type(block_mask)
        self.user_block_mask = block_mask  # for "block_sparse"; a plain attribute, not in the state dict

        self.feature_map = None
        if attention == "linear":
            if feature_map not in _FEATURE_MAPS:
                raise ValueError(f"feature_map: expected one of {_FEATURE_MAPS}, got {feature_map!r}")
            _linear_api()
            self.feature_map = feature_map
        elif attention == "performer":
            _, performer_features = _linear_api()
            if performer_features is None:
                raise NotImplementedError("attention='performer' needs attnkernels.PerformerFeatures, which this build lacks")
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            # A submodule when it is an nn.Module, so its random projection is saved and moved with .to().
            self.feature_map = performer_features(
                self.head_dim, _check_positive_int("num_features", num_features), orthogonal=True, generator=generator
            )

        self.linformer_k = self.max_seq_len = None
        self.share_kv = False
        if attention == "linformer":
            self.linformer_k, self.max_seq_len, self.share_kv = linformer.check_options(
                causal, linformer_k, max_seq_len, share_kv)
            self.linformer_E, linformer_F = linformer.make_projections(
                self.linformer_k, self.max_seq_len, self.share_kv, **factory)
            if linformer_F is None:
                self.register_parameter("linformer_F", None)
            else:
                self.linformer_F = linformer_F
        else:
            linformer.check_unused(attention, linformer_k=linformer_k, max_seq_len=max_seq_len, share_kv=share_kv)
        self.process_group = process_group
        self.context_parallel_layout = context_parallel_layout
        if process_group is not None or context_parallel_layout != "contiguous":
            from ..distributed.ring import LAYOUTS

            if attention not in ("dense", "window"):
                raise ValueError(f"process_group: context parallelism supports attention='dense' and 'window', "
                                 f"got attention={attention!r}")
            if context_parallel_layout not in LAYOUTS:
                raise ValueError(f"context_parallel_layout: expected one of {LAYOUTS}, got {context_parallel_layout!r}")
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.attention == "linformer":
            linformer.reset_projections(self.linformer_E, self.linformer_F)

    def extra_repr(self) -> str:
        extra = {"window": f", window_size={self.window_size}", "bigbird": f", {self.bigbird_options}",
                 "linear": f", feature_map={self.feature_map!r}",
                 "linformer": f", linformer_k={self.linformer_k}, max_seq_len={self.max_seq_len}, share_kv={self.share_kv}",
                 }.get(self.attention, "")
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"attention={self.attention!r}, causal={self.causal}{extra}, batch_first={self.batch_first}"
                + ("" if self._qkv_same_embed_dim else f", kdim={self.kdim}, vdim={self.vdim}"))

    # ---- BigBird layouts ------------------------------------------------------------------------
    def block_mask(self, seq_len: int, device=None) -> "_masks.BlockMask":
        """The BigBird layout used for sequences of `seq_len` (drawn on first use, then cached)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (seq_len, self.causal, device)
        mask = self._block_masks.get(key)
        if mask is None:
            # Seeded per (seed, length, draw): reproducible, independent across lengths; never the global RNG.
            seed = None if self.seed is None else hash((self.seed, seq_len, self._draws)) & 0x7FFF_FFFF_FFFF_FFFF
            mask = _masks.bigbird(seq_len, **self.bigbird_options, num_heads=self.num_heads, seed=seed, causal=self.causal)
            mask = mask.to(device)
            self._block_masks[key] = mask
        return mask

    def redraw(self, generator: torch.Generator | None = None) -> "MultiheadAttention":
        """New random BigBird blocks (cached layouts are dropped) or new Performer features."""
        if self.attention == "bigbird":
            self._block_masks.clear()
            self._draws += 1
        elif self.attention == "performer":
            self.feature_map.redraw(generator=generator)
        else:
            raise TypeError(f"redraw: attention={self.attention!r} has nothing random to redraw (bigbird, performer do)")
        return self

    # ---- forward --------------------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool | None = None,
        block_mask: "_masks.BlockMask | None" = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Returns `(out, None)`, or `(out, weights)` with `need_weights=True`.

        query (B, Nq, E) (or (Nq, B, E) when not batch_first, or unbatched
        (Nq, E)); key/value likewise with Nk; key defaults to query (self-
        attention), value to key. key_padding_mask: bool (B, Nk), True = ignore.
        is_causal: None uses the constructor's `causal`. attn_mask: torch's
        (Nq, Nk) or (B·num_heads, Nq, Nk), bool True = blocked or float added to
        the logits (softmax families); the plain causal mask runs as `causal`.
        need_weights: also return the attention weights, computed by a plain
            torch reference path (slow: materialises (B, Hq, Nq, Nk)); softmax
            families only. Shape (B, Nq, Nk) averaged over heads when
            `average_attn_weights`, else (B, Hq, Nq, Nk); unbatched input drops
            B. A query row that sees no key gets weights 0 (torch gives NaN).
        block_mask: for attention="block_sparse", a `BlockMask` for this call
            (overrides the constructor's).
        """
        if not isinstance(need_weights, bool):
            raise TypeError(f"need_weights: expected a bool, got {need_weights!r}")
        if not isinstance(average_attn_weights, bool):
            raise TypeError(f"average_attn_weights: expected a bool, got {average_attn_weights!r}")
        if block_mask is not None:
            if self.attention != "block_sparse":
                raise ValueError(f"block_mask: only used with attention='block_sparse', this module has attention={self.attention!r}")
            _check_block_mask_type(block_mask)
        elif self.attention == "block_sparse":
            block_mask = self.user_block_mask
            if block_mask is None:
                raise ValueError(
                    "block_mask: attention='block_sparse' needs an attnkernels.masks.BlockMask, given at construction "
                    "(MultiheadAttention(..., block_mask=)) or per call (forward(..., block_mask=))"
                )
        if need_weights and self.attention in _NO_WEIGHTS_FAMILIES:
            raise ValueError(
                f"need_weights: attention={self.attention!r} never forms softmax attention weights over the keys; "
                "pass need_weights=False (weights are available for the dense, window, bigbird and block_sparse families)"
            )
        dropout_p = self.dropout if self.training else 0.0
        if dropout_p > 0.0 and (self.attention in _NO_WEIGHTS_FAMILIES or self.process_group is not None):
            raise NotImplementedError(
                f"dropout: attention dropout ({self.dropout}) is implemented by the softmax families' kernels only "
                f"(this module: attention={self.attention!r}"
                f"{', context parallel' if self.process_group is not None else ''}); "
                "construct with dropout=0.0 or call .eval()"
            )
        key = query if key is None else key
        value = key if value is None else value
        self_attention = key is query and value is query and self._qkv_same_embed_dim

        unbatched = query.dim() == 2
        query, key, value = (self._to_batch_first(name, t, unbatched, width) for name, t, width in
                             (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)))
        batch, q_len, kv_len = query.shape[0], query.shape[1], key.shape[1]
        if key.shape[0] != batch or value.shape[0] != batch:
            raise ValueError(f"key/value: batch size must match query's {batch}; got {key.shape[0]} and {value.shape[0]}")
        if value.shape[1] != kv_len:
            raise ValueError(f"value: sequence length {value.shape[1]} must equal key's {kv_len}")
        if unbatched and key_padding_mask is not None and key_padding_mask.dim() == 1:
            key_padding_mask = key_padding_mask[None]
        key_padding_mask = self._check_key_padding_mask(key_padding_mask, batch, kv_len, query.device)

        causal = self.causal if is_causal is None else is_causal
        if not isinstance(causal, bool):
            raise TypeError(f"is_causal: expected a bool or None, got {is_causal!r}")
        attn_bias = None
        if attn_mask is not None:
            if self._is_causal_mask(attn_mask, q_len, kv_len):
                causal = True
            else:
                attn_bias = self._attn_mask_as_bias(attn_mask, batch, q_len, kv_len, query)

        if self.attention == "linformer":
            linformer.check_call(causal, kv_len, self.max_seq_len)

        q, k, v = self._project(query, key, value, self_attention)  # (B, H, N, Dh) each
        weights = None
        if attn_bias is not None and self.attention in _NO_WEIGHTS_FAMILIES:
            raise ValueError(f"attn_mask: attention={self.attention!r} takes no mask but the causal one "
                             "(use key_padding_mask=, or a softmax family)")
        if self.attention in _LINEAR_FAMILIES:
            out = self._linear_core(q, k, v, causal, key_padding_mask)
        elif self.attention == "linformer":
            out = linformer.linformer_attention(q, k, v, self.linformer_E, self.linformer_F, key_padding_mask)
        else:
            if self.attention == "block_sparse" and block_mask.device != q.device:
                block_mask = block_mask.to(q.device)
            elif self.attention == "bigbird":
                if q_len != kv_len:
                    raise ValueError(f"key: attention='bigbird' needs Nq == Nk (self-attention), got Nq={q_len}, Nk={kv_len}")
                block_mask = self.block_mask(q_len, q.device)
            if self.process_group is not None:
                if attn_bias is not None:
                    raise ValueError("attn_mask: only the causal mask is supported with process_group")
                out = self._context_parallel_core(q, k, v, causal, key_padding_mask, need_weights, self_attention)
            else:
                out = _attention(
                    q, k, v, causal=causal, window_size=self.window_size, block_mask=block_mask,
                    key_padding_mask=key_padding_mask, attn_bias=attn_bias, dropout_p=dropout_p,
                )  # (B, Hq, Nq, Dh)
            if need_weights:  # (B, Hq, Nq, Nk), before dropout (torch returns them after)
                weights = self._reference_weights(q, k, causal, block_mask, key_padding_mask, attn_bias)
                if average_attn_weights:
                    weights = weights.mean(dim=1)
                if unbatched:
                    weights = weights[0]
        out = out.transpose(1, 2).reshape(batch, q_len, self.embed_dim)  # (B, Nq, E)
        out = self.out_proj(out)
        if unbatched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _reference_weights(self, q: Tensor, k: Tensor, causal: bool, block_mask, key_padding_mask,
                           attn_bias: Tensor | None = None) -> Tensor:
        """softmax(q kᵀ / √Dh + bias) over the keys each query sees, in plain torch: (B, Hq, Nq, Nk). Slow."""
        q_len, kv_len = q.shape[2], k.shape[2]
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)  # GQA
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, Hq, Nq, Nk)
        window = resolve_window(self.window_size, causal)
        visible = visibility_mask(q_len, kv_len, window=window, block_mask=block_mask,
                                  key_padding_mask=key_padding_mask, device=q.device)  # (B|1, Hq|1, Nq, Nk)
        if attn_bias is not None:
            scores = scores + attn_bias
            visible = visible & ~torch.isneginf(scores)
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.where(visible.any(dim=-1, keepdim=True), weights, torch.zeros_like(weights))  # empty rows: 0

    def _to_batch_first(self, name: str, x, unbatched: bool, width: int) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != (2 if unbatched else 3):
            layout = "(N, E) like query" if unbatched else ("(B, N, E)" if self.batch_first else "(N, B, E)")
            raise ValueError(f"{name}: expected a {2 if unbatched else 3}-D tensor {layout}, got shape {tuple(x.shape)}")
        if x.shape[-1] != width:
            what = {"query": "embed_dim", "key": "kdim", "value": "vdim"}[name]
            raise ValueError(f"{name}: last dim {x.shape[-1]} must equal {what}={width}")
        if unbatched:
            return x[None]
        return x if self.batch_first else x.transpose(0, 1)

    @staticmethod
    def _check_key_padding_mask(mask, batch: int, kv_len: int, device) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(f"key_padding_mask: expected a bool tensor (B, Nk), got {type(mask).__name__}")
        if tuple(mask.shape) != (batch, kv_len):
            raise ValueError(f"key_padding_mask: expected shape (B, Nk) = {(batch, kv_len)}, got {tuple(mask.shape)}")
        if mask.dtype.is_floating_point:
            # torch also takes an additive float mask; only its 0 / -inf form is a padding mask.
            ignored = mask == float("-inf")
            if not bool(((mask == 0) | ignored).all()):
                raise ValueError("key_padding_mask: a float mask may hold only 0 (attend) and -inf (ignore); pass a bool mask")
            mask = ignored
        elif mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = ignore the key), got {mask.dtype}")
        return mask.to(device)

    @staticmethod
    def _is_causal_mask(attn_mask, q_len: int, kv_len: int) -> bool:
        """True when attn_mask is exactly torch's causal mask (N, N): it runs as the causal flag."""
        if not isinstance(attn_mask, Tensor) or attn_mask.dim() != 2 or q_len != kv_len \
                or tuple(attn_mask.shape) != (q_len, kv_len):
            return False
        above = torch.ones(q_len, kv_len, dtype=torch.bool, device=attn_mask.device).triu(1)  # (N, N) blocked
        if attn_mask.dtype == torch.bool:
            return torch.equal(attn_mask, above)
        return bool(((attn_mask == float("-inf")) == above).all() and (attn_mask[~above] == 0).all())

    def _attn_mask_as_bias(self, attn_mask, batch: int, q_len: int, kv_len: int, like: Tensor) -> Tensor:
        """torch's attn_mask -> the kernels' additive bias, broadcastable to (B, Hq, Nq, Nk).

        (Nq, Nk) or (B·Hq, Nq, Nk); bool True = blocked (torch's rule: the opposite of SDPA's), float added.
        """
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask: expected a bool or float tensor, got {type(attn_mask).__name__}")
        shapes = {2: (q_len, kv_len), 3: (batch * self.num_heads, q_len, kv_len)}
        if shapes.get(attn_mask.dim()) != tuple(attn_mask.shape):
            raise ValueError(f"attn_mask: expected shape (Nq, Nk) = {shapes[2]} or (B·num_heads, Nq, Nk) = {shapes[3]}, "
                             f"got {tuple(attn_mask.shape)}")
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=like.dtype, device=like.device).masked_fill(
                attn_mask.to(like.device), float("-inf"))
        elif attn_mask.is_floating_point():
            bias = attn_mask.to(device=like.device, dtype=like.dtype)
        else:
            raise TypeError(f"attn_mask: expected dtype bool or floating, got {attn_mask.dtype}")
        return bias if bias.dim() == 2 else bias.view(batch, self.num_heads, q_len, kv_len)

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool):
        """(B, N, E) inputs -> q (B, Hq, Nq, Dh), k and v (B, Hk, Nk, Dh)."""
        e, kv_dim = self.embed_dim, self.num_kv_heads * self.head_dim
        if self_attention:  # one matmul for all three
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).split([e, kv_dim, kv_dim], dim=-1)
        else:
            if self._qkv_same_embed_dim:
                w_q, w_k, w_v = self.in_proj_weight.split([e, kv_dim, kv_dim])
            else:
                w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            b_q = b_k = b_v = None
            if self.in_proj_bias is not None:
                b_q, b_k, b_v = self.in_proj_bias.split([e, kv_dim, kv_dim])
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

        def heads(x: Tensor, n: int) -> Tensor:  # (B, N, n·Dh) -> (B, n, N, Dh)
            return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

        return heads(q, self.num_heads), heads(k, self.num_kv_heads), heads(v, self.num_kv_heads)

    def _context_parallel_core(self, q, k, v, causal, key_padding_mask, need_weights, self_attention) -> Tensor:
        """This rank's shard of attention over the sequence sharded across `process_group`."""
        from .. import distributed as cp

        for name, bad in (("key_padding_mask", key_padding_mask is not None), ("need_weights", need_weights),
                          ("key", not self_attention)):
            if bad:
                raise ValueError(f"{name}: not supported with process_group (context parallelism shards one "
                                 "self-attention sequence; pass key=None, no padding mask, need_weights=False)")
        window = None if self.window_size is None else resolve_window(self.window_size, causal)
        if window is None or -1 in window:
            if window is not None and window != (-1, 0 if causal else -1):
                raise ValueError(f"window_size: {self.window_size} with one unbounded side is not supported with "
                                 "process_group")
            return cp.ring_attention(q, k, v, group=self.process_group, causal=causal,
                                     layout=self.context_parallel_layout)
        if self.context_parallel_layout != "contiguous":
            raise ValueError("context_parallel_layout: the halo exchange of attention='window' needs 'contiguous'")
        return cp.halo_window_attention(q, k, v, window, group=self.process_group)

    def _linear_core(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Tensor | None) -> Tensor:
        """Linear / Performer attention; padded keys contribute nothing to S = Σ φ(k) vᵀ nor to z = Σ φ(k).

        q (B, Hq, Nq, Dh), k/v (B, Hk, Nk, Dh) -> (B, Hq, Nq, Dh). GQA is native in linear_attention.
        """
        linear_attention, _ = _linear_api()
        performer = self.attention == "performer"
        # Performer approximates softmax(q kᵀ / √Dh), like the softmax families; the elementwise maps take
        # q unscaled (their scale multiplies q before φ; the projections learn any scale).
        scale = 1.0 / math.sqrt(self.head_dim) if performer else 1.0
        # With a mask, linear_attention applies φ in torch and zeroes the padded rows of φ(K) and V (zeroing k
        # alone is not enough: elu+1 and FAVOR+ give φ(0) != 0), keeping padded slots off FAVOR+'s stabiliser.
        return linear_attention(q, k, v, feature_map=self.feature_map, causal=causal, scale=scale,
                                key_padding_mask=key_padding_mask)


def _check_block_mask_type(block_mask) -> None:
    if not isinstance(block_mask, _masks.BlockMask):
        raise TypeError(f"block_mask: expected an attnkernels.masks.BlockMask, got {type(block_mask).__name__}")

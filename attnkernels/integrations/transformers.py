"""`attn_implementation="attnkernels"` for Hugging Face transformers (>= 5).

    from attnkernels.integrations.transformers import register
    register()                                   # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkernels")

`register()` adds two entries under one name:
- an attention function to `transformers.AttentionInterface`, called by every
  attention layer as `fn(module, query, key, value, attention_mask, *, scaling,
  dropout, sliding_window, is_causal, ...)` with q (B, Hq, Nq, D), k/v
  (B, Hk, Nk, D) and returning (out (B, Nq, Hq, D), None);
- a mask builder to `transformers.AttentionMaskInterface` (HF's SDPA one):
  without it, HF hands a custom attention function no mask at all and padding
  would be silently ignored. It returns None for a plain causal mask (we then
  use the kernel's causal flag) or a 4-D bool mask (True = attend).

A 4-D mask is turned back into what the kernels take — a causal / sliding
window band plus a key padding mask (B, Nk) — and checked element by element
against the mask HF built; any other pattern raises instead of being dropped.
GQA runs natively (no `repeat_kv`); causal is bottom-right aligned, which is
HF's rule for prefill and for decoding with a KV cache.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..softmax.api import attention
from ..conventions import window_visibility
from ..softmax.windows import from_hf_bidirectional_window, from_hf_sliding_window, resolve_window

DEFAULT_NAME = "attnkernels"


def register(name: str = DEFAULT_NAME, *, context_parallel=None, context_parallel_layout: str = "contiguous") -> str:
    """Register the attention function and its mask builder under `name`; returns `name`.

    context_parallel: a torch.distributed process group (or `True` for the default group): each rank
    runs the model on its shard of the sequence (pass `position_ids` of the shard's global positions)
    and attention runs as ring attention (causal / dense) or the halo exchange (sliding windows)
    over the group (attnkernels.distributed). Register it under its own name, e.g. "attnkernels_cp".
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    forward = attnkernels_attention_forward
    if context_parallel is not None:
        from ..distributed.ring import LAYOUTS

        if context_parallel_layout not in LAYOUTS:
            raise ValueError(f"context_parallel_layout: expected one of {LAYOUTS}, got {context_parallel_layout!r}")
        group = None if context_parallel is True else context_parallel
        forward = functools.partial(context_parallel_attention_forward, group=group, layout=context_parallel_layout)
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(f"register: needs transformers>=5 (`pip install transformers`): {exc}") from exc
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attnkernels_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """HF attention-function signature -> `attnkernels.attention`. Shapes in the module docstring."""
    if kwargs.get("cache") is not None:
        raise NotImplementedError("cache: paged (continuous-batching) caches are not supported by the attnkernels backend")
    modifiers = dict(softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"), dropout_p=float(dropout or 0.0))
    position_bias = kwargs.get("position_bias")  # T5-style relative bias (1|B, Hq, Nq, Nk), may require grad

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if sliding_window:
        # HF: causal `kv > q - W` -> (W - 1, 0); bidirectional `|q - kv| < W` -> (W - 1, W - 1).
        window = (from_hf_sliding_window if causal else from_hf_bidirectional_window)(int(sliding_window))
    else:
        window = None
    band = resolve_window(window, causal)  # (left, right), what the kernel will apply

    cu_seqlens = packed_boundaries(query, key, attention_mask, kwargs)
    if cu_seqlens is not None:  # a packed batch: every sequence attends only to itself
        cu_q, cu_k = cu_seqlens
        out = attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), causal=causal,
                        scale=scaling, window_size=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                        attn_bias=position_bias, **modifiers)  # (T, Hq, D)
        return out[None], None

    key_padding_mask = None
    if attention_mask is not None:
        try:
            key, value, key_padding_mask = padding_from_hf_mask(attention_mask, query, key, value, band)
        except NotABandMask:
            # Any other mask (a document mask, a bias, a top-left causal mask with Nq != Nk) is what
            # eager adds to the logits: pass it as the additive bias, with nothing else masked.
            mask_bias = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(query.dtype)
            bias = mask_bias if position_bias is None else _add_bias(position_bias, mask_bias)
            out = attention(query, key, value, scale=scaling, attn_bias=bias, **modifiers)
            return out.transpose(1, 2).contiguous(), None
    elif causal and query.shape[2] > 1 and key.shape[2] > query.shape[2]:
        # No mask, causal, more key slots than queries: transformers does this only for a prefill into an
        # empty static cache, whose slots past the prompt are unfilled zeros. Its sdpa path keeps the first
        # Nq keys (top-left causal); bottom-right causal over all slots would attend to the empty ones.
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
        if position_bias is not None:
            position_bias = position_bias[..., : query.shape[2]]

    out = attention(query, key, value, causal=causal, scale=scaling, window_size=window,
                    key_padding_mask=key_padding_mask, attn_bias=_trim_bias(position_bias, key.shape[2]), **modifiers)
    return out.transpose(1, 2).contiguous(), None  # (B, Hq, Nq, D) -> (B, Nq, Hq, D)


def _add_bias(position_bias: Tensor, mask: Tensor) -> Tensor:
    """position_bias + an HF mask (bool: True = attend) as one additive bias, as eager adds them."""
    if mask.dtype == torch.bool:
        return position_bias.masked_fill(~mask, float("-inf"))
    return position_bias + mask


def _trim_bias(position_bias, kv_len: int):
    """The bias's key columns cut like the keys (padding_from_hf_mask may drop a static cache's unfilled slots)."""
    if position_bias is None or position_bias.shape[-1] == kv_len:
        return position_bias
    return position_bias[..., :kv_len]


def context_parallel_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                      sliding_window=None, is_causal=None, *, group, layout, **kwargs):
    """The HF signature on this rank's shard of the sequence: ring attention or the halo exchange."""
    from .. import distributed as cp

    if dropout:
        raise NotImplementedError(f"dropout: attention dropout ({dropout}) is not implemented by attnkernels' "
                                  "context-parallel backend (ring/halo); set attention_dropout=0.0 or model.eval()")
    for unsupported in ("softcap", "s_aux", "position_bias", "cache"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"{unsupported}: not supported by the attnkernels context-parallel backend "
                                      "(the single-device backend takes it)")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = None
    if sliding_window:
        window = (from_hf_sliding_window if causal else from_hf_bidirectional_window)(int(sliding_window))
    band = resolve_window(window, causal)
    if attention_mask is not None:  # only a mask that says "the shard's own band, no padding" is acceptable
        _, _, padding = padding_from_hf_mask(attention_mask, query, key, value, band)
        if padding is not None:
            raise ValueError("attention_mask: padding is not supported with context parallelism (pack or trim)")
    if window is None:
        out = cp.ring_attention(query, key, value, group=group, causal=causal, scale=scaling, layout=layout)
    else:
        out = cp.halo_window_attention(query, key, value, window, group=group, causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def packed_boundaries(query: Tensor, key: Tensor, attention_mask, kwargs: dict):
    """(cu_seqlens_q, cu_seqlens_k) int32 of a packed batch, or None for an ordinary one.

    transformers marks a packed batch (`DataCollatorWithFlattening`) either with `cu_seq_lens_q/k`
    kwargs or, with no mask, with `position_ids` (1, T) that restart at 0 at each sequence start.
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        position_ids = kwargs.get("position_ids")
        if attention_mask is not None or position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
            return None
        starts = (position_ids[0] == 0).nonzero().flatten()
        if starts.numel() <= 1 or position_ids.shape[1] != query.shape[2] or key.shape[2] != query.shape[2]:
            return None  # one sequence (or a decoding step against a cache): not packed
        if int(starts[0]) != 0:
            raise ValueError("position_ids: a packed batch must start a sequence at position 0")
        ends = torch.tensor([query.shape[2]], device=starts.device)
        cu_q = cu_k = torch.cat([starts, ends]).to(torch.int32)
    if query.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q: a packed batch has batch size 1, got {query.shape[0]}")
    if attention_mask is not None:
        raise ValueError("attention_mask: a packed batch (cu_seq_lens_q/k) with a mask as well is not supported")
    return cu_q.to(device=query.device, dtype=torch.int32), cu_k.to(device=query.device, dtype=torch.int32)


class NotABandMask(ValueError):
    """An HF mask that is not a causal/sliding band with key padding (the forward passes it as a bias)."""


def padding_from_hf_mask(attention_mask, query: Tensor, key: Tensor, value: Tensor, band: tuple[int, int]):
    """(key, value, key_padding_mask (B, Nk) or None) equivalent to `attention_mask` under `band`.

    attention_mask: 4-D (B|1, 1|H, Nq, Nk), bool (True = attend) or additive
    float (0 = attend, very negative / -inf = blocked). Keys no query may see
    become padding. Trailing keys nobody sees (a static cache's unfilled slots)
    are cut off when that is what makes the bottom-right band line up.
    Raises NotABandMask (a ValueError) when the mask is anything else (a bias, a
    document mask, a top-left causal mask with Nq != Nk, ...).
    """
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"attention_mask: the attnkernels backend takes a 4-D tensor mask, got {type(attention_mask).__name__}"
        )
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (q_len, kv_len) or attention_mask.shape[0] not in (1, batch):
        raise ValueError(
            f"attention_mask: expected shape (B|1, 1|H, Nq, Nk) = ({batch}, 1, {q_len}, {kv_len}), "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype == torch.bool:
        visible = attention_mask
    else:
        visible = attention_mask == 0
        blocked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2  # HF's min-dtype fill, or -inf
        if not bool((visible | blocked).all()):
            raise NotABandMask(
                "attention_mask: holds an additive bias (values other than 0 and -inf/min-dtype); "
                "the attnkernels backend supports causal/sliding-window masks with key padding only"
            )
    if visible.shape[1] > 1 and not bool((visible == visible[:, :1]).all()):
        raise NotABandMask("attention_mask: differs between heads, not one band for all heads")
    visible = visible[:, 0].to(query.device)  # (Bm, Nq, Nk)

    seen = visible.any(dim=1)  # (Bm, Nk): key j is seen by some query
    seen_any = seen.any(dim=0).nonzero()
    cut = int(seen_any[-1]) + 1 if len(seen_any) else kv_len
    for length in dict.fromkeys((kv_len, cut)):  # as given first, then without never-seen trailing keys
        padding = ~seen[:, :length]  # (Bm, Nk')
        expected = window_visibility(q_len, length, band, device=visible.device)[None] & ~padding[:, None, :]
        if torch.equal(expected, visible[..., :length]):
            break
    else:
        raise NotABandMask(
            "attention_mask: is not a causal/sliding-window band combined with key padding (the only masks the "
            f"attnkernels backend can express; band (left, right) = {band}, bottom-right aligned). Use "
            "attn_implementation='sdpa' or 'eager' for this model/mask."
        )
    if length != kv_len:
        key, value = key[:, :, :length], value[:, :, :length]
    if not bool(padding.any()):
        return key, value, None
    return key, value, padding.expand(batch, length).contiguous()

"""Public entry points: linear_attention(), linear_attention_step(), LinearAttentionState.

They validate the inputs, resolve the options (feature map, scale, state) to
the op's conventions and call `torch.ops.attnkernels.linear_attention_fwd`.
Elementwise feature maps ("elu", "relu", "identity") are fused into the
kernels; PerformerFeatures (or any callable) are applied here in torch, and the
kernels then see them as "identity" features of width M.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Union

import torch
from torch import Tensor

from .. import _checks
from . import ops
from .features import PerformerFeatures
from .reference import FEATURE_MAPS, apply_feature_map

FeatureMap = Union[str, PerformerFeatures, Callable[[Tensor], Tensor]]


class LinearAttentionState(NamedTuple):
    """The carried state per kv head: S (B, Hk, M, Dv) = Σ φ(k) vᵀ and z (B, Hk, M) = Σ φ(k).

    float32 (float64 for float64 inputs), never requiring grad.
    """

    S: Tensor
    z: Tensor


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: FeatureMap = "elu",
    causal: bool = False,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float | None = None,
    initial_state: LinearAttentionState | tuple[Tensor, Tensor] | None = None,
    return_final_state: bool = False,
    key_padding_mask: Tensor | None = None,
):
    """Linear attention out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps), in time and memory linear in N.

    S_i = S0 + Σ_j φ(k_j) v_jᵀ and z_i = z0 + Σ_j φ(k_j), over j ≤ i (causal,
    Nq == Nk) or every j (Nq may differ from Nk).

    Args:
        q: (B, Hq, Nq, D); k: (B, Hk, Nk, D); v: (B, Hk, Nk, Dv). Hq % Hk == 0
            (GQA/MQA: query head h reads kv head h // (Hq // Hk)).
        feature_map: "elu" (elu(x) + 1), "relu", "identity" (the caller already
            applied φ; with normalize=True the features must be >= 0), a
            `PerformerFeatures` (FAVOR+, approximates softmax attention), or any
            callable x -> φ(x) applied to q and k in torch.
        causal: query i sees keys j <= i.
        normalize: divide by φ(q_i)ᵀ z_i + eps; False returns the numerator.
        eps: > 0, added to the denominator.
        scale: elementwise maps: φ is applied to `scale * q` (None = 1.0).
            PerformerFeatures: the softmax logit scale, q·k·scale (None =
            1/sqrt(D)); q and k are each multiplied by sqrt(scale).
        initial_state: (S0, z0) from a previous call's `return_final_state`;
            lets a long sequence be processed in pieces.
        return_final_state: also return the state after every key (causal or not).
        key_padding_mask: bool (B, Nk), True = the key is ignored (torch's
            convention): padded keys add nothing to S nor to z (causal: nor to
            any later row), so a padded sequence gives the rows of the trimmed
            one. Implemented in torch, O(N·D), never N×N: φ is applied here,
            the padded rows of φ(K) and V are zeroed, and the op runs with
            "identity" — the fused feature-map path is bypassed when a mask is
            given. Padded slots get a copy of the row's first real key before a
            PerformerFeatures/callable map, so they cannot move FAVOR+'s
            per-head key stabiliser. Queries at padded positions still get an
            output (from the real keys they see).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, LinearAttentionState) when
        return_final_state. Gradients flow to q, k, v (and through
        PerformerFeatures); the state carries none.
    """
    _checks.check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"causal: causal linear attention needs as many queries as keys, got Nq={q.shape[2]}, Nk={k.shape[2]} "
            "(stream a prefix with initial_state instead)"
        )
    eps = _check_eps(eps)
    _checks.check_key_padding_mask(key_padding_mask, q, k)
    if key_padding_mask is not None and not isinstance(feature_map, str):
        k = _fill_padded_keys(k, key_padding_mask)
    name, q_features, k_features, scale = _resolve_features(feature_map, q, k, scale, normalize, initial_state, return_final_state)
    if name == "identity" and normalize and not isinstance(feature_map, PerformerFeatures):  # FAVOR+ is > 0 by construction
        _check_nonnegative(q_features, k_features, feature_map)
    if key_padding_mask is not None:
        if name != "identity":  # an elementwise map: apply φ here; the kernel then sees identity features
            q_features, k_features = apply_feature_map(q * scale, name), apply_feature_map(k, name)
            name, scale = "identity", 1.0
        keep = ~key_padding_mask[:, None, :, None]  # (B, 1, Nk, 1)
        k_features = torch.where(keep, k_features, torch.zeros_like(k_features))
        v = torch.where(keep, v, torch.zeros_like(v))
    initial_s, initial_z = _check_state(initial_state, q_features, k_features, v)
    out, final_s, final_z = torch.ops.attnkernels.linear_attention_fwd(
        q_features, k_features, v, name, causal, normalize, eps, scale, initial_s, initial_z
    )
    if return_final_state:
        return out, LinearAttentionState(final_s.detach(), final_z.detach())
    return out


def linear_attention_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    state: LinearAttentionState | tuple[Tensor, Tensor] | None,
    *,
    feature_map: FeatureMap = "elu",
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float | None = None,
):
    """One recurrent decode step: (out_t (B, Hq, 1, Dv), new_state).

    q_t (B, Hq, 1, D), k_t (B, Hk, 1, D), v_t (B, Hk, 1, Dv). `state=None`
    starts from zeros. The new token attends to itself and to every earlier
    token folded into `state`, so stepping through a sequence reproduces
    `linear_attention(..., causal=True)` token by token.
    """
    for name, tensor in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        _checks.check_tensor(name, tensor, layout="(B, H, 1, D)")
        if tensor.shape[2] != 1:
            raise ValueError(f"{name}: expected one token (B, H, 1, D), got shape {tuple(tensor.shape)}")
    return linear_attention(
        q_t, k_t, v_t, feature_map=feature_map, causal=True, normalize=normalize, eps=eps, scale=scale,
        initial_state=state, return_final_state=True,
    )


def _fill_padded_keys(k: Tensor, key_padding_mask: Tensor) -> Tensor:
    """k with each padded slot replaced by its batch row's first real key (B, Hk, Nk, D).

    A non-elementwise map (FAVOR+ subtracts the max over all keys of a head) then cannot be moved by
    whatever the padded slots hold; their features are zeroed afterwards anyway.
    """
    first_real = (~key_padding_mask).to(torch.uint8).argmax(dim=-1)  # (B,); 0 when a row is all padding
    fill = k[torch.arange(k.shape[0], device=k.device), :, first_real][:, :, None]  # (B, Hk, 1, D)
    return torch.where(key_padding_mask[:, None, :, None], fill, k)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a positive float, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite float > 0 (it keeps the denominator away from 0), got {eps}")
    return eps


def _resolve_scale(scale, default: float) -> float:
    if scale is None:
        return default
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale: expected a finite, non-negative float, got {scale}")
    return scale


def _resolve_features(feature_map, q, k, scale, normalize, initial_state, return_final_state):
    """(kernel feature-map name, q for the op, k for the op, scale for the op)."""
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map: unknown name {feature_map!r}; expected one of {FEATURE_MAPS}, "
                "a PerformerFeatures or a callable"
            )
        return feature_map, q, k, _resolve_scale(scale, 1.0)
    if isinstance(feature_map, PerformerFeatures):
        if not normalize:
            raise ValueError(
                "normalize: PerformerFeatures needs normalize=True; its stabilisers (a per-row max for queries, "
                "a per-head max for keys) cancel only in the normalised output"
            )
        if initial_state is not None or return_final_state:
            raise ValueError(
                "initial_state/return_final_state: not supported with PerformerFeatures; the key stabiliser is "
                "recomputed per call, so states of different calls are on different scales"
            )
        if feature_map.head_dim != q.shape[-1]:
            raise ValueError(f"feature_map: PerformerFeatures was built for head_dim {feature_map.head_dim}, q has D={q.shape[-1]}")
        root = math.sqrt(_resolve_scale(scale, 1.0 / math.sqrt(q.shape[-1])))
        return "identity", feature_map(q * root, is_query=True), feature_map(k * root, is_query=False), 1.0
    if callable(feature_map):
        scale = _resolve_scale(scale, 1.0)
        q_features, k_features = feature_map(q * scale), feature_map(k)
        for what, t in (("q", q_features), ("k", k_features)):
            if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[:3] != (q if what == "q" else k).shape[:3]:
                raise ValueError(f"feature_map: the callable must map {what} (B, H, N, D) to (B, H, N, M)")
        if q_features.shape[-1] != k_features.shape[-1]:
            raise ValueError("feature_map: the callable gave q and k features of different widths")
        return "identity", q_features, k_features, 1.0
    raise TypeError(f"feature_map: expected a name {FEATURE_MAPS}, a PerformerFeatures or a callable, got {type(feature_map).__name__}")


def _check_nonnegative(q_features: Tensor, k_features: Tensor, feature_map) -> None:
    """Refuse negative features with normalize=True: the denominator could cross 0."""
    if torch.compiler.is_compiling():
        return  # a data-dependent check would break the graph; documented in the README
    for what, t in (("q", q_features), ("k", k_features)):
        if t.numel() and bool((t.detach() < 0).any()):
            raise ValueError(
                f"feature_map: {feature_map if isinstance(feature_map, str) else 'the callable'} gave negative "
                f"{what} features with normalize=True; the denominator φ(q)ᵀz + eps can then reach 0. "
                "Use a positive map ('elu', PerformerFeatures) or normalize=False"
            )


def _check_state(initial_state, q_features: Tensor, k_features: Tensor, v: Tensor):
    """(S0, z0) checked against (B, Hk, M, Dv), (B, Hk, M), dtype and device; or (None, None)."""
    if initial_state is None:
        return None, None
    if not isinstance(initial_state, tuple) or len(initial_state) != 2:
        raise TypeError(f"initial_state: expected a LinearAttentionState (S, z), got {type(initial_state).__name__}")
    s0, z0 = initial_state
    batch, kv_heads, feat_dim, value_dim = k_features.shape[0], k_features.shape[1], k_features.shape[-1], v.shape[-1]
    dtype = ops.state_dtype(q_features.dtype)
    for what, t, shape in (("S", s0, (batch, kv_heads, feat_dim, value_dim)), ("z", z0, (batch, kv_heads, feat_dim))):
        if not isinstance(t, Tensor):
            raise TypeError(f"initial_state.{what}: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"initial_state.{what}: expected shape {shape} (B, Hk, M{', Dv' if what == 'S' else ''}), got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"initial_state.{what}: expected dtype {dtype} for {q_features.dtype} inputs, got {t.dtype}")
        if t.device != q_features.device:
            raise ValueError(f"initial_state.{what}: device {t.device} differs from q's {q_features.device}")
        if t.requires_grad:
            raise ValueError(
                f"initial_state.{what}: requires grad, but gradients do not flow into the carried state; "
                "pass state.S.detach(), state.z.detach()"
            )
    return s0, z0

"""LinearCall: everything a linear-attention kernel needs besides its q, k, v features.

Built once by the public API (`LinearCall.build`, which validates the user's arguments
and resolves the feature map), then the only thing that travels: its fields, in order,
are the arguments of `torch.ops.attnkernels.linear_attention_fwd/bwd` after the data
tensors (ops.py), and every backend's launcher takes it whole.

Fields (q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv)):
- feature_map: "elu", "relu" or "identity", applied elementwise by the kernels to
  `scale * q` and to k (so M = D); PerformerFeatures, callables and key padding are
  applied in torch by `build`, and the kernels then see "identity" features of width M.
- causal (needs Nq == Nk), normalize (False drops the denominator), eps > 0, scale.
- initial_s (B, Hk, M, Dv) and initial_z (B, Hk, M): the carried state, both or
  neither, float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .. import _checks
from ..conventions import resolve_scale
from ..op_call import OpCall, accumulation_dtype
from .features import PerformerFeatures
from .reference import FEATURE_MAPS, apply_feature_map

FeatureMap = Union[str, PerformerFeatures, Callable[[Tensor], Tensor]]


@dataclasses.dataclass(frozen=True)
class LinearCall(OpCall):
    feature_map: str
    causal: bool
    normalize: bool
    eps: float
    scale: float
    initial_s: Optional[Tensor] = None
    initial_z: Optional[Tensor] = None

    @classmethod
    def build(cls, q: Tensor, k: Tensor, v: Tensor, *, feature_map: FeatureMap, causal: bool, normalize: bool,
              eps: float, scale, initial_state, return_final_state: bool, key_padding_mask: Tensor | None):
        """(call, q features, k features, v) for the op: the user's arguments checked (errors name the
        argument), the feature map applied in torch unless the kernels fuse it, padded keys zeroed."""
        _checks.check_qkv(q, k, v)
        _checks.check_bool("causal", causal)
        _checks.check_bool("normalize", normalize)
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError(
                f"causal: causal linear attention needs as many queries as keys, got Nq={q.shape[2]}, Nk={k.shape[2]} "
                "(stream a prefix with initial_state instead)"
            )
        eps = check_eps(eps)
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
        return cls(name, causal, normalize, eps, scale, initial_s, initial_z), q_features, k_features, v


def _fill_padded_keys(k: Tensor, key_padding_mask: Tensor) -> Tensor:
    """k with each padded slot replaced by its batch row's first real key (B, Hk, Nk, D).

    A non-elementwise map (FAVOR+ subtracts the max over all keys of a head) then cannot be moved by
    whatever the padded slots hold; their features are zeroed afterwards anyway.
    """
    first_real = (~key_padding_mask).to(torch.uint8).argmax(dim=-1)  # (B,); 0 when a row is all padding
    fill = k[torch.arange(k.shape[0], device=k.device), :, first_real][:, :, None]  # (B, Hk, 1, D)
    return torch.where(key_padding_mask[:, None, :, None], fill, k)


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a positive float, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite float > 0 (it keeps the denominator away from 0), got {eps}")
    return eps


def _resolve_features(feature_map, q, k, scale, normalize, initial_state, return_final_state):
    """(kernel feature-map name, q for the op, k for the op, scale for the op)."""
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map: unknown name {feature_map!r}; expected one of {FEATURE_MAPS}, "
                "a PerformerFeatures or a callable"
            )
        return feature_map, q, k, resolve_scale(scale, 1.0)
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
        root = math.sqrt(resolve_scale(scale, 1.0 / math.sqrt(q.shape[-1])))
        return "identity", feature_map(q * root, is_query=True), feature_map(k * root, is_query=False), 1.0
    if callable(feature_map):
        scale = resolve_scale(scale, 1.0)
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
    dtype = accumulation_dtype(q_features.dtype)
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

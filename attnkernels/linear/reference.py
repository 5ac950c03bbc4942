"""The oracle of the linear-attention family: the sums written out literally.

    out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps)      (normalize=True)
    out_i = φ(q_i)ᵀ S_i                            (normalize=False)
    S_i = S0 + Σ_j φ(k_j) v_jᵀ,   z_i = z0 + Σ_j φ(k_j)

with j ≤ i when causal (Nq == Nk) and every j otherwise. φ acts on `scale * q`
and on k. The causal sums are running sums of per-token outer products, so this
file materialises an (N, M, Dv) tensor: fine for the small shapes of the tests,
and the reason no public entry point uses it unless
`attnkernels.backend("reference")` asks for it. Every kernel (C++ and Triton)
is tested against this file, usually on float64 inputs.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor
import torch.nn.functional as F

FeatureMap = Union[str, Callable[[torch.Tensor], torch.Tensor]]

FEATURE_MAPS = ("elu", "relu", "identity")


def apply_feature_map(x: torch.Tensor, feature_map: FeatureMap) -> torch.Tensor:
    """φ(x) elementwise: "elu" = elu(x) + 1 (positive), "relu", "identity", or any callable."""
    if callable(feature_map):
        return feature_map(x)
    if feature_map == "elu":
        return F.elu(x) + 1.0
    if feature_map == "relu":
        return F.relu(x)
    if feature_map == "identity":
        return x
    raise ValueError(f"feature_map: expected one of {FEATURE_MAPS} or a callable, got {feature_map!r}")


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: FeatureMap = "elu",
    causal: bool = False,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(out (B, Hq, Nq, Dv), (S (B, Hk, M, Dv), z (B, Hk, M))) in the inputs' dtype.

    q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv); query head h reads
    kv head h // (Hq // Hk). `initial_state` = (S0, z0) per kv head. The
    returned state is S0 + Σ over every key (what a following call starts from).
    Pass float64 tensors to get the oracle; it computes in the inputs' dtype so a
    test can also measure what plain PyTorch loses in fp32/fp16.
    """
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if causal and q_len != kv_len:
        raise ValueError(f"causal linear attention needs Nq == Nk, got Nq={q_len}, Nk={kv_len}")
    group = q_heads // kv_heads
    phi_q = apply_feature_map(q * (1.0 if scale is None else scale), feature_map)  # [B, Hq, Nq, M]
    phi_k = apply_feature_map(k, feature_map)  # [B, Hk, Nk, M]
    feat_dim, head_dim_v = phi_k.shape[-1], v.shape[-1]
    if initial_state is None:
        s0 = phi_k.new_zeros(batch, kv_heads, feat_dim, head_dim_v)
        z0 = phi_k.new_zeros(batch, kv_heads, feat_dim)
    else:
        s0, z0 = (t.to(phi_k.dtype) for t in initial_state)

    outer = phi_k[..., :, None] * v[..., None, :]  # [B, Hk, Nk, M, Dv]: φ(k_j) v_jᵀ per token
    if causal:
        states = s0[:, :, None] + torch.cumsum(outer, dim=2)  # [B, Hk, N, M, Dv]: S_i
        norms = z0[:, :, None] + torch.cumsum(phi_k, dim=2)  # [B, Hk, N, M]: z_i
    else:
        states = (s0 + outer.sum(dim=2))[:, :, None]  # [B, Hk, 1, M, Dv]
        norms = (z0 + phi_k.sum(dim=2))[:, :, None]  # [B, Hk, 1, M]
    states = states.repeat_interleave(group, dim=1)  # per query head
    norms = norms.repeat_interleave(group, dim=1)

    numerator = torch.einsum("bhim,bhimv->bhiv", phi_q, states.expand(-1, -1, q_len, -1, -1))
    if normalize:
        denominator = (phi_q * norms).sum(-1, keepdim=True) + eps  # [B, Hq, Nq, 1]
        out = numerator / denominator
    else:
        out = numerator
    final_s = s0 + outer.sum(dim=2)
    final_z = z0 + phi_k.sum(dim=2)
    return out, (final_s, final_z)


# --- the backward, written out ------------------------------------------------------------
# Gradients of the linear-attention reference, written out (no autograd).
#
# The "reference" backend's backward runs inside a custom op, where autograd is
# switched off, so it cannot differentiate reference.py; it uses these formulas
# instead. tests/test_linear_reference_backward.py checks them against autograd
# through `linear_attention_reference`. Dense in (Nq, Nk): test shapes only.
#
# With q̃ = φ(scale·q), k̃ = φ(k), P = q̃ k̃ᵀ (lower-triangular when causal),
# num = P v + q̃ S0, den = P 1 + q̃ z0 + eps, out = num / den:
#   dnum = dout / den, dden = -(dout · out) / den       (normalize=False: dnum = dout, dden = 0)
#   dP = dnum vᵀ + dden 1ᵀ (masked like P)
#   dq̃ = dP k̃ + dnum S0ᵀ + dden z0ᵀ,  dk̃ = dPᵀ q̃,  dv = Pᵀ dnum
# then the chain rule through φ, with dk̃/dv summed over the query heads of each kv head.


def feature_map_derivative(x: Tensor, feature_map: str) -> Tensor:
    """φ'(x) for the named elementwise maps (torch's conventions at 0)."""
    if feature_map == "elu":
        return torch.where(x > 0, torch.ones_like(x), torch.exp(x))
    if feature_map == "relu":
        return (x > 0).to(x.dtype)
    if feature_map == "identity":
        return torch.ones_like(x)
    raise ValueError(f"feature_map: expected 'elu', 'relu' or 'identity', got {feature_map!r}")


def linear_attention_reference_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, *, feature_map: str = "elu", causal: bool = False,
    normalize: bool = True, eps: float = 1e-6, scale: float | None = None,
    initial_state: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `linear_attention_reference(q, k, v, ...)[0]` for the cotangent dout."""
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 if scale is None else scale
    xq = q * scale
    phi_q = apply_feature_map(xq, feature_map)  # [B, Hq, Nq, M]
    phi_k = apply_feature_map(k, feature_map).repeat_interleave(group, dim=1)  # [B, Hq, Nk, M]
    values = v.repeat_interleave(group, dim=1)  # [B, Hq, Nk, Dv]
    scores = phi_q @ phi_k.transpose(-1, -2)  # [B, Hq, Nq, Nk]
    mask = None
    if causal:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()
        scores = scores * mask
    num = scores @ values  # [B, Hq, Nq, Dv]
    den = scores.sum(-1)  # [B, Hq, Nq]
    if initial_state is not None:
        s0 = initial_state[0].to(q.dtype).repeat_interleave(group, dim=1)  # [B, Hq, M, Dv]
        z0 = initial_state[1].to(q.dtype).repeat_interleave(group, dim=1)  # [B, Hq, M]
        num = num + phi_q @ s0
        den = den + (phi_q * z0[:, :, None]).sum(-1)
    den = den + eps
    if normalize:
        out = num / den[..., None]
        dnum = dout / den[..., None]
        dden = -(dout * out).sum(-1) / den  # [B, Hq, Nq]
    else:
        dnum = dout
        dden = torch.zeros_like(den)
    dscores = dnum @ values.transpose(-1, -2) + dden[..., None]  # [B, Hq, Nq, Nk]
    if mask is not None:
        dscores = dscores * mask
    dphi_q = dscores @ phi_k
    if initial_state is not None:
        dphi_q = dphi_q + dnum @ s0.transpose(-1, -2) + dden[..., None] * z0[:, :, None]
    dphi_k = dscores.transpose(-1, -2) @ phi_q  # [B, Hq, Nk, M]
    dv = scores.transpose(-1, -2) @ dnum  # [B, Hq, Nk, Dv]
    dq = scale * feature_map_derivative(xq, feature_map) * dphi_q
    dphi_k = dphi_k.view(batch, kv_heads, group, kv_len, phi_k.shape[-1]).sum(2)
    dk = feature_map_derivative(k, feature_map) * dphi_k
    dv = dv.view(batch, kv_heads, group, kv_len, v.shape[-1]).sum(2)
    return dq, dk, dv

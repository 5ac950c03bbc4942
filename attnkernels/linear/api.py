"""Public entry points: linear_attention(), linear_attention_step(), LinearAttentionState.

They build a `LinearCall` (call.py: the inputs validated once, the options — feature
map, scale, state — resolved to the op's conventions) and run it through
`torch.ops.attnkernels.linear_attention_fwd` (ops.py).
Elementwise feature maps ("elu", "relu", "identity") are fused into the
kernels; PerformerFeatures on CPU, non-causal, without a mask or a state, run fused
in the C++ kernel too (favor.py: projection, stabilisers and exp per chunk); in every
other case they (and any callable) are applied here in torch, and the kernels then see
them as "identity" features of width M.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .. import _checks
from ..conventions import softmax_scale
from . import favor, ops
from .call import FeatureMap, LinearCall, check_eps
from .varlen import varlen_linear_attention


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
    cu_seqlens: Tensor | None = None,
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
        cu_seqlens: int32 (batch + 1,): a packed batch (fla's cu_seqlens, see
            varlen.py): q (total, Hq, D), k/v (total, Hk, D); the state restarts
            at each sequence (from initial_state[i]: S0 (batch, Hk, M, Dv),
            z0 (batch, Hk, M)) and the final states are returned stacked.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, LinearAttentionState) when
        return_final_state. Gradients flow to q, k, v (and through
        PerformerFeatures); the state carries none.
    """
    if cu_seqlens is not None:
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask: not supported with a packed (cu_seqlens) batch; pack without padding")

        def attend(q_i, k_i, v_i, state):
            return linear_attention(q_i, k_i, v_i, feature_map=feature_map, causal=causal, normalize=normalize,
                                    eps=eps, scale=scale, initial_state=state, return_final_state=True)

        result = varlen_linear_attention(q, k, v, cu_seqlens, initial_state, return_final_state, attend)
        if return_final_state:
            out, (final_s, final_z) = result
            return out, LinearAttentionState(final_s, final_z)
        return result
    if favor.fusable(q, k, v, feature_map, causal=causal, normalize=normalize, initial_state=initial_state,
                     return_final_state=return_final_state, key_padding_mask=key_padding_mask):
        _checks.check_qkv(q, k, v)
        return favor.run(q, k, v, feature_map, softmax_scale(scale, q.shape[-1]), check_eps(eps))
    call, q_features, k_features, v = LinearCall.build(
        q, k, v, feature_map=feature_map, causal=causal, normalize=normalize, eps=eps, scale=scale,
        initial_state=initial_state, return_final_state=return_final_state, key_padding_mask=key_padding_mask,
    )
    out, final_s, final_z = ops.run(call, q_features, k_features, v)
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

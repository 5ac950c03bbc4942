"""FAVOR+ (PerformerFeatures) non-causal attention with the feature map fused into the C++ kernel.

`linear_attention(q, k, v, feature_map=PerformerFeatures(...))` on CPU tensors, non-causal,
without a key padding mask or a carried state, runs `torch.ops.attnkernels.favor_attention_fwd`
(and its backward op): csrc/linear.cpp computes each chunk's projection x Wᵀ, the stabilisers
and the exp on a cache-resident tile and feeds it straight to the state / output products, so
the (N, M) feature tensors the torch map builds (and autograd keeps) are never materialised,
but φ(q) when a gradient is needed (see _save_features).
Same function as the unfused path (features.py then the "identity" kernel): the same
stabilisers, detached the same way; only the rounding differs (fp32 logits for bf16/fp16
inputs, where torch's matmul rounds them to the input dtype before the exp).
Every other case, and any other backend (`attnkernels.backend("reference")`), keeps the
unfused path.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..op_call import EagerOp
from .features import PerformerFeatures


def fusable(q: Tensor, k: Tensor, v: Tensor, features, *, causal: bool, normalize: bool, initial_state,
            return_final_state: bool, key_padding_mask) -> bool:
    """Whether the fused C++ FAVOR+ path runs this call (else the torch feature map does)."""
    if not isinstance(features, PerformerFeatures) or causal or not normalize or initial_state is not None:
        return False
    if return_final_state or key_padding_mask is not None:
        return False
    if not all(isinstance(t, Tensor) for t in (q, k, v)) or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False  # the unfused path's checks name the bad argument
    if q.device.type != "cpu" or backends.forced_backend() not in (None, "cpu"):
        return False
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point or features.projection.requires_grad:
        return False
    if features.head_dim != q.shape[-1] or q.shape[2] == 0 or k.shape[2] == 0:
        return False
    return _kernels_available()


@torch.compiler.assume_constant_result
def _kernels_available() -> bool:
    """The C++ build loads here and has the fused ops (a constant of the process, for torch.compile too)."""
    if backends.why_not("linear", "cpu", torch.device("cpu")) is not None:
        return False
    return hasattr(backends.cpu_kernels(), "favor_attention_fwd")


# The backward reads the forward's φ(q) [B, Hq, Nq, M] (float32 / float64, bf16's matrix-unit path
# too) instead of rerunning q's projection GEMM and exp (one of the twelve GEMMs of a fwd+bwd: B1 H8
# N1024 D64 M256 fp32 fwd+bwd 0.91x the time, interleaved A/B against recomputing, 1 thread, loaded
# host) when a gradient is needed, M is a multiple of every build's vector width, and the features
# take at most SAVE_FEATURES_MAX_BYTES (then the backward recomputes them: the same code, so the
# result is bit-identical either way). φ(k) is not saved: the forward builds it under a running key
# shift, the backward under the final one.
# The limit is about the last-level cache, not memory: features written by the forward and read back
# by the backward from DRAM cost more than recomputing them (Zen 5, B1 H8 D64 M256, interleaved, save
# over recompute, 1 thread: bf16 N 2048 / 3072 (16 / 24 MB) 1.05x / 1.06x faster, N 4096 / 8192
# (32 / 64 MB) 0.78x / 0.79x; fp32 N 2048 1.09x, N 4096 0.95x; 2 threads: bf16 N 4096 0.75x).
SAVE_FEATURES_MAX_BYTES = 24 << 20


def _save_features(q: Tensor, k: Tensor, v: Tensor, projection: Tensor) -> bool:
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return False
    if not q.dtype.is_floating_point or projection.shape[0] % 16:
        return False
    acc_bytes = 8 if q.dtype == torch.float64 else 4
    return q.shape[0] * q.shape[1] * q.shape[2] * projection.shape[0] * acc_bytes <= SAVE_FEATURES_MAX_BYTES


def _forward(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, scale: float,
             eps: float, save_features: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, states, shifts, features): the key state [S | z] (B, Hk, M, Dv + 1), the key stabiliser
    (B, Hk) and, with save_features, φ(q) (B, Hq, Nq, M) (else empty), float32 (float64 for float64
    inputs), kept for the backward (its state pass is not rerun)."""
    return backends.cpu_kernels().favor_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), projection, scale, eps,
                                                      save_features)


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, projection: Tensor, states: Tensor, shifts: Tensor,
              features: Tensor, scale: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return backends.cpu_kernels().favor_attention_bwd(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), projection, states, shifts, features, scale, eps)


favor_attention_fwd = torch.library.custom_op("attnkernels::favor_attention_fwd", _forward, mutates_args=())
favor_attention_bwd = torch.library.custom_op("attnkernels::favor_attention_bwd", _backward, mutates_args=())


@favor_attention_fwd.register_fake
def _(q, k, v, projection, scale, eps, save_features):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, kv_heads = k.shape[:2]
    states = q.new_empty(batch, kv_heads, projection.shape[0], v.shape[-1] + 1, dtype=acc)
    features = q.new_empty(*q.shape[:3], projection.shape[0], dtype=acc) if save_features else q.new_empty(0, dtype=acc)
    return q.new_empty(*q.shape[:3], v.shape[-1]), states, q.new_empty(batch, kv_heads, dtype=acc), features


@favor_attention_bwd.register_fake
def _(dout, q, k, v, projection, states, shifts, features, scale, eps):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, projection, scale, eps, _ = inputs
    _, states, shifts, features = output
    ctx.save_for_backward(q, k, v, projection, states, shifts, features)
    ctx.scale, ctx.eps = scale, eps
    ctx.mark_non_differentiable(states, shifts, features)
    ctx.set_materialize_grads(False)  # no zero (B, Hk, M, Dv + 1) gradient built for the states per call


def _autograd_backward(ctx, grad_out, grad_states, grad_shifts, grad_features):
    q, k, v, projection, states, shifts, features = ctx.saved_tensors
    if grad_out is None:  # the output is unused: nothing flows back
        return None, None, None, None, None, None, None
    dq, dk, dv = _favor_attention_bwd(grad_out, q, k, v, projection, states, shifts, features, ctx.scale, ctx.eps)
    return dq, dk, dv, None, None, None, None


favor_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)
# The ops as the package calls them (op_call.EagerOp: the implementations directly in plain eager CPU calls).
_favor_attention_fwd = EagerOp(favor_attention_fwd, _forward, _setup_context, _autograd_backward)
_favor_attention_bwd = EagerOp(favor_attention_bwd, _backward)


def run(q: Tensor, k: Tensor, v: Tensor, features: PerformerFeatures, scale: float, eps: float) -> Tensor:
    """out (B, Hq, Nq, Dv) of FAVOR+ attention; `scale` is the softmax logit scale (q and k times sqrt(scale))."""
    projection = features.projection
    return _favor_attention_fwd(q, k, v, projection, scale, eps, _save_features(q, k, v, projection))[0]

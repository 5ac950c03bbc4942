"""torch.library custom ops for linear attention, with fakes, autograd and backend dispatch.

`torch.ops.attnkernels.linear_attention_fwd` / `linear_attention_bwd` take
already-validated arguments (see api.py) and pick the implementation when they
run: C++ for CPU tensors, Triton for CUDA tensors, or the one forced by
`attnkernels.backend(...)` ("reference" upcasts to float64 and runs the literal
sums of reference.py, then casts back).

Arguments shared by every backend:
- q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv); Hq % Hk == 0.
- feature_map in {"elu", "relu", "identity"}, applied elementwise to `scale * q`
  and to k (so the feature dimension M equals D; Performer features are applied
  in torch beforehand and arrive here as "identity").
- causal needs Nq == Nk; normalize=False drops the denominator; eps > 0.
- initial_s (B, Hk, D, Dv) and initial_z (B, Hk, D), both or neither, float32
  (float64 for float64 inputs).
- Returns out (B, Hq, Nq, Dv) in q's dtype and the final state
  S0 + Σ_j φ(k_j) v_jᵀ, z0 + Σ_j φ(k_j) over every key (causal or not), in the
  state dtype. Gradients flow to q, k, v only; the final state is not
  differentiable.
"""
from __future__ import annotations

import importlib.util
import types
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .reference import linear_attention_reference
from .reference_backward import linear_attention_reference_backward

TRITON_MODULE = "attnkernels.linear.triton_launch"


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The (S, z) dtype for inputs of `dtype`: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_status() -> tuple[bool, str]:
    """(usable, why not) for the Triton linear-attention kernels (written in another module)."""
    ok, why = backends.triton_status()
    if not ok:
        return ok, why
    if importlib.util.find_spec(TRITON_MODULE) is None:
        return False, f"{TRITON_MODULE} is missing (the Triton linear-attention kernels are not in this build)"
    return True, ""


def _select(q: Tensor) -> str:
    name = backends.select(q.device)
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"backend 'triton' is unavailable for linear attention: {why}")
    return name


def _fused_backend(q: Tensor, k: Tensor) -> str:
    """"cpu", "triton" or "reference" for this call: an empty sequence (Nq or Nk = 0) has
    nothing to fuse, so the reference handles it whatever the backend."""
    name = _select(q)
    return name if q.shape[2] > 0 and k.shape[2] > 0 else "reference"


def _call(feature_map, causal, normalize, eps, scale, initial_s, initial_z) -> types.SimpleNamespace:
    """The call object the Triton launchers take (a stand-in for the LinearCall to come)."""
    return types.SimpleNamespace(feature_map=feature_map, causal=causal, normalize=normalize, eps=eps, scale=scale,
                                 initial_s=initial_s, initial_z=initial_z)


def _initial_state(initial_s, initial_z):
    return None if initial_s is None else (initial_s.double(), initial_z.double())


@torch.library.custom_op("attnkernels::linear_attention_fwd", mutates_args=())
def linear_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature_map: str,
    causal: bool,
    normalize: bool,
    eps: float,
    scale: float,
    initial_s: Optional[Tensor],
    initial_z: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    name = _fused_backend(q, k)
    if name == "cpu":
        return backends.cpu_kernels().linear_attention_fwd(
            q.contiguous(), k.contiguous(), v.contiguous(), feature_map, causal, normalize, eps, scale, initial_s, initial_z
        )
    if name == "triton":
        from . import triton_launch

        return triton_launch.forward(_call(feature_map, causal, normalize, eps, scale, initial_s, initial_z), q, k, v)
    out, (s, z) = linear_attention_reference(
        q.double(), k.double(), v.double(), feature_map=feature_map, causal=causal, normalize=normalize,
        eps=eps, scale=scale, initial_state=_initial_state(initial_s, initial_z),
    )
    sdt = state_dtype(q.dtype)
    return out.to(q.dtype), s.to(sdt), z.to(sdt)


@linear_attention_fwd.register_fake
def _(q, k, v, feature_map, causal, normalize, eps, scale, initial_s, initial_z):
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, value_dim = k.shape[1], v.shape[-1]
    sdt = state_dtype(q.dtype)
    out = q.new_empty(batch, q_heads, q_len, value_dim)
    final_s = q.new_empty(batch, kv_heads, head_dim, value_dim, dtype=sdt)
    final_z = q.new_empty(batch, kv_heads, head_dim, dtype=sdt)
    return out, final_s, final_z


@torch.library.custom_op("attnkernels::linear_attention_bwd", mutates_args=())
def linear_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature_map: str,
    causal: bool,
    normalize: bool,
    eps: float,
    scale: float,
    initial_s: Optional[Tensor],
    initial_z: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    name = _fused_backend(q, k)
    if name == "cpu":
        return backends.cpu_kernels().linear_attention_bwd(
            dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), feature_map, causal, normalize,
            eps, scale, initial_s, initial_z,
        )
    if name == "triton":
        from . import triton_launch

        return triton_launch.backward(_call(feature_map, causal, normalize, eps, scale, initial_s, initial_z),
                                      dout, q, k, v)
    grads = linear_attention_reference_backward(
        dout.double(), q.double(), k.double(), v.double(), feature_map=feature_map, causal=causal,
        normalize=normalize, eps=eps, scale=scale, initial_state=_initial_state(initial_s, initial_z),
    )
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


@linear_attention_bwd.register_fake
def _(dout, q, k, v, feature_map, causal, normalize, eps, scale, initial_s, initial_z):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, feature_map, causal, normalize, eps, scale, initial_s, initial_z = inputs
    _, final_s, final_z = output
    ctx.save_for_backward(q, k, v, initial_s, initial_z)
    ctx.options = (feature_map, causal, normalize, eps, scale)
    # The carried state is an output for streaming, not a differentiable one
    # (api.py refuses an initial_state that requires grad, for the same reason).
    ctx.mark_non_differentiable(final_s, final_z)


def _backward(ctx, grad_out, grad_s, grad_z):
    q, k, v, initial_s, initial_z = ctx.saved_tensors
    dq, dk, dv = linear_attention_bwd(grad_out, q, k, v, *ctx.options, initial_s, initial_z)
    return dq, dk, dv, None, None, None, None, None, None, None


linear_attention_fwd.register_autograd(_backward, setup_context=_setup_context)

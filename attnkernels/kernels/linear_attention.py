"""Triton linear attention with fused elementwise feature maps, causal (chunked) and not,
forward and backward.

Contract (shared with `attnkernels.linear.reference`):
    φ = feature map on `scale * q` and on k: "elu" (elu + 1), "relu", "identity"
    out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps)        (normalize=False: out_i = φ(q_i)ᵀ S_i)
    S_i = S0 + Σ_j φ(k_j) v_jᵀ   [M, Dv],   z_i = z0 + Σ_j φ(k_j)   [M],   M = D
over j <= i (causal, Nq == Nk) or all j (non-causal). Query head h reads kv head
h // (Hq // Hk). The final state (S0 + Σ over all j) is float32.

Kernels (all deterministic: no atomics, each output element written by one program, every
sum taken in a fixed order)
- `linear_state`: one program per (batch*kv head, Dv tile) loops over key chunks and
  reduces S = S0 + φ(K)ᵀV, z = z0 + Σφ(K). The non-causal forward's (and backward's) state.
- `linear_fwd`: one program per (query chunk, batch*query head, Dv tile).
  Non-causal: out = φ(Q) S / (φ(Q) z + eps) with the full state from `linear_state`.
  Causal: the program walks the chunks in order (grid dim 0 is 1), carrying S, z in
  registers: per chunk C, out = φ(Q) S + tril(φ(Q) φ(K)ᵀ) V (and the same for the
  denominator), then S += φ(K)ᵀ V. No per-token state is ever formed; the carried state is
  [M, Dv tile], and the final state is written by the group's first query head.
  DEN_ONLY (for the backward): only den = φ(q)ᵀ z + eps per row, carrying z alone.
- Backward. With g_i = do_i / den_i and c_i = -(do_i · o_i) / den_i (normalize=False:
  g = do, c = 0; o and den are recomputed by `linear_fwd`):
      dφq_i = S_i g_i + c_i z_i                          (`linear_bwd_dq`, per D tile)
      dφk_j = dS_j v_j + dz_j,  dv_j = dS_jᵀ φ(k_j)       (`linear_bwd_dk` per D tile,
                                                         `linear_bwd_dv` per Dv tile)
  with dS_j = Σ_i φ(q_i) g_iᵀ and dz_j = Σ_i c_i φ(q_i) over the queries i that see key j
  (all query heads of the GQA group, in order). Causal: dq walks the chunks forward carrying
  S, z; dk and dv walk them in reverse carrying dS, dz, each plus an intra-chunk masked
  term. Non-causal: dq uses the full state; dk/dv reduce dS, dz over all queries first.
  Then dq = dφq ∘ φ'(scale q) · scale and dk = dφk ∘ φ'(k). Splitting dk (D tiles) from dv
  (Dv tiles) keeps each program's carried state a [tile, full] slice, which is what keeps
  D = 128 free of register spills.

Precision: dots that touch a carried state (S, dS) or a 1/den-scaled weight run on float32
operands with `input_precision=DOT_PREC`: "tf32" for fp16/bf16 inputs (a 16-bit value is
exact in TF32, and TF32's 8-bit exponent keeps the state, which grows with N, and the
weights, which shrink with N, away from fp16 overflow/underflow), and "ieee" for fp32
inputs unless TF32 matmuls are enabled, like torch. Dots of raw inputs in the backward
(do·vᵀ, φ(k)·φ(q)ᵀ) use the input dtype. Accumulation is float32 throughout. Float64 is not
supported here: the C++ kernels handle it on CPU.

Padding: D and Dv are padded to powers of two >= 16 (every tl.dot dimension >= 16). Padded
feature columns and rows past the sequence are forced to φ = 0 (elu+1 of a masked-out 0
would be 1 and pollute the sums).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .aot import KernelSpec

__all__ = [
    "linear_attention_forward",
    "linear_attention_backward",
    "chunk_config",
    "override_chunk",
    "FEATURE_MAPS",
    "AOT_SPECS",
]

# feature map ids, passed to the kernels as a constexpr
FEATURE_MAPS = {"identity": 0, "elu": 1, "relu": 2}


# ----------------------------------------------------------------------------------------
# Small jitted helpers
# ----------------------------------------------------------------------------------------


@triton.jit
def _phi(x, FEATURE_MAP: tl.constexpr):
    """φ(x), elementwise, x float32."""
    if FEATURE_MAP == 1:  # elu(x) + 1
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE_MAP == 2:  # relu
        y = tl.maximum(x, 0.0)
    else:  # identity
        y = x
    return y


@triton.jit
def _dphi(x, FEATURE_MAP: tl.constexpr):
    """φ'(x), elementwise, x float32 (relu'(0) = 0, like torch)."""
    if FEATURE_MAP == 1:
        y = tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE_MAP == 2:
        y = tl.where(x > 0, 1.0, 0.0)
    else:
        y = tl.full(x.shape, 1.0, tl.float32)
    return y


@triton.jit
def _load_rows(base, stride_n, n0, N, o_c, o_col, m_col):
    """Rows [n0, n0 + C) of a (N, cols) matrix whose last dim is contiguous, in its dtype;
    zeros outside (rows >= N or masked columns). Returns ([C, cols], row mask [C])."""
    o_n = n0 + o_c
    m_n = o_n < N
    # int64 scalar row offset (n * stride can pass 2^31), int32 in-tile offsets
    p = base + tl.cast(n0, tl.int64) * stride_n + (o_c[:, None] * stride_n + o_col[None, :])
    b_x = tl.load(p, mask=m_n[:, None] & m_col[None, :], other=0.0)
    return b_x, m_n


@triton.jit
def _store_rows(base, stride_n, n0, N, o_c, o_col, m_col, b_x):
    o_n = n0 + o_c
    # int64 scalar row offset (n * stride can pass 2^31), int32 in-tile offsets
    p = base + tl.cast(n0, tl.int64) * stride_n + (o_c[:, None] * stride_n + o_col[None, :])
    tl.store(p, b_x.to(base.dtype.element_ty), mask=(o_n < N)[:, None] & m_col[None, :])


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------


@triton.jit
def linear_state(K, V, S_IN, Z_IN, S_OUT, Z_OUT,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 Hk, Nk, chunks_per_split,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 FEATURE_MAP: tl.constexpr, HAS_STATE_IN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Partial sums of S = S_IN + φ(K)ᵀ V, z = Z_IN + Σ φ(K) for one (batch, kv head), one Dv
    tile and one split program_id(2) of the key chunks (split s: chunks
    [s * chunks_per_split, (s + 1) * chunks_per_split); split 0 adds the initial state).
    Split s stores into S_OUT[s], Z_OUT[s]; the launcher adds the splits in order. States are
    contiguous float32 (B, Hk, HEAD_DIM, HEAD_DIM_V) and (B, Hk, HEAD_DIM)."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_s = tl.program_id(2)
    i_b = i_bh // Hk
    i_hk = i_bh % Hk
    o_c = tl.arange(0, BLOCK_C)
    o_d = tl.arange(0, BLOCK_D)
    o_v = i_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_v = o_v < HEAD_DIM_V

    K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    V = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    s_off = i_bh.to(tl.int64) * HEAD_DIM * HEAD_DIM_V
    z_off = i_bh.to(tl.int64) * HEAD_DIM
    p_s = o_d[:, None] * HEAD_DIM_V + o_v[None, :]
    m_s = m_d[:, None] & m_v[None, :]
    if HAS_STATE_IN:
        b_s = tl.load(S_IN + s_off + p_s, mask=m_s & (i_s == 0), other=0.0)  # [BLOCK_D, BLOCK_DV]
        b_z = tl.load(Z_IN + z_off + o_d, mask=m_d & (i_s == 0), other=0.0)  # [BLOCK_D]
    else:
        b_s = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
        b_z = tl.zeros([BLOCK_D], dtype=tl.float32)

    i_lo = i_s * chunks_per_split
    i_hi = tl.minimum(i_lo + chunks_per_split, tl.cdiv(Nk, BLOCK_C))
    for i_t in range(i_lo, i_hi):
        n0 = i_t * BLOCK_C
        b_k, m_n = _load_rows(K, stride_kn, n0, Nk, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
        b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k.to(tl.float32), FEATURE_MAP), 0.0)
        b_v, m_n = _load_rows(V, stride_vn, n0, Nk, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
        b_v = b_v.to(tl.float32)
        b_s = tl.dot(tl.trans(b_fk), b_v, b_s, input_precision=DOT_PREC)  # [BLOCK_D, BLOCK_DV]
        b_z += tl.sum(b_fk, 0)

    n_bh = tl.num_programs(0).to(tl.int64)
    tl.store(S_OUT + i_s * n_bh * HEAD_DIM * HEAD_DIM_V + s_off + p_s, b_s, mask=m_s)
    if i_v == 0:
        tl.store(Z_OUT + i_s * n_bh * HEAD_DIM + z_off + o_d, b_z, mask=m_d)


@triton.jit
def linear_fwd(Q, K, V, O, S_IN, Z_IN, S_OUT, Z_OUT, DEN,
               stride_qb, stride_qh, stride_qn,
               stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn,
               stride_ob, stride_oh, stride_on,
               Hq, N, group, scale, eps,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
               HAS_STATE_IN: tl.constexpr, DEN_ONLY: tl.constexpr, DOT_PREC: tl.constexpr):
    """Output of query chunk program_id(0) (causal: of all chunks, in order) for one
    (batch, query head) and one Dv tile. N = Nq. S_IN/Z_IN: the initial state (causal) or
    the full state (non-causal). Causal programs of a group's first head store the final
    state in S_OUT/Z_OUT.

    DEN_ONLY (the backward's recompute, with NORMALIZE; one Dv tile): store only
    den = φ(q)ᵀ z + eps per query row (DEN, float32 (B, Hq, N)); no S, V or out, so it
    carries z alone and stays light."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_v = tl.program_id(2)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // group  # GQA: query head h reads kv head h // group
    i_bhk = i_b * (Hq // group) + i_hk
    o_c = tl.arange(0, BLOCK_C)
    o_d = tl.arange(0, BLOCK_D)
    o_v = i_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_v = o_v < HEAD_DIM_V

    Q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    V = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    O = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    s_off = i_bhk.to(tl.int64) * HEAD_DIM * HEAD_DIM_V
    z_off = i_bhk.to(tl.int64) * HEAD_DIM
    p_s = o_d[:, None] * HEAD_DIM_V + o_v[None, :]
    m_s = m_d[:, None] & m_v[None, :]
    if HAS_STATE_IN:
        if DEN_ONLY:
            b_s = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)  # unused
        else:
            b_s = tl.load(S_IN + s_off + p_s, mask=m_s, other=0.0)  # [BLOCK_D, BLOCK_DV]
        b_z = tl.load(Z_IN + z_off + o_d, mask=m_d, other=0.0)  # [BLOCK_D]
    else:
        b_s = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
        b_z = tl.zeros([BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        i_lo = 0
        i_hi = tl.cdiv(N, BLOCK_C)
    else:
        i_lo = i_c
        i_hi = i_c + 1
    m_causal = o_c[:, None] >= o_c[None, :]  # [BLOCK_C, BLOCK_C], key j <= query i
    if DEN_ONLY:
        for i_t in range(i_lo, i_hi):
            n0 = i_t * BLOCK_C
            b_q, m_n = _load_rows(Q, stride_qn, n0, N, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
            b_fq = tl.where(m_n[:, None] & m_d[None, :], _phi(b_q.to(tl.float32) * scale, FEATURE_MAP), 0.0)
            b_den = tl.sum(b_fq * b_z[None, :], 1)  # [BLOCK_C]
            if CAUSAL:
                b_k, m_n = _load_rows(K, stride_kn, n0, N, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
                b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k.to(tl.float32), FEATURE_MAP), 0.0)
                b_a = tl.where(m_causal, tl.dot(b_fq, tl.trans(b_fk), input_precision=DOT_PREC), 0.0)
                b_den += tl.sum(b_a, 1)
                b_z += tl.sum(b_fk, 0)
            tl.store(DEN + i_bh.to(tl.int64) * N + n0 + o_c, b_den + eps, mask=n0 + o_c < N)
    else:
        for i_t in range(i_lo, i_hi):
            n0 = i_t * BLOCK_C
            b_q, m_n = _load_rows(Q, stride_qn, n0, N, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
            b_fq = tl.where(m_n[:, None] & m_d[None, :], _phi(b_q.to(tl.float32) * scale, FEATURE_MAP), 0.0)
            # inter-chunk: the state carried from the previous chunks (or the full state)
            b_num = tl.dot(b_fq, b_s, input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_DV]
            b_den = tl.sum(b_fq * b_z[None, :], 1)  # [BLOCK_C]
            if CAUSAL:
                b_k, m_n = _load_rows(K, stride_kn, n0, N, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
                b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k.to(tl.float32), FEATURE_MAP), 0.0)
                b_v, m_n = _load_rows(V, stride_vn, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
                b_v = b_v.to(tl.float32)
                # intra-chunk: masked φ(Q) φ(K)ᵀ, [BLOCK_C, BLOCK_C]
                b_a = tl.dot(b_fq, tl.trans(b_fk), input_precision=DOT_PREC)
                b_a = tl.where(m_causal, b_a, 0.0)
                b_num = tl.dot(b_a, b_v, b_num, input_precision=DOT_PREC)
                b_den += tl.sum(b_a, 1)
                # carry the chunk into the state
                b_s = tl.dot(tl.trans(b_fk), b_v, b_s, input_precision=DOT_PREC)  # [BLOCK_D, BLOCK_DV]
                b_z += tl.sum(b_fk, 0)
            if NORMALIZE:
                b_o = b_num / (b_den + eps)[:, None]
            else:
                b_o = b_num
            _store_rows(O, stride_on, n0, N, o_c, o_v, m_v, b_o)

    if CAUSAL and not DEN_ONLY:
        if i_h % group == 0:  # every head of the group carries the same state: one writes it
            tl.store(S_OUT + s_off + p_s, b_s, mask=m_s)
            if i_v == 0:
                tl.store(Z_OUT + z_off + o_d, b_z, mask=m_d)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------


@triton.jit
def _row_scalars(DEN, CC, n0, N, o_c, BLOCK_C: tl.constexpr, NORMALIZE: tl.constexpr):
    """1/den and c of rows [n0, n0 + C) ([BLOCK_C] each; 1 and 0 past N or without NORMALIZE).
    DEN and CC point at this (batch, query head)'s row 0."""
    if NORMALIZE:
        m_n = n0 + o_c < N
        b_rden = 1.0 / tl.load(DEN + n0 + o_c, mask=m_n, other=1.0)
        b_cc = tl.load(CC + n0 + o_c, mask=m_n, other=0.0)
    else:
        b_rden = tl.full([BLOCK_C], 1.0, tl.float32)
        b_cc = tl.zeros([BLOCK_C], dtype=tl.float32)
    return b_rden, b_cc


@triton.jit
def _query_chunk(Q, DO, DEN, CC, i_b, i_h, Hq, Nq, n0, scale,
                 stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                 o_c, o_d, m_d, o_v, m_v,
                 FEATURE_MAP: tl.constexpr, BLOCK_C: tl.constexpr, NORMALIZE: tl.constexpr):
    """What the backward kernels read of query rows [n0, n0 + C) of head (i_b, i_h):
    φ(scale·q) [BLOCK_C, cols of o_d] (0 outside), dO [BLOCK_C, cols of o_v], 1/den and c."""
    Qh = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    DOh = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    off_r = (i_b * Hq + i_h).to(tl.int64) * Nq
    b_q, m_q = _load_rows(Qh, stride_qn, n0, Nq, o_c, o_d, m_d)
    b_fq = tl.where(m_q[:, None] & m_d[None, :], _phi(b_q.to(tl.float32) * scale, FEATURE_MAP), 0.0)
    b_do, m_q = _load_rows(DOh, stride_don, n0, Nq, o_c, o_v, m_v)
    b_rden, b_cc = _row_scalars(DEN + off_r, CC + off_r, n0, Nq, o_c, BLOCK_C, NORMALIZE)
    return b_fq, b_do, b_rden, b_cc


@triton.jit
def linear_bwd_dq(Q, K, V, DO, DQ, S_IN, Z_IN, DEN, CC,
                  stride_qb, stride_qh, stride_qn,
                  stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn,
                  stride_dob, stride_doh, stride_don,
                  stride_dqb, stride_dqh, stride_dqn,
                  Hq, N, group, scale,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DV: tl.constexpr,
                  FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
                  HAS_STATE_IN: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ[..., D tile program_id(2)] of query chunk program_id(0) (causal: all chunks, in
    order) for one (batch, query head). Holds the state rows of its D tile with the full Dv:
    S [BLOCK_DT, BLOCK_DV], z [BLOCK_DT]. DEN/CC: den and c per query row (B, Hq, N)."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_d = tl.program_id(2)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // group
    i_bhk = i_b * (Hq // group) + i_hk
    o_c = tl.arange(0, BLOCK_C)
    o_d = i_d * BLOCK_DT + tl.arange(0, BLOCK_DT)
    o_v = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_v = o_v < HEAD_DIM_V

    Q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    V = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    DO = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    DQ = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    DEN = DEN + i_bh.to(tl.int64) * N
    CC = CC + i_bh.to(tl.int64) * N
    s_off = i_bhk.to(tl.int64) * HEAD_DIM * HEAD_DIM_V
    z_off = i_bhk.to(tl.int64) * HEAD_DIM
    if HAS_STATE_IN:
        b_s = tl.load(S_IN + s_off + o_d[:, None] * HEAD_DIM_V + o_v[None, :],
                      mask=m_d[:, None] & m_v[None, :], other=0.0)  # [BLOCK_DT, BLOCK_DV]
        b_z = tl.load(Z_IN + z_off + o_d, mask=m_d, other=0.0)  # [BLOCK_DT]
    else:
        b_s = tl.zeros([BLOCK_DT, BLOCK_DV], dtype=tl.float32)
        b_z = tl.zeros([BLOCK_DT], dtype=tl.float32)

    if CAUSAL:
        i_lo = 0
        i_hi = tl.cdiv(N, BLOCK_C)
    else:
        i_lo = i_c
        i_hi = i_c + 1
    m_causal = o_c[:, None] >= o_c[None, :]  # [BLOCK_C, BLOCK_C]: key j <= query i
    for i_t in range(i_lo, i_hi):
        n0 = i_t * BLOCK_C
        b_q, m_n = _load_rows(Q, stride_qn, n0, N, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_DT]
        b_q = b_q.to(tl.float32) * scale
        b_do, m_n = _load_rows(DO, stride_don, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV], input dtype
        b_rden, b_cc = _row_scalars(DEN, CC, n0, N, o_c, BLOCK_C, NORMALIZE)
        if NORMALIZE:
            b_g = b_do.to(tl.float32) * b_rden[:, None]  # g = do / den
        else:
            b_g = b_do.to(tl.float32)
        # dφq = g Sᵀ + c zᵀ with the carried (causal) or full state (+ the intra-chunk term)
        if NORMALIZE:
            b_dfq = b_cc[:, None] * b_z[None, :]  # [BLOCK_C, BLOCK_DT]
        else:
            b_dfq = tl.zeros([BLOCK_C, BLOCK_DT], dtype=tl.float32)
        if CAUSAL:
            b_k, m_n = _load_rows(K, stride_kn, n0, N, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_DT]
            b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k.to(tl.float32), FEATURE_MAP), 0.0)
            b_v, m_n = _load_rows(V, stride_vn, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV], input dtype
            # intra-chunk: P[i, j] = g_i · v_j + c_i for j <= i; do and v are exact in the input dtype
            b_p = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_C]
            if NORMALIZE:
                b_p = tl.where(m_causal, b_p * b_rden[:, None] + b_cc[:, None], 0.0)
            else:
                b_p = tl.where(m_causal, b_p, 0.0)
            b_dfq = tl.dot(b_p, b_fk, b_dfq, input_precision=DOT_PREC)
            b_dfq = tl.dot(b_g, tl.trans(b_s), b_dfq, input_precision=DOT_PREC)  # before S takes the chunk
            b_s = tl.dot(tl.trans(b_fk), b_v.to(tl.float32), b_s, input_precision=DOT_PREC)
            b_z += tl.sum(b_fk, 0)
        else:
            b_dfq = tl.dot(b_g, tl.trans(b_s), b_dfq, input_precision=DOT_PREC)
        b_dq = b_dfq * _dphi(b_q, FEATURE_MAP) * scale
        _store_rows(DQ, stride_dqn, n0, N, o_c, o_d, m_d, b_dq)


@triton.jit
def linear_bwd_dk(Q, K, V, DO, DK, DEN, CC,
                  stride_qb, stride_qh, stride_qn,
                  stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn,
                  stride_dob, stride_doh, stride_don,
                  stride_dkb, stride_dkh, stride_dkn,
                  Hk, Nq, Nk, group, scale,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DV: tl.constexpr,
                  FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """dK[..., D tile program_id(1)] of one (batch, kv head), summed over the group's query
    heads in order. dφk_j = dS v_j + dz (+ the intra-chunk term), with dS = Σ φ(q_i) g_iᵀ
    [BLOCK_DT, BLOCK_DV] and dz = Σ c_i φ(q_i) [BLOCK_DT] over the queries that see key j."""
    i_bh = tl.program_id(0)
    i_d = tl.program_id(1)
    i_b = i_bh // Hk
    i_hk = i_bh % Hk
    Hq = Hk * group
    o_c = tl.arange(0, BLOCK_C)
    o_d = i_d * BLOCK_DT + tl.arange(0, BLOCK_DT)
    o_v = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_v = o_v < HEAD_DIM_V
    K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    V = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    DK = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    b_ds = tl.zeros([BLOCK_DT, BLOCK_DV], dtype=tl.float32)
    b_dz = tl.zeros([BLOCK_DT], dtype=tl.float32)
    m_causal_t = o_c[:, None] <= o_c[None, :]  # [BLOCK_C (key j), BLOCK_C (query i)]: j <= i

    if CAUSAL:
        n_t = tl.cdiv(Nk, BLOCK_C)
        for i_r in range(0, n_t):
            n0 = (n_t - 1 - i_r) * BLOCK_C  # reverse order: dS holds the later chunks' queries
            b_k, m_n = _load_rows(K, stride_kn, n0, Nk, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_DT]
            b_v, m_n = _load_rows(V, stride_vn, n0, Nk, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
            b_dfk = tl.dot(b_v.to(tl.float32), tl.trans(b_ds), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_DT]
            if NORMALIZE:
                b_dfk += b_dz[None, :]
            for i_g in range(0, group):
                i_h = i_hk * group + i_g
                b_fq, b_do, b_rden, b_cc = _query_chunk(Q, DO, DEN, CC, i_b, i_h, Hq, Nq, n0, scale,
                                                        stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                                                        o_c, o_d, m_d, o_v, m_v, FEATURE_MAP, BLOCK_C, NORMALIZE)
                # intra-chunk: Pᵀ[j, i] = v_j · g_i + c_i for j <= i
                b_pt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_C]
                b_pt = tl.where(m_causal_t, b_pt * b_rden[None, :] + b_cc[None, :], 0.0)
                b_dfk = tl.dot(b_pt, b_fq, b_dfk, input_precision=DOT_PREC)
                # this chunk's queries join dS for the earlier chunks
                b_g = b_do.to(tl.float32) * b_rden[:, None]  # [BLOCK_C, BLOCK_DV]
                b_ds = tl.dot(tl.trans(b_fq), b_g, b_ds, input_precision=DOT_PREC)
                b_dz += tl.sum(b_fq * b_cc[:, None], 0)
            b_dk = b_dfk * _dphi(b_k.to(tl.float32), FEATURE_MAP)
            _store_rows(DK, stride_dkn, n0, Nk, o_c, o_d, m_d, b_dk)
    else:
        # every key sees every query: reduce dS, dz over all queries of the group first
        for i_g in range(0, group):
            i_h = i_hk * group + i_g
            for i_t in range(0, tl.cdiv(Nq, BLOCK_C)):
                n0 = i_t * BLOCK_C
                b_fq, b_do, b_rden, b_cc = _query_chunk(Q, DO, DEN, CC, i_b, i_h, Hq, Nq, n0, scale,
                                                        stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                                                        o_c, o_d, m_d, o_v, m_v, FEATURE_MAP, BLOCK_C, NORMALIZE)
                b_g = b_do.to(tl.float32) * b_rden[:, None]
                b_ds = tl.dot(tl.trans(b_fq), b_g, b_ds, input_precision=DOT_PREC)
                b_dz += tl.sum(b_fq * b_cc[:, None], 0)
        for i_t in range(0, tl.cdiv(Nk, BLOCK_C)):
            n0 = i_t * BLOCK_C
            b_k, m_n = _load_rows(K, stride_kn, n0, Nk, o_c, o_d, m_d)
            b_v, m_n = _load_rows(V, stride_vn, n0, Nk, o_c, o_v, m_v)
            b_dfk = tl.dot(b_v.to(tl.float32), tl.trans(b_ds), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_DT]
            if NORMALIZE:
                b_dfk += b_dz[None, :]
            b_dk = b_dfk * _dphi(b_k.to(tl.float32), FEATURE_MAP)
            _store_rows(DK, stride_dkn, n0, Nk, o_c, o_d, m_d, b_dk)


@triton.jit
def linear_bwd_dv(Q, K, DO, DV, DEN,
                  stride_qb, stride_qh, stride_qn,
                  stride_kb, stride_kh, stride_kn,
                  stride_dob, stride_doh, stride_don,
                  stride_dvb, stride_dvh, stride_dvn,
                  Hk, Nq, Nk, group, scale,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DVT: tl.constexpr,
                  FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """dV[..., Dv tile program_id(1)] of one (batch, kv head), summed over the group's query
    heads in order: dv_j = dSᵀ φ(k_j) (+ the intra-chunk term), dS [BLOCK_D, BLOCK_DVT]."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b = i_bh // Hk
    i_hk = i_bh % Hk
    Hq = Hk * group
    o_c = tl.arange(0, BLOCK_C)
    o_d = tl.arange(0, BLOCK_D)
    o_v = i_v * BLOCK_DVT + tl.arange(0, BLOCK_DVT)
    m_d = o_d < HEAD_DIM
    m_v = o_v < HEAD_DIM_V
    K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    DV = DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
    b_ds = tl.zeros([BLOCK_D, BLOCK_DVT], dtype=tl.float32)
    m_causal_t = o_c[:, None] <= o_c[None, :]  # [BLOCK_C (key j), BLOCK_C (query i)]: j <= i

    if CAUSAL:
        n_t = tl.cdiv(Nk, BLOCK_C)
        for i_r in range(0, n_t):
            n0 = (n_t - 1 - i_r) * BLOCK_C  # reverse order
            b_k, m_n = _load_rows(K, stride_kn, n0, Nk, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
            b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k.to(tl.float32), FEATURE_MAP), 0.0)
            b_dv = tl.dot(b_fk, b_ds, input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_DVT]
            for i_g in range(0, group):
                i_h = i_hk * group + i_g
                b_fq, b_do, b_rden, b_cc = _query_chunk(Q, DO, DEN, DEN, i_b, i_h, Hq, Nq, n0, scale,
                                                        stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                                                        o_c, o_d, m_d, o_v, m_v, FEATURE_MAP, BLOCK_C, NORMALIZE)
                b_g = b_do.to(tl.float32) * b_rden[:, None]  # [BLOCK_C, BLOCK_DVT]
                # intra-chunk: Aᵀ[j, i] = φ(k_j) · φ(q_i) for j <= i
                b_at = tl.dot(b_fk.to(K.dtype.element_ty), tl.trans(b_fq.to(K.dtype.element_ty)),
                              input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_C]
                b_at = tl.where(m_causal_t, b_at, 0.0)
                b_dv = tl.dot(b_at, b_g, b_dv, input_precision=DOT_PREC)
                b_ds = tl.dot(tl.trans(b_fq), b_g, b_ds, input_precision=DOT_PREC)
            _store_rows(DV, stride_dvn, n0, Nk, o_c, o_v, m_v, b_dv)
    else:
        for i_g in range(0, group):
            i_h = i_hk * group + i_g
            for i_t in range(0, tl.cdiv(Nq, BLOCK_C)):
                n0 = i_t * BLOCK_C
                b_fq, b_do, b_rden, b_cc = _query_chunk(Q, DO, DEN, DEN, i_b, i_h, Hq, Nq, n0, scale,
                                                        stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                                                        o_c, o_d, m_d, o_v, m_v, FEATURE_MAP, BLOCK_C, NORMALIZE)
                b_ds = tl.dot(tl.trans(b_fq), b_do.to(tl.float32) * b_rden[:, None], b_ds, input_precision=DOT_PREC)
        for i_t in range(0, tl.cdiv(Nk, BLOCK_C)):
            n0 = i_t * BLOCK_C
            b_k, m_n = _load_rows(K, stride_kn, n0, Nk, o_c, o_d, m_d)
            b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k.to(tl.float32), FEATURE_MAP), 0.0)
            b_dv = tl.dot(b_fk, b_ds, input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_DVT]
            _store_rows(DV, stride_dvn, n0, Nk, o_c, o_v, m_v, b_dv)


# ----------------------------------------------------------------------------------------
# Chunk configs
# ----------------------------------------------------------------------------------------


class ChunkConfig(NamedTuple):
    block_c: int  # chunk length C
    block_t: int  # the tiled dim: Dv for "state"/"fwd"/"dv", D for "dq"/"dk" (the other is whole)
    num_warps: int
    num_stages: int
    # all 255 registers per thread: else ptxas may spill a few bytes to keep 2 blocks per SM
    maxnreg: int = 255


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


_CHUNK_OVERRIDE: int | None = None
STATE_SPLIT_MIN_CHUNKS = 4  # fewest key chunks one `linear_state` program sums


@contextlib.contextmanager
def override_chunk(block_c: int):
    """Test hook: launch every kernel with chunk length `block_c` (a power of two >= 16), so
    small interpreter shapes span several chunks. Only the tile size changes."""
    global _CHUNK_OVERRIDE
    previous, _CHUNK_OVERRIDE = _CHUNK_OVERRIDE, block_c
    try:
        yield
    finally:
        _CHUNK_OVERRIDE = previous


def chunk_config(kernel: str, head_dim: int, head_dim_v: int, dtype: torch.dtype = torch.float16,
                 causal: bool = True) -> ChunkConfig:
    """GPU launch config per kernel ("state", "fwd", "dq", "dk", "dv") and padded dims.

    Every program keeps a state tile in registers across its chunk loop ([D, Dv tile] for
    state/fwd/dv, [D tile, Dv] for dq/dk) next to the chunk's [C, D] / [C, Dv] tiles, and
    mma.sync (sm_80) holds each dot's whole-K operands in registers, float32 ones for the
    state products. So the chunk is short (16-32) and the tiles narrow; chosen so that
    nothing spills on sm_80/sm_90a (`python -m attnkernels.tools.compile_report`). fp32
    inputs also keep the raw-input dot operands in 4 bytes, and an exact fp32 dot runs as
    FMAs, so their tiles are narrower.
    """
    d, dv = _pad_dim(head_dim), _pad_dim(head_dim_v)
    big = max(d, dv)
    wide = dtype == torch.float32
    tile = 32 if big <= 32 or (big <= 64 and not wide) else 16
    if kernel in ("state", "fwd"):
        cfg = ChunkConfig(32 if big <= 32 else 16, min(dv, tile), 8, 1)
    elif kernel == "dq":
        cfg = ChunkConfig(16, min(d, tile), 8, 1)
    # the warp counts below are empirical: ptxas sometimes spills a few bytes at 8 warps
    # where 4 fit (fp32 D=64 dK, non-causal dV), and the reverse for causal fp32 dV
    elif kernel == "dk":
        cfg = ChunkConfig(16, min(d, tile), 4 if wide and big <= 64 else 8, 1)
    elif kernel == "dv":
        if causal:
            cfg = ChunkConfig(16, min(dv, tile), 8 if wide and big >= 64 else 4, 1)
        else:
            cfg = ChunkConfig(16, min(dv, 32) if wide else min(dv, tile), 8 if wide else 4, 1)
    else:
        raise ValueError(f"chunk_config: unknown kernel {kernel!r}")
    if _CHUNK_OVERRIDE is not None:
        cfg = cfg._replace(block_c=_CHUNK_OVERRIDE)
    return cfg


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 stays exact ("ieee") unless the user enabled TF32 matmuls, like torch; 16-bit
    inputs run their (float32-operand) dots in TF32, which holds a 16-bit value exactly."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _prepare(q, k, v, feature_map, causal, scale, initial_s, initial_z):
    """Checks the launcher's own preconditions and returns the normalised arguments."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"linear attention (triton): feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"linear attention (triton): dtype {q.dtype} is not supported (fp16, bf16, fp32); "
                        "float64 runs on the C++ kernels")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"linear attention (triton): q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    if q_heads % kv_heads:
        raise ValueError(f"linear attention (triton): Hq={q_heads} is not a multiple of Hk={kv_heads}")
    if causal and q_len != kv_len:
        raise ValueError(f"linear attention (triton): causal needs Nq == Nk, got {q_len} and {kv_len}")
    if scale is None:  # the reference's convention: no scaling (callers normally resolve it)
        scale = 1.0
    if (initial_s is None) != (initial_z is None):
        raise ValueError("linear attention (triton): initial_s and initial_z must be given together")
    if initial_s is not None:
        if tuple(initial_s.shape) != (batch, kv_heads, head_dim, head_dim_v) or tuple(initial_z.shape) != (batch, kv_heads, head_dim):
            raise ValueError(f"linear attention (triton): initial state must be S {(batch, kv_heads, head_dim, head_dim_v)} "
                             f"and z {(batch, kv_heads, head_dim)}, got {tuple(initial_s.shape)} and {tuple(initial_z.shape)}")
        initial_s = initial_s.to(device=q.device, dtype=torch.float32).contiguous()
        initial_z = initial_z.to(device=q.device, dtype=torch.float32).contiguous()
    return q, k, v, float(scale), initial_s, initial_z


def _full_state(k, v, fm, initial_s, initial_z, prec):
    """(S, z) = initial state + the sums over all keys, float32, by `linear_state`."""
    batch, kv_heads, kv_len, head_dim = k.shape
    head_dim_v = v.shape[-1]
    s = torch.empty(batch, kv_heads, head_dim, head_dim_v, dtype=torch.float32, device=k.device)
    z = torch.empty(batch, kv_heads, head_dim, dtype=torch.float32, device=k.device)
    if s.numel() == 0:
        return s, z
    cfg = chunk_config("state", head_dim, head_dim_v, k.dtype)
    has_in = initial_s is not None
    n_dv = _cdiv(head_dim_v, cfg.block_t)
    n_chunks = _cdiv(kv_len, cfg.block_c)
    # chunk-parallel: enough programs to fill a GPU (~2 per SM of a 132-SM part), each summing
    # a run of >= STATE_SPLIT_MIN_CHUNKS chunks; the partials are added in split order
    n_split = max(1, min(_cdiv(n_chunks, STATE_SPLIT_MIN_CHUNKS), _cdiv(264, batch * kv_heads * n_dv)))
    per_split = _cdiv(n_chunks, n_split) if n_chunks else 1
    n_split = _cdiv(n_chunks, per_split) if n_chunks else 1
    if n_split > 1:
        s_part = torch.empty(n_split, *s.shape, dtype=torch.float32, device=k.device)
        z_part = torch.empty(n_split, *z.shape, dtype=torch.float32, device=k.device)
    else:
        s_part, z_part = s, z
    linear_state[(batch * kv_heads, n_dv, n_split)](
        k, v, initial_s if has_in else s, initial_z if has_in else z, s_part, z_part,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kv_heads, kv_len, per_split,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_C=cfg.block_c, BLOCK_D=_pad_dim(head_dim),
        BLOCK_DV=cfg.block_t, FEATURE_MAP=fm, HAS_STATE_IN=has_in, DOT_PREC=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
    )
    if n_split > 1:
        torch.sum(s_part, 0, out=s)
        torch.sum(z_part, 0, out=z)
    return s, z


def _launch_fwd(q, k, v, out, fm, causal, normalize, eps, scale, initial_s, initial_z, prec, full_state=None,
                den_only=False):
    """Runs `linear_fwd`: out and, causal, the final state (returned as (S, z)); or, with
    `den_only` (the backward's recompute), only den per query row (returned)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, head_dim_v = k.shape[1], v.shape[-1]
    cfg = chunk_config("fwd", head_dim, head_dim_v, q.dtype)
    f32 = dict(dtype=torch.float32, device=q.device)
    if den_only:
        n_dv = 1  # den does not depend on Dv
        den = torch.empty(batch, q_heads, q_len, **f32)
        out = s_out = z_out = den  # unused
    else:
        n_dv = _cdiv(head_dim_v, cfg.block_t)
        den = out  # unused
        s_out = torch.empty(batch, kv_heads, head_dim, head_dim_v, **f32)
        z_out = torch.empty(batch, kv_heads, head_dim, **f32)
    if causal:
        has_in = initial_s is not None
        s_in, z_in = (initial_s, initial_z) if has_in else (s_out, z_out)
        grid = (1, batch * q_heads, n_dv)  # one program walks all chunks in order
    else:
        s_in, z_in = full_state
        has_in = True
        grid = (_cdiv(q_len, cfg.block_c), batch * q_heads, n_dv)
    if grid[0] * grid[1] > 0:
        linear_fwd[grid](
            q, k, v, out, s_in, z_in, s_out, z_out, den,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            0 if den_only else out.stride(0), 0 if den_only else out.stride(1), 0 if den_only else out.stride(2),
            q_heads, q_len, q_heads // kv_heads, scale, float(eps),
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_C=cfg.block_c, BLOCK_D=_pad_dim(head_dim),
            BLOCK_DV=cfg.block_t, FEATURE_MAP=fm, CAUSAL=causal, NORMALIZE=normalize,
            HAS_STATE_IN=has_in, DEN_ONLY=den_only, DOT_PREC=prec, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
        )
    return den if den_only else (s_out, z_out)


def linear_attention_forward(q, k, v, feature_map: str, causal: bool, normalize: bool, eps: float,
                             scale: float, initial_s, initial_z):
    """(out (B, Hq, Nq, Dv) in q's dtype, final S (B, Hk, D, Dv), final z (B, Hk, D) float32)."""
    q, k, v, scale, initial_s, initial_z = _prepare(q, k, v, feature_map, causal, scale, initial_s, initial_z)
    batch, q_heads, q_len, head_dim = q.shape
    fm, prec = FEATURE_MAPS[feature_map], _dot_precision(q.dtype)
    out = torch.empty(batch, q_heads, q_len, v.shape[-1], dtype=q.dtype, device=q.device)
    if causal:
        s_out, z_out = _launch_fwd(q, k, v, out, fm, True, normalize, eps, scale, initial_s, initial_z, prec)
    else:
        s_out, z_out = _full_state(k, v, fm, initial_s, initial_z, prec)
        _launch_fwd(q, k, v, out, fm, False, normalize, eps, scale, None, None, prec, full_state=(s_out, z_out))
    return out, s_out, z_out


def linear_attention_backward(dout, q, k, v, feature_map: str, causal: bool, normalize: bool, eps: float,
                              scale: float, initial_s, initial_z):
    """(dq, dk, dv) in the inputs' dtypes; the forward is recomputed (no gradient to the state).

    With normalize, `linear_fwd` first recomputes out and (DEN_ONLY) den, giving
    c = -(do · o) / den per query row; then `linear_bwd_dq` (per D tile), `linear_bwd_dk` (per D tile) and `linear_bwd_dv`
    (per Dv tile) run independently."""
    q, k, v, scale, initial_s, initial_z = _prepare(q, k, v, feature_map, causal, scale, initial_s, initial_z)
    dout = _last_dim_contiguous(dout.to(q.dtype))
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    fm, prec = FEATURE_MAPS[feature_map], _dot_precision(q.dtype)
    group = q_heads // kv_heads
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0 and dk.numel() == 0 and dv.numel() == 0:
        return dq, dk, dv
    full_state = None if causal else _full_state(k, v, fm, initial_s, initial_z, prec)
    if normalize:
        # recompute out, then den; c = -(do · o) / den per query row (float32, (B, Hq, Nq))
        out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=q.dtype, device=q.device)
        _launch_fwd(q, k, v, out, fm, causal, True, eps, scale, initial_s, initial_z, prec, full_state=full_state)
        den = _launch_fwd(q, k, v, None, fm, causal, True, eps, scale, initial_s, initial_z, prec,
                          full_state=full_state, den_only=True)
        cc = -(dout.float() * out.float()).sum(-1) / den
    else:
        den = cc = torch.zeros(1, dtype=torch.float32, device=q.device)  # unused
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, FEATURE_MAP=fm, CAUSAL=causal, NORMALIZE=normalize,
                  DOT_PREC=prec)
    pad_d, pad_dv = _pad_dim(head_dim), _pad_dim(head_dim_v)

    if causal:
        has_in = initial_s is not None
        s_in, z_in = (initial_s, initial_z) if has_in else (den, den)  # unused without a state
    else:
        (s_in, z_in), has_in = full_state, True
    cfg = chunk_config("dq", head_dim, head_dim_v, q.dtype)
    grid = (1 if causal else _cdiv(q_len, cfg.block_c), batch * q_heads, _cdiv(head_dim, cfg.block_t))
    if grid[0] * grid[1] > 0:
        linear_bwd_dq[grid](
            q, k, v, dout, dq, s_in, z_in, den, cc,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            q_heads, q_len, group, scale,
            BLOCK_C=cfg.block_c, BLOCK_DT=cfg.block_t, BLOCK_DV=pad_dv, HAS_STATE_IN=has_in,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, **common,
        )
    if kv_len == 0:
        return dq, dk, dv
    cfg = chunk_config("dk", head_dim, head_dim_v, q.dtype)
    linear_bwd_dk[(batch * kv_heads, _cdiv(head_dim, cfg.block_t))](
        q, k, v, dout, dk, den, cc,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        kv_heads, q_len, kv_len, group, scale,
        BLOCK_C=cfg.block_c, BLOCK_DT=cfg.block_t, BLOCK_DV=pad_dv,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, **common,
    )
    cfg = chunk_config("dv", head_dim, head_dim_v, q.dtype, causal)
    linear_bwd_dv[(batch * kv_heads, _cdiv(head_dim_v, cfg.block_t))](
        q, k, dout, dv, den,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        kv_heads, q_len, kv_len, group, scale,
        BLOCK_C=cfg.block_c, BLOCK_D=pad_d, BLOCK_DVT=cfg.block_t,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# Ahead-of-time compile declarations (checked by `python -m attnkernels.tools.compile_report`)
# ----------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FP32_ARGS = {"S_IN", "Z_IN", "S_OUT", "Z_OUT", "DEN", "CC"}
_INT_ARGS = {"Hq", "Hk", "N", "Nq", "Nk", "group", "chunks_per_split"}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    """Triton type per argument, from the naming convention of this file: data tensors are
    upper-case in the input dtype, states and per-row DEN/CC float32; strides and sizes i32."""
    sig = {}
    for name, param in inspect.signature(fn.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            assert name in constexprs, f"{fn.__name__}: constexpr {name} needs a value"
            sig[name] = "constexpr"
        elif name in _FP32_ARGS:
            sig[name] = "*fp32"
        elif name.startswith("stride_") or name in _INT_ARGS:  # before isupper(): "N"
            sig[name] = "i32"
        elif name.isupper():
            sig[name] = f"*{dtype}"
        elif name in ("scale", "eps"):
            sig[name] = "fp32"
        else:
            raise AssertionError(f"{fn.__name__}: no Triton type for argument {name!r}")
    return sig


def _divisibility(signature: dict) -> dict:
    """The specialization the JIT gives a launch on contiguous (or BNHD-transposed) tensors
    with head dims that are multiples of 16: every pointer 16-byte aligned (torch and the
    launchers' float32 buffers are) and every stride divisible by 16. Sizes get nothing."""
    div = [["tt.divisibility", 16]]
    return {name: div for name, ty in signature.items() if ty.startswith("*") or name.startswith("stride_")}


_AOT_HEAD_DIMS = (32, 64, 128)
_AOT_QUICK = (64, True, "elu", True)  # (D, causal, map, normalize) of each group's --quick spec
# (label, torch dtype, dot precision): fp32 ships exact ("ieee": FMA on CUDA cores, no mma by
# design) and TF32 (torch.backends.cuda.matmul.allow_tf32); 16-bit inputs always dot in TF32
_AOT_DTYPES = [
    ("fp16", torch.float16, "tf32"),
    ("bf16", torch.bfloat16, "tf32"),
    ("fp32", torch.float32, "ieee"),
    ("tf32", torch.float32, "tf32"),
]
# (feature map, normalize) variants: every map with the denominator, and elu without it;
# the TF32 label ships the same code as fp32, so it is compiled for the default one only
_AOT_MAPS = [("elu", True), ("relu", True), ("identity", True), ("elu", False)]


def _kernel_constexprs(kernel: str, d: int, fm: str, causal: bool, normalize: bool, dtype, prec: str) -> tuple:
    """(fn, constexprs, config) of one kernel as the launchers call it, for D = Dv = d."""
    cfg = chunk_config("fwd" if kernel == "fwd-den" else kernel, d, d, dtype, causal)
    pad = _pad_dim(d)
    const = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_C=cfg.block_c, FEATURE_MAP=FEATURE_MAPS[fm], DOT_PREC=prec)
    if kernel == "state":
        return linear_state, dict(const, BLOCK_D=pad, BLOCK_DV=cfg.block_t, HAS_STATE_IN=True), cfg
    const.update(CAUSAL=causal, NORMALIZE=normalize)
    if kernel in ("fwd", "fwd-den"):
        return linear_fwd, dict(const, BLOCK_D=pad, BLOCK_DV=cfg.block_t, HAS_STATE_IN=True,
                                DEN_ONLY=kernel == "fwd-den"), cfg
    if kernel == "dq":
        return linear_bwd_dq, dict(const, BLOCK_DT=cfg.block_t, BLOCK_DV=pad, HAS_STATE_IN=True), cfg
    if kernel == "dk":
        return linear_bwd_dk, dict(const, BLOCK_DT=cfg.block_t, BLOCK_DV=pad), cfg
    return linear_bwd_dv, dict(const, BLOCK_D=pad, BLOCK_DVT=cfg.block_t), cfg


def _build_aot_specs() -> list[KernelSpec]:
    specs = []
    for label, dtype, prec in _AOT_DTYPES:
        tdt = _TRITON_DTYPE[dtype]
        uses_tc = prec != "ieee"
        maps = _AOT_MAPS[:1] if label == "tf32" else _AOT_MAPS
        for d in _AOT_HEAD_DIMS:
            variants = [("state", fm, False, True) for fm, norm in maps if norm]
            for causal in (False, True):
                for fm, normalize in maps:
                    variants += [(kernel, fm, causal, normalize) for kernel in ("fwd", "dq", "dk", "dv")]
                    if normalize:
                        variants.append(("fwd-den", fm, causal, normalize))
            for kernel, fm, causal, normalize in variants:
                fn, const, cfg = _kernel_constexprs(kernel, d, fm, causal, normalize, dtype, prec)
                mode = "" if kernel == "state" else ("-causal" if causal else "-full")
                norm = "" if normalize else "-nonorm"
                name = f"linear_{kernel}-{label}-D{d}{mode}-{fm}{norm}-C{cfg.block_c}-T{cfg.block_t}"
                # the non-causal den pass is φ(q) · z alone: no dot
                has_dot = uses_tc and not (kernel == "fwd-den" and not causal)
                quick = kernel != "fwd-den" and (d, causal or kernel == "state", fm, normalize) == _AOT_QUICK
                sig = _signature(fn, tdt, const)
                specs.append(KernelSpec(name, fn, sig, const, attrs=_divisibility(sig), num_warps=cfg.num_warps,
                                        num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, uses_dot=has_dot,
                                        dtype=label, quick=quick))
    return specs


AOT_SPECS: list[KernelSpec] = _build_aot_specs()

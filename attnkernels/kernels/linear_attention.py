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
- `linear_bwd_dq`: one program per (query chunk, batch*query head) (causal: one per
  batch*query head walking the chunks in order). It recomputes the forward of its rows with
  the full Dv, so it has den_i and o_i, and forms
      g_i = do_i / den_i,  c_i = -(do_i · o_i) / den_i   (normalize=False: g = do, c = 0)
      dφq_i = S_i g_i + c_i z_i   (S_i, z_i: the causal prefix, or the full state)
  It stores den and c (float32, (B, Hq, Nq)) for the dK/dV kernel.
- `linear_bwd_dkdv`: one program per batch*kv head. With dS = Σ_i φ(q_i) g_iᵀ and
  dz = Σ_i c_i φ(q_i) over the queries that see key j (all GQA query heads of the group):
      dφk_j = dS v_j + dz,   dv_j = dSᵀ φ(k_j).
  Causal: walks the chunks in reverse carrying dS, dz (the queries of later chunks) plus an
  intra-chunk masked term. Non-causal: reduces dS, dz over all query chunks first, then
  writes every key chunk.
Then dq = dφq ∘ φ'(scale q) · scale and dk = dφk ∘ φ'(k).

Precision: every tl.dot takes float32 operands with `input_precision=DOT_PREC`: "tf32" for
fp16/bf16 inputs (a 16-bit value is exact in TF32, and TF32's 8-bit exponent keeps the
carried state, which grows with N, and the 1/den-scaled weights, which shrink with N, away
from fp16 overflow/underflow), and "ieee" for fp32 inputs unless TF32 matmuls are enabled,
like torch. The 16-bit kernels therefore run TF32 tensor-core MMAs (half the fp16 rate);
accumulation is float32 throughout. (A side effect: bf16 gives correct results under the
Triton interpreter too, since no 16-bit tl.dot is issued.) Float64 is not supported here:
the C++ kernels handle it on CPU.

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
                 Hk, Nk,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 FEATURE_MAP: tl.constexpr, HAS_STATE_IN: tl.constexpr, DOT_PREC: tl.constexpr):
    """S_OUT = S_IN + φ(K)ᵀ V, Z_OUT = Z_IN + Σ φ(K) for one (batch, kv head) and one Dv tile.
    States are contiguous float32 (B, Hk, HEAD_DIM, HEAD_DIM_V) and (B, Hk, HEAD_DIM)."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
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
        b_s = tl.load(S_IN + s_off + p_s, mask=m_s, other=0.0)  # [BLOCK_D, BLOCK_DV]
        b_z = tl.load(Z_IN + z_off + o_d, mask=m_d, other=0.0)  # [BLOCK_D]
    else:
        b_s = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
        b_z = tl.zeros([BLOCK_D], dtype=tl.float32)

    for i_t in range(0, tl.cdiv(Nk, BLOCK_C)):
        n0 = i_t * BLOCK_C
        b_k, m_n = _load_rows(K, stride_kn, n0, Nk, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
        b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k.to(tl.float32), FEATURE_MAP), 0.0)
        b_v, m_n = _load_rows(V, stride_vn, n0, Nk, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
        b_v = b_v.to(tl.float32)
        b_s = tl.dot(tl.trans(b_fk), b_v, b_s, input_precision=DOT_PREC)  # [BLOCK_D, BLOCK_DV]
        b_z += tl.sum(b_fk, 0)

    tl.store(S_OUT + s_off + p_s, b_s, mask=m_s)
    if i_v == 0:
        tl.store(Z_OUT + z_off + o_d, b_z, mask=m_d)


@triton.jit
def linear_fwd(Q, K, V, O, S_IN, Z_IN, S_OUT, Z_OUT, DO, DEN, CPART,
               stride_qb, stride_qh, stride_qn,
               stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn,
               stride_ob, stride_oh, stride_on,
               Hq, N, group, scale, eps,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
               HAS_STATE_IN: tl.constexpr, AUX: tl.constexpr, DOT_PREC: tl.constexpr):
    """Output of query chunk program_id(0) (causal: of all chunks, in order) for one
    (batch, query head) and one Dv tile. N = Nq. S_IN/Z_IN: the initial state (causal) or
    the full state (non-causal). Causal programs of a group's first head store the final
    state in S_OUT/Z_OUT.

    AUX (the backward's recompute, with NORMALIZE): instead of out and the state, store per
    query row den (DEN, (B, Hq, N), by Dv tile 0) and this Dv tile's share of
    c = -(do · o) / den (CPART, (n Dv tiles, B, Hq, N)); DO has O's strides."""
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
    if AUX:
        DO = DO + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    s_off = i_bhk.to(tl.int64) * HEAD_DIM * HEAD_DIM_V
    z_off = i_bhk.to(tl.int64) * HEAD_DIM
    p_s = o_d[:, None] * HEAD_DIM_V + o_v[None, :]
    m_s = m_d[:, None] & m_v[None, :]
    if HAS_STATE_IN:
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
        if AUX:
            b_do, m_n = _load_rows(DO, stride_on, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
            o_r = i_bh.to(tl.int64) * N + n0 + o_c
            tl.store(CPART + i_v.to(tl.int64) * tl.num_programs(1) * N + o_r,
                     -tl.sum(b_do.to(tl.float32) * b_o, 1) / (b_den + eps), mask=m_n)
            if i_v == 0:
                tl.store(DEN + o_r, b_den + eps, mask=m_n)
        else:
            _store_rows(O, stride_on, n0, N, o_c, o_v, m_v, b_o)

    if CAUSAL and not AUX:
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
        b_g = b_do.to(tl.float32) * b_rden[:, None]  # g = do / den
        # dφq = g Sᵀ + c zᵀ with the carried (causal) or full state
        b_dfq = tl.dot(b_g, tl.trans(b_s), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_DT]
        if NORMALIZE:
            b_dfq += b_cc[:, None] * b_z[None, :]
        if CAUSAL:
            b_k, m_n = _load_rows(K, stride_kn, n0, N, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_DT]
            b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k.to(tl.float32), FEATURE_MAP), 0.0)
            b_v, m_n = _load_rows(V, stride_vn, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV], input dtype
            # intra-chunk: P[i, j] = g_i · v_j + c_i for j <= i; do and v are exact in the input dtype
            b_p = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_C]
            b_p = tl.where(m_causal, b_p * b_rden[:, None] + b_cc[:, None], 0.0)
            b_dfq = tl.dot(b_p, b_fk, b_dfq, input_precision=DOT_PREC)
            b_s = tl.dot(tl.trans(b_fk), b_v.to(tl.float32), b_s, input_precision=DOT_PREC)
            b_z += tl.sum(b_fk, 0)
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
                Qh = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
                DOh = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
                off_r = (i_b * Hq + i_h).to(tl.int64) * Nq
                b_q, m_q = _load_rows(Qh, stride_qn, n0, Nq, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_DT]
                b_fq = tl.where(m_q[:, None] & m_d[None, :], _phi(b_q.to(tl.float32) * scale, FEATURE_MAP), 0.0)
                b_do, m_q = _load_rows(DOh, stride_don, n0, Nq, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
                b_rden, b_cc = _row_scalars(DEN + off_r, CC + off_r, n0, Nq, o_c, BLOCK_C, NORMALIZE)
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
            Qh = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
            DOh = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
            off_r = (i_b * Hq + i_h).to(tl.int64) * Nq
            for i_t in range(0, tl.cdiv(Nq, BLOCK_C)):
                n0 = i_t * BLOCK_C
                b_q, m_q = _load_rows(Qh, stride_qn, n0, Nq, o_c, o_d, m_d)
                b_fq = tl.where(m_q[:, None] & m_d[None, :], _phi(b_q.to(tl.float32) * scale, FEATURE_MAP), 0.0)
                b_do, m_q = _load_rows(DOh, stride_don, n0, Nq, o_c, o_v, m_v)
                b_rden, b_cc = _row_scalars(DEN + off_r, CC + off_r, n0, Nq, o_c, BLOCK_C, NORMALIZE)
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
                Qh = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
                DOh = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
                off_r = (i_b * Hq + i_h).to(tl.int64) * Nq
                b_q, m_q = _load_rows(Qh, stride_qn, n0, Nq, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
                b_fq = tl.where(m_q[:, None] & m_d[None, :], _phi(b_q.to(tl.float32) * scale, FEATURE_MAP), 0.0)
                b_do, m_q = _load_rows(DOh, stride_don, n0, Nq, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DVT]
                b_rden, b_cc = _row_scalars(DEN + off_r, DEN + off_r, n0, Nq, o_c, BLOCK_C, NORMALIZE)
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
            Qh = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
            DOh = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
            off_r = (i_b * Hq + i_h).to(tl.int64) * Nq
            for i_t in range(0, tl.cdiv(Nq, BLOCK_C)):
                n0 = i_t * BLOCK_C
                b_q, m_q = _load_rows(Qh, stride_qn, n0, Nq, o_c, o_d, m_d)
                b_fq = tl.where(m_q[:, None] & m_d[None, :], _phi(b_q.to(tl.float32) * scale, FEATURE_MAP), 0.0)
                b_do, m_q = _load_rows(DOh, stride_don, n0, Nq, o_c, o_v, m_v)
                b_rden, b_cc = _row_scalars(DEN + off_r, DEN + off_r, n0, Nq, o_c, BLOCK_C, NORMALIZE)
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


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


_CHUNK_OVERRIDE: int | None = None


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


def chunk_config(kernel: str, head_dim: int, head_dim_v: int) -> ChunkConfig:
    """GPU launch config per kernel ("state", "fwd", "dq", "dk", "dv") and padded dims.

    Every program keeps a state tile in registers across its chunk loop ([D, Dv tile] for
    state/fwd/dv, [D tile, Dv] for dq/dk) next to the chunk's [C, D] / [C, Dv] tiles, and
    mma.sync (sm_80) holds each dot's whole-K operands in registers, float32 ones for the
    state products. So the chunk is short (16-32) and the tiles narrow; chosen so that
    nothing spills on sm_80/sm_90a (`python -m attnkernels.tools.compile_report`).
    """
    d, dv = _pad_dim(head_dim), _pad_dim(head_dim_v)
    big = max(d, dv)
    if kernel in ("state", "fwd"):
        cfg = ChunkConfig(32 if big <= 32 else 16, min(dv, 32 if big <= 64 else 16), 8, 1)
    elif kernel in ("dq", "dk"):
        cfg = ChunkConfig(16, min(d, 32 if big <= 64 else 16), 8, 1)
    elif kernel == "dv":
        cfg = ChunkConfig(16, min(dv, 32 if big <= 64 else 16), 8, 1)
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
    cfg = chunk_config("state", head_dim, head_dim_v)
    has_in = initial_s is not None
    linear_state[(batch * kv_heads, _cdiv(head_dim_v, cfg.block_t))](
        k, v, initial_s if has_in else s, initial_z if has_in else z, s, z,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kv_heads, kv_len,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_C=cfg.block_c, BLOCK_D=_pad_dim(head_dim),
        BLOCK_DV=cfg.block_t, FEATURE_MAP=fm, HAS_STATE_IN=has_in, DOT_PREC=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return s, z


def _launch_fwd(q, k, v, out, fm, causal, normalize, eps, scale, initial_s, initial_z, prec, full_state=None,
                dout=None):
    """Runs `linear_fwd`: out and, causal, the final state (returned), or with `dout` (the
    backward's recompute, NORMALIZE) den and c per query row (returned)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, head_dim_v = k.shape[1], v.shape[-1]
    cfg = chunk_config("fwd", head_dim, head_dim_v)
    n_dv = _cdiv(head_dim_v, cfg.block_t)
    aux = dout is not None
    f32 = dict(dtype=torch.float32, device=q.device)
    if aux:
        den = torch.empty(batch, q_heads, q_len, **f32)
        cpart = torch.empty(n_dv, batch, q_heads, q_len, **f32)  # c per Dv tile, summed below
        out = dout  # linear_fwd reads dout with out's strides and stores no out
        s_out = z_out = den  # unused
    else:
        den = cpart = out  # unused
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
            q, k, v, out, s_in, z_in, s_out, z_out, out, den, cpart,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            q_heads, q_len, q_heads // kv_heads, scale, float(eps),
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_C=cfg.block_c, BLOCK_D=_pad_dim(head_dim),
            BLOCK_DV=cfg.block_t, FEATURE_MAP=fm, CAUSAL=causal, NORMALIZE=normalize,
            HAS_STATE_IN=has_in, AUX=aux, DOT_PREC=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if aux:
        return den, cpart.sum(0)  # a fixed-order sum over the Dv tiles
    return s_out, z_out


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

    With normalize, `linear_fwd` (AUX) first recomputes den and c = -(do · o) / den per query
    row; then `linear_bwd_dq` (per D tile), `linear_bwd_dk` (per D tile) and `linear_bwd_dv`
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
        den, cc = _launch_fwd(q, k, v, None, fm, causal, True, eps, scale, initial_s, initial_z, prec,
                              full_state=full_state, dout=dout)
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
    cfg = chunk_config("dq", head_dim, head_dim_v)
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
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
        )
    if kv_len == 0:
        return dq, dk, dv
    cfg = chunk_config("dk", head_dim, head_dim_v)
    linear_bwd_dk[(batch * kv_heads, _cdiv(head_dim, cfg.block_t))](
        q, k, v, dout, dk, den, cc,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        kv_heads, q_len, kv_len, group, scale,
        BLOCK_C=cfg.block_c, BLOCK_DT=cfg.block_t, BLOCK_DV=pad_dv,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )
    cfg = chunk_config("dv", head_dim, head_dim_v)
    linear_bwd_dv[(batch * kv_heads, _cdiv(head_dim_v, cfg.block_t))](
        q, k, dout, dv, den,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        kv_heads, q_len, kv_len, group, scale,
        BLOCK_C=cfg.block_c, BLOCK_D=pad_d, BLOCK_DVT=cfg.block_t,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# Ahead-of-time compile declarations (checked by `python -m attnkernels.tools.compile_report`)
# ----------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_FP32_ARGS = {"S_IN", "Z_IN", "S_OUT", "Z_OUT", "DEN", "CC"}
_INT_ARGS = {"Hq", "Hk", "N", "Nq", "Nk", "group"}


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


_AOT_HEAD_DIMS = (32, 64, 128)
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


def _kernel_constexprs(kernel: str, d: int, fm: str, causal: bool, normalize: bool, prec: str) -> tuple:
    """(fn, constexprs, config) of one kernel as the launchers call it, for D = Dv = d."""
    cfg = chunk_config("fwd" if kernel == "fwd-aux" else kernel, d, d)
    pad = _pad_dim(d)
    const = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_C=cfg.block_c, FEATURE_MAP=FEATURE_MAPS[fm], DOT_PREC=prec)
    if kernel == "state":
        return linear_state, dict(const, BLOCK_D=pad, BLOCK_DV=cfg.block_t, HAS_STATE_IN=True), cfg
    const.update(CAUSAL=causal, NORMALIZE=normalize)
    if kernel in ("fwd", "fwd-aux"):
        return linear_fwd, dict(const, BLOCK_D=pad, BLOCK_DV=cfg.block_t, HAS_STATE_IN=True,
                                AUX=kernel == "fwd-aux"), cfg
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
                        variants.append(("fwd-aux", fm, causal, normalize))
            for kernel, fm, causal, normalize in variants:
                fn, const, cfg = _kernel_constexprs(kernel, d, fm, causal, normalize, prec)
                mode = "" if kernel == "state" else ("-causal" if causal else "-full")
                norm = "" if normalize else "-nonorm"
                name = f"linear_{kernel}-{label}-D{d}{mode}-{fm}{norm}-C{cfg.block_c}-T{cfg.block_t}"
                specs.append(KernelSpec(name, fn, _signature(fn, tdt, const), const, num_warps=cfg.num_warps,
                                        num_stages=cfg.num_stages, uses_dot=uses_tc))
    return specs


AOT_SPECS: list[KernelSpec] = _build_aot_specs()

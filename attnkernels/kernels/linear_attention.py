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
    """Rows [n0, n0 + C) of a (N, cols) matrix whose last dim is contiguous, as float32;
    zeros outside (rows >= N or masked columns). Returns ([C, cols], row mask [C])."""
    o_n = n0 + o_c
    m_n = o_n < N
    p = base + o_n.to(tl.int64)[:, None] * stride_n + o_col[None, :]  # int64: n * stride can pass 2^31
    b_x = tl.load(p, mask=m_n[:, None] & m_col[None, :], other=0.0).to(tl.float32)
    return b_x, m_n


@triton.jit
def _store_rows(base, stride_n, n0, N, o_c, o_col, m_col, b_x):
    o_n = n0 + o_c
    p = base + o_n.to(tl.int64)[:, None] * stride_n + o_col[None, :]  # int64: n * stride can pass 2^31
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
        b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k, FEATURE_MAP), 0.0)
        b_v, m_n = _load_rows(V, stride_vn, n0, Nk, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
        b_s = tl.dot(tl.trans(b_fk), b_v, b_s, input_precision=DOT_PREC)  # [BLOCK_D, BLOCK_DV]
        b_z += tl.sum(b_fk, 0)

    tl.store(S_OUT + s_off + p_s, b_s, mask=m_s)
    if i_v == 0:
        tl.store(Z_OUT + z_off + o_d, b_z, mask=m_d)


@triton.jit
def linear_fwd(Q, K, V, O, S_IN, Z_IN, S_OUT, Z_OUT,
               stride_qb, stride_qh, stride_qn,
               stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn,
               stride_ob, stride_oh, stride_on,
               Hq, N, group, scale, eps,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
               HAS_STATE_IN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Output of query chunk program_id(0) (causal: of all chunks, in order) for one
    (batch, query head) and one Dv tile. N = Nq. S_IN/Z_IN: the initial state (causal) or
    the full state (non-causal). Causal programs of a group's first head store the final
    state in S_OUT/Z_OUT."""
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
        b_fq = tl.where(m_n[:, None] & m_d[None, :], _phi(b_q * scale, FEATURE_MAP), 0.0)
        # inter-chunk: the state carried from the previous chunks (or the full state)
        b_num = tl.dot(b_fq, b_s, input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_DV]
        b_den = tl.sum(b_fq * b_z[None, :], 1)  # [BLOCK_C]
        if CAUSAL:
            b_k, m_n = _load_rows(K, stride_kn, n0, N, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
            b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k, FEATURE_MAP), 0.0)
            b_v, m_n = _load_rows(V, stride_vn, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
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

    if CAUSAL:
        if i_h % group == 0:  # every head of the group carries the same state: one writes it
            tl.store(S_OUT + s_off + p_s, b_s, mask=m_s)
            if i_v == 0:
                tl.store(Z_OUT + z_off + o_d, b_z, mask=m_d)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------


@triton.jit
def linear_bwd_dq(Q, K, V, DO, DQ, S_IN, Z_IN, DEN, CC,
                  stride_qb, stride_qh, stride_qn,
                  stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn,
                  stride_dob, stride_doh, stride_don,
                  stride_dqb, stride_dqh, stride_dqn,
                  Hq, N, group, scale, eps,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
                  HAS_STATE_IN: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ of query chunk program_id(0) (causal: all chunks, in order) for one (batch, query
    head), with the full Dv (BLOCK_DV >= HEAD_DIM_V). With NORMALIZE it also stores, per
    query row, den and c = -(do · o) / den into DEN and CC (float32, (B, Hq, N))."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // group
    i_bhk = i_b * (Hq // group) + i_hk
    o_c = tl.arange(0, BLOCK_C)
    o_d = tl.arange(0, BLOCK_D)
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
    m_s = m_d[:, None] & m_v[None, :]
    if HAS_STATE_IN:
        b_s = tl.load(S_IN + s_off + o_d[:, None] * HEAD_DIM_V + o_v[None, :], mask=m_s, other=0.0)
        b_z = tl.load(Z_IN + z_off + o_d, mask=m_d, other=0.0)
    else:
        b_s = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)  # [BLOCK_D, BLOCK_DV]
        b_z = tl.zeros([BLOCK_D], dtype=tl.float32)  # [BLOCK_D]

    if CAUSAL:
        i_lo = 0
        i_hi = tl.cdiv(N, BLOCK_C)
    else:
        i_lo = i_c
        i_hi = i_c + 1
    m_causal = o_c[:, None] >= o_c[None, :]  # [BLOCK_C, BLOCK_C]
    for i_t in range(i_lo, i_hi):
        n0 = i_t * BLOCK_C
        b_q, m_n = _load_rows(Q, stride_qn, n0, N, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
        b_q = b_q * scale
        b_fq = tl.where(m_n[:, None] & m_d[None, :], _phi(b_q, FEATURE_MAP), 0.0)
        b_do, m_n = _load_rows(DO, stride_don, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
        if CAUSAL:
            b_k, m_n = _load_rows(K, stride_kn, n0, N, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
            b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k, FEATURE_MAP), 0.0)
            b_v, m_n = _load_rows(V, stride_vn, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
        if NORMALIZE:
            # recompute this chunk's forward: den and o (full Dv)
            b_num = tl.dot(b_fq, b_s, input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_DV]
            b_den = tl.sum(b_fq * b_z[None, :], 1)  # [BLOCK_C]
            if CAUSAL:
                b_a = tl.where(m_causal, tl.dot(b_fq, tl.trans(b_fk), input_precision=DOT_PREC), 0.0)  # [BLOCK_C, BLOCK_C]
                b_num = tl.dot(b_a, b_v, b_num, input_precision=DOT_PREC)
                b_den += tl.sum(b_a, 1)
            b_den = b_den + eps
            b_rden = 1.0 / b_den
            b_cc = -tl.sum(b_do * b_num, 1) * b_rden * b_rden  # -(do · o) / den, [BLOCK_C]
            b_g = b_do * b_rden[:, None]  # [BLOCK_C, BLOCK_DV]
            tl.store(DEN + n0 + o_c, b_den, mask=m_n)
            tl.store(CC + n0 + o_c, b_cc, mask=m_n)
        else:
            b_g = b_do
        # dφq = g Sᵀ + c zᵀ (carried / full state) + intra-chunk tril(g Vᵀ + c) φ(K)
        b_dfq = tl.dot(b_g, tl.trans(b_s), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_D]
        if NORMALIZE:
            b_dfq += b_cc[:, None] * b_z[None, :]
        if CAUSAL:
            b_p = tl.dot(b_g, tl.trans(b_v), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_C]
            if NORMALIZE:
                b_p += b_cc[:, None]
            b_p = tl.where(m_causal, b_p, 0.0)
            b_dfq = tl.dot(b_p, b_fk, b_dfq, input_precision=DOT_PREC)
            b_s = tl.dot(tl.trans(b_fk), b_v, b_s, input_precision=DOT_PREC)
            b_z += tl.sum(b_fk, 0)
        b_dq = b_dfq * _dphi(b_q, FEATURE_MAP) * scale
        _store_rows(DQ, stride_dqn, n0, N, o_c, o_d, m_d, b_dq)


@triton.jit
def _dkdv_query_chunk(Q, DO, DEN, CC, stride_qn, stride_don, n0, Nq, scale,
                      o_c, o_d, m_d, o_v, m_v,
                      BLOCK_C: tl.constexpr, FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr):
    """One query chunk of one head for dK/dV: φ(q) [C, D], do [C, Dv], g = do / den
    [C, Dv], c [C], 1/den [C] (zeros / ones on rows past Nq)."""
    b_q, m_n = _load_rows(Q, stride_qn, n0, Nq, o_c, o_d, m_d)
    b_fq = tl.where(m_n[:, None] & m_d[None, :], _phi(b_q * scale, FEATURE_MAP), 0.0)
    b_do, m_n = _load_rows(DO, stride_don, n0, Nq, o_c, o_v, m_v)
    if NORMALIZE:
        b_rden = 1.0 / tl.load(DEN + n0 + o_c, mask=m_n, other=1.0)
        b_cc = tl.load(CC + n0 + o_c, mask=m_n, other=0.0)
        b_g = b_do * b_rden[:, None]
    else:
        b_rden = tl.full([BLOCK_C], 1.0, tl.float32)
        b_cc = tl.zeros([BLOCK_C], dtype=tl.float32)
        b_g = b_do
    return b_fq, b_do, b_g, b_cc, b_rden


@triton.jit
def linear_bwd_dkdv(Q, K, V, DO, DK, DV, DEN, CC,
                    stride_qb, stride_qh, stride_qn,
                    stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn,
                    stride_dob, stride_doh, stride_don,
                    stride_dkb, stride_dkh, stride_dkn,
                    stride_dvb, stride_dvh, stride_dvn,
                    Hk, Nq, Nk, group, scale,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """dK, dV of one (batch, kv head), summed over the group's query heads in order."""
    i_bh = tl.program_id(0)
    i_b = i_bh // Hk
    i_hk = i_bh % Hk
    Hq = Hk * group
    o_c = tl.arange(0, BLOCK_C)
    o_d = tl.arange(0, BLOCK_D)
    o_v = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_v = o_v < HEAD_DIM_V

    K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    V = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    DK = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    DV = DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
    # dS = Σ φ(q_i) g_iᵀ [BLOCK_D, BLOCK_DV], dz = Σ c_i φ(q_i) [BLOCK_D], over the queries seen so far
    b_ds = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    b_dz = tl.zeros([BLOCK_D], dtype=tl.float32)
    m_causal_t = o_c[:, None] <= o_c[None, :]  # [BLOCK_C (key j), BLOCK_C (query i)]: j <= i

    if CAUSAL:
        n_t = tl.cdiv(Nk, BLOCK_C)
        for i_r in range(0, n_t):
            n0 = (n_t - 1 - i_r) * BLOCK_C  # reverse order: dS holds the later chunks' queries
            b_k, m_n = _load_rows(K, stride_kn, n0, Nk, o_c, o_d, m_d)  # [BLOCK_C, BLOCK_D]
            b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k, FEATURE_MAP), 0.0)
            b_v, m_n = _load_rows(V, stride_vn, n0, Nk, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
            # the later chunks, through the carried dS, dz
            b_dfk = tl.dot(b_v, tl.trans(b_ds), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_D]
            if NORMALIZE:
                b_dfk += b_dz[None, :]
            b_dv = tl.dot(b_fk, b_ds, input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_DV]
            for i_g in range(0, group):
                i_h = i_hk * group + i_g
                off_q = i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
                off_do = i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
                off_r = (i_b * Hq + i_h).to(tl.int64) * Nq
                b_fq, b_do, b_g, b_cc, b_rden = _dkdv_query_chunk(
                    Q + off_q, DO + off_do, DEN + off_r, CC + off_r, stride_qn, stride_don, n0, Nq, scale,
                    o_c, o_d, m_d, o_v, m_v, BLOCK_C, FEATURE_MAP, NORMALIZE)
                # intra-chunk: Aᵀ[j, i] = φ(k_j) · φ(q_i) / den_i, Pᵀ[j, i] = v_j · g_i + c_i, j <= i
                b_at = tl.dot(b_fk, tl.trans(b_fq), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_C]
                b_at = tl.where(m_causal_t, b_at * b_rden[None, :], 0.0)
                b_dv = tl.dot(b_at, b_do, b_dv, input_precision=DOT_PREC)
                b_pt = tl.dot(b_v, tl.trans(b_g), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_C]
                b_pt = tl.where(m_causal_t, b_pt + b_cc[None, :], 0.0)
                b_dfk = tl.dot(b_pt, b_fq, b_dfk, input_precision=DOT_PREC)
                # this chunk's queries join the carried state for the earlier chunks
                b_ds = tl.dot(tl.trans(b_fq), b_g, b_ds, input_precision=DOT_PREC)
                b_dz += tl.sum(b_fq * b_cc[:, None], 0)
            b_dk = b_dfk * _dphi(b_k, FEATURE_MAP)
            _store_rows(DK, stride_dkn, n0, Nk, o_c, o_d, m_d, b_dk)
            _store_rows(DV, stride_dvn, n0, Nk, o_c, o_v, m_v, b_dv)
    else:
        # every key sees every query: reduce dS, dz over all queries of the group first
        for i_g in range(0, group):
            i_h = i_hk * group + i_g
            off_q = i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
            off_do = i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
            off_r = (i_b * Hq + i_h).to(tl.int64) * Nq
            for i_t in range(0, tl.cdiv(Nq, BLOCK_C)):
                b_fq, b_do, b_g, b_cc, b_rden = _dkdv_query_chunk(
                    Q + off_q, DO + off_do, DEN + off_r, CC + off_r, stride_qn, stride_don, i_t * BLOCK_C, Nq,
                    scale, o_c, o_d, m_d, o_v, m_v, BLOCK_C, FEATURE_MAP, NORMALIZE)
                b_ds = tl.dot(tl.trans(b_fq), b_g, b_ds, input_precision=DOT_PREC)
                b_dz += tl.sum(b_fq * b_cc[:, None], 0)
        for i_t in range(0, tl.cdiv(Nk, BLOCK_C)):
            n0 = i_t * BLOCK_C
            b_k, m_n = _load_rows(K, stride_kn, n0, Nk, o_c, o_d, m_d)
            b_fk = tl.where(m_n[:, None] & m_d[None, :], _phi(b_k, FEATURE_MAP), 0.0)
            b_v, m_n = _load_rows(V, stride_vn, n0, Nk, o_c, o_v, m_v)
            b_dfk = tl.dot(b_v, tl.trans(b_ds), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_D]
            if NORMALIZE:
                b_dfk += b_dz[None, :]
            b_dv = tl.dot(b_fk, b_ds, input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_DV]
            b_dk = b_dfk * _dphi(b_k, FEATURE_MAP)
            _store_rows(DK, stride_dkn, n0, Nk, o_c, o_d, m_d, b_dk)
            _store_rows(DV, stride_dvn, n0, Nk, o_c, o_v, m_v, b_dv)


# ----------------------------------------------------------------------------------------
# Chunk configs
# ----------------------------------------------------------------------------------------


class ChunkConfig(NamedTuple):
    block_c: int  # chunk length C
    block_dv: int  # Dv tile (the backward always uses the full padded Dv)
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
    """GPU launch config per kernel ("state", "fwd", "dq", "dkdv") and padded dims.

    Every dot runs on float32 operands (see the module doc), so register tiles are 4 bytes
    per element whatever the input dtype. Chosen so that nothing spills on sm_80/sm_90a
    (`python -m attnkernels.tools.compile_report`): the forward's carried state is
    [D, Dv tile] and its chunk tiles [C, D]; the backward holds the full [D, Dv] state.
    """
    d, dv = _pad_dim(head_dim), _pad_dim(head_dim_v)
    big = max(d, dv)
    if kernel in ("state", "fwd"):
        if big <= 64:
            cfg = ChunkConfig(64, min(dv, 64), 4, 2)
        else:
            cfg = ChunkConfig(32, min(dv, 64), 4, 2)
    elif kernel in ("dq", "dkdv"):
        if big <= 32:
            cfg = ChunkConfig(64, dv, 4, 2)
        elif big <= 64:
            cfg = ChunkConfig(32, dv, 4, 2)
        else:
            cfg = ChunkConfig(32, dv, 8, 1)
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
    linear_state[(batch * kv_heads, _cdiv(head_dim_v, cfg.block_dv))](
        k, v, initial_s if has_in else s, initial_z if has_in else z, s, z,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kv_heads, kv_len,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_C=cfg.block_c, BLOCK_D=_pad_dim(head_dim),
        BLOCK_DV=cfg.block_dv, FEATURE_MAP=fm, HAS_STATE_IN=has_in, DOT_PREC=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return s, z


def linear_attention_forward(q, k, v, feature_map: str, causal: bool, normalize: bool, eps: float,
                             scale: float, initial_s, initial_z):
    """(out (B, Hq, Nq, Dv) in q's dtype, final S (B, Hk, D, Dv), final z (B, Hk, D) float32)."""
    q, k, v, scale, initial_s, initial_z = _prepare(q, k, v, feature_map, causal, scale, initial_s, initial_z)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, head_dim_v = k.shape[1], v.shape[-1]
    fm, prec = FEATURE_MAPS[feature_map], _dot_precision(q.dtype)
    out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=q.dtype, device=q.device)
    cfg = chunk_config("fwd", head_dim, head_dim_v)
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_C=cfg.block_c, BLOCK_D=_pad_dim(head_dim),
                  BLOCK_DV=cfg.block_dv, FEATURE_MAP=fm, CAUSAL=causal, NORMALIZE=normalize, DOT_PREC=prec,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    n_dv = _cdiv(head_dim_v, cfg.block_dv)
    if causal:
        s_out = torch.empty(batch, kv_heads, head_dim, head_dim_v, dtype=torch.float32, device=q.device)
        z_out = torch.empty(batch, kv_heads, head_dim, dtype=torch.float32, device=q.device)
        if s_out.numel() == 0:
            return out, s_out, z_out
        has_in = initial_s is not None
        s_in, z_in = (initial_s, initial_z) if has_in else (s_out, z_out)
        grid = (1, batch * q_heads, n_dv)  # one program walks all chunks in order
    else:
        s_out, z_out = _full_state(k, v, fm, initial_s, initial_z, prec)
        if out.numel() == 0:
            return out, s_out, z_out
        has_in, s_in, z_in = True, s_out, z_out
        grid = (_cdiv(q_len, cfg.block_c), batch * q_heads, n_dv)
    linear_fwd[grid](
        q, k, v, out, s_in, z_in, s_out, z_out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_heads, q_len, q_heads // kv_heads, scale, float(eps),
        HAS_STATE_IN=has_in, **common,
    )
    return out, s_out, z_out


def linear_attention_backward(dout, q, k, v, feature_map: str, causal: bool, normalize: bool, eps: float,
                              scale: float, initial_s, initial_z):
    """(dq, dk, dv) in the inputs' dtypes; the forward is recomputed (no gradient to the state)."""
    q, k, v, scale, initial_s, initial_z = _prepare(q, k, v, feature_map, causal, scale, initial_s, initial_z)
    dout = _last_dim_contiguous(dout.to(q.dtype))
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    fm, prec = FEATURE_MAPS[feature_map], _dot_precision(q.dtype)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if dq.numel() == 0 and dk.numel() == 0 and dv.numel() == 0:
        return dq, dk, dv
    # per query row: den and c = -(do · o) / den, written by the dQ kernel, read by dK/dV
    den = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    cc = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=_pad_dim(head_dim), BLOCK_DV=_pad_dim(head_dim_v),
                  FEATURE_MAP=fm, CAUSAL=causal, NORMALIZE=normalize, DOT_PREC=prec)
    group = q_heads // kv_heads

    if causal:
        has_in = initial_s is not None
        s_in, z_in = (initial_s, initial_z) if has_in else (den, den)  # unused dummies without a state
    else:
        s_in, z_in = _full_state(k, v, fm, initial_s, initial_z, prec)
        has_in = True
    cfg = chunk_config("dq", head_dim, head_dim_v)
    if q_len > 0:
        grid = (1 if causal else _cdiv(q_len, cfg.block_c), batch * q_heads)
        linear_bwd_dq[grid](
            q, k, v, dout, dq, s_in, z_in, den, cc,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            q_heads, q_len, group, scale, float(eps),
            BLOCK_C=cfg.block_c, HAS_STATE_IN=has_in, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **common,
        )
    cfg = chunk_config("dkdv", head_dim, head_dim_v)
    if kv_len > 0:
        linear_bwd_dkdv[(batch * kv_heads,)](
            q, k, v, dout, dk, dv, den, cc,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            kv_heads, q_len, kv_len, group, scale,
            BLOCK_C=cfg.block_c, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **common,
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


def _build_aot_specs() -> list[KernelSpec]:
    specs = []
    for label, dtype, prec in _AOT_DTYPES:
        tdt = _TRITON_DTYPE[dtype]
        uses_tc = prec != "ieee"
        maps = _AOT_MAPS[:1] if label == "tf32" else _AOT_MAPS
        for d in _AOT_HEAD_DIMS:
            pad = _pad_dim(d)
            cfg = chunk_config("state", d, d)
            for fm, _ in (m for m in maps if m[1]):
                const = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_C=cfg.block_c, BLOCK_D=pad, BLOCK_DV=cfg.block_dv,
                             FEATURE_MAP=FEATURE_MAPS[fm], HAS_STATE_IN=True, DOT_PREC=prec)
                specs.append(KernelSpec(f"linear_state-{label}-D{d}-{fm}-C{cfg.block_c}-V{cfg.block_dv}",
                                        linear_state, _signature(linear_state, tdt, const), const,
                                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, uses_dot=uses_tc))
            for causal in (False, True):
                for fm, normalize in maps:
                    for kernel, fn in (("fwd", linear_fwd), ("dq", linear_bwd_dq), ("dkdv", linear_bwd_dkdv)):
                        cfg = chunk_config(kernel, d, d)
                        const = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_C=cfg.block_c, BLOCK_D=pad,
                                     BLOCK_DV=cfg.block_dv, FEATURE_MAP=FEATURE_MAPS[fm], CAUSAL=causal,
                                     NORMALIZE=normalize, DOT_PREC=prec)
                        if kernel != "dkdv":
                            const["HAS_STATE_IN"] = True
                        mode = "causal" if causal else "full"
                        norm = "" if normalize else "-nonorm"
                        name = f"{fn.__name__}-{label}-D{d}-{mode}-{fm}{norm}-C{cfg.block_c}-V{cfg.block_dv}"
                        specs.append(KernelSpec(name, fn, _signature(fn, tdt, const), const,
                                                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                                uses_dot=uses_tc))
    return specs


AOT_SPECS: list[KernelSpec] = _build_aot_specs()

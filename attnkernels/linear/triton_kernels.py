"""Triton linear attention with fused elementwise feature maps, causal (chunked) and not,
forward and backward. The `@triton.jit` code only: configs and launches are in
`triton_launch.py`, the compile gate's specs in `triton_specs.py`.

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

import triton
import triton.language as tl

# feature map ids, passed to the kernels as the FEATURE_MAP constexpr
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

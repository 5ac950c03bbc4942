"""Triton linear attention with fused elementwise feature maps, causal and not, forward and
backward, as chunked two-pass kernels. The `@triton.jit` code only: configs and launches are
in `triton_launch.py`, the compile gate's specs in `triton_specs.py`.

Contract (shared with `attnkernels.linear.reference`):
    φ = feature map on `scale * q` and on k: "elu" (elu + 1), "relu", "identity"
    out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps)        (normalize=False: out_i = φ(q_i)ᵀ S_i)
    S_i = S0 + Σ_j φ(k_j) v_jᵀ   [M, Dv],   z_i = z0 + Σ_j φ(k_j)   [M],   M = D
over j <= i (causal, Nq == Nk) or all j (non-causal). Query head h reads kv head
h // (Hq // Hk). The final state (S0 + Σ over all j) is float32.

Structure (flash-linear-attention's chunk form, C = BLOCK_C rows per chunk):
- `linear_chunk_state`, the only serial kernel: one program per (batch, kv head, M tile,
  Dv tile) walks the N/C chunks, one matmul per chunk (per query head of the group in the
  backward), and stores the state *entering* each chunk, H[t] = S0 + Σ_{chunks < t}
  (float32, (B, Hk, N/C, M, Dv), and z (B, Hk, N/C, M)), and/or the final state. The
  forward runs it on (φ(k), v); the backward runs it in reverse on (φ(q), g) to get
  dS[t] = Σ_{chunks > t} φ(q) gᵀ.
- `linear_chunk_fwd`, fully parallel: one program per (query chunk, batch, query head),
  no chunk loop: out = φ(Q) H[t] + tril(φ(Q) φ(K)ᵀ) V, den alike. φ is applied once per
  (chunk, head). Non-causal: H is the full state and the intra-chunk term is dropped.
- Backward (`linear_chunk_bwd_dq` per (query chunk, query head), `linear_chunk_bwd_dkdv`
  per (key chunk, kv head), both parallel) on g_i = do_i / den_i and c_i = -(do_i·o_i) / den_i
  (normalize=False: g = do, c = 0), out and den recomputed by the forward kernels:
      dφq_i = g_i S_iᵀ + c_i z_i                 (S_i, z_i: H[t] plus the chunk's rows j <= i)
      dφk_j = dS_j v_j + dz_j,  dv_j = dS_jᵀ φ(k_j)   (dS_j = Σ_{i >= j} φ(q_i) g_iᵀ over the
                                                       group's query heads, dz_j = Σ c_i φ(q_i))
  then dq = dφq ∘ φ'(scale q) · scale, dk = dφk ∘ φ'(k).
  Where whole [C, 128] outputs would spill (exact fp32's FMA dots; sm_80's mma.sync), the
  output pass tiles Dv, dq tiles D and dk/dv tiles its output columns (the launcher's
  `chunk_config`); on sm_90a with 16-bit inputs each program covers all of D and Dv.

Precision: every dot takes operands in the input dtype (16-bit on tensor cores; fp32 with
`input_precision=DOT_PREC`, "ieee" unless TF32 matmuls are on) and accumulates in float32;
states are kept float32 and cast to the input dtype for the dot, like fla. Two exceptions
keep float32 accuracy where 16-bit rounding would show: z, den and c are row sums taken in
float32, and the forward state of 16-bit "elu" inputs (elu + 1 rounds in 16 bits, where
identity and relu of a 16-bit value are exact) adds the rounding remainder of φ(k) in a
second dot (SPLIT_PHI), so the returned state is as exact as a float32 sum.
The backward's g and c arrive multiplied by a per-(batch, kv head) power of two (the
launcher's `1/R`, undone at the end): 1/den shrinks like 1/N, below fp16's normal range.

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


@triton.jit
def _features(base, stride_n, n0, N, o_c, o_col, m_col, scale, FEATURE_MAP: tl.constexpr):
    """(raw x · scale [C, cols] float32, φ(x · scale) float32 with 0 outside) of rows [n0, n0 + C)."""
    b_x, m_n = _load_rows(base, stride_n, n0, N, o_c, o_col, m_col)
    b_x = b_x.to(tl.float32) * scale
    b_f = tl.where(m_n[:, None] & m_col[None, :], _phi(b_x, FEATURE_MAP), 0.0)
    return b_x, b_f


@triton.jit
def _den_rows(HZ, o_d, m_d, b_fq):
    """φ(q)ᵀ z per row, float32 [C], from the state's z at HZ [BLOCK_D] and φ(q) [C, BLOCK_D]."""
    b_z = tl.load(HZ + o_d, mask=m_d, other=0.0)  # [BLOCK_D]
    return tl.sum(b_fq * b_z[None, :], 1)


@triton.jit
def _to_dot(x, dtype: tl.constexpr):
    """x (float32) as a dot operand of `dtype`; clamped into fp16's range first for fp16."""
    if dtype == tl.float16:
        x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)  # the largest finite fp16
    return x.to(dtype)


# ----------------------------------------------------------------------------------------
# The serial state pass (forward and reverse)
# ----------------------------------------------------------------------------------------


@triton.jit
def linear_chunk_state(X, Y, W, S_IN, Z_IN, H, HZ, S_OUT, Z_OUT,
                       stride_xb, stride_xh, stride_xn,
                       stride_yb, stride_yh, stride_yn,
                       Hk, N, group, scale,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                       FEATURE_MAP: tl.constexpr, REVERSE: tl.constexpr, STORE_CHUNKS: tl.constexpr,
                       STORE_FINAL: tl.constexpr, HAS_STATE_IN: tl.constexpr, HAS_Z: tl.constexpr,
                       HAS_W: tl.constexpr, SPLIT_PHI: tl.constexpr, DOT_PREC: tl.constexpr):
    """S = S_IN + Σ_t Σ_g φ(scale · X_t)ᵀ Y_t, z = Z_IN + Σ φ(scale · X_t) (weighted by W with
    HAS_W) for one (batch, kv head) program_id(0), M tile program_id(1), Dv tile program_id(2).

    X (B, Hk·group, N, M) and Y (B, Hk·group, N, Dv) in the input dtype, W (B, Hk·group, N)
    float32: the forward passes (k, v), group 1; the backward (q, g, c) with the GQA group,
    REVERSE (chunks last to first). STORE_CHUNKS: the state entering each chunk into
    H (B, Hk, N/C, M, Dv) and HZ (B, Hk, N/C, M) (entering in the walk's direction: the
    reverse pass stores Σ over the later chunks). STORE_FINAL: the state after every chunk
    into S_OUT (B, Hk, M, Dv) / Z_OUT (B, Hk, M). All states contiguous float32."""
    i_bh = tl.program_id(0)
    i_m = tl.program_id(1)
    i_v = tl.program_id(2)
    i_b = i_bh // Hk
    i_hk = i_bh % Hk
    o_c = tl.arange(0, BLOCK_C)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_m = o_m < HEAD_DIM
    m_v = o_v < HEAD_DIM_V
    p_s = o_m[:, None] * HEAD_DIM_V + o_v[None, :]  # [BLOCK_M, BLOCK_V] in an (M, Dv) state
    m_s = m_m[:, None] & m_v[None, :]
    s_off = i_bh.to(tl.int64) * HEAD_DIM * HEAD_DIM_V
    z_off = i_bh.to(tl.int64) * HEAD_DIM
    if HAS_STATE_IN:
        b_s = tl.load(S_IN + s_off + p_s, mask=m_s, other=0.0)  # [BLOCK_M, BLOCK_V] float32
        b_z = tl.load(Z_IN + z_off + o_m, mask=m_m, other=0.0)  # [BLOCK_M]
    else:
        b_s = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        b_z = tl.zeros([BLOCK_M], dtype=tl.float32)
    # the z tile is written by the Dv-tile-0 program only
    m_z = m_m & (i_v == 0)

    n_t = tl.cdiv(N, BLOCK_C)
    for i_r in range(0, n_t):
        if REVERSE:
            i_t = n_t - 1 - i_r
        else:
            i_t = i_r
        if STORE_CHUNKS:
            h_off = (i_bh.to(tl.int64) * n_t + i_t)
            tl.store(H + h_off * HEAD_DIM * HEAD_DIM_V + p_s, b_s, mask=m_s)
            if HAS_Z:
                tl.store(HZ + h_off * HEAD_DIM + o_m, b_z, mask=m_z)
        n0 = i_t * BLOCK_C
        for i_g in range(0, group):
            i_x = i_hk * group + i_g  # the head of X and Y: the kv head (forward), a query head (reverse)
            Xh = X + i_b.to(tl.int64) * stride_xb + i_x.to(tl.int64) * stride_xh
            Yh = Y + i_b.to(tl.int64) * stride_yb + i_x.to(tl.int64) * stride_yh
            _, b_f = _features(Xh, stride_xn, n0, N, o_c, o_m, m_m, scale, FEATURE_MAP)  # [BLOCK_C, BLOCK_M]
            b_y, _ = _load_rows(Yh, stride_yn, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_V], input dtype
            b_fd = b_f.to(Y.dtype.element_ty)
            b_s = tl.dot(tl.trans(b_fd), b_y, b_s, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_V]
            if SPLIT_PHI:
                # φ = hi + lo in the input dtype: the remainder's dot makes the sum float32-exact
                b_lo = (b_f - b_fd.to(tl.float32)).to(Y.dtype.element_ty)
                b_s = tl.dot(tl.trans(b_lo), b_y, b_s, input_precision=DOT_PREC)
            if HAS_Z:
                if HAS_W:
                    Wh = W + (i_b * Hk * group + i_x).to(tl.int64) * N
                    b_w = tl.load(Wh + n0 + o_c, mask=n0 + o_c < N, other=0.0)  # [BLOCK_C]
                    b_z += tl.sum(b_f * b_w[:, None], 0)
                else:
                    b_z += tl.sum(b_f, 0)
    if STORE_FINAL:
        tl.store(S_OUT + s_off + p_s, b_s, mask=m_s)
        if HAS_Z:
            tl.store(Z_OUT + z_off + o_m, b_z, mask=m_z)


# ----------------------------------------------------------------------------------------
# The parallel output pass
# ----------------------------------------------------------------------------------------


@triton.jit
def linear_chunk_fwd(Q, K, V, O, H, HZ, DEN,
                     stride_qb, stride_qh, stride_qn,
                     stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_ob, stride_oh, stride_on,
                     Hq, N, group, n_state, scale, eps,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
                     WRITE_DEN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Output rows of query chunk t = program_id(0) of (batch, query head) program_id(1), Dv
    tile program_id(2). N = Nq. H/HZ: the states entering each chunk (causal, n_state = N/C chunks per
    head) or the full state (non-causal, n_state = 1). WRITE_DEN (the backward's recompute):
    also den = φ(q)ᵀ z + eps per row into DEN (B, Hq, N) float32."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_v = tl.program_id(2)  # a Dv tile: one, except for exact fp32 (FMA dots) at Dv > 64
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // group  # GQA: query head h reads kv head h // group
    i_bhk = i_b * (Hq // group) + i_hk
    dt = Q.dtype.element_ty
    o_c = tl.arange(0, BLOCK_C)
    o_d = tl.arange(0, BLOCK_D)
    o_v = i_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_v = o_v < HEAD_DIM_V
    n0 = i_t * BLOCK_C

    Q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    O = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    # 16-bit causal: den's float32 row sums before the dots, so the float32 φ(q) tile is dead
    # there (live across them, it spills on sm_80's 4 warps at D = 128); fp32 keeps the
    # order in which its FMA dots do not spill
    EARLY: tl.constexpr = CAUSAL and dt != tl.float32
    _, b_fq = _features(Q, stride_qn, n0, N, o_c, o_d, m_d, scale, FEATURE_MAP)  # [BLOCK_C, BLOCK_D]
    if CAUSAL:
        h_off = i_bhk.to(tl.int64) * n_state + i_t
    else:
        h_off = i_bhk.to(tl.int64) * n_state
    if NORMALIZE and EARLY:
        b_den = _den_rows(HZ + h_off * HEAD_DIM, o_d, m_d, b_fq)
    b_fqd = b_fq.to(dt)
    b_s = tl.load(H + h_off * HEAD_DIM * HEAD_DIM_V + o_d[:, None] * HEAD_DIM_V + o_v[None, :],
                  mask=m_d[:, None] & m_v[None, :], other=0.0)  # [BLOCK_D, BLOCK_DV] float32
    # inter-chunk: the state entering the chunk (or the full state)
    b_num = tl.dot(b_fqd, _to_dot(b_s, dt), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_DV]
    if NORMALIZE and not EARLY:
        b_den = _den_rows(HZ + h_off * HEAD_DIM, o_d, m_d, b_fq)
    if CAUSAL:
        K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
        V = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
        _, b_fk = _features(K, stride_kn, n0, N, o_c, o_d, m_d, 1.0, FEATURE_MAP)  # [BLOCK_C, BLOCK_D]
        b_v, _ = _load_rows(V, stride_vn, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
        # intra-chunk: tril(φ(Q) φ(K)ᵀ), [BLOCK_C, BLOCK_C]
        b_a = tl.dot(b_fqd, tl.trans(b_fk.to(dt)), input_precision=DOT_PREC)
        b_a = tl.where(o_c[:, None] >= o_c[None, :], b_a, 0.0)
        b_num = tl.dot(_to_dot(b_a, dt), b_v, b_num, input_precision=DOT_PREC)
        if NORMALIZE:
            b_den += tl.sum(b_a, 1)
    if NORMALIZE:
        b_den += eps
        b_o = b_num / b_den[:, None]
        if WRITE_DEN:
            tl.store(DEN + i_bh.to(tl.int64) * N + n0 + o_c, b_den, mask=(n0 + o_c < N) & (i_v == 0))
    else:
        b_o = b_num
    _store_rows(O, stride_on, n0, N, o_c, o_v, m_v, b_o)


# ----------------------------------------------------------------------------------------
# The parallel gradient passes
# ----------------------------------------------------------------------------------------


@triton.jit
def linear_chunk_bwd_dq(Q, K, V, G, CP, H, HZ, RINV, DQ,
                        stride_qb, stride_qh, stride_qn,
                        stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn,
                        stride_gb, stride_gh, stride_gn,
                        stride_dqb, stride_dqh, stride_dqn,
                        Hq, N, group, n_state, scale,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                        FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
                        DOT_PREC: tl.constexpr):
    """dQ of query chunk program_id(0), (batch, query head) program_id(1), D tile
    program_id(2): G = R·do/den (input
    dtype, (B, Hq, N, Dv)), CP = R·c (float32 (B, Hq, N)), RINV = 1/R per (batch, kv head);
    H/HZ the forward's states as in `linear_chunk_fwd`."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    # a D tile (dφq's columns need only those columns of q, k, S, z): one, except for exact
    # fp32 (FMA dots) at D > 64
    i_d = tl.program_id(2)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // group
    i_bhk = i_b * (Hq // group) + i_hk
    dt = Q.dtype.element_ty
    o_c = tl.arange(0, BLOCK_C)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_v = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_v = o_v < HEAD_DIM_V
    n0 = i_t * BLOCK_C

    Q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    G = G + i_b.to(tl.int64) * stride_gb + i_h.to(tl.int64) * stride_gh
    DQ = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    # 16-bit causal: q read only at the end, for φ' (its float32 tile live across the dots
    # spills on sm_80's 4 warps); fp32 reads it first, the order its FMA dots fit in
    LATE: tl.constexpr = CAUSAL and dt != tl.float32
    if not LATE:
        b_xq, _ = _features(Q, stride_qn, n0, N, o_c, o_d, m_d, scale, FEATURE_MAP)  # [BLOCK_C, BLOCK_D]
    b_g, _ = _load_rows(G, stride_gn, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
    if CAUSAL:
        h_off = i_bhk.to(tl.int64) * n_state + i_t
    else:
        h_off = i_bhk.to(tl.int64) * n_state
    b_s = tl.load(H + h_off * HEAD_DIM * HEAD_DIM_V + o_d[:, None] * HEAD_DIM_V + o_v[None, :],
                  mask=m_d[:, None] & m_v[None, :], other=0.0)  # [BLOCK_D, BLOCK_DV] float32
    b_dfq = tl.dot(b_g, tl.trans(_to_dot(b_s, dt)), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_D]
    if NORMALIZE:
        b_cp = tl.load(CP + i_bh.to(tl.int64) * N + n0 + o_c, mask=n0 + o_c < N, other=0.0)  # [BLOCK_C]
        b_z = tl.load(HZ + h_off * HEAD_DIM + o_d, mask=m_d, other=0.0)  # [BLOCK_D]
        b_dfq += b_cp[:, None] * b_z[None, :]
    if CAUSAL:
        K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
        V = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
        _, b_fk = _features(K, stride_kn, n0, N, o_c, o_d, m_d, 1.0, FEATURE_MAP)  # [BLOCK_C, BLOCK_D]
        b_v, _ = _load_rows(V, stride_vn, n0, N, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
        # intra-chunk: P[i, j] = g_i · v_j + c_i for j <= i, [BLOCK_C, BLOCK_C]
        b_p = tl.dot(b_g, tl.trans(b_v), input_precision=DOT_PREC)
        if NORMALIZE:
            b_p += b_cp[:, None]
        b_p = tl.where(o_c[:, None] >= o_c[None, :], b_p, 0.0)
        b_dfq = tl.dot(_to_dot(b_p, dt), b_fk.to(dt), b_dfq, input_precision=DOT_PREC)
    if NORMALIZE:
        b_dfq *= tl.load(RINV + i_bhk)
    if LATE:
        b_xq, _ = _features(Q, stride_qn, n0, N, o_c, o_d, m_d, scale, FEATURE_MAP)  # [BLOCK_C, BLOCK_D]
    b_dq = b_dfq * _dphi(b_xq, FEATURE_MAP) * scale
    _store_rows(DQ, stride_dqn, n0, N, o_c, o_d, m_d, b_dq)


@triton.jit
def linear_chunk_bwd_dkdv(Q, K, V, G, CP, DH, DHZ, RINV, DK, DV,
                          stride_qb, stride_qh, stride_qn,
                          stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn,
                          stride_gb, stride_gh, stride_gn,
                          stride_dkb, stride_dkh, stride_dkn,
                          stride_dvb, stride_dvh, stride_dvn,
                          Hk, Nq, Nk, group, n_state, scale,
                          HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          BLOCK_T: tl.constexpr,
                          FEATURE_MAP: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
                          DOT_PREC: tl.constexpr):
    """dK and dV of key chunk program_id(0), (batch, kv head) program_id(1), summed over the
    group's query heads in order. DH/DHZ: dS, dz of the later chunks (causal, the reverse
    state pass, n_state = Nk/C) or of all queries (non-causal, n_state = 1).

    Output columns: tile program_id(2) of BLOCK_T columns of dK and the same of dV. BLOCK_T =
    BLOCK_D = BLOCK_DV (one tile) except for exact fp32 at 128, whose FMA dots spill with
    whole [C, 128] outputs: the [C, C] products (which contract all of D or Dv) are then
    recomputed per column tile."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_j = tl.program_id(2)
    i_b = i_bh // Hk
    i_hk = i_bh % Hk
    dt = K.dtype.element_ty
    o_c = tl.arange(0, BLOCK_C)
    o_d = tl.arange(0, BLOCK_D)
    o_v = tl.arange(0, BLOCK_DV)
    m_d = o_d < HEAD_DIM
    m_v = o_v < HEAD_DIM_V
    o_dt = i_j * BLOCK_T + tl.arange(0, BLOCK_T)  # this program's dK columns
    o_vt = i_j * BLOCK_T + tl.arange(0, BLOCK_T)  # and dV columns
    m_dt = o_dt < HEAD_DIM
    m_vt = o_vt < HEAD_DIM_V
    n0 = i_t * BLOCK_C

    K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    V = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    DK = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    DV = DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
    # 16-bit causal: k read again at the end for φ' (its float32 tile live across the dots
    # spills on sm_80's 4 warps); else kept from here, the order the others fit in
    LATE: tl.constexpr = CAUSAL and dt != tl.float32
    b_xk, b_fk = _features(K, stride_kn, n0, Nk, o_c, o_d, m_d, 1.0, FEATURE_MAP)  # [BLOCK_C, BLOCK_D]
    b_fkd = b_fk.to(dt)
    b_v, m_rv = _load_rows(V, stride_vn, n0, Nk, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
    if CAUSAL:
        h_off = i_bh.to(tl.int64) * n_state + i_t
    else:
        h_off = i_bh.to(tl.int64) * n_state
    DHh = DH + h_off * HEAD_DIM * HEAD_DIM_V
    if BLOCK_T == BLOCK_D and BLOCK_T == BLOCK_DV:  # one tile: dS read once
        b_ds = tl.load(DHh + o_d[:, None] * HEAD_DIM_V + o_v[None, :],
                       mask=m_d[:, None] & m_v[None, :], other=0.0)  # [BLOCK_D, BLOCK_DV] float32
        b_dsr = _to_dot(b_ds, dt)
        b_dsc = b_dsr
        if not LATE:
            b_xkt = b_xk
    else:
        b_dsr = _to_dot(tl.load(DHh + o_dt[:, None] * HEAD_DIM_V + o_v[None, :],
                                mask=m_dt[:, None] & m_v[None, :], other=0.0), dt)  # [BLOCK_T, BLOCK_DV]
        b_dsc = _to_dot(tl.load(DHh + o_d[:, None] * HEAD_DIM_V + o_vt[None, :],
                                mask=m_d[:, None] & m_vt[None, :], other=0.0), dt)  # [BLOCK_D, BLOCK_T]
        if not LATE:
            b_xkt, _ = _features(K, stride_kn, n0, Nk, o_c, o_dt, m_dt, 1.0, FEATURE_MAP)  # [BLOCK_C, BLOCK_T]
    b_dfk = tl.dot(b_v, tl.trans(b_dsr), input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_T]
    b_dv = tl.dot(b_fkd, b_dsc, input_precision=DOT_PREC)  # [BLOCK_C, BLOCK_T]
    if NORMALIZE:
        b_dfk += tl.load(DHZ + h_off * HEAD_DIM + o_dt, mask=m_dt, other=0.0)[None, :]
    if CAUSAL:
        m_t = o_c[:, None] <= o_c[None, :]  # [BLOCK_C (key j), BLOCK_C (query i)]: j <= i
        for i_g in range(0, group):
            i_h = i_hk * group + i_g
            Qh = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
            Gh = G + i_b.to(tl.int64) * stride_gb + i_h.to(tl.int64) * stride_gh
            b_xq, b_fq = _features(Qh, stride_qn, n0, Nq, o_c, o_d, m_d, scale, FEATURE_MAP)  # [BLOCK_C, BLOCK_D]
            b_fqd = b_fq.to(dt)
            b_g, m_rg = _load_rows(Gh, stride_gn, n0, Nq, o_c, o_v, m_v)  # [BLOCK_C, BLOCK_DV]
            if BLOCK_T == BLOCK_D and BLOCK_T == BLOCK_DV:
                b_fqt = b_fqd
                b_gt = b_g
            else:
                b_xqt, b_fqt = _features(Qh, stride_qn, n0, Nq, o_c, o_dt, m_dt, scale, FEATURE_MAP)  # [BLOCK_C, BLOCK_T]
                b_fqt = b_fqt.to(dt)
                b_gt, m_rgt = _load_rows(Gh, stride_gn, n0, Nq, o_c, o_vt, m_vt)  # [BLOCK_C, BLOCK_T]
            # Pᵀ[j, i] = v_j · g_i + c_i, Aᵀ[j, i] = φ(k_j) · φ(q_i), j <= i: [BLOCK_C, BLOCK_C]
            b_pt = tl.dot(b_v, tl.trans(b_g), input_precision=DOT_PREC)
            if NORMALIZE:
                b_cp = tl.load(CP + (i_b * Hk * group + i_h).to(tl.int64) * Nq + n0 + o_c,
                               mask=n0 + o_c < Nq, other=0.0)  # [BLOCK_C]
                b_pt += b_cp[None, :]
            b_pt = tl.where(m_t, b_pt, 0.0)
            b_dfk = tl.dot(_to_dot(b_pt, dt), b_fqt, b_dfk, input_precision=DOT_PREC)
            b_at = tl.dot(b_fkd, tl.trans(b_fqd), input_precision=DOT_PREC)
            b_at = tl.where(m_t, b_at, 0.0)
            b_dv = tl.dot(_to_dot(b_at, dt), b_gt, b_dv, input_precision=DOT_PREC)
    if NORMALIZE:
        b_rinv = tl.load(RINV + i_bh)
        b_dfk *= b_rinv
        b_dv *= b_rinv
    if LATE:
        b_xkt, _ = _features(K, stride_kn, n0, Nk, o_c, o_dt, m_dt, 1.0, FEATURE_MAP)  # [BLOCK_C, BLOCK_T]
    b_dk = b_dfk * _dphi(b_xkt, FEATURE_MAP)
    _store_rows(DK, stride_dkn, n0, Nk, o_c, o_dt, m_dt, b_dk)
    _store_rows(DV, stride_dvn, n0, Nk, o_c, o_vt, m_vt, b_dv)

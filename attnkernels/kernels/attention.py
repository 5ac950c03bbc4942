"""Triton softmax attention (FlashAttention-2 structure): dense, causal, sliding window,
block-sparse tables and key padding, forward and backward.

Visibility (the contract of `attnkernels.reference`): query i sees key j iff
    i + Nk - Nq - window_left <= j <= i + Nk - Nq + window_right     (-1 = unbounded side)
and, when tables are given, block (i // sparse_block_size, j // sparse_block_size) is listed,
and, with a key padding mask, `not key_padding_mask[b, j]`.

Kernels
- `attn_fwd`: one program per (query block, batch*query head). It walks only the key
  blocks that intersect its window band (bounds computed from indices, no table), in
  three segments: a masked left edge, unmasked full blocks, a masked right edge. With
  tables it walks the listed key blocks (intersected with the band), always masked.
  Online softmax in base 2 (scale * log2(e) folded into the scores); stores out and the
  natural-log LSE.
- `attn_bwd_preprocess`: delta = rowsum(dout * out), float32.
- `attn_bwd_dkdv`: one program per (key block, batch*kv head). It loops over the query
  heads of its GQA group and, per head, over the query blocks of the band (or the
  `q_indices` table), accumulating dK and dV in registers, then writes them once.
- `attn_bwd_dq`: one program per (query block, batch*query head), over the key blocks of
  the band (or `kv_indices`), writes dQ once.

The backward is deterministic: no atomics; every output element is written by exactly
one program, and the sum over a GQA group's query heads happens in a fixed order inside
that program.

Rows with no visible key: the forward keeps l = 0 and writes out = 0, lse = -inf. The
backward reads lse = -inf as +inf so that every probability of that row is exp(-inf) = 0:
its dq is 0 and it adds nothing to dk/dv (never NaN).
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
    "attention_forward",
    "attention_backward",
    "kv_block_range",
    "q_block_range",
    "block_config",
    "AOT_SPECS",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------
# Small jitted helpers
# ----------------------------------------------------------------------------------------


@triton.jit
def _load_2d(ptr, m_row, m_col, MASK_ROW: tl.constexpr, MASK_COL: tl.constexpr):
    """Load a 2-D block, masking only the axes that can run out of bounds (zeros there)."""
    if MASK_ROW:
        if MASK_COL:
            b_x = tl.load(ptr, mask=m_row[:, None] & m_col[None, :], other=0.0)
        else:
            b_x = tl.load(ptr, mask=m_row[:, None], other=0.0)
    else:
        if MASK_COL:
            b_x = tl.load(ptr, mask=m_col[None, :], other=0.0)
        else:
            b_x = tl.load(ptr)
    return b_x


@triton.jit
def _kv_bounds(m0, Nq, Nk, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks [start, end) that the query rows [m0, min(m0+BLOCK_M, Nq)) can see; the
    blocks [full_lo, full_hi) within them are fully visible to every row (no element mask).
    Mirrored exactly by `kv_block_range` in Python. All divisions are of non-negative ints
    (Triton's // truncates toward zero)."""
    off = Nk - Nq  # bottom-right alignment: row i's diagonal is key i + off
    m_last = tl.minimum(m0 + BLOCK_M, Nq) - 1
    if HAS_LEFT:
        lo = tl.maximum(m0 + off - window_left, 0)
        full_lo = (tl.maximum(m_last + off - window_left, 0) + BLOCK_N - 1) // BLOCK_N
    else:
        lo = 0
        full_lo = 0
    if HAS_RIGHT:
        hi = tl.minimum(m_last + off + window_right + 1, Nk)
        full_hi = tl.minimum(tl.maximum(m0 + off + window_right + 1, 0) // BLOCK_N, Nk // BLOCK_N)
    else:
        hi = Nk
        full_hi = Nk // BLOCK_N
    start = lo // BLOCK_N
    end = tl.where(hi > lo, (hi + BLOCK_N - 1) // BLOCK_N, start)
    full_lo = tl.minimum(tl.maximum(full_lo, start), end)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), end)
    return start, full_lo, full_hi, end


@triton.jit
def _q_bounds(n0, Nq, Nk, window_left, window_right,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks [start, end) that see some key of [n0, min(n0+BLOCK_N, Nk)); blocks
    [full_lo, full_hi) see all of them on every valid row. Mirrored by `q_block_range`."""
    off = Nk - Nq
    n_last = tl.minimum(n0 + BLOCK_N, Nk) - 1
    # key j is seen by rows j - off - right <= i <= j - off + left
    if HAS_RIGHT:
        lo = tl.maximum(n0 - off - window_right, 0)
        full_lo = (tl.maximum(n_last - off - window_right, 0) + BLOCK_M - 1) // BLOCK_M
    else:
        lo = 0
        full_lo = 0
    if HAS_LEFT:
        hi = tl.minimum(n_last - off + window_left + 1, Nq)
        x = n0 - off + window_left  # the last row that sees the block's first key
        # a block is full if its last valid row <= x; the last (partial) block's last valid row is Nq-1
        full_hi = tl.where(Nq - 1 <= x, Nq, tl.maximum(x + 1, 0) // BLOCK_M)
    else:
        hi = Nq
        full_hi = (Nq + BLOCK_M - 1) // BLOCK_M
    start = lo // BLOCK_M
    end = tl.where(hi > lo, (hi + BLOCK_M - 1) // BLOCK_M, start)
    full_lo = tl.minimum(tl.maximum(full_lo, start), end)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), end)
    return start, full_lo, full_hi, end


@triton.jit
def _window_mask(o_q, o_k, off, window_left, window_right,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """The window rule for query indices o_q and key indices o_k, given already shaped to
    broadcast against each other ([M, 1] and [1, N], or [1, M] and [N, 1])."""
    m_vis = (o_q >= 0) & (o_k >= 0)  # all True, of the broadcast shape
    if HAS_LEFT:
        m_vis = m_vis & (o_k >= o_q + off - window_left)
    if HAS_RIGHT:
        m_vis = m_vis & (o_k <= o_q + off + window_right)
    return m_vis


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_kv_loop(b_acc, b_m, b_l, b_q, K, V, KPM, stride_kn, stride_vn,
                 o_m, i_lo, i_hi, Nq, Nk, window_left, window_right, qk_scale,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key blocks [i_lo, i_hi). K, V, KPM point at this (batch, head)'s
    first key. MASKED applies the window and key-range mask; unmasked blocks are full."""
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_nb = tl.arange(0, BLOCK_N)
    off = Nk - Nq
    for i_n in range(i_lo, i_hi):
        n0 = i_n * BLOCK_N
        o_n = n0 + o_nb
        m_n = o_n < Nk
        # k^T: [BLOCK_D, BLOCK_N]; v: [BLOCK_N, BLOCK_DV]
        p_kT = K + n0.to(tl.int64) * stride_kn + o_nb[None, :] * stride_kn + o_d[:, None]
        p_v = V + n0.to(tl.int64) * stride_vn + o_nb[:, None] * stride_vn + o_dv[None, :]
        b_kT = _load_2d(p_kT, o_d < HEAD_DIM, m_n, BLOCK_D != HEAD_DIM, MASKED)
        b_v = _load_2d(p_v, m_n, o_dv < HEAD_DIM_V, MASKED, BLOCK_DV != HEAD_DIM_V)
        # scores in log2 units: [BLOCK_M, BLOCK_N]
        b_s = tl.dot(b_q, b_kT, input_precision=DOT_PREC).to(tl.float32) * qk_scale
        if MASKED:
            m_vis = _window_mask(o_m[:, None], o_n[None, :], off, window_left, window_right,
                                 HAS_LEFT, HAS_RIGHT) & m_n[None, :]
            b_s = tl.where(m_vis, b_s, float("-inf"))
        if HAS_KPM:
            b_pad = tl.load(KPM + o_n, mask=m_n, other=1)  # [BLOCK_N], nonzero = ignore
            b_s = tl.where(b_pad[None, :] == 0, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # [BLOCK_M]
        # a row that has seen no key yet keeps m = -inf; use 0 as its shift so exp2 gives 0, not NaN
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.math.exp2(b_s - b_m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        b_alpha = tl.math.exp2(b_m - b_m_safe)  # [BLOCK_M]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None]
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_DV]
        b_m = b_m_new
    return b_acc, b_m, b_l


@triton.jit
def attn_fwd(Q, K, V, O, LSE, KV_NUM, KV_IDX, KPM,
             stride_qb, stride_qh, stride_qn,
             stride_kb, stride_kh, stride_kn,
             stride_vb, stride_vh, stride_vn,
             stride_ob, stride_oh, stride_on,
             stride_tnb, stride_tnh, stride_tib, stride_tih, stride_tim,
             stride_kpmb,
             Hq, Nq, Nk, group, window_left, window_right, qk_scale,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
             IS_SPARSE: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
             HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // group  # GQA: query head h reads kv head h // group
    m0 = i_m * BLOCK_M

    o_m = m0 + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_m = o_m < Nq

    # int64 for every program-id * stride product (large tensors overflow int32)
    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qn
    p_q = p_q + (o_m - m0)[:, None] * stride_qn + o_d[None, :]
    b_q = _load_2d(p_q, m_m, o_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM)  # [BLOCK_M, BLOCK_D]
    K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    V = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    if HAS_KPM:
        KPM = KPM + i_b.to(tl.int64) * stride_kpmb

    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)

    i_lo, i_full_lo, i_full_hi, i_hi = _kv_bounds(m0, Nq, Nk, window_left, window_right,
                                                  BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if IS_SPARSE:
        # walk the listed key blocks of this query block's sparse row, each cut to the band
        i_row = m0 // SPARSE_BLOCK
        p_num = KV_NUM + i_b.to(tl.int64) * stride_tnb + i_h.to(tl.int64) * stride_tnh + i_row
        p_idx = KV_IDX + i_b.to(tl.int64) * stride_tib + i_h.to(tl.int64) * stride_tih + i_row.to(tl.int64) * stride_tim
        n_listed = tl.load(p_num)
        for i_t in range(0, n_listed):
            i_kb = tl.load(p_idx + i_t)
            lo = tl.maximum(i_lo, i_kb * (SPARSE_BLOCK // BLOCK_N))
            hi = tl.minimum(i_hi, (i_kb + 1) * (SPARSE_BLOCK // BLOCK_N))
            b_acc, b_m, b_l = _fwd_kv_loop(b_acc, b_m, b_l, b_q, K, V, KPM, stride_kn, stride_vn,
                                           o_m, lo, hi, Nq, Nk, window_left, window_right, qk_scale,
                                           HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                           True, HAS_LEFT, HAS_RIGHT, HAS_KPM, DOT_PREC)
    else:
        # left edge (masked), full blocks (no element mask), right edge (masked)
        b_acc, b_m, b_l = _fwd_kv_loop(b_acc, b_m, b_l, b_q, K, V, KPM, stride_kn, stride_vn,
                                       o_m, i_lo, i_full_lo, Nq, Nk, window_left, window_right, qk_scale,
                                       HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                       True, HAS_LEFT, HAS_RIGHT, HAS_KPM, DOT_PREC)
        b_acc, b_m, b_l = _fwd_kv_loop(b_acc, b_m, b_l, b_q, K, V, KPM, stride_kn, stride_vn,
                                       o_m, i_full_lo, i_full_hi, Nq, Nk, window_left, window_right, qk_scale,
                                       HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                       False, HAS_LEFT, HAS_RIGHT, HAS_KPM, DOT_PREC)
        b_acc, b_m, b_l = _fwd_kv_loop(b_acc, b_m, b_l, b_q, K, V, KPM, stride_kn, stride_vn,
                                       o_m, i_full_hi, i_hi, Nq, Nk, window_left, window_right, qk_scale,
                                       HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                       True, HAS_LEFT, HAS_RIGHT, HAS_KPM, DOT_PREC)

    # rows that saw no key: l = 0 -> out 0, lse -inf
    m_seen = b_l > 0.0
    b_o = b_acc / tl.where(m_seen, b_l, 1.0)[:, None]
    b_lse = tl.where(m_seen, (b_m + tl.math.log2(tl.where(m_seen, b_l, 1.0))) * 0.6931471805599453,
                     float("-inf"))  # natural log
    p_o = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_on
    p_o = p_o + (o_m - m0)[:, None] * stride_on + o_dv[None, :]
    if BLOCK_DV != HEAD_DIM_V:
        tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None] & (o_dv < HEAD_DIM_V)[None, :])
    else:
        tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None])
    tl.store(LSE + i_bh.to(tl.int64) * Nq + o_m, b_lse, mask=m_m)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------


@triton.jit
def attn_bwd_preprocess(O, DO, DELTA,
                        stride_ob, stride_oh, stride_on,
                        stride_dob, stride_doh, stride_don,
                        Hq, Nq,
                        HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d] (float32)."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_dv = tl.arange(0, BLOCK_DV)
    m_2d = (o_m < Nq)[:, None] & (o_dv < HEAD_DIM_V)[None, :]
    p_o = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + o_m.to(tl.int64)[:, None] * stride_on + o_dv[None, :]
    p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh + o_m.to(tl.int64)[:, None] * stride_don + o_dv[None, :]
    b_o = tl.load(p_o, mask=m_2d, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DV]
    b_do = tl.load(p_do, mask=m_2d, other=0.0).to(tl.float32)
    tl.store(DELTA + i_bh.to(tl.int64) * Nq + o_m, tl.sum(b_o * b_do, 1), mask=o_m < Nq)


@triton.jit
def _bwd_dkdv_loop(b_dk, b_dv, b_k, b_v, Q, DO, LSE, DELTA, stride_qn, stride_don,
                   o_n, i_lo, i_hi, Nq, Nk, window_left, window_right, qk_scale,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of key rows o_n over query blocks [i_lo, i_hi) of one query head.
    Q, DO, LSE, DELTA point at that head's first row. Query rows >= Nq read lse = +inf (p = 0);
    key rows >= Nk are never stored, so they need no mask here."""
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_mb = tl.arange(0, BLOCK_M)
    off = Nk - Nq
    for i_m in range(i_lo, i_hi):
        m0 = i_m * BLOCK_M
        o_m = m0 + o_mb
        m_m = o_m < Nq
        p_q = Q + m0.to(tl.int64) * stride_qn + o_mb[:, None] * stride_qn + o_d[None, :]
        p_do = DO + m0.to(tl.int64) * stride_don + o_mb[:, None] * stride_don + o_dv[None, :]
        b_q = _load_2d(p_q, m_m, o_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM)  # [BLOCK_M, BLOCK_D]
        b_do = _load_2d(p_do, m_m, o_dv < HEAD_DIM_V, True, BLOCK_DV != HEAD_DIM_V)  # [BLOCK_M, BLOCK_DV]
        b_lse = tl.load(LSE + o_m, mask=m_m, other=float("inf")) * 1.4426950408889634  # [BLOCK_M], log2 units
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)  # row with no key: p = 0
        b_delta = tl.load(DELTA + o_m, mask=m_m, other=0.0)  # [BLOCK_M]
        # transposed probabilities: [BLOCK_N, BLOCK_M]
        b_sT = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC).to(tl.float32) * qk_scale
        b_pT = tl.math.exp2(b_sT - b_lse[None, :])
        if MASKED:
            m_vis = _window_mask(o_m[None, :], o_n[:, None], off, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            b_pT = tl.where(m_vis, b_pT, 0.0)
        b_dv = tl.dot(b_pT.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_DV]
        b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC).to(tl.float32)  # [BLOCK_N, BLOCK_M]
        b_dsT = b_pT * (b_dpT - b_delta[None, :])
        b_dk = tl.dot(b_dsT.to(b_q.dtype), b_q, b_dk, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_D]
    return b_dk, b_dv


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, Q_NUM, Q_IDX, KPM,
                  stride_qb, stride_qh, stride_qn,
                  stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn,
                  stride_dob, stride_doh, stride_don,
                  stride_dkb, stride_dkh, stride_dkn,
                  stride_dvb, stride_dvh, stride_dvn,
                  stride_tnb, stride_tnh, stride_tib, stride_tih, stride_tim,
                  stride_kpmb,
                  Hq, Hk, Nq, Nk, group, window_left, window_right, qk_scale, scale,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  IS_SPARSE: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
                  HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)  # batch * kv head
    i_b = i_bh // Hk
    i_hk = i_bh % Hk
    n0 = i_n * BLOCK_N
    o_n = n0 + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_n = o_n < Nk

    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh + n0.to(tl.int64) * stride_kn
    p_k = p_k + (o_n - n0)[:, None] * stride_kn + o_d[None, :]
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh + n0.to(tl.int64) * stride_vn
    p_v = p_v + (o_n - n0)[:, None] * stride_vn + o_dv[None, :]
    b_k = _load_2d(p_k, m_n, o_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM)  # [BLOCK_N, BLOCK_D]
    b_v = _load_2d(p_v, m_n, o_dv < HEAD_DIM_V, True, BLOCK_DV != HEAD_DIM_V)  # [BLOCK_N, BLOCK_DV]
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    i_lo, i_full_lo, i_full_hi, i_hi = _q_bounds(n0, Nq, Nk, window_left, window_right,
                                                 BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # the query heads of this kv head's group, summed in a fixed order (deterministic)
    for i_g in range(0, group):
        i_h = i_hk * group + i_g
        i_bhq = i_b * Hq + i_h
        p_qh = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
        p_doh = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
        p_lse = LSE + i_bhq.to(tl.int64) * Nq
        p_delta = DELTA + i_bhq.to(tl.int64) * Nq
        if IS_SPARSE:
            i_col = n0 // SPARSE_BLOCK
            p_num = Q_NUM + i_b.to(tl.int64) * stride_tnb + i_h.to(tl.int64) * stride_tnh + i_col
            p_idx = Q_IDX + i_b.to(tl.int64) * stride_tib + i_h.to(tl.int64) * stride_tih + i_col.to(tl.int64) * stride_tim
            n_listed = tl.load(p_num)
            for i_t in range(0, n_listed):
                i_qb = tl.load(p_idx + i_t)
                lo = tl.maximum(i_lo, i_qb * (SPARSE_BLOCK // BLOCK_M))
                hi = tl.minimum(i_hi, (i_qb + 1) * (SPARSE_BLOCK // BLOCK_M))
                b_dk, b_dv = _bwd_dkdv_loop(b_dk, b_dv, b_k, b_v, p_qh, p_doh, p_lse, p_delta, stride_qn, stride_don,
                                            o_n, lo, hi, Nq, Nk, window_left, window_right, qk_scale,
                                            HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV,
                                            True, HAS_LEFT, HAS_RIGHT, DOT_PREC)
        else:
            b_dk, b_dv = _bwd_dkdv_loop(b_dk, b_dv, b_k, b_v, p_qh, p_doh, p_lse, p_delta, stride_qn, stride_don,
                                        o_n, i_lo, i_full_lo, Nq, Nk, window_left, window_right, qk_scale,
                                        HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV,
                                        True, HAS_LEFT, HAS_RIGHT, DOT_PREC)
            b_dk, b_dv = _bwd_dkdv_loop(b_dk, b_dv, b_k, b_v, p_qh, p_doh, p_lse, p_delta, stride_qn, stride_don,
                                        o_n, i_full_lo, i_full_hi, Nq, Nk, window_left, window_right, qk_scale,
                                        HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV,
                                        False, HAS_LEFT, HAS_RIGHT, DOT_PREC)
            b_dk, b_dv = _bwd_dkdv_loop(b_dk, b_dv, b_k, b_v, p_qh, p_doh, p_lse, p_delta, stride_qn, stride_don,
                                        o_n, i_full_hi, i_hi, Nq, Nk, window_left, window_right, qk_scale,
                                        HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV,
                                        True, HAS_LEFT, HAS_RIGHT, DOT_PREC)

    b_dk = b_dk * scale  # dS was taken w.r.t. the unscaled scores
    if HAS_KPM:
        # a padded key's probabilities are 0 in every row: its dk, dv are 0 (the loop above
        # did not mask it; only its own rows of dk, dv were affected, and they are replaced)
        b_pad = tl.load(KPM + i_b.to(tl.int64) * stride_kpmb + o_n, mask=m_n, other=1)
        b_dk = tl.where(b_pad[:, None] == 0, b_dk, 0.0)
        b_dv = tl.where(b_pad[:, None] == 0, b_dv, 0.0)
    p_dk = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh + n0.to(tl.int64) * stride_dkn
    p_dk = p_dk + (o_n - n0)[:, None] * stride_dkn + o_d[None, :]
    p_dv = DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh + n0.to(tl.int64) * stride_dvn
    p_dv = p_dv + (o_n - n0)[:, None] * stride_dvn + o_dv[None, :]
    tl.store(p_dk, b_dk.to(DK.dtype.element_ty), mask=m_n[:, None] & (o_d < HEAD_DIM)[None, :])
    tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=m_n[:, None] & (o_dv < HEAD_DIM_V)[None, :])


@triton.jit
def _bwd_dq_loop(b_dq, b_q, b_do, b_lse, b_delta, K, V, KPM, stride_kn, stride_vn,
                 o_m, i_lo, i_hi, Nq, Nk, window_left, window_right, qk_scale,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dQ of rows o_m over key blocks [i_lo, i_hi)."""
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_nb = tl.arange(0, BLOCK_N)
    off = Nk - Nq
    for i_n in range(i_lo, i_hi):
        n0 = i_n * BLOCK_N
        o_n = n0 + o_nb
        m_n = o_n < Nk
        p_kT = K + n0.to(tl.int64) * stride_kn + o_nb[None, :] * stride_kn + o_d[:, None]
        p_vT = V + n0.to(tl.int64) * stride_vn + o_nb[None, :] * stride_vn + o_dv[:, None]
        b_kT = _load_2d(p_kT, o_d < HEAD_DIM, m_n, BLOCK_D != HEAD_DIM, MASKED)  # [BLOCK_D, BLOCK_N]
        b_vT = _load_2d(p_vT, o_dv < HEAD_DIM_V, m_n, BLOCK_DV != HEAD_DIM_V, MASKED)  # [BLOCK_DV, BLOCK_N]
        b_s = tl.dot(b_q, b_kT, input_precision=DOT_PREC).to(tl.float32) * qk_scale  # [BLOCK_M, BLOCK_N]
        b_p = tl.math.exp2(b_s - b_lse[:, None])
        if MASKED:
            # keys >= Nk too: their p is exp(-lse) (k = 0), which could overflow into inf * 0
            m_vis = _window_mask(o_m[:, None], o_n[None, :], off, window_left, window_right,
                                 HAS_LEFT, HAS_RIGHT) & m_n[None, :]
            b_p = tl.where(m_vis, b_p, 0.0)
        if HAS_KPM:
            b_pad = tl.load(KPM + o_n, mask=m_n, other=1)
            b_p = tl.where(b_pad[None, :] == 0, b_p, 0.0)
        b_dp = tl.dot(b_do, b_vT, input_precision=DOT_PREC).to(tl.float32)  # [BLOCK_M, BLOCK_N]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = tl.dot(b_ds.to(b_kT.dtype), tl.trans(b_kT), b_dq, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_D]
    return b_dq


@triton.jit
def attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_NUM, KV_IDX, KPM,
                stride_qb, stride_qh, stride_qn,
                stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_dob, stride_doh, stride_don,
                stride_dqb, stride_dqh, stride_dqn,
                stride_tnb, stride_tnh, stride_tib, stride_tih, stride_tim,
                stride_kpmb,
                Hq, Nq, Nk, group, window_left, window_right, qk_scale, scale,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                IS_SPARSE: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
                HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // group
    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_m = o_m < Nq

    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qn
    p_q = p_q + (o_m - m0)[:, None] * stride_qn + o_d[None, :]
    p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh + m0.to(tl.int64) * stride_don
    p_do = p_do + (o_m - m0)[:, None] * stride_don + o_dv[None, :]
    b_q = _load_2d(p_q, m_m, o_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM)  # [BLOCK_M, BLOCK_D]
    b_do = _load_2d(p_do, m_m, o_dv < HEAD_DIM_V, True, BLOCK_DV != HEAD_DIM_V)  # [BLOCK_M, BLOCK_DV]
    b_lse = tl.load(LSE + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=float("inf")) * 1.4426950408889634
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)  # row with no key: p = 0
    b_delta = tl.load(DELTA + i_bh.to(tl.int64) * Nq + o_m, mask=m_m, other=0.0)
    K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    V = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    if HAS_KPM:
        KPM = KPM + i_b.to(tl.int64) * stride_kpmb
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    i_lo, i_full_lo, i_full_hi, i_hi = _kv_bounds(m0, Nq, Nk, window_left, window_right,
                                                  BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if IS_SPARSE:
        i_row = m0 // SPARSE_BLOCK
        p_num = KV_NUM + i_b.to(tl.int64) * stride_tnb + i_h.to(tl.int64) * stride_tnh + i_row
        p_idx = KV_IDX + i_b.to(tl.int64) * stride_tib + i_h.to(tl.int64) * stride_tih + i_row.to(tl.int64) * stride_tim
        n_listed = tl.load(p_num)
        for i_t in range(0, n_listed):
            i_kb = tl.load(p_idx + i_t)
            lo = tl.maximum(i_lo, i_kb * (SPARSE_BLOCK // BLOCK_N))
            hi = tl.minimum(i_hi, (i_kb + 1) * (SPARSE_BLOCK // BLOCK_N))
            b_dq = _bwd_dq_loop(b_dq, b_q, b_do, b_lse, b_delta, K, V, KPM, stride_kn, stride_vn,
                                o_m, lo, hi, Nq, Nk, window_left, window_right, qk_scale,
                                HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                True, HAS_LEFT, HAS_RIGHT, HAS_KPM, DOT_PREC)
    else:
        b_dq = _bwd_dq_loop(b_dq, b_q, b_do, b_lse, b_delta, K, V, KPM, stride_kn, stride_vn,
                            o_m, i_lo, i_full_lo, Nq, Nk, window_left, window_right, qk_scale,
                            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                            True, HAS_LEFT, HAS_RIGHT, HAS_KPM, DOT_PREC)
        b_dq = _bwd_dq_loop(b_dq, b_q, b_do, b_lse, b_delta, K, V, KPM, stride_kn, stride_vn,
                            o_m, i_full_lo, i_full_hi, Nq, Nk, window_left, window_right, qk_scale,
                            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                            False, HAS_LEFT, HAS_RIGHT, HAS_KPM, DOT_PREC)
        b_dq = _bwd_dq_loop(b_dq, b_q, b_do, b_lse, b_delta, K, V, KPM, stride_kn, stride_vn,
                            o_m, i_full_hi, i_hi, Nq, Nk, window_left, window_right, qk_scale,
                            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                            True, HAS_LEFT, HAS_RIGHT, HAS_KPM, DOT_PREC)

    b_dq = b_dq * scale
    p_dq = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh + m0.to(tl.int64) * stride_dqn
    p_dq = p_dq + (o_m - m0)[:, None] * stride_dqn + o_d[None, :]
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=m_m[:, None] & (o_d < HEAD_DIM)[None, :])


# ----------------------------------------------------------------------------------------
# Python mirrors of the loop bounds (tests check them against brute force and the kernels)
# ----------------------------------------------------------------------------------------


class BlockRange(NamedTuple):
    """Blocks [start, end) are visited; [full_start, full_end) need no element mask."""

    start: int
    full_start: int
    full_end: int
    end: int

    @property
    def count(self) -> int:
        return self.end - self.start


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_block_range(q_block: int, block_m: int, block_n: int, q_len: int, kv_len: int,
                   window_left: int, window_right: int) -> BlockRange:
    """Key blocks visited by query block `q_block` in the forward and dQ kernels (`_kv_bounds`)."""
    off = kv_len - q_len
    m0 = q_block * block_m
    m_last = min(m0 + block_m, q_len) - 1
    if window_left >= 0:
        lo = max(m0 + off - window_left, 0)
        full_lo = _cdiv(max(m_last + off - window_left, 0), block_n)
    else:
        lo, full_lo = 0, 0
    if window_right >= 0:
        hi = min(m_last + off + window_right + 1, kv_len)
        full_hi = min(max(m0 + off + window_right + 1, 0) // block_n, kv_len // block_n)
    else:
        hi, full_hi = kv_len, kv_len // block_n
    start = lo // block_n
    end = _cdiv(hi, block_n) if hi > lo else start
    full_lo = min(max(full_lo, start), end)
    full_hi = min(max(full_hi, full_lo), end)
    return BlockRange(start, full_lo, full_hi, end)


def q_block_range(k_block: int, block_m: int, block_n: int, q_len: int, kv_len: int,
                  window_left: int, window_right: int) -> BlockRange:
    """Query blocks visited by key block `k_block` in the dK/dV kernel (`_q_bounds`)."""
    off = kv_len - q_len
    n0 = k_block * block_n
    n_last = min(n0 + block_n, kv_len) - 1
    if window_right >= 0:
        lo = max(n0 - off - window_right, 0)
        full_lo = _cdiv(max(n_last - off - window_right, 0), block_m)
    else:
        lo, full_lo = 0, 0
    if window_left >= 0:
        hi = min(n_last - off + window_left + 1, q_len)
        x = n0 - off + window_left
        full_hi = q_len if q_len - 1 <= x else max(x + 1, 0) // block_m
    else:
        hi, full_hi = q_len, _cdiv(q_len, block_m)
    start = lo // block_m
    end = _cdiv(hi, block_m) if hi > lo else start
    full_lo = min(max(full_lo, start), end)
    full_hi = min(max(full_hi, full_lo), end)
    return BlockRange(start, full_lo, full_hi, end)


@triton.jit
def _bounds_probe(OUT, Nq, Nk, window_left, window_right,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, KV: tl.constexpr):
    """Test hook: writes what the kernels' bound helpers compute for block program_id(0)."""
    i = tl.program_id(0)
    if KV:
        a, b, c, d = _kv_bounds(i * BLOCK_M, Nq, Nk, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    else:
        a, b, c, d = _q_bounds(i * BLOCK_N, Nq, Nk, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    tl.store(OUT + i * 4 + 0, a)
    tl.store(OUT + i * 4 + 1, b)
    tl.store(OUT + i * 4 + 2, c)
    tl.store(OUT + i * 4 + 3, d)


def kernel_block_ranges(kind: str, block_m: int, block_n: int, q_len: int, kv_len: int,
                        window_left: int, window_right: int, device="cpu") -> list[BlockRange]:
    """The bounds the jitted helpers compute, one per query block (kind="kv") or key block
    (kind="q"), so tests can compare them with the Python mirrors."""
    n_blocks = _cdiv(q_len, block_m) if kind == "kv" else _cdiv(kv_len, block_n)
    out = torch.zeros(n_blocks, 4, dtype=torch.int32, device=device)
    if n_blocks:
        _bounds_probe[(n_blocks,)](out, q_len, kv_len, window_left, window_right,
                                   BLOCK_M=block_m, BLOCK_N=block_n,
                                   HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, KV=kind == "kv")
    return [BlockRange(*map(int, row)) for row in out.tolist()]


# ----------------------------------------------------------------------------------------
# Block configs
# ----------------------------------------------------------------------------------------


class BlockConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # registers per thread ptxas may use (None: its own choice). ptxas otherwise aims at an
    # occupancy (e.g. 168 regs = 3 blocks of 128 threads) and spills to get there.
    maxnreg: int | None = None


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


_BLOCK_OVERRIDE: tuple[int, int] | None = None


@contextlib.contextmanager
def override_blocks(block_m: int, block_n: int):
    """Test hook: launch every kernel with these BLOCK_M/BLOCK_N (powers of two >= 16), so
    that small interpreter shapes still span many blocks and all three loop segments. The
    code path is the one that ships; only the tile sizes change."""
    global _BLOCK_OVERRIDE
    previous, _BLOCK_OVERRIDE = _BLOCK_OVERRIDE, (block_m, block_n)
    try:
        yield
    finally:
        _BLOCK_OVERRIDE = previous


# (kernel, padded head dim class) -> (config for 16-bit inputs, config for fp32 inputs).
# Found with `python -m attnkernels.tools.compile_report`: each is the largest tile tried
# that compiles without a spill and within shared memory on both sm_80 and sm_90a, for
# every mask variant (the masked/sparse loops are the register-hungry ones). Why the
# tiles shrink with D: the accumulators ([BLOCK_M, D] in fwd/dQ, two [BLOCK_N, D] in
# dK/dV) and, on sm_80, each warp's full copy of the mma B operand ([D, BLOCK_N] k^T in
# fwd/dQ, [D, BLOCK_M] q^T in dK/dV) grow with D; more warps split the accumulators.
# fp32 inputs double every operand tile, and exact fp32 dots ("ieee") run on FMA units
# with operands spread over registers, hence the small fp32 tiles; at those sizes ptxas
# would rather spill a few bytes than drop below 2-3 blocks per SM, so the fp32 configs
# let it use all 255 registers per thread (`maxnreg`).
# On an H200 (benchmarks/gpu_tune.py, docs/gpu_tune_h200.json) larger dK/dV tiles ran up to
# 3x faster at D=128 (32x128: 1.8 ms vs 5.9 ms causal fwd+bwd), but Triton 3.8's ptxas
# spills them on sm_80/sm_90a, so the gate keeps the small ones; the D<=64 16-bit fwd and
# dK/dV tiles below are the fastest spill-free ones of that sweep.
_FP32_REGS = 255
_CONFIGS = {
    # forward: BLOCK_M query rows resident, BLOCK_N key rows stream
    ("fwd", 64): (BlockConfig(64, 64, 4, 3), BlockConfig(32, 16, 4, 2, _FP32_REGS)),
    ("fwd", 128): (BlockConfig(128, 64, 8, 3), BlockConfig(16, 16, 4, 2, _FP32_REGS)),
    ("fwd", 256): (BlockConfig(64, 32, 8, 2), BlockConfig(32, 16, 8, 2, _FP32_REGS)),
    # dK/dV: BLOCK_N key rows resident, BLOCK_M query rows stream
    ("dkdv", 64): (BlockConfig(16, 128, 8, 2), BlockConfig(16, 16, 4, 2, _FP32_REGS)),
    ("dkdv", 128): (BlockConfig(16, 32, 8, 2), BlockConfig(16, 16, 8, 2, _FP32_REGS)),
    ("dkdv", 256): (BlockConfig(16, 16, 8, 1), BlockConfig(16, 16, 8, 2, _FP32_REGS)),
    # dQ: BLOCK_M query rows resident, BLOCK_N key rows stream
    ("dq", 64): (BlockConfig(64, 32, 4, 3), BlockConfig(32, 16, 4, 2, _FP32_REGS)),
    ("dq", 128): (BlockConfig(64, 32, 4, 2), BlockConfig(16, 16, 4, 2, _FP32_REGS)),
    ("dq", 256): (BlockConfig(32, 16, 4, 2), BlockConfig(16, 16, 4, 2, _FP32_REGS)),
}


def block_config(kernel: str, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                 sparse_block_size: int = 0) -> BlockConfig:
    """GPU launch config per kernel ("fwd", "dkdv", "dq"), padded head dim and dtype (see
    `_CONFIGS`). With a block-sparse table the blocks must divide `sparse_block_size` (all
    are powers of two, so min() does it)."""
    if kernel not in ("fwd", "dkdv", "dq"):
        raise ValueError(f"block_config: unknown kernel {kernel!r}")
    d = max(_pad_dim(head_dim), _pad_dim(head_dim_v))
    d_class = 64 if d <= 64 else 128 if d <= 128 else 256
    cfg = _CONFIGS[kernel, d_class][1 if dtype == torch.float32 else 0]
    if _BLOCK_OVERRIDE is not None:
        cfg = cfg._replace(block_m=_BLOCK_OVERRIDE[0], block_n=_BLOCK_OVERRIDE[1])
    if sparse_block_size:
        cfg = cfg._replace(block_m=min(cfg.block_m, sparse_block_size), block_n=min(cfg.block_n, sparse_block_size))
    return cfg


def _launch_options(cfg: BlockConfig) -> dict:
    """Compile options of a launch; maxnreg only when set."""
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.maxnreg is not None:
        opts["maxnreg"] = cfg.maxnreg
    return opts


PREPROCESS_BLOCK_M = 64


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 stays exact ("ieee") unless the user enabled TF32 matmuls, like torch does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # the default; 16-bit inputs ignore it


# ----------------------------------------------------------------------------------------
# Argument checks for the optional features
# ----------------------------------------------------------------------------------------


def _table_strides(t: torch.Tensor) -> list[int]:
    """Strides with 0 on broadcast (size-1) batch/head dims; the last dim must be contiguous."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(t.dim() - 1)]


def _check_tables(name_num: str, num, name_idx: str, idx, batch: int, q_heads: int, n_rows: int, n_cols: int):
    if num is None or idx is None:
        raise ValueError(f"{name_num} and {name_idx} must be given together")
    for name, t, nd in ((name_num, num, 3), (name_idx, idx, 4)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != nd:
            raise ValueError(f"{name}: expected an int32 tensor with {nd} dims, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    bm, hm = num.shape[0], num.shape[1]
    if bm not in (1, batch) or hm not in (1, q_heads):
        raise ValueError(f"{name_num}: leading dims must be (1|B, 1|Hq) = (1|{batch}, 1|{q_heads}), got {tuple(num.shape)}")
    if tuple(num.shape) != (bm, hm, n_rows):
        raise ValueError(f"{name_num}: expected shape {(bm, hm, n_rows)}, got {tuple(num.shape)}")
    if tuple(idx.shape) != (bm, hm, n_rows, n_cols):
        raise ValueError(f"{name_idx}: expected shape {(bm, hm, n_rows, n_cols)}, got {tuple(idx.shape)}")
    return num.contiguous(), idx.contiguous()


def _check_sparse_block_size(sparse_block_size: int):
    if not isinstance(sparse_block_size, int) or sparse_block_size < 16 or sparse_block_size & (sparse_block_size - 1):
        raise ValueError(f"sparse_block_size: expected a power of two >= 16 with block-sparse tables, got {sparse_block_size!r}")


def _check_kpm(key_padding_mask, batch: int, kv_len: int):
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask: expected a bool tensor (B, Nk), True = ignore; got {getattr(key_padding_mask, 'dtype', type(key_padding_mask))}")
    if tuple(key_padding_mask.shape) != (batch, kv_len):
        raise ValueError(f"key_padding_mask: expected shape {(batch, kv_len)}, got {tuple(key_padding_mask.shape)}")
    return key_padding_mask.contiguous().view(torch.uint8)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def attention_forward(q, k, v, scale, window_left, window_right,
                      kv_num_blocks=None, kv_indices=None, sparse_block_size=0,
                      key_padding_mask=None):
    """(out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32 natural log)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    is_sparse = kv_num_blocks is not None or kv_indices is not None
    if is_sparse:
        _check_sparse_block_size(sparse_block_size)
        kv_num_blocks, kv_indices = _check_tables("kv_num_blocks", kv_num_blocks, "kv_indices", kv_indices, batch, q_heads,
                                                  _cdiv(q_len, sparse_block_size), _cdiv(kv_len, sparse_block_size))
    kpm = _check_kpm(key_padding_mask, batch, kv_len)

    out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    cfg = block_config("fwd", head_dim, head_dim_v, q.dtype, sparse_block_size if is_sparse else 0)
    table_num = kv_num_blocks if is_sparse else lse  # unused dummies when not sparse
    table_idx = kv_indices if is_sparse else lse
    t_strides = (_table_strides(kv_num_blocks)[:2] + _table_strides(kv_indices)[:3]) if is_sparse else [0] * 5
    grid = (_cdiv(q_len, cfg.block_m), batch * q_heads)
    attn_fwd[grid](
        q, k, v, out, lse, table_num, table_idx, kpm if kpm is not None else lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *t_strides,
        kpm.stride(0) if kpm is not None else 0,
        q_heads, q_len, kv_len, q_heads // kv_heads, window_left, window_right, scale * LOG2E,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=_pad_dim(head_dim), BLOCK_DV=_pad_dim(head_dim_v),
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
        IS_SPARSE=is_sparse, SPARSE_BLOCK=sparse_block_size if is_sparse else 0,
        HAS_KPM=kpm is not None, DOT_PREC=_dot_precision(q.dtype),
        **_launch_options(cfg),
    )
    return out, lse


def attention_backward(dout, q, k, v, out, lse, scale, window_left, window_right,
                       kv_num_blocks=None, kv_indices=None, q_num_blocks=None, q_indices=None,
                       sparse_block_size=0, key_padding_mask=None):
    """(dq, dk, dv) in the inputs' dtype. Deterministic (see the module docstring)."""
    q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    is_sparse = any(t is not None for t in (kv_num_blocks, kv_indices, q_num_blocks, q_indices))
    if is_sparse:
        _check_sparse_block_size(sparse_block_size)
        n_qb, n_kb = _cdiv(q_len, sparse_block_size), _cdiv(kv_len, sparse_block_size)
        kv_num_blocks, kv_indices = _check_tables("kv_num_blocks", kv_num_blocks, "kv_indices", kv_indices,
                                                  batch, q_heads, n_qb, n_kb)
        q_num_blocks, q_indices = _check_tables("q_num_blocks", q_num_blocks, "q_indices", q_indices,
                                                batch, q_heads, n_kb, n_qb)
    kpm = _check_kpm(key_padding_mask, batch, kv_len)

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.numel() == 0 and k.numel() == 0 and v.numel() == 0:
        return dq, dk, dv
    if q_len == 0 or batch * q_heads == 0:  # no query: nothing flows back to k, v
        dk.zero_()
        dv.zero_()
        return dq, dk, dv

    delta = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    pad_d, pad_dv = _pad_dim(head_dim), _pad_dim(head_dim_v)
    attn_bwd_preprocess[(_cdiv(q_len, PREPROCESS_BLOCK_M), batch * q_heads)](
        out, dout, delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        q_heads, q_len, HEAD_DIM_V=head_dim_v, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=pad_dv,
    )
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=pad_d, BLOCK_DV=pad_dv,
                  HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
                  IS_SPARSE=is_sparse, SPARSE_BLOCK=sparse_block_size if is_sparse else 0,
                  HAS_KPM=kpm is not None, DOT_PREC=_dot_precision(q.dtype))
    kpm_arg = kpm if kpm is not None else delta
    kpm_stride = kpm.stride(0) if kpm is not None else 0
    group = q_heads // kv_heads

    if kv_len > 0:
        cfg = block_config("dkdv", head_dim, head_dim_v, q.dtype, sparse_block_size if is_sparse else 0)
        t_strides = (_table_strides(q_num_blocks)[:2] + _table_strides(q_indices)[:3]) if is_sparse else [0] * 5
        attn_bwd_dkdv[(_cdiv(kv_len, cfg.block_n), batch * kv_heads)](
            q, k, v, dout, lse, delta, dk, dv,
            q_num_blocks if is_sparse else delta, q_indices if is_sparse else delta, kpm_arg,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            *t_strides, kpm_stride,
            q_heads, kv_heads, q_len, kv_len, group, window_left, window_right, scale * LOG2E, scale,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **_launch_options(cfg), **common,
        )
    cfg = block_config("dq", head_dim, head_dim_v, q.dtype, sparse_block_size if is_sparse else 0)
    t_strides = (_table_strides(kv_num_blocks)[:2] + _table_strides(kv_indices)[:3]) if is_sparse else [0] * 5
    attn_bwd_dq[(_cdiv(q_len, cfg.block_m), batch * q_heads)](
        q, k, v, dout, lse, delta, dq,
        kv_num_blocks if is_sparse else delta, kv_indices if is_sparse else delta, kpm_arg,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *t_strides, kpm_stride,
        q_heads, q_len, kv_len, group, window_left, window_right, scale * LOG2E, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **_launch_options(cfg), **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# Ahead-of-time compile declarations (checked by `python -m attnkernels.tools.compile_report`)
# ----------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INT_ARGS = {"Hq", "Hk", "Nq", "Nk", "group", "window_left", "window_right"}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    """Triton type per argument, from the naming convention of this file: data tensors are
    upper-case, LSE/DELTA float32, tables int32, KPM uint8; strides and sizes i32."""
    sig = {}
    # the plain Python function (works for a JITFunction and for the interpreter's wrapper)
    for name, param in inspect.signature(fn.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            assert name in constexprs, f"{fn.__name__}: constexpr {name} needs a value"
            sig[name] = "constexpr"
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name.endswith("_NUM") or name.endswith("_IDX"):
            sig[name] = "*i32"
        elif name == "KPM":
            sig[name] = "*u8"
        elif name.isupper():
            sig[name] = f"*{dtype}"
        elif name.startswith("stride_") or name in _INT_ARGS:
            sig[name] = "i32"
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        else:
            raise AssertionError(f"{fn.__name__}: no Triton type for argument {name!r}")
    return sig


def _divisibility(signature: dict) -> dict:
    """The specialization the JIT gives a launch on contiguous (or BNHD-transposed) tensors
    with head dims that are multiples of 16: every pointer 16-byte aligned (torch allocations
    are) and the batch/head/row strides of q, k, v, out and the grads divisible by 16. Table
    strides, the KPM stride and the sizes are arbitrary, so they get nothing."""
    div = [["tt.divisibility", 16]]
    return {name: div for name, ty in signature.items()
            if ty.startswith("*") or (name.startswith("stride_") and not name.startswith(("stride_t", "stride_kpm")))}


# mask variants that ship: (name, HAS_LEFT, HAS_RIGHT, IS_SPARSE, HAS_KPM)
_AOT_VARIANTS = [
    ("dense", False, False, False, False),
    ("causal", False, True, False, False),
    ("window", True, True, False, False),
    ("sparse-window-kpm", True, True, True, True),
]
_AOT_SPARSE_BLOCK = 128
_AOT_HEAD_DIMS = (32, 64, 128, 256)
# `--quick` compiles, per kernel and dtype, the variant with every feature on (all code paths)
_AOT_QUICK_HEAD_DIM, _AOT_QUICK_VARIANT = 128, "sparse-window-kpm"
# (label, torch dtype, dot precision); fp32 ships exact ("ieee", CUDA cores) and TF32
_AOT_DTYPES = [
    ("fp16", torch.float16, "tf32"),
    ("bf16", torch.bfloat16, "tf32"),
    ("fp32", torch.float32, "ieee"),
    ("tf32", torch.float32, "tf32"),
]


def _build_aot_specs() -> list[KernelSpec]:
    specs = []
    for label, dtype, prec in _AOT_DTYPES:
        tdt = _TRITON_DTYPE[dtype]
        # an fp32 "ieee" dot runs on CUDA cores (FMA), by design: no mma is expected there
        uses_tc = prec != "ieee"
        for d in _AOT_HEAD_DIMS:
            if label != "tf32":  # the preprocess has no dot: one per storage dtype
                const = dict(HEAD_DIM_V=d, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=_pad_dim(d))
                sig = _signature(attn_bwd_preprocess, tdt, const)
                specs.append(KernelSpec(f"attn_bwd_preprocess-{label}-D{d}", attn_bwd_preprocess, sig, const,
                                        attrs=_divisibility(sig),
                                        num_warps=4, num_stages=1, uses_dot=False, dtype=label,
                                        quick=d == _AOT_QUICK_HEAD_DIM))
            for variant, has_left, has_right, is_sparse, has_kpm in _AOT_VARIANTS:
                for kernel, fn in (("fwd", attn_fwd), ("dkdv", attn_bwd_dkdv), ("dq", attn_bwd_dq)):
                    cfg = block_config(kernel, d, d, dtype, _AOT_SPARSE_BLOCK if is_sparse else 0)
                    const = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                 BLOCK_D=_pad_dim(d), BLOCK_DV=_pad_dim(d),
                                 HAS_LEFT=has_left, HAS_RIGHT=has_right, IS_SPARSE=is_sparse,
                                 SPARSE_BLOCK=_AOT_SPARSE_BLOCK if is_sparse else 0,
                                 HAS_KPM=has_kpm, DOT_PREC=prec)
                    name = f"{fn.__name__}-{label}-D{d}-{variant}-M{cfg.block_m}-N{cfg.block_n}"
                    sig = _signature(fn, tdt, const)
                    specs.append(KernelSpec(name, fn, sig, const, attrs=_divisibility(sig),
                                            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
                                            uses_dot=uses_tc, dtype=label,
                                            quick=d == _AOT_QUICK_HEAD_DIM and variant == _AOT_QUICK_VARIANT))
    return specs


AOT_SPECS: list[KernelSpec] = _build_aot_specs()

"""Triton softmax attention (FlashAttention-2 structure): dense, causal, sliding window,
block-sparse tables and key padding, forward and backward. The `@triton.jit` code only:
configs and launches are in `triton_launch.py`, the compile gate's specs in `triton_specs.py`.

Visibility (the contract of `attnkernels.conventions`):
    query i sees key j iff i + Nk - Nq - window_left <= j <= i + Nk - Nq + window_right
    (-1 = unbounded side)
and, when tables are given, block (i // sparse_block_size, j // sparse_block_size) is listed,
and, with a key padding mask, `not key_padding_mask[b, j]`.

Kernels
- `attn_fwd`: one program per (query block, batch*query head). Online softmax in base 2
  (scale * log2(e) folded into the scores); stores out and the natural-log LSE.
- `attn_bwd_preprocess`: delta = rowsum(dout * out), float32.
- `attn_bwd_dkdv`: one program per (key block, batch*kv head). It visits the query blocks
  of every query head of its GQA group, accumulating dK and dV in registers, then writes
  them once. Without tables each loop runs over (head, query block) pairs, so no runtime
  loop over the group wraps the pipelined loops (that cost ~25 registers per thread and
  made the large sm_90a tiles spill); with tables (per-head rows) it walks head by head.
  Where two accumulators would spill (D = 256 on sm_90a), it runs as two launches, dV
  (WITH_DV) then dK (WITH_DK), each writing its own gradient.
- `attn_bwd_dq`: one program per (query block, batch*query head), over the key blocks it
  visits, writes dQ once.
- `attn_decode` + `attn_decode_combine` (flash-decoding, `triton_launch.decode_forward`): a
  few query rows q (B, Hq, Nq, D) against a long KV cache, contiguous (B, Hk, Nc, D) or paged
  (num_pages, Hk, page_size, D) through block_table (B, max_pages), each batch row b filled
  to cache_seqlens[b] = L_b (the window rule above with Nk = L_b). Decode is memory-bound
  (every K/V byte is used by only (Hq/Hk)·Nq rows), so the kernel is built to read each byte
  once: one program per (batch*kv head, split, row block) holds ALL the GQA group's
  (head, query) rows r = g·Nq + i together ([BLOCK_M, D], padded to 64 for 16-bit inputs so
  each warp owns a 16-row mma slice and sm_90a gets wgmma; the padding is never loaded or
  stored), and walks its split of the keys the group sees in [BLOCK_N] tiles; a paged tile
  looks up each key's page (so BLOCK_N is not bounded by the page size). With few
  programs (B·Hk small against the SMs) the key range is cut into num_splits equal runs of
  tiles per batch row (`decode_num_splits`, from the shapes); each program writes its
  partial (m in log2 units, l, unnormalised acc) to float32 workspaces (B, Hq, Nq, S[, Dv])
  and `attn_decode_combine` (one program per (b, h, i) row) merges them by their maxima in
  split order, so the result is deterministic. One split: attn_decode writes out, lse itself.
  An empty split writes m = -inf, l = 0; a row with no key anywhere ends with out 0, lse -inf.

Which tiles a program visits (`_walk`, one helper for the three kernels): the tiles that
intersect its window band (`_kv_bounds` / `_q_bounds`, from indices, no table), or, with
tables, the listed blocks cut to that band. The band walk runs three segments: a masked
left edge, the unmasked interior, a masked right edge. The table walk decides per listed
block, by a scalar test against the band's fully visible interval, whether it needs the
element mask. Fully visible tiles skip the window/causal and sequence-end masks (the
geometry decides; BlockMask's full_* tables are not read). Key padding, when given, is
applied on every tile.

The backward is deterministic: no atomics; every output element is written by exactly
one program, and the sum over a GQA group's query heads happens in a fixed order inside
that program.

Rows with no visible key: the forward keeps l = 0 and writes out = 0, lse = -inf. The
backward reads lse = -inf as +inf so that every probability of that row is exp(-inf) = 0:
its dq is 0 and it adds nothing to dk/dv (never NaN).

Score modifiers (modifiers.py, dropout.py), each a constexpr flag, so a call without them
compiles to the plain code (same PTX instructions and registers, compile gate):
- HAS_SOFTCAP: s = c·tanh(scale·q·k / c) (`_tanh`: Triton 3.8 has no tl.tanh that also runs
  in the interpreter); the backward recomputes tanh and multiplies dS by 1 - tanh².
- HAS_ALIBI: s -= slope[b, h]·|i + Nk - Nq - j|, the slope read once per program (per head
  in the dK/dV loop over the GQA group).
- HAS_BIAS: + bias[b, h, i, j] loaded per tile through its four strides (0 on broadcast
  dims, never expanded). A -inf bias hides a key; a row it hides entirely is an empty row
  (the running-max guard keeps it finite). STORE_DBIAS (dQ kernel): dS = P∘(dP - delta),
  before the softcap's factor, is dbias; the dQ program of a query block walks every key
  block its rows see, so it writes each element once (no atomics; unvisited tiles stay 0).
- HAS_DROPOUT: the keep mask of dropout.py regenerated from (seed, b*Hq + h, i, j) with
  tl.philox in all three kernels (`_dropout_keep_bytes`: one Philox per 16 keys, a byte each); the
  softmax denominator and LSE are undropped, P·V / dV use P∘keep and dP is scaled by
  keep / (1 - t/256) (dropout_rscale; t the byte threshold).
Sinks are applied by the ops around the kernels and never read here.
"""
from __future__ import annotations

import triton
import triton.language as tl

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
    Mirrored exactly by `kv_block_range` in tests/triton_block_ranges.py. All divisions are
    of non-negative ints (Triton's // truncates toward zero)."""
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


@triton.jit
def _table_row(NUM, IDX, i_b, i_h, i0, stride_nb, stride_nh, stride_ib, stride_ih, stride_im,
               IS_SPARSE: tl.constexpr, SPARSE_BLOCK: tl.constexpr):
    """Pointers to the table row (count, indices) of the sparse block holding index i0, for
    batch i_b and query head i_h (broadcast dims have stride 0); NUM, IDX unchanged without
    a table."""
    if IS_SPARSE:
        i_row = i0 // SPARSE_BLOCK
        p_num = NUM + i_b.to(tl.int64) * stride_nb + i_h.to(tl.int64) * stride_nh + i_row
        p_idx = IDX + i_b.to(tl.int64) * stride_ib + i_h.to(tl.int64) * stride_ih + i_row.to(tl.int64) * stride_im
    else:
        p_num = NUM
        p_idx = IDX
    return p_num, p_idx


@triton.jit
def _walk(state, ctx, TILES: tl.constexpr, i_lo, i_full_lo, i_full_hi, i_hi, P_NUM, P_IDX,
          IS_SPARSE: tl.constexpr, TILES_PER_SPARSE: tl.constexpr, TABLE_SKIP: tl.constexpr,
          C: tl.constexpr):
    """Run the inner loop `TILES(state, ctx, lo, hi, MASKED, C) -> state` over every tile
    this program visits, and return the state. [i_lo, i_hi) are the tiles of the window band,
    [i_full_lo, i_full_hi) those fully visible to the program's whole block (`_kv_bounds`,
    `_q_bounds`); ctx (a tuple) and C (a constexpr tuple) are the inner loop's own.

    Band: the masked left edge, the unmasked interior, the masked right edge.
    Table (IS_SPARSE): P_NUM/P_IDX point at this program's row of the num/indices table;
    each listed block (TILES_PER_SPARSE tiles) is cut to the band and run as one segment,
    unmasked when the cut lies inside the fully visible interval (a scalar test), masked
    otherwise. The two loop bodies cost registers: configs where that would spill set
    TABLE_SKIP = False and mask every table block (`BlockConfig.table_skip`)."""
    if IS_SPARSE:
        n_listed = tl.load(P_NUM)
        for i_t in range(0, n_listed):
            i_sb = tl.load(P_IDX + i_t)
            lo = tl.maximum(i_lo, i_sb * TILES_PER_SPARSE)
            hi = tl.minimum(i_hi, (i_sb + 1) * TILES_PER_SPARSE)
            if TABLE_SKIP:
                if (lo >= i_full_lo) & (hi <= i_full_hi):
                    state = TILES(state, ctx, lo, hi, False, C)
                else:
                    state = TILES(state, ctx, lo, hi, True, C)
            else:
                state = TILES(state, ctx, lo, hi, True, C)
    else:
        state = TILES(state, ctx, i_lo, i_full_lo, True, C)
        state = TILES(state, ctx, i_full_lo, i_full_hi, False, C)
        state = TILES(state, ctx, i_full_hi, i_hi, True, C)
    return state



# ----------------------------------------------------------------------------------------
# Score modifiers (modifiers.py, dropout.py): constexpr flags, so a call without them
# compiles to the plain kernel's code
# ----------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh(x) = 1 - 2 / (2^(2·log2(e)·x) + 1). Triton 3.8 has no tl.tanh, and libdevice's
    tanh does not run in the interpreter: this one runs in both. exp2 -> inf or 0 for large
    |x| gives exactly ±1 (no NaN); absolute error ~1e-7 (cancellation near 0), relative to
    the cap well under the logits' own fp32 rounding."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _modified_scores(b_qk, o_q, o_k, off, Nq, Nk, qk_scale, cap_in, cap_out, slope, P_BIAS, stride_bm, stride_bn,
                     HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(logits in log2 units, tanh) from the raw dot b_qk (float32) of query indices o_q and key
    indices o_k, shaped to broadcast ([M, 1] and [1, N], or [1, M] and [N, 1] in dK/dV).

    modifiers.py's order: softcap on the scaled logits (cap_in = scale / softcap, cap_out =
    softcap · log2 e), ALiBi (slope in log2 units, per program), then the bias tile, loaded
    from P_BIAS (this batch and head) through its row/column strides (0 where it broadcasts)
    and masked to the (Nq, Nk) range (int32 offsets: the launcher checks they fit). A -inf bias gives a -inf logit, i.e. a hidden key, with
    no mask of its own. Without softcap the second value is the logits themselves (unused)."""
    if HAS_SOFTCAP:
        b_t = _tanh(b_qk * cap_in)
        b_s = b_t * cap_out
    else:
        b_s = b_qk * qk_scale
        b_t = b_s
    if HAS_ALIBI:
        b_s = b_s - slope * tl.abs(o_q + off - o_k).to(tl.float32)
    if HAS_BIAS:
        # int32 offsets within this (batch, head)'s slice (the launcher checks that they fit):
        # one register per element instead of a 64-bit address
        p_bias = P_BIAS + (o_q * stride_bm + o_k * stride_bn)
        b_bias = tl.load(p_bias, mask=(o_q < Nq) & (o_k < Nk), other=0.0).to(tl.float32)
        b_s = b_s + b_bias * 1.4426950408889634
    return b_s, b_t


@triton.jit
def _dropout_keep_bytes(seed, o_q, n0, bh, threshold, BLOCK_N: tl.constexpr):
    """dropout.py's keep mask of rows o_q ([M, 1]) and keys n0 .. n0 + BLOCK_N (n0 % 16 == 0,
    BLOCK_N >= 16: every config's key tile is, and n0 is a multiple of it), [M, BLOCK_N], for
    batch*head bh: Philox4x32-10 with key (seed lo, seed hi) (tl.philox splits the int64 seed
    so) and counter (j >> 4, i, bh, 0); key j is byte j & 3 of word (j >> 2) & 3; keep iff
    byte >= threshold (the 8-bit t = round(p · 256)).

    One Philox per 16 keys (a quarter of the calls of one word per key): its words r0..r3
    are keys 16c + 4w .. 16c + 4w + 3, put in order by join (join(join(r0, r2), join(r1, r3))
    [..., a, b] is word 2a + b) and a reshape to [M, BLOCK_N // 4]; then each word's four
    bytes by a broadcast shift [M, BLOCK_N // 4, 4] (index [w, k] = byte k of word w, key
    4w + k) and a reshape. dK/dV transposes the tile it gets."""
    o_c = (n0 >> 4) + tl.arange(0, BLOCK_N // 16)  # [BLOCK_N // 16] Philox counters c0
    z = o_q * 0 + o_c[None, :] * 0  # [M, BLOCK_N // 16]
    r0, r1, r2, r3 = tl.philox(seed, o_c[None, :] + z, o_q + z, z + bh, z)
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [o_q.shape[0], BLOCK_N // 4])
    shifts = (8 * tl.arange(0, 4)).to(tl.uint32)  # [4]: byte k of a word is bits 8k .. 8k + 7
    byte = (words[:, :, None] >> shifts[None, None, :]) & 0xFF  # [M, BLOCK_N // 4, 4]
    return tl.reshape(byte, [o_q.shape[0], BLOCK_N]) >= threshold


@triton.jit
def _modifier_args(SLOPES, SEED, i_bh, dropout_threshold, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """(ALiBi slope of batch*head i_bh in log2 units, dropout seed (int64), keep threshold as
    uint32: the byte t, 1 .. 255); zeros for the modifiers that are off. The seed is read on the device (no host sync)."""
    if HAS_ALIBI:
        slope = tl.load(SLOPES + i_bh) * 1.4426950408889634  # (B, Hq) contiguous
    else:
        slope = 0.0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        # round(p · 256), compared with one Philox byte per score
        threshold = dropout_threshold.to(tl.uint32, bitcast=True)
    else:
        seed = 0
        threshold = 0
    return slope, seed, threshold


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(state, ctx, i_lo, i_hi, MASKED: tl.constexpr, C: tl.constexpr):
    """Online softmax over key tiles [i_lo, i_hi). state = (acc, m, l); K, V, KPM point at this
    (batch, head)'s first key. MASKED applies the window and key-range mask; unmasked tiles
    are fully visible and inside Nk."""
    b_acc, b_m, b_l = state
    (b_q, K, V, KPM, stride_kn, stride_vn, o_m, Nq, Nk, window_left, window_right, qk_scale,
     cap_in, cap_out, slope, BIAS, stride_bm, stride_bn, seed, bh, threshold) = ctx
    HEAD_DIM: tl.constexpr = C[0]
    HEAD_DIM_V: tl.constexpr = C[1]
    BLOCK_N: tl.constexpr = C[2]
    BLOCK_D: tl.constexpr = C[3]
    BLOCK_DV: tl.constexpr = C[4]
    HAS_LEFT: tl.constexpr = C[5]
    HAS_RIGHT: tl.constexpr = C[6]
    HAS_KPM: tl.constexpr = C[7]
    DOT_PREC: tl.constexpr = C[8]
    HAS_SOFTCAP: tl.constexpr = C[9]
    HAS_ALIBI: tl.constexpr = C[10]
    HAS_BIAS: tl.constexpr = C[11]
    HAS_DROPOUT: tl.constexpr = C[12]
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
        if HAS_SOFTCAP or HAS_ALIBI or HAS_BIAS:
            b_s, _ = _modified_scores(tl.dot(b_q, b_kT, input_precision=DOT_PREC).to(tl.float32),
                                      o_m[:, None], o_n[None, :], off, Nq, Nk, qk_scale, cap_in, cap_out, slope,
                                      BIAS, stride_bm, stride_bn, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS)
        else:
            b_s = tl.dot(b_q, b_kT, input_precision=DOT_PREC).to(tl.float32) * qk_scale
        if MASKED:
            m_vis = _window_mask(o_m[:, None], o_n[None, :], off, window_left, window_right,
                                 HAS_LEFT, HAS_RIGHT) & m_n[None, :]
            b_s = tl.where(m_vis, b_s, float("-inf"))
        if HAS_KPM:
            b_pad = tl.load(KPM + o_n, mask=m_n, other=1)  # [BLOCK_N], nonzero = ignore
            b_s = tl.where(b_pad[None, :] == 0, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # [BLOCK_M]
        # a row that has seen no key yet keeps m = -inf (also a row whose bias is -inf so far);
        # use 0 as its shift so exp2 gives 0, not NaN
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.math.exp2(b_s - b_m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        b_alpha = tl.math.exp2(b_m - b_m_safe)  # [BLOCK_M]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)  # the denominator: before dropout
        b_acc = b_acc * b_alpha[:, None]
        if HAS_DROPOUT:  # dropped probabilities leave P·V only (1 / (1 - p) is applied once, at the end)
            b_p = tl.where(_dropout_keep_bytes(seed, o_m[:, None], n0, bh, threshold, BLOCK_N), b_p, 0.0)
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_DV]
        b_m = b_m_new
    return b_acc, b_m, b_l


@triton.jit
def attn_fwd(Q, K, V, O, LSE, KV_NUM, KV_IDX, KPM, SLOPES, BIAS, SEED,
             stride_qb, stride_qh, stride_qn,
             stride_kb, stride_kh, stride_kn,
             stride_vb, stride_vh, stride_vn,
             stride_ob, stride_oh, stride_on,
             stride_tnb, stride_tnh, stride_tib, stride_tih, stride_tim,
             stride_kpmb,
             stride_biasb, stride_biash, stride_biasm, stride_biasn,
             Hq, Nq, Nk, group, window_left, window_right, qk_scale,
             cap_in, cap_out, dropout_threshold, dropout_rscale,
             HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
             IS_SPARSE: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
             HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr, TABLE_SKIP: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
             HAS_DROPOUT: tl.constexpr):
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
    slope, seed, threshold = _modifier_args(SLOPES, SEED, i_bh, dropout_threshold, HAS_ALIBI, HAS_DROPOUT)
    if HAS_BIAS:
        BIAS = BIAS + i_b.to(tl.int64) * stride_biasb + i_h.to(tl.int64) * stride_biash

    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)

    i_lo, i_full_lo, i_full_hi, i_hi = _kv_bounds(m0, Nq, Nk, window_left, window_right,
                                                  BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    p_num, p_idx = _table_row(KV_NUM, KV_IDX, i_b, i_h, m0, stride_tnb, stride_tnh, stride_tib, stride_tih,
                              stride_tim, IS_SPARSE, SPARSE_BLOCK)
    b_acc, b_m, b_l = _walk(
        (b_acc, b_m, b_l),
        (b_q, K, V, KPM, stride_kn, stride_vn, o_m, Nq, Nk, window_left, window_right, qk_scale,
         cap_in, cap_out, slope, BIAS, stride_biasm, stride_biasn, seed, i_bh, threshold),
        _fwd_tiles, i_lo, i_full_lo, i_full_hi, i_hi, p_num, p_idx, IS_SPARSE, SPARSE_BLOCK // BLOCK_N, TABLE_SKIP,
        (HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_LEFT, HAS_RIGHT, HAS_KPM, DOT_PREC,
         HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT))

    # rows that saw no key: l = 0 -> out 0, lse -inf
    m_seen = b_l > 0.0
    if HAS_DROPOUT:  # out = sum_j P_j keep_j / (1 - p) v_j
        b_o = b_acc * (dropout_rscale / tl.where(m_seen, b_l, 1.0))[:, None]
    else:
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
def _dkdv_tiles(state, ctx, i_lo, i_hi, MASKED: tl.constexpr, C: tl.constexpr):
    """Accumulate dK, dV (state) of key rows o_n over query tiles [i_lo, i_hi) of each of G
    query heads, in one loop over (head, tile), head-major: no runtime loop over the GQA
    group wraps the pipelined loop. Q, DO point at the first head's first row (heads
    stride_qh, stride_doh apart), LSE, DELTA at its row 0 (heads Nq apart). Query rows >= Nq
    read lse = +inf (p = 0); key rows >= Nk are never stored, so they need no mask here."""
    b_dk, b_dv = state
    (b_k, b_v, Q, DO, LSE, DELTA, G, stride_qh, stride_doh, stride_qn, stride_don, o_n, Nq, Nk,
     window_left, window_right, qk_scale,
     cap_in, cap_out, SLOPES, BIAS, stride_bh, stride_bm, stride_bn, seed, bh, threshold, dropout_rscale, n0) = ctx
    HEAD_DIM: tl.constexpr = C[0]
    HEAD_DIM_V: tl.constexpr = C[1]
    BLOCK_M: tl.constexpr = C[2]
    BLOCK_N: tl.constexpr = C[12]
    BLOCK_D: tl.constexpr = C[3]
    BLOCK_DV: tl.constexpr = C[4]
    HAS_LEFT: tl.constexpr = C[5]
    HAS_RIGHT: tl.constexpr = C[6]
    DOT_PREC: tl.constexpr = C[7]
    HAS_SOFTCAP: tl.constexpr = C[8]
    HAS_ALIBI: tl.constexpr = C[9]
    HAS_BIAS: tl.constexpr = C[10]
    HAS_DROPOUT: tl.constexpr = C[11]
    WITH_DK: tl.constexpr = C[13]
    WITH_DV: tl.constexpr = C[14]
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_mb = tl.arange(0, BLOCK_M)
    off = Nk - Nq
    n_tiles = i_hi - i_lo  # per head
    n_div = tl.maximum(n_tiles, 1)
    for i_t in range(0, G * n_tiles):
        i_g = i_t // n_div
        m0 = (i_lo + i_t - i_g * n_div) * BLOCK_M
        o_m = m0 + o_mb
        m_m = o_m < Nq
        p_q = Q + i_g.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qn + o_mb[:, None] * stride_qn + o_d[None, :]
        p_do = DO + i_g.to(tl.int64) * stride_doh + m0.to(tl.int64) * stride_don + o_mb[:, None] * stride_don + o_dv[None, :]
        b_q = _load_2d(p_q, m_m, o_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM)  # [BLOCK_M, BLOCK_D]
        b_do = _load_2d(p_do, m_m, o_dv < HEAD_DIM_V, True, BLOCK_DV != HEAD_DIM_V)  # [BLOCK_M, BLOCK_DV]
        o_row = i_g.to(tl.int64) * Nq + o_m  # this head's rows of LSE, DELTA
        b_lse = tl.load(LSE + o_row, mask=m_m, other=float("inf")) * 1.4426950408889634  # [BLOCK_M], log2 units
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)  # row with no key: p = 0
        b_delta = tl.load(DELTA + o_row, mask=m_m, other=0.0)  # [BLOCK_M]
        # transposed probabilities: [BLOCK_N, BLOCK_M]
        if HAS_SOFTCAP or HAS_ALIBI or HAS_BIAS:
            # this head's slope and bias rows (the loop runs over the group's heads)
            if HAS_ALIBI:
                slope = tl.load(SLOPES + i_g) * 1.4426950408889634
            else:
                slope = 0.0
            b_sT, b_tT = _modified_scores(tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC).to(tl.float32),
                                          o_m[None, :], o_n[:, None], off, Nq, Nk, qk_scale, cap_in, cap_out, slope,
                                          BIAS + i_g.to(tl.int64) * stride_bh, stride_bm, stride_bn,
                                          HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS)
        else:
            b_sT = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC).to(tl.float32) * qk_scale
        b_pT = tl.math.exp2(b_sT - b_lse[None, :])
        if MASKED:
            m_vis = _window_mask(o_m[None, :], o_n[:, None], off, window_left, window_right, HAS_LEFT, HAS_RIGHT)
            b_pT = tl.where(m_vis, b_pT, 0.0)
        if HAS_DROPOUT:
            # dV = (P∘keep)ᵀ dO (times 1 / (1 - p) after the loop); dP = keep / (1 - p) ∘ dO Vᵀ
            # one Philox per 16 keys, made as [BLOCK_M, BLOCK_N] and transposed: [BLOCK_N, BLOCK_M]
            m_keepT = tl.trans(_dropout_keep_bytes(seed, o_m[:, None], n0, bh + i_g, threshold, BLOCK_N))
        if WITH_DV:
            if HAS_DROPOUT:
                b_dv = tl.dot(tl.where(m_keepT, b_pT, 0.0).to(b_do.dtype), b_do, b_dv, input_precision=DOT_PREC)
            else:
                b_dv = tl.dot(b_pT.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_DV]
        if WITH_DK:
            b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC).to(tl.float32)  # [BLOCK_N, BLOCK_M]
            if HAS_DROPOUT:
                b_dpT = tl.where(m_keepT, b_dpT * dropout_rscale, 0.0)
            b_dsT = b_pT * (b_dpT - b_delta[None, :])
            if HAS_SOFTCAP:  # through s = c·tanh(scale·qk / c): dS ·= 1 - tanh²
                b_dsT = b_dsT * (1.0 - b_tT * b_tT)
            b_dk = tl.dot(b_dsT.to(b_q.dtype), b_q, b_dk, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_D]
    return b_dk, b_dv


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, Q_NUM, Q_IDX, KPM, SLOPES, BIAS, SEED,
                  stride_qb, stride_qh, stride_qn,
                  stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn,
                  stride_dob, stride_doh, stride_don,
                  stride_dkb, stride_dkh, stride_dkn,
                  stride_dvb, stride_dvh, stride_dvn,
                  stride_tnb, stride_tnh, stride_tib, stride_tih, stride_tim,
                  stride_kpmb,
                  stride_biasb, stride_biash, stride_biasm, stride_biasn,
                  Hq, Hk, Nq, Nk, group, window_left, window_right, qk_scale, scale,
                  cap_in, cap_out, dropout_threshold, dropout_rscale,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  IS_SPARSE: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
                  HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr, TABLE_SKIP: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr, WITH_DK: tl.constexpr, WITH_DV: tl.constexpr):
    """dK (WITH_DK) and dV (WITH_DV) of key block program_id(0), (batch, kv head)
    program_id(1). Both in one program, or, where the two [BLOCK_N, D] float32 accumulators
    do not fit (D = 256 on wgmma-sized tiles), in two launches, one per gradient: the dV
    one skips dPᵀ, the dK one recomputes Sᵀ (1.25x the matmul work of one program)."""
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
    C: tl.constexpr = (HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, HAS_LEFT, HAS_RIGHT, DOT_PREC,
                       HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT, BLOCK_N, WITH_DK, WITH_DV)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        threshold = dropout_threshold.to(tl.uint32, bitcast=True)  # the byte t = round(p · 256)
    else:
        seed = 0
        threshold = 0
    if IS_SPARSE:
        # each head has its own table rows: one walk per head
        for i_g in range(0, group):
            i_h = i_hk * group + i_g
            i_bhq = i_b * Hq + i_h
            p_qh = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
            p_doh = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
            p_num, p_idx = _table_row(Q_NUM, Q_IDX, i_b, i_h, n0, stride_tnb, stride_tnh, stride_tib, stride_tih,
                                      stride_tim, IS_SPARSE, SPARSE_BLOCK)
            b_dk, b_dv = _walk(
                (b_dk, b_dv),
                (b_k, b_v, p_qh, p_doh, LSE + i_bhq.to(tl.int64) * Nq, DELTA + i_bhq.to(tl.int64) * Nq, 1,
                 stride_qh, stride_doh, stride_qn, stride_don, o_n, Nq, Nk, window_left, window_right, qk_scale,
                 cap_in, cap_out, SLOPES + i_bhq, BIAS + i_b.to(tl.int64) * stride_biasb + i_h.to(tl.int64) * stride_biash,
                 stride_biash, stride_biasm, stride_biasn, seed, i_bhq, threshold, dropout_rscale, n0),
                _dkdv_tiles, i_lo, i_full_lo, i_full_hi, i_hi, p_num, p_idx, IS_SPARSE, SPARSE_BLOCK // BLOCK_M, TABLE_SKIP, C)
    else:
        # the band is the same for every head: each segment's loop runs over (head, tile)
        i_h = i_hk * group
        i_bhq = i_b * Hq + i_h
        p_qh = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
        p_doh = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
        b_dk, b_dv = _walk(
            (b_dk, b_dv),
            (b_k, b_v, p_qh, p_doh, LSE + i_bhq.to(tl.int64) * Nq, DELTA + i_bhq.to(tl.int64) * Nq, group,
             stride_qh, stride_doh, stride_qn, stride_don, o_n, Nq, Nk, window_left, window_right, qk_scale,
             cap_in, cap_out, SLOPES + i_bhq, BIAS + i_b.to(tl.int64) * stride_biasb + i_h.to(tl.int64) * stride_biash,
             stride_biash, stride_biasm, stride_biasn, seed, i_bhq, threshold, dropout_rscale, n0),
            _dkdv_tiles, i_lo, i_full_lo, i_full_hi, i_hi, Q_NUM, Q_IDX, IS_SPARSE, SPARSE_BLOCK // BLOCK_M, TABLE_SKIP, C)

    b_dk = b_dk * scale  # dS was taken w.r.t. the unscaled scores
    if HAS_DROPOUT:
        b_dv = b_dv * dropout_rscale  # the kept probabilities' 1 / (1 - p), once
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
    if WITH_DK:
        tl.store(p_dk, b_dk.to(DK.dtype.element_ty), mask=m_n[:, None] & (o_d < HEAD_DIM)[None, :])
    if WITH_DV:
        tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=m_n[:, None] & (o_dv < HEAD_DIM_V)[None, :])


@triton.jit
def _dq_tiles(state, ctx, i_lo, i_hi, MASKED: tl.constexpr, C: tl.constexpr):
    """Accumulate dQ (state) of rows o_m over key tiles [i_lo, i_hi)."""
    b_dq, = state
    (b_q, b_do, b_lse, b_delta, K, V, KPM, stride_kn, stride_vn, o_m, Nq, Nk, window_left, window_right, qk_scale,
     cap_in, cap_out, slope, BIAS, DBIAS, stride_bm, stride_bn, seed, bh, threshold, dropout_rscale) = ctx
    HEAD_DIM: tl.constexpr = C[0]
    HEAD_DIM_V: tl.constexpr = C[1]
    BLOCK_N: tl.constexpr = C[2]
    BLOCK_D: tl.constexpr = C[3]
    BLOCK_DV: tl.constexpr = C[4]
    HAS_LEFT: tl.constexpr = C[5]
    HAS_RIGHT: tl.constexpr = C[6]
    HAS_KPM: tl.constexpr = C[7]
    DOT_PREC: tl.constexpr = C[8]
    HAS_SOFTCAP: tl.constexpr = C[9]
    HAS_ALIBI: tl.constexpr = C[10]
    HAS_BIAS: tl.constexpr = C[11]
    HAS_DROPOUT: tl.constexpr = C[12]
    STORE_DBIAS: tl.constexpr = C[13]
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
        if HAS_SOFTCAP or HAS_ALIBI or HAS_BIAS:
            b_s, b_t = _modified_scores(tl.dot(b_q, b_kT, input_precision=DOT_PREC).to(tl.float32),
                                        o_m[:, None], o_n[None, :], off, Nq, Nk, qk_scale, cap_in, cap_out, slope,
                                        BIAS, stride_bm, stride_bn, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS)
        else:
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
        if HAS_DROPOUT:  # dP = keep / (1 - p) ∘ dO Vᵀ
            b_dp = tl.where(_dropout_keep_bytes(seed, o_m[:, None], n0, bh, threshold, BLOCK_N), b_dp * dropout_rscale, 0.0)
        b_ds = b_p * (b_dp - b_delta[:, None])
        if STORE_DBIAS:
            # dbias = dS before the softcap's chain rule; this program is the only one that
            # produces these (row, key) elements (it walks every key block of its rows), and
            # the tiles it never visits stay the launcher's zeros
            p_dbias = DBIAS + o_m.to(tl.int64)[:, None] * Nk + o_n[None, :]
            tl.store(p_dbias, b_ds, mask=(o_m < Nq)[:, None] & m_n[None, :])
        if HAS_SOFTCAP:  # through s = c·tanh(scale·qk / c): dS ·= 1 - tanh²
            b_ds = b_ds * (1.0 - b_t * b_t)
        b_dq = tl.dot(b_ds.to(b_kT.dtype), tl.trans(b_kT), b_dq, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_D]
    return (b_dq,)


@triton.jit
def attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_NUM, KV_IDX, KPM, SLOPES, BIAS, SEED, DBIAS,
                stride_qb, stride_qh, stride_qn,
                stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_dob, stride_doh, stride_don,
                stride_dqb, stride_dqh, stride_dqn,
                stride_tnb, stride_tnh, stride_tib, stride_tih, stride_tim,
                stride_kpmb,
                stride_biasb, stride_biash, stride_biasm, stride_biasn,
                Hq, Nq, Nk, group, window_left, window_right, qk_scale, scale,
                cap_in, cap_out, dropout_threshold, dropout_rscale,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                IS_SPARSE: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
                HAS_KPM: tl.constexpr, DOT_PREC: tl.constexpr, TABLE_SKIP: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, STORE_DBIAS: tl.constexpr):
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
    slope, seed, threshold = _modifier_args(SLOPES, SEED, i_bh, dropout_threshold, HAS_ALIBI, HAS_DROPOUT)
    if HAS_BIAS:
        BIAS = BIAS + i_b.to(tl.int64) * stride_biasb + i_h.to(tl.int64) * stride_biash
    if STORE_DBIAS:  # dbias: (B, Hq, Nq, Nk) contiguous float32
        DBIAS = DBIAS + i_bh.to(tl.int64) * Nq * Nk
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    i_lo, i_full_lo, i_full_hi, i_hi = _kv_bounds(m0, Nq, Nk, window_left, window_right,
                                                  BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    p_num, p_idx = _table_row(KV_NUM, KV_IDX, i_b, i_h, m0, stride_tnb, stride_tnh, stride_tib, stride_tih,
                              stride_tim, IS_SPARSE, SPARSE_BLOCK)
    b_dq, = _walk(
        (b_dq,),
        (b_q, b_do, b_lse, b_delta, K, V, KPM, stride_kn, stride_vn, o_m, Nq, Nk, window_left, window_right, qk_scale,
         cap_in, cap_out, slope, BIAS, DBIAS, stride_biasm, stride_biasn, seed, i_bh, threshold, dropout_rscale),
        _dq_tiles, i_lo, i_full_lo, i_full_hi, i_hi, p_num, p_idx, IS_SPARSE, SPARSE_BLOCK // BLOCK_N, TABLE_SKIP,
        (HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_LEFT, HAS_RIGHT, HAS_KPM, DOT_PREC,
         HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_DROPOUT, STORE_DBIAS))

    b_dq = b_dq * scale
    p_dq = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh + m0.to(tl.int64) * stride_dqn
    p_dq = p_dq + (o_m - m0)[:, None] * stride_dqn + o_d[None, :]
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=m_m[:, None] & (o_d < HEAD_DIM)[None, :])


# ----------------------------------------------------------------------------------------
# Decode (split-K over a KV cache) and the combine of its splits
# ----------------------------------------------------------------------------------------


@triton.jit
def attn_decode(Q, K, V, O, LSE, WS_M, WS_L, WS_ACC, SEQLENS, BLOCK_TABLE, SLOPES,
                stride_qb, stride_qh, stride_qn,
                stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_ob, stride_oh, stride_on,
                stride_btb,
                Hq, Hk, Nq, capacity, group, num_splits, window_left, window_right, qk_scale, cap_in, cap_out,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                IS_PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, IS_SPLIT: tl.constexpr,
                DOT_PREC: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """One program per (batch * kv head, split, block of the group's rows): the online softmax
    of the group's BLOCK_M (head, query) rows over this split's key tiles. IS_SPLIT: writes the
    partial (m, l, acc) for `attn_decode_combine`; else out and lse (one split)."""
    i_bk = tl.program_id(0)  # batch * kv head
    i_s = tl.program_id(1)  # split of the key range
    i_r = tl.program_id(2)  # block of the group's (head, query) rows
    i_b = i_bk // Hk
    i_hk = i_bk % Hk
    # rows r = g * Nq + i: query i of the group's head g (query head i_hk * group + g)
    o_r = i_r * BLOCK_M + tl.arange(0, BLOCK_M)
    m_r = o_r < group * Nq
    o_i = o_r % Nq  # [BLOCK_M] query index
    o_h = i_hk * group + o_r // Nq  # [BLOCK_M] query head (past Hq on padded rows: masked)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    o_nb = tl.arange(0, BLOCK_N)

    # each row's own (head, query) offset: the group's rows are not one strided block
    p_q = Q + i_b.to(tl.int64) * stride_qb + (o_h.to(tl.int64) * stride_qh + o_i.to(tl.int64) * stride_qn)[:, None] \
        + o_d[None, :]
    b_q = _load_2d(p_q, m_r, o_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM)  # [BLOCK_M, BLOCK_D]
    if HAS_ALIBI:  # (B, Hq) contiguous, in log2 units: [BLOCK_M, 1]
        slope = (tl.load(SLOPES + i_b * Hq + o_h, mask=m_r, other=0.0) * 1.4426950408889634)[:, None]
    else:
        slope = 0.0

    # the filled length, clamped to the cache's capacity (no read past it on a bad length)
    seqlen = tl.minimum(tl.load(SEQLENS + i_b), capacity)
    off = seqlen - Nq  # bottom-right alignment: query i's diagonal is key i + off
    # the keys some row of the group sees: [lo, hi) (row 0 bounds the left, row Nq-1 the right)
    if HAS_LEFT:
        lo = tl.maximum(off - window_left, 0)
    else:
        lo = 0
    if HAS_RIGHT:
        hi = tl.minimum(Nq - 1 + off + window_right + 1, seqlen)
    else:
        hi = seqlen
    t_lo = lo // BLOCK_N
    t_hi = tl.where(hi > lo, (hi + BLOCK_N - 1) // BLOCK_N, t_lo)
    # this split's tiles: the row's tile range cut into num_splits equal runs (some empty)
    per_split = (t_hi - t_lo + num_splits - 1) // num_splits
    s_lo = t_lo + i_s * per_split
    s_hi = tl.minimum(s_lo + per_split, t_hi)

    if IS_PAGED:  # K, V: (num_pages, Hk, PAGE_SIZE, D), key j of row b in page BLOCK_TABLE[b, j // PAGE_SIZE]
        K = K + i_hk.to(tl.int64) * stride_kh
        V = V + i_hk.to(tl.int64) * stride_vh
        BLOCK_TABLE = BLOCK_TABLE + i_b.to(tl.int64) * stride_btb
    else:  # K, V: (B, Hk, Nc, D)
        K = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
        V = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh

    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i_n in range(s_lo, s_hi):
        n0 = i_n * BLOCK_N
        o_n = n0 + o_nb
        m_n = o_n < seqlen
        if IS_PAGED:
            # each key's page (a tile may span several pages, or lie in one): [BLOCK_N]
            o_page = tl.load(BLOCK_TABLE + o_n // PAGE_SIZE, mask=m_n, other=0).to(tl.int64)
            o_slot = (o_n % PAGE_SIZE).to(tl.int64)
            p_k = K + (o_page * stride_kb + o_slot * stride_kn)
            p_v = V + (o_page * stride_vb + o_slot * stride_vn)
        else:
            p_k = K + n0.to(tl.int64) * stride_kn + o_nb * stride_kn
            p_v = V + n0.to(tl.int64) * stride_vn + o_nb * stride_vn
        # k^T: [BLOCK_D, BLOCK_N]; v: [BLOCK_N, BLOCK_DV]; keys past the length read as 0
        b_kT = _load_2d(p_k[None, :] + o_d[:, None], o_d < HEAD_DIM, m_n, BLOCK_D != HEAD_DIM, True)
        b_v = _load_2d(p_v[:, None] + o_dv[None, :], m_n, o_dv < HEAD_DIM_V, True, BLOCK_DV != HEAD_DIM_V)
        # scores in log2 units: [BLOCK_M, BLOCK_N]
        if HAS_SOFTCAP or HAS_ALIBI:
            b_s, _ = _modified_scores(tl.dot(b_q, b_kT, input_precision=DOT_PREC).to(tl.float32),
                                      o_i[:, None], o_n[None, :], off, Nq, seqlen, qk_scale, cap_in, cap_out, slope,
                                      SLOPES, 0, 0, HAS_SOFTCAP, HAS_ALIBI, False)
        else:
            b_s = tl.dot(b_q, b_kT, input_precision=DOT_PREC).to(tl.float32) * qk_scale
        m_vis = _window_mask(o_i[:, None], o_n[None, :], off, window_left, window_right,
                             HAS_LEFT, HAS_RIGHT) & m_n[None, :]
        b_s = tl.where(m_vis, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # [BLOCK_M]
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # no key yet: exp2 gives 0, not NaN
        b_p = tl.math.exp2(b_s - b_m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        b_alpha = tl.math.exp2(b_m - b_m_safe)  # [BLOCK_M]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_DV]
        b_m = b_m_new

    m_dv = o_dv < HEAD_DIM_V
    if IS_SPLIT:
        # the partial state of (row, split): workspaces (B, Hq, Nq, num_splits[, BLOCK_DV]) float32,
        # m in log2 units; an empty split writes m = -inf, l = 0, acc = 0
        o_ws = ((i_b * Hq + o_h).to(tl.int64) * Nq + o_i) * num_splits + i_s  # [BLOCK_M]
        tl.store(WS_M + o_ws, b_m, mask=m_r)
        tl.store(WS_L + o_ws, b_l, mask=m_r)
        tl.store(WS_ACC + o_ws[:, None] * BLOCK_DV + o_dv[None, :], b_acc, mask=m_r[:, None] & m_dv[None, :])
    else:
        # one split: the final rows; a row that saw no key has l = 0: out 0, lse -inf
        m_seen = b_l > 0.0
        b_o = b_acc / tl.where(m_seen, b_l, 1.0)[:, None]
        b_lse = tl.where(m_seen, (b_m + tl.math.log2(tl.where(m_seen, b_l, 1.0))) * 0.6931471805599453,
                         float("-inf"))
        p_o = O + i_b.to(tl.int64) * stride_ob + (o_h.to(tl.int64) * stride_oh + o_i.to(tl.int64) * stride_on)[:, None] \
            + o_dv[None, :]
        tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_r[:, None] & m_dv[None, :])
        tl.store(LSE + (i_b * Hq + o_h).to(tl.int64) * Nq + o_i, b_lse, mask=m_r)


@triton.jit
def attn_decode_combine(O, LSE, WS_M, WS_L, WS_ACC,
                        stride_ob, stride_oh, stride_on,
                        Hq, Nq, num_splits,
                        HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (batch, query head, query) row: merges its num_splits partial states
    (m in log2 units, l, acc) into out and the natural-log lse, in split order."""
    i_row = tl.program_id(0)  # (b * Hq + h) * Nq + i
    i_i = i_row % Nq
    i_bh = i_row // Nq
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    o_s = tl.arange(0, BLOCK_S)
    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < HEAD_DIM_V
    WS_M = WS_M + i_row.to(tl.int64) * num_splits
    WS_L = WS_L + i_row.to(tl.int64) * num_splits
    WS_ACC = WS_ACC + i_row.to(tl.int64) * num_splits * BLOCK_DV
    b_ms = tl.load(WS_M + o_s, mask=o_s < num_splits, other=float("-inf"))  # [BLOCK_S]
    b_mx = tl.max(b_ms, 0)
    b_mx_safe = tl.where(b_mx == float("-inf"), 0.0, b_mx)  # every split empty: all weights 0
    b_l = tl.zeros([], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for i_s in range(0, num_splits):  # a fixed order: the result does not depend on scheduling
        b_w = tl.math.exp2(tl.load(WS_M + i_s) - b_mx_safe)
        b_l += b_w * tl.load(WS_L + i_s)
        b_acc += b_w * tl.load(WS_ACC + i_s * BLOCK_DV + o_dv, mask=m_dv, other=0.0)  # [BLOCK_DV]
    seen = b_l > 0.0
    b_o = b_acc / tl.where(seen, b_l, 1.0)
    b_lse = tl.where(seen, (b_mx_safe + tl.math.log2(tl.where(seen, b_l, 1.0))) * 0.6931471805599453, float("-inf"))
    p_o = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh + i_i.to(tl.int64) * stride_on
    tl.store(p_o + o_dv, b_o.to(O.dtype.element_ty), mask=m_dv)
    tl.store(LSE + i_row, b_lse)

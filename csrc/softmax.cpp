// Softmax attention on the CPU, forward and backward, flash style.
//
// One file, one idea: tile the (Nq, Nk) score matrix, never store it, and
// visit only the tiles a query tile can see. The same tile iterators serve the
// forward (key tiles per query tile) and, transposed, the backward (query
// tiles per key tile):
//   * dense / causal / sliding window: the key band [lo, hi) of a query tile is
//     computed from indices (bottom-right aligned, FlashAttention's rule), so a
//     window of width w costs O(N·w) and causal skips the upper triangle;
//   * block-sparse: the listed blocks of the query block's table row (or, for
//     dK/dV, of the transposed q_* tables), intersected with that band;
//   * the element mask (window edge, causal diagonal, key padding) is applied
//     only on tiles it cuts.
//
// Shapes: q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), query head h
// reads kv head h / (Hq / Hk). Tile matmuls go through common/tile_gemm.h
// (at::native::cpublas::brgemm, oneDNN's micro-kernel, for float; a
// register-tiled vectorised loop for double, the test path); softmax/exp through
// the at::vec row helpers of common/row_math.h. Arguments arrive validated by the
// Python API; the op entry points check only the invariants that keep a direct
// torch.ops call in bounds (common/checks.h, check_table, prepare_masks).
// bf16/fp16 inputs are upcast once to float32 (O(N·D), never O(N²)), so the
// accumulation is float32 as in FlashAttention; float64 stays float64.
//
// Backward (FA2): P is recomputed from the saved LSE, delta = rowsum(dO ∘ O),
// dS = P ∘ (dP − delta); one pass per (batch, query head, chunk of key tiles)
// iterates the query tiles that see each key tile and does the five tile GEMMs
// (Sᵀ, dPᵀ, dV, dK, dQᵀ). dK/dV of the GQA group's query heads are summed in a
// fixed order, dQ partials of the chunks likewise: every output element has
// one owner, so the result is the same bits for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"
#include "common/row_math.h"
#include "common/tile_gemm.h"

namespace {

namespace common = ATTNKERNELS_NS::common;
using common::exp_fma_sum;
using common::exp_scaled_minus;
using common::exp_sub_sum;
using common::fill;
using common::max_keep_nan;
using common::row_max;
using common::scale_row;
using common::softmax_grad;
using common::tile_gemm;

// Query rows x keys per tile. 64 x 256 keeps S [64, 256] and the accumulators
// in L2, gives the GEMM micro-kernel enough work per call, and halves the
// per-tile online-softmax bookkeeping of 64 x 128 (measured: fp32 GEMMs run
// near this core's peak either way; the rest is softmax overhead).
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 256;
// Below this many flops per thread a parallel region costs more than it saves.
constexpr double kMinParallelFlops = 4e6;

inline int64_t grain_for(double flops_per_task) { return common::grain_for(flops_per_task, kMinParallelFlops); }

// ---------------------------------------------------------------------------
// Problem description shared by the three passes
// ---------------------------------------------------------------------------
struct Problem {
  int64_t B = 0, Hq = 0, Hk = 0, Nq = 0, Nk = 0, D = 0, Dv = 0, group = 1;
  int64_t left = -1, right = -1;  // window, -1 = unbounded side
  int64_t off = 0;                // Nk - Nq: the bottom-right diagonal shift
  int64_t nQt = 0, nKt = 0;       // ceil(Nq / BLOCK_M), ceil(Nk / BLOCK_N): packed operand tiles
  // Block-sparse tables (nullptr when absent), leading dims (tb_B, tb_H) broadcast.
  int64_t sbs = 0, tb_B = 1, tb_H = 1, nQb = 0, nKb = 0;
  const int32_t* kv_num = nullptr;  // [tb_B, tb_H, nQb]
  const int32_t* kv_idx = nullptr;  // [tb_B, tb_H, nQb, nKb]
  const int32_t* q_num = nullptr;   // [tb_B, tb_H, nKb]
  const int32_t* q_idx = nullptr;   // [tb_B, tb_H, nKb, nQb]
  // Key padding: kpm [B, Nk] (true = ignored) and its prefix count [B, Nk + 1].
  const bool* kpm = nullptr;
  const int32_t* kpm_prefix = nullptr;
};

Problem window_problem(int64_t q_len, int64_t kv_len, int64_t left, int64_t right) {
  Problem p;
  p.Nq = q_len;
  p.Nk = kv_len;
  p.left = left;
  p.right = right;
  p.off = kv_len - q_len;
  return p;
}

// Keys [lo, hi) seen by at least one query row of [i0, i1) under the window.
// Exact: when each row's interval is non-empty before clamping (left, right >= 0
// or unbounded), the union over consecutive rows is this contiguous range.
inline std::pair<int64_t, int64_t> key_band(const Problem& p, int64_t i0, int64_t i1) {
  int64_t lo = p.left < 0 ? 0 : std::max<int64_t>(0, i0 + p.off - p.left);
  int64_t hi = p.right < 0 ? p.Nk : std::min<int64_t>(p.Nk, i1 + p.off + p.right);
  return {lo, std::max(lo, hi)};
}

// Queries [lo, hi) that see at least one key of [j0, j1) (the transpose).
inline std::pair<int64_t, int64_t> query_band(const Problem& p, int64_t j0, int64_t j1) {
  int64_t lo = p.right < 0 ? 0 : std::max<int64_t>(0, j0 - p.off - p.right);
  int64_t hi = p.left < 0 ? p.Nq : std::min<int64_t>(p.Nq, j1 - p.off + p.left);
  return {lo, std::max(lo, hi)};
}

// True when the window cuts the tile rows [i0, i1) x keys [j0, j1), i.e. some
// element is outside the band and the tile needs the element mask.
inline bool window_cuts(const Problem& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  return (p.left >= 0 && j0 < i1 - 1 + p.off - p.left) || (p.right >= 0 && j1 - 1 > i0 + p.off + p.right);
}

inline bool padding_cuts(const Problem& p, int64_t b, int64_t j0, int64_t j1) {
  if (!p.kpm) return false;
  const int32_t* pre = p.kpm_prefix + b * (p.Nk + 1);
  return pre[j1] != pre[j0];
}

inline int64_t table_base(const Problem& p, int64_t b, int64_t h) {
  return (p.tb_B == 1 ? 0 : b) * p.tb_H + (p.tb_H == 1 ? 0 : h);
}

// Calls f(a', b') for the pieces of [a, b) split at multiples of `tile`.
template <typename F>
inline void split_segment(int64_t a, int64_t b, int64_t tile, F&& f) {
  while (a < b) {
    int64_t e = std::min(b, (a / tile + 1) * tile);
    f(a, e);
    a = e;
  }
}

// The key tiles [j0, j1) visited by query rows [i0, i1) of (batch b, query head h).
// With tables, [i0, i1) lies inside one query block (see make_tiles).
template <typename F>
void for_each_kv_tile(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t i1, F&& f) {
  auto [lo, hi] = key_band(p, i0, i1);
  if (lo >= hi) return;
  if (!p.kv_num) {
    split_segment(lo, hi, kBlockN, f);
    return;
  }
  const int64_t row = table_base(p, b, h) * p.nQb + i0 / p.sbs;
  const int32_t* idx = p.kv_idx + row * p.nKb;
  for (int64_t e = 0, n = p.kv_num[row]; e < n; ++e) {
    const int64_t start = int64_t(idx[e]) * p.sbs;
    const int64_t a = std::max(lo, start), z = std::min(hi, start + p.sbs);
    if (a < z) split_segment(a, z, kBlockN, f);
  }
}

// The query tiles [i0, i1) visited by key rows [j0, j1) for query head h.
template <typename F>
void for_each_q_tile(const Problem& p, int64_t b, int64_t h, int64_t j0, int64_t j1, F&& f) {
  auto [lo, hi] = query_band(p, j0, j1);
  if (lo >= hi) return;
  if (!p.q_num) {
    split_segment(lo, hi, kBlockM, f);
    return;
  }
  const int64_t row = table_base(p, b, h) * p.nKb + j0 / p.sbs;
  const int32_t* idx = p.q_idx + row * p.nQb;
  for (int64_t e = 0, n = p.q_num[row]; e < n; ++e) {
    const int64_t start = int64_t(idx[e]) * p.sbs;
    const int64_t a = std::max(lo, start), z = std::min(hi, start + p.sbs);
    if (a < z) split_segment(a, z, kBlockM, f);
  }
}

// Tiles [start, end) of a length-n axis: cut at multiples of `tile` (so a tile
// is one packed operand tile, or part of it) and at sparse block boundaries (so
// a tile never spans two table rows).
std::vector<std::pair<int64_t, int64_t>> make_tiles(int64_t n, int64_t tile, int64_t sbs) {
  std::vector<std::pair<int64_t, int64_t>> tiles;
  const int64_t block = sbs > 0 ? sbs : n;
  for (int64_t s = 0; s < n; s += block)
    split_segment(s, std::min(n, s + block), tile, [&](int64_t a, int64_t e) { tiles.emplace_back(a, e); });
  return tiles;
}

// ---------------------------------------------------------------------------
// Transposed operands, packed tile by tile
// ---------------------------------------------------------------------------
// Kᵀ, Vᵀ (forward, dQ) and Qᵀ, dOᵀ (dK/dV) are GEMM B operands. Stored as a
// plain [D, N] transpose, a tile's B rows would sit N floats apart: at N =
// 1024, 2048, ... that is a multiple of 4 KiB, every row maps to the same L1
// set and the micro-kernel thrashes. So they are packed per tile:
// [B, H, n_tiles, D, tile], each tile's B a dense [D, tile] block (ld = tile),
// zero-padded past N. A tile piece [a, e) never crosses a multiple of `tile`
// (split_segment), so it is the columns [a % tile, e % tile) of tile a / tile.
at::Tensor pack_transposed(const at::Tensor& x, int64_t tile) {  // [B, H, N, D] -> [B, H, nT, D, tile]
  const int64_t n = x.size(2), n_tiles = (n + tile - 1) / tile;
  at::Tensor padded = n_tiles * tile == n ? x : at::constant_pad_nd(x, {0, 0, 0, n_tiles * tile - n});
  return padded.view({x.size(0), x.size(1), n_tiles, tile, x.size(3)}).transpose(-1, -2).contiguous();
}

// Start of the piece at sequence position `a` in one head's packed [nT, D, tile] operand.
template <typename T>
inline const T* packed_piece(const T* head, int64_t a, int64_t depth, int64_t tile) {
  return head + (a / tile) * depth * tile + a % tile;
}

// ---------------------------------------------------------------------------
// Element masks, only on tiles that window_cuts / padding_cuts flag
// ---------------------------------------------------------------------------
// Row i (a query) of a tile over keys [j0, j1): mask keys outside the band or padded.
template <typename T>
void mask_query_row(const Problem& p, int64_t b, int64_t i, int64_t j0, int64_t j1, T* row, T value) {
  int64_t lo = p.left < 0 ? j0 : std::clamp<int64_t>(i + p.off - p.left, j0, j1);
  int64_t hi = p.right < 0 ? j1 : std::clamp<int64_t>(i + p.off + p.right + 1, j0, j1);
  hi = std::max(hi, lo);
  fill(row, lo - j0, value);
  fill(row + (hi - j0), j1 - hi, value);
  if (p.kpm) {
    const bool* pad = p.kpm + b * p.Nk;
    for (int64_t j = lo; j < hi; ++j)
      if (pad[j]) row[j - j0] = value;
  }
}

// Row j (a key) of a transposed tile over queries [i0, i1): mask queries that do not see j.
template <typename T>
void mask_key_row(const Problem& p, int64_t b, int64_t j, int64_t i0, int64_t i1, T* row, T value) {
  if (p.kpm && p.kpm[b * p.Nk + j]) {
    fill(row, i1 - i0, value);
    return;
  }
  int64_t lo = p.right < 0 ? i0 : std::clamp<int64_t>(j - p.off - p.right, i0, i1);
  int64_t hi = p.left < 0 ? i1 : std::clamp<int64_t>(j - p.off + p.left + 1, i0, i1);
  hi = std::max(hi, lo);
  fill(row, lo - i0, value);
  fill(row + (hi - i0), i1 - hi, value);
}

// ---------------------------------------------------------------------------
// Forward: per (b, h, query tile), online softmax over its key tiles
// ---------------------------------------------------------------------------
template <typename T>
void forward_kernel(const Problem& p, const T* q, const T* kT, const T* v, T scale, T* out, T* lse) {
  const auto qtiles = make_tiles(p.Nq, kBlockM, p.sbs);
  const int64_t nt = int64_t(qtiles.size());
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t grain = grain_for(2.0 * kBlockM * std::min<int64_t>(p.Nk, 4 * kBlockN) * (p.D + p.Dv));
  at::parallel_for(0, p.B * p.Hq * nt, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> s(kBlockM * kBlockN);  // [BLOCK_M, BLOCK_N] scores, then probabilities
    std::vector<T> acc(kBlockM * p.Dv);   // [BLOCK_M, Dv] unnormalised output
    std::vector<T> m(kBlockM), l(kBlockM);  // running row max and row sum
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nt, b = bh / p.Hq, h = bh % p.Hq, hk = h / p.group;
      const auto [i0, i1] = qtiles[task % nt];
      const int64_t M = i1 - i0;
      const T* q_t = q + (bh * p.Nq + i0) * p.D;          // [M, D]
      const T* kT_h = kT + (b * p.Hk + hk) * p.nKt * p.D * kBlockN;  // packed [nKt, D, BLOCK_N]
      const T* v_h = v + (b * p.Hk + hk) * p.Nk * p.Dv;   // [Nk, Dv]
      fill(acc.data(), M * p.Dv, T(0));
      fill(m.data(), M, neg_inf);
      fill(l.data(), M, T(0));
      for_each_kv_tile(p, b, h, i0, i1, [&](int64_t j0, int64_t j1) {
        const int64_t N = j1 - j0;
        const T* kT_t = packed_piece(kT_h, j0, p.D, kBlockN);                             // [D, N], ld BLOCK_N
        tile_gemm<T>(M, N, p.D, q_t, p.D, kT_t, kBlockN, s.data(), kBlockN, false);  // S = Q Kᵀ [M, N]
        const bool masked = window_cuts(p, i0, i1, j0, j1) || padding_cuts(p, b, j0, j1);
        for (int64_t r = 0; r < M; ++r) {
          T* sr = s.data() + r * kBlockN;
          // scale > 0 (the usual case): the max of the raw scores, read-only, and
          // the scale folded into the exp's FMA (-inf · scale stays -inf). Else
          // scale first, so that a masked -inf never meets a zero scale.
          const bool positive = scale > T(0);
          if (!positive) scale_row(sr, N, scale);
          if (masked) mask_query_row(p, b, i0 + r, j0, j1, sr, neg_inf);
          const T tile_max = positive ? row_max(sr, N) * scale : row_max(sr, N);
          const T m_new = max_keep_nan(m[r], tile_max);
          if (m_new == neg_inf) {  // this row has seen no key yet: P = 0
            fill(sr, N, T(0));
            continue;
          }
          const T alpha = std::exp(m[r] - m_new);  // 0 on the first visible tile
          l[r] = l[r] * alpha + (positive ? exp_fma_sum(sr, N, scale, m_new) : exp_sub_sum(sr, N, m_new));
          m[r] = m_new;
          if (alpha != T(1)) scale_row(acc.data() + r * p.Dv, p.Dv, alpha);
        }
        tile_gemm<T>(M, p.Dv, N, s.data(), kBlockN, v_h + j0 * p.Dv, p.Dv, acc.data(), p.Dv, true);  // O += P V
      });
      T* out_t = out + (bh * p.Nq + i0) * p.Dv;
      T* lse_t = lse + bh * p.Nq + i0;
      for (int64_t r = 0; r < M; ++r) {
        const bool seen = !(l[r] == T(0));  // NaN (a poisoned row) counts as seen
        std::copy(acc.data() + r * p.Dv, acc.data() + (r + 1) * p.Dv, out_t + r * p.Dv);
        if (seen)
          scale_row(out_t + r * p.Dv, p.Dv, T(1) / l[r]);
        else
          fill(out_t + r * p.Dv, p.Dv, T(0));
        lse_t[r] = seen ? m[r] + std::log(l[r]) : neg_inf;
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Backward: one pass, five tile GEMMs (as FA2), no races
// ---------------------------------------------------------------------------
// Task (b, h, c): query head h, chunk c of its key tiles. For each key tile
// [j0, j1) of the chunk it walks the query tiles that see it (the transposed
// band / q_* tables), in transposed orientation (rows = keys) so that every
// GEMM operand is either a plain row-major tile or a packed transposed one:
//   Sᵀ  = K Qᵀ            [N, M]      (packed Qᵀ)
//   dPᵀ = V dOᵀ           [N, M]      (packed dOᵀ)
//   Pᵀ  = exp(Sᵀ·scale − lse), dSᵀ = Pᵀ ∘ (dPᵀ − delta) · scale
//   dV += Pᵀ dO           [N, Dv]
//   dK += dSᵀ Q           [N, D]
//   dQᵀ += Kᵀ dSᵀ         [D, M]      (packed Kᵀ; dQ kept transposed, per task)
// Ownership, hence determinism for any thread count: dK/dV rows of a key tile
// belong to one task per query head (GQA heads are summed afterwards in head
// order); dQ of head h is split into n_chunks partials (a count fixed by the
// shapes, never by the thread count) summed afterwards in chunk order.
int64_t backward_chunks(const Problem& p, int64_t n_kv_tiles) {
  constexpr int64_t kTargetTasks = 16;  // enough to keep a few threads busy when B·Hq is small
  const int64_t bh = std::max<int64_t>(1, p.B * p.Hq);
  return std::clamp<int64_t>((kTargetTasks + bh - 1) / bh, 1, std::max<int64_t>(1, n_kv_tiles));
}

template <typename T>
void backward_kernel(const Problem& p, const T* q, const T* qT, const T* k, const T* kT, const T* v, const T* dout,
                     const T* doT, const T* lse_use, const T* delta, T scale, int64_t n_chunks,
                     T* dqT_part,  // [n_chunks, B, Hq, nQt, D, BLOCK_M]
                     T* dk_out,    // [B, Hq or Hk, Nk, D]: per query head when group > 1
                     T* dv_out) {  // [B, Hq or Hk, Nk, Dv]
  const auto ktiles = make_tiles(p.Nk, kBlockN, p.sbs);
  const int64_t nt = int64_t(ktiles.size());
  const int64_t per_chunk = (nt + n_chunks - 1) / n_chunks;
  const int64_t out_heads = p.group > 1 ? p.Hq : p.Hk;
  const int64_t dqT_head = p.nQt * p.D * kBlockM;  // elements of one head's packed dQᵀ
  const int64_t grain =
      grain_for(2.0 * per_chunk * kBlockN * std::min<int64_t>(p.Nq, 4 * kBlockM) * (3 * p.D + 2 * p.Dv));
  at::parallel_for(0, p.B * p.Hq * n_chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> st(kBlockN * kBlockM);   // [BLOCK_N, BLOCK_M] Sᵀ, then Pᵀ, then dSᵀ
    std::vector<T> dpt(kBlockN * kBlockM);  // [BLOCK_N, BLOCK_M] dPᵀ = V dOᵀ
    std::vector<T> dk_acc(kBlockN * p.D), dv_acc(kBlockN * p.Dv);  // [BLOCK_N, D], [BLOCK_N, Dv]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % n_chunks, bh = task / n_chunks, b = bh / p.Hq, h = bh % p.Hq, hk = h / p.group;
      const int64_t bhk = b * p.Hk + hk;
      const T* q_h = q + bh * p.Nq * p.D;           // [Nq, D]
      const T* qT_h = qT + bh * dqT_head;           // packed [nQt, D, BLOCK_M]
      const T* do_h = dout + bh * p.Nq * p.Dv;      // [Nq, Dv]
      const T* doT_h = doT + bh * p.nQt * p.Dv * kBlockM;  // packed [nQt, Dv, BLOCK_M]
      const T* kT_h = kT + bhk * p.nKt * p.D * kBlockN;    // packed [nKt, D, BLOCK_N]
      const T* lse_h = lse_use + bh * p.Nq;
      const T* delta_h = delta + bh * p.Nq;
      T* dqT = dqT_part + (c * p.B * p.Hq + bh) * dqT_head;
      fill(dqT, dqT_head, T(0));
      for (int64_t t = c * per_chunk; t < std::min(nt, (c + 1) * per_chunk); ++t) {
        const auto [j0, j1] = ktiles[t];
        const int64_t N = j1 - j0;
        const T* k_t = k + (bhk * p.Nk + j0) * p.D;   // [N, D]
        const T* v_t = v + (bhk * p.Nk + j0) * p.Dv;  // [N, Dv]
        const T* kT_t = packed_piece(kT_h, j0, p.D, kBlockN);  // [D, N], ld BLOCK_N
        const bool padded = padding_cuts(p, b, j0, j1);
        fill(dk_acc.data(), N * p.D, T(0));
        fill(dv_acc.data(), N * p.Dv, T(0));
        for_each_q_tile(p, b, h, j0, j1, [&](int64_t i0, int64_t i1) {
          const int64_t M = i1 - i0;
          tile_gemm<T>(N, M, p.D, k_t, p.D, packed_piece(qT_h, i0, p.D, kBlockM), kBlockM, st.data(), kBlockM,
                       false);  // Sᵀ = K Qᵀ
          tile_gemm<T>(N, M, p.Dv, v_t, p.Dv, packed_piece(doT_h, i0, p.Dv, kBlockM), kBlockM, dpt.data(), kBlockM,
                       false);  // dPᵀ = V dOᵀ
          const bool masked = padded || window_cuts(p, i0, i1, j0, j1);
          for (int64_t r = 0; r < N; ++r) {
            T* row = st.data() + r * kBlockM;
            exp_scaled_minus(row, M, scale, lse_h + i0, true);  // Pᵀ
            if (masked) mask_key_row(p, b, j0 + r, i0, i1, row, T(0));
          }
          tile_gemm<T>(N, p.Dv, M, st.data(), kBlockM, do_h + i0 * p.Dv, p.Dv, dv_acc.data(), p.Dv, true);  // dV += Pᵀ dO
          for (int64_t r = 0; r < N; ++r)
            softmax_grad(st.data() + r * kBlockM, dpt.data() + r * kBlockM, M, delta_h + i0, true, scale);  // dSᵀ
          tile_gemm<T>(N, p.D, M, st.data(), kBlockM, q_h + i0 * p.D, p.D, dk_acc.data(), p.D, true);  // dK += dSᵀ Q
          T* dqT_t = dqT + (i0 / kBlockM) * p.D * kBlockM + i0 % kBlockM;                        // [D, M], ld BLOCK_M
          tile_gemm<T>(p.D, M, N, kT_t, kBlockN, st.data(), kBlockM, dqT_t, kBlockM, true);  // dQᵀ += Kᵀ dSᵀ
        });
        const int64_t oh = b * out_heads + (p.group > 1 ? h : hk);
        std::copy(dk_acc.data(), dk_acc.data() + N * p.D, dk_out + (oh * p.Nk + j0) * p.D);
        std::copy(dv_acc.data(), dv_acc.data() + N * p.Dv, dv_out + (oh * p.Nk + j0) * p.Dv);
      }
    }
  });
}

// dq[b, h, i, :] = Σ_c dqT_part[c, b, h, i / BLOCK_M, :, i % BLOCK_M], chunks in order.
template <typename T>
void gather_dq(const Problem& p, const T* dqT_part, int64_t n_chunks, T* dq) {
  const int64_t head = p.nQt * p.D * kBlockM;
  at::parallel_for(0, p.B * p.Hq * p.nQt, grain_for(double(n_chunks) * p.D * kBlockM), [&](int64_t begin, int64_t end) {
    std::vector<T> sum(p.D * kBlockM);  // [D, BLOCK_M]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / p.nQt, t = task % p.nQt;
      const int64_t rows = std::min(kBlockM, p.Nq - t * kBlockM);
      const T* part = dqT_part + bh * head + t * p.D * kBlockM;
      std::copy(part, part + p.D * kBlockM, sum.data());
      for (int64_t c = 1; c < n_chunks; ++c) {
        const T* pc = part + c * p.B * p.Hq * head;
        for (int64_t e = 0; e < p.D * kBlockM; ++e) sum[e] += pc[e];
      }
      T* out = dq + (bh * p.Nq + t * kBlockM) * p.D;  // [rows, D]
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < p.D; ++d) out[r * p.D + d] = sum[d * kBlockM + r];
    }
  });
}

// dk[b, hk] = Σ_g part[b, hk·group + g], query heads of the group in order.
template <typename T>
void fold_group(const Problem& p, const T* part, int64_t width, T* out) {
  const int64_t n = p.Nk * width;
  at::parallel_for(0, p.B * p.Hk, grain_for(double(p.group) * n), [&](int64_t begin, int64_t end) {
    for (int64_t bhk = begin; bhk < end; ++bhk) {
      const int64_t b = bhk / p.Hk, hk = bhk % p.Hk;
      const T* first = part + (b * p.Hq + hk * p.group) * n;
      T* o = out + bhk * n;
      std::copy(first, first + n, o);
      for (int64_t g = 1; g < p.group; ++g)
        for (int64_t e = 0; e < n; ++e) o[e] += first[g * n + e];
    }
  });
}

// ---------------------------------------------------------------------------
// Op-boundary invariants (the Python API validates user arguments; these only keep a
// direct torch.ops call in bounds) and table plumbing
// ---------------------------------------------------------------------------
// Problem of a call: the shared shape invariants plus the window.
Problem make_problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t left,
                     int64_t right) {
  const common::QKVShape s = common::check_qkv(op, q, k, v);
  Problem p;
  p.B = s.B;
  p.Hq = s.Hq;
  p.Hk = s.Hk;
  p.Nq = s.Nq;
  p.Nk = s.Nk;
  p.D = s.D;
  p.Dv = s.Dv;
  p.group = s.group;
  p.left = left;
  p.right = right;
  p.off = p.Nk - p.Nq;
  p.nQt = (p.Nq + kBlockM - 1) / kBlockM;
  p.nKt = (p.Nk + kBlockN - 1) / kBlockN;
  return p;
}

// Checks a (num, indices) table pair and returns contiguous copies. The scan of the
// entries is the one check a kernel cannot do without: every listed block must be
// < the block count (else a tile would read past the sequence), and the blocks of a
// row ascending and distinct (transpose_tables writes one slot per (row, block)).
// It is O(table), negligible next to the attention itself.
std::pair<at::Tensor, at::Tensor> check_table(const char* op, const char* num_name, const char* idx_name,
                                              const at::Tensor& num, const at::Tensor& idx, const Problem& p,
                                              int64_t rows, int64_t cols) {
  TORCH_CHECK(num.device().is_cpu() && idx.device().is_cpu(), op, ": ", num_name, " and ", idx_name,
              " must be CPU tensors");
  TORCH_CHECK(num.scalar_type() == at::kInt, op, ": ", num_name, " must be int32, got ", num.scalar_type());
  TORCH_CHECK(idx.scalar_type() == at::kInt, op, ": ", idx_name, " must be int32, got ", idx.scalar_type());
  TORCH_CHECK(num.dim() == 3, op, ": ", num_name, " must be 3-D (B|1, H|1, n_blocks), got shape ", num.sizes());
  TORCH_CHECK(idx.dim() == 4, op, ": ", idx_name, " must be 4-D (B|1, H|1, n_blocks, n_blocks), got shape ",
              idx.sizes());
  TORCH_CHECK(num.size(0) == 1 || num.size(0) == p.B, op, ": ", num_name, " batch dim must be 1 or ", p.B,
              ", got ", num.size(0));
  TORCH_CHECK(num.size(1) == 1 || num.size(1) == p.Hq, op, ": ", num_name, " head dim must be 1 or Hq=", p.Hq,
              ", got ", num.size(1));
  TORCH_CHECK(num.size(2) == rows, op, ": ", num_name, " has ", num.size(2), " block rows, expected ", rows,
              " for block size ", p.sbs);
  TORCH_CHECK(idx.size(0) == num.size(0) && idx.size(1) == num.size(1) && idx.size(2) == rows &&
                  idx.size(3) == cols,
              op, ": ", idx_name, " must have shape (", num.size(0), ", ", num.size(1), ", ", rows, ", ", cols,
              ") to match ", num_name, ", got ", idx.sizes());
  at::Tensor n = num.contiguous(), x = idx.contiguous();
  const int32_t* np = n.data_ptr<int32_t>();
  const int32_t* xp = x.data_ptr<int32_t>();
  for (int64_t r = 0; r < n.numel(); ++r) {
    TORCH_CHECK(np[r] >= 0 && np[r] <= cols, op, ": ", num_name, " entries must be in [0, ", cols, "], got ", np[r]);
    for (int64_t e = 0; e < np[r]; ++e) {
      const int32_t c = xp[r * cols + e];
      TORCH_CHECK(c >= 0 && c < cols, op, ": ", idx_name, " lists block ", c, ", outside [0, ", cols, ")");
      TORCH_CHECK(e == 0 || c > xp[r * cols + e - 1], op, ": ", idx_name,
                  " must list distinct blocks in ascending order within each row");
    }
  }
  return {n, x};
}

// (kv_num, kv_idx) -> the transposed (q_num, q_idx), for a backward called without them.
std::pair<at::Tensor, at::Tensor> transpose_tables(const at::Tensor& num, const at::Tensor& idx, int64_t rows,
                                                   int64_t cols) {
  const int64_t lead = num.size(0) * num.size(1);
  at::Tensor tn = at::zeros({num.size(0), num.size(1), cols}, num.options());
  at::Tensor tx = at::zeros({num.size(0), num.size(1), cols, rows}, idx.options());
  const int32_t* np = num.data_ptr<int32_t>();
  const int32_t* xp = idx.data_ptr<int32_t>();
  int32_t* tnp = tn.data_ptr<int32_t>();
  int32_t* txp = tx.data_ptr<int32_t>();
  for (int64_t l = 0; l < lead; ++l)
    for (int64_t r = 0; r < rows; ++r)  // ascending rows -> ascending entries per column
      for (int64_t e = 0; e < np[l * rows + r]; ++e) {
        const int64_t c = xp[(l * rows + r) * cols + e];
        txp[(l * cols + c) * rows + tnp[l * cols + c]++] = int32_t(r);
      }
  return {tn, tx};
}

struct Prepared {
  at::Tensor kv_num, kv_idx, q_num, q_idx, kpm, kpm_prefix;
};

// Fills the table / padding fields of p; the returned tensors own the memory.
Prepared prepare_masks(const char* op, Problem& p, const std::optional<at::Tensor>& kv_num,
                       const std::optional<at::Tensor>& kv_idx, const std::optional<at::Tensor>& q_num,
                       const std::optional<at::Tensor>& q_idx, int64_t sparse_block_size,
                       const std::optional<at::Tensor>& key_padding_mask, bool backward) {
  Prepared prep;
  TORCH_CHECK(kv_num.has_value() == kv_idx.has_value(), op, ": pass both kv_num_blocks and kv_indices, or neither");
  if (kv_num.has_value()) {
    TORCH_CHECK(sparse_block_size > 0, op, ": sparse_block_size must be positive with block tables, got ",
                sparse_block_size);
    p.sbs = sparse_block_size;
    p.nQb = (p.Nq + p.sbs - 1) / p.sbs;
    p.nKb = (p.Nk + p.sbs - 1) / p.sbs;
    std::tie(prep.kv_num, prep.kv_idx) =
        check_table(op, "kv_num_blocks", "kv_indices", *kv_num, *kv_idx, p, p.nQb, p.nKb);
    p.tb_B = prep.kv_num.size(0);
    p.tb_H = prep.kv_num.size(1);
    p.kv_num = prep.kv_num.data_ptr<int32_t>();
    p.kv_idx = prep.kv_idx.data_ptr<int32_t>();
    if (backward) {
      TORCH_CHECK(q_num.has_value() == q_idx.has_value(), op, ": pass both q_num_blocks and q_indices, or neither");
      if (q_num.has_value()) {
        std::tie(prep.q_num, prep.q_idx) = check_table(op, "q_num_blocks", "q_indices", *q_num, *q_idx, p, p.nKb, p.nQb);
        TORCH_CHECK(prep.q_num.size(0) == p.tb_B && prep.q_num.size(1) == p.tb_H, op,
                    ": q_num_blocks leading dims ", prep.q_num.sizes(), " must match kv_num_blocks' ",
                    prep.kv_num.sizes());
      } else {
        std::tie(prep.q_num, prep.q_idx) = transpose_tables(prep.kv_num, prep.kv_idx, p.nQb, p.nKb);
      }
      p.q_num = prep.q_num.data_ptr<int32_t>();
      p.q_idx = prep.q_idx.data_ptr<int32_t>();
    }
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.device().is_cpu(), op, ": key_padding_mask must be a CPU tensor");
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": key_padding_mask must be bool (True = ignore), got ",
                m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == p.B && m.size(1) == p.Nk, op, ": key_padding_mask must be (B, Nk) = (",
                p.B, ", ", p.Nk, "), got ", m.sizes());
    prep.kpm = m.contiguous();
    prep.kpm_prefix = at::zeros({p.B, p.Nk + 1}, at::kInt);
    const bool* mp = prep.kpm.data_ptr<bool>();
    int32_t* pre = prep.kpm_prefix.data_ptr<int32_t>();
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t j = 0; j < p.Nk; ++j) pre[b * (p.Nk + 1) + j + 1] = pre[b * (p.Nk + 1) + j] + (mp[b * p.Nk + j] ? 1 : 0);
    p.kpm = mp;
    p.kpm_prefix = pre;
  }
  return prep;
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, int64_t window_left, int64_t window_right,
                                                 const std::optional<at::Tensor>& kv_num_blocks,
                                                 const std::optional<at::Tensor>& kv_indices,
                                                 int64_t sparse_block_size,
                                                 const std::optional<at::Tensor>& key_padding_mask) {
  const char* op = "attention_fwd";
  Problem p = make_problem(op, q, k, v, window_left, window_right);
  Prepared prep = prepare_masks(op, p, kv_num_blocks, kv_indices, std::nullopt, std::nullopt, sparse_block_size,
                                key_padding_mask, false);
  const auto ct = compute_type(q.scalar_type());
  at::Tensor qc = q.to(ct).contiguous();
  at::Tensor kT = pack_transposed(k.to(ct), kBlockN);  // [B, Hk, nKt, D, BLOCK_N]
  at::Tensor vc = v.to(ct).contiguous();
  at::Tensor out = at::empty({p.B, p.Hq, p.Nq, p.Dv}, qc.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Nq}, qc.options());
  if (p.Nq > 0 && p.Nk > 0 && p.B > 0 && p.Hq > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "attention_fwd", [&] {
      forward_kernel<scalar_t>(p, qc.data_ptr<scalar_t>(), kT.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                               scalar_t(scale), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
    });
  } else {
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& kv_num_blocks, const std::optional<at::Tensor>& kv_indices,
    const std::optional<at::Tensor>& q_num_blocks, const std::optional<at::Tensor>& q_indices,
    int64_t sparse_block_size, const std::optional<at::Tensor>& key_padding_mask) {
  const char* op = "attention_bwd";
  Problem p = make_problem(op, q, k, v, window_left, window_right);
  common::check_float_tensor(op, "dout", dout, 4);
  common::check_float_tensor(op, "out", out, 4);
  TORCH_CHECK(dout.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({p.B, p.Hq, p.Nq, p.Dv}), op,
              ": dout and out must be (B, Hq, Nq, Dv) = (", p.B, ", ", p.Hq, ", ", p.Nq, ", ", p.Dv, "), got ",
              dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.Hq && lse.size(2) == p.Nq, op,
              ": lse must be (B, Hq, Nq), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble, op,
              ": lse must be float32 or float64, got ", lse.scalar_type());
  Prepared prep = prepare_masks(op, p, kv_num_blocks, kv_indices, q_num_blocks, q_indices, sparse_block_size,
                                key_padding_mask, true);
  const auto ct = compute_type(q.scalar_type());
  at::Tensor qc = q.to(ct).contiguous(), kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  at::Tensor doc = dout.to(ct).contiguous();
  at::Tensor qT = pack_transposed(qc, kBlockM);    // [B, Hq, nQt, D, BLOCK_M]
  at::Tensor kT = pack_transposed(kc, kBlockN);    // [B, Hk, nKt, D, BLOCK_N]
  at::Tensor doT = pack_transposed(doc, kBlockM);  // [B, Hq, nQt, Dv, BLOCK_M]
  at::Tensor dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  if (p.Nq > 0 && p.Nk > 0 && p.B > 0 && p.Hq > 0) {
    // lse_use: +inf where a row sees nothing, so exp(s - lse_use) is 0 there, never NaN.
    // delta: rowsum(dO ∘ O) [B, Hq, Nq], in a fixed order per row.
    at::Tensor lse_use = lse.to(ct).contiguous().clone();
    at::Tensor outc = out.to(ct).contiguous();
    at::Tensor delta = at::empty({p.B, p.Hq, p.Nq}, qc.options());
    AT_DISPATCH_FLOATING_TYPES(ct, "attention_bwd", [&] {
      scalar_t* lu = lse_use.data_ptr<scalar_t>();
      scalar_t* dl = delta.data_ptr<scalar_t>();
      const scalar_t* o = outc.data_ptr<scalar_t>();
      const scalar_t* g = doc.data_ptr<scalar_t>();
      const int64_t rows = p.B * p.Hq * p.Nq, Dv = p.Dv;
      at::parallel_for(0, rows, grain_for(2.0 * Dv), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          if (lu[r] == -std::numeric_limits<scalar_t>::infinity()) lu[r] = std::numeric_limits<scalar_t>::infinity();
          scalar_t acc = 0;
          for (int64_t c = 0; c < Dv; ++c) acc += o[r * Dv + c] * g[r * Dv + c];
          dl[r] = acc;
        }
      });
      const int64_t n_chunks = backward_chunks(p, p.nKt);
      at::Tensor dqT_part = at::empty({n_chunks, p.B, p.Hq, p.nQt, p.D, kBlockM}, qc.options());
      at::Tensor dk_part = p.group > 1 ? at::empty({p.B, p.Hq, p.Nk, p.D}, qc.options()) : dk;
      at::Tensor dv_part = p.group > 1 ? at::empty({p.B, p.Hq, p.Nk, p.Dv}, qc.options()) : dv;
      backward_kernel<scalar_t>(p, qc.data_ptr<scalar_t>(), qT.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                kT.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), g, doT.data_ptr<scalar_t>(), lu, dl,
                                scalar_t(scale), n_chunks, dqT_part.data_ptr<scalar_t>(),
                                dk_part.data_ptr<scalar_t>(), dv_part.data_ptr<scalar_t>());
      gather_dq<scalar_t>(p, dqT_part.data_ptr<scalar_t>(), n_chunks, dq.data_ptr<scalar_t>());
      if (p.group > 1) {
        fold_group<scalar_t>(p, dk_part.data_ptr<scalar_t>(), p.D, dk.data_ptr<scalar_t>());
        fold_group<scalar_t>(p, dv_part.data_ptr<scalar_t>(), p.Dv, dv.data_ptr<scalar_t>());
      }
    });
  } else {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

// For each tile of `tiles`, the [first, end) range of the other side's tiles (of size
// `other_tile`) that `for_each_other(tile_lo, tile_hi, visit)` visits, int64 (n_tiles, 2);
// (0, 0) for a tile that sees nothing. Exposes the kernels' own loop bounds to tests.
template <typename ForEach>
at::Tensor visited_tile_ranges(const std::vector<std::pair<int64_t, int64_t>>& tiles, int64_t other_tile,
                               ForEach for_each_other) {
  at::Tensor r = at::zeros({int64_t(tiles.size()), 2}, at::kLong);
  auto a = r.accessor<int64_t, 2>();
  for (size_t t = 0; t < tiles.size(); ++t) {
    int64_t first = -1, last = -1;
    for_each_other(tiles[t].first, tiles[t].second, [&](int64_t start, int64_t) {
      if (first < 0) first = start / other_tile;
      last = start / other_tile;
    });
    a[t][0] = first < 0 ? 0 : first;
    a[t][1] = first < 0 ? 0 : last + 1;
  }
  return r;
}

// Per query tile (the forward / dQ grid), the key tiles visited under the window.
at::Tensor attention_kv_block_ranges(int64_t q_len, int64_t kv_len, int64_t window_left, int64_t window_right) {
  TORCH_CHECK(q_len >= 0 && kv_len >= 0, "attention_kv_block_ranges: lengths must be >= 0");
  const Problem p = window_problem(q_len, kv_len, window_left, window_right);
  return visited_tile_ranges(make_tiles(q_len, kBlockM, 0), kBlockN, [&](int64_t lo, int64_t hi, auto visit) {
    for_each_kv_tile(p, 0, 0, lo, hi, visit);
  });
}

// Per key tile (the dK/dV grid), the query tiles visited.
at::Tensor attention_q_block_ranges(int64_t q_len, int64_t kv_len, int64_t window_left, int64_t window_right) {
  TORCH_CHECK(q_len >= 0 && kv_len >= 0, "attention_q_block_ranges: lengths must be >= 0");
  const Problem p = window_problem(q_len, kv_len, window_left, window_right);
  return visited_tile_ranges(make_tiles(kv_len, kBlockN, 0), kBlockM, [&](int64_t lo, int64_t hi, auto visit) {
    for_each_q_tile(p, 0, 0, lo, hi, visit);
  });
}

std::vector<int64_t> attention_tile_sizes() { return {kBlockM, kBlockN}; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(ATTNKERNELS_NS, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, "
      "Tensor? kv_num_blocks, Tensor? kv_indices, int sparse_block_size, Tensor? key_padding_mask) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
      "int window_left, int window_right, Tensor? kv_num_blocks, Tensor? kv_indices, Tensor? q_num_blocks, "
      "Tensor? q_indices, int sparse_block_size, Tensor? key_padding_mask) -> (Tensor dq, Tensor dk, Tensor dv)");
  // No tensor inputs: registered as catch-all kernels (nothing to dispatch on).
  m.def("attention_kv_block_ranges(int q_len, int kv_len, int window_left, int window_right) -> Tensor",
        &attention_kv_block_ranges);
  m.def("attention_q_block_ranges(int q_len, int kv_len, int window_left, int window_right) -> Tensor",
        &attention_q_block_ranges);
  m.def("attention_tile_sizes() -> int[]", &attention_tile_sizes);
}

TORCH_LIBRARY_IMPL(ATTNKERNELS_NS, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

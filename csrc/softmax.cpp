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
// Precision. bf16/fp16 on a CPU with the matrix units (AMX; cpublas::could_pack) and
// even head dims: 16-bit GEMM operands (VNNI-packed where they are B operands), float32
// accumulation; the softmax state (running max, sum, output accumulator, LSE) is
// float32 and P (forward, dV) and dS (dK, dQ) are rounded to the input dtype for their
// products, as FlashAttention does. Elsewhere (no AMX, ATTNKERNELS_CPU_NO_AMX=1, odd
// D or Dv) bf16/fp16 are upcast once to float32 (O(N·D), never O(N²)) and run the
// float32 path. float64 stays float64. gemm_path(dtype) names the path a dtype takes.
//
// Backward (FA2): P is recomputed from the saved LSE, delta = rowsum(dO ∘ O),
// dS = P ∘ (dP − delta); one pass per (batch, query head, chunk of key tiles)
// iterates the query tiles that see each key tile and does the five tile GEMMs
// (Sᵀ, dPᵀ, dV, dK, dQᵀ). dK/dV of the GQA group's query heads are summed in a
// fixed order, dQ partials of the chunks likewise: every output element has
// one owner, so the result is the same bits for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif
#ifdef CPU_CAPABILITY_AVX512
#include <immintrin.h>
#endif

#include "common/checks.h"
#include "common/parallel.h"
#include "common/philox.h"
#include "common/row_math.h"
#include "common/thread_buffer.h"
#include "common/tile_gemm.h"

namespace {

namespace common = ATTNKERNELS_NS::common;
using common::exp_fma_sum;
using common::exp_scaled_minus;
using common::fill;
using common::max_keep_nan;
using common::row_max;
using common::scale_row;
using common::softmax_grad;
using common::thread_buffer;
using common::tile_gemm;
using common::trim_thread_buffer;

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
struct Problem : common::QKVShape {  // B, Hq, Hk, Nq, Nk, D, Dv, group
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
  if (x.scalar_type() == at::kFloat) return common::transposed_tiles_f32(x, tile);  // a word loop, not a strided copy
  const int64_t n = x.size(2), n_tiles = (n + tile - 1) / tile;
  at::Tensor padded = n_tiles * tile == n ? x : at::constant_pad_nd(x, {0, 0, 0, n_tiles * tile - n});
  return padded.view({x.size(0), x.size(1), n_tiles, tile, x.size(3)}).transpose(-1, -2).contiguous();
}

// ---------------------------------------------------------------------------
// The tile GEMM steps, by operand type. One kernel template serves every dtype;
// only these steps (and the operands' layout) change with the precision:
//   * T = float / double: operands in T, products in T (tile_gemm);
//   * T = BFloat16 / Half on the matrix units: 16-bit operands, float products
//     (vnni_gemm). The GEMM B operands are in the VNNI layout (pairs of K rows
//     interleaved): the packed transposed tiles are [nT, D / 2, tile, 2] (same
//     element count and head stride as [nT, D, tile]) and the row operands V, Q,
//     dO are [ceil(N / 2), width, 2]. P and dS, computed in float, are rounded to
//     T for their products, as FlashAttention does; the softmax state stays float.
// ---------------------------------------------------------------------------
template <typename T>
constexpr bool kMatrixUnits = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;

template <typename T>
using acc_type = at::opmath_type<T>;  // float for float / bf16 / fp16, double for double

// Padded leading dimension of the 16-bit copies of P / dS tiles: room for the
// one-column shift that aligns an odd sequence start to a VNNI pair.
constexpr int64_t kLowpLd = std::max(kBlockM, kBlockN) + 2;
// Query rows per forward task on the matrix units without a window (see forward_kernel).
constexpr int64_t kLowpBlockM = 128;
// Forward under a window or block tables: the key pieces of a query tile are grouped
// into chunks of up to kWideN keys (P columns, pair padding included), one online-softmax
// step per chunk: a (256, 256) window's 576-key band is one step instead of 3-4, and
// BigBird's seven 64-key blocks one instead of seven. The S / P rows are padded off a
// multiple of 4 KiB (rows 4 KiB apart would share an L1 set).
constexpr int64_t kWideN = 1024;
// Lazy rescaling (forward_kernel, matrix units): how far (in scaled-score units, nats) a row's
// max may exceed the running max before the row is rescaled; P <= e^8 ~ 3e3 then.
constexpr float kLazyRescale = 8.f;
// A first estimate of a row's max may be this far above the row's max: bf16 keeps float's
// exponent range, so P of the max >= e^-60 is far from its underflow at e^-87 (no precision
// lost); fp16's normal range ends at 2^-14 ~ e^-9.7, so there only e^-4 (P of the max keeps
// its 11 bits, the keys down to e^-5.7 below it stay normal).
template <typename T>
constexpr float kLazyBelow = std::is_same_v<T, at::Half> ? 4.f : 60.f;
constexpr int64_t kWideLd = kWideN + 16;      // S row, floats
constexpr int64_t kWideLowpLd = kWideN + 32;  // P row, 16-bit

// P columns of the sequence range [a, e) on the matrix units: from a rounded down to a
// VNNI pair to e rounded up (gemm_seq's layout); e - a elsewhere.
template <typename T>
inline int64_t p_cols(int64_t a, int64_t e) {
  if constexpr (kMatrixUnits<T>) {
    const int64_t a0 = a & ~int64_t(1);
    return (e - a0 + 1) & ~int64_t(1);
  } else {
    return e - a;
  }
}

// C[M, N] = A[M, K] · X[K, a : a + N], X one head's packed transposed operand.
template <typename T>
inline void gemm_packed(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* head, int64_t a,
                        int64_t tile, acc_type<T>* C, int64_t ldc) {
  const T* piece = head + (a / tile) * K * tile;
  if constexpr (kMatrixUnits<T>) {
    constexpr int64_t kCols = 64;  // C in column blocks of 64: one [M, 64] float block stays in L1
    for (int64_t c = 0; c < N; c += kCols)
      common::vnni_gemm(M, std::min(kCols, N - c), K, A, lda, piece + 2 * (a % tile + c), tile, C + c, ldc, false);
  } else
    tile_gemm<T>(M, N, K, A, lda, piece + a % tile, tile, C, ldc, false);
}

// C[M, n] += X[M, 0 : e - a] · Y[a : e, :], where the K axis [a, e) is a sequence range:
// X is a float tile (P or dS, ld ldx), Y one head's rows ([N, n], or VNNI pairs of rows).
// On the matrix units X is rounded into `buf` shifted so that the range starts on a
// pair: a0 = a rounded down to even; the padding column(s) are zero.
// rounded: `buf` already holds X rounded and shifted (as exp_row leaves it), so only the
// GEMM runs. ld_buf: the leading dimension of `buf`.
template <typename T>
inline void gemm_seq(int64_t M, int64_t n, int64_t a, int64_t e, const acc_type<T>* X, int64_t ldx, const T* Y,
                     T* buf, acc_type<T>* C, int64_t ldc, bool rounded = false, int64_t ld_buf = kLowpLd) {
  if constexpr (kMatrixUnits<T>) {
    const int64_t a0 = a & ~int64_t(1), sh = a - a0, K = (e - a0 + 1) & ~int64_t(1);
    for (int64_t r = 0; r < M && !rounded; ++r) {
      T* row = buf + r * ld_buf;
      if (sh) row[0] = T(0);
      common::convert_row(X + r * ldx, row + sh, e - a);
      if (e - a0 < K) row[K - 1] = T(0);
    }
    common::vnni_gemm(M, n, K, buf, ld_buf, Y + a0 * n, n, C, ldc, true);
  } else {
    (void)ld_buf;
    tile_gemm<T>(M, n, e - a, X, ldx, Y + a * n, n, C, ldc, true);
  }
}

// alpha[r] = exp(m[r] - m_new[r]) for the rows of a tile (rows with m_new = -inf are
// skipped by the caller). On the matrix units in one vector pass (exp_u20); the float32
// and float64 paths keep the scalar libm exp.
template <typename T>
inline void rescale_factors(const acc_type<T>* m, const acc_type<T>* m_new, acc_type<T>* alpha, int64_t M) {
  int64_t r = 0;
  if constexpr (kMatrixUnits<T>) {
    using Vec = at::vec::Vectorized<float>;
    for (; r + Vec::size() <= M; r += Vec::size())
      common::vexp(Vec::loadu(m + r) - Vec::loadu(m_new + r)).store(alpha + r);
  }
  for (; r < M; ++r) alpha[r] = std::exp(m[r] - m_new[r]);
}

// Max of a row of scores. On the matrix units the vector part skips NaN propagation
// (see common::row_max_fast; -inf, where a NaN could hide, is recomputed exactly).
template <typename T>
inline acc_type<T> max_row(const acc_type<T>* x, int64_t n) {
  if constexpr (kMatrixUnits<T>) {
    const float m = common::row_max_fast(x, n);
    return m == -std::numeric_limits<float>::infinity() ? row_max(x, n) : m;
  } else {
    return row_max(x, n);
  }
}

// One row of P: x[0, n) <- exp(x * a - b) and returns its sum. On the matrix units P is
// written only rounded, into `prow` at the pair-aligned offset gemm_seq expects for a
// sequence range starting at `start` (padding columns zero), and x is left as it was.
// mx (matrix units only): also max(*mx, max of x) there, for the lazy rescaling (forward_kernel).
template <typename T>
inline acc_type<T> exp_row(acc_type<T>* x, int64_t n, acc_type<T> a, acc_type<T> b, T* prow, int64_t start,
                           acc_type<T>* mx = nullptr) {
  if constexpr (kMatrixUnits<T>) {
    const int64_t sh = start & 1, K = (n + sh + 1) & ~int64_t(1);
    if (sh) prow[0] = T(0);
    float sum;
    if (mx) {
      float row_mx;
      sum = common::exp_fma_sum_round_max(x, n, a, b, prow + sh, &row_mx);
      *mx = std::max(*mx, row_mx);
    } else {
      sum = common::exp_fma_sum_round(x, n, a, b, prow + sh);
    }
    if (n + sh < K) prow[K - 1] = T(0);
    return sum;
  } else {
    (void)prow;
    (void)start;
    (void)mx;
    return exp_fma_sum(x, n, a, b);
  }
}

// dQᵀ[D, M] += Kᵀ[D, j0 : j1] · dSᵀ[N, M]: kT_tile the packed transposed key tile [D, BLOCK_N]
// that holds the keys [j0, j1) (plain layout for every T; key j at column j % BLOCK_N). float /
// double: dSᵀ is the float tile dst (ld BLOCK_M). Matrix units: dSᵀ is the B operand, taken from
// its rounded rows `low` (ld kLowpLd, column c at c + qshift, as ds_row_bwd leaves them) and
// interleaved by key pairs into `buf` (the pair (r, r + 1) of column c is one 32-bit word), the
// key range aligned to a pair as in gemm_seq; rows outside [j0, j1) are zero.
template <typename T>
inline void gemm_dqT(int64_t D, int64_t M, int64_t j0, int64_t j1, int64_t qshift, const T* kT_tile,
                     const acc_type<T>* dst, const T* low, T* buf, acc_type<T>* dqT, int64_t ld_dqT) {
  if constexpr (kMatrixUnits<T>) {
    const int64_t a0 = j0 & ~int64_t(1), sh = j0 - a0, K = (j1 - a0 + 1) & ~int64_t(1), N = j1 - j0;
    uint32_t* words = reinterpret_cast<uint32_t*>(buf);
    const uint16_t* rows = reinterpret_cast<const uint16_t*>(low) + qshift;
    for (int64_t pr = 0; pr < K / 2; ++pr) {
      const int64_t r0 = 2 * pr - sh, r1 = r0 + 1;
      uint32_t* w = words + pr * kBlockM;
      if (r0 >= 0 && r1 < N) {
        const uint16_t* lo = rows + r0 * kLowpLd;
        const uint16_t* hi = rows + r1 * kLowpLd;
        for (int64_t c = 0; c < M; ++c) w[c] = uint32_t(lo[c]) | (uint32_t(hi[c]) << 16);
      } else if (r0 >= 0 && r0 < N) {
        const uint16_t* lo = rows + r0 * kLowpLd;
        for (int64_t c = 0; c < M; ++c) w[c] = uint32_t(lo[c]);
      } else {  // r0 = -1: only r1 is a row of the range
        const uint16_t* hi = rows + r1 * kLowpLd;
        for (int64_t c = 0; c < M; ++c) w[c] = uint32_t(hi[c]) << 16;
      }
    }
    (void)dst;
    common::vnni_gemm(D, M, K, kT_tile + a0 % kBlockN, kBlockN, buf, kBlockM, dqT, ld_dqT, true);
  } else {
    (void)qshift;
    (void)low;
    (void)buf;
    tile_gemm<T>(D, M, j1 - j0, kT_tile + j0 % kBlockN, kBlockN, dst, kBlockM, dqT, ld_dqT, true);
  }
}

// Backward row of Pᵀ: x[0, n) <- exp(x * scale - lse) in float; on the matrix units also
// rounded into `low` at the pair-aligned offset of a range starting at `start`.
template <typename T>
inline void p_row_bwd(acc_type<T>* x, int64_t n, acc_type<T> scale, const acc_type<T>* lse, T* low, int64_t start) {
  if constexpr (kMatrixUnits<T>) {
    const int64_t sh = start & 1, K = (n + sh + 1) & ~int64_t(1);
    if (sh) low[0] = T(0);
    common::exp_lse_round(x, n, scale, lse, low + sh);
    if (n + sh < K) low[K - 1] = T(0);
  } else {
    (void)low;
    (void)start;
    exp_scaled_minus(x, n, scale, lse, true);
  }
}

// Backward row of dSᵀ = Pᵀ ∘ (dPᵀ − delta) · scale: in place in float, or on the matrix
// units only rounded into `low` (same offsets as p_row_bwd; the padding stays zero).
template <typename T>
inline void ds_row_bwd(acc_type<T>* p_row, const acc_type<T>* dp, int64_t n, const acc_type<T>* delta,
                       acc_type<T> scale, T* low, int64_t start, acc_type<T>* tmp) {
  if constexpr (kMatrixUnits<T>) {
    common::softmax_grad_round(p_row, dp, n, delta, scale, low + (start & 1), tmp);
  } else {
    (void)low;
    (void)start;
    (void)tmp;
    softmax_grad(p_row, dp, n, delta, true, scale);
  }
}

// After a parallel task's sequence of matrix-unit GEMMs.
template <typename T>
inline void release_gemm() {
  if constexpr (kMatrixUnits<T>) common::vnni_release();
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

// The queries [lo, hi) of [i0, i1) that see key j (none for a padded key).
inline std::pair<int64_t, int64_t> key_queries(const Problem& p, int64_t b, int64_t j, int64_t i0, int64_t i1) {
  if (p.kpm && p.kpm[b * p.Nk + j]) return {i0, i0};
  const int64_t lo = p.right < 0 ? i0 : std::clamp<int64_t>(j - p.off - p.right, i0, i1);
  const int64_t hi = p.left < 0 ? i1 : std::clamp<int64_t>(j - p.off + p.left + 1, lo, i1);
  return {lo, hi};
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
// Score modifiers (attnkernels/softmax/modifiers.py): on the score tile, in order,
//   s = scale · q·kᵀ;  s = cap · tanh(s / cap);  s -= slope[b, h] · |i + Nk − Nq − j|;
//   s += bias[b, h, i, j];  then the element mask;
// and dropout (common/philox.h) on P. A call without them never enters these helpers
// (one flag per tile row), so the plain kernels run as before.
// ---------------------------------------------------------------------------
template <typename A>
struct Modifiers {
  A cap = 0, inv_cap = 0;       // softcap, 0 = off
  const A* slopes = nullptr;    // ALiBi [B, Hq], or nullptr
  // attn_bias in its own float dtype (converted row by row), 4-D (B, Hq, Nq, Nk) strides, 0 where
  // it broadcasts; bias_elem its element size.
  const char* bias = nullptr;
  at::ScalarType bias_type = at::kFloat;
  int64_t bias_elem = 0;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  bool dropout = false;
  common::PhiloxKey key;
  uint8_t threshold = 0;        // keep iff the key's Philox byte >= threshold (round(p · 256))
  A keep_scale = 1;             // 1 / (1 - t / 256)
  const A* sinks = nullptr;     // forward: [Hq] sink logits joining each row's denominator, or nullptr
  A* dbias = nullptr;           // backward: dS before the softcap chain, [B, Hq, Nq, Nk], or nullptr

  // True when the logits differ from scale · q·kᵀ (the tile gets the modifier pass).
  bool logits() const { return cap > 0 || slopes != nullptr || bias != nullptr; }
  A slope(int64_t b, int64_t h, int64_t Hq) const { return slopes ? slopes[b * Hq + h] : A(0); }
  const char* bias_at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return bias ? bias + (b * sb + h * sh + i * si + j * sj) * bias_elem : nullptr;
  }
};

// dst[0, n) = A(src[c · stride]) for a bias row of element type B.
template <typename A, typename B>
inline void load_bias_row(const B* src, int64_t stride, int64_t n, A* dst) {
  if (stride == 1)
    common::convert_row(src, dst, n);
  else if (stride == 0)
    fill(dst, n, A(src[0]));
  else
    for (int64_t c = 0; c < n; ++c) dst[c] = A(src[c * stride]);
}

// dst[c · ldd + r] = src[r · lds + c] for r < rows, c < cols, in 16 x 16 blocks so that
// both sides stay in a few cache lines at a time (a plain double loop strides one of them
// through a whole tile and misses L1 on every element).
template <typename A>
void transpose_tile(const A* src, int64_t lds, A* dst, int64_t ldd, int64_t rows, int64_t cols) {
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB)
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t re = std::min(rows, r0 + kB), ce = std::min(cols, c0 + kB);
      for (int64_t c = c0; c < ce; ++c)
        for (int64_t r = r0; r < re; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
}

// A gradient output of the backward: in the input dtype (float32 / float64, or bf16 / fp16 rounded
// once from the float accumulator as it is stored), or the float partials of the GQA heads.
// Stored in the output dtype by the pass that finishes it, instead of a float [B, H, N, D]
// tensor converted afterwards: in bf16 those three tensors were written, faulted in and read
// back once more per call.
struct GradOut {
  void* data;
  at::ScalarType type;
};

// out[off, off + n) = src[0, n) in out's dtype (the float-to-16-bit rounding as Tensor.to does).
template <typename A>
inline void store_grad(const A* src, const GradOut& out, int64_t off, int64_t n) {
  switch (out.type) {
    case at::kBFloat16: at::vec::convert(src, static_cast<at::BFloat16*>(out.data) + off, n); break;
    case at::kHalf: at::vec::convert(src, static_cast<at::Half*>(out.data) + off, n); break;
    default:
      TORCH_INTERNAL_ASSERT(out.type == c10::CppTypeToScalarType<A>::value);
      std::copy(src, src + n, static_cast<A*>(out.data) + off);
  }
}

// The backward's transposed bias tile: out[r · ld + c] = bias[b, h, i0 + c, j0 + r] in A for
// keys r < n, queries c < m. Read along the bias's query rows (contiguous when it does not
// broadcast over keys) into `stage` [m, BLOCK_N], then transposed in blocks.
template <typename A>
void load_bias_tile_t(const Modifiers<A>& md, int64_t b, int64_t h, int64_t i0, int64_t m, int64_t j0, int64_t n,
                      A* out, int64_t ld, A* stage) {
  if (md.bias_type == c10::CppTypeToScalarType<A>::value && md.sj == 1 && md.si > 0) {
    transpose_tile(reinterpret_cast<const A*>(md.bias_at(b, h, i0, j0)), md.si, out, ld, m, n);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, md.bias_type, "attn_bias", [&] {
    for (int64_t c = 0; c < m; ++c)
      load_bias_row(reinterpret_cast<const scalar_t*>(md.bias_at(b, h, i0 + c, j0)), md.sj, n, stage + c * kBlockN);
  });
  transpose_tile(stage, kBlockN, out, ld, m, n);
}

// One fused pass over a row: x = scale·x (or cap·tanh(scale·x / cap)), − slope·|dist0 + c·dstep|,
// + b[c]. The flags are template parameters so that each combination is one tight loop.
template <bool kCap, bool kAlibi, bool kBias, typename A>
void logits_pass(A* x, int64_t n, A scale, A cap, A inv_cap, A slope, A dist0, A dstep, const A* b, A* tanh_out) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  const Vec vs(kCap ? scale * inv_cap : scale), vcap(cap), vneg(-slope);
  // The distances of the lanes, advanced by W·dstep per vector (integers: exact).
  Vec dist = kAlibi ? Vec::arange(dist0, dstep) : Vec(A(0));
  const Vec dist_step(A(W) * dstep);
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    Vec v = Vec::loadu(x + c) * vs;
    if constexpr (kCap) {
      const Vec t = common::vtanh(v);
      if (tanh_out) t.store(tanh_out + c);
      v = t * vcap;
    }
    if constexpr (kAlibi) {
      v = at::vec::fmadd(dist.abs(), vneg, v);
      dist = dist + dist_step;
    }
    if constexpr (kBias) v = v + Vec::loadu(b + c);
    v.store(x + c);
  }
  for (; c < n; ++c) {
    A v = x[c] * (kCap ? scale * inv_cap : scale);
    if constexpr (kCap) {
      const A t = common::tanh_scalar(v);
      if (tanh_out) tanh_out[c] = t;
      v = cap * t;
    }
    if constexpr (kAlibi) v -= slope * std::abs(dist0 + A(c) * dstep);
    if constexpr (kBias) v += b[c];
    x[c] = v;
  }
}

// x[0, n) <- the modified logits of raw q·k products. Along the row the ALiBi distance is
// |dist0 + c · dstep| (a query row: dstep = -1; a transposed key row: +1) and the bias is
// brow[c · bstride] (a query row: stride sj; a key row: si). tanh_out (backward) receives
// tanh(s / cap) for the chain rule. tmp: n values of scratch (a bias row not contiguous in A).
template <typename A>
void modify_logits(const Modifiers<A>& md, A* x, int64_t n, A scale, A slope, A dist0, A dstep, const char* brow,
                   int64_t bstride, A* tanh_out, A* tmp, const A* bias_ready = nullptr) {
  const A* b = bias_ready;  // the row already in A, contiguous (the backward's transposed tile)
  if (brow && !b) {
    if (md.bias_type == c10::CppTypeToScalarType<A>::value && bstride == 1) {
      b = reinterpret_cast<const A*>(brow);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, md.bias_type, "attn_bias", [&] {
        load_bias_row(reinterpret_cast<const scalar_t*>(brow), bstride, n, tmp);
      });
      b = tmp;
    }
  }
  const bool cap = md.cap > A(0), alibi = md.slopes != nullptr, bias = md.bias != nullptr;
  auto run = [&](auto kc, auto ka, auto kb) {
    logits_pass<decltype(kc)::value, decltype(ka)::value, decltype(kb)::value>(x, n, scale, md.cap, md.inv_cap,
                                                                               slope, dist0, dstep, b, tanh_out);
  };
  using T_ = std::true_type;
  using F_ = std::false_type;
  if (cap) {
    if (alibi) bias ? run(T_{}, T_{}, T_{}) : run(T_{}, T_{}, F_{});
    else bias ? run(T_{}, F_{}, T_{}) : run(T_{}, F_{}, F_{});
  } else {
    if (alibi) bias ? run(F_{}, T_{}, T_{}) : run(F_{}, T_{}, F_{});
    else bias ? run(F_{}, F_{}, T_{}) : run(F_{}, F_{}, F_{});
  }
}

// Backward dS row under the modifiers: d = P ∘ (dP − delta) (dbias, copied to
// dbias_col[0, n) when asked), then d · (1 − tanh²) with softcap, then · scale; in
// place in float, and on the matrix units rounded into `low` (offsets as ds_row_bwd).
template <typename T>
void ds_row_modified(acc_type<T>* p_row, const acc_type<T>* dp, int64_t n, const acc_type<T>* delta,
                     acc_type<T> scale, const acc_type<T>* tanh_row, acc_type<T>* dbias_col, T* low,
                     int64_t start) {
  using A = acc_type<T>;
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  int64_t c = 0;
  for (; c + W <= n; c += W)
    (Vec::loadu(p_row + c) * (Vec::loadu(dp + c) - Vec::loadu(delta + c))).store(p_row + c);
  for (; c < n; ++c) p_row[c] = p_row[c] * (dp[c] - delta[c]);
  if (dbias_col) std::copy(p_row, p_row + n, dbias_col);
  if (tanh_row) {
    const Vec one(A(1)), vs(scale);
    for (c = 0; c + W <= n; c += W) {
      const Vec t = Vec::loadu(tanh_row + c);
      (Vec::loadu(p_row + c) * (one - t * t) * vs).store(p_row + c);
    }
    for (; c < n; ++c) p_row[c] = p_row[c] * (A(1) - tanh_row[c] * tanh_row[c]) * scale;
  } else {
    scale_row(p_row, n, scale);
  }
  if constexpr (kMatrixUnits<T>) common::convert_row(p_row, low + (start & 1), n);
  else (void)low;
}

// Flush-to-zero and denormals-are-zero on this thread while a modified call's tiles run,
// restored after. ALiBi (and a wide-ranged bias) put many keys so far below the row's max
// that P, dS and their GEMM products land in the denormal range, where each FMA costs a
// microcode assist (measured: fp32 ALiBi fwd+bwd at N = 2048, 431 -> 285 ms with it). Such
// values are < 2^-126 next to a row maximum of 1: flushing them changes nothing that the
// results can show. Calls without modifiers keep the thread's mode (their bits unchanged).
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int saved = 0;
  bool on;
  explicit FlushDenormals(bool enable) : on(enable) {
    if (on) {
      saved = _mm_getcsr();
      _mm_setcsr(saved | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
    }
  }
  ~FlushDenormals() {
    if (on) _mm_setcsr(saved);
  }
#else
  explicit FlushDenormals(bool) {}
#endif
};

// Zeroes the dropped entries of a row of P as the P·V product reads it: the float row
// (float / double), or its rounded copy at the pair-aligned offset (matrix units).
template <typename T>
inline void drop_p_row(acc_type<T>* x, T* low, int64_t start, const uint8_t* u, int64_t n, uint8_t threshold) {
  if constexpr (kMatrixUnits<T>)
    common::drop_row(reinterpret_cast<uint16_t*>(low) + (start & 1), u, n, threshold);
  else
    common::drop_row(x, u, n, threshold);
  (void)x;
}

// Softcap alone (no ALiBi, no bias; scale > 0) on bf16 with AVX512-BF16 takes cheaper
// passes (common::softcap_*_bf16, with the bf16-class tanh_lowp): the forward forms the
// capped logits and their row max in one pass (the plain exp pass follows); the backward
// forms P and the chain-rule factor scale · (1 - tanh²) in one pass and dS in one more.
// Everything else runs the generic modifier pass (modify_logits, ds_row_modified).
template <typename T>
inline bool fused_softcap(const Modifiers<acc_type<T>>& md, acc_type<T> scale) {
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>)
    return md.cap > 0 && !md.slopes && !md.bias && scale > 0 && common::bf16_native_ok();
#endif
  (void)md;
  (void)scale;
  return false;
}

// The forward's logits under the fused softcap: x[0, n) <- cap · tanh(x · a) in place,
// a = scale / cap; returns their max when with_max (else unspecified).
template <typename T>
inline acc_type<T> softcap_row(acc_type<T>* x, int64_t n, acc_type<T> a, acc_type<T> cap, bool with_max) {
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>)
    return with_max ? common::softcap_row_bf16<true>(x, n, a, cap) : common::softcap_row_bf16<false>(x, n, a, cap);
#endif
  (void)x, (void)n, (void)a, (void)cap, (void)with_max;
  TORCH_INTERNAL_ASSERT(false, "softcap_row: only the bf16 matrix-unit path fuses softcap");
  return 0;
}

// The forward's softcap with a fixed row max (softcap alone, scale > 0, no dropout; float32,
// and bf16 with AVX512-BF16): every capped logit lies in [-cap, cap], so m = cap bounds each
// row from the start: P = exp(s - cap), no max pass, no rescale of the accumulator, the tanh
// inside the exp pass. With cap <= kFixedMaxExactCap the smallest P, e^(-2·cap) >= e^-85.8, is
// a normal float above the bf16 exp's flush (2^-125) and inside the bounded exps' range, so P
// is as exact, relative to its row, as with the running max. Wider caps (up to kFixedMaxCap,
// Gemma 2's 50) floor the exponent at the bounded exps' range (e^-87 / 2^-124) on uncut tiles
// and flush it to 0 on cut ones, an error of at most e^-87 per key, negligible next to a row
// sum of at least Nk · kFixedMaxRowFloorPerKey (e^-70: below e^-17 = 4e-8 of the row); a query
// tile with a row under that (all its logits far below the cap, or no key at all) runs again
// with the running max (fixed_max_holds). Beyond kFixedMaxCap such rows get common (a row
// whose logits are all below cap - 61 at Nk = 4096), so wider caps take the running max.
constexpr double kFixedMaxExactCap = 42.9;  // under bf16's floor, which starts at 124 / (2·log2 e) = 42.98
constexpr double kFixedMaxCap = 50.0;
constexpr double kFixedMaxRowFloorPerKey = 3.975449735908647e-31;  // e^-70

// Whether a query tile computed under the fixed max stands: every row's sum >= Nk · e^-70
// (a NaN sum, a poisoned row, stands: the running max would give NaN too).
template <typename A>
inline bool fixed_max_holds(A cap, const A* l, int64_t M, int64_t Nk) {
  if (cap <= A(kFixedMaxExactCap)) return true;
  const A floor = A(Nk) * A(kFixedMaxRowFloorPerKey);
  for (int64_t r = 0; r < M; ++r)
    if (l[r] < floor) return false;
  return true;
}

template <typename T>
inline bool fixed_max_softcap(const Modifiers<acc_type<T>>& md, acc_type<T> scale) {
  if (!(md.cap > 0 && md.cap <= kFixedMaxCap && !md.slopes && !md.bias && !md.dropout && scale > 0)) return false;
  if constexpr (std::is_same_v<T, float>) return true;
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>) return common::bf16_native_ok();
#endif
  return false;
}

// One row of P under the fixed-max softcap: exp(cap · tanh(x · a) - m) from the raw q·k
// products (a = scale / cap), returns its sum; float: in place in x, bf16: rounded into
// prow at exp_row's pair-aligned offset (x left as it was).
template <typename T>
inline acc_type<T> softcap_exp_row(acc_type<T>* x, int64_t n, acc_type<T> a, acc_type<T> cap, acc_type<T> m, T* prow,
                                   int64_t start) {
  if constexpr (kMatrixUnits<T>) {
#ifdef ATTNKERNELS_NATIVE_BF16
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      const int64_t sh = start & 1, K = (n + sh + 1) & ~int64_t(1);
      if (sh) prow[0] = T(0);
      const float sum = common::softcap_exp_sum_round_bf16(x, n, a, cap, m, prow + sh);
      if (n + sh < K) prow[K - 1] = T(0);
      return sum;
    }
#endif
    (void)x, (void)n, (void)a, (void)cap, (void)m, (void)prow, (void)start;
    TORCH_INTERNAL_ASSERT(false, "softcap_exp_row: only float32 and bf16 with AVX512-BF16 fix the row max");
    return 0;
  } else {
    (void)prow, (void)start;
    return common::softcap_exp_sum(x, n, a, cap, m);
  }
}

// p_row_bwd under the fused softcap: x[0, n) <- P from the raw products, rounded into `low`
// (offsets as p_row_bwd), grad[0, n) = scale · (1 - tanh²).
template <typename T>
inline void p_row_softcap_bwd(acc_type<T>* x, int64_t n, acc_type<T> a, acc_type<T> cap, acc_type<T> scale,
                              const acc_type<T>* lse, T* low, int64_t start, acc_type<T>* grad) {
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const int64_t sh = start & 1, K = (n + sh + 1) & ~int64_t(1);
    if (sh) low[0] = T(0);
    common::softcap_exp_lse_round_bf16(x, n, a, cap, scale, lse, low + sh, grad);
    if (n + sh < K) low[K - 1] = T(0);
    return;
  }
#endif
  (void)x, (void)n, (void)a, (void)cap, (void)scale, (void)lse, (void)low, (void)start, (void)grad;
  TORCH_INTERNAL_ASSERT(false, "p_row_softcap_bwd: only the bf16 matrix-unit path fuses softcap");
}

// ds_row_bwd under the fused softcap: dS = P ∘ (dP − delta) ∘ grad, only rounded into `low`.
template <typename T>
inline void ds_row_softcap(const acc_type<T>* p_row, const acc_type<T>* dp, int64_t n, const acc_type<T>* delta,
                           const acc_type<T>* grad, T* low, int64_t start) {
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    common::softcap_grad_round_bf16(p_row, dp, n, delta, grad, low + (start & 1));
    return;
  }
#endif
  (void)p_row, (void)dp, (void)n, (void)delta, (void)grad, (void)low, (void)start;
  TORCH_INTERNAL_ASSERT(false, "ds_row_softcap: only the bf16 matrix-unit path fuses softcap");
}

// Dropout on bf16 with AVX512-BF16: the forward's keep mask is generated inside its exp
// pass (common::exp_sum_round_drop_bf16), the same bits as philox_query_row + drop_row.
template <typename T>
inline bool fused_dropout(const Modifiers<acc_type<T>>& md) {
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>) return md.dropout && common::bf16_native_ok();
#endif
  (void)md;
  return false;
}

// exp_row with the fused keep mask of query row i (head bh); P rounded into prow as exp_row.
template <typename T>
inline acc_type<T> exp_row_drop(const acc_type<T>* x, int64_t n, acc_type<T> a, acc_type<T> b, T* prow,
                                int64_t start, const Modifiers<acc_type<T>>& md, const common::PhiloxThreadKeys& keys,
                                uint32_t i, uint32_t bh) {
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const int64_t sh = start & 1, K = (n + sh + 1) & ~int64_t(1);
    if (sh) prow[0] = T(0);
    const common::PhiloxRow row(keys, i, bh, md.threshold);
    const float sum = common::exp_sum_round_drop_bf16(x, n, a, b, prow + sh, row, start);
    if (n + sh < K) prow[K - 1] = T(0);
    return sum;
  }
#endif
  (void)x, (void)n, (void)a, (void)b, (void)prow, (void)start, (void)md, (void)keys, (void)i, (void)bh;
  TORCH_INTERNAL_ASSERT(false, "exp_row_drop: only the bf16 matrix-unit path fuses dropout");
  return 0;
}

// ---------------------------------------------------------------------------
// Forward: per (b, h, query tile), online softmax over its key tiles
// ---------------------------------------------------------------------------
// Rows of a head's row operand: N, or N rounded up to a VNNI pair on the matrix units.
template <typename T>
constexpr int64_t operand_rows(int64_t n) {
  return kMatrixUnits<T> ? n + (n & 1) : n;
}

// Query rows a forward task covers on the matrix units: the whole head, or (a window bounded
// on both sides) about kRangeRows, so that the key band it packs stays L2-sized
// (rows + left + right keys, ~256 KB at 1024 + 2·256 keys, D = Dv = 64).
constexpr int64_t kRangeRows = 1024;

// T: the operand type. q [B, Hq, Nq, D]; out in T (written once, rounded from the float
// accumulator), lse in acc_type<T>. float / double: kv_k is Kᵀ packed per key tile
// (pack_transposed) and kv_v the rows [B, Hk, Nk, Dv]. Matrix units: kv_k and kv_v are the
// plain rows [B, Hk, Nk, D] / [B, Hk, Nk, Dv] and each task packs the key band its query
// tiles read (Kᵀ tiles and V pairs in the VNNI layout) into its own L2-resident buffers,
// once for every query tile of the task and every query head of the GQA group: tasks are
// (b, kv head, range of query tiles). Packed up front instead, the [B, Hk, ...] operands
// went through memory once more (written, then read back per query tile), and a window's
// band was read again by each next query tile for 3/4 of the same keys.
template <typename T>
void forward_kernel(const Problem& p, const T* q, const T* kv_k, const T* kv_v, acc_type<T> scale, T* out,
                    acc_type<T>* lse, const Modifiers<acc_type<T>>& md) {
  using A = acc_type<T>;
  // Query rows per task: 128 on the matrix units when no window bounds the keys (twice
  // the GEMM work per call and per packed Kᵀ / V tile read: measured 1.065x, dense, 1
  // thread, N=4096, interleaved); BLOCK_M otherwise (causal / windows: a taller tile
  // wastes more of its diagonal, measured 0.98x for causal).
  const int64_t bm = kMatrixUnits<T> && p.left < 0 && p.right < 0 ? kLowpBlockM : kBlockM;
  const auto qtiles = make_tiles(p.Nq, bm, p.sbs);
  const int64_t nt = int64_t(qtiles.size());
  const A neg_inf = -std::numeric_limits<A>::infinity();
  // Tasks: (b, heads [h_first, h_first + heads), query tiles [r·tpr, (r + 1)·tpr)). float /
  // double: one head, one tile. Matrix units: the GQA group's heads and a range of tiles (the
  // packing is shared), at least 4 tasks per thread when the heads are few (balance).
  constexpr bool kPackInTask = kMatrixUnits<T>;
  const int64_t heads = kPackInTask ? p.group : 1;
  const int64_t n_heads = p.B * (p.Hq / heads);
  int64_t tpr = 1;
  if constexpr (kPackInTask) {
    const int64_t rows = p.left >= 0 && p.right >= 0 ? std::max(kRangeRows, 2 * (p.left + p.right)) : p.Nq;
    int64_t nr = std::max<int64_t>((p.Nq + rows - 1) / std::max<int64_t>(1, rows),
                                   (4 * at::get_num_threads() + n_heads - 1) / n_heads);
    nr = std::clamp<int64_t>(nr, 1, std::max<int64_t>(1, nt));
    tpr = (nt + nr - 1) / nr;
  }
  const int64_t n_ranges = (nt + tpr - 1) / tpr;
  const int64_t grain =
      kPackInTask ? 1 : grain_for(2.0 * bm * std::min<int64_t>(p.Nk, 4 * kBlockN) * (p.D + p.Dv));
  // Wide chunks (kWideN): with a window bounded on the left or block tables (the bands
  // are narrow), and no modifiers (their passes index the tile by one key range).
  const bool wide = !md.logits() && !md.dropout && (p.left >= 0 || p.kv_num != nullptr);
  const int64_t ldS = wide ? kWideLd : kBlockN, ldP = wide ? kWideLowpLd : kLowpLd;
  at::parallel_for(0, n_heads * n_ranges, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush(md.logits() || md.dropout);
    A* const s_buf = thread_buffer<A, 0>(bm * ldS);  // [bm, ldS] scores, then probabilities
    std::vector<A> acc(bm * p.Dv);          // [bm, Dv] unnormalised output
    std::vector<A> m(bm), l(bm);            // running row max and row sum
    std::vector<A> m_new(bm), alpha(bm);    // per tile: new max, rescale factor
    std::vector<uint8_t> lazy_done(bm);     // per tile: the row took the lazy rescaling
    T* const p_buf = thread_buffer<T, 1>(kMatrixUnits<T> ? bm * ldP : 0);  // P rounded to T
    // The chunk: contiguous key ranges (segments), at S column scol and P column pcol.
    struct Segment {
      int64_t a, e, scol, pcol;
      bool cut;  // the window or the padding cuts it: element mask
    };
    std::vector<Segment> chunk;
    std::vector<uint32_t> words(md.dropout ? kBlockN / 4 + 8 : 0);  // a row's Philox words, 4 keys' bytes each
    std::vector<A> bias_tmp(md.bias ? kBlockN : 0);                 // a bias row converted to A
    const bool logits = md.logits(), fcap = fused_softcap<T>(md, scale), fdrop = fused_dropout<T>(md);
    const bool fixed = fixed_max_softcap<T>(md, scale);
    std::optional<common::PhiloxThreadKeys> drop_keys;  // the fused dropout pass's round keys
    if (fdrop) drop_keys.emplace(md.key);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bg = task / n_ranges, b = bg / (p.Hq / heads), h_first = bg % (p.Hq / heads) * heads;
      const int64_t hk = h_first / p.group, t_first = task % n_ranges * tpr, t_last = std::min(nt, t_first + tpr);
      // The operands of kv head hk, with the sequence position `base` at their start: Kᵀ packed
      // [.., D, BLOCK_N] per key tile, V rows [.., Dv] (VNNI pairs on the matrix units).
      const T* kT_h;
      const T* v_h;
      int64_t base = 0;
      if constexpr (kPackInTask) {
        // The keys the task's tiles can see: their band, narrowed to the listed blocks with tables.
        int64_t lo = p.Nk, hi = 0;
        for (int64_t h = h_first; h < h_first + heads; ++h)
          for (int64_t t = t_first; t < t_last; ++t)
            for_each_kv_tile(p, b, h, qtiles[t].first, qtiles[t].second, [&](int64_t a, int64_t e) {
              lo = std::min(lo, a);
              hi = std::max(hi, e);
            });
        if (lo >= hi) lo = hi = 0;  // nothing visible: the tiles only write their empty rows
        const int64_t t0 = lo / kBlockN, t1 = (hi + kBlockN - 1) / kBlockN;
        base = t0 * kBlockN;  // even, so V's pairs and P's pair alignment keep their parity
        T* kbuf = thread_buffer<T, 3>((t1 - t0) * p.D * kBlockN);
        T* vbuf = thread_buffer<T, 4>((std::min(t1 * kBlockN, operand_rows<T>(p.Nk)) - base) * p.Dv);
        common::vnni_transposed_tile_range(kv_k + (b * p.Hk + hk) * p.Nk * p.D, p.Nk, p.D, kBlockN, t0, t1, kbuf);
        common::vnni_row_pair_range(kv_v + (b * p.Hk + hk) * p.Nk * p.Dv, p.Nk, p.Dv, base / 2, (hi + 1) / 2, vbuf);
        kT_h = kbuf;
        v_h = vbuf;
      } else {
        kT_h = kv_k + (b * p.Hk + hk) * p.nKt * p.D * kBlockN;
        v_h = kv_v + (b * p.Hk + hk) * p.Nk * p.Dv;
      }
      for (int64_t h = h_first; h < h_first + heads; ++h)
      for (int64_t t = t_first; t < t_last; ++t) {
      const int64_t bh = b * p.Hq + h;
      const auto [i0, i1] = qtiles[t];
      const int64_t M = i1 - i0;
      const T* q_t = q + (bh * p.Nq + i0) * p.D;                          // [M, D]
      bool fixed_now = fixed;  // cleared when the tile runs again with the running max
      // Wide chunks: the keys [ca, ce) of segment g that query i sees under the window (ca == ce: none).
      auto row_keys = [&](int64_t i, const Segment& g) -> std::pair<int64_t, int64_t> {
        const int64_t ca = p.left < 0 ? g.a : std::clamp<int64_t>(i + p.off - p.left, g.a, g.e);
        const int64_t ce = p.right < 0 ? g.e : std::clamp<int64_t>(i + p.off + p.right + 1, ca, g.e);
        return {ca, ce};
      };
      // One online-softmax step over the chunk's segments: S [M, N] their columns side by side.
      // Without wide chunks the chunk is one piece [j0, j1) of one packed key tile.
      auto step = [&]() {
        const int64_t j0 = chunk.front().a, j1 = chunk.back().e;  // the modifier passes: one piece
        const int64_t N = chunk.back().scol + (j1 - chunk.back().a);
        bool masked = false;
        for (Segment& g : chunk) {
          split_segment(g.a, g.e, kBlockN, [&](int64_t a, int64_t e) {  // S = Q Kᵀ, per packed key tile
            gemm_packed<T>(M, e - a, p.D, q_t, p.D, kT_h, a - base, kBlockN, s_buf + g.scol + (a - g.a), ldS);
          });
          g.cut = window_cuts(p, i0, i1, g.a, g.e) || padding_cuts(p, b, g.a, g.e);
          masked = masked || g.cut;
        }
        if (fixed_now) {  // m = cap throughout: P straight from the raw products, no max, no rescale
          const A a = scale * md.inv_cap;  // (modifiers: never wide, so the chunk is the one piece [j0, j1))
          for (int64_t r = 0; r < M; ++r) {
            A* sr = s_buf + r * ldS;
            T* prow = p_buf + r * ldP;
            if (masked) {  // the capped logits first, so that the mask's -inf stays -inf (P = 0)
              if constexpr (kMatrixUnits<T>)
                softcap_row<T>(sr, N, a, md.cap, false);
              else
                logits_pass<true, false, false>(sr, N, scale, md.cap, md.inv_cap, A(0), A(0), A(0),
                                                static_cast<const A*>(nullptr), static_cast<A*>(nullptr));
              mask_query_row(p, b, i0 + r, j0, j1, sr, neg_inf);
              l[r] += exp_row<T>(sr, N, A(1), md.cap, prow, j0);
            } else {
              l[r] += softcap_exp_row<T>(sr, N, a, md.cap, md.cap, prow, j0);
            }
          }
          gemm_seq<T>(M, p.Dv, j0 - base, j1 - base, s_buf, ldS, v_h, p_buf, acc.data(), p.Dv, true, ldP);  // O += P V
          chunk.clear();
          return;
        }
        // scale > 0 (the usual case): the max of the raw scores, read-only, and the
        // scale folded into the exp's FMA (-inf · scale stays -inf). Else scale first,
        // so that a masked -inf never meets a zero scale.
        // With modifiers the logits are formed in the tile first (scale included).
        const bool positive = scale > A(0) && !logits;
        const A factor = positive ? scale : A(1);
        // P of row r against the max b (its sum returned; mx: see exp_row). Wide: exp over the row's
        // own keys [ca, ce) of each segment, P = 0 on the rest of it. Masks applied before.
        auto p_row = [&](int64_t r, A b, A* mx) -> A {
          A* sr = s_buf + r * ldS;
          A sum = 0;
          if (!wide) {
            for (const Segment& g : chunk)
              sum += exp_row<T>(sr + g.scol, g.e - g.a, factor, b, p_buf + r * ldP + g.pcol, g.a, mx);
            return sum;
          }
          // Matrix units: a run of segments the row sees whole, each starting on a pair and of even
          // length, is contiguous in S and in P (same columns): one exp pass over the run. BigBird's
          // 64-key blocks were one call each (per call: ~4 vectors of work, as much again of setup
          // and reductions).
          A* run_x = nullptr;
          T* run_p = nullptr;
          int64_t run_n = 0;
          auto flush_run = [&]() {
            if (run_n > 0) sum += exp_row<T>(run_x, run_n, factor, b, run_p, 0, mx);
            run_n = 0;
          };
          for (const Segment& g : chunk) {
            const auto [ca, ce] = row_keys(i0 + r, g);
            A* x = sr + g.scol;
            if constexpr (kMatrixUnits<T>) {  // P columns: gemm_seq's pair-aligned layout of the segment
              T* prow = p_buf + r * ldP + g.pcol;
              if (ca == g.a && ce == g.e && ((g.a | g.e) & 1) == 0) {
                if (run_n > 0 && (x != run_x + run_n || prow != run_p + run_n)) flush_run();
                if (run_n == 0) {
                  run_x = x;
                  run_p = prow;
                }
                run_n += g.e - g.a;
                continue;
              }
              flush_run();
              const int64_t total = p_cols<T>(g.a, g.e);
              const int64_t lead = ca == ce ? total : (ca & ~int64_t(1)) - (g.a & ~int64_t(1));
              const int64_t tail = ca == ce ? total : lead + p_cols<T>(ca, ce);
              fill(prow, lead, T(0));
              if (ca < ce) sum += exp_row<T>(x + (ca - g.a), ce - ca, factor, b, prow + lead, ca, mx);
              fill(prow + tail, total - tail, T(0));
            } else {
              fill(x, ca - g.a, A(0));
              if (ca < ce) sum += exp_row<T>(x + (ca - g.a), ce - ca, factor, b, nullptr, ca);
              fill(x + (ce - g.a), g.e - ce, A(0));
            }
          }
          flush_run();
          return sum;
        };
        // Lazy rescaling (matrix units, no dropout): a row that has a running max already takes
        // its P against that max, and the row's max comes out of the same exp pass (no max pass
        // over the tile, no rescale) unless it outgrew the running max by more than
        // kLazyRescale: then that row is redone against its new max (rare after the first
        // tiles). P = exp(s - m) stays <= e^kLazyRescale, and out = (Σ P V) / (Σ P) and
        // lse = m + log(Σ P) hold for any m: only the rounding of P changes.
        // A float bias and a softcap on the running max (not the fixed-max one, which has no max pass
        // to save) form the row's logits first (form_logits) and take the same path. Not ALiBi: its
        // logits rise by slope x distance toward the diagonal, so a causal row outgrows its running max
        // on most key tiles and is redone (measured, bf16 N=4096 causal: 1.22x the time of the max pass).
        const bool lazy = kMatrixUnits<T> && scale > A(0) && !fcap && !md.dropout && md.slopes == nullptr;
        auto form_logits = [&](int64_t r, A* sr) {
          const char* brow = md.bias_at(b, h, i0 + r, j0);
          modify_logits(md, sr, N, scale, md.slope(b, h, p.Hq), A(i0 + r + p.off - j0), A(-1), brow, md.sj,
                        static_cast<A*>(nullptr), bias_tmp.data());
          // The bias streams from memory once, rows Nk apart (a page or more): the hardware
          // prefetcher does not follow it, so the next key tile's part of this row is asked for now.
          if (brow && md.sj == 1 && j1 < p.Nk) {
            const char* next = brow + N * md.bias_elem;
            const int64_t bytes = std::min<int64_t>(kBlockN, p.Nk - j1) * md.bias_elem;
            for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(next + off);
          }
        };
        for (int64_t r = 0; r < M; ++r) {  // masks, then the tile's row max and the new running max
          A* sr = s_buf + r * ldS;
          lazy_done[r] = 0;
          // A row without a running max yet takes the previous row's new max as its estimate (a
          // neighbouring query's max is close): accepted when the row's own max lands in
          // [est - kLazyBelow, est + kLazyRescale], where P of the max is in [e^-60, e^8] (bf16). So the
          // max pass runs only on each tile's first row (and on the rows redone).
          const A est = r > 0 ? m_new[r - 1] : neg_inf;
          const bool first = m[r] == neg_inf;
          if (lazy && (!first || std::isfinite(est))) {
            if (logits) form_logits(r, sr);  // (then factor = 1; never wide)
            if (wide) {
              if (p.kpm)
                for (const Segment& g : chunk) {
                  const auto [ca, ce] = row_keys(i0 + r, g);
                  if (g.cut && ca < ce) mask_query_row(p, b, i0 + r, ca, ce, sr + g.scol + (ca - g.a), neg_inf);
                }
            } else {
              for (const Segment& g : chunk)
                if (g.cut) mask_query_row(p, b, i0 + r, g.a, g.e, sr + g.scol, neg_inf);
            }
            const A base = first ? est : m[r];
            A mx = neg_inf;
            A sum = p_row(r, base, &mx);
            const A top = mx * factor;  // (a NaN: no redo; the NaN is in the sum)
            if (first && top == neg_inf) {
              // every key of this chunk masked for the row: P = 0 (written), still no running max
            } else if (top > base + kLazyRescale || (first && top < base - kLazyBelow<T>)) {
              const A f = std::exp(m[r] - top);  // 0 for a first row (l, acc are 0)
              sum = p_row(r, top, nullptr);
              l[r] = l[r] * f + sum;
              scale_row(acc.data() + r * p.Dv, p.Dv, f);
              m[r] = top;
            } else {
              l[r] += sum;
              m[r] = base;
            }
            m_new[r] = m[r];
            lazy_done[r] = 1;
            continue;
          }
          if (fcap) {  // the capped logits and, on a tile no mask cuts, their max in the same pass
            const A mx = softcap_row<T>(sr, N, scale * md.inv_cap, md.cap, !masked);
            if (!masked) {
              m_new[r] = max_keep_nan(m[r], mx == neg_inf ? row_max(sr, N) : mx);
              continue;
            }
          } else if (logits) {
            form_logits(r, sr);
          }
          else if (!positive)
            scale_row(sr, N, scale);
          if (wide) {  // only the row's own keys [ca, ce) of each segment are read (padding masked there)
            A mx = neg_inf;
            for (const Segment& g : chunk) {
              const auto [ca, ce] = row_keys(i0 + r, g);
              if (ca == ce) continue;
              if (g.cut && p.kpm) mask_query_row(p, b, i0 + r, ca, ce, sr + g.scol + (ca - g.a), neg_inf);
              mx = max_keep_nan(mx, max_row<T>(sr + g.scol + (ca - g.a), ce - ca));
            }
            m_new[r] = max_keep_nan(m[r], mx * factor);
            continue;
          }
          for (const Segment& g : chunk)
            if (g.cut) mask_query_row(p, b, i0 + r, g.a, g.e, sr + g.scol, neg_inf);
          m_new[r] = max_keep_nan(m[r], max_row<T>(sr, N) * factor);
        }
        rescale_factors<T>(m.data(), m_new.data(), alpha.data(), M);  // exp(m - m_new): 0 on the first visible tile
        for (int64_t r = 0; r < M; ++r) {
          A* sr = s_buf + r * ldS;
          if (lazy_done[r]) continue;
          if (m_new[r] == neg_inf) {  // this row has seen no key yet: P = 0
            fill(sr, N, A(0));
            if constexpr (kMatrixUnits<T>) fill(p_buf + r * ldP, ldP, T(0));
            continue;
          }
          if (fdrop) {  // the exp pass and the keep mask in one loop
            l[r] = l[r] * alpha[r] + exp_row_drop<T>(sr, N, factor, m_new[r], p_buf + r * ldP, j0,
                                                     md, *drop_keys, uint32_t(i0 + r), uint32_t(bh));
            m[r] = m_new[r];
          } else {
            l[r] = l[r] * alpha[r] + p_row(r, m_new[r], nullptr);
            m[r] = m_new[r];
          }
          if (md.dropout && !fdrop) {  // the row sum keeps every P; the P·V product only the kept ones
            const int64_t g0 = j0 >> 4;  // one Philox call per 16 keys; the words read as bytes are the keys'
            common::philox_query_row(words.data(), md.key, uint32_t(i0 + r), uint32_t(bh), g0, ((j1 - 1) >> 4) - g0 + 1);
            drop_p_row<T>(sr, p_buf + r * ldP, j0, reinterpret_cast<const uint8_t*>(words.data()) + (j0 & 15),
                          N, md.threshold);
          }
          if (alpha[r] != A(1)) scale_row(acc.data() + r * p.Dv, p.Dv, alpha[r]);
        }
        for (const Segment& g : chunk)  // O += P V
          gemm_seq<T>(M, p.Dv, g.a - base, g.e - base, s_buf + g.scol, ldS, v_h, p_buf + g.pcol, acc.data(), p.Dv,
                      true, ldP);
        chunk.clear();
      };
      // Pieces in ascending key order; a piece continuing the last segment extends it.
      // used: the chunk's P columns (the next segment's pcol).
      for (;;) {  // once, or twice when the fixed max does not hold for a row (fixed_max_holds)
      fill(acc.data(), M * p.Dv, A(0));
      fill(m.data(), M, fixed_now ? A(md.cap) : neg_inf);
      fill(l.data(), M, A(0));
      int64_t used = 0;
      for_each_kv_tile(p, b, h, i0, i1, [&](int64_t a, int64_t e) {
        const bool extends = !chunk.empty() && chunk.back().e == a;
        const int64_t after = extends ? chunk.back().pcol + p_cols<T>(chunk.back().a, e) : used + p_cols<T>(a, e);
        if (!chunk.empty() && (!wide || after > kWideN)) {
          step();
          used = 0;
        }
        if (!chunk.empty() && chunk.back().e == a) {
          chunk.back().e = e;
        } else {
          const int64_t scol = chunk.empty() ? 0 : chunk.back().scol + (chunk.back().e - chunk.back().a);
          chunk.push_back({a, e, scol, used, false});
        }
        used = chunk.back().pcol + p_cols<T>(chunk.back().a, chunk.back().e);
      });
      if (!chunk.empty()) step();
      if (!fixed_now || fixed_max_holds(md.cap, l.data(), M, p.Nk)) break;
      fixed_now = false;
      }
      T* out_t = out + (bh * p.Nq + i0) * p.Dv;
      A* lse_t = lse + bh * p.Nq + i0;
      const A sink = md.sinks ? md.sinks[h] : neg_inf;
      for (int64_t r = 0; r < M; ++r) {
        // A sink joins the denominator: with m' = max(m, sink), l' = l · e^(m - m') + e^(sink - m')
        // and the output's factor e^(m - m') / l' (no overflow for a sink far above the row's
        // scores). A row that sees no key gets out 0 and lse = sink, as the reference.
        A mr = m[r], lr = l[r], f = A(1);
        if (sink != neg_inf) {
          const A m2 = max_keep_nan(mr, sink);
          f = mr == neg_inf ? A(0) : std::exp(mr - m2);
          lr = lr * f + std::exp(sink - m2);
          mr = m2;
        }
        const bool seen = !(lr == A(0));  // NaN (a poisoned row) counts as seen
        const A* acc_r = acc.data() + r * p.Dv;
        if (seen && f != A(0))
          common::scale_convert_row(acc_r, md.keep_scale * f / lr, out_t + r * p.Dv, p.Dv);  // keep_scale = 1 without dropout
        else
          fill(out_t + r * p.Dv, p.Dv, T(0));
        lse_t[r] = seen ? mr + std::log(lr) : neg_inf;
      }
      }
    }
    release_gemm<T>();
    if constexpr (kPackInTask) {
      trim_thread_buffer<T, 3>();
      trim_thread_buffer<T, 4>();
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
// Where the backward's time goes (perf, B1 H8 D64, N = 4096, window (256, 256), 1 thread, AMD
// EPYC without AMX, session 7): float32, ~70% in the five tile GEMMs, ~13% in the per-call
// full-tensor work (pack_transposed of Qᵀ / dOᵀ / Kᵀ, the dQ partials and gather_dq, fresh
// pages faulted in), ~8% in the P / dS rows. The dQ ownership (dq_tile_owner) and the outputs
// stored in the input dtype (GradOut) aim at the second share, the same bits. Measured against
// main (backward time ratio main / this, medians of interleaved pairs, loaded host, +-5% noise):
// float32 window 1.03, 1.01 (two runs), BigBird 0.98, 0.96: no gain shown; bf16 on the 16-bit
// path (AVX512-BF16) window 1.06, BigBird 1.02, N = 2048 w = 128 1.07. Session 8: under a bounded
// window the operands are packed in the tasks (packs_in_task) with a register 16 x 16 transpose;
// the same bits. Measured on an AMD EPYC family 25 model 17 (Zen 4; backward time main / this,
// interleaved; bf16 torch.mm ~190 GFLOP/s, this CPU's rate): float32 window (256, 256) N = 4096 1.07 [IQR 1.03, 1.11] and 1.04
// [1.01, 1.07] (two runs), N = 2048 / 1024 w = 128 1.13 / 1.05; bf16 N = 4096 1.01 [0.95, 1.13],
// N = 2048 w = 128 1.07; float32 bwd / fwd 2.2-2.4 after (2.4-2.5 before). perf after, float32: ~80%
// in the GEMMs, ~8% in the P / dS rows and masks, ~3% in the transposes. Left: for the 16-bit
// path wider query pieces per key tile (fewer, larger GEMMs).
int64_t backward_chunks(const Problem& p, int64_t n_kv_tiles) {
  constexpr int64_t kTargetTasks = 16;  // enough to keep a few threads busy when B·Hq is small
  const int64_t bh = std::max<int64_t>(1, p.B * p.Hq);
  return std::clamp<int64_t>((kTargetTasks + bh - 1) / bh, 1, std::max<int64_t>(1, n_kv_tiles));
}

// Per chunk c of the key tiles (of make_tiles, as backward_kernel splits them), the query
// tiles [t0, t1) (of BLOCK_M) of its dQ partial that it may write: the tiles of the chunk's
// query band (a superset with tables). The chunk zeroes only those and gather_dq sums only
// those: under a window the rest of each partial is never touched (at N = 2048, w = 128, two
// chunks: 8 MB of zeroing and 8 MB of summing a call, for ~1.5 MB of dQ).
std::vector<std::pair<int64_t, int64_t>> dq_chunk_tiles(const Problem& p, int64_t n_chunks) {
  const auto ktiles = make_tiles(p.Nk, kBlockN, p.sbs);
  const int64_t nt = int64_t(ktiles.size()), per_chunk = (nt + n_chunks - 1) / n_chunks;
  std::vector<std::pair<int64_t, int64_t>> r(n_chunks, {0, 0});
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t t0 = c * per_chunk, t1 = std::min(nt, t0 + per_chunk);
    if (t0 >= t1) continue;
    const auto [lo, hi] = query_band(p, ktiles[t0].first, ktiles[t1 - 1].second);
    if (lo < hi) r[c] = {lo / kBlockM, (hi + kBlockM - 1) / kBlockM};
  }
  return r;
}

// Per query tile (of BLOCK_M), the chunk that alone writes its dQ (-1: two or more chunks do, or
// none). Such a tile needs no partial: its chunk accumulates it in a per-thread buffer and writes
// dq itself (one term, the same bits as a one-term gather_dq). Under a window only the tiles
// near a chunk boundary are shared (N = 4096, w = 256, two chunks: 8 of 64), so the per-call
// partials shrink from [n_chunks, B, Hq, N, D] (freshly faulted pages, zeroed, summed, transposed)
// to those tiles. With tables (a band of the whole Nq) every tile is shared: as before.
std::vector<int64_t> dq_tile_owner(const Problem& p, const std::vector<std::pair<int64_t, int64_t>>& dq_tiles) {
  std::vector<int64_t> owner(p.nQt, -1), count(p.nQt, 0);
  for (int64_t c = 0; c < int64_t(dq_tiles.size()); ++c)
    for (int64_t t = dq_tiles[c].first; t < dq_tiles[c].second; ++t) {
      ++count[t];
      owner[t] = c;
    }
  for (int64_t t = 0; t < p.nQt; ++t)
    if (count[t] != 1) owner[t] = -1;
  return owner;
}

// Whether backward_kernel packs its operands itself, tile by tile as its GEMMs need them (Qᵀ, dOᵀ,
// and on the matrix units Q / dO in VNNI pairs, per query tile; Kᵀ per key tile), instead of
// reading them from [B, H, ...] tensors packed up front: under a window bounded on both sides,
// without tables. There each key tile's query band is a few query tiles (w = (256, 256): 13), the
// next key tile's band shares all but 4 of them, and each query tile is packed once per task into
// a per-thread ring (slot qt % R, tagged with qt) just before its first GEMM, which then finds it
// in L1 / L2. Packed up front, the tensors (float32, B1 H8 N4096 D64: 24 MB, fresh pages faulted
// in every call) went out to memory and were read back tile by tile, and bf16's Kᵀ went through
// torch's strided copy. Without a bounded window (or with a wide one) the band is most of the
// sequence, each chunk would repack it and the ring would hold whole heads: up to kRingWindow
// queries of window (ring <= 70 slots, 4.6 MB at D = Dv = 128).
constexpr int64_t kRingWindow = 4096;

bool packs_in_task(const Problem& p) {
  return p.left >= 0 && p.right >= 0 && p.left <= kRingWindow && p.right <= kRingWindow &&
         p.left + p.right <= kRingWindow && p.q_num == nullptr;
}

#ifdef CPU_CAPABILITY_AVX512
// One 16 x 16 block of 32-bit words, src (ld lds) -> dst (ld ldd) transposed, in registers:
// interleave pairs of rows by words, then by word pairs, then 128-bit lanes twice. Moves only
// (unpack / shuffle), so every bit pattern is kept.
inline void transpose_words_16x16(const uint32_t* src, int64_t lds, uint32_t* dst, int64_t ldd) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {  // b[i] = rows i, i + 1 interleaved by words (low / high halves of lanes)
    b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)  // then by 64-bit pairs: four rows per 128-bit lane
    for (int h = 0; h < 2; ++h) {
      const __m512d x = _mm512_castps_pd(b[i + h]), y = _mm512_castps_pd(b[i + h + 2]);
      a[i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
      a[i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
    }
  for (int i = 0; i < 16; i += 8)  // 128-bit lanes: even / odd lanes of rows i.. and i + 4..
    for (int j = 0; j < 4; ++j) {
      b[i + j] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0x88);
      b[i + j + 4] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {  // and once more across the two halves: column j, then j + 8
    _mm512_storeu_ps(dst + j * ldd, _mm512_shuffle_f32x4(b[j], b[j + 8], 0x88));
    _mm512_storeu_ps(dst + (j + 8) * ldd, _mm512_shuffle_f32x4(b[j], b[j + 8], 0xdd));
  }
}
#endif

// src [rows, cols] 32-bit words (ld lds) -> dst [cols, rows] (ld ldd), bit patterns kept. Whole
// 16 x 16 blocks in registers on AVX-512; the edges through at::vec's float transpose, which takes
// runtime block sizes and, called out of line, keeps its 16 vectors on the stack (perf, fp32
// window backward: 3% of the time in it when every block went through it).
inline void transpose_words(const uint32_t* src, int64_t lds, uint32_t* dst, int64_t ldd, int64_t rows,
                            int64_t cols) {
  auto edge = [&](int64_t r, int64_t c, int64_t m, int64_t n) {
    if (m > 0 && n > 0)
      at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(src + r * lds + c), lds,
                                    reinterpret_cast<float*>(dst + c * ldd + r), ldd, static_cast<int>(m),
                                    static_cast<int>(n));
  };
  int64_t r = 0;
#ifdef CPU_CAPABILITY_AVX512
  const int64_t c16 = cols & ~int64_t(15);
  for (; r + 16 <= rows; r += 16) {
    for (int64_t c = 0; c < c16; c += 16) transpose_words_16x16(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    edge(r, c16, 16, cols - c16);
  }
#endif
  edge(r, 0, rows - r, cols);
}

// x [rows, cols] (ld ldx) -> dst [cols, rows] (ld ldd), for the in-task packing: float as words,
// double through at::vec; 16-bit in 16 x 16 blocks where whole.
template <typename T>
void transpose_block(const T* x, int64_t ldx, T* dst, int64_t ldd, int64_t rows, int64_t cols) {
  if constexpr (std::is_same_v<T, float>) {
    transpose_words(reinterpret_cast<const uint32_t*>(x), ldx, reinterpret_cast<uint32_t*>(dst), ldd, rows, cols);
  } else if constexpr (kMatrixUnits<T>) {
    int64_t r = 0;
    for (; r + 16 <= rows; r += 16) {
      int64_t c = 0;
      for (; c + 16 <= cols; c += 16) at::vec::transpose_mxn<T, 16, 16>(x + r * ldx + c, ldx, dst + c * ldd + r, ldd);
      for (; c < cols; ++c)
        for (int64_t i = r; i < r + 16; ++i) dst[c * ldd + i] = x[i * ldx + c];
    }
    for (; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = x[r * ldx + c];
  } else {
    at::vec::transpose_mxn<T>(x, ldx, dst, ldd, static_cast<int>(rows), static_cast<int>(cols));
  }
}

// Ring slots for packs_in_task: the most query tiles (of BLOCK_M) one key tile's query band can
// touch (the band is at most BLOCK_N + left + right queries, split at multiples of BLOCK_M), so
// that a band's tiles never evict one another.
int64_t ring_slots(const Problem& p) { return std::min<int64_t>(p.nQt, (kBlockN + p.left + p.right) / kBlockM + 2); }

// T: the operand type. q, dout: rows [B, Hq, Nq, *] (VNNI pairs on the matrix units);
// qT, doT: packed transposed per query tile; k, v: plain rows; kT: packed transposed
// per key tile, plain layout (the A operand of dQᵀ). packs_in_task: qT, doT and kT are null
// and q, dout plain rows [B, Hq, Nq, *] for every T (the kernel packs the rest from q, dout, k).
// Everything else in acc_type<T>.
template <typename T>
void backward_kernel(const Problem& p, const T* q, const T* qT, const T* k, const T* kT, const T* v, const T* dout,
                     const T* doT, const acc_type<T>* lse_use, const acc_type<T>* delta, acc_type<T> scale,
                     int64_t n_chunks, const std::vector<std::pair<int64_t, int64_t>>& dq_tiles,
                     const std::vector<int64_t>& dq_owner,  // dq_tile_owner
                     acc_type<T>* dqT_part,  // [n_chunks, B, Hq, nQt, D, BLOCK_M]: the shared tiles of dq_tiles[c]
                     const GradOut& dq_out,  // [B, Hq, Nq, D]: the owned tiles' rows
                     const GradOut& dk_out,  // [B, Hq or Hk, Nk, D]: per query head when group > 1
                     const GradOut& dv_out,  // [B, Hq or Hk, Nk, Dv]
                     const Modifiers<acc_type<T>>& md) {
  using A = acc_type<T>;
  const auto ktiles = make_tiles(p.Nk, kBlockN, p.sbs);
  const int64_t nt = int64_t(ktiles.size());
  const int64_t per_chunk = (nt + n_chunks - 1) / n_chunks;
  const int64_t out_heads = p.group > 1 ? p.Hq : p.Hk;
  const int64_t dqT_head = p.nQt * p.D * kBlockM;  // elements of one head's packed dQᵀ
  const int64_t q_rows = operand_rows<T>(p.Nq);
  const int64_t grain =
      grain_for(2.0 * per_chunk * kBlockN * std::min<int64_t>(p.Nq, 4 * kBlockM) * (3 * p.D + 2 * p.Dv));
  const bool in_task = qT == nullptr;  // packs_in_task
  const int64_t n_slots = in_task ? ring_slots(p) : 0;
  // A ring slot: Qᵀ [D, BLOCK_M] and dOᵀ [Dv, BLOCK_M] (VNNI [D / 2, BLOCK_M, 2] on the matrix
  // units), there also Q [BLOCK_M / 2, D, 2] and dO [BLOCK_M / 2, Dv, 2] in VNNI pairs of rows.
  const int64_t slot_size = (kMatrixUnits<T> ? 2 : 1) * (p.D + p.Dv) * kBlockM;
  at::parallel_for(0, p.B * p.Hq * n_chunks, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush(md.logits() || md.dropout);
    // packs_in_task: the ring of query tiles and the current key tile's Kᵀ [D, BLOCK_N]. (Slots 3
    // and 4 are the forward's packed key band, which no backward task needs while it runs.) float /
    // double: only the real rows are written (their GEMMs read no column past Nq or Nk); the matrix
    // units' pair-aligned K may read one past: zeros there.
    T* const ring = thread_buffer<T, 3>(n_slots * slot_size);
    T* const kT_own = thread_buffer<T, 4>(in_task ? p.D * kBlockN : 0);
    std::vector<int64_t> ring_tag(n_slots);
    std::vector<A> st(kBlockN * kBlockM);   // [BLOCK_N, BLOCK_M] Sᵀ, then Pᵀ, then dSᵀ
    std::vector<A> dpt(kBlockN * kBlockM);  // [BLOCK_N, BLOCK_M] dPᵀ = V dOᵀ
    std::vector<A> dk_acc(kBlockN * p.D), dv_acc(kBlockN * p.Dv);  // [BLOCK_N, D], [BLOCK_N, Dv]
    // Matrix units: Pᵀ / dSᵀ rounded to T (A operands), dSᵀ in VNNI pairs (dQᵀ's B operand).
    T* const a_buf = thread_buffer<T, 2>(kMatrixUnits<T> ? kBlockN * kLowpLd : 0);
    std::vector<T> b_lowp(kMatrixUnits<T> ? (kBlockN + 2) * kBlockM : 0);
    std::vector<A> tmp_f(kMatrixUnits<T> ? kBlockM : 0);
    // Modifiers: tanh(s / cap) of the tile [BLOCK_N, BLOCK_M] (softcap); the tile's Philox
    // bytes [BLOCK_N + 16, BLOCK_M] from key row 16 (j0 >> 4), and on float / double the
    // kept P (P ∘ keep) for dV (dropout).
    const bool logits = md.logits(), modified_ds = md.cap > A(0) || md.dbias != nullptr;
    const bool fcap = fused_softcap<T>(md, scale);  // tanh_t then holds scale · (1 - tanh²)
    std::vector<A> tanh_t(md.cap > A(0) ? kBlockN * kBlockM : 0);
    std::vector<uint8_t> keybytes(md.dropout ? (kBlockN + 16) * kBlockM : 0);
    std::vector<A> p_kept(md.dropout && !kMatrixUnits<T> ? kBlockN * kBlockM : 0);
    std::vector<A> bias_tmp(md.bias ? kBlockN : 0);  // a bias row converted to A
    // The tile's bias and dbias, transposed like the tile: [BLOCK_N, BLOCK_M].
    std::vector<A> bias_t(md.bias ? kBlockN * kBlockM : 0);
    std::vector<A> bias_stage(md.bias ? kBlockM * kBlockN : 0);  // [BLOCK_M, BLOCK_N]: its query rows in A
    std::vector<A> dbias_t(md.dbias ? kBlockN * kBlockM : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % n_chunks, bh = task / n_chunks, b = bh / p.Hq, h = bh % p.Hq, hk = h / p.group;
      const int64_t bhk = b * p.Hk + hk;
      const int64_t rows_h = in_task ? p.Nq : q_rows;      // rows of q / dout per head
      const T* q_h = q + bh * rows_h * p.D;                // [Nq, D]
      const T* qT_h = in_task ? nullptr : qT + bh * dqT_head;                  // packed [nQt, D, BLOCK_M]
      const T* do_h = dout + bh * rows_h * p.Dv;                               // [Nq, Dv]
      const T* doT_h = in_task ? nullptr : doT + bh * p.nQt * p.Dv * kBlockM;  // packed [nQt, Dv, BLOCK_M]
      const T* kT_h = in_task ? nullptr : kT + bhk * p.nKt * p.D * kBlockN;  // packed [nKt, D, BLOCK_N]
      std::fill(ring_tag.begin(), ring_tag.end(), int64_t(-1));
      // The operands of query tile qt of this head: Qᵀ [D, BLOCK_M] and dOᵀ [Dv, BLOCK_M] (packed),
      // and the row operands of dK / dV (q_rows, do_rows) with the sequence position `base` at their
      // start (even: pairs keep their parity).
      struct QTile {
        const T *qT, *doT, *q_rows, *do_rows;
        int64_t base;
      };
      auto q_tiles = [&](int64_t qt) -> QTile {
        if (!in_task) return {qT_h + qt * p.D * kBlockM, doT_h + qt * p.Dv * kBlockM, q_h, do_h, 0};
        const int64_t s = qt % n_slots, i0 = qt * kBlockM, rows = std::min(kBlockM, p.Nq - i0);
        T* const slot = ring + s * slot_size;
        T* const slot_doT = slot + p.D * kBlockM;
        if constexpr (kMatrixUnits<T>) {
          T* const slot_q = slot_doT + p.Dv * kBlockM;
          T* const slot_do = slot_q + kBlockM * p.D;
          if (ring_tag[s] != qt) {
            // Qᵀ / dOᵀ in VNNI pairs: each (d, d + 1) pair of a row is one word, so a word transpose
            // [rows, D / 2] -> [D / 2, BLOCK_M], zero past Nq (the pair-aligned reads may go one past).
            auto pack_t = [&](const T* x, int64_t width, T* dst) {
              uint32_t* d = reinterpret_cast<uint32_t*>(dst);
              const uint32_t* src = reinterpret_cast<const uint32_t*>(x + i0 * width);
              transpose_words(src, width / 2, d, kBlockM, rows, width / 2);
              if (rows < kBlockM)
                for (int64_t w = 0; w < width / 2; ++w) std::fill(d + w * kBlockM + rows, d + (w + 1) * kBlockM, 0u);
            };
            pack_t(q_h, p.D, slot);
            pack_t(do_h, p.Dv, slot_doT);
            const int64_t p0 = i0 / 2, p1 = (i0 + rows + 1) / 2;  // the tile's pairs (a zero row pads odd Nq)
            common::vnni_row_pair_range(q_h, p.Nq, p.D, p0, p1, slot_q);
            common::vnni_row_pair_range(do_h, p.Nq, p.Dv, p0, p1, slot_do);
            ring_tag[s] = qt;
          }
          return {slot, slot_doT, slot_q, slot_do, i0};
        } else {
          if (ring_tag[s] != qt) {
            transpose_block<T>(q_h + i0 * p.D, p.D, slot, kBlockM, rows, p.D);
            transpose_block<T>(do_h + i0 * p.Dv, p.Dv, slot_doT, kBlockM, rows, p.Dv);
            ring_tag[s] = qt;
          }
          return {slot, slot_doT, q_h, do_h, 0};
        }
      };
      const A* lse_h = lse_use + bh * p.Nq;
      const A* delta_h = delta + bh * p.Nq;
      // dQᵀ of query tile qt, [D, BLOCK_M]: the chunk's own tiles in a per-thread buffer (the
      // band's tiles, [t1 - t0, D, BLOCK_M]), the shared ones in this chunk's partial.
      const int64_t qt0 = dq_tiles[c].first, qt1 = dq_tiles[c].second;
      int64_t own0 = qt1, own1 = qt0;  // the owned tiles lie in [own0, own1)
      for (int64_t qt = qt0; qt < qt1; ++qt)
        if (dq_owner[qt] == c) own0 = std::min(own0, qt), own1 = qt + 1;
      A* const dq_own = thread_buffer<A, 5>(std::max<int64_t>(0, own1 - own0) * p.D * kBlockM);
      A* const dqT = dqT_part + (c * p.B * p.Hq + bh) * dqT_head;
      auto dqT_tile = [&](int64_t qt) {
        return dq_owner[qt] == c ? dq_own + (qt - own0) * p.D * kBlockM : dqT + qt * p.D * kBlockM;
      };
      for (int64_t qt = qt0; qt < qt1; ++qt) fill(dqT_tile(qt), p.D * kBlockM, A(0));
      for (int64_t t = c * per_chunk; t < std::min(nt, (c + 1) * per_chunk); ++t) {
        const auto [j0, j1] = ktiles[t];
        const int64_t n_keys = j1 - j0;
        const bool padded = padding_cuts(p, b, j0, j1);
        fill(dk_acc.data(), n_keys * p.D, A(0));
        fill(dv_acc.data(), n_keys * p.Dv, A(0));
        // Kᵀ of the packed key tile holding [j0, j1), [D, BLOCK_N] (key j at column j % BLOCK_N;
        // packs_in_task: j0 is a multiple of BLOCK_N, make_tiles without tables).
        const T* kT_tile = kT_h ? kT_h + (j0 / kBlockN) * p.D * kBlockN : kT_own;
        if (in_task) {
          transpose_block<T>(k + (bhk * p.Nk + j0) * p.D, p.D, kT_own, kBlockN, n_keys, p.D);
          if (kMatrixUnits<T> && n_keys < kBlockN)  // the column a pair-aligned K may read past Nk
            for (int64_t d = 0; d < p.D; ++d) kT_own[d * kBlockN + n_keys] = T(0);
        }
        for_each_q_tile(p, b, h, j0, j1, [&](int64_t i0, int64_t i1) {
          const int64_t M = i1 - i0;
          // Only the key rows [r0, r1) of the tile that some query of [i0, i1) sees: under a
          // window the query tile's key band is narrower than the key tile (w = 128: 320 of
          // the 512 (key, query-tile) rows of a 256-key tile), and the rows outside it have
          // P = 0, so they add nothing to dV, dK or dQ.
          const auto [band_lo, band_hi] = key_band(p, i0, i1);
          const int64_t r0 = std::max(j0, band_lo), r1 = std::min(j1, band_hi), N = r1 - r0;
          if (N <= 0) return;
          const T* k_t = k + (bhk * p.Nk + r0) * p.D;   // [N, D]
          const T* v_t = v + (bhk * p.Nk + r0) * p.Dv;  // [N, Dv]
          A* dk_rows = dk_acc.data() + (r0 - j0) * p.D;   // [N, D]
          A* dv_rows = dv_acc.data() + (r0 - j0) * p.Dv;  // [N, Dv]
          const QTile qtile = q_tiles(i0 / kBlockM);  // the query tile holding [i0, i1)
          const int64_t ic = i0 % kBlockM;  // the piece's first column in the tile
          gemm_packed<T>(N, M, p.D, k_t, p.D, qtile.qT, ic, kBlockM, st.data(), kBlockM);     // Sᵀ = K Qᵀ
          gemm_packed<T>(N, M, p.Dv, v_t, p.Dv, qtile.doT, ic, kBlockM, dpt.data(), kBlockM);  // dPᵀ = V dOᵀ
          const bool masked = (padded && padding_cuts(p, b, r0, r1)) || window_cuts(p, i0, i1, r0, r1);
          const int64_t g0 = r0 >> 4;
          if (md.dropout)  // bytes of key row j at row j - 16 g0, query column i at i - i0
            common::philox_key_tile(keybytes.data(), kBlockM, md.key, uint32_t(bh), g0, ((r1 - 1) >> 4) - g0 + 1, i0,
                                    M);
          if (md.bias) load_bias_tile_t(md, b, h, i0, M, r0, N, bias_t.data(), kBlockM, bias_stage.data());
          for (int64_t r = 0; r < N; ++r) {  // Pᵀ (in float, and rounded on the matrix units)
            A* row = st.data() + r * kBlockM;
            T* low = a_buf + r * kLowpLd;
            if (fcap) {
              p_row_softcap_bwd<T>(row, M, scale * md.inv_cap, md.cap, scale, lse_h + i0, low, i0,
                                   tanh_t.data() + r * kBlockM);
            } else {
              if (logits)  // key j = r0 + r over queries i0 + c: ALiBi distance i0 + c + off - j, bias stride si
                modify_logits(md, row, M, scale, md.slope(b, h, p.Hq), A(i0 + p.off - r0 - r), A(1),
                              md.bias_at(b, h, i0, r0 + r), md.si,
                              md.cap > A(0) ? tanh_t.data() + r * kBlockM : static_cast<A*>(nullptr),
                              bias_tmp.data(), md.bias ? bias_t.data() + r * kBlockM : nullptr);
              // A cut tile without modifiers: the exp only on the 16-query blocks that hold the
              // key's own queries (w = 128: a fifth of the columns are outside); the mask below
              // zeroes the rest. Block-aligned: same pair parity, no extra scalar tail.
              int64_t ca = 0, ce = M;
              if (masked && !logits) {
                const auto [qa, qe] = key_queries(p, b, r0 + r, i0, i1);
                ca = qa == qe ? 0 : (qa - i0) & ~int64_t(15);
                ce = qa == qe ? 0 : std::min<int64_t>(M, (qe - i0 + 15) & ~int64_t(15));
              }
              if (ca < ce) p_row_bwd<T>(row + ca, ce - ca, logits ? A(1) : scale, lse_h + i0 + ca, low + ca, i0 + ca);
              if constexpr (kMatrixUnits<T>) {  // the pair padding columns, which a partial call does not write
                const int64_t K = p_cols<T>(i0, i1);
                if (i0 & 1) low[0] = T(0);
                if (i1 - (i0 & ~int64_t(1)) < K) low[K - 1] = T(0);
              }
            }
            if (masked) {
              mask_key_row(p, b, r0 + r, i0, i1, row, A(0));
              if constexpr (kMatrixUnits<T>) mask_key_row(p, b, r0 + r, i0, i1, low + (i0 & 1), T(0));
            }
            if (md.dropout) {  // dV reads P ∘ keep; dP ∘ keep / (1 - p); dS keeps the full P
              const uint8_t* u = keybytes.data() + (r0 + r - 16 * g0) * kBlockM;
              A* dp = dpt.data() + r * kBlockM;
              common::drop_scale_row(dp, dp, u, M, md.threshold, md.keep_scale);
              if constexpr (kMatrixUnits<T>)
                drop_p_row<T>(row, low, i0, u, M, md.threshold);
              else
                common::drop_scale_row(p_kept.data() + r * kBlockM, row, u, M, md.threshold, A(1));
            }
          }
          const A* p_dv = md.dropout && !kMatrixUnits<T> ? p_kept.data() : st.data();
          const int64_t ia = i0 - qtile.base, ie = i1 - qtile.base;  // [i0, i1) in the row operands
          gemm_seq<T>(N, p.Dv, ia, ie, p_dv, kBlockM, qtile.do_rows, a_buf, dv_rows, p.Dv,
                      kMatrixUnits<T>);  // dV += Pᵀ dO (the 1 / (1 - p) of dropout applied once per key tile)
          if (fcap) {
            for (int64_t r = 0; r < N; ++r)
              ds_row_softcap<T>(st.data() + r * kBlockM, dpt.data() + r * kBlockM, M, delta_h + i0,
                                tanh_t.data() + r * kBlockM, a_buf + r * kLowpLd, i0);
          } else if (modified_ds) {
            for (int64_t r = 0; r < N; ++r)  // dbias into the transposed tile, row r = key j0 + r
              ds_row_modified<T>(st.data() + r * kBlockM, dpt.data() + r * kBlockM, M, delta_h + i0, scale,
                                 md.cap > A(0) ? tanh_t.data() + r * kBlockM : nullptr,
                                 md.dbias ? dbias_t.data() + r * kBlockM : nullptr, a_buf + r * kLowpLd,
                                 i0);
            if (md.dbias)  // dbias[b, h, i0 : i1, r0 : r1] = the tile transposed back
              transpose_tile(dbias_t.data(), kBlockM, md.dbias + (bh * p.Nq + i0) * p.Nk + r0, p.Nk, N, M);
          } else {
            for (int64_t r = 0; r < N; ++r)  // dSᵀ (in place in float, or only rounded on the matrix units)
              ds_row_bwd<T>(st.data() + r * kBlockM, dpt.data() + r * kBlockM, M, delta_h + i0, scale,
                            a_buf + r * kLowpLd, i0, tmp_f.data());
          }
          gemm_seq<T>(N, p.D, ia, ie, st.data(), kBlockM, qtile.q_rows, a_buf, dk_rows, p.D,
                      kMatrixUnits<T>);  // dK += dSᵀ Q
          A* dqT_t = dqT_tile(i0 / kBlockM) + i0 % kBlockM;  // [D, M], ld BLOCK_M
          gemm_dqT<T>(p.D, M, r0, r1, i0 & 1, kT_tile, st.data(), a_buf, b_lowp.data(), dqT_t,
                      kBlockM);  // dQᵀ += Kᵀ dSᵀ
        });
        if (md.dropout) scale_row(dv_acc.data(), n_keys * p.Dv, md.keep_scale);
        const int64_t oh = b * out_heads + (p.group > 1 ? h : hk);
        store_grad(dk_acc.data(), dk_out, (oh * p.Nk + j0) * p.D, n_keys * p.D);
        store_grad(dv_acc.data(), dv_out, (oh * p.Nk + j0) * p.Dv, n_keys * p.Dv);
      }
      for (int64_t qt = qt0; qt < qt1; ++qt) {  // the owned tiles, transposed into dq [rows, D]
        if (dq_owner[qt] != c) continue;
        const int64_t rows = std::min(kBlockM, p.Nq - qt * kBlockM);
        transpose_block<A>(dq_own + (qt - own0) * p.D * kBlockM, kBlockM, dk_acc.data(), p.D, p.D,
                           rows);  // [rows, D] (dk_acc is free now)
        store_grad(dk_acc.data(), dq_out, (bh * p.Nq + qt * kBlockM) * p.D, rows * p.D);
      }
    }
    trim_thread_buffer<A, 5>();
    trim_thread_buffer<T, 3>();
    release_gemm<T>();
  });
}

// dq[b, h, i, :] = Σ_c dqT_part[c, b, h, i / BLOCK_M, :, i % BLOCK_M], over the chunks whose
// dq_tiles hold tile i / BLOCK_M, in chunk order (0 where none does), for the tiles no chunk
// owns (dq_tile_owner; backward_kernel wrote the owned ones).
template <typename T>
void gather_dq(const Problem& p, const T* dqT_part, int64_t n_chunks,
               const std::vector<std::pair<int64_t, int64_t>>& dq_tiles, const std::vector<int64_t>& dq_owner,
               const GradOut& dq) {
  const int64_t head = p.nQt * p.D * kBlockM;
  std::vector<int64_t> tiles;  // the query tiles left to gather
  for (int64_t t = 0; t < p.nQt; ++t)
    if (dq_owner[t] < 0) tiles.push_back(t);
  const int64_t nt = int64_t(tiles.size());
  if (nt == 0) return;
  at::parallel_for(0, p.B * p.Hq * nt, grain_for(double(n_chunks) * p.D * kBlockM), [&](int64_t begin, int64_t end) {
    std::vector<T> sum(p.D * kBlockM), rows_t(kBlockM * p.D);  // [D, BLOCK_M], [BLOCK_M, D]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nt, t = tiles[task % nt];
      const int64_t rows = std::min(kBlockM, p.Nq - t * kBlockM);
      const T* part = dqT_part + bh * head + t * p.D * kBlockM;
      bool first = true;
      for (int64_t c = 0; c < n_chunks; ++c) {
        if (t < dq_tiles[c].first || t >= dq_tiles[c].second) continue;
        const T* pc = part + c * p.B * p.Hq * head;
        if (first)
          std::copy(pc, pc + p.D * kBlockM, sum.data());
        else
          for (int64_t e = 0; e < p.D * kBlockM; ++e) sum[e] += pc[e];
        first = false;
      }
      if (first) fill(sum.data(), p.D * kBlockM, T(0));
      for (int64_t r = 0; r < rows; ++r)  // [rows, D]
        for (int64_t d = 0; d < p.D; ++d) rows_t[r * p.D + d] = sum[d * kBlockM + r];
      store_grad(rows_t.data(), dq, (bh * p.Nq + t * kBlockM) * p.D, rows * p.D);
    }
  });
}

// dk[b, hk] = Σ_g part[b, hk·group + g], query heads of the group in order.
// Summed in blocks of kFoldBlock elements in float (T), then stored in out's dtype.
template <typename T>
void fold_group(const Problem& p, const T* part, int64_t width, const GradOut& out) {
  constexpr int64_t kFoldBlock = 4096;
  const int64_t n = p.Nk * width;
  at::parallel_for(0, p.B * p.Hk, grain_for(double(p.group) * n), [&](int64_t begin, int64_t end) {
    std::vector<T> o(std::min(n, kFoldBlock));
    for (int64_t bhk = begin; bhk < end; ++bhk) {
      const int64_t b = bhk / p.Hk, hk = bhk % p.Hk;
      const T* first = part + (b * p.Hq + hk * p.group) * n;
      for (int64_t e0 = 0; e0 < n; e0 += kFoldBlock) {
        const int64_t m = std::min(kFoldBlock, n - e0);
        std::copy(first + e0, first + e0 + m, o.data());
        for (int64_t g = 1; g < p.group; ++g)
          for (int64_t e = 0; e < m; ++e) o[e] += first[g * n + e0 + e];
        store_grad(o.data(), out, bhk * n + e0, m);
      }
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
  Problem p;
  static_cast<common::QKVShape&>(p) = common::check_qkv(op, q, k, v);
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
    prep.kpm = common::check_key_padding_mask(op, *key_padding_mask, p.B, p.Nk);
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

// bf16 / fp16 calls run on the matrix units when this CPU has them (and the
// ATTNKERNELS_CPU_NO_AMX override is off) and the head dims are even (the VNNI
// pairs run along D in Q Kᵀ and dP); otherwise they are upcast to float32 once.
bool on_matrix_units(const Problem& p, at::ScalarType t) {
  return common::matrix_units_available(t) && p.D % 2 == 0 && p.Dv % 2 == 0;
}

// The operand type of the kernels: the input dtype on the matrix units, else float / double.
at::ScalarType operand_type(const Problem& p, at::ScalarType t) {
  return on_matrix_units(p, t) ? t : compute_type(t);
}

bool nonempty(const Problem& p) { return p.Nq > 0 && p.Nk > 0 && p.B > 0 && p.Hq > 0; }

// The modifier arguments of an op, checked (a direct torch.ops call must stay in bounds)
// and converted to the accumulation type ct; the tensors own what Modifiers points to.
struct PreparedModifiers {
  double softcap = 0, dropout_p = 0;
  int64_t seed = 0;
  at::Tensor slopes, bias, sinks;  // undefined when absent
};

PreparedModifiers prepare_modifiers(const char* op, const Problem& p, at::ScalarType ct, double softcap,
                                    const std::optional<at::Tensor>& alibi_slopes,
                                    const std::optional<at::Tensor>& attn_bias, double dropout_p, int64_t seed,
                                    const std::optional<at::Tensor>& sinks = std::nullopt) {
  PreparedModifiers pm;
  if (sinks.has_value()) {
    const at::Tensor& t = *sinks;
    TORCH_CHECK(t.device().is_cpu() && t.is_floating_point(), op, ": sinks must be a floating CPU tensor, got ",
                t.scalar_type(), " on ", t.device());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == p.Hq, op, ": sinks must be (Hq,) = (", p.Hq, ",), got ", t.sizes());
    pm.sinks = t.to(ct).contiguous();
  }
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be a finite float >= 0 (0 = off), got ",
              softcap);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(dropout_p == 0 || common::keep_threshold(dropout_p) > 0, op, ": dropout_p ", dropout_p,
              " rounds to 0 at the 1/256 resolution of the byte keep threshold; use 0 (no dropout) or >= 1/512");
  pm.softcap = softcap;
  pm.dropout_p = dropout_p;
  pm.seed = seed;
  if (alibi_slopes.has_value()) {
    const at::Tensor& s = *alibi_slopes;
    TORCH_CHECK(s.device().is_cpu() && s.is_floating_point(), op, ": alibi_slopes must be a floating CPU tensor, got ",
                s.scalar_type(), " on ", s.device());
    TORCH_CHECK(s.dim() == 2 && s.size(0) == p.B && s.size(1) == p.Hq, op, ": alibi_slopes must be (B, Hq) = (", p.B,
                ", ", p.Hq, "), got ", s.sizes());
    pm.slopes = s.to(ct).contiguous();
  }
  if (attn_bias.has_value()) {
    at::Tensor b = *attn_bias;
    const auto bt = b.scalar_type();
    TORCH_CHECK(b.device().is_cpu() && (bt == at::kFloat || bt == at::kDouble || bt == at::kBFloat16 || bt == at::kHalf),
                op, ": attn_bias must be a float32, float64, bfloat16 or float16 CPU tensor, got ", bt, " on ",
                b.device());
    const int64_t full[4] = {p.B, p.Hq, p.Nq, p.Nk};
    TORCH_CHECK(b.dim() == 4, op, ": attn_bias must be 4-D, broadcastable to (B, Hq, Nq, Nk) = (", p.B, ", ", p.Hq,
                ", ", p.Nq, ", ", p.Nk, "), got shape ", b.sizes());
    for (int64_t d = 0; d < 4; ++d) {
      // An expanded dim (stride 0) is read as the size-1 dim it came from: the dtype
      // conversion below then copies only the bias's own elements.
      if (b.size(d) > 1 && b.stride(d) == 0) b = b.narrow(d, 0, 1);
      TORCH_CHECK(b.size(d) == 1 || b.size(d) == full[d], op, ": attn_bias of sizes ", attn_bias->sizes(),
                  " and strides ", attn_bias->strides(), " does not broadcast to (B, Hq, Nq, Nk) = (", p.B, ", ",
                  p.Hq, ", ", p.Nq, ", ", p.Nk, "): dim ", d, " must be 1 or ", full[d]);
    }
    pm.bias = b;  // read in its own dtype by the kernels: no copy at all
  }
  return pm;
}

template <typename A>
Modifiers<A> make_modifiers(const PreparedModifiers& pm) {
  Modifiers<A> md;
  if (pm.softcap > 0) {
    md.cap = A(pm.softcap);
    md.inv_cap = A(1.0 / pm.softcap);
  }
  if (pm.slopes.defined()) md.slopes = pm.slopes.data_ptr<A>();
  if (pm.sinks.defined()) md.sinks = pm.sinks.data_ptr<A>();
  if (pm.bias.defined()) {
    const at::Tensor& b = pm.bias;
    md.bias = static_cast<const char*>(b.data_ptr());
    md.bias_type = b.scalar_type();
    md.bias_elem = b.element_size();
    auto stride = [&](int64_t d) { return b.size(d) == 1 ? int64_t(0) : b.stride(d); };
    md.sb = stride(0);
    md.sh = stride(1);
    md.si = stride(2);
    md.sj = stride(3);
  }
  if (pm.dropout_p > 0) {
    md.dropout = true;
    md.key = common::philox_key(pm.seed);
    md.threshold = common::keep_threshold(pm.dropout_p);        // p rounded to t / 256
    md.keep_scale = A(common::keep_scale(md.threshold));          // 1 / (1 - t / 256): unbiased for that rate
  }
  return md;
}

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, int64_t window_left, int64_t window_right,
                                                 const std::optional<at::Tensor>& kv_num_blocks,
                                                 const std::optional<at::Tensor>& kv_indices,
                                                 int64_t sparse_block_size,
                                                 const std::optional<at::Tensor>& key_padding_mask, double softcap,
                                                 const std::optional<at::Tensor>& alibi_slopes,
                                                 const std::optional<at::Tensor>& attn_bias, double dropout_p,
                                                 int64_t dropout_seed, const std::optional<at::Tensor>& sinks) {
  const char* op = "attention_fwd";
  Problem p = make_problem(op, q, k, v, window_left, window_right);
  Prepared prep = prepare_masks(op, p, kv_num_blocks, kv_indices, std::nullopt, std::nullopt, sparse_block_size,
                                key_padding_mask, false);
  const PreparedModifiers pm = prepare_modifiers(op, p, compute_type(q.scalar_type()), softcap, alibi_slopes,
                                                 attn_bias, dropout_p, dropout_seed, sinks);
  const bool mu = on_matrix_units(p, q.scalar_type());
  const auto ot = operand_type(p, q.scalar_type());
  const auto at_ = compute_type(q.scalar_type());
  at::Tensor qc = q.to(ot).contiguous();
  at::Tensor kc = k.to(ot).contiguous();
  // float / double: Kᵀ packed [B, Hk, nKt, D, BLOCK_N]; the matrix units pack in the kernel's tasks
  at::Tensor kT = mu ? kc : pack_transposed(kc, kBlockN);
  at::Tensor vc = v.to(ot).contiguous();
  at::Tensor out = at::empty({p.B, p.Hq, p.Nq, p.Dv}, q.options().dtype(ot));
  at::Tensor lse = at::empty({p.B, p.Hq, p.Nq}, q.options().dtype(at_));
  if (nonempty(p)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ot, "attention_fwd", [&] {
      using A = acc_type<scalar_t>;
      forward_kernel<scalar_t>(p, qc.data_ptr<scalar_t>(), kT.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                               A(scale), out.data_ptr<scalar_t>(), lse.data_ptr<A>(), make_modifiers<A>(pm));
    });
  } else {
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    if (pm.sinks.defined() && p.Nq > 0) lse.copy_(pm.sinks.view({1, p.Hq, 1}).expand_as(lse));
  }
  return {out.to(q.scalar_type()), lse};
}

// dbias: the full (B, Hq, Nq, Nk) gradient of attn_bias in the accumulation type when
// bias_grad, else an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& kv_num_blocks, const std::optional<at::Tensor>& kv_indices,
    const std::optional<at::Tensor>& q_num_blocks, const std::optional<at::Tensor>& q_indices,
    int64_t sparse_block_size, const std::optional<at::Tensor>& key_padding_mask, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& attn_bias, double dropout_p,
    int64_t dropout_seed, bool bias_grad) {
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
  const PreparedModifiers pm = prepare_modifiers(op, p, compute_type(q.scalar_type()), softcap, alibi_slopes,
                                                 attn_bias, dropout_p, dropout_seed);
  TORCH_CHECK(!bias_grad || attn_bias.has_value(), op, ": bias_grad needs attn_bias");
  const bool mu = on_matrix_units(p, q.scalar_type());
  const auto ot = operand_type(p, q.scalar_type());
  const auto ct = compute_type(q.scalar_type());
  at::Tensor qc = q.to(ot).contiguous(), kc = k.to(ot).contiguous(), vc = v.to(ot).contiguous();
  at::Tensor doc = dout.to(ot).contiguous();
  // Row operands of dK += dSᵀ Q and dV += Pᵀ dO: VNNI pairs of query rows on the matrix units.
  const bool in_task = packs_in_task(p);
  at::Tensor q_rows = mu && !in_task ? common::vnni_rows(qc) : qc;
  at::Tensor do_rows = mu && !in_task ? common::vnni_rows(doc) : doc;
  // [B, Hq, nQt, D, BLOCK_M], [B, Hq, nQt, Dv, BLOCK_M] and kT below: undefined when the kernel packs
  // them itself (packs_in_task).
  at::Tensor qT, doT, kT;
  if (!in_task) {
    qT = mu ? common::vnni_transposed_tiles(qc, kBlockM) : pack_transposed(qc, kBlockM);
    doT = mu ? common::vnni_transposed_tiles(doc, kBlockM) : pack_transposed(doc, kBlockM);
  }
  // [B, Hk, nKt, D, BLOCK_N], plain: dQᵀ's A operand. In float its GEMM reads only the tile's real
  // keys (K = j1 - j0, gemm_dqT), so the tail past Nk is left unwritten: at Nk = 16 zeroing it was
  // 240 of each head's 256 columns, ~half the C++ backward's time (perf, B1 H8 D64, 1 thread). The
  // matrix units' pair-aligned K may read one column past Nk: that path keeps the zeros.
  if (!in_task)
    kT = kc.scalar_type() == at::kFloat ? common::transposed_tiles_f32(kc, kBlockN, /*zero_tail=*/false)
                                        : pack_transposed(kc, kBlockN);
  const auto acc_opts = q.options().dtype(ct);
  const auto grad_opts = q.options();  // dq, dk, dv in the input dtype (store_grad rounds them)
  at::Tensor dq = at::empty({p.B, p.Hq, p.Nq, p.D}, grad_opts), dk = at::empty({p.B, p.Hk, p.Nk, p.D}, grad_opts),
             dv = at::empty({p.B, p.Hk, p.Nk, p.Dv}, grad_opts);
  // Without a window or tables every tile is visited and every element written; otherwise
  // zeros, for the tiles no query tile sees.
  const bool every_tile = !p.kv_num && p.left < 0 && p.right < 0 && nonempty(p);
  at::Tensor dbias = !bias_grad  ? at::empty({0}, acc_opts)
                     : every_tile ? at::empty({p.B, p.Hq, p.Nq, p.Nk}, acc_opts)
                                  : at::zeros({p.B, p.Hq, p.Nq, p.Nk}, acc_opts);
  if (nonempty(p)) {
    // lse_use: +inf where a row sees nothing, so exp(s - lse_use) is 0 there, never NaN.
    // delta: rowsum(dO ∘ O) [B, Hq, Nq], in a fixed order per row, in the accumulation type.
    at::Tensor lse_use = lse.to(ct).contiguous().clone();
    // out and dout as they come (bf16 rows converted one at a time below, exactly: no float copies).
    at::Tensor outc = out.scalar_type() == ct || out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf
                          ? out.contiguous()
                          : out.to(ct).contiguous();
    at::Tensor doacc = ot == ct ? doc : dout.to(outc.scalar_type()).contiguous();  // (the upcast path converted it)
    at::Tensor delta = at::empty({p.B, p.Hq, p.Nq}, acc_opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ot, "attention_bwd", [&] {
      using A = acc_type<scalar_t>;
      A* lu = lse_use.data_ptr<A>();
      A* dl = delta.data_ptr<A>();
      const int64_t rows = p.B * p.Hq * p.Nq, Dv = p.Dv;
      at::parallel_for(0, rows, grain_for(2.0 * Dv), [&](int64_t begin, int64_t end) {
        // Row r of out / dout in A: the tensor's own row, or a 16-bit row converted into these.
        std::vector<A> o_row, g_row;
        auto row_of = [&](const at::Tensor& t, std::vector<A>& buf, int64_t r) -> const A* {
          const auto st = t.scalar_type();
          if (st == c10::CppTypeToScalarType<A>::value) return t.const_data_ptr<A>() + r * Dv;
          buf.resize(Dv);
          if (st == at::kBFloat16) {
            at::vec::convert(t.const_data_ptr<at::BFloat16>() + r * Dv, buf.data(), Dv);
          } else {
            TORCH_INTERNAL_ASSERT(st == at::kHalf);
            at::vec::convert(t.const_data_ptr<at::Half>() + r * Dv, buf.data(), Dv);
          }
          return buf.data();
        };
        for (int64_t r = begin; r < end; ++r) {
          const A* o = row_of(outc, o_row, r);
          const A* g = row_of(doacc, g_row, r);
          if (lu[r] == -std::numeric_limits<A>::infinity()) lu[r] = std::numeric_limits<A>::infinity();
          // In vectors (a scalar sum is one FMA latency per element); a fixed order per Dv.
          using Vec = at::vec::Vectorized<A>;
          Vec va(A(0));
          int64_t c = 0;
          for (; c + Vec::size() <= Dv; c += Vec::size())
            va = at::vec::fmadd(Vec::loadu(o + c), Vec::loadu(g + c), va);
          A acc = common::hsum<A>(va);
          for (; c < Dv; ++c) acc += o[c] * g[c];
          dl[r] = acc;
        }
      });
      Modifiers<A> md = make_modifiers<A>(pm);
      if (bias_grad) md.dbias = dbias.data_ptr<A>();
      const int64_t n_chunks = backward_chunks(p, p.nKt);
      const auto dq_tiles = dq_chunk_tiles(p, n_chunks);
      const auto dq_owner = dq_tile_owner(p, dq_tiles);
      at::Tensor dqT_part = at::empty({n_chunks, p.B, p.Hq, p.nQt, p.D, kBlockM}, acc_opts);
      at::Tensor dk_part = p.group > 1 ? at::empty({p.B, p.Hq, p.Nk, p.D}, acc_opts) : dk;
      at::Tensor dv_part = p.group > 1 ? at::empty({p.B, p.Hq, p.Nk, p.Dv}, acc_opts) : dv;
      auto grad_out = [](at::Tensor& t) { return GradOut{t.data_ptr(), t.scalar_type()}; };
      auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
      backward_kernel<scalar_t>(p, q_rows.data_ptr<scalar_t>(), ptr(qT), kc.data_ptr<scalar_t>(), ptr(kT),
                                vc.data_ptr<scalar_t>(), do_rows.data_ptr<scalar_t>(), ptr(doT), lu, dl, A(scale),
                                n_chunks, dq_tiles, dq_owner,
                                dqT_part.data_ptr<A>(), grad_out(dq), grad_out(dk_part), grad_out(dv_part), md);
      gather_dq<A>(p, dqT_part.data_ptr<A>(), n_chunks, dq_tiles, dq_owner, grad_out(dq));
      if (p.group > 1) {
        fold_group<A>(p, dk_part.data_ptr<A>(), p.D, grad_out(dk));
        fold_group<A>(p, dv_part.data_ptr<A>(), p.Dv, grad_out(dv));
      }
    });
  } else {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  return {dq, dk, dv, dbias};
}

// Which GEMM engine a softmax call of `dtype` runs on, for `python -m attnkernels` and the
// tests: "amx-bf16" / "amx-fp16" (16-bit operands on the tile units, float accumulation),
// "avx512-bf16" (the same operands on AVX512-BF16's vdpbf16ps, CPUs without AMX), "fp32-upcast"
// (bf16 / fp16 converted to float32 at entry), "fp32-brgemm", "fp64-vector".
// Assumes even head dims (odd ones take the upcast path).
std::string gemm_path(std::string dtype) {
  if (dtype == "bfloat16" || dtype == "float16") {
    const auto t = dtype == "bfloat16" ? at::kBFloat16 : at::kHalf;
    if (common::tile_units_available(t)) return dtype == "bfloat16" ? "amx-bf16" : "amx-fp16";
    if (common::matrix_units_available(t)) return "avx512-bf16";
    return "fp32-upcast";
  }
  if (dtype == "float32") return "fp32-brgemm";
  if (dtype == "float64") return "fp64-vector";
  TORCH_CHECK(false, "gemm_path: dtype must be 'bfloat16', 'float16', 'float32' or 'float64', got '", dtype, "'");
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
      "Tensor? kv_num_blocks, Tensor? kv_indices, int sparse_block_size, Tensor? key_padding_mask, "
      "float softcap=0., Tensor? alibi_slopes=None, Tensor? attn_bias=None, float dropout_p=0., "
      "int dropout_seed=0, Tensor? sinks=None) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
      "int window_left, int window_right, Tensor? kv_num_blocks, Tensor? kv_indices, Tensor? q_num_blocks, "
      "Tensor? q_indices, int sparse_block_size, Tensor? key_padding_mask, float softcap=0., "
      "Tensor? alibi_slopes=None, Tensor? attn_bias=None, float dropout_p=0., int dropout_seed=0, "
      "bool bias_grad=False) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  // No tensor inputs: registered as catch-all kernels (nothing to dispatch on).
  m.def("attention_kv_block_ranges(int q_len, int kv_len, int window_left, int window_right) -> Tensor",
        &attention_kv_block_ranges);
  m.def("attention_q_block_ranges(int q_len, int kv_len, int window_left, int window_right) -> Tensor",
        &attention_q_block_ranges);
  m.def("attention_tile_sizes() -> int[]", &attention_tile_sizes);
  m.def("gemm_path(str dtype='bfloat16') -> str", &gemm_path);
}

TORCH_LIBRARY_IMPL(ATTNKERNELS_NS, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

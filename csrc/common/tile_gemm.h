// Tile GEMMs, row-major C[M, N] (+)= A[M, K] · B[K, N], shared by both kernel families.
//
// tile_gemm<T> picks the engine by type:
//   * float: at::native::cpublas::brgemm, oneDNN's brgemm micro-kernel (JIT for
//     the shape, cached); single-threaded and deterministic per shape;
//   * double: brgemm has no double overload and the cpublas gemm stub does not
//     link from an extension, so float64 (the gradcheck / oracle path) runs the
//     register-tiled loop below.
// register_gemm<T> is that loop, for any vectorisable T. It also serves the
// linear kernels' triangular intra-chunk products in float: it can skip the
// zero triangle of A or of C (Tri), which a dense brgemm call cannot, and on
// their 64-row chunks that halves the work (measured in csrc/linear.cpp).
// vnni_gemm is the bf16 / fp16 engine: the matrix units (AMX) where the CPU has them, else for
// bf16 AVX512-BF16's vdpbf16ps on the same VNNI operands (dpbf16_gemm, below).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/ns.h"
#include "common/row_math.h"

ATTNKERNELS_COMMON_BEGIN

// Triangular structure a GEMM can exploit, in (row, column) of its matrix:
// Lower = zero above the diagonal (column > row), Upper = zero below it.
enum class Tri { None, Lower, Upper };

// Register tile of RM rows x NV vectors: the B strip of a column block stays in
// L1 while the rows stream past it. kTail: the block is one partial vector of
// `tail` lanes (masked loads and stores). kTransA: A is given transposed, element
// (r, p) at A[p * lda + r] (register_gemm_at).
template <typename T, int RM, int NV, bool kTail, bool kTransA = false>
inline void register_tile(int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                          bool accumulate, int64_t tail) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  static_assert(!kTail || NV == 1, "a tail block is one vector wide");
  Vec acc[RM][NV];
  for (int r = 0; r < RM; ++r)
    for (int v = 0; v < NV; ++v) {
      if (!accumulate)
        acc[r][v] = Vec(T(0));
      else
        acc[r][v] = kTail ? Vec::loadu(C + r * ldc, tail) : Vec::loadu(C + r * ldc + v * W);
    }
  for (int64_t p = 0; p < k; ++p) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = kTail ? Vec::loadu(B + p * ldb, tail) : Vec::loadu(B + p * ldb + v * W);
    for (int r = 0; r < RM; ++r) {
      const Vec a(kTransA ? A[p * lda + r] : A[r * lda + p]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < RM; ++r)
    for (int v = 0; v < NV; ++v) {
      if (kTail)
        acc[r][v].store(C + r * ldc, tail);
      else
        acc[r][v].store(C + r * ldc + v * W);
    }
}

constexpr int kRegisterRows = 6;  // 6 x 2 accumulators + 2 B vectors + 1 broadcast fit in 16 AVX2 registers

template <typename T, int NV, bool kTail, bool kTransA = false>
inline void register_row_tile(int64_t rm, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                              int64_t ldc, bool accumulate, int64_t tail) {
  static_assert(kRegisterRows == 6, "register_row_tile dispatches up to 6 rows");
  switch (rm) {
    case 6: register_tile<T, 6, NV, kTail, kTransA>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    case 5: register_tile<T, 5, NV, kTail, kTransA>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    case 4: register_tile<T, 4, NV, kTail, kTransA>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    case 3: register_tile<T, 3, NV, kTail, kTransA>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    case 2: register_tile<T, 2, NV, kTail, kTransA>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    case 1: register_tile<T, 1, NV, kTail, kTransA>(k, A, lda, B, ldb, C, ldc, accumulate, tail); break;
    default: break;
  }
}

// Columns [j, j + width) of C, row tiles of kRegisterRows. a_tri: A's zeros bound the
// k range of a row tile. c_tri: row tiles of C entirely in its zero triangle are
// not computed at all (left for the caller's mask to zero).
template <typename T, int NV, bool kTail, bool kTransA = false>
inline void register_column_block(int64_t m, int64_t j, int64_t width, int64_t k, const T* A, int64_t lda,
                                  const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate, Tri a_tri,
                                  Tri c_tri) {
  for (int64_t i = 0; i < m; i += kRegisterRows) {
    const int64_t rm = std::min<int64_t>(kRegisterRows, m - i);
    if (c_tri == Tri::Lower && j > i + rm - 1) continue;    // every column > every row
    if (c_tri == Tri::Upper && j + width - 1 < i) continue;  // every column < every row
    const int64_t p0 = a_tri == Tri::Upper ? std::min(i, k) : 0;
    const int64_t p1 = a_tri == Tri::Lower ? std::min(k, i + rm) : k;
    const T* a = kTransA ? A + p0 * lda + i : A + i * lda + p0;
    register_row_tile<T, NV, kTail, kTransA>(rm, std::max<int64_t>(0, p1 - p0), a, lda, B + p0 * ldb + j, ldb,
                                             C + i * ldc + j, ldc, accumulate, width);
  }
}

// kTransA: A given transposed, C[m, n] (+)= Aᵀ · B for A stored [k, m] (lda >= m), a_tri
// describing the product's operand Aᵀ (register_gemm_at).
template <typename T, bool kTransA = false>
void register_gemm(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                   int64_t ldc, bool accumulate, Tri a_tri = Tri::None, Tri c_tri = Tri::None) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  if (m == 0 || n == 0) return;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W)
    register_column_block<T, 2, false, kTransA>(m, j, 2 * W, k, A, lda, B, ldb, C, ldc, accumulate, a_tri, c_tri);
  for (; j + W <= n; j += W)
    register_column_block<T, 1, false, kTransA>(m, j, W, k, A, lda, B, ldb, C, ldc, accumulate, a_tri, c_tri);
  if (j < n)
    register_column_block<T, 1, true, kTransA>(m, j, n - j, k, A, lda, B, ldb, C, ldc, accumulate, a_tri, c_tri);
}

// register_gemm with A given transposed. The linear causal backward's Aᵀ·dN and P2ᵀ·Q̃ read the
// triangles as pass 1 computed them, with no transpose pass and no transposed copy.
template <typename T>
void register_gemm_at(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate, Tri a_tri = Tri::None, Tri c_tri = Tri::None) {
  register_gemm<T, true>(m, n, k, A, lda, B, ldb, C, ldc, accumulate, a_tri, c_tri);
}

// C[M, N] (+)= A[M, K] · B[K, N], all row-major with leading dimensions lda, ldb, ldc.
template <typename T>
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate) {
  register_gemm<T>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

template <>
inline void tile_gemm<float>(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

// ---------------------------------------------------------------------------
// 16-bit operands, float accumulation: AMX-BF16 / AMX-FP16, or AVX512-BF16 for bf16
// ---------------------------------------------------------------------------
// Whether ATTNKERNELS_CPU_NO_AMX is set to a non-empty value other than "0": every 16-bit
// engine off, bf16 / fp16 upcast to float32 (read at every call, so tests can cover that path).
inline bool matrix_units_disabled_by_env() {
  const char* v = std::getenv("ATTNKERNELS_CPU_NO_AMX");
  return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
}

// The tile units proper (AMX): oneDNN's brgemm runs 16-bit operands on them (cpublas::could_pack).
inline bool tile_units_present(at::ScalarType t) {
  static const bool bf16 = at::native::cpublas::could_pack(at::kBFloat16);
  static const bool fp16 = at::native::cpublas::could_pack(at::kHalf);
  return t == at::kBFloat16 ? bf16 : t == at::kHalf ? fp16 : false;
}

// The tile units, for code that issues tile instructions itself (the decode step).
inline bool tile_units_available(at::ScalarType t) { return !matrix_units_disabled_by_env() && tile_units_present(t); }

#ifdef ATTNKERNELS_NATIVE_BF16
// bf16 without AMX, on CPUs with AVX512-BF16 (Zen 4 / Zen 5, Cooper Lake): vdpbf16ps takes a
// VNNI pair of A (one 32-bit word, broadcast) against 16 columns of B's pair row and adds both
// products into 16 float lanes, so the layouts the tile units read serve it unchanged.
// Register tile: RM rows x NV vectors of 16 columns (12 x 2 = 24 accumulators + 2 B vectors +
// 1 broadcast of the 32 zmm registers). Measured here (AMD EPYC, family 26, 1 thread, operands
// in L1, M=96): K=64 N=256 (a QKᵀ tile) 329 GFLOP/s, K=256 N=64 (P·V) 417, against 198-220 for
// the float32 register loop on the same shapes; 6 x 4 tiles: 288 / 412.
constexpr int kDpRows = 12;

template <int RM, int NV, bool kTail>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void dpbf16_tile(
    int64_t pairs, const at::BFloat16* A, int64_t lda, const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
    bool accumulate, __mmask16 tail) {
  static_assert(!kTail || NV == 1, "a tail block is one vector wide");
  __m512 acc[RM][NV];
  for (int r = 0; r < RM; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = !accumulate ? _mm512_setzero_ps()
                  : kTail     ? _mm512_maskz_loadu_ps(tail, C + r * ldc)
                              : _mm512_loadu_ps(C + r * ldc + 16 * v);
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i b[NV];  // pair row p, columns [16 v, 16 v + 16): (B[2p, n], B[2p + 1, n]) per word
    for (int v = 0; v < NV; ++v)
      b[v] = kTail ? _mm512_maskz_loadu_epi32(tail, B + p * ldb) : _mm512_loadu_si512(B + p * ldb + 16 * v);
    for (int r = 0; r < RM; ++r) {
      int32_t w;  // (A[r, 2p], A[r, 2p + 1]), the pair vdpbf16ps multiplies into each word of b
      std::memcpy(&w, A + r * lda + 2 * p, sizeof(w));
      const __m512i a = _mm512_set1_epi32(w);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
  for (int r = 0; r < RM; ++r)
    for (int v = 0; v < NV; ++v) {
      if (kTail)
        _mm512_mask_storeu_ps(C + r * ldc, tail, acc[r][v]);
      else
        _mm512_storeu_ps(C + r * ldc + 16 * v, acc[r][v]);
    }
}

// One tile of 1 .. kDpRows rows.
template <int NV, bool kTail>
inline void dpbf16_rows(int64_t rows, int64_t pairs, const at::BFloat16* A, int64_t lda, const uint32_t* B, int64_t ldb,
                        float* C, int64_t ldc, bool accumulate, __mmask16 tail) {
  switch (rows) {  // static_assert below: cases 1 .. kDpRows
    case 12: return dpbf16_tile<12, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    case 11: return dpbf16_tile<11, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    case 10: return dpbf16_tile<10, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    case 9: return dpbf16_tile<9, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    case 8: return dpbf16_tile<8, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    case 7: return dpbf16_tile<7, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    case 6: return dpbf16_tile<6, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    case 5: return dpbf16_tile<5, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    case 4: return dpbf16_tile<4, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    case 3: return dpbf16_tile<3, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    case 2: return dpbf16_tile<2, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    case 1: return dpbf16_tile<1, NV, kTail>(pairs, A, lda, B, ldb, C, ldc, accumulate, tail);
    default: return;
  }
  static_assert(kDpRows == 12, "the switch above covers 1 .. kDpRows rows");
}

// The row tiles of an M-row product, f(first row, rows) each: full tiles, then the rest.
// (Tried: the rest of 1 .. 5 rows merged with the full tile before it into two tiles of 6 .. 9
// rows, so that each holds at least 12 accumulators. perf of a bf16 FAVOR+ fwd+bwd, whose 64- and
// 256-row products end in 4 rows, showed the 4-row tile taking about the time per row of the
// 12-row ones, and the change gained nothing measurable: Zen 5, 1 thread.)
template <typename F>
inline void dpbf16_row_tiles(int64_t M, F&& f) {
  int64_t i = 0;
  for (; i + kDpRows <= M; i += kDpRows) f(i, int64_t(kDpRows));
  if (i < M) f(i, M - i);
}

// vnni_gemm's contract (below) on vdpbf16ps: C[M, N] float (+)= A[M, K] · B[K, N], K even.
// Without triangle hints, column blocks of 32 (then 16, then a masked tail) outer, so B's strip
// stays in L1 while the row tiles stream past it. With them, row tiles outer, each skipping what
// a triangle leaves out, as register_gemm does in fp32 (the linear kernels' intra-chunk products):
// a_tri Lower (A[i, p] = 0 for p > i) ends a tile's k range at its last row, Upper (0 for p < i)
// starts it at its first; c_tri Lower computes only the column blocks that reach the tile's
// diagonal (the caller masks the rest of C's zero triangle).
inline void dpbf16_gemm(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda,
                        const at::BFloat16* B, int64_t ldb, float* C, int64_t ldc, bool accumulate,
                        Tri a_tri = Tri::None, Tri c_tri = Tri::None) {
  if (M == 0 || N == 0) return;
  const int64_t pairs = K / 2;
  const uint32_t* Bw = reinterpret_cast<const uint32_t*>(B);  // word (p, n) at Bw[p * ldb + n]
  const __mmask16 tail = static_cast<__mmask16>((1u << (N % 16)) - 1);
  if (a_tri == Tri::None && c_tri == Tri::None) {
    int64_t j = 0;
    for (; j + 32 <= N; j += 32)
      dpbf16_row_tiles(M, [&](int64_t i, int64_t r) {
        dpbf16_rows<2, false>(r, pairs, A + i * lda, lda, Bw + j, ldb, C + i * ldc + j, ldc, accumulate, 0);
      });
    for (; j + 16 <= N; j += 16)
      dpbf16_row_tiles(M, [&](int64_t i, int64_t r) {
        dpbf16_rows<1, false>(r, pairs, A + i * lda, lda, Bw + j, ldb, C + i * ldc + j, ldc, accumulate, 0);
      });
    if (j < N)
      dpbf16_row_tiles(M, [&](int64_t i, int64_t r) {
        dpbf16_rows<1, true>(r, pairs, A + i * lda, lda, Bw + j, ldb, C + i * ldc + j, ldc, accumulate, tail);
      });
    return;
  }
  dpbf16_row_tiles(M, [&](int64_t i, int64_t r) {
    int64_t p0 = 0, p1 = pairs;
    if (a_tri == Tri::Lower) p1 = std::min(pairs, (i + r + 1) / 2);
    if (a_tri == Tri::Upper) p0 = std::min(pairs, i / 2);
    const int64_t cols = c_tri == Tri::Lower ? std::min(N, i + r) : N;  // columns j <= the tile's last row
    const at::BFloat16* Ai = A + i * lda + 2 * p0;
    const uint32_t* Bp = Bw + p0 * ldb;
    float* Ci = C + i * ldc;
    int64_t j = 0;
    for (; j < cols && j + 32 <= N; j += 32)
      dpbf16_rows<2, false>(r, p1 - p0, Ai, lda, Bp + j, ldb, Ci + j, ldc, accumulate, 0);
    for (; j < cols && j + 16 <= N; j += 16)
      dpbf16_rows<1, false>(r, p1 - p0, Ai, lda, Bp + j, ldb, Ci + j, ldc, accumulate, 0);
    if (j < cols) dpbf16_rows<1, true>(r, p1 - p0, Ai, lda, Bp + j, ldb, Ci + j, ldc, accumulate, tail);
  });
}

inline bool dpbf16_present() { return bf16_native_ok(); }
#else
inline bool dpbf16_present() { return false; }
#endif

// C[M, N] float (+)= A[M, K] · B[K, N] with A row-major (lda) in T = BFloat16 or
// Half and B in the VNNI layout the tile units read: pairs of K rows interleaved,
// element (k, n) at B[(k / 2) * 2 * ldb + 2 * n + k % 2], so a column offset c is
// a pointer offset 2c and ldb may be any value >= N (checked on this CPU: 16..256,
// odd offsets). K must be even: callers pad a pair with a zero row. Runs on the tile
// units where present, else (bf16) on vdpbf16ps; callers check matrix_units_available.
// a_tri / c_tri (dpbf16_gemm's triangle hints) only save work on vdpbf16ps: the tile units
// compute the whole product (the zero triangle's operands are zeros; callers mask C's).
template <typename T>
inline void vnni_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, float* C,
                      int64_t ldc, bool accumulate, Tri a_tri = Tri::None, Tri c_tri = Tri::None) {
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>)
    if (!tile_units_present(at::kBFloat16))
      return dpbf16_gemm(M, N, K, A, lda, B, ldb, C, ldc, accumulate, a_tri, c_tri);
#endif
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/true);
}

// Give the tile registers back (AMX keeps per-thread tile state); after a sequence of
// vnni_gemm calls, on the thread that made them. Nothing to give back on vdpbf16ps.
inline void vnni_release() {
  if (tile_units_present(at::kBFloat16) || tile_units_present(at::kHalf))
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
}

// Whether vnni_gemm runs 16-bit operands of type t: bf16 on AMX or AVX512-BF16, fp16 on
// AMX-FP16; false under ATTNKERNELS_CPU_NO_AMX (the kernels then upcast to float32).
inline bool matrix_units_available(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  if (matrix_units_disabled_by_env()) return false;
  return tile_units_present(t) || (t == at::kBFloat16 && dpbf16_present());
}

// The packers below run once per call on O(N·D) data, as plain word loops split over
// threads: torch's strided copy of the equivalent transposed views ran them at ~1 ns an
// element (12% of a bf16 (256, 256) window forward at N = 2048, 1 thread).
inline int64_t pack_grain(int64_t words_per_task) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, words_per_task));
}

// x [..., R, C] (16-bit, C even) -> VNNI pairs of rows [..., ceil(R / 2), C, 2], a zero row
// padding odd R: word c of pair row p is x[2p][c] | x[2p + 1][c] << 16.
inline at::Tensor vnni_rows(const at::Tensor& x) {
  TORCH_INTERNAL_ASSERT(x.element_size() == 2 && x.dim() >= 2);
  const at::Tensor xc = x.contiguous();
  const int64_t R = x.size(-2), C = x.size(-1), pairs = (R + 1) / 2, lead = R * C == 0 ? 0 : x.numel() / (R * C);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 2);
  out_shape.insert(out_shape.end(), {pairs, C, 2});
  at::Tensor out = at::empty(out_shape, x.options());
  const uint16_t* src = static_cast<const uint16_t*>(xc.data_ptr());
  uint32_t* dst = static_cast<uint32_t*>(out.data_ptr());
  at::parallel_for(0, lead * pairs, pack_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = i / pairs, pr = i % pairs;
      const uint16_t* lo = src + (l * R + 2 * pr) * C;
      uint32_t* d = dst + i * C;
      if (2 * pr + 1 < R) {
        const uint16_t* hi = lo + C;
        for (int64_t c = 0; c < C; ++c) d[c] = uint32_t(lo[c]) | (uint32_t(hi[c]) << 16);
      } else {
        for (int64_t c = 0; c < C; ++c) d[c] = uint32_t(lo[c]);
      }
    }
  });
  return out;
}

// src [BH, n, W] 32-bit words -> dst [BH, nT, W, tile]: per tile of `tile` rows the words
// transposed, zero past n (left unwritten when !zero_tail: for a reader that never reads
// past n). at::vec's float transpose (16 x 16 register blocks) moves the words as float bit
// patterns: loads, shuffles and stores only, so every bit pattern is kept.
inline void transpose_word_tiles(const uint32_t* src, uint32_t* dst, int64_t BH, int64_t n, int64_t W, int64_t tile,
                                 bool zero_tail = true) {
  const int64_t n_tiles = (n + tile - 1) / tile;
  at::parallel_for(0, BH * n_tiles, pack_grain(W * tile), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / n_tiles, t = i % n_tiles, rows = std::min(tile, n - t * tile);
      const uint32_t* s = src + (bh * n + t * tile) * W;  // [rows, W]
      uint32_t* d = dst + i * W * tile;                   // [W, tile]
      at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(s), W, reinterpret_cast<float*>(d), tile,
                                    static_cast<int>(rows), static_cast<int>(W));
      if (zero_tail && rows < tile)
        for (int64_t w = 0; w < W; ++w) std::fill(d + w * tile + rows, d + (w + 1) * tile, uint32_t(0));
    }
  });
}

// x [B, H, N, D] (16-bit, D even) -> per tile of `tile` rows, the transposed tile in VNNI layout:
// [B, H, nT, D / 2, tile, 2], element (d, n) of tile t at [t][d / 2][n][d % 2]; zero past N.
// Each (d, d + 1) pair of a row of x is one 32-bit word, so this is a 32-bit transpose.
inline at::Tensor vnni_transposed_tiles(const at::Tensor& x, int64_t tile) {
  TORCH_INTERNAL_ASSERT(x.element_size() == 2 && x.dim() == 4 && x.size(3) % 2 == 0);
  const at::Tensor xc = x.contiguous();
  const int64_t n = x.size(2), Dw = x.size(3) / 2, n_tiles = (n + tile - 1) / tile;
  at::Tensor out = at::empty({x.size(0), x.size(1), n_tiles, Dw, tile, 2}, x.options());
  transpose_word_tiles(static_cast<const uint32_t*>(xc.data_ptr()), static_cast<uint32_t*>(out.data_ptr()),
                       x.size(0) * x.size(1), n, Dw, tile);
  return out;
}

// One task's own copy of a key range of one head, single-threaded (the forward packs the band
// its query tiles read into an L2-resident buffer, see csrc/softmax.cpp): x [n, D] 16-bit rows
// (D even) -> tiles [t0, t1) of `tile` rows laid out as vnni_transposed_tiles does,
// dst [t1 - t0, D / 2, tile, 2], zero past n.
inline void vnni_transposed_tile_range(const void* x, int64_t n, int64_t D, int64_t tile, int64_t t0, int64_t t1,
                                       void* dst) {
  const int64_t W = D / 2;
  const uint32_t* src = static_cast<const uint32_t*>(x);
  uint32_t* d = static_cast<uint32_t*>(dst);
  for (int64_t t = t0; t < t1; ++t, d += W * tile) {
    const int64_t rows = std::min(tile, n - t * tile);  // [rows, W] words -> [W, tile]
    at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(src + t * tile * W), W, reinterpret_cast<float*>(d),
                                  tile, static_cast<int>(rows), static_cast<int>(W));
    if (rows < tile)
      for (int64_t w = 0; w < W; ++w) std::fill(d + w * tile + rows, d + (w + 1) * tile, uint32_t(0));
  }
}

// The same for rows: x [R, C] 16-bit -> VNNI pair rows [p0, p1) as vnni_rows lays them out,
// dst [p1 - p0, C, 2] (a zero row pads odd R).
inline void vnni_row_pair_range(const void* x, int64_t R, int64_t C, int64_t p0, int64_t p1, void* dst) {
  const uint16_t* src = static_cast<const uint16_t*>(x);
  uint32_t* d = static_cast<uint32_t*>(dst);
  for (int64_t pr = p0; pr < p1; ++pr, d += C) {
    const uint16_t* lo = src + 2 * pr * C;
    if (2 * pr + 1 < R) {
      const uint16_t* hi = lo + C;
      for (int64_t c = 0; c < C; ++c) d[c] = uint32_t(lo[c]) | (uint32_t(hi[c]) << 16);
    } else {
      for (int64_t c = 0; c < C; ++c) d[c] = uint32_t(lo[c]);
    }
  }
}

// x [B, H, N, D] float32 -> [B, H, nT, D, tile], each tile transposed, zero past N (unless !zero_tail).
inline at::Tensor transposed_tiles_f32(const at::Tensor& x, int64_t tile, bool zero_tail = true) {
  TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kFloat && x.dim() == 4);
  const at::Tensor xc = x.contiguous();
  const int64_t n = x.size(2), D = x.size(3), n_tiles = (n + tile - 1) / tile;
  at::Tensor out = at::empty({x.size(0), x.size(1), n_tiles, D, tile}, x.options());
  transpose_word_tiles(reinterpret_cast<const uint32_t*>(xc.data_ptr<float>()),
                       reinterpret_cast<uint32_t*>(out.data_ptr<float>()), x.size(0) * x.size(1), n, D, tile, zero_tail);
  return out;
}

ATTNKERNELS_COMMON_END

// Linear attention on CPU, forward and backward, with the elementwise feature
// maps (elu+1, relu, identity) fused into the chunk loads.
//
// Semantics (see attnkernels/linear/ops.py): with q̃ = φ(scale·q), k̃ = φ(k),
//   out_i = q̃_iᵀ S_i / (q̃_iᵀ z_i + eps),  S_i = S0 + Σ_j k̃_j v_jᵀ,  z_i = z0 + Σ_j k̃_j
// over j ≤ i (causal) or all j; normalize=False drops the denominator.
//
// One trick carries the non-causal kernels: append a column of ones to V. With
// V' = [V | 1] the state S' = [S | z] is a single (M, Dv+1) matrix, the
// numerator and the denominator come out of the same products (the last column
// of q̃ᵀS' is q̃ᵀz), and the backward treats (dnum, dden) as one (Dv+1) row dN'.
// The padded width DvP rounds Dv+1 up to the SIMD width so every GEMM has a
// column count that is a multiple of the vector size (padding columns stay 0).
// The causal kernels, where the V / state products are most of the work, keep z
// apart instead (see "Causal kernels" below): at Dv = 64 the column cost 80 / 64.
//
// Causal runs in chunks of kChunk rows: a masked intra-chunk product plus the
// state carried from the previous chunks; no per-token state is ever built.
// Work is split over (batch, kv head) — all query heads of a GQA group run in
// the task that owns their kv head, so dK/dV need no cross-task reduction and
// results are deterministic (fixed summation order, independent of threads).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "common/checks.h"
#include "common/parallel.h"
#include "common/thread_buffer.h"
#include "common/tile_gemm.h"

namespace {

namespace common = ATTNKERNELS_NS::common;

constexpr int64_t kChunk = 64;

enum class FeatureMap { Elu, Relu, Identity };

FeatureMap parse_feature_map(const std::string& name) {
  if (name == "elu") return FeatureMap::Elu;
  if (name == "relu") return FeatureMap::Relu;
  if (name == "identity") return FeatureMap::Identity;
  TORCH_CHECK(false, "linear_attention: feature_map must be 'elu', 'relu' or 'identity', got '", name, "'");
}

// φ(x): elu(x)+1 = x+1 (x > 0) or exp(x); relu; identity.
template <typename T>
inline T phi(FeatureMap f, T x) {
  switch (f) {
    case FeatureMap::Elu: return x > T(0) ? x + T(1) : std::exp(x);
    case FeatureMap::Relu: return x > T(0) ? x : T(0);
    default: return x;
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------
// GEMMs of a chunk: C[m, n] (+)= A[m, k] · B[k, n], all row-major (common/tile_gemm.h).
// Dense products go through tile_gemm (brgemm for float: measured 1 thread, B1 H8
// N2048 D64, interleaved, 5-17% faster than the register-tiled loop on these
// 64 x 80 x 64 chunk shapes). The masked intra-chunk products are triangular and
// keep the register-tiled loop, which skips half their work (a_tri: zeros of A
// bound the k range; c_tri: row tiles of C in its zero triangle are not computed,
// the caller's mask zeroes them) where a dense brgemm call could not.
using common::Tri;

// Tried, not kept (session 7): on AVX-512, register_gemm with row tiles up to 4 vectors wide (6 x 4
// accumulators of the 32 registers) taking per row tile only the vectors its triangle needs (c_tri:
// 65% of a 64 x 64 C computed instead of 77%; the a_tri / transposed products unchanged in work).
// Bit-identical results; in perf (fp32 causal backward, N = 1024, 1 thread) the register products'
// share against the brgemm products' stayed 0.84 vs 0.81 before, within this host's noise: no gain
// seen, so the shared header was left as it was.
template <typename T>
inline void gemm(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                 int64_t ldc, bool accumulate, Tri a_tri = Tri::None, Tri c_tri = Tri::None) {
  if (m == 0 || n == 0) return;
  if (a_tri == Tri::None && c_tri == Tri::None)
    common::tile_gemm<T>(m, n, k, A, lda, B, ldb, C, ldc, accumulate);
  else
    common::register_gemm<T>(m, n, k, A, lda, B, ldb, C, ldc, accumulate, a_tri, c_tri);
}

// dst[c, r] = src[r, c] for r < rows, c < cols. at::vec's 16 x 16 register-block
// transpose for float (AVX-512); the element loop otherwise. The causal backward
// transposes ~8 chunk-sized blocks per chunk and head: element by element they took
// a quarter of its time (perf, B1 H8 N4096 D64).
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  at::vec::transpose_mxn<T>(src, lds, dst, ldd, static_cast<int>(rows), static_cast<int>(cols));
}

// S[m, n] += A[m, k] · B[k, n], the chunk's product summed on its own first
// (into tmp) and then added: the state is a sum over the whole sequence, and
// adding one 64-term partial sum per chunk instead of one term per token keeps
// its rounding error growing with N/64 rather than N (blocked summation).
template <typename T>
void add_product(int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* S, int64_t lds, T* tmp) {
  gemm(m, n, k, A, lda, B, ldb, tmp, n, false);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) S[i * lds + j] += tmp[i * n + j];
}

#ifdef ATTNKERNELS_NATIVE_BF16
// The roundings of mx_gemm's operands, and of cvt_row's float -> bf16 rows, with AVX512-BF16's
// vcvtne2ps2bf16 (round to nearest even, as at::vec's software rounding, one instruction per 32
// values where that takes ~10 per 16; denormals flush to zero, which bf16 GEMM operands and
// outputs can spare), compiled for this function only and run where the CPU has it
// (common::bf16_native_ok; every CPU with AMX-BF16 does). The software roundings were ~18% of a
// bf16 causal fwd+bwd (perf, N=1024 D=64, 1 thread).
// dst[0, n) = src[0, n) rounded.
__attribute__((target("avx512bf16"))) inline void round_row_bf16(const float* src, int64_t n, at::BFloat16* dst) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(reinterpret_cast<void*>(dst + i), reinterpret_cast<__m512i>(h));
  }
  for (; i < n; i += 16) {
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - i)) - 1);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i));
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(dst + i), m, reinterpret_cast<__m256i>(h));
  }
}
#endif

// dst[0, n) = src[0, n) converted, vectorised both ways between float and a 16-bit type
// (at::vec::convert widens bf16 element by element and rounds the last n % 32 elements of
// a row with the scalar rounding: ~13% of a bf16 fwd+bwd at D = 64 with rows of 80).
template <typename S, typename D>
inline void cvt_row(const S* src, D* dst, int64_t n) {
  using fVec = at::vec::Vectorized<float>;
  constexpr int64_t W = fVec::size();
  if constexpr (std::is_same_v<D, float> && c10::is_reduced_floating_point_v<S>) {
    using hVec = at::vec::Vectorized<S>;
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      const auto [a, b] = at::vec::convert_to_float<S>(hVec::loadu(src + i));
      a.store(dst + i);
      b.store(dst + i + W);
    }
    for (; i < n; i += W) {
      const int64_t r = std::min<int64_t>(W, n - i);
      std::get<0>(at::vec::convert_to_float<S>(hVec::loadu(src + i, r))).store(dst + i, r);
    }
  } else if constexpr (std::is_same_v<S, float> && c10::is_reduced_floating_point_v<D>) {
#ifdef ATTNKERNELS_NATIVE_BF16
    if constexpr (std::is_same_v<D, at::BFloat16>)
      if (common::bf16_native_ok()) return round_row_bf16(src, n, dst);
#endif
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W)
      at::vec::convert_from_float<D>(fVec::loadu(src + i), fVec::loadu(src + i + W)).store(dst + i);
    for (; i < n; i += W) {
      const int64_t r = std::min<int64_t>(W, n - i);
      at::vec::convert_from_float<D>(fVec::loadu(src + i, r), fVec(0.f)).store(dst + i, r);
    }
  } else if constexpr (std::is_same_v<S, D>) {
    std::copy(src, src + n, dst);  // at::vec::convert's element loop took ~4% of the fp32 causal backward
  } else {
    at::vec::convert(src, dst, n);
  }
}

#ifdef ATTNKERNELS_NATIVE_BF16
// dst[2j + t] = rows t = 0, 1 (r1 = nullptr: zeros) at column j < n, rounded: one VNNI pair row.
__attribute__((target("avx512bf16"))) inline void round_pair_bf16(const float* r0, const float* r1, int64_t n,
                                                                   at::BFloat16* dst) {
  // [r0 j..j+15 | r1 j..j+15] -> r0[j] r1[j] r0[j+1] r1[j+1] ...
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t r = std::min<int64_t>(16, n - j);
    const __mmask16 m = static_cast<__mmask16>((1u << r) - 1);
    const __m512 x0 = _mm512_maskz_loadu_ps(m, r0 + j);
    const __m512 x1 = r1 != nullptr ? _mm512_maskz_loadu_ps(m, r1 + j) : _mm512_setzero_ps();
    const __m512i h = _mm512_permutexvar_epi16(idx, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x1, x0)));
    if (r == 16)
      _mm512_storeu_si512(reinterpret_cast<void*>(dst + 2 * j), h);
    else
      _mm512_mask_storeu_epi16(reinterpret_cast<void*>(dst + 2 * j), static_cast<__mmask32>((uint64_t(1) << (2 * r)) - 1), h);
  }
}
#endif

// dst = the VNNI layout [ke / 2, n, 2] of fp32 rows [0, k) of src (ld), rounded to T16, ke = k + k % 2
// (a zero row pads odd k): (src[2p, j], src[2p + 1, j]) adjacent, paired and rounded in one pass (no
// rounded copy of the rows): mx_gemm's B.
template <typename T16>
void round_vnni_pairs(const float* src, int64_t k, int64_t ld, int64_t n, T16* dst) {
  const int64_t ke = k + (k & 1);
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T16, at::BFloat16>) {
    if (common::bf16_native_ok()) {
      for (int64_t p = 0; p < ke / 2; ++p)
        round_pair_bf16(src + 2 * p * ld, 2 * p + 1 < k ? src + (2 * p + 1) * ld : nullptr, n, dst + 2 * p * n);
      return;
    }
  }
#endif
  using fVec = at::vec::Vectorized<float>;
  constexpr int64_t W = fVec::size();
  for (int64_t p = 0; p < ke / 2; ++p) {
    const float* r0 = src + 2 * p * ld;
    const float* r1 = 2 * p + 1 < k ? r0 + ld : nullptr;
    T16* o = dst + 2 * p * n;
    for (int64_t j = 0; j < n; j += W) {
      const int64_t r = std::min<int64_t>(W, n - j);
      const fVec x0 = fVec::loadu(r0 + j, r), x1 = r1 != nullptr ? fVec::loadu(r1 + j, r) : fVec(0.f);
      const auto [lo, hi] = at::vec::interleave2(x0, x1);  // x0[0] x1[0] x0[1] x1[1] ...
      at::vec::convert_from_float<T16>(lo, hi).store(o + 2 * j, 2 * r);
    }
  }
}


// ---------------------------------------------------------------------------
// bf16 inputs on the matrix units (AMX, or AVX512-BF16's vdpbf16ps without it): the same
// products with their fp32 operands rounded to bf16 per call (A row-major, B into the VNNI
// pairs the tile unit reads), fp32 accumulation, through common::vnni_gemm (with the triangle hints for
// the triangular products on vdpbf16ps). The kernels keep every operand, the
// state S', dS' and every sum in fp32 (one template for all dtypes): only the dot's
// inputs are rounded, as FlashAttention rounds P for its PV product. At these chunk
// shapes (64 x 64..80 x 64) the roundings, not the tile unit's product, are the cost
// (perf, bf16 fwd+bwd N=1024 D=64, a first version rounding rows with at::vec::convert:
// rounding ~13%, the AMX brgemm ~17%; the fp32 products took ~48%), which is why each
// operand is rounded in one vector pass. Measured against the fp32
// products on the same bf16 inputs (1 thread, B1 H8 D64 causal): fwd+bwd 1.16-1.17x.
// bf16 only: fp16's range (65504) would overflow the rounded state of a long sequence
// (z = Σ φ(k) grows with N), so fp16 keeps the fp32 products (as FAVOR+ does).
template <typename T16>
void mx_gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, bool accumulate, Tri a_tri = Tri::None, Tri c_tri = Tri::None) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, 0.f);
    return;
  }
  const int64_t ke = k + (k & 1);  // VNNI pairs: an odd K gets a zero column of A / row of B
  // grow-only per-thread scratch: no allocation per product
  thread_local std::vector<T16> a16, b16;
  if (int64_t(a16.size()) < m * ke) a16.resize(m * ke);
  if (int64_t(b16.size()) < ke * n) b16.resize(ke * n);
  for (int64_t i = 0; i < m; ++i) {
    cvt_row(A + i * lda, a16.data() + i * ke, k);  // [m, ke]
    if (k & 1) a16[i * ke + k] = T16(0);
  }
  round_vnni_pairs(B, k, ldb, n, b16.data());  // [ke / 2, n, 2]
  common::vnni_gemm(m, n, ke, a16.data(), ke, b16.data(), n, C, ldc, accumulate, a_tri, c_tri);
}

// gemm / add_product of the non-FAVOR kernels: on the matrix units when mx (bf16 inputs,
// float accumulation type, AMX or AVX512-BF16 available). On AMX the triangular hints are
// unused (the tile unit computes the whole product; the zero triangle's operands are zeros,
// and the callers mask C's); on vdpbf16ps common::dpbf16_gemm skips the triangles as register_gemm.
template <typename T>
inline void gemm(bool mx, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                 int64_t ldc, bool accumulate, Tri a_tri = Tri::None, Tri c_tri = Tri::None) {
  if constexpr (std::is_same_v<T, float>)
    if (mx) return mx_gemm<at::BFloat16>(m, n, k, A, lda, B, ldb, C, ldc, accumulate, a_tri, c_tri);
  gemm(m, n, k, A, lda, B, ldb, C, ldc, accumulate, a_tri, c_tri);
}

// On the matrix units the product accumulates into S in the tile unit's fp32 accumulators:
// at bf16 operands the summation order is far below their rounding (as FAVOR+'s state).
template <typename T>
void add_product(bool mx, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T* S,
                 int64_t lds, T* tmp) {
  if (mx) return gemm(mx, m, n, k, A, lda, B, ldb, S, lds, true);
  gemm(mx, m, n, k, A, lda, B, ldb, tmp, n, false);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) S[i * lds + j] += tmp[i * n + j];
}

// Causal mask of an intra-chunk product. Lower: keep P[i, j] for j <= i
// (row = query). Upper: keep P[j, i] for i >= j (row = key, the transpose).
template <typename T>
void mask_lower(int64_t rows, T* P, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) std::fill(P + i * ld + i + 1, P + (i + 1) * ld, T(0));
}
template <typename T>
void mask_upper(int64_t rows, T* P, int64_t ld) {
  for (int64_t j = 0; j < rows; ++j) std::fill(P + j * ld, P + j * ld + j, T(0));
}

// at::parallel_for grain for items of `work` multiply-adds each: a call with less
// than ~2^18 multiply-adds in all (tens of microseconds) runs on the calling thread.
inline int64_t grain_for(int64_t work) { return common::grain_for(double(work), double(int64_t(1) << 18)); }

// ---------------------------------------------------------------------------
// Geometry of one call: inputs are contiguous (B, H, N, D) / (B, H, N, Dv).
struct Dims {
  int64_t B, Hq, Hk, G, Nq, Nk, D, Dv;
  int64_t MP;   // D rounded up to the vector width (feature columns)
  int64_t DvP;  // Dv + 1 (the ones column) rounded up to the vector width
};

template <typename acc_t>
Dims make_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  Dims d;
  d.B = q.size(0); d.Hq = q.size(1); d.Nq = q.size(2); d.D = q.size(3);
  d.Hk = k.size(1); d.Nk = k.size(2); d.Dv = v.size(3);
  d.G = d.Hq / d.Hk;
  d.MP = round_up(d.D, W);
  d.DvP = round_up(d.Dv + 1, W);
  return d;
}

// out[0, n) = φ(mult · x[0, n)) (out may be x), vectorized (the exp of elu+1 would otherwise
// cost as much as the products at D = 64); exp is common::vexp (exp_u20 for float, as
// the softmax kernels: ~2 ulp, about twice as fast as Sleef's).
template <typename T>
void apply_phi(FeatureMap f, const T* x, T* out, int64_t n, T mult) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec m(mult), one(T(1)), zero(T(0));
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const Vec v = Vec::loadu(x + c) * m;
    const Vec y = f == FeatureMap::Elu ? Vec::blendv(common::vexp(v), v + one, v > zero)
                  : f == FeatureMap::Relu ? at::vec::maximum(v, zero) : v;
    y.store(out + c);
  }
  for (; c < n; ++c) out[c] = phi(f, mult * x[c]);
}

// out[0, n) = φ(mult · x[0, n)) of a 16-bit row widened in registers: one pass, where widening
// into out and mapping it in place stored and reloaded every feature (load_features of bf16 rows:
// cvt_row + apply_phi, ~8% of a bf16 causal fwd+bwd, perf, N = 1024, D = 64).
template <typename S>
void apply_phi_widen(FeatureMap f, const S* x, float* out, int64_t n, float mult) {
  using Vec = at::vec::Vectorized<float>;
  using hVec = at::vec::Vectorized<S>;
  constexpr int64_t W = Vec::size();
  const Vec m(mult), one(1.f), zero(0.f);
  const auto map = [&](Vec v) {
    v = v * m;
    return f == FeatureMap::Elu ? Vec::blendv(common::vexp(v), v + one, v > zero)
           : f == FeatureMap::Relu ? at::vec::maximum(v, zero) : v;
  };
  int64_t c = 0;
  for (; c + 2 * W <= n; c += 2 * W) {
    const auto [lo, hi] = at::vec::convert_to_float<S>(hVec::loadu(x + c));
    map(lo).store(out + c);
    map(hi).store(out + c + W);
  }
  for (; c < n; c += W) {
    const int64_t r = std::min<int64_t>(W, n - c);
    map(std::get<0>(at::vec::convert_to_float<S>(hVec::loadu(x + c, r)))).store(out + c, r);
  }
}

// Features of rows [0, L) of src ([*, D], row stride D) into dst [kChunk, MP]:
// dst = φ(mult · src), zero in the padding rows and columns (φ(0) may be 1, so
// the padding is written explicitly, never mapped). 16-bit rows are widened in apply_phi_widen.
template <typename scalar_t, typename acc_t>
void load_features(const scalar_t* src, int64_t L, const Dims& d, acc_t mult, FeatureMap f, acc_t* dst) {
  for (int64_t i = 0; i < L; ++i) {
    acc_t* o = dst + i * d.MP;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      apply_phi(f, src + i * d.D, o, d.D, mult);  // read where it is: no copy pass
    } else if constexpr (std::is_same_v<acc_t, float> && c10::is_reduced_floating_point_v<scalar_t>) {
      apply_phi_widen(f, src + i * d.D, o, d.D, mult);
    } else {
      cvt_row(src + i * d.D, o, d.D);
      apply_phi(f, static_cast<const acc_t*>(o), o, d.D, mult);
    }
    std::fill(o + d.D, o + d.MP, acc_t(0));
  }
  std::fill(dst + L * d.MP, dst + kChunk * d.MP, acc_t(0));
}

// V' = [V | 1 | 0...] rows [0, L) into dst [kChunk, DvP]; padding rows zero.
template <typename scalar_t, typename acc_t>
void load_values(const scalar_t* src, int64_t L, const Dims& d, acc_t* dst) {
  for (int64_t i = 0; i < L; ++i) {
    const scalar_t* s = src + i * d.Dv;
    acc_t* o = dst + i * d.DvP;
    cvt_row(s, o, d.Dv);
    o[d.Dv] = acc_t(1);
    std::fill(o + d.Dv + 1, o + d.DvP, acc_t(0));
  }
  std::fill(dst + L * d.DvP, dst + kChunk * d.DvP, acc_t(0));
}

// S' [MP, DvP] = [S0 | z0] (or zeros), for kv head (b, g).
template <typename acc_t>
void init_state(const Dims& d, const acc_t* s0, const acc_t* z0, int64_t bg, acc_t* S) {
  std::fill(S, S + d.MP * d.DvP, acc_t(0));
  if (s0 == nullptr) return;
  for (int64_t r = 0; r < d.D; ++r) {
    for (int64_t c = 0; c < d.Dv; ++c) S[r * d.DvP + c] = s0[(bg * d.D + r) * d.Dv + c];
    S[r * d.DvP + d.Dv] = z0[bg * d.D + r];
  }
}

template <typename acc_t>
void store_state(const Dims& d, const acc_t* S, int64_t bg, acc_t* s_out, acc_t* z_out) {
  for (int64_t r = 0; r < d.D; ++r) {
    for (int64_t c = 0; c < d.Dv; ++c) s_out[(bg * d.D + r) * d.Dv + c] = S[r * d.DvP + c];
    z_out[bg * d.D + r] = S[r * d.DvP + d.Dv];
  }
}

// out rows from num' [L, DvP]: num / (den + eps) or num (num is scaled in place).
template <typename scalar_t, typename acc_t>
void store_output(acc_t* num, int64_t L, const Dims& d, bool normalize, acc_t eps, scalar_t* out) {
  using Vec = at::vec::Vectorized<acc_t>;
  for (int64_t i = 0; i < L; ++i) {
    acc_t* n = num + i * d.DvP;
    if (normalize) {
      const Vec inv(acc_t(1) / (n[d.Dv] + eps));
      for (int64_t c = 0; c < d.DvP; c += Vec::size()) (Vec::loadu(n + c) * inv).store(n + c);
    }
    cvt_row(n, out + i * d.Dv, d.Dv);
  }
}

// dx = dφ-chain of a feature gradient: dx[i, c] = mult · φ'(u) · dfeat[i, c], u = mult · x,
// with φ' read off the features feat = φ(u) already in scratch (no second exp):
// elu+1: φ' = 1 for u > 0 (where φ = u + 1 > 1), exp(u) = φ otherwise, i.e. min(φ, 1);
// relu: φ' = [φ > 0]; identity: 1. dfeat is overwritten (scaled in place, then rounded
// into dx a row at a time).
template <typename scalar_t, typename acc_t>
void store_input_grad(acc_t* dfeat, const acc_t* feat, int64_t L, const Dims& d, acc_t mult, FeatureMap f, scalar_t* dx) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec m(mult), one(acc_t(1)), zero(acc_t(0));
  for (int64_t i = 0; i < L; ++i) {
    acc_t* g = dfeat + i * d.MP;
    const acc_t* p = feat + i * d.MP;
    for (int64_t c = 0; c < d.MP; c += Vec::size()) {
      const Vec pv = Vec::loadu(p + c);
      const Vec slope = f == FeatureMap::Elu ? at::vec::minimum(pv, one)
                        : f == FeatureMap::Relu ? Vec::blendv(zero, one, pv > zero) : one;
      (Vec::loadu(g + c) * slope * m).store(g + c);
    }
    cvt_row(g, dx + i * d.D, d.D);
  }
}

// Per-task scratch, all [kChunk, *] row-major in the accumulation type.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> Qc, QcT, Kc, KcT, Vc, VcT, P, num, dN, dNT, S, ST, dS, dST, dQ, dK, dV, tmp;
  explicit Scratch(const Dims& d) {
    const int64_t C = kChunk;
    Qc.resize(C * d.MP); QcT.resize(d.MP * C); Kc.resize(C * d.MP); KcT.resize(d.MP * C);
    Vc.resize(C * d.DvP); VcT.resize(d.DvP * C); P.resize(C * C); num.resize(C * d.DvP);
    dN.resize(C * d.DvP); dNT.resize(d.DvP * C);
    S.resize(d.MP * d.DvP); ST.resize(d.DvP * d.MP); dS.resize(d.MP * d.DvP); dST.resize(d.DvP * d.MP);
    dQ.resize(C * d.MP); dK.resize(C * d.MP); dV.resize(C * d.DvP); tmp.resize(std::max(d.MP, C) * std::max(d.MP, d.DvP));
  }
};

// Pointers of one call, offsets in elements.
template <typename scalar_t, typename acc_t>
struct Args {
  const scalar_t *q, *k, *v;
  const acc_t *s0, *z0;
  FeatureMap f;
  bool normalize;
  acc_t eps, scale;
  bool mx = false;  // bf16 products on the matrix units or vdpbf16ps (mx_gemm)
  const scalar_t* q_head(const Dims& d, int64_t b, int64_t h, int64_t t) const { return q + ((b * d.Hq + h) * d.Nq + t) * d.D; }
  const scalar_t* k_head(const Dims& d, int64_t b, int64_t g, int64_t t) const { return k + ((b * d.Hk + g) * d.Nk + t) * d.D; }
  const scalar_t* v_head(const Dims& d, int64_t b, int64_t g, int64_t t) const { return v + ((b * d.Hk + g) * d.Nk + t) * d.Dv; }
};

// S' += K̃cᵀ V'c over all chunks of kv head (b, g) (starting from [S0 | z0]).
template <typename scalar_t, typename acc_t>
void reduce_state(const Dims& d, const Args<scalar_t, acc_t>& a, int64_t b, int64_t g, Scratch<acc_t>& w, acc_t* S) {
  init_state(d, a.s0, a.z0, b * d.Hk + g, S);
  for (int64_t t0 = 0; t0 < d.Nk; t0 += kChunk) {
    const int64_t L = std::min(kChunk, d.Nk - t0);
    load_features(a.k_head(d, b, g, t0), L, d, acc_t(1), a.f, w.Kc.data());
    transpose(kChunk, d.MP, w.Kc.data(), d.MP, w.KcT.data(), kChunk);         // [MP, C]
    load_values(a.v_head(d, b, g, t0), L, d, w.Vc.data());                      // [C, DvP]
    add_product(a.mx, d.D, d.DvP, L, w.KcT.data(), kChunk, w.Vc.data(), d.DvP, S, d.DvP, w.tmp.data());  // [D, DvP]
  }
}

// ---------------------------------------------------------------------------
// Forward.

template <typename scalar_t, typename acc_t>
void forward_noncausal(const Dims& d, const Args<scalar_t, acc_t>& a, scalar_t* out, acc_t* s_out, acc_t* z_out, acc_t* states) {
  // Phase 1: the full state of each kv head. states: [B*Hk, MP, DvP].
  at::parallel_for(0, d.B * d.Hk, grain_for(d.Nk * d.MP * d.DvP), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w(d);
    for (int64_t bg = begin; bg < end; ++bg) {
      acc_t* S = states + bg * d.MP * d.DvP;
      reduce_state(d, a, bg / d.Hk, bg % d.Hk, w, S);
      store_state(d, S, bg, s_out, z_out);
    }
    if (a.mx) common::vnni_release();  // the tile registers, on the thread that used them
  });
  // Phase 2: out = Q̃ S' / (Q̃ z + eps), over (b, query head, row chunk).
  const int64_t chunks = (d.Nq + kChunk - 1) / kChunk;
  at::parallel_for(0, d.B * d.Hq * chunks, grain_for(kChunk * d.MP * d.DvP), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, t0 = (task % chunks) * kChunk;
      const int64_t b = bh / d.Hq, h = bh % d.Hq, g = h / d.G;
      const int64_t L = std::min(kChunk, d.Nq - t0);
      const acc_t* S = states + (b * d.Hk + g) * d.MP * d.DvP;
      load_features(a.q_head(d, b, h, t0), L, d, a.scale, a.f, w.Qc.data());
      gemm(a.mx, L, d.DvP, d.D, w.Qc.data(), d.MP, S, d.DvP, w.num.data(), d.DvP, false);
      store_output(w.num.data(), L, d, a.normalize, a.eps, out + ((b * d.Hq + h) * d.Nq + t0) * d.Dv);
    }
    if (a.mx) common::vnni_release();  // the tile registers, on the thread that used them
  });
}

// ---------------------------------------------------------------------------
// Backward. q̃ = φ(scale q), k̃ = φ(k), v' = [v, 1], dn'_i = [dnum_i, dden_i]:
//   dq̃_i = S'_i dn'_i,  dk̃_j = Σ_{i sees j} q̃_i (v'_j · dn'_i),  dv'_j = Σ_{i sees j} (q̃_i · k̃_j) dn'_i.

// Σ_c a[c] b[c] over n (a multiple of the vector width: rows padded to MP or kChunk).
template <typename T>
inline T vdot(const T* a, const T* b, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(T(0));
  for (int64_t c = 0; c < n; c += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + c), Vec::loadu(b + c), acc);
  return common::hsum(acc);
}

// Σ_c a[c] over n (a multiple of the vector width).
template <typename T>
inline T vsum(const T* a, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(T(0));
  for (int64_t c = 0; c < n; c += Vec::size()) acc = acc + Vec::loadu(a + c);
  return common::hsum(acc);
}

// dout rows [0, L) into dst [kChunk, DvP] in acc_t, zero past Dv and past L.
template <typename scalar_t, typename acc_t>
void load_grad(const scalar_t* src, int64_t L, const Dims& d, acc_t* dst) {
  for (int64_t i = 0; i < L; ++i) {
    acc_t* o = dst + i * d.DvP;
    cvt_row(src + i * d.Dv, o, d.Dv);
    std::fill(o + d.Dv, o + d.DvP, acc_t(0));
  }
  std::fill(dst + L * d.DvP, dst + kChunk * d.DvP, acc_t(0));
}

// ---------------------------------------------------------------------------
// Causal kernels. They keep V and the state without the ones column: S [MP, DvP] with
// DvP = Dv rounded up to the vector width, and z [MP] apart (z += the column sums of
// K̃, den = Σ_j A_ij + q̃·z from row sums and dots). At Dv = 64 the ones column padded
// every V / state product to 80 columns: a fifth of their multiply-adds, for one
// column the vector passes around the products compute at a fraction of the cost.

// The causal geometry: as d, with DvP = Dv rounded up to the vector width (no ones column).
template <typename acc_t>
Dims causal_dims(Dims d) {
  d.DvP = round_up(d.Dv, at::vec::Vectorized<acc_t>::size());
  return d;
}

// S [MP, DvP] = S0 and z [MP] = z0 of kv head bg (or zeros).
template <typename acc_t>
void init_split_state(const Dims& d, const acc_t* s0, const acc_t* z0, int64_t bg, acc_t* S, acc_t* z) {
  std::fill(S, S + d.MP * d.DvP, acc_t(0));
  std::fill(z, z + d.MP, acc_t(0));
  if (s0 == nullptr) return;
  for (int64_t r = 0; r < d.D; ++r) {
    std::copy(s0 + (bg * d.D + r) * d.Dv, s0 + (bg * d.D + r + 1) * d.Dv, S + r * d.DvP);
    z[r] = z0[bg * d.D + r];
  }
}

template <typename acc_t>
void store_split_state(const Dims& d, const acc_t* S, const acc_t* z, int64_t bg, acc_t* s_out, acc_t* z_out) {
  for (int64_t r = 0; r < d.D; ++r) {
    std::copy(S + r * d.DvP, S + r * d.DvP + d.Dv, s_out + (bg * d.D + r) * d.Dv);
    z_out[bg * d.D + r] = z[r];
  }
}

// sum[m] = Σ_i X[i, m] * (w == nullptr ? 1 : w[i]) over rows [0, L) of X [*, n] (n a multiple
// of the vector width): the chunk's share of z (w = nullptr) or of dz (w = dden).
template <typename acc_t>
void column_sums(const acc_t* X, int64_t L, int64_t n, const acc_t* w, acc_t* sum) {
  using Vec = at::vec::Vectorized<acc_t>;
  for (int64_t c = 0; c < n; c += Vec::size()) {
    Vec acc(acc_t(0));
    for (int64_t i = 0; i < L; ++i)
      acc = w == nullptr ? acc + Vec::loadu(X + i * n + c) : at::vec::fmadd(Vec::loadu(X + i * n + c), Vec(w[i]), acc);
    acc.store(sum + c);
  }
}

template <typename scalar_t, typename acc_t>
void forward_causal(const Dims& d0, const Args<scalar_t, acc_t>& a, scalar_t* out, acc_t* s_out, acc_t* z_out) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Dims d = causal_dims<acc_t>(d0);
  const int64_t work = d.Nq * (d.G + 1) * (d.MP + kChunk) * d.DvP;  // per kv head
  at::parallel_for(0, d.B * d.Hk, grain_for(work), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w(d);
    std::vector<acc_t> z(d.MP), zc(d.MP), den(kChunk);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / d.Hk, g = bg % d.Hk;
      acc_t* S = w.S.data();  // [MP, DvP] state of the chunks before this one, z [MP] its key sum
      init_split_state(d, a.s0, a.z0, bg, S, z.data());
      for (int64_t t0 = 0; t0 < d.Nq; t0 += kChunk) {
        const int64_t L = std::min(kChunk, d.Nq - t0);
        load_features(a.k_head(d, b, g, t0), L, d, acc_t(1), a.f, w.Kc.data());
        transpose(kChunk, d.MP, w.Kc.data(), d.MP, w.KcT.data(), kChunk);  // [MP, C]
        load_grad(a.v_head(d, b, g, t0), L, d, w.Vc.data());                 // V [C, DvP]
        for (int64_t hh = 0; hh < d.G; ++hh) {
          const int64_t h = g * d.G + hh;
          load_features(a.q_head(d, b, h, t0), L, d, a.scale, a.f, w.Qc.data());          // [C, MP]
          gemm(a.mx, L, kChunk, d.D, w.Qc.data(), d.MP, w.KcT.data(), kChunk, w.P.data(), kChunk, false, Tri::None, Tri::Lower);  // P = Q̃K̃ᵀ [L, C]
          mask_lower(L, w.P.data(), kChunk);
          // intra (P V, Σ_j P) and inter (Q̃ S, q̃·z) are summed separately, then added: adding
          // the 64 small intra terms onto the large carried part would round each at its scale
          // (fp32 products; on the matrix units the tile unit accumulates them, see add_product).
          gemm(a.mx, L, d.DvP, L, w.P.data(), kChunk, w.Vc.data(), d.DvP, w.num.data(), d.DvP, false, Tri::Lower);  // intra
          if (a.normalize)
            for (int64_t i = 0; i < L; ++i) den[i] = vsum(w.P.data() + i * kChunk, kChunk);
          add_product(a.mx, L, d.DvP, d.D, w.Qc.data(), d.MP, S, d.DvP, w.num.data(), d.DvP, w.tmp.data());  // inter
          scalar_t* o = out + ((b * d.Hq + h) * d.Nq + t0) * d.Dv;
          for (int64_t i = 0; i < L; ++i) {
            acc_t* n = w.num.data() + i * d.DvP;
            if (a.normalize) {
              const Vec inv(acc_t(1) / ((den[i] + vdot(w.Qc.data() + i * d.MP, z.data(), d.MP)) + a.eps));
              for (int64_t c = 0; c < d.DvP; c += Vec::size()) (Vec::loadu(n + c) * inv).store(n + c);
            }
            cvt_row(n, o + i * d.Dv, d.Dv);
          }
        }
        add_product(a.mx, d.D, d.DvP, L, w.KcT.data(), kChunk, w.Vc.data(), d.DvP, S, d.DvP, w.tmp.data());  // S += K̃ᵀV
        column_sums(w.Kc.data(), L, d.MP, static_cast<const acc_t*>(nullptr), zc.data());
        for (int64_t m = 0; m < d.MP; ++m) z[m] += zc[m];  // z += Σ k̃, the chunk's sum added once
      }
      store_split_state(d, S, z.data(), bg, s_out, z_out);
    }
    if (a.mx) common::vnni_release();  // the tile registers, on the thread that used them
  });
}

// The causal backward's chunks kept from pass 1 for pass 2 live in the thread's common::thread_buffer
// (slot kKeptSlot), reused between calls and freed after a call above 16 MB (at N = 1024, D = 64
// ~1.3 MB; allocated per call, glibc mostly handed back fresh pages: page faults and unmaps took ~1/3
// of a loop of backward calls, these blocks and the outputs together).
// Tried, not kept: dq, dk, dv as views of one output block. That loop then ran at 0 faults a call
// (450-600 before), but a fwd+bwd through autograd still took 150-300 (glibc's trimming of the heap
// top decides, whatever the layout): no gain on the benchmarked path.
constexpr int kKeptSlot = 8;

// Causal backward without recomputing the forward's output. Per chunk of L rows and
// query head, with A = mask(Q̃K̃ᵀ) and Γ = mask(g Vᵀ) (g = dout, lower triangles, [L, C]),
// H = g Sᵀ [L, M] and z from the state (S, z) of the earlier chunks:
//   den_i = Σ_j A_ij + q̃_i·z + eps,  g_i·num_i = Σ_j A_ij Γ_ij + q̃_i·H_i,
//   dnum_i = g_i / den_i,  dden_i = -(g_i·num_i) / den_i²,
//   P2_ij = dn'_i·v'_j = Γ_ij / den_i + dden_i (j <= i),
//   dq̃ = P2 K̃ + H / den + dden zᵀ;  dk̃ (intra) = P2ᵀ Q̃,  dv (intra) = Aᵀ dnum.
// So the numerator (A V + Q̃ S, the forward's two large products) is never rebuilt:
// its one use, g·num, comes from the products dq̃ needs anyway. Pass 1 (forward in
// time) carries (S, z) (one K̃ᵀV product per chunk, the only forward work repeated) and
// keeps Q̃, K̃, dnum, dden, A and P2 of every chunk; pass 2 (backward in time) carries
// dS = Σ_later Q̃ᵀ dnum and dz = Σ_later Q̃ᵀ dden for the inter-chunk parts dk̃ = V dSᵀ + dz,
// dv = K̃ dS and adds the intra parts from the kept triangles. Scratch per task:
// O(Nq · (G (M + 2C + Dv + 1) + M)) floats (Nq = 4096, G = 1, D = Dv = 64: ~5 MB).
template <typename scalar_t, typename acc_t>
void backward_causal(const Dims& d0, const Args<scalar_t, acc_t>& a, const scalar_t* dout, scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t C = kChunk;
  const Dims d = causal_dims<acc_t>(d0);
  const int64_t nch = (d.Nq + C - 1) / C;
  const int64_t work = 2 * d.Nq * (d.G + 1) * (d.MP + C) * d.DvP;  // per kv head
  at::parallel_for(0, d.B * d.Hk, grain_for(work), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w(d);
    // Kept from pass 1 for pass 2, chunk-major: [G, nch, C, *] (K̃: [nch, C, MP]). Not
    // zero-filled: pass 1 writes every entry pass 2 reads (whole chunk rows of Q̃, K̃, dnum,
    // dden; the first L rows of A, P2); zero-filling ~5 MB per call cost ~5% (N = 4096).
    // One block carved in six, the thread's buffer kept between calls (common::thread_buffer).
    const int64_t nQ = d.G * nch * C * d.MP, nK = nch * C * d.MP, nN = d.G * nch * C * d.DvP, nd = d.G * nch * C,
                  nA = d.G * nch * C * C;
    acc_t* const Qf = common::thread_buffer<acc_t, kKeptSlot>(nQ + nK + nN + nd + 2 * nA);
    acc_t* const Kf = Qf + nQ;
    acc_t* const dN_all = Kf + nK;
    acc_t* const dd_all = dN_all + nN;
    acc_t* const A_all = dd_all + nd;   // A [L, C] (ld C)
    acc_t* const P2_all = A_all + nA;   // P2 [L, C] (ld C)
    std::vector<acc_t> Gd(C * d.DvP), H(C * d.MP), inv(C), z(d.MP), zc(d.MP), dz(d.MP);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / d.Hk, g = bg % d.Hk;
      // Pass 1, forward in time: dnum, dden and dQ (need (S, z) before each chunk).
      // The state carried transposed, Sᵀ [DvP, MP] (H's B operand as it is; updated as
      // Sᵀ += Vᵀ K̃ from the Vᵀ Γ needs anyway): no transpose of the state per chunk.
      init_split_state(d, a.s0, a.z0, bg, w.S.data(), z.data());
      transpose(d.MP, d.DvP, w.S.data(), d.DvP, w.ST.data(), d.MP);
      for (int64_t c = 0; c < nch; ++c) {
        const int64_t t0 = c * C, L = std::min(C, d.Nq - t0);
        acc_t* Kc = Kf + c * C * d.MP;
        load_features(a.k_head(d, b, g, t0), L, d, acc_t(1), a.f, Kc);
        transpose(C, d.MP, Kc, d.MP, w.KcT.data(), C);                      // [MP, C]
        load_grad(a.v_head(d, b, g, t0), L, d, w.Vc.data());                 // V [C, DvP]
        transpose(C, d.DvP, w.Vc.data(), d.DvP, w.VcT.data(), C);            // [DvP, C]
        for (int64_t hh = 0; hh < d.G; ++hh) {
          const int64_t h = g * d.G + hh;
          const int64_t row = (b * d.Hq + h) * d.Nq + t0;
          const int64_t slot = hh * nch + c;
          acc_t* Qc = Qf + slot * C * d.MP;
          acc_t* dN = dN_all + slot * C * d.DvP;                      // dnum [C, DvP]
          acc_t* dden = dd_all + slot * C;                            // [C]
          acc_t* P = A_all + slot * C * C;   // A, kept for pass 2
          acc_t* Gm = P2_all + slot * C * C;  // Γ, then P2 in place, kept for pass 2
          load_features(a.q_head(d, b, h, t0), L, d, a.scale, a.f, Qc);
          load_grad(dout + row * d.Dv, L, d, Gd.data());
          gemm(a.mx, L, C, d.D, Qc, d.MP, w.KcT.data(), C, P, C, false, Tri::None, Tri::Lower);            // A [L, C]
          mask_lower(L, P, C);
          gemm(a.mx, L, C, d.Dv, Gd.data(), d.DvP, w.VcT.data(), C, Gm, C, false, Tri::None, Tri::Lower);  // Γ
          mask_lower(L, Gm, C);
          gemm(a.mx, L, d.MP, d.Dv, Gd.data(), d.DvP, w.ST.data(), d.MP, H.data(), d.MP, false);         // H [L, MP]
          for (int64_t i = 0; i < L; ++i) {
            const acc_t* Ai = P + i * C;
            acc_t* Gi = Gm + i * C;
            const acc_t* Qi = Qc + i * d.MP;
            const acc_t* Hi = H.data() + i * d.MP;
            acc_t r = 1, s = 0;
            if (a.normalize) {
              // intra and inter parts summed apart, then added (as the forward does)
              r = acc_t(1) / ((vsum(Ai, C) + vdot(Qi, z.data(), d.MP)) + a.eps);
              s = -(vdot(Ai, Gi, C) + vdot(Qi, Hi, d.MP)) * r * r;
            }
            inv[i] = r;
            dden[i] = s;
            acc_t* o = dN + i * d.DvP;
            const acc_t* gi = Gd.data() + i * d.DvP;
            for (int64_t q = 0; q < d.DvP; q += Vec::size()) (Vec::loadu(gi + q) * Vec(r)).store(o + q);
            // P2 row in place of Γ: Γ r + s for j <= i, zero after.
            for (int64_t j = 0; j < C; j += Vec::size()) at::vec::fmadd(Vec::loadu(Gi + j), Vec(r), Vec(s)).store(Gi + j);
            std::fill(Gi + i + 1, Gi + C, acc_t(0));
          }
          std::fill(dN + L * d.DvP, dN + C * d.DvP, acc_t(0));
          std::fill(dden + L, dden + C, acc_t(0));
          gemm(a.mx, L, d.MP, L, Gm, C, Kc, d.MP, w.dQ.data(), d.MP, false, Tri::Lower);        // P2 K̃
          for (int64_t i = 0; i < L; ++i) {
            acc_t* o = w.dQ.data() + i * d.MP;
            const acc_t* Hi = H.data() + i * d.MP;
            for (int64_t q = 0; q < d.MP; q += Vec::size()) {
              const Vec inter = at::vec::fmadd(Vec::loadu(Hi + q), Vec(inv[i]), Vec::loadu(z.data() + q) * Vec(dden[i]));
              (Vec::loadu(o + q) + inter).store(o + q);
            }
          }
          store_input_grad(w.dQ.data(), Qc, L, d, a.scale, a.f, dq + row * d.D);
        }
        add_product(a.mx, d.Dv, d.MP, L, w.VcT.data(), C, Kc, d.MP, w.ST.data(), d.MP, w.tmp.data());  // Sᵀ += Vᵀ K̃
        column_sums(Kc, L, d.MP, static_cast<const acc_t*>(nullptr), zc.data());
        for (int64_t m = 0; m < d.MP; ++m) z[m] += zc[m];
      }
      // Pass 2, backward in time.
      acc_t* dS = w.dS.data();
      std::fill(dS, dS + d.MP * d.DvP, acc_t(0));
      std::fill(dz.begin(), dz.end(), acc_t(0));
      for (int64_t c = nch - 1; c >= 0; --c) {
        const int64_t t0 = c * C, L = std::min(C, d.Nk - t0);
        const acc_t* Kc = Kf + c * C * d.MP;
        load_grad(a.v_head(d, b, g, t0), L, d, w.Vc.data());
        // Inter-chunk parts from (dS, dz) as they stand before this chunk's queries join them;
        // kept apart (in the free dQ/num buffers) and added after the intra parts.
        transpose(d.MP, d.DvP, dS, d.DvP, w.dST.data(), d.MP);
        gemm(a.mx, L, d.MP, d.Dv, w.Vc.data(), d.DvP, w.dST.data(), d.MP, w.dQ.data(), d.MP, false);  // V dSᵀ [L, MP]
        gemm(a.mx, L, d.DvP, d.D, Kc, d.MP, dS, d.DvP, w.num.data(), d.DvP, false);                   // K̃ dS [L, DvP]
        for (int64_t i = 0; i < L; ++i)  // + dz: the ones column of v' against dden
          for (int64_t q = 0; q < d.MP; q += Vec::size())
            (Vec::loadu(w.dQ.data() + i * d.MP + q) + Vec::loadu(dz.data() + q)).store(w.dQ.data() + i * d.MP + q);
        for (int64_t hh = 0; hh < d.G; ++hh) {
          const int64_t slot = hh * nch + c;
          const acc_t* Qc = Qf + slot * C * d.MP;
          const acc_t* dN = dN_all + slot * C * d.DvP;
          const acc_t* Ak = A_all + slot * C * C;
          const acc_t* P2k = P2_all + slot * C * C;
          if (a.mx) {  // mx_gemm reads A row-major: the transposes, into the free P (Upper: their zeros)
            transpose(L, L, P2k, C, w.P.data(), C);
            gemm(a.mx, L, d.MP, L, w.P.data(), C, Qc, d.MP, w.dK.data(), d.MP, hh > 0, Tri::Upper);   // P2ᵀ Q̃
            transpose(L, L, Ak, C, w.P.data(), C);
            gemm(a.mx, L, d.DvP, L, w.P.data(), C, dN, d.DvP, w.dV.data(), d.DvP, hh > 0, Tri::Upper);  // Aᵀ dnum
          } else {  // the triangles read transposed where pass 1 left them
            common::register_gemm_at<acc_t>(L, d.MP, L, P2k, C, Qc, d.MP, w.dK.data(), d.MP, hh > 0, Tri::Upper);   // P2ᵀ Q̃
            common::register_gemm_at<acc_t>(L, d.DvP, L, Ak, C, dN, d.DvP, w.dV.data(), d.DvP, hh > 0, Tri::Upper);  // Aᵀ dnum
          }
          transpose(C, d.MP, Qc, d.MP, w.QcT.data(), C);                                               // [MP, C]
          add_product(a.mx, d.D, d.DvP, L, w.QcT.data(), C, dN, d.DvP, dS, d.DvP, w.tmp.data());             // dS += Q̃ᵀ dnum
          column_sums(Qc, L, d.MP, dd_all + slot * C, zc.data());                                  // Q̃ᵀ dden
          for (int64_t m = 0; m < d.MP; ++m) dz[m] += zc[m];
        }
        for (int64_t i = 0; i < L * d.MP; ++i) w.dK[i] += w.dQ[i];
        for (int64_t i = 0; i < L * d.DvP; ++i) w.dV[i] += w.num[i];
        const int64_t row = (b * d.Hk + g) * d.Nk + t0;
        store_input_grad(w.dK.data(), Kc, L, d, acc_t(1), a.f, dk + row * d.D);
        for (int64_t i = 0; i < L; ++i) cvt_row(w.dV.data() + i * d.DvP, dv + (row + i) * d.Dv, d.Dv);
      }
    }
    common::trim_thread_buffer<acc_t, kKeptSlot>();  // a long sequence's block is not kept
    if (a.mx) common::vnni_release();  // the tile registers, on the thread that used them
  });
}

template <typename scalar_t, typename acc_t>
void backward_noncausal(const Dims& d, const Args<scalar_t, acc_t>& a, const scalar_t* dout, scalar_t* dq, scalar_t* dk, scalar_t* dv, acc_t* states, acc_t* head_dS) {
  // Phase 1: full state per kv head. states: [B*Hk, MP, DvP].
  at::parallel_for(0, d.B * d.Hk, grain_for(d.Nk * d.MP * d.DvP), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w(d);
    for (int64_t bg = begin; bg < end; ++bg) reduce_state(d, a, bg / d.Hk, bg % d.Hk, w, states + bg * d.MP * d.DvP);
    if (a.mx) common::vnni_release();  // the tile registers, on the thread that used them
  });
  // Phase 2: per (b, query head): for each row chunk dN', dQ̃ = dN' S'ᵀ, and the head's
  // share of dS' = Σ_i q̃_i dn'_iᵀ into head_dS [B*Hq, MP, DvP]. As in the causal backward,
  // num' is not rebuilt: with H = g S[:, :Dv]ᵀ [L, MP] (g = dout), den_i = q̃_i·z + eps,
  // g_i·num_i = q̃_i·H_i and dQ̃ = H / den + dden zᵀ, one product where num' and dQ̃ took two.
  // dN' lives only for its chunk, so no (N, Dv) buffer is written and read back.
  at::parallel_for(0, d.B * d.Hq, grain_for(2 * d.Nq * d.MP * d.DvP), [&](int64_t begin, int64_t end) {
    using Vec = at::vec::Vectorized<acc_t>;
    Scratch<acc_t> w(d);
    std::vector<acc_t> Gd(kChunk * d.DvP), H(kChunk * d.MP);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.Hq, h = bh % d.Hq, g = h / d.G;
      const acc_t* S = states + (b * d.Hk + g) * d.MP * d.DvP;
      acc_t* dS = head_dS + bh * d.MP * d.DvP;
      std::fill(dS, dS + d.MP * d.DvP, acc_t(0));
      transpose(d.MP, d.DvP, S, d.DvP, w.ST.data(), d.MP);  // [DvP, MP]
      const acc_t* z = w.ST.data() + d.Dv * d.MP;           // S'[:, Dv], [MP]
      for (int64_t t0 = 0; t0 < d.Nq; t0 += kChunk) {
        const int64_t L = std::min(kChunk, d.Nq - t0);
        const int64_t row = bh * d.Nq + t0;
        load_features(a.q_head(d, b, h, t0), L, d, a.scale, a.f, w.Qc.data());
        load_grad(dout + row * d.Dv, L, d, Gd.data());
        gemm(a.mx, L, d.MP, d.Dv, Gd.data(), d.DvP, w.ST.data(), d.MP, H.data(), d.MP, false);  // H [L, MP]
        for (int64_t i = 0; i < L; ++i) {
          const acc_t* Qi = w.Qc.data() + i * d.MP;
          const acc_t* Hi = H.data() + i * d.MP;
          acc_t r = 1, s = 0;
          if (a.normalize) {
            r = acc_t(1) / (vdot(Qi, z, d.MP) + a.eps);
            s = -vdot(Qi, Hi, d.MP) * r * r;
          }
          acc_t* o = w.dN.data() + i * d.DvP;
          const acc_t* gi = Gd.data() + i * d.DvP;
          for (int64_t c = 0; c < d.DvP; c += Vec::size()) (Vec::loadu(gi + c) * Vec(r)).store(o + c);
          o[d.Dv] = s;
          acc_t* dq_i = w.dQ.data() + i * d.MP;
          for (int64_t c = 0; c < d.MP; c += Vec::size())
            at::vec::fmadd(Vec::loadu(Hi + c), Vec(r), Vec::loadu(z + c) * Vec(s)).store(dq_i + c);
        }
        store_input_grad(w.dQ.data(), w.Qc.data(), L, d, a.scale, a.f, dq + row * d.D);
        transpose(kChunk, d.MP, w.Qc.data(), d.MP, w.QcT.data(), kChunk);
        add_product(a.mx, d.D, d.DvP, L, w.QcT.data(), kChunk, w.dN.data(), d.DvP, dS, d.DvP, w.tmp.data());
      }
    }
    if (a.mx) common::vnni_release();  // the tile registers, on the thread that used them
  });
  // Phase 3: per kv head, dS' = Σ_h (its heads' shares, in head order), then
  // dK̃ = V' dS'ᵀ and dV' = K̃ dS'.
  at::parallel_for(0, d.B * d.Hk, grain_for(2 * d.Nk * d.MP * d.DvP), [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w(d);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / d.Hk, g = bg % d.Hk;
      acc_t* dS = w.dS.data();
      std::fill(dS, dS + d.MP * d.DvP, acc_t(0));
      for (int64_t hh = 0; hh < d.G; ++hh) {
        const acc_t* part = head_dS + (b * d.Hq + g * d.G + hh) * d.MP * d.DvP;
        for (int64_t i = 0; i < d.MP * d.DvP; ++i) dS[i] += part[i];
      }
      transpose(d.MP, d.DvP, dS, d.DvP, w.dST.data(), d.MP);
      for (int64_t t0 = 0; t0 < d.Nk; t0 += kChunk) {
        const int64_t L = std::min(kChunk, d.Nk - t0);
        load_features(a.k_head(d, b, g, t0), L, d, acc_t(1), a.f, w.Kc.data());
        load_values(a.v_head(d, b, g, t0), L, d, w.Vc.data());
        gemm(a.mx, L, d.MP, d.Dv + 1, w.Vc.data(), d.DvP, w.dST.data(), d.MP, w.dK.data(), d.MP, false);
        gemm(a.mx, L, d.DvP, d.D, w.Kc.data(), d.MP, dS, d.DvP, w.dV.data(), d.DvP, false);
        const int64_t row = bg * d.Nk + t0;
        store_input_grad(w.dK.data(), w.Kc.data(), L, d, acc_t(1), a.f, dk + row * d.D);
        for (int64_t i = 0; i < L; ++i) cvt_row(w.dV.data() + i * d.DvP, dv + (row + i) * d.Dv, d.Dv);
      }
    }
    if (a.mx) common::vnni_release();  // the tile registers, on the thread that used them
  });
}

// ---------------------------------------------------------------------------
// FAVOR+ (Performer) non-causal attention with the random-feature map fused in:
//   x = root·q (or root·k), l = x Wᵀ [N, M], φ(x) = exp(l − b − ln(M)/2),
//   queries: b_i = max_m l_im (per row); keys: b_j = |x_j|²/2 + c, c = max_j (max_m l_jm − |x_j|²/2)
// per (batch, kv head); both stabilisers are constants for autograd (as in features.py),
// the query's |x|²/2 is not: it cancels in value but not in the gradient. Then the
// non-causal linear attention of identity features of width M (the matrix-unit path with the
// ones column of V', as above; the fp32 path sums z = Σ φ(k) and φ(q)·z in its exp passes
// instead, so its state / output GEMMs are Dv wide, not DvP). The features are never written to memory (but φ(q) for the
// backward, see favor_attention_fwd): each chunk's projection (a
// [C, D] x [D, M] GEMM), its exp and its use in the state / output products run on one
// cache-resident [C, M] tile, where the torch feature map made ~4 passes over (N, M)
// tensors forward and as many back, and the kernel a fifth to load them.
// Backward, with dφ the features' gradient: dl = dφ ⊙ φ, dx = dl W − x Σ_m dl, dq = root·dx.

// W rows [M, D] of the projection, padded to MP rows (zero); root·W in both layouts.
// The fp32 path reads the input rows where they are (q, k, v, dout as GEMM operands, no copy,
// when the input is acc_t) with sqrt(scale) folded into the projection: l = x (root·W)ᵀ, and
// |root·x|²/2 = root²·|x|²/2 (no copy-and-scale pass over each chunk).
template <typename acc_t>
struct FavorW {
  int64_t M, MP, D;
  acc_t root, log_root;  // sqrt(scale); ln(M) / 2
  std::vector<acc_t> W;    // [MP, D]
  std::vector<acc_t> Wr;   // root·W [MP, D]
  std::vector<acc_t> WTr;  // root·Wᵀ [D, MP]
};

// rows [0, L) of src [*, cols] as acc_t: src itself when the types agree, else converted into buf.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* src, int64_t L, int64_t cols, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, L * cols);
    return buf;
  }
}

// |x|² of a row of n.
template <typename acc_t>
acc_t sq_norm(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec acc(acc_t(0));
  int64_t e = 0;
  for (; e + Vec::size() <= n; e += Vec::size()) acc = at::vec::fmadd(Vec::loadu(x + e), Vec::loadu(x + e), acc);
  acc_t s = common::hsum(acc);
  for (; e < n; ++e) s += x[e] * x[e];
  return s;
}

// mx[r] = max(F row r [0, M)) for rows [0, R), R <= kRows, NaN kept (common::row_max's value: a max
// is exact in any order). The rows' chains side by side: one row at a time, its two accumulators
// and the tree at the end were latency-bound (common::row_max was 2% of a B1 H8 N1024 D64 M256
// fp32 forward, perf, 1 thread).
constexpr int64_t kMaxRows = 4;
template <typename acc_t>
void rows_max(const acc_t* F, int64_t ld, int64_t R, int64_t M, acc_t* mx) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec m0[kMaxRows], m1[kMaxRows];
  for (int64_t r = 0; r < R; ++r) m0[r] = m1[r] = Vec(-std::numeric_limits<acc_t>::infinity());
  int64_t i = 0;
  for (; i + 2 * W <= M; i += 2 * W)
    for (int64_t r = 0; r < R; ++r) {
      m0[r] = at::vec::maximum(m0[r], Vec::loadu(F + r * ld + i));
      m1[r] = at::vec::maximum(m1[r], Vec::loadu(F + r * ld + i + W));
    }
  for (; i + W <= M; i += W)
    for (int64_t r = 0; r < R; ++r) m0[r] = at::vec::maximum(m0[r], Vec::loadu(F + r * ld + i));
  for (int64_t r = 0; r < R; ++r) {
    acc_t m = M >= W ? common::hmax<acc_t>(at::vec::maximum(m0[r], m1[r])) : -std::numeric_limits<acc_t>::infinity();
    for (int64_t e = i; e < M; ++e) m = common::max_keep_nan(m, F[r * ld + e]);
    mx[r] = m;
  }
}

// den = φ_i · z over the M features of one feature row: the backward's normaliser from saved
// features. The forward's exp pass sums the same products in the same order (a vector fmadd per
// W features in m order, hsum, then the scalar tail, absent where features are saved: M % W == 0),
// so a backward from saved φ(q) is bit-identical to one that recomputes it (tested).
template <typename acc_t>
acc_t favor_den(const acc_t* row, const acc_t* z, int64_t M) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec acc(acc_t(0));
  int64_t m = 0;
  for (; m + W <= M; m += W) acc = at::vec::fmadd(Vec::loadu(row + m), Vec::loadu(z + m), acc);
  acc_t s = common::hsum(acc);
  for (; m < M; ++m) s += row[m] * z[m];
  return s;
}

// F [kChunk, MP] = φ(root·X rows [0, L)) (X [L, D], the unscaled input rows); queries (c unused)
// or keys with shift c. Zero in the padding columns (exp of a padding logit could overflow) and,
// with pad_rows, in rows [L, kChunk) (off where F is a saved feature buffer of exactly L rows:
// every product reads rows [0, L) only). With z [MP] given (queries), also den[i] = φ_i · z,
// summed in the exp pass (as favor_den; a pass of its own was one latency-bound FMA chain a row).
template <typename acc_t>
void favor_row_features(const acc_t* X, int64_t L, const FavorW<acc_t>& fw, bool is_query, acc_t c, acc_t* F,
                        const acc_t* z = nullptr, acc_t* den = nullptr, bool pad_rows = true) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  // Tried: l in four column blocks of 64 (B and C blocks of 16 KB, L1-resident): B1 H8 N1024 D64 M256
  // fp32 forward 0.99x (interleaved A/B, 1 thread, loaded host); not kept.
  gemm(L, fw.MP, fw.D, X, fw.D, fw.WTr.data(), fw.MP, F, fw.MP, false);  // l [L, MP]
  acc_t bs[kMaxRows];
  for (int64_t i0 = 0; i0 < L; i0 += kMaxRows) {
    const int64_t R = std::min(kMaxRows, L - i0);
    if (is_query)
      rows_max(F + i0 * fw.MP, fw.MP, R, fw.M, bs);
    else
      for (int64_t r = 0; r < R; ++r) bs[r] = acc_t(0.5) * fw.root * fw.root * sq_norm(X + (i0 + r) * fw.D, fw.D) + c;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = i0 + r;
      acc_t* row = F + i * fw.MP;
      const acc_t b = bs[r];
      const Vec nb(-(b + fw.log_root));
      Vec acc(acc_t(0));
      int64_t m = 0;
      for (; m + W <= fw.M; m += W) {
        const Vec e = common::vexp(Vec::loadu(row + m) + nb);
        e.store(row + m);
        if (z != nullptr) acc = at::vec::fmadd(e, Vec::loadu(z + m), acc);
      }
      acc_t s = z != nullptr ? common::hsum(acc) : acc_t(0);
      for (; m < fw.M; ++m) {
        row[m] = std::exp(row[m] - (b + fw.log_root));
        if (z != nullptr) s += row[m] * z[m];
      }
      std::fill(row + fw.M, row + fw.MP, acc_t(0));
      if (den != nullptr) den[i] = s;
    }
  }
  if (pad_rows) std::fill(F + L * fw.MP, F + kChunk * fw.MP, acc_t(0));
}

// Scratch of the FAVOR+ kernels, all per task.
template <typename acc_t>
struct FavorScratch {
  std::vector<acc_t> X, XT, F, FT, H, Vc, dN, dNT, S, ST, dS, dST, dX, tmp, hn, cand, z, zc, den;
  FavorScratch(const Dims& d, const FavorW<acc_t>& fw) {
    const int64_t C = kChunk;
    X.resize(C * std::max(fw.D, d.Dv)); XT.resize(fw.D * C); F.resize(C * fw.MP); FT.resize(fw.MP * C); H.resize(C * fw.MP);
    Vc.resize(C * d.DvP); dN.resize(C * d.DvP); dNT.resize(d.DvP * C); S.resize(fw.MP * d.DvP); ST.resize(d.DvP * fw.MP);
    dS.resize(fw.MP * d.DvP); dST.resize(d.DvP * fw.MP); dX.resize(C * fw.D); tmp.resize(fw.MP * d.DvP);
    hn.resize(C); cand.resize(C); z.resize(fw.MP); zc.resize(fw.MP); den.resize(C);
  }
};

// The shift step alone: c <- max(c, cand[0, L)) (NaN kept); returns e^(c_old - c_new).
template <typename acc_t>
acc_t favor_update_shift(acc_t& c, const acc_t* cand, int64_t L) {
  acc_t cm = c;
  for (int64_t j = 0; j < L; ++j) cm = common::max_keep_nan(cm, cand[j]);
  acc_t rescale = 1;
  if (cm > c) {
    if (c != -std::numeric_limits<acc_t>::infinity()) rescale = std::exp(c - cm);
    c = cm;
  } else if (std::isnan(cm)) {
    c = cm;
  }
  return rescale;
}

// One chunk's step of the key stabiliser: c <- max(c, cand[0, L)) (NaN kept), then the chunk's
// features FTᵀ [MP, kChunk] <- exp(lᵀ - |x|²/2 - c - log √M) in place (columns past L and rows
// past M zeroed). Returns the factor e^(c_old - c_new) the state so far is rescaled by (1 if
// c did not grow), applied with this chunk's sum in one pass over it. With zsum given, also
// zsum[m] = Σ_j φ_mj (the chunk's share of z), summed in the exp pass.
template <typename acc_t>
acc_t favor_key_features(acc_t& c, const acc_t* cand, const acc_t* hn, int64_t L, const FavorW<acc_t>& fw, acc_t* FT,
                         acc_t* zsum = nullptr) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t C = kChunk;
  const acc_t rescale = favor_update_shift(c, cand, L);
  alignas(64) acc_t off[C];  // |x_j|²/2 + c, the same sum the loop below made per feature row
  for (int64_t j = 0; j < C; j += W) (Vec::loadu(hn + j) + Vec(c)).store(off + j);
  const Vec lr(fw.log_root);
  for (int64_t m = 0; m < fw.M; ++m) {
    acc_t* row = FT + m * C;
    Vec acc(acc_t(0));
    int64_t j = 0;
    for (; j + W <= L; j += W) {
      const Vec e = common::vexp((Vec::loadu(row + j) - Vec::loadu(off + j)) - lr);
      e.store(row + j);
      acc = acc + e;
    }
    for (int64_t t = j; t < C; t += W) common::vexp((Vec::loadu(row + t) - Vec::loadu(off + t)) - lr).store(row + t);
    std::fill(row + L, row + C, acc_t(0));
    if (zsum != nullptr) {
      acc_t sum = common::hsum(acc);
      for (; j < L; ++j) sum += row[j];
      zsum[m] = sum;
    }
  }
  std::fill(FT + fw.M * C, FT + fw.MP * C, acc_t(0));
  if (zsum != nullptr) std::fill(zsum + fw.M, zsum + fw.MP, acc_t(0));
  return rescale;
}

// kᵀ [D, C] of a chunk's key rows [L, D] (ldd = C). With AVX-512, float, and L, D multiples of
// 16, an inline 16 x 16 register transpose (fixed bounds, unrolled): at::vec::transpose_mxn's
// run-time-bounded one, called out of line per block, was 5% of a B1 H8 N1024 D64 M256 fp32
// forward (perf, 1 thread). Otherwise the file's transpose.
#if defined(CPU_CAPABILITY_AVX512)
inline void transpose16_f32(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // 32-bit pairs of rows 2i, 2i + 1
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // 64-bit pairs: 4-row groups
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: 8-row groups
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {  // 128-bit lanes across the two halves, then column j is row j
    _mm512_storeu_ps(dst + j * ldd, _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88));
    _mm512_storeu_ps(dst + (j + 8) * ldd, _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd));
  }
}
#endif

// dst [D, L] (ldd) = src [L, D] (lds)ᵀ; the columns past the last multiple of 16 (the backward's
// dN' has Dv + 1) one by one.
template <typename acc_t>
void favor_transpose_rows(const acc_t* src, int64_t L, int64_t D, acc_t* dst, int64_t ldd, int64_t lds = -1) {
  if (lds < 0) lds = D;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (L % 16 == 0) {
      const int64_t D16 = D / 16 * 16;
      for (int64_t i = 0; i < L; i += 16)
        for (int64_t j = 0; j < D16; j += 16) transpose16_f32(src + i * lds + j, lds, dst + j * ldd + i, ldd);
      for (int64_t j = D16; j < D; ++j)
        for (int64_t i = 0; i < L; ++i) dst[j * ldd + i] = src[i * lds + j];
      return;
    }
  }
#endif
  transpose(L, D, src, lds, dst, ldd);
}

// S [MP, Dv] = Σ_j φ(k_j) v_jᵀ and z [MP] = Σ_j φ(k_j) of kv head (b, g) (in w.S with ld Dv and
// w.z); returns the key shift c. One pass: c is the running max of the chunks seen, and S, z
// are rescaled by exp(c_old − c_new) when it grows (as an online softmax does), so no feature
// exceeds 1/√M and none is recomputed. The chunk's logits are built transposed,
// lᵀ = (root·W) kᵀ [MP, C], so the per-key max and |x|²/2 are column-wise vector ops and φᵀ
// is the state GEMM's A. z is summed in the exp pass rather than as a ones column of V in
// the GEMM: at Dv = 64 that column padded the state and output products to 80 columns (+25%).
template <typename scalar_t, typename acc_t>
acc_t favor_state(const Dims& d, const FavorW<acc_t>& fw, const scalar_t* k, const scalar_t* v, FavorScratch<acc_t>& w) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t C = kChunk;
  acc_t* S = w.S.data();  // [MP, Dv]
  acc_t* z = w.z.data();  // [MP]
  std::fill(S, S + fw.MP * d.Dv, acc_t(0));
  std::fill(z, z + fw.MP, acc_t(0));
  acc_t c = -std::numeric_limits<acc_t>::infinity();
  const acc_t half_rr = acc_t(0.5) * fw.root * fw.root;
  for (int64_t t0 = 0; t0 < d.Nk; t0 += C) {
    const int64_t L = std::min(C, d.Nk - t0);
    // kᵀ [D, C], zero past column L (unscaled: root is in Wr)
    const acc_t* kr = rows_as_acc(k + t0 * fw.D, L, fw.D, w.X.data());
    favor_transpose_rows(kr, L, fw.D, w.XT.data(), C);
    if (L < C)
      for (int64_t e = 0; e < fw.D; ++e) std::fill(w.XT.data() + e * C + L, w.XT.data() + (e + 1) * C, acc_t(0));
    acc_t* FT = w.FT.data();
    gemm(fw.MP, C, fw.D, fw.Wr.data(), fw.D, w.XT.data(), C, FT, C, false);  // lᵀ [MP, C]
    // per key j (a column): |x_j|²/2 and max_m l_mj, the C / W column vectors side by side
    // (independent chains: one vector at a time was bound by the max's latency)
    constexpr int64_t NV = C / W;
    Vec sq[NV], mx[NV];
    for (int64_t q = 0; q < NV; ++q) {
      sq[q] = Vec(acc_t(0));
      mx[q] = Vec(-std::numeric_limits<acc_t>::infinity());
    }
    for (int64_t e = 0; e < fw.D; ++e)
      for (int64_t q = 0; q < NV; ++q) {
        const Vec x = Vec::loadu(w.XT.data() + e * C + q * W);
        sq[q] = at::vec::fmadd(x, x, sq[q]);
      }
    {  // two feature rows a step (2·NV chains: NV alone were bound by the NaN-keeping max's latency)
      Vec mx2[NV];
      for (int64_t q = 0; q < NV; ++q) mx2[q] = mx[q];
      int64_t m = 0;
      for (; m + 2 <= fw.M; m += 2)
        for (int64_t q = 0; q < NV; ++q) {
          mx[q] = at::vec::maximum(mx[q], Vec::loadu(FT + m * C + q * W));
          mx2[q] = at::vec::maximum(mx2[q], Vec::loadu(FT + (m + 1) * C + q * W));
        }
      for (; m < fw.M; ++m)
        for (int64_t q = 0; q < NV; ++q) mx[q] = at::vec::maximum(mx[q], Vec::loadu(FT + m * C + q * W));
      for (int64_t q = 0; q < NV; ++q) mx[q] = at::vec::maximum(mx[q], mx2[q]);
    }
    for (int64_t q = 0; q < NV; ++q) {
      const Vec hn = sq[q] * Vec(half_rr);
      hn.store(w.hn.data() + q * W);
      (mx[q] - hn).store(w.cand.data() + q * W);
    }
    const acc_t rescale = favor_key_features(c, w.cand.data(), w.hn.data(), L, fw, FT, w.zc.data());
    const acc_t* vr = rows_as_acc(v + t0 * d.Dv, L, d.Dv, w.Vc.data());  // [L, Dv]
    gemm(fw.MP, d.Dv, L, FT, C, vr, d.Dv, w.tmp.data(), d.Dv, false);  // φᵀV [MP, Dv]
    // S = r S + φᵀV, z = r z + Σ φ: the chunk's sum added once (blocked summation, as add_product)
    const Vec r(rescale);
    const int64_t n = fw.MP * d.Dv;
    int64_t i = 0;
    for (; i + W <= n; i += W) at::vec::fmadd(Vec::loadu(S + i), r, Vec::loadu(w.tmp.data() + i)).store(S + i);
    for (; i < n; ++i) S[i] = S[i] * rescale + w.tmp[i];
    for (int64_t m = 0; m < fw.MP; ++m) z[m] = z[m] * rescale + w.zc[m];
  }
  return c;
}

// dx rows [L, D] from dl = dφ ⊙ φ [C, MP] and rs[i] = Σ_m dl_im: dx = dl (root·W) − root²·x rs
// (X the unscaled input rows [L, D]); the GEMM writes straight into dx when it is acc_t.
template <typename scalar_t, typename acc_t>
void favor_input_grad(const acc_t* dl, const acc_t* rs, const acc_t* X, int64_t L, const FavorW<acc_t>& fw, acc_t* dX,
                      scalar_t* dx) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  acc_t* out = nullptr;
  if constexpr (std::is_same_v<scalar_t, acc_t>) out = dx; else out = dX;
  gemm(L, fw.D, fw.MP, dl, fw.MP, fw.Wr.data(), fw.D, out, fw.D, false);
  const acc_t rr = fw.root * fw.root;
  for (int64_t i = 0; i < L; ++i) {
    acc_t* o = out + i * fw.D;
    const acc_t* x = X + i * fw.D;
    const acc_t b = rr * rs[i];
    int64_t e = 0;
    for (; e + W <= fw.D; e += W) at::vec::fnmadd(Vec::loadu(x + e), Vec(b), Vec::loadu(o + e)).store(o + e);
    for (; e < fw.D; ++e) o[e] -= x[e] * b;
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(out, dx, L * fw.D);
}

template <typename scalar_t, typename acc_t>
void favor_forward(const Dims& d, const FavorW<acc_t>& fw, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                   acc_t eps, scalar_t* out, acc_t* states, acc_t* shifts, acc_t* feats) {
  at::parallel_for(0, d.B * d.Hk, 1, [&](int64_t begin, int64_t end) {
    FavorScratch<acc_t> w(d, fw);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / d.Hk, g = bg % d.Hk;
      shifts[bg] = favor_state(d, fw, k + bg * d.Nk * fw.D, v + bg * d.Nk * d.Dv, w);
      const acc_t* S = w.S.data();  // [MP, Dv]
      for (int64_t m = 0; m < fw.M; ++m) {  // unpadded [M, Dv + 1]: [S | z]
        acc_t* o = states + (bg * fw.M + m) * (d.Dv + 1);
        std::copy(S + m * d.Dv, S + (m + 1) * d.Dv, o);
        o[d.Dv] = w.z[m];
      }
      for (int64_t hh = 0; hh < d.G; ++hh) {
        const int64_t bh = b * d.Hq + g * d.G + hh;
        for (int64_t t0 = 0; t0 < d.Nq; t0 += kChunk) {
          const int64_t L = std::min(kChunk, d.Nq - t0);
          const acc_t* qr = rows_as_acc(q + (bh * d.Nq + t0) * fw.D, L, fw.D, w.X.data());
          // φ(q) [L, MP]: straight into the saved features when the backward is to read them
          acc_t* F = feats != nullptr ? feats + (bh * d.Nq + t0) * fw.MP : w.F.data();
          favor_row_features(qr, L, fw, true, acc_t(0), F, w.z.data(), w.den.data(), feats == nullptr);
          scalar_t* o = out + (bh * d.Nq + t0) * d.Dv;
          acc_t* num = nullptr;  // [L, Dv], in place in out when it is acc_t
          if constexpr (std::is_same_v<scalar_t, acc_t>) num = o; else num = w.dN.data();
          gemm(L, d.Dv, fw.MP, F, fw.MP, S, d.Dv, num, d.Dv, false);
          for (int64_t i = 0; i < L; ++i) {
            const acc_t inv = acc_t(1) / (w.den[i] + eps);
            for (int64_t e = 0; e < d.Dv; ++e) o[i * d.Dv + e] = static_cast<scalar_t>(num[i * d.Dv + e] * inv);
          }
        }
      }
    }
  });
}

// Per kv head: the forward's S' = [S | z] and key shift c (saved: the state pass is two of the
// ten GEMMs a recomputing backward would run), then per query head and chunk, with
// H = g Sᵀ [L, M], r = 1 / den, s = −(φ(q)·H) r²: dN' = [g r | s] and dS'ᵀ += dN'ᵀ φ(q)
// (dN' [C, Dv + 1] is the operand transposed, not φ(q) [C, MP]: a quarter of the words), and
// dl = (r H + s zᵀ) ⊙ φ(q) with its row sums in one pass; then per key chunk, with
// dS' = [dS | dz]: dl = (V dSᵀ + dz) ⊙ φ(k) (the ones column of V' as a row added in that
// pass) and dV = φ(k) dS. dS' sums its query heads in head order in the task: deterministic.
template <typename scalar_t, typename acc_t>
void favor_backward(const Dims& d, const FavorW<acc_t>& fw, const scalar_t* dout, const scalar_t* q, const scalar_t* k,
                    const scalar_t* v, const acc_t* states, const acc_t* shifts, const acc_t* feats, acc_t eps,
                    scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t C = kChunk;
  const int64_t Dv1 = d.Dv + 1;
  at::parallel_for(0, d.B * d.Hk, 1, [&](int64_t begin, int64_t end) {
    FavorScratch<acc_t> w(d, fw);
    std::vector<acc_t> Gd(C * d.DvP);
    acc_t rs[C];
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / d.Hk, g = bg % d.Hk;
      const acc_t c = shifts[bg];
      std::fill(w.S.begin(), w.S.end(), acc_t(0));
      for (int64_t m = 0; m < fw.M; ++m)
        std::copy(states + (bg * fw.M + m) * Dv1, states + (bg * fw.M + m + 1) * Dv1, w.S.data() + m * d.DvP);
      transpose(fw.MP, Dv1, w.S.data(), d.DvP, w.ST.data(), fw.MP);  // S'ᵀ [Dv + 1, MP]
      const acc_t* z = w.ST.data() + d.Dv * fw.MP;                   // S'[:, Dv], [MP]
      acc_t* dST = w.dST.data();                                     // dS'ᵀ [Dv + 1, MP]
      std::fill(dST, dST + Dv1 * fw.MP, acc_t(0));
      for (int64_t hh = 0; hh < d.G; ++hh) {
        const int64_t bh = b * d.Hq + g * d.G + hh;
        for (int64_t t0 = 0; t0 < d.Nq; t0 += C) {
          const int64_t L = std::min(C, d.Nq - t0);
          const int64_t row = bh * d.Nq + t0;
          const acc_t* qr = rows_as_acc(q + row * fw.D, L, fw.D, w.X.data());
          const acc_t* F = w.F.data();  // φ(q) [L, MP]: the forward's, or recomputed by the same code
          if (feats != nullptr) {
            F = feats + row * fw.MP;
            for (int64_t i = 0; i < L; ++i) w.den[i] = favor_den(F + i * fw.MP, z, fw.M);
          } else {
            favor_row_features(qr, L, fw, true, acc_t(0), w.F.data(), z, w.den.data());
          }
          const acc_t* gr = rows_as_acc(dout + row * d.Dv, L, d.Dv, Gd.data());          // g [L, Dv]
          acc_t* H = w.H.data();
          gemm(L, fw.MP, d.Dv, gr, d.Dv, w.ST.data(), fw.MP, H, fw.MP, false);  // H [L, MP]
          for (int64_t i = 0; i < L; ++i) {
            const acc_t* Fi = F + i * fw.MP;
            acc_t* Hi = H + i * fw.MP;
            const acc_t r = acc_t(1) / (w.den[i] + eps);
            const acc_t sv = -vdot(Fi, Hi, fw.MP) * r * r;
            acc_t* o = w.dN.data() + i * d.DvP;
            const acc_t* gi = gr + i * d.Dv;
            int64_t e = 0;
            for (; e + W <= d.Dv; e += W) (Vec::loadu(gi + e) * Vec(r)).store(o + e);
            for (; e < d.Dv; ++e) o[e] = gi[e] * r;
            o[d.Dv] = sv;
            Vec acc(acc_t(0));
            for (int64_t m = 0; m < fw.MP; m += W) {  // dl = dφ(q) ⊙ φ(q) in place of H
              const Vec dl = at::vec::fmadd(Vec::loadu(Hi + m), Vec(r), Vec::loadu(z + m) * Vec(sv)) * Vec::loadu(Fi + m);
              dl.store(Hi + m);
              acc = acc + dl;
            }
            rs[i] = common::hsum(acc);
          }
          favor_transpose_rows(w.dN.data(), L, Dv1, w.dNT.data(), C, d.DvP);                   // [Dv + 1, L]
          add_product(Dv1, fw.MP, L, w.dNT.data(), C, F, fw.MP, dST, fw.MP, w.tmp.data());  // dS'ᵀ += dN'ᵀ φ
          favor_input_grad(H, rs, qr, L, fw, w.dX.data(), dq + row * fw.D);
        }
      }
      acc_t* dS = w.dS.data();
      transpose(d.Dv, fw.MP, dST, fw.MP, dS, d.Dv);  // dS [MP, Dv]
      const acc_t* dz = dST + d.Dv * fw.MP;         // [MP]
      for (int64_t t0 = 0; t0 < d.Nk; t0 += C) {
        const int64_t L = std::min(C, d.Nk - t0);
        const int64_t row = bg * d.Nk + t0;
        const acc_t* kr = rows_as_acc(k + row * fw.D, L, fw.D, w.X.data());
        favor_row_features(kr, L, fw, false, c, w.F.data());  // φ(k) [C, MP]
        const acc_t* vr = rows_as_acc(v + row * d.Dv, L, d.Dv, w.Vc.data());
        acc_t* H = w.H.data();
        gemm(L, fw.MP, d.Dv, vr, d.Dv, dST, fw.MP, H, fw.MP, false);  // V dSᵀ [L, MP]
        for (int64_t i = 0; i < L; ++i) {
          acc_t* Hi = H + i * fw.MP;
          const acc_t* Fi = w.F.data() + i * fw.MP;
          Vec acc(acc_t(0));
          for (int64_t m = 0; m < fw.MP; m += W) {  // dl = (V dSᵀ + dz) ⊙ φ(k)
            const Vec dl = (Vec::loadu(Hi + m) + Vec::loadu(dz + m)) * Vec::loadu(Fi + m);
            dl.store(Hi + m);
            acc = acc + dl;
          }
          rs[i] = common::hsum(acc);
        }
        acc_t* dvr = nullptr;  // dV = φ(k) dS [L, Dv], straight into dv when it is acc_t
        if constexpr (std::is_same_v<scalar_t, acc_t>) dvr = dv + row * d.Dv; else dvr = w.dN.data();
        gemm(L, d.Dv, fw.MP, w.F.data(), fw.MP, dS, d.Dv, dvr, d.Dv, false);
        if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(dvr, dv + row * d.Dv, L * d.Dv);
        favor_input_grad(H, rs, kr, L, fw, w.dX.data(), dk + row * fw.D);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// FAVOR+ on the matrix units (bf16 inputs where common::matrix_units_available; see favor_on_matrix_units):
// the same passes as favor_forward / favor_backward, every GEMM on 16-bit operands with
// fp32 accumulation (common::vnni_gemm). The features are computed and kept in fp32 and
// rounded to the input dtype only as GEMM operands (as FlashAttention rounds P); the
// state S', its gradient dS' and every sum stay fp32 (S' and dS' are rounded to the
// input dtype once per kv head when packed as a B operand). The input rows of q, k and
// dout are the A operands as they are in memory, with sqrt(scale) folded into W.
// Needs D and Dv even (VNNI pairs); otherwise the fp32 path runs.

// dst = VNNI layout of a K x N matrix given by get(k, n): element (k, n) at
// dst[(k / 2) * 2 * N + 2 * n + k % 2]; a zero row pads odd K.
template <typename T, typename Get>
void pack_vnni(int64_t K, int64_t N, Get get, T* dst) {
  for (int64_t k = 0; k < K + (K & 1); ++k)
    for (int64_t n = 0; n < N; ++n) dst[(k / 2) * 2 * N + 2 * n + k % 2] = k < K ? T(get(k, n)) : T(0);
}

// dst = VNNI layout of src [K, N] row-major (16-bit, K even): rows 2p and 2p + 1 interleaved,
// a plain loop of 16-bit moves the compiler vectorises (pack_vnni's per-element getter and
// its row test cost as much as the chunk's GEMM on the matrix units).
template <typename T>
void interleave_vnni(const T* src, int64_t K, int64_t N, T* dst) {
  static_assert(sizeof(T) == 2, "VNNI pairs of 16-bit elements");
  for (int64_t p = 0; p < K / 2; ++p) {
    const uint16_t* a = reinterpret_cast<const uint16_t*>(src + 2 * p * N);
    const uint16_t* b = a + N;
    uint32_t* o = reinterpret_cast<uint32_t*>(dst + 2 * p * N);  // one (a, b) pair per 32-bit word
    for (int64_t n = 0; n < N; ++n) o[n] = uint32_t(a[n]) | (uint32_t(b[n]) << 16);
  }
}

template <typename T>
struct FavorMx {
  std::vector<T> W;    // [MP, D] row-major, root·W: A of the transposed key projection
  std::vector<T> WTv;  // VNNI [D, MP] of (root·W)ᵀ: B of the row-layout projections
  std::vector<T> Wv;   // VNNI [MP, D] of W: B of dl·W
  FavorMx(const FavorW<float>& fw) : W(fw.MP * fw.D), WTv(fw.D * fw.MP), Wv(fw.MP * fw.D) {
    for (int64_t i = 0; i < fw.MP * fw.D; ++i) W[i] = T(fw.root * fw.W[i]);
    pack_vnni(fw.D, fw.MP, [&](int64_t e, int64_t m) { return fw.WTr[e * fw.MP + m]; }, WTv.data());
    pack_vnni(fw.MP, fw.D, [&](int64_t m, int64_t e) { return fw.W[m * fw.D + e]; }, Wv.data());
  }
};

template <typename T>
struct FavorMxScratch {
  std::vector<T> XTv, F16, F16T, Vv, V16, Sv, STv, dSv, dSTv, dNv;
  FavorMxScratch(const Dims& d, const FavorW<float>& fw)
      : XTv(fw.D * kChunk), F16(kChunk * fw.MP), F16T(fw.MP * kChunk), Vv(kChunk * d.DvP), V16(kChunk * d.DvP),
        Sv(fw.MP * d.DvP), STv(d.DvP * fw.MP), dSv(fw.MP * d.DvP), dSTv(d.DvP * fw.MP), dNv(kChunk * d.DvP) {}
};

// |x_i|²/2 of rows [0, L) of src [*, D], x = root·src, into hn[i].
template <typename T>
void half_norms(const T* src, int64_t L, int64_t D, float root, float* hn, float* row) {
  for (int64_t i = 0; i < L; ++i) {
    at::vec::convert(src + i * D, row, D);
    hn[i] = 0.5f * root * root * sq_norm(row, D);  // vectorised: a scalar sum is one serial chain
  }
}

#ifdef ATTNKERNELS_NATIVE_BF16
// The exp and rounding passes of FAVOR+ for bf16 where the CPU has AVX512-BF16 (bf16_native_ok):
// the exp by common::exp2_poly4 (max relative error 3.1e-6, the softmax kernels' bf16 P: the
// features are rounded to bf16 GEMM operands, 2^-9, and their fp32 sums / the saved φ(q) carry
// the 3.1e-6), the rounding by vcvtne2ps2bf16, one pass. With exp_u20 and at::vec's software
// rounding (~10 ops per 16 values) the exp passes were 21% of a bf16 forward (perf, Zen 4); these
// made it ~10% faster (B1 H8 N1024 D64 M256, 1 thread, Zen 5, process-alternating A/B).
// exp(l - bias - ln(M)/2) = 2^(l·log2e - (bias + ln(M)/2)·log2e), the FMA of the softmax kernels.
using common::kLog2e;

// Lanes of the 16 columns from j that lie below n.
inline __mmask16 lanes_below(int64_t j, int64_t n) {
  return n - j >= 16 ? __mmask16(0xFFFF) : n <= j ? __mmask16(0) : __mmask16((1u << (n - j)) - 1);
}

// mx_row_features (below) on AVX512-BF16.
__attribute__((target("avx512bf16"))) void mx_row_features_bf16(int64_t L, const FavorW<float>& fw, const float* key_bias,
                                                                const float* F, float* phi, at::BFloat16* F16,
                                                                const float* z, float* den) {
  // fw's fields in locals: the 16-bit stores may alias anything, and the compiler reloaded the
  // loop bounds from fw after each one
  const int64_t M = fw.M, MP = fw.MP;
  const float log_root = fw.log_root;
  const __m512 va = _mm512_set1_ps(kLog2e);
  for (int64_t i = 0; i < L; ++i) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    const float* row = F + i * MP;
    float* out = phi == nullptr ? nullptr : phi + i * MP;
    at::BFloat16* row16 = F16 + i * MP;
    // the query's row max by plain vmaxps (row_max_fast): at::vec::maximum's NaN-propagating max
    // and reduction were a quarter of this pass (perf annotate, Zen 5). A NaN logit still
    // poisons its row through the exp; a max of -inf (no finite logit) is taken again exactly.
    float bias = key_bias != nullptr ? key_bias[i] : common::row_max_fast(row, M);
    if (key_bias == nullptr && bias == -std::numeric_limits<float>::infinity()) bias = common::row_max(row, M);
    const __m512 vnb = _mm512_set1_ps(-(bias + log_root) * kLog2e);
    for (int64_t m = 0; m < MP; m += 32) {  // MP is a multiple of 16; columns past M are zero
      const __mmask16 k0 = lanes_below(m, M), k1 = lanes_below(m + 16, M);
      const __m512 e0 = _mm512_maskz_mov_ps(k0, common::exp2_poly4(_mm512_fmadd_ps(_mm512_loadu_ps(row + m), va, vnb)));
      if (out != nullptr) _mm512_storeu_ps(out + m, e0);
      if (z != nullptr) acc0 = _mm512_fmadd_ps(e0, _mm512_loadu_ps(z + m), acc0);
      if (m + 16 < MP) {
        const __m512 e1 =
            _mm512_maskz_mov_ps(k1, common::exp2_poly4(_mm512_fmadd_ps(_mm512_loadu_ps(row + m + 16), va, vnb)));
        if (out != nullptr) _mm512_storeu_ps(out + m + 16, e1);
        if (z != nullptr) acc1 = _mm512_fmadd_ps(e1, _mm512_loadu_ps(z + m + 16), acc1);
        _mm512_storeu_si512(reinterpret_cast<void*>(row16 + m), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row16 + m), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e0)));
      }
    }
    if (z != nullptr) den[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
  if (L & 1) std::fill(F16 + L * MP, F16 + (L + 1) * MP, at::BFloat16(0));
}

// favor_key_features' exp pass on AVX512-BF16 (after favor_update_shift), rounded straight into
// F16T [MP, kChunk] (the fp32 φᵀ is not kept: the state reads only F16T and the sums): logits
// lᵀ = FT [MP, kChunk], bias |x_j|²/2 + c with hn[j] = |x_j|²/2; zero past L and M; zsum[m] =
// Σ_j φ_mj. The bias and exp arithmetic of mx_row_features_bf16, which the backward's φ(k) runs.
__attribute__((target("avx512bf16"))) void mx_key_features_bf16(const float* hn, float c, int64_t L, const FavorW<float>& fw,
                                                                const float* FT, at::BFloat16* F16T, float* zsum) {
  constexpr int64_t C = kChunk;
  static_assert(C % 32 == 0, "the chunk is a whole number of 32-value roundings");
  const __m512 va = _mm512_set1_ps(kLog2e);
  alignas(64) float nb[C];  // -(|x_j|²/2 + c + ln(M)/2)·log2e
  for (int64_t j = 0; j < C; ++j) nb[j] = -((hn[j] + c) + fw.log_root) * kLog2e;
  for (int64_t m = 0; m < fw.M; ++m) {
    const float* row = FT + m * C;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < C; j += 32) {
      const __m512 e0 = _mm512_maskz_mov_ps(
          lanes_below(j, L), common::exp2_poly4(_mm512_fmadd_ps(_mm512_loadu_ps(row + j), va, _mm512_load_ps(nb + j))));
      const __m512 e1 = _mm512_maskz_mov_ps(lanes_below(j + 16, L),
                                            common::exp2_poly4(_mm512_fmadd_ps(_mm512_loadu_ps(row + j + 16), va,
                                                                               _mm512_load_ps(nb + j + 16))));
      acc = _mm512_add_ps(_mm512_add_ps(acc, e0), e1);
      _mm512_storeu_si512(reinterpret_cast<void*>(F16T + m * C + j), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
    }
    zsum[m] = _mm512_reduce_add_ps(acc);
  }
  std::fill(F16T + fw.M * C, F16T + fw.MP * C, at::BFloat16(0));
  std::fill(zsum + fw.M, zsum + fw.MP, 0.f);
}

// store_rounded_row (below) on AVX512-BF16.
template <typename DlAt>
__attribute__((target("avx512bf16"))) float store_rounded_row_bf16(int64_t MP, const DlAt& dl_at, at::BFloat16* out) {
  __m512 acc = _mm512_setzero_ps();
  int64_t m = 0;
  for (; m + 32 <= MP; m += 32) {
    const __m512 a = dl_at(m), b = dl_at(m + 16);
    acc = _mm512_add_ps(_mm512_add_ps(acc, a), b);
    _mm512_storeu_si512(reinterpret_cast<void*>(out + m), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
  }
  if (m < MP) {
    const __m512 a = dl_at(m);
    acc = _mm512_add_ps(acc, a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(a)));
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

// φ rows from logits F [L, MP] (fp32) with per-row bias b_i (queries: the row max, keys:
// |x_i|²/2 + c): the fp32 rows into phi [L, MP] (F itself, the forward's saved features, or
// nullptr where only the rounded rows are read: the forward without a backward), the rounded
// copy into F16 [L + L % 2, MP] made in the same pass; the columns past M, and the F16 row that
// pads an odd L to a VNNI pair, zero. With z [MP] given, also den[i] = φ_i · z in fp32 (the
// forward's denominator, summed while the row is in registers).
template <typename T>
void mx_row_features(int64_t L, const FavorW<float>& fw, const float* key_bias, float* F, float* phi, T* F16,
                     const float* z = nullptr, float* den = nullptr) {
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>)
    if (common::bf16_native_ok()) return mx_row_features_bf16(L, fw, key_bias, F, phi, F16, z, den);
#endif
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const Vec lr(fw.log_root);
  for (int64_t i = 0; i < L; ++i) {
    float* row = F + i * fw.MP;
    T* row16 = F16 + i * fw.MP;
    const float bias = key_bias == nullptr ? common::row_max(row, fw.M) : key_bias[i];
    const Vec b(bias);
    int64_t m = 0;
    for (; m + 2 * W <= fw.M; m += 2 * W) {
      const Vec e0 = common::vexp((Vec::loadu(row + m) - b) - lr), e1 = common::vexp((Vec::loadu(row + m + W) - b) - lr);
      e0.store(row + m);
      e1.store(row + m + W);
      at::vec::convert_from_float<T>(e0, e1).store(row16 + m);
    }
    for (; m < fw.M; ++m) row[m] = std::exp((row[m] - bias) - fw.log_root);
    std::fill(row + fw.M, row + fw.MP, 0.f);
    const int64_t done = fw.M / (2 * W) * (2 * W);
    at::vec::convert(row + done, row16 + done, fw.MP - done);
    if (z != nullptr) den[i] = vdot(row, z, fw.MP);
  }
  if (phi != nullptr && phi != F) std::copy(F, F + L * fw.MP, phi);
  if (L & 1) std::fill(F16 + L * fw.MP, F16 + (L + 1) * fw.MP, T(0));
}

// out rows [L, Dv] in T from num' [L, DvP] (fp32, scaled in place): num / (den + eps).
template <typename T>
void mx_store_output(float* num, int64_t L, const Dims& d, float eps, T* out) {
  using Vec = at::vec::Vectorized<float>;
  for (int64_t i = 0; i < L; ++i) {
    float* n = num + i * d.DvP;
    const Vec inv(1.f / (n[d.Dv] + eps));
    for (int64_t c = 0; c < d.DvP; c += Vec::size()) (Vec::loadu(n + c) * inv).store(n + c);
    cvt_row(n, out + i * d.Dv, d.Dv);
  }
}

// V' = [V | 1 | 0...] rows [0, L) in the input dtype into dst [kChunk, DvP]; padding rows zero.
// (Vector moves: std::copy made a memmove call of each 128-byte row.)
template <typename T>
void load_values16(const T* src, int64_t L, const Dims& d, T* dst) {
  using Vec = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < L; ++i) {
    T* o = dst + i * d.DvP;
    const T* r = src + i * d.Dv;
    int64_t e = 0;
    for (; e + Vec::size() <= d.Dv; e += Vec::size()) Vec::loadu(r + e).store(o + e);
    if (e < d.Dv) Vec::loadu(r + e, d.Dv - e).store(o + e, d.Dv - e);
    o[d.Dv] = T(1);
    std::fill(o + d.Dv + 1, o + d.DvP, T(0));
  }
  std::fill(dst + L * d.DvP, dst + kChunk * d.DvP, T(0));
}

// The value columns of V rows [0, L) straight into the state GEMM's B: VNNI pairs [Le / 2, DvP, 2]
// (rows 2p and 2p + 1 in one 32-bit word per column), Le = L + L % 2, the pad row zero. Only the
// Dv value columns are written: the forward's state GEMM reads no more (z comes from the exp
// pass). One pass, in place of load_values16 and interleave_vnni of the copy.
template <typename T>
void load_value_pairs(const T* src, int64_t L, const Dims& d, T* dst) {
  static_assert(sizeof(T) == 2, "VNNI pairs of 16-bit elements");
  for (int64_t p = 0; 2 * p < L; ++p) {
    const uint16_t* a = reinterpret_cast<const uint16_t*>(src + 2 * p * d.Dv);
    uint32_t* o = reinterpret_cast<uint32_t*>(dst + 2 * p * d.DvP);
    if (2 * p + 1 < L) {
      const uint16_t* b = a + d.Dv;
      for (int64_t n = 0; n < d.Dv; ++n) o[n] = uint32_t(a[n]) | (uint32_t(b[n]) << 16);
    } else {
      for (int64_t n = 0; n < d.Dv; ++n) o[n] = a[n];
    }
  }
}

// favor_state on the matrix units: lᵀ = (root·W) kᵀ with kᵀ's VNNI pairs (a 32-bit transpose
// of the chunk), φᵀ rounded, S' += φᵀ V' with V' packed.
template <typename T>
float mx_favor_state(const Dims& d, const FavorW<float>& fw, const FavorMx<T>& mx, const T* k, const T* v,
                     FavorScratch<float>& w, FavorMxScratch<T>& x) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t C = kChunk;
  float* S = w.S.data();
  std::fill(S, S + fw.MP * d.DvP, 0.f);
  float c = -std::numeric_limits<float>::infinity();
  for (int64_t t0 = 0; t0 < d.Nk; t0 += C) {
    const int64_t L = std::min(C, d.Nk - t0);
    const T* src = k + t0 * fw.D;
    // kᵀ in VNNI: word (p, j) = k[j, 2p .. 2p + 1]  [D / 2, C, 2]
    // (a float transpose moves the 32-bit words without arithmetic: bit-exact)
    float* out = reinterpret_cast<float*>(x.XTv.data());
    favor_transpose_rows(reinterpret_cast<const float*>(src), L, fw.D / 2, out, C);
    if (L < C)
      for (int64_t p = 0; p < fw.D / 2; ++p) std::fill(out + p * C + L, out + (p + 1) * C, 0.f);
    float* FT = w.FT.data();
    common::vnni_gemm(fw.MP, C, fw.D, mx.W.data(), fw.D, x.XTv.data(), C, FT, C, false);  // lᵀ [MP, C]
    half_norms(src, L, fw.D, fw.root, w.hn.data(), w.dX.data());
    std::fill(w.hn.begin() + L, w.hn.end(), 0.f);
    {
      // one accumulator per vector of the chunk (4 on AVX-512, 8 on AVX2 / the default build):
      // independent chains, not one latency-bound one; plain vmaxps (max_fast: a NaN logit
      // still poisons the state through its feature's exp)
      constexpr int64_t NV = C / W;
      static_assert(C % W == 0, "the chunk is a whole number of vectors");
      Vec mv[NV];
      for (int64_t q = 0; q < NV; ++q) mv[q] = Vec(-std::numeric_limits<float>::infinity());
      for (int64_t m = 0; m < fw.M; ++m) {
        const float* r = FT + m * C;
        for (int64_t q = 0; q < NV; ++q) mv[q] = common::max_fast(mv[q], Vec::loadu(r + q * W));
      }
      for (int64_t q = 0; q < NV; ++q) (mv[q] - Vec::loadu(w.hn.data() + q * W)).store(w.cand.data() + q * W);
    }
    float rescale;
#ifdef ATTNKERNELS_NATIVE_BF16
    if (std::is_same_v<T, at::BFloat16> && common::bf16_native_ok()) {
      rescale = favor_update_shift(c, w.cand.data(), L);
      mx_key_features_bf16(w.hn.data(), c, L, fw, FT, reinterpret_cast<at::BFloat16*>(x.F16T.data()), w.zc.data());
    } else
#endif
    {
      rescale = favor_key_features(c, w.cand.data(), w.hn.data(), L, fw, FT, w.zc.data());
      at::vec::convert(FT, x.F16T.data(), fw.MP * C);
    }
    load_value_pairs(v + t0 * d.Dv, L, d, x.Vv.data());  // [Le / 2, DvP, 2]
    const int64_t Le = L + (L & 1);
    // S' = r S' + φᵀV', accumulated by the tile unit in fp32 (no chunk partial written and
    // added back: at bf16 operands the summation order is far below their rounding). The GEMM
    // covers the Dv value columns only: the ones column z += Σ_j φ_j comes from the exp pass's
    // fp32 row sums (a 1-column tail strip cost as much as 16 columns: 1/5 of the GEMM at Dv 64).
    if (rescale != 1.f)
      for (int64_t i = 0; i < fw.MP * d.DvP; ++i) S[i] *= rescale;
    common::vnni_gemm(fw.MP, d.Dv, Le, x.F16T.data(), C, x.Vv.data(), d.DvP, S, d.DvP, true);
    for (int64_t m = 0; m < fw.MP; ++m) S[m * d.DvP + d.Dv] += w.zc[m];
  }
  return c;
}

template <typename T>
void mx_favor_forward_impl(const Dims& d, const FavorW<float>& fw, const T* q, const T* k, const T* v, float eps, T* out,
                           float* states, float* shifts, float* feats) {
  const FavorMx<T> mx(fw);
  at::parallel_for(0, d.B * d.Hk, 1, [&](int64_t begin, int64_t end) {
    FavorScratch<float> w(d, fw);
    FavorMxScratch<T> x(d, fw);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / d.Hk, g = bg % d.Hk;
      shifts[bg] = mx_favor_state(d, fw, mx, k + bg * d.Nk * fw.D, v + bg * d.Nk * d.Dv, w, x);
      const float* S = w.S.data();
      for (int64_t m = 0; m < fw.M; ++m)
        std::copy(S + m * d.DvP, S + m * d.DvP + d.Dv + 1, states + (bg * fw.M + m) * (d.Dv + 1));
      cvt_row(S, x.dSv.data(), fw.MP * d.DvP);  // dSv is free in the forward
      interleave_vnni(x.dSv.data(), fw.MP, d.DvP, x.Sv.data());
      float* z = w.z.data();  // the ones column of S' in fp32 [MP]
      for (int64_t m = 0; m < fw.MP; ++m) z[m] = S[m * d.DvP + d.Dv];
      for (int64_t hh = 0; hh < d.G; ++hh) {
        const int64_t bh = b * d.Hq + g * d.G + hh;
        // (12 to 64 query rows a step measured the same: the 64-row φ [64, MP] fp32 outgrowing L1
        // costs nothing visible)
        for (int64_t t0 = 0; t0 < d.Nq; t0 += kChunk) {
          const int64_t L = std::min(kChunk, d.Nq - t0);
          const T* qs = q + (bh * d.Nq + t0) * fw.D;
          float* F = w.F.data();  // [L, MP]
          common::vnni_gemm(L, fw.MP, fw.D, qs, fw.D, mx.WTv.data(), fw.MP, F, fw.MP, false);  // l [L, MP]
          // φ(q) written straight into the saved features (MP == M, checked at entry), or not at all
          float* phi = feats == nullptr ? nullptr : feats + (bh * d.Nq + t0) * fw.M;
          mx_row_features(L, fw, nullptr, F, phi, x.F16.data(), w.z.data(), w.den.data());
          // num' [L, Dv] on the matrix units; the denominator φ·z from the exp pass, in fp32 (in the
          // GEMM, z's 1-column tail strip cost as much as 16 value columns)
          common::vnni_gemm(L, d.Dv, fw.MP, x.F16.data(), fw.MP, x.Sv.data(), d.DvP, w.dN.data(), d.DvP, false);
          for (int64_t i = 0; i < L; ++i) w.dN[i * d.DvP + d.Dv] = w.den[i];
          mx_store_output(w.dN.data(), L, d, eps, out + (bh * d.Nq + t0) * d.Dv);
        }
      }
    }
    common::vnni_release();
  });
}

// One row of dl = dφ ⊙ φ, rounded into out [MP] (the A operand of dl·W) as it is made, with its
// fp32 sum returned; dl_at(m) gives the fp32 vector at column m (MP a multiple of the width).
template <typename T, typename DlAt>
float store_rounded_row(int64_t MP, const DlAt& dl_at, T* out) {
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>)
    if (common::bf16_native_ok()) return store_rounded_row_bf16(MP, dl_at, out);
#endif
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  Vec acc(0.f);
  int64_t m = 0;
  for (; m + 2 * W <= MP; m += 2 * W) {
    const Vec a = dl_at(m), b = dl_at(m + W);
    acc = (acc + a) + b;
    at::vec::convert_from_float<T>(a, b).store(out + m);
  }
  if (m < MP) {
    const Vec a = dl_at(m);
    acc = acc + a;
    at::vec::convert_from_float<T>(a, Vec(0.f)).store(out + m, W);
  }
  return common::hsum(acc);
}

// dx rows from dl (rounded, [C, MP]) and its fp32 row sums rs, dl·W on the matrix units.
template <typename T>
void mx_input_grad(const T* dl16, const float* rs, const T* src, int64_t L, const FavorW<float>& fw, const FavorMx<T>& mx,
                   float* dX, float* xs, T* dx) {
  common::vnni_gemm(L, fw.D, fw.MP, dl16, fw.MP, mx.Wv.data(), fw.D, dX, fw.D, false);  // dl W [L, D]
  at::vec::convert(src, xs, L * fw.D);  // [L, D]
  for (int64_t i = 0; i < L; ++i) {
    const float a = fw.root, b = fw.root * fw.root * rs[i];
    for (int64_t e = 0; e < fw.D; ++e) dX[i * fw.D + e] = a * dX[i * fw.D + e] - b * xs[i * fw.D + e];
  }
  cvt_row(dX, dx, L * fw.D);
}

// The same passes as favor_backward on the matrix units: dS'ᵀ += dN'ᵀ φ(q) with dN'ᵀ [Dv + 1, C]
// the rounded A operand and φ(q)'s rounded rows paired into VNNI as B (not φ(q) transposed in
// fp32 and rounded again: 4x the words), and dl = dφ ⊙ φ with its row sums in the pass that
// builds dφ.
template <typename T>
void mx_favor_backward_impl(const Dims& d, const FavorW<float>& fw, const T* dout, const T* q, const T* k, const T* v,
                            const float* states, const float* shifts, const float* feats, float eps, T* dq, T* dk,
                            T* dv) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t C = kChunk;
  const int64_t Dv1 = d.Dv + 1;
  const FavorMx<T> mx(fw);
  at::parallel_for(0, d.B * d.Hk, 1, [&](int64_t begin, int64_t end) {
    FavorScratch<float> w(d, fw);
    FavorMxScratch<T> x(d, fw);
    std::vector<T> dNT16(Dv1 * C), dl16(C * fw.MP);
    float rs[C];
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / d.Hk, g = bg % d.Hk;
      const float c = shifts[bg];
      const float* Sg = states + bg * fw.M * Dv1;  // [M, Dv + 1]
      std::vector<float> z(fw.MP, 0.f);
      for (int64_t m = 0; m < fw.M; ++m) z[m] = Sg[m * Dv1 + d.Dv];
      // B of H = g S[:, :Dv]ᵀ: VNNI [Dv, MP], element (e, m) = S[m, e]
      pack_vnni(d.Dv, fw.MP, [&](int64_t e, int64_t m) { return m < fw.M ? Sg[m * Dv1 + e] : 0.f; }, x.STv.data());
      float* dST = w.dST.data();  // dS'ᵀ [Dv + 1, MP]
      std::fill(dST, dST + Dv1 * fw.MP, 0.f);
      for (int64_t hh = 0; hh < d.G; ++hh) {
        const int64_t bh = b * d.Hq + g * d.G + hh;
        for (int64_t t0 = 0; t0 < d.Nq; t0 += C) {
          const int64_t L = std::min(C, d.Nq - t0);
          const int64_t row = bh * d.Nq + t0;
          const float* Fq = w.F.data();  // φ(q) [L, MP]
          if (feats != nullptr) {  // the forward's φ(q) rows (MP == M), read in place, rounded as mx_row_features does
            Fq = feats + row * fw.MP;
            cvt_row(Fq, x.F16.data(), L * fw.MP);
            std::fill(x.F16.data() + L * fw.MP, x.F16.data() + (L + (L & 1)) * fw.MP, T(0));
          } else {
            common::vnni_gemm(L, fw.MP, fw.D, q + row * fw.D, fw.D, mx.WTv.data(), fw.MP, w.F.data(), fw.MP, false);
            mx_row_features(L, fw, nullptr, w.F.data(), w.F.data(), x.F16.data());
          }
          float* H = w.H.data();
          common::vnni_gemm(L, fw.MP, d.Dv, dout + row * d.Dv, d.Dv, x.STv.data(), fw.MP, H, fw.MP, false);  // H [L, MP]
          const T* gs = dout + row * d.Dv;
          for (int64_t i = 0; i < L; ++i) {
            const float* Fi = Fq + i * fw.MP;
            float* Hi = H + i * fw.MP;
            const float r = 1.f / (vdot(Fi, z.data(), fw.MP) + eps);
            const float s = -vdot(Fi, Hi, fw.MP) * r * r;
            float* o = w.dN.data() + i * d.DvP;
            at::vec::convert(gs + i * d.Dv, o, d.Dv);
            int64_t e = 0;
            for (; e + Vec::size() <= d.Dv; e += Vec::size()) (Vec::loadu(o + e) * Vec(r)).store(o + e);
            for (; e < d.Dv; ++e) o[e] *= r;
            o[d.Dv] = s;
            const float* zp = z.data();
            rs[i] = store_rounded_row(fw.MP, [&](int64_t m) {  // dl = dφ(q) ⊙ φ(q)
              return at::vec::fmadd(Vec::loadu(Hi + m), Vec(r), Vec::loadu(zp + m) * Vec(s)) * Vec::loadu(Fi + m);
            }, dl16.data() + i * fw.MP);
          }
          const int64_t Le = L + (L & 1);
          favor_transpose_rows(w.dN.data(), L, Dv1, w.dNT.data(), C, d.DvP);  // [Dv + 1, L]
          if (Le > L)
            for (int64_t e = 0; e < Dv1; ++e) w.dNT[e * C + L] = 0.f;
          for (int64_t e = 0; e < Dv1; ++e) cvt_row(w.dNT.data() + e * C, dNT16.data() + e * C, Le);
          interleave_vnni(x.F16.data(), Le, fw.MP, x.F16T.data());  // φ(q) rows paired, VNNI [Le, MP]
          // (Tried: the saved rows paired and rounded in one pass by round_vnni_pairs, as mx_gemm's
          // B: 5% slower fwd+bwd than this rounded copy and interleave, in-process A/B, Zen 5.)
          common::vnni_gemm(Dv1, fw.MP, Le, dNT16.data(), C, x.F16T.data(), fw.MP, dST, fw.MP, true);  // dS'ᵀ += dN'ᵀ φ
          mx_input_grad(dl16.data(), rs, q + row * fw.D, L, fw, mx, w.dX.data(), w.X.data(), dq + row * fw.D);
        }
      }
      float* dS = w.dS.data();  // [MP, DvP], zero past Dv + 1
      std::fill(dS, dS + fw.MP * d.DvP, 0.f);
      transpose(Dv1, fw.MP, dST, fw.MP, dS, d.DvP);
      cvt_row(dS, x.Sv.data(), fw.MP * d.DvP);  // Sv is free in the backward
      interleave_vnni(x.Sv.data(), fw.MP, d.DvP, x.dSv.data());
      std::fill(dST + Dv1 * fw.MP, dST + d.DvP * fw.MP, 0.f);  // [DvP, MP]
      cvt_row(dST, x.Sv.data(), d.DvP * fw.MP);
      interleave_vnni(x.Sv.data(), d.DvP, fw.MP, x.dSTv.data());
      for (int64_t t0 = 0; t0 < d.Nk; t0 += C) {
        const int64_t L = std::min(C, d.Nk - t0);
        const int64_t row = bg * d.Nk + t0;
        const T* ks = k + row * fw.D;
        common::vnni_gemm(L, fw.MP, fw.D, ks, fw.D, mx.WTv.data(), fw.MP, w.F.data(), fw.MP, false);
        half_norms(ks, L, fw.D, fw.root, w.hn.data(), w.dX.data());
        for (int64_t i = 0; i < L; ++i) w.hn[i] += c;
        mx_row_features(L, fw, w.hn.data(), w.F.data(), w.F.data(), x.F16.data());  // φ(k) [C, MP]
        load_values16(v + row * d.Dv, L, d, x.V16.data());
        // dφ(k) = V' dS'ᵀ over V''s Dv + 1 columns (rounded up to a VNNI pair; V' and dS'ᵀ are zero
        // past them), and dV = φ(k) dS' over the Dv value columns only (dS''s ones column is z's
        // gradient, not V's): not the DvP padding, 1/5 of each GEMM at Dv 64
        const int64_t K1 = round_up(Dv1, 2);
        common::vnni_gemm(L, fw.MP, K1, x.V16.data(), d.DvP, x.dSTv.data(), fw.MP, w.H.data(), fw.MP, false);  // dφ(k)
        common::vnni_gemm(L, d.Dv, fw.MP, x.F16.data(), fw.MP, x.dSv.data(), d.DvP, w.dN.data(), d.DvP, false);  // dV
        for (int64_t i = 0; i < L; ++i) cvt_row(w.dN.data() + i * d.DvP, dv + (row + i) * d.Dv, d.Dv);
        for (int64_t i = 0; i < L; ++i) {  // dl = dφ(k) ⊙ φ(k), with its row sums
          const float* Hi = w.H.data() + i * fw.MP;
          const float* Fi = w.F.data() + i * fw.MP;
          rs[i] = store_rounded_row(fw.MP, [&](int64_t m) { return Vec::loadu(Hi + m) * Vec::loadu(Fi + m); },
                                    dl16.data() + i * fw.MP);
        }
        mx_input_grad(dl16.data(), rs, ks, L, fw, mx, w.dX.data(), w.X.data(), dk + row * fw.D);
      }
    }
    common::vnni_release();
  });
}

// bf16 only: the state S' = Σ φ(k) v'ᵀ and its gradient are rounded to the input dtype as GEMM
// operands, and with fp16's range (65504) a long sequence of similar keys overflows them (z = Σ φ
// reaches Nk / √M); fp16 takes the fp32 path, as float.
template <typename scalar_t>
bool favor_on_matrix_units(const at::Tensor& q, const at::Tensor& v) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
    return common::matrix_units_available(q.scalar_type()) && q.size(3) % 2 == 0 && v.size(3) % 2 == 0;
  return false;
}

// Entry points for every dispatched type (the op's dispatch lambda is not a template);
// favor_on_matrix_units is true for bf16 only, so only bf16 gets here.
template <typename scalar_t, typename acc_t>
void mx_favor_forward(const Dims& d, const FavorW<acc_t>& fw, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                      acc_t eps, scalar_t* out, acc_t* states, acc_t* shifts, acc_t* feats) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) mx_favor_forward_impl(d, fw, q, k, v, eps, out, states, shifts, feats);
}
template <typename scalar_t, typename acc_t>
void mx_favor_backward(const Dims& d, const FavorW<acc_t>& fw, const scalar_t* dout, const scalar_t* q, const scalar_t* k,
                       const scalar_t* v, const acc_t* states, const acc_t* shifts, const acc_t* feats, acc_t eps,
                       scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
    mx_favor_backward_impl(d, fw, dout, q, k, v, states, shifts, feats, eps, dq, dk, dv);
}

template <typename acc_t>
FavorW<acc_t> make_favor_w(const at::Tensor& projection, double scale) {
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  FavorW<acc_t> fw;
  fw.M = projection.size(0);
  fw.D = projection.size(1);
  fw.MP = round_up(fw.M, W);
  fw.root = static_cast<acc_t>(std::sqrt(scale));
  fw.log_root = static_cast<acc_t>(0.5 * std::log(double(fw.M)));
  const at::Tensor p = projection.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* src = p.data_ptr<acc_t>();
  // per call (the projection may be redrawn in place): a copy, a scale and a block transpose
  fw.W.assign(fw.MP * fw.D, acc_t(0));
  std::copy(src, src + fw.M * fw.D, fw.W.data());
  fw.Wr.resize(fw.MP * fw.D);
  for (int64_t i = 0; i < fw.MP * fw.D; ++i) fw.Wr[i] = fw.root * fw.W[i];
  fw.WTr.resize(fw.D * fw.MP);
  transpose(fw.MP, fw.D, fw.Wr.data(), fw.D, fw.WTr.data(), fw.MP);
  return fw;
}

template <typename acc_t>
Dims make_favor_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const FavorW<acc_t>& fw) {
  Dims d = make_dims<acc_t>(q, k, v);
  d.MP = fw.MP;  // the state's rows are the M features
  return d;
}

void check_favor(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& projection) {
  common::check_qkv(op, q, k, v);
  TORCH_CHECK(projection.dim() == 2 && projection.size(1) == q.size(3) && projection.size(0) > 0, op,
              ": projection must be (M, D) with D = ", q.size(3), ", got ", projection.sizes());
  TORCH_CHECK(q.size(2) > 0 && k.size(2) > 0, op, ": needs Nq > 0 and Nk > 0");
}

// -> (out, S' [B, Hk, M, Dv + 1], key shift c [B, Hk], φ(q) [B, Hq, Nq, M]): the last three only
// for the backward; φ(q) only with save_features (else empty; see favor.py's _save_features:
// M a multiple of the vector width, so MP = M), the backward then reads it instead of rerunning
// q's projection and exp (both paths keep the features in fp32, bf16's matrix-unit one too).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> favor_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& projection, double scale,
    double eps, bool save_features) {
  check_favor("favor_attention_fwd", q_in, k_in, v_in, projection);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor states, shifts, feats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "favor_attention_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FavorW<acc_t> fw = make_favor_w<acc_t>(projection, scale);
    const Dims d = make_favor_dims<acc_t>(q, k, v, fw);
    const auto acc = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    states = at::empty({d.B, d.Hk, fw.M, d.Dv + 1}, acc);
    shifts = at::empty({d.B, d.Hk}, acc);
    TORCH_CHECK(!save_features || fw.MP == fw.M,
                "favor_attention_fwd: save_features needs M a multiple of ", at::vec::Vectorized<acc_t>::size());
    feats = save_features ? at::empty({d.B, d.Hq, d.Nq, fw.M}, acc) : at::empty({0}, acc);
    if (favor_on_matrix_units<scalar_t>(q, v)) {
      mx_favor_forward(d, fw, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), static_cast<acc_t>(eps),
                       out.data_ptr<scalar_t>(), states.data_ptr<acc_t>(), shifts.data_ptr<acc_t>(),
                       save_features ? feats.data_ptr<acc_t>() : nullptr);
      return;
    }
    favor_forward(d, fw, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), static_cast<acc_t>(eps),
                  out.data_ptr<scalar_t>(), states.data_ptr<acc_t>(), shifts.data_ptr<acc_t>(),
                  save_features ? feats.data_ptr<acc_t>() : nullptr);
  });
  return {out, states, shifts, feats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> favor_attention_bwd(const at::Tensor& dout_in, const at::Tensor& q_in,
                                                                   const at::Tensor& k_in, const at::Tensor& v_in,
                                                                   const at::Tensor& projection, const at::Tensor& states_in,
                                                                   const at::Tensor& shifts_in, const at::Tensor& feats_in,
                                                                   double scale, double eps) {
  check_favor("favor_attention_bwd", q_in, k_in, v_in, projection);
  const at::Tensor feats = feats_in.contiguous();  // the forward's φ(q), or empty: recomputed
  const at::Tensor states = states_in.contiguous(), shifts = shifts_in.contiguous();
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor dout = dout_in.to(q.scalar_type()).contiguous();
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), v.size(3)}),
              "favor_attention_bwd: dout must be (B, Hq, Nq, Dv)");
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "favor_attention_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FavorW<acc_t> fw = make_favor_w<acc_t>(projection, scale);
    const Dims d = make_favor_dims<acc_t>(q, k, v, fw);
    TORCH_CHECK(states.sizes() == at::IntArrayRef({d.B, d.Hk, fw.M, d.Dv + 1}) && shifts.sizes() == at::IntArrayRef({d.B, d.Hk}) &&
                    states.scalar_type() == c10::CppTypeToScalarType<acc_t>::value && shifts.scalar_type() == states.scalar_type(),
                "favor_attention_bwd: states / shifts must be the forward's");
    const bool saved = feats.numel() > 0;
    TORCH_CHECK(!saved || (feats.sizes() == at::IntArrayRef({d.B, d.Hq, d.Nq, fw.MP}) && fw.MP == fw.M &&
                           feats.scalar_type() == states.scalar_type()),
                "favor_attention_bwd: features must be the forward's");
    if (favor_on_matrix_units<scalar_t>(q, v)) {
      mx_favor_backward(d, fw, dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                        v.data_ptr<scalar_t>(), states.data_ptr<acc_t>(), shifts.data_ptr<acc_t>(),
                        saved ? feats.data_ptr<acc_t>() : nullptr, static_cast<acc_t>(eps), dq.data_ptr<scalar_t>(),
                        dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
      return;
    }
    favor_backward(d, fw, dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                   states.data_ptr<acc_t>(), shifts.data_ptr<acc_t>(), saved ? feats.data_ptr<acc_t>() : nullptr,
                   static_cast<acc_t>(eps), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------
// Op entry points.

// Op-boundary invariants only (the Python API validates user arguments): shapes
// that keep the loops in bounds; causal reads key row i for query row i.
void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  const common::QKVShape s = common::check_qkv(op, q, k, v);
  TORCH_CHECK(!causal || s.Nq == s.Nk, op, ": causal needs Nq == Nk, got ", s.Nq, " and ", s.Nk);
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// (S0, z0) as contiguous accumulation-type tensors, checked against (B, Hk, D, Dv) / (B, Hk, D).
std::pair<at::Tensor, at::Tensor> initial_state(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& s0, const std::optional<at::Tensor>& z0) {
  TORCH_CHECK(s0.has_value() == z0.has_value(), "linear_attention: pass both initial_s and initial_z, or neither");
  if (!s0.has_value()) return {at::Tensor(), at::Tensor()};
  const auto acc = acc_dtype(q.scalar_type());
  TORCH_CHECK(s0->sizes() == at::IntArrayRef({k.size(0), k.size(1), k.size(3), v.size(3)}),
              "linear_attention: initial_s must be (B, Hk, D, Dv), got ", s0->sizes());
  TORCH_CHECK(z0->sizes() == at::IntArrayRef({k.size(0), k.size(1), k.size(3)}),
              "linear_attention: initial_z must be (B, Hk, D), got ", z0->sizes());
  return {s0->to(acc).contiguous(), z0->to(acc).contiguous()};
}

// The kernels' raw arguments (the initial state is optional: nullptr when absent).
template <typename scalar_t, typename acc_t>
Args<scalar_t, acc_t> make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& s0,
                                const at::Tensor& z0, FeatureMap f, bool normalize, double eps, double scale) {
  Args<scalar_t, acc_t> a{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                          s0.defined() ? s0.data_ptr<acc_t>() : nullptr, z0.defined() ? z0.data_ptr<acc_t>() : nullptr,
                          f, normalize, static_cast<acc_t>(eps), static_cast<acc_t>(scale)};
  // bf16 products on the tile units (AMX) or, without them, on AVX512-BF16's vdpbf16ps with the
  // triangular products' zero triangles skipped (common::dpbf16_gemm). Measured on an AMD EPYC (family
  // 25 model 17, Zen 4, no AMX, loaded host), 1 thread, B1 H8 D64 bf16, interleaved against the fp32 products:
  // causal N1024 fwd 1.23x, fwd+bwd 1.15-1.18x (N4096 1.11x); non-causal N1024 fwd+bwd 1.16-1.26x.
  // (Session 7, with every triangular product computed whole, the causal fwd+bwd ran 0.94x, so
  // bf16 kept the fp32 products there.) ATTNKERNELS_CPU_NO_AMX turns it off (the fp32 products on
  // the widened inputs).
  a.mx = std::is_same_v<scalar_t, at::BFloat16> && common::matrix_units_available(q.scalar_type());
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, std::string feature_map, bool causal,
    bool normalize, double eps, double scale, const std::optional<at::Tensor>& initial_s,
    const std::optional<at::Tensor>& initial_z) {
  check_inputs("linear_attention_fwd", q_in, k_in, v_in, causal);
  const FeatureMap f = parse_feature_map(feature_map);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto [s0, z0] = initial_state(q, k, v, initial_s, initial_z);
  const auto acc = acc_dtype(q.scalar_type());
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor s_out = at::empty({k.size(0), k.size(1), k.size(3), v.size(3)}, q.options().dtype(acc));
  at::Tensor z_out = at::empty({k.size(0), k.size(1), k.size(3)}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Dims d = make_dims<acc_t>(q, k, v);
    const auto a = make_args<scalar_t, acc_t>(q, k, v, s0, z0, f, normalize, eps, scale);
    if (causal) {
      forward_causal(d, a, out.data_ptr<scalar_t>(), s_out.data_ptr<acc_t>(), z_out.data_ptr<acc_t>());
    } else {
      at::Tensor states = at::empty({d.B * d.Hk, d.MP, d.DvP}, q.options().dtype(acc));
      forward_noncausal(d, a, out.data_ptr<scalar_t>(), s_out.data_ptr<acc_t>(), z_out.data_ptr<acc_t>(), states.data_ptr<acc_t>());
    }
  });
  return {out, s_out, z_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    std::string feature_map, bool causal, bool normalize, double eps, double scale,
    const std::optional<at::Tensor>& initial_s, const std::optional<at::Tensor>& initial_z) {
  check_inputs("linear_attention_bwd", q_in, k_in, v_in, causal);
  const FeatureMap f = parse_feature_map(feature_map);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor dout = dout_in.to(q.scalar_type()).contiguous();
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), v.size(3)}),
              "linear_attention_bwd: dout must be (B, Hq, Nq, Dv)");
  auto [s0, z0] = initial_state(q, k, v, initial_s, initial_z);
  const auto acc = acc_dtype(q.scalar_type());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Dims d = make_dims<acc_t>(q, k, v);
    const auto a = make_args<scalar_t, acc_t>(q, k, v, s0, z0, f, normalize, eps, scale);
    if (causal) {
      backward_causal(d, a, dout.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
    } else {
      at::Tensor states = at::empty({d.B * d.Hk, d.MP, d.DvP}, q.options().dtype(acc));
      at::Tensor head_dS = at::empty({d.B * d.Hq, d.MP, d.DvP}, q.options().dtype(acc));
      backward_noncausal(d, a, dout.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                         states.data_ptr<acc_t>(), head_dS.data_ptr<acc_t>());
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ATTNKERNELS_NS, m) {
  m.def(
      "linear_attention_fwd(Tensor q, Tensor k, Tensor v, str feature_map, bool causal, bool normalize, float eps, "
      "float scale, Tensor? initial_s, Tensor? initial_z) -> (Tensor out, Tensor final_s, Tensor final_z)",
      &linear_attention_fwd);
  m.def(
      "linear_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, str feature_map, bool causal, bool normalize, "
      "float eps, float scale, Tensor? initial_s, Tensor? initial_z) -> (Tensor dq, Tensor dk, Tensor dv)",
      &linear_attention_bwd);
  m.def(
      "favor_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor projection, float scale, float eps, bool save_features) "
      "-> (Tensor out, Tensor states, Tensor shifts, Tensor features)",
      &favor_attention_fwd);
  m.def(
      "favor_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor projection, Tensor states, Tensor shifts, "
      "Tensor features, float scale, float eps) "
      "-> (Tensor dq, Tensor dk, Tensor dv)",
      &favor_attention_bwd);
}

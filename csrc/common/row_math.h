// SIMD row math on at::vec::Vectorized, shared by the softmax and the linear kernels.
//
// Every helper works on one contiguous row x[0, n) and keeps a fixed summation
// order (lane accumulators, a shuffle tree, then the scalar tail), so results do
// not depend on how rows are split between threads. Tails run in scalar code:
// loadu(ptr, n) pads with zeros, which would corrupt a max or a sum.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/ns.h"

ATTNKERNELS_COMMON_BEGIN

template <typename T>
inline void fill(T* x, int64_t n, T value) {
  std::fill(x, x + n, value);
}

// log2(e) in float: the exp passes compute exp(x) as 2^(x·log2e), folded into their FMA.
constexpr float kLog2e = 1.4426950408889634f;

// exp on a vector: float uses ATen's exp_u20 (the polynomial torch's own CPU
// flash attention uses, ~2 ulp, about twice as fast as Sleef's 1-ulp exp);
// double keeps the 1-ulp exp so the float64 path stays a tight oracle check.
inline at::vec::Vectorized<float> vexp(const at::vec::Vectorized<float>& x) { return x.exp_u20(); }
inline at::vec::Vectorized<double> vexp(const at::vec::Vectorized<double>& x) { return x.exp(); }

// tanh on a vector, for softcap. double: Sleef's 1-ulp tanh (the oracle path). float: a
// rational x·P(x²)/Q(x²) (P, Q of degree 4, fitted here by reweighted least squares on the
// relative error over [0, 9]; evaluated in float its max relative error is 3.4e-7, ~3 ulp),
// with |x| clamped to 9 (tanh(9) rounds to 1) and 1/Q from rcp14 and one Newton step:
// ~16 vector ops against Sleef's ~3x more. tanh_scalar is the same formula for the tails.
inline at::vec::Vectorized<double> vtanh(const at::vec::Vectorized<double>& x) { return x.tanh(); }
inline double tanh_scalar(double x) { return std::tanh(x); }

constexpr float kTanhP[5] = {0.9999999795430591f, 0.13381039051472116f, 0.003495603593745529f,
                             2.060931987595282e-05f, 1.3354961846446149e-08f};
constexpr float kTanhQ[5] = {1.0f, 0.46714354673184616f, 0.02587704221230465f, 0.0003285659361776584f,
                             7.776687159304306e-07f};
constexpr float kTanhClamp = 9.0f;

inline at::vec::Vectorized<float> vtanh(const at::vec::Vectorized<float>& x0) {
  using Vec = at::vec::Vectorized<float>;
  const Vec x = at::vec::clamp(x0, Vec(-kTanhClamp), Vec(kTanhClamp));
  const Vec z = x * x;
  Vec p = at::vec::fmadd(Vec(kTanhP[4]), z, Vec(kTanhP[3]));
  Vec q = at::vec::fmadd(Vec(kTanhQ[4]), z, Vec(kTanhQ[3]));
  p = at::vec::fmadd(p, z, Vec(kTanhP[2]));
  q = at::vec::fmadd(q, z, Vec(kTanhQ[2]));
  p = at::vec::fmadd(p, z, Vec(kTanhP[1]));
  q = at::vec::fmadd(q, z, Vec(kTanhQ[1]));
  p = at::vec::fmadd(p, z, Vec(kTanhP[0]));
  q = at::vec::fmadd(q, z, Vec(kTanhQ[0]));
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 qv = q, r0 = _mm512_rcp14_ps(qv);  // 2^-14, then one Newton step: ~2^-28
  const Vec r = Vec(_mm512_mul_ps(r0, _mm512_fnmadd_ps(qv, r0, _mm512_set1_ps(2.f))));
#else
  const Vec r = q.reciprocal();
#endif
  return x * p * r;
}

inline float tanh_scalar(float x0) {
  if (std::isnan(x0)) return x0;  // std::max(-c, NaN) is -c: the clamp would turn a NaN score into -1
  const float x = std::min(kTanhClamp, std::max(-kTanhClamp, x0));
  const float z = x * x;
  float p = kTanhP[4], q = kTanhQ[4];
  for (int d = 3; d >= 0; --d) {
    p = p * z + kTanhP[d];
    q = q * z + kTanhQ[d];
  }
  return x * p / q;
}

template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  using Vec = at::vec::Vectorized<T>;
  const Vec va(a);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * va).store(x + i);
  for (; i < n; ++i) x[i] *= a;
}

// Horizontal reductions of one vector: a shuffle tree (log2 lanes steps), not a
// serial chain of scalar ops, which per row and tile cost as much as the exps.
template <typename T>
inline T hmax(const at::vec::Vectorized<T>& v) {
  using Vec = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}
template <typename T>
inline T hsum(const at::vec::Vectorized<T>& v) {
  using Vec = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, v);
}

// max that keeps a NaN (std::max(a, NaN) returns a): a NaN score must poison its row
// as it does in the reference, not vanish. at::vec::maximum already propagates NaN.
template <typename T>
inline T max_keep_nan(T a, T b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

// max(x): read-only, two accumulators to overlap the max latencies, tree at the end.
template <typename T>
inline T row_max(const T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  T m = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if (n >= W) {
    Vec m0(m), m1(m);
    for (; i + 2 * W <= n; i += 2 * W) {
      m0 = at::vec::maximum(m0, Vec::loadu(x + i));
      m1 = at::vec::maximum(m1, Vec::loadu(x + i + W));
    }
    for (; i + W <= n; i += W) m0 = at::vec::maximum(m0, Vec::loadu(x + i));
    m = hmax<T>(at::vec::maximum(m0, m1));
  }
  for (; i < n; ++i) m = max_keep_nan(m, x[i]);
  return m;
}

// x <- exp(x * a - b) (one FMA before the exp); returns the sum, in the same fixed order.
template <typename T>
inline T exp_fma_sum(T* x, int64_t n, T a, T b) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec va(a), vnb(-b);
  Vec s0(T(0)), s1(T(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec e0 = vexp(at::vec::fmadd(Vec::loadu(x + i), va, vnb));
    const Vec e1 = vexp(at::vec::fmadd(Vec::loadu(x + i + W), va, vnb));
    e0.store(x + i);
    e1.store(x + i + W);
    s0 = s0 + e0;
    s1 = s1 + e1;
  }
  for (; i + W <= n; i += W) {
    const Vec e = vexp(at::vec::fmadd(Vec::loadu(x + i), va, vnb));
    e.store(x + i);
    s0 = s0 + e;
  }
  T s = hsum<T>(s0 + s1);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] * a - b);
    s += x[i];
  }
  return s;
}

// Softcap forward row with a fixed row max m: x <- exp(cap · tanh(x · a) - m) in place
// (a = scale / cap, x the raw q·k products, the cap folded into the exp's FMA), returns
// the sum in exp_fma_sum's order. The tanh and the exp in one pass: no capped row goes
// back to memory. Four vectors per iteration: each one's chain (tanh, then exp) is long,
// and independent chains side by side let the out-of-order core overlap them.
template <typename T>
inline T softcap_exp_sum(T* x, int64_t n, T a, T cap, T m) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec va(a), vcap(cap), vnm(-m);
  Vec s0(T(0)), s1(T(0));
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    const Vec e0 = vexp(at::vec::fmadd(vtanh(Vec::loadu(x + i) * va), vcap, vnm));
    const Vec e1 = vexp(at::vec::fmadd(vtanh(Vec::loadu(x + i + W) * va), vcap, vnm));
    const Vec e2 = vexp(at::vec::fmadd(vtanh(Vec::loadu(x + i + 2 * W) * va), vcap, vnm));
    const Vec e3 = vexp(at::vec::fmadd(vtanh(Vec::loadu(x + i + 3 * W) * va), vcap, vnm));
    e0.store(x + i);
    e1.store(x + i + W);
    e2.store(x + i + 2 * W);
    e3.store(x + i + 3 * W);
    s0 = s0 + (e0 + e2);
    s1 = s1 + (e1 + e3);
  }
  for (; i + W <= n; i += W) {
    const Vec e = vexp(at::vec::fmadd(vtanh(Vec::loadu(x + i) * va), vcap, vnm));
    e.store(x + i);
    s0 = s0 + e;
  }
  T s = hsum<T>(s0 + s1);
  for (; i < n; ++i) {
    x[i] = std::exp(cap * tanh_scalar(x[i] * a) - m);
    s += x[i];
  }
  return s;
}

#if defined(CPU_CAPABILITY_AVX512)
// NaN-keeping clamp of y to [-c, c]: vmaxps / vminps return their second operand when either is
// NaN, so y goes second. (vrangeps, one instruction, returns c for a NaN y: measured, and a NaN
// score then became a finite P — tests/test_cpu_modifiers.py, the NaN-key test.)
inline __m512 clamp_keep_nan(__m512 y, float c) {
  return _mm512_min_ps(_mm512_set1_ps(c), _mm512_max_ps(_mm512_set1_ps(-c), y));
}

// vtanh on AVX-512 with the clamp to ±kTanhClamp (a NaN stays NaN).
inline __m512 vtanh_range(__m512 y) {
  const __m512 x = clamp_keep_nan(y, kTanhClamp);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kTanhP[4]), z, _mm512_set1_ps(kTanhP[3]));
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(kTanhQ[4]), z, _mm512_set1_ps(kTanhQ[3]));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhP[2]));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(kTanhQ[2]));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhP[1]));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(kTanhQ[1]));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhP[0]));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(kTanhQ[0]));
  const __m512 r0 = _mm512_rcp14_ps(q);
  return _mm512_mul_ps(_mm512_mul_ps(x, p), _mm512_mul_ps(r0, _mm512_fnmadd_ps(q, r0, _mm512_set1_ps(2.f))));
}

// exp(x) for x in [-87, 0.1] or NaN (the caller bounds it): exp_u20's degree-5 polynomial of
// exp(r), r = x - n·ln 2 with n = round(x · log2 e) reduced in two steps (Cody-Waite: ln 2 as a
// high part exact in float plus a low part, so that n·ln 2 loses nothing for |n| up to 126),
// then 2^n by vscalefps. exp_u20's range masks (clamps, a compare, a blend) and its integer
// exponent build are not needed here: 9 vector ops against ~20.
inline __m512 exp_bounded(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 e = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
  e = _mm512_fmadd_ps(r, e, _mm512_set1_ps(0.166676521f));
  e = _mm512_fmadd_ps(r, e, _mm512_set1_ps(0.499991506f));
  e = _mm512_fmadd_ps(r, e, _mm512_set1_ps(0.999999701f));
  e = _mm512_fmadd_ps(r, e, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(e, n);
}

// softcap_exp_sum on float with AVX-512: the exponent cap · tanh - m lies in [-cap - m, ~0]
// (m = cap, the fixed row max). Where -cap - m < -87 (cap > 43.5) the exponent is floored at -87
// (kFloor) to stay in the bounded exp's range: such a P reads e^-87 instead of less, which the
// caller tolerates only on rows whose sum is far above it (softmax.cpp, fixed_max_holds).
// vmaxps(floor, t) keeps a NaN t. Same summation order.
template <bool kFloor>
inline __m512 softcap_exp_f32(const float* x, __m512 va, __m512 vcap, __m512 vnm) {
  __m512 t = _mm512_fmadd_ps(vtanh_range(_mm512_mul_ps(_mm512_loadu_ps(x), va)), vcap, vnm);
  if constexpr (kFloor) t = _mm512_max_ps(_mm512_set1_ps(-87.f), t);
  return exp_bounded(t);
}

template <bool kFloor>
inline float softcap_exp_sum_f32(float* x, int64_t n, float a, float cap, float m) {
  constexpr int64_t W = 16;
  const __m512 va = _mm512_set1_ps(a), vcap = _mm512_set1_ps(cap), vnm = _mm512_set1_ps(-m);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    const __m512 e0 = softcap_exp_f32<kFloor>(x + i, va, vcap, vnm);
    const __m512 e1 = softcap_exp_f32<kFloor>(x + i + W, va, vcap, vnm);
    const __m512 e2 = softcap_exp_f32<kFloor>(x + i + 2 * W, va, vcap, vnm);
    const __m512 e3 = softcap_exp_f32<kFloor>(x + i + 3 * W, va, vcap, vnm);
    _mm512_storeu_ps(x + i, e0);
    _mm512_storeu_ps(x + i + W, e1);
    _mm512_storeu_ps(x + i + 2 * W, e2);
    _mm512_storeu_ps(x + i + 3 * W, e3);
    s0 = _mm512_add_ps(s0, _mm512_add_ps(e0, e2));
    s1 = _mm512_add_ps(s1, _mm512_add_ps(e1, e3));
  }
  for (; i + W <= n; i += W) {
    const __m512 e = softcap_exp_f32<kFloor>(x + i, va, vcap, vnm);
    _mm512_storeu_ps(x + i, e);
    s0 = _mm512_add_ps(s0, e);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  for (; i < n; ++i) {
    x[i] = std::exp(cap * tanh_scalar(x[i] * a) - m);
    s += x[i];
  }
  return s;
}

inline float softcap_exp_sum(float* x, int64_t n, float a, float cap, float m) {
  return cap + m > 87.f ? softcap_exp_sum_f32<true>(x, n, a, cap, m) : softcap_exp_sum_f32<false>(x, n, a, cap, m);
}
#endif

// x <- exp(x * scale - lse[c]) per column c (lse = +inf for a row that sees nothing -> 0).
template <typename T>
inline void exp_scaled_minus(T* x, int64_t n, T scale, const T* lse, bool lse_per_column) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vs(scale);
  int64_t i = 0;
  if (lse_per_column) {
    for (; i + Vec::size() <= n; i += Vec::size()) vexp(Vec::loadu(x + i) * vs - Vec::loadu(lse + i)).store(x + i);
    for (; i < n; ++i) x[i] = std::exp(x[i] * scale - lse[i]);
  } else {
    const Vec vl(lse[0]);
    for (; i + Vec::size() <= n; i += Vec::size()) vexp(Vec::loadu(x + i) * vs - vl).store(x + i);
    for (; i < n; ++i) x[i] = std::exp(x[i] * scale - lse[0]);
  }
}

// ds <- p * (dp - delta) * scale, delta per column or one per row.
template <typename T>
inline void softmax_grad(T* p, const T* dp, int64_t n, const T* delta, bool delta_per_column, T scale) {
  using Vec = at::vec::Vectorized<T>;
  const Vec vs(scale);
  int64_t i = 0;
  if (delta_per_column) {
    for (; i + Vec::size() <= n; i += Vec::size())
      (Vec::loadu(p + i) * (Vec::loadu(dp + i) - Vec::loadu(delta + i)) * vs).store(p + i);
    for (; i < n; ++i) p[i] = p[i] * (dp[i] - delta[i]) * scale;
  } else {
    const Vec vd(delta[0]);
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(p + i) * (Vec::loadu(dp + i) - vd) * vs).store(p + i);
    for (; i < n; ++i) p[i] = p[i] * (dp[i] - delta[0]) * scale;
  }
}

// out[i] = T(exp(x[i] * a - b)) for i < n, T a 16-bit type: the exp, the row sum and the
// rounding in one pass (P never goes back to memory in float). Returns the float sum of
// the unrounded exps, in a fixed order.
template <typename T>
inline float exp_fma_sum_round(const float* x, int64_t n, float a, float b, T* out) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const Vec va(a), vnb(-b);
  Vec s0(0.f), s1(0.f);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec e0 = vexp(at::vec::fmadd(Vec::loadu(x + i), va, vnb));
    const Vec e1 = vexp(at::vec::fmadd(Vec::loadu(x + i + W), va, vnb));
    s0 = s0 + e0;
    s1 = s1 + e1;
    at::vec::convert_from_float<T>(e0, e1).store(out + i);
  }
  float s = hsum<float>(s0 + s1);
  for (; i < n; ++i) {
    const float e = std::exp(x[i] * a - b);
    out[i] = T(e);
    s += e;
  }
  return s;
}

// exp_fma_sum_round that also returns max(x[0, n)) in *mx (-inf for n = 0; a NaN may or may
// not show there: the caller's sum carries it): for the forward's lazy rescaling, whose exp
// pass runs against the running max and checks afterwards whether the row's max outgrew it.
// Here two passes; bf16 with AVX512-BF16 (below) folds the max into the exp pass.
template <typename T>
inline float exp_fma_sum_round_max(const float* x, int64_t n, float a, float b, T* out, float* mx) {
  *mx = n > 0 ? row_max(x, n) : -std::numeric_limits<float>::infinity();
  return exp_fma_sum_round<T>(x, n, a, b, out);
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__) && !defined(__clang__)
#define ATTNKERNELS_NATIVE_BF16 1
// The same for bf16 with AVX512-BF16's vcvtne2ps2bf16 (one instruction per 32 values,
// round to nearest even, as the software rounding): this TU is built for plain AVX-512,
// so only this function is compiled for the extension, and it runs only where the CPU
// has it (bf16_native_ok; every CPU with AMX-BF16 does).
//
// Its exp is 2^t with t = x * a·log2(e) - b·log2(e) (the FMA of the caller's exp(x·a - b)),
// split t = n + f, |f| <= 1/2, and 2^f by a degree-4 polynomial (fitted here on Chebyshev
// nodes, max relative error 3.1e-6: far below bf16's 2^-9 rounding of P, and the row sum
// it feeds). 10 vector ops against exp_u20's ~15. Results below 2^-125 are flushed to 0
// (masked -inf scores give P = 0): a denormal result of vscalefps costs a microcode assist
// (measured: ALiBi at N = 4096, whose far keys land in the denormal range, ran 3x slower),
// and such a P is nothing next to the row's maximum, 1. vmaxps(c, t) and the unordered
// compare keep a NaN t.
// 2^f for f = t - n, n = round(t) (|f| <= 1/2): the degree-4 fit; n returned for the scalef.
__attribute__((target("avx512bf16"))) inline __m512 exp2_frac_poly4(__m512 t, __m512& n) {
  n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.00960039533674717f), f, _mm512_set1_ps(0.05591689422726631f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24023719131946564f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931219696998596f));
  return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
}

__attribute__((target("avx512bf16"))) inline __m512 exp2_poly4(__m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(-200.f), t);
  const __mmask16 normal = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-125.f), _CMP_NLT_UQ);
  __m512 n;
  const __m512 p = exp2_frac_poly4(t, n);
  return _mm512_maskz_scalef_ps(normal, p, n);
}

// kMax: also the row max of x in *mx, in the same pass (one vmaxps per vector on the loaded
// scores; plain vmaxps, NaN-free lanes as row_max_fast: a NaN still reaches the sum), for the
// forward's lazy rescaling (exp_fma_sum_round_max).
template <bool kMax>
__attribute__((target("avx512bf16"))) inline float exp_fma_sum_round_bf16_impl(const float* x, int64_t n, float a,
                                                                                float b, at::BFloat16* out,
                                                                                float* mx) {
  constexpr int64_t W = 16;
  const __m512 va = _mm512_set1_ps(a * kLog2e), vnb = _mm512_set1_ps(-b * kLog2e);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  __m512 m0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + W);
    if constexpr (kMax) {
      m0 = _mm512_max_ps(m0, x0);
      m1 = _mm512_max_ps(m1, x1);
    }
    const __m512 e0 = exp2_poly4(_mm512_fmadd_ps(x0, va, vnb));
    const __m512 e1 = exp2_poly4(_mm512_fmadd_ps(x1, va, vnb));
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
  }
  // The tail in masked vectors, not libm's scalar expf: a windowed row's own key range has
  // any length, so its tail is up to 31 values (measured: 4% of a bf16 window forward).
  for (; i < n; i += W) {
    const __mmask16 k = n - i >= W ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + i);
    if constexpr (kMax) m0 = _mm512_mask_max_ps(m0, k, m0, xv);
    const __m512 e = _mm512_maskz_mov_ps(k, exp2_poly4(_mm512_fmadd_ps(xv, va, vnb)));
    s0 = _mm512_add_ps(s0, e);
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(out + i), k, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(e)));
  }
  if constexpr (kMax) *mx = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

__attribute__((target("avx512bf16"))) inline float exp_fma_sum_round_bf16(const float* x, int64_t n, float a, float b,
                                                                           at::BFloat16* out) {
  return exp_fma_sum_round_bf16_impl<false>(x, n, a, b, out, nullptr);
}

__attribute__((target("avx512bf16"))) inline float exp_fma_sum_round_max_bf16(const float* x, int64_t n, float a,
                                                                               float b, at::BFloat16* out, float* mx) {
  return exp_fma_sum_round_bf16_impl<true>(x, n, a, b, out, mx);
}

// Backward rows on the matrix units. x[i] <- exp(x[i] * scale - lse[i]) (P, kept in float
// for dS) and out[i] = bf16 of it, one pass; lse = +inf (a row that sees nothing) gives 0.
__attribute__((target("avx512bf16"))) inline void exp_lse_round_bf16(float* x, int64_t n, float scale,
                                                                     const float* lse, at::BFloat16* out) {
  constexpr int64_t W = 16;
  const __m512 va = _mm512_set1_ps(scale * kLog2e), vm = _mm512_set1_ps(-kLog2e);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const __m512 e0 = exp2_poly4(_mm512_fmadd_ps(_mm512_loadu_ps(x + i), va, _mm512_mul_ps(_mm512_loadu_ps(lse + i), vm)));
    const __m512 e1 =
        exp2_poly4(_mm512_fmadd_ps(_mm512_loadu_ps(x + i + W), va, _mm512_mul_ps(_mm512_loadu_ps(lse + i + W), vm)));
    _mm512_storeu_ps(x + i, e0);
    _mm512_storeu_ps(x + i + W, e1);
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
  }
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] * scale - lse[i]);
    out[i] = at::BFloat16(x[i]);
  }
}

// out[i] = bf16(p[i] * (dp[i] - delta[i]) * scale) (dS, never stored in float).
__attribute__((target("avx512bf16"))) inline void softmax_grad_round_bf16(const float* p, const float* dp, int64_t n,
                                                                          const float* delta, float scale,
                                                                          at::BFloat16* out) {
  constexpr int64_t W = 16;
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const __m512 d0 = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(p + i),
                                                  _mm512_sub_ps(_mm512_loadu_ps(dp + i), _mm512_loadu_ps(delta + i))), vs);
    const __m512 d1 = _mm512_mul_ps(
        _mm512_mul_ps(_mm512_loadu_ps(p + i + W), _mm512_sub_ps(_mm512_loadu_ps(dp + i + W), _mm512_loadu_ps(delta + i + W))),
        vs);
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(d1, d0)));
  }
  for (; i < n; ++i) out[i] = at::BFloat16(p[i] * (dp[i] - delta[i]) * scale);
}

// Softcap on the matrix units: cap · tanh(y), y = x · scale / cap, fused into the pass that
// already touches each score (the exp of P and the forward's row sum; the backward's P and
// its chain-rule factor scale · (1 - tanh²)). tanh(y) = y · P(y²) / Q(y²), P and Q of degree
// 2 (fitted here by reweighted least squares on [0, 5.3]), |y| clamped to 5.3, 1 / Q by
// rcp14 without a Newton step: |tanh error| <= 1.2e-4 (measured on a dense grid of
// [0, 12] with rcp14's worst case), the accuracy class of the tanh.approx.f32 that
// FlashAttention's CUDA softcap uses (relative 2^-11), and far below the bf16 rounding of
// the logits the same computation does in bf16. 10 vector ops over the plain pass, only
// FMA-port ops but the rcp (the exp of P already loads the port-0-only units: roundscale,
// scalef). The float32 path keeps vtanh (~3 ulp).
// tanh_lowp's rational: P(z) = P0 + P1·z + P2·z², Q(z) = 1 + Q1·z + Q2·z².
constexpr float kTanhP0 = 0.9997410178184509f, kTanhP1 = 0.10069996863603592f, kTanhP2 = 0.0006260668742470443f;
constexpr float kTanhQ1 = 0.4333097040653229f, kTanhQ2 = 0.012339968234300613f;

// c · tanh(y) with c folded into P's coefficients (pc = c · P0, c · P1, c · P2): one multiply
// less per vector than c · tanh_lowp(y). The clamp to ±5.3 keeps a NaN y (clamp_keep_nan).
__attribute__((target("avx512bf16"))) inline __m512 scaled_tanh_lowp(__m512 y, __m512 pc0, __m512 pc1, __m512 pc2) {
  const __m512 x = _mm512_min_ps(_mm512_set1_ps(5.3f), _mm512_max_ps(_mm512_set1_ps(-5.3f), y));
  const __m512 z = _mm512_mul_ps(x, x);
  const __m512 p = _mm512_fmadd_ps(_mm512_fmadd_ps(pc2, z, pc1), z, pc0);
  const __m512 q = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_set1_ps(kTanhQ2), z, _mm512_set1_ps(kTanhQ1)), z,
                                   _mm512_set1_ps(1.f));
  return _mm512_mul_ps(_mm512_mul_ps(x, p), _mm512_rcp14_ps(q));
}

__attribute__((target("avx512bf16"))) inline __m512 tanh_lowp(__m512 y) {
  return scaled_tanh_lowp(y, _mm512_set1_ps(kTanhP0), _mm512_set1_ps(kTanhP1), _mm512_set1_ps(kTanhP2));
}

// (Helpers of the loops below are functions with the target attribute, never lambdas: a
// lambda does not inherit it, and GCC then cannot inline tanh_lowp / exp2_poly4 into it:
// measured 1.47x the plain forward with lambdas, 1.33x without.)
__attribute__((target("avx512bf16"))) inline __m512 softcap_p_grad_vec(float* x, const float* lse, float* grad,
                                                                       __m512 va, __m512 vk, __m512 vm, __m512 vs) {
  const __m512 t = tanh_lowp(_mm512_mul_ps(_mm512_loadu_ps(x), va));
  const __m512 e = exp2_poly4(_mm512_fmadd_ps(t, vk, _mm512_mul_ps(_mm512_loadu_ps(lse), vm)));
  _mm512_storeu_ps(x, e);
  _mm512_storeu_ps(grad, _mm512_fnmadd_ps(t, _mm512_mul_ps(t, vs), vs));
  return e;
}

__attribute__((target("avx512bf16"))) inline __m512 softcap_ds_vec(const float* p, const float* dp, const float* delta,
                                                                   const float* grad) {
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(p), _mm512_sub_ps(_mm512_loadu_ps(dp), _mm512_loadu_ps(delta))),
                       _mm512_loadu_ps(grad));
}

// Forward row, in place: x[i] <- cap · tanh(x[i] · a) (a = scale / cap, x the raw q·k
// products); returns the row max when kMax (NaN-free lanes, as row_max_fast: the caller
// rechecks a -inf). A pass of its own before the exp pass rather than inside it: fused, one
// vector's dependency chain (tanh, then exp) is ~80 cycles and the scheduler holds too few
// of them to keep the units busy (measured: 1.33x the plain forward, against 1.2x split).
template <bool kMax>
__attribute__((target("avx512bf16"))) inline float softcap_row_bf16(float* x, int64_t n, float a, float cap) {
  constexpr int64_t W = 16;
  const __m512 va = _mm512_set1_ps(a), pc0 = _mm512_set1_ps(cap * kTanhP0), pc1 = _mm512_set1_ps(cap * kTanhP1),
               pc2 = _mm512_set1_ps(cap * kTanhP2);
  __m512 m0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const __m512 c0 = scaled_tanh_lowp(_mm512_mul_ps(_mm512_loadu_ps(x + i), va), pc0, pc1, pc2);
    const __m512 c1 = scaled_tanh_lowp(_mm512_mul_ps(_mm512_loadu_ps(x + i + W), va), pc0, pc1, pc2);
    _mm512_storeu_ps(x + i, c0);
    _mm512_storeu_ps(x + i + W, c1);
    if constexpr (kMax) {
      m0 = _mm512_max_ps(m0, c0);
      m1 = _mm512_max_ps(m1, c1);
    }
  }
  float m = kMax ? _mm512_reduce_max_ps(_mm512_max_ps(m0, m1)) : 0.f;
  for (; i < n; ++i) {
    x[i] = cap * std::tanh(x[i] * a);
    if constexpr (kMax) m = max_keep_nan(m, x[i]);
  }
  return m;
}

// Backward row (a transposed key row over query columns): x[i] <- P = exp(cap · tanh(x[i] · a)
// - lse[i]) in float (lse = +inf gives 0), out[i] = bf16(P), grad[i] = scale · (1 - tanh²),
// the chain-rule factor softcap_grad_round_bf16 applies.
__attribute__((target("avx512bf16"))) inline void softcap_exp_lse_round_bf16(float* x, int64_t n, float a, float cap,
                                                                             float scale, const float* lse,
                                                                             at::BFloat16* out, float* grad) {
  constexpr int64_t W = 16;
  const __m512 va = _mm512_set1_ps(a), vk = _mm512_set1_ps(cap * kLog2e), vm = _mm512_set1_ps(-kLog2e),
               vs = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const __m512 e0 = softcap_p_grad_vec(x + i, lse + i, grad + i, va, vk, vm, vs);
    const __m512 e1 = softcap_p_grad_vec(x + i + W, lse + i + W, grad + i + W, va, vk, vm, vs);
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
  }
  for (; i < n; ++i) {
    const float t = std::tanh(x[i] * a);
    x[i] = std::exp(cap * t - lse[i]);
    out[i] = at::BFloat16(x[i]);
    grad[i] = scale * (1.f - t * t);
  }
}

// out[i] = bf16(p[i] · (dp[i] - delta[i]) · grad[i]) (dS under softcap; grad from softcap_exp_lse_round_bf16).
__attribute__((target("avx512bf16"))) inline void softcap_grad_round_bf16(const float* p, const float* dp, int64_t n,
                                                                          const float* delta, const float* grad,
                                                                          at::BFloat16* out) {
  constexpr int64_t W = 16;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const __m512 d0 = softcap_ds_vec(p + i, dp + i, delta + i, grad + i);
    const __m512 d1 = softcap_ds_vec(p + i + W, dp + i + W, delta + i + W, grad + i + W);
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(d1, d0)));
  }
  for (; i < n; ++i) out[i] = at::BFloat16(p[i] * (dp[i] - delta[i]) * grad[i]);
}

// 2^t for t in [-125, 128] or NaN (the caller bounds it): exp2_poly4 without its range
// handling (the clamp and the flush mask), 2 vector ops less.
__attribute__((target("avx512bf16"))) inline __m512 exp2_poly4_bounded(__m512 t) {
  __m512 n;
  const __m512 p = exp2_frac_poly4(t, n);
  return _mm512_scalef_ps(p, n);
}

// One vector of P under the fixed-max softcap: 2^(cap·log2e · tanh(x · a) - m·log2e), the
// factor cap·log2e folded into the rational's numerator (pc*). The exponent is >= -(cap + m)·log2e
// (tanh >= -1, m = cap); kFloor (that bound under -124) floors it at -124 for the bounded exp
// (P then reads 2^-124 instead of less: softcap_exp_sum_f32's rule).
template <bool kFloor>
__attribute__((target("avx512bf16"))) inline __m512 softcap_exp_vec(const float* x, __m512 va, __m512 pc0, __m512 pc1,
                                                                    __m512 pc2, __m512 vnm) {
  __m512 t = _mm512_add_ps(scaled_tanh_lowp(_mm512_mul_ps(_mm512_loadu_ps(x), va), pc0, pc1, pc2), vnm);
  if constexpr (kFloor) t = _mm512_max_ps(_mm512_set1_ps(-124.f), t);
  return exp2_poly4_bounded(t);
}

// Forward row under the fixed-max softcap (bf16 P): out[i] = bf16(exp(cap · tanh(x[i] · a) - m)),
// returns the float sum; x (the raw q·k products) is left as it was. The tanh and the exp in one
// pass, four vectors per iteration (independent chains for the out-of-order core to overlap).
template <bool kFloor>
__attribute__((target("avx512bf16"))) inline float softcap_exp_sum_round_bf16_impl(const float* x, int64_t n, float a,
                                                                                   float cap, float m,
                                                                                   at::BFloat16* out) {
  constexpr int64_t W = 16;
  const float k = cap * kLog2e;
  const __m512 va = _mm512_set1_ps(a), pc0 = _mm512_set1_ps(k * kTanhP0), pc1 = _mm512_set1_ps(k * kTanhP1),
               pc2 = _mm512_set1_ps(k * kTanhP2), vnm = _mm512_set1_ps(-m * kLog2e);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    const __m512 e0 = softcap_exp_vec<kFloor>(x + i, va, pc0, pc1, pc2, vnm);
    const __m512 e1 = softcap_exp_vec<kFloor>(x + i + W, va, pc0, pc1, pc2, vnm);
    const __m512 e2 = softcap_exp_vec<kFloor>(x + i + 2 * W, va, pc0, pc1, pc2, vnm);
    const __m512 e3 = softcap_exp_vec<kFloor>(x + i + 3 * W, va, pc0, pc1, pc2, vnm);
    s0 = _mm512_add_ps(s0, _mm512_add_ps(e0, e2));
    s1 = _mm512_add_ps(s1, _mm512_add_ps(e1, e3));
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i + 2 * W),
                        reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e3, e2)));
  }
  for (; i + 2 * W <= n; i += 2 * W) {
    const __m512 e0 = softcap_exp_vec<kFloor>(x + i, va, pc0, pc1, pc2, vnm);
    const __m512 e1 = softcap_exp_vec<kFloor>(x + i + W, va, pc0, pc1, pc2, vnm);
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  for (; i < n; ++i) {
    const float e = std::exp(cap * std::tanh(x[i] * a) - m);
    out[i] = at::BFloat16(e);
    s += e;
  }
  return s;
}

__attribute__((target("avx512bf16"))) inline float softcap_exp_sum_round_bf16(const float* x, int64_t n, float a,
                                                                              float cap, float m, at::BFloat16* out) {
  return (cap + m) * kLog2e > 124.f ? softcap_exp_sum_round_bf16_impl<true>(x, n, a, cap, m, out)
                                                  : softcap_exp_sum_round_bf16_impl<false>(x, n, a, cap, m, out);
}

// dst = bf16(src · a), n values (scale_convert_row).
__attribute__((target("avx512bf16"))) inline void scale_round_bf16(const float* src, float a, at::BFloat16* dst,
                                                                    int64_t n) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, src + i), va);
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(dst + i), k, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
  }
}

inline bool bf16_native_ok() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

template <>
inline float exp_fma_sum_round<at::BFloat16>(const float* x, int64_t n, float a, float b, at::BFloat16* out) {
  if (bf16_native_ok()) return exp_fma_sum_round_bf16(x, n, a, b, out);
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const Vec va(a), vnb(-b);
  Vec s0(0.f), s1(0.f);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec e0 = vexp(at::vec::fmadd(Vec::loadu(x + i), va, vnb));
    const Vec e1 = vexp(at::vec::fmadd(Vec::loadu(x + i + W), va, vnb));
    s0 = s0 + e0;
    s1 = s1 + e1;
    at::vec::convert_from_float<at::BFloat16>(e0, e1).store(out + i);
  }
  float s = hsum<float>(s0 + s1);
  for (; i < n; ++i) {
    const float e = std::exp(x[i] * a - b);
    out[i] = at::BFloat16(e);
    s += e;
  }
  return s;
}

template <>
inline float exp_fma_sum_round_max<at::BFloat16>(const float* x, int64_t n, float a, float b, at::BFloat16* out,
                                                 float* mx) {
  if (bf16_native_ok()) return exp_fma_sum_round_max_bf16(x, n, a, b, out, mx);
  *mx = n > 0 ? row_max(x, n) : -std::numeric_limits<float>::infinity();
  return exp_fma_sum_round<at::BFloat16>(x, n, a, b, out);
}

#endif

// max(a, b) by plain vmaxps, without at::vec::maximum's NaN propagation (see row_max_fast).
inline at::vec::Vectorized<float> max_fast(const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// max(x) without NaN propagation in the vector part (plain vmaxps: a third cheaper than
// at::vec::maximum), for callers that do not need it: a NaN score still poisons its row
// through exp and the row sum, unless every other score is -inf, which the caller checks
// (row_max_fast == -inf -> recompute with row_max).
inline float row_max_fast(const float* x, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int64_t W = 16;
  const float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  __m512 m0 = _mm512_set1_ps(m), m1 = m0;
  for (; i + 2 * W <= n; i += 2 * W) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + i + W));
  }
  for (; i + W <= n; i += W) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
  // The tail in one masked vector (-inf in the lanes past n): a windowed row's own key
  // range has any length, and a scalar tail is up to 15 dependent max_keep_nan steps.
  if (i < n) {
    const __mmask16 k = __mmask16((1u << (n - i)) - 1);
    m1 = _mm512_max_ps(m1, _mm512_mask_loadu_ps(_mm512_set1_ps(m), k, x + i));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
#else
  return row_max(x, n);
#endif
}

// Generic entry points of the two backward rows (T = BFloat16 / Half): the native bf16
// version where the build and the CPU have it, else the float helpers and a rounding pass.
template <typename T>
inline void exp_lse_round(float* x, int64_t n, float scale, const float* lse, T* out) {
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>)
    if (bf16_native_ok()) return exp_lse_round_bf16(x, n, scale, lse, out);
#endif
  exp_scaled_minus(x, n, scale, lse, true);
  at::vec::convert(x, out, n);
}

template <typename T>
inline void softmax_grad_round(const float* p, const float* dp, int64_t n, const float* delta, float scale, T* out,
                               float* tmp) {
#ifdef ATTNKERNELS_NATIVE_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>)
    if (bf16_native_ok()) return softmax_grad_round_bf16(p, dp, n, delta, scale, out);
#endif
  std::copy(p, p + n, tmp);
  softmax_grad(tmp, dp, n, delta, true, scale);
  at::vec::convert(tmp, out, n);
}

// dst[0, n) = src[0, n) converted (rounded to nearest even for bf16 / fp16).
template <typename S, typename D>
inline void convert_row(const S* src, D* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

// dst[0, n) = src[0, n) · a, converted as convert_row: the forward's output rows (normalised
// and rounded in one pass; at::vec's bf16 rounding is the software one, ~8 integer ops a vector,
// where AVX512-BF16 has one instruction: measured ~3% of a bf16 window forward at D = 64).
template <typename S, typename D>
inline void scale_convert_row(const S* src, S a, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    std::copy(src, src + n, dst);
    scale_row(dst, n, a);
  } else {
#ifdef ATTNKERNELS_NATIVE_BF16
    if constexpr (std::is_same_v<S, float> && std::is_same_v<D, at::BFloat16>)
      if (bf16_native_ok()) return scale_round_bf16(src, a, dst, n);
#endif
    using Vec = at::vec::Vectorized<S>;
    constexpr int64_t W = Vec::size();
    const Vec va(a);
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W)
      at::vec::convert_from_float<D>(Vec::loadu(src + i) * va, Vec::loadu(src + i + W) * va).store(dst + i);
    for (; i < n; ++i) dst[i] = D(src[i] * a);
  }
}

ATTNKERNELS_COMMON_END

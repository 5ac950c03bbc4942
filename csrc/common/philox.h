// Attention dropout's keep mask: Philox4x32-10, the counter-based generator of
// attnkernels/softmax/dropout.py, reproduced bit for bit.
//
//   words = Philox4x32-10(key = (seed lo32, seed hi32), counter = (j >> 4, i, b * Hq + h, 0))
//   byte(b, h, i, j) = (words[(j >> 2) & 3] >> 8 (j & 3)) & 0xFF
//   keep(b, h, i, j) = byte >= t,   t = min(round(p · 256), 255)   (P(keep) = 1 - t / 256)
//
// One Philox call gives the bytes of sixteen neighbouring keys of one query row: stored as
// four little-endian uint32 words, its 16 bytes are keys 16 c .. 16 c + 15 in order, so a
// row's words read as a uint8_t array are the row's bytes (x86 only: the static_assert).
// The vector paths (AVX-512) run 8 calls at once, one per 64-bit lane: _mm512_mul_epu32
// multiplies the low 32 bits of each lane into the full 64-bit product, so hi / lo are
// a swap of halves and a truncation. The high halves of the lanes carry garbage that never
// reaches a low half (xor and mul_epu32 only read / mix within the low 32 bits), and
// the words are truncated on the way out. One 512-bit vector of words is 64 keys' bytes,
// compared with the broadcast threshold by one vpcmpub into a 64-bit keep mask.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "common/ns.h"
#include "common/row_math.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "philox.h reads Philox words as bytes in key order");

ATTNKERNELS_COMMON_BEGIN

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;

struct PhiloxKey {
  uint32_t k0 = 0, k1 = 0;
};

inline PhiloxKey philox_key(int64_t seed) {
  const uint64_t s = uint64_t(seed);  // two's complement, as dropout.py's `seed & MASK32`, `seed >> 32`
  return {uint32_t(s), uint32_t(s >> 32)};
}

// dropout.py's keep_threshold: the byte t = min(floor(p · 256 + 0.5), 255), p in [0, 1)
// (0 for p < 1/512: the op entry point rejects a p > 0 that rounds to 0).
inline uint8_t keep_threshold(double p) {
  const double t = std::floor(p * 256.0 + 0.5);
  return t >= 255.0 ? uint8_t(255) : uint8_t(t);
}

// dropout.py's keep_scale: 1 / (1 - t / 256), the kept probabilities' factor.
inline double keep_scale(uint8_t t) { return 256.0 / (256.0 - t); }

inline void philox4x32(uint32_t c[4], PhiloxKey key) {
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = uint64_t(kPhiloxRoundB) * c[2];
    const uint64_t pa = uint64_t(kPhiloxRoundA) * c[0];
    const uint32_t n0 = uint32_t(pb >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = uint32_t(pa >> 32) ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = uint32_t(pb);
    c[2] = n2;
    c[3] = uint32_t(pa);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// The 10 round keys of a key, broadcast once per row / tile instead of per call.
struct PhiloxRoundKeys {
  uint32_t a[10], b[10];
  __m512i k0[10], k1[10];
  explicit PhiloxRoundKeys(PhiloxKey key) {
    uint32_t x = key.k0, y = key.k1;
    for (int r = 0; r < 10; ++r, x += kPhiloxKeyA, y += kPhiloxKeyB) {
      a[r] = x;
      b[r] = y;
      k0[r] = _mm512_set1_epi64(x);
      k1[r] = _mm512_set1_epi64(y);
    }
  }
};

// The high 32 bits of each 64-bit lane moved to the low ones (the low ones go high: garbage
// the rounds tolerate). A swap of halves (vpshufd, the shuffle port) rather than a shift:
// 512-bit shifts and vpmuludq both issue only on port 0, which made the rounds port-0 bound
// (measured: bf16 dropout forward 1.80x the plain call with shifts).
inline __m512i hi_to_lo(__m512i x) { return _mm512_shuffle_epi32(x, _MM_PERM_CDAB); }

// Rounds first .. 9 of 8 Philox calls, counters in the low halves of the 64-bit lanes of
// c0..c3: per round two 32x32 -> 64 products and two three-way xors (vpternlog 0x96).
inline void philox_rounds_x8(__m512i& c0, __m512i& c1, __m512i& c2, __m512i& c3, const PhiloxRoundKeys& keys,
                             int first) {
  const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA), mb = _mm512_set1_epi64(kPhiloxRoundB);
  for (int r = first; r < 10; ++r) {
    const __m512i pb = _mm512_mul_epu32(c2, mb);
    const __m512i pa = _mm512_mul_epu32(c0, ma);
    c0 = _mm512_ternarylogic_epi64(hi_to_lo(pb), c1, keys.k0[r], 0x96);
    c2 = _mm512_ternarylogic_epi64(hi_to_lo(pa), c3, keys.k1[r], 0x96);
    c1 = pb;
    c3 = pa;
  }
}

inline uint64_t mul_wide(uint32_t m, uint32_t x) { return uint64_t(m) * x; }
#endif

// The round keys the fused bf16 dropout pass reads, built once per thread of a call rather
// than per query row (20 broadcasts and stores per row of a 256-key tile, about half as many
// vector ops as that row's 16 Philox calls):
// PhiloxRoundKeys on AVX-512 builds, an empty stand-in elsewhere (no fused pass there).
#if defined(CPU_CAPABILITY_AVX512)
using PhiloxThreadKeys = PhiloxRoundKeys;
#else
struct PhiloxThreadKeys {
  explicit PhiloxThreadKeys(PhiloxKey) {}
};
#endif

// Query row i of head bh = b * Hq + h, key groups g0 .. g0 + ng - 1:
// words[4 (g - g0) + w] = word w of counter (g, i, bh, 0), i.e. the bytes of keys
// 16 g + 4 w .. 16 g + 4 w + 3: as uint8_t, byte 16 (g - g0) + k is key 16 g + k's.
inline void philox_query_row(uint32_t* words, PhiloxKey key, uint32_t i, uint32_t bh, int64_t g0, int64_t ng) {
  int64_t g = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const PhiloxRoundKeys keys(key);
  const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  // 8 calls = 32 words; (x01, x23) hold words (0, 1) and (2, 3) of a call per lane; the
  // unpacks and the two-source permutes put the 32 words in key order.
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  // Counters (g, i, bh, 0): only g varies along the row, so round 0's B·bh and the round-1
  // word it feeds (c0 after round 0, then A·c0) are the row's constants.
  const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA), mb = _mm512_set1_epi64(kPhiloxRoundB);
  const uint64_t pb0 = mul_wide(kPhiloxRoundB, bh);
  const uint32_t r0c0 = uint32_t(pb0 >> 32) ^ i ^ keys.a[0], r0c1 = uint32_t(pb0);
  const uint64_t pa1 = mul_wide(kPhiloxRoundA, r0c0);
  const __m512i r1x0 = _mm512_set1_epi64(r0c1 ^ keys.a[1]);               // c0 after round 1 = hi(B·c2) ^ this
  const __m512i r1x2 = _mm512_set1_epi64(uint32_t(pa1 >> 32) ^ keys.b[1]);  // c2 after round 1 = c3 ^ this
  const __m512i r1c3 = _mm512_set1_epi64(uint32_t(pa1));
  for (; g + 8 <= ng; g += 8) {
    const __m512i pa = _mm512_mul_epu32(_mm512_add_epi64(_mm512_set1_epi64(g0 + g), lanes), ma);  // round 0
    const __m512i c2r0 = _mm512_xor_si512(hi_to_lo(pa), keys.k1[0]);
    const __m512i pb = _mm512_mul_epu32(c2r0, mb);  // round 1
    __m512i c0 = _mm512_xor_si512(hi_to_lo(pb), r1x0), c1 = pb;
    __m512i c2 = _mm512_xor_si512(pa, r1x2), c3 = r1c3;
    philox_rounds_x8(c0, c1, c2, c3, keys, 2);
    const __m512i x01 = _mm512_mask_blend_epi32(0xAAAA, c0, hi_to_lo(c1));  // (lo c0, lo c1) per lane
    const __m512i x23 = _mm512_mask_blend_epi32(0xAAAA, c2, hi_to_lo(c3));
    const __m512i even = _mm512_unpacklo_epi64(x01, x23);  // calls 0, 2, 4, 6 (one per 128-bit lane)
    const __m512i odd = _mm512_unpackhi_epi64(x01, x23);   // calls 1, 3, 5, 7
    _mm512_storeu_si512(words + 4 * g, _mm512_permutex2var_epi64(even, first, odd));
    _mm512_storeu_si512(words + 4 * g + 16, _mm512_permutex2var_epi64(even, second, odd));
  }
#endif
  for (; g < ng; ++g) {
    uint32_t c[4] = {uint32_t(g0 + g), i, bh, 0u};
    philox4x32(c, key);
    std::copy(c, c + 4, words + 4 * g);
  }
}

// A transposed (key rows x query columns) tile of head bh: key groups g0 .. g0 + ng - 1,
// queries [i0, i0 + m). bytes[(16 (g - g0) + 4 w + k) * ld + c] = byte k of word w of counter
// (g, i0 + c, bh, 0), i.e. the byte of key 16 g + 4 w + k and query i0 + c: each call's
// sixteen bytes are sixteen rows.
inline void philox_key_tile(uint8_t* bytes, int64_t ld, PhiloxKey key, uint32_t bh, int64_t g0, int64_t ng,
                            int64_t i0, int64_t m) {
#if defined(CPU_CAPABILITY_AVX512)
  const PhiloxRoundKeys keys(key);
#endif
  for (int64_t g = 0; g < ng; ++g) {
    uint8_t* rows = bytes + 16 * g * ld;
    int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    // Counters (g, i, bh, 0): only i varies along the tile's rows, so rounds 0 - 2 are
    // mostly the group's constants (the vector work: round 0's c0, round 1's A·c0, round 2's B·c2).
    const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA), mb = _mm512_set1_epi64(kPhiloxRoundB);
    const uint64_t pb0 = mul_wide(kPhiloxRoundB, bh), pa0 = mul_wide(kPhiloxRoundA, uint32_t(g0 + g));
    const uint32_t r0c1 = uint32_t(pb0), r0c2 = uint32_t(pa0 >> 32) ^ keys.b[0], r0c3 = uint32_t(pa0);
    const __m512i r0x0 = _mm512_set1_epi64(uint32_t(pb0 >> 32) ^ keys.a[0]);  // c0 after round 0 = c1 ^ this
    const uint64_t pb1 = mul_wide(kPhiloxRoundB, r0c2);
    const uint32_t r1c0 = uint32_t(pb1 >> 32) ^ r0c1 ^ keys.a[1], r1c1 = uint32_t(pb1);
    const __m512i r1x2 = _mm512_set1_epi64(r0c3 ^ keys.b[1]);  // c2 after round 1 = hi(A·c0) ^ this
    const uint64_t pa2 = mul_wide(kPhiloxRoundA, r1c0);
    const __m512i r2x0 = _mm512_set1_epi64(r1c1 ^ keys.a[2]);                 // c0 after round 2 = hi(B·c2) ^ this
    const __m512i r2x2 = _mm512_set1_epi64(uint32_t(pa2 >> 32) ^ keys.b[2]);  // c2 after round 2 = c3 ^ this
    const __m512i r2c3 = _mm512_set1_epi64(uint32_t(pa2));
    for (; c < m; c += 8) {
      const __m512i c0r0 = _mm512_xor_si512(_mm512_add_epi64(_mm512_set1_epi64(i0 + c), lanes), r0x0);  // round 0
      const __m512i pa = _mm512_mul_epu32(c0r0, ma);  // round 1
      const __m512i c2r1 = _mm512_xor_si512(hi_to_lo(pa), r1x2);
      const __m512i pb = _mm512_mul_epu32(c2r1, mb);  // round 2
      __m512i c0 = _mm512_xor_si512(hi_to_lo(pb), r2x0), c1 = pb;
      __m512i c2 = _mm512_xor_si512(pa, r2x2), c3 = r2c3;
      philox_rounds_x8(c0, c1, c2, c3, keys, 3);
      const __mmask8 k = m - c >= 8 ? __mmask8(0xFF) : __mmask8((1u << (m - c)) - 1);
      const __m512i cw[4] = {c0, c1, c2, c3};
      for (int w = 0; w < 4; ++w)  // vpmovqb keeps each lane's low byte: byte k after a shift by 8 k
        for (int b = 0; b < 4; ++b)
          _mm512_mask_cvtepi64_storeu_epi8(rows + (4 * w + b) * ld + c, k, _mm512_srli_epi64(cw[w], 8 * b));
    }
#endif
    for (; c < m; ++c) {
      uint32_t w[4] = {uint32_t(g0 + g), uint32_t(i0 + c), bh, 0u};
      philox4x32(w, key);
      for (int r = 0; r < 4; ++r)
        for (int b = 0; b < 4; ++b) rows[(4 * r + b) * ld + c] = uint8_t(w[r] >> (8 * b));
    }
  }
}

#ifdef ATTNKERNELS_NATIVE_BF16
// The forward's exp pass with the keep mask fused (bf16 on the matrix units): the Philox
// calls of a query row run in the same loop as the exps of P, so the two independent
// dependency chains (10 rounds of multiplies; the exp's polynomial) share the scheduler
// and keep both vector ports busy (measured: each alone is latency-bound), the words never
// go to memory, and the mask is applied to the rounded P by one masked move per 32 keys.
// The row constants of philox_query_row, for one (query i, head bh).
struct PhiloxRow {
  const PhiloxRoundKeys& keys;  // the thread's (PhiloxThreadKeys)
  __m512i r1x0, r1x2, r1c3, vthr;
  PhiloxRow(const PhiloxRoundKeys& round_keys, uint32_t i, uint32_t bh, uint8_t threshold) : keys(round_keys) {
    const uint64_t pb0 = mul_wide(kPhiloxRoundB, bh);
    const uint32_t r0c0 = uint32_t(pb0 >> 32) ^ i ^ keys.a[0], r0c1 = uint32_t(pb0);
    const uint64_t pa1 = mul_wide(kPhiloxRoundA, r0c0);
    r1x0 = _mm512_set1_epi64(r0c1 ^ keys.a[1]);
    r1x2 = _mm512_set1_epi64(uint32_t(pa1 >> 32) ^ keys.b[1]);
    r1c3 = _mm512_set1_epi64(uint32_t(pa1));
    vthr = _mm512_set1_epi8(char(threshold));
  }
};

// Keep bits of the 128 keys 16 g .. 16 g + 127 (bit k of keep[0], keep[1]: key 16 g + k,
// 16 g + 64 + k), from the calls g .. g + 7: the words in key order as philox_query_row
// (two 512-bit vectors, calls 0 - 3 and 4 - 7, 64 bytes each), one vpcmpub per 64 keys.
__attribute__((target("avx512bf16"))) inline void philox_keep128(const PhiloxRow& row, int64_t g,
                                                                 uint64_t keep[2]) {
  const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA), mb = _mm512_set1_epi64(kPhiloxRoundB);
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  const __m512i pa = _mm512_mul_epu32(_mm512_add_epi64(_mm512_set1_epi64(g), lanes), ma);  // round 0
  const __m512i pb = _mm512_mul_epu32(_mm512_xor_si512(hi_to_lo(pa), row.keys.k1[0]), mb);  // round 1
  __m512i c0 = _mm512_xor_si512(hi_to_lo(pb), row.r1x0), c1 = pb;
  __m512i c2 = _mm512_xor_si512(pa, row.r1x2), c3 = row.r1c3;
  philox_rounds_x8(c0, c1, c2, c3, row.keys, 2);
  const __m512i x01 = _mm512_mask_blend_epi32(0xAAAA, c0, hi_to_lo(c1));  // (lo c0, lo c1) per lane
  const __m512i x23 = _mm512_mask_blend_epi32(0xAAAA, c2, hi_to_lo(c3));
  const __m512i even = _mm512_unpacklo_epi64(x01, x23);  // calls 0, 2, 4, 6 (one per 128-bit lane)
  const __m512i odd = _mm512_unpackhi_epi64(x01, x23);   // calls 1, 3, 5, 7
  keep[0] = _cvtmask64_u64(_mm512_cmpge_epu8_mask(_mm512_permutex2var_epi64(even, first, odd), row.vthr));
  keep[1] = _cvtmask64_u64(_mm512_cmpge_epu8_mask(_mm512_permutex2var_epi64(even, second, odd), row.vthr));
}

// Bits sh .. sh + 63 of the 128-bit (lo, hi), sh in [0, 64).
inline uint64_t funnel_shift(uint64_t lo, uint64_t hi, int64_t sh) { return sh ? (lo >> sh) | (hi << (64 - sh)) : lo; }

// 32 keys of exp_sum_round_drop_bf16: out[c] = bf16(2^(x[c] · va + vnb)) where bit c of keep is
// set, else 0; the exps (all of them) added to s0 (keys 0 - 15) and s1 (16 - 31).
__attribute__((target("avx512bf16"))) inline void exp_round_drop32_bf16(const float* x, __m512 va, __m512 vnb,
                                                                       at::BFloat16* out, uint32_t keep, __m512& s0,
                                                                       __m512& s1) {
  const __m512 e0 = exp2_poly4(_mm512_fmadd_ps(_mm512_loadu_ps(x), va, vnb));
  const __m512 e1 = exp2_poly4(_mm512_fmadd_ps(_mm512_loadu_ps(x + 16), va, vnb));
  s0 = _mm512_add_ps(s0, e0);
  s1 = _mm512_add_ps(s1, e1);
  _mm512_storeu_si512(reinterpret_cast<void*>(out),
                      _mm512_maskz_mov_epi16(__mmask32(keep), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0))));
}

// exp_fma_sum_round_bf16 with dropout: out[c] = bf16(exp(x[c] · a - b)) for the kept keys
// j0 + c of query row i (head bh), 0 for the dropped; returns the sum of every exp (the row
// sum keeps the dropped ones, as the reference). The Philox calls run in the exp loop (one
// philox_keep128 per 128 keys), so their multiply chains and the exp's polynomial share
// the scheduler; the mask is applied to the rounded P by one masked move per 32 keys.
__attribute__((target("avx512bf16"))) inline float exp_sum_round_drop_bf16(const float* x, int64_t n, float a,
                                                                          float b, at::BFloat16* out,
                                                                          const PhiloxRow& row, int64_t j0) {
  const __m512 va = _mm512_set1_ps(a * kLog2e), vnb = _mm512_set1_ps(-b * kLog2e);
  // Element c is bit sh + c of the key stream from key 16 g0; cur holds its bits i .. i + 127
  // (relative to sh), nxt the next 128.
  const int64_t g0 = j0 >> 4, sh = j0 & 15;
  uint64_t cur[2], nxt[2];
  philox_keep128(row, g0, cur);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    // the next 128 bits: for k1 when the keys start mid-call (sh > 0), and as the next cur;
    // neither on the last block of an aligned row (a 256-key tile makes 2 calls, not 3)
    if (sh || i + 128 < n) philox_keep128(row, g0 + (i >> 4) + 8, nxt);
    else nxt[0] = nxt[1] = 0;
    const uint64_t k0 = funnel_shift(cur[0], cur[1], sh), k1 = funnel_shift(cur[1], nxt[0], sh);
    exp_round_drop32_bf16(x + i, va, vnb, out + i, uint32_t(k0), s0, s1);
    exp_round_drop32_bf16(x + i + 32, va, vnb, out + i + 32, uint32_t(k0 >> 32), s0, s1);
    exp_round_drop32_bf16(x + i + 64, va, vnb, out + i + 64, uint32_t(k1), s0, s1);
    exp_round_drop32_bf16(x + i + 96, va, vnb, out + i + 96, uint32_t(k1 >> 32), s0, s1);
    cur[0] = nxt[0];
    cur[1] = nxt[1];
  }
  if (i < n) {  // < 128 keys left: their bits from cur and, past 128 - sh, the next call's
    if (n - i + sh > 128) philox_keep128(row, g0 + (i >> 4) + 8, nxt);
    else nxt[0] = nxt[1] = 0;
    const uint64_t k[2] = {funnel_shift(cur[0], cur[1], sh), funnel_shift(cur[1], nxt[0], sh)};
    int64_t q = 0;
    for (; i + 32 <= n; i += 32, ++q)
      exp_round_drop32_bf16(x + i, va, vnb, out + i, uint32_t(k[q >> 1] >> (32 * (q & 1))), s0, s1);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for (int64_t c = 0; i + c < n; ++c) {
      const int64_t bit = 32 * q + c;
      const float e = std::exp(x[i + c] * a - b);
      out[i + c] = (k[bit >> 6] >> (bit & 63)) & 1 ? at::BFloat16(e) : at::BFloat16(0.f);
      s += e;
    }
    return s;
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
#endif

// x[c] = 0 where u[c] < threshold (dropped; u the keys' Philox bytes); X float, double or
// a 16-bit type's bits.
template <typename X>
inline void drop_row(X* x, const uint8_t* u, int64_t n, uint8_t threshold) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<X, float>) {
    const __m128i vt = _mm_set1_epi8(char(threshold));
    for (; c + 16 <= n; c += 16) {
      const __mmask16 keep = _mm_cmpge_epu8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + c)), vt);
      _mm512_storeu_ps(x + c, _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(x + c)));
    }
  } else if constexpr (std::is_same_v<X, uint16_t>) {
    const __m256i vt = _mm256_set1_epi8(char(threshold));
    for (; c + 32 <= n; c += 32) {
      const __mmask32 keep = _mm256_cmpge_epu8_mask(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + c)), vt);
      _mm512_storeu_si512(x + c, _mm512_maskz_mov_epi16(keep, _mm512_loadu_si512(x + c)));
    }
  }
#endif
  for (; c < n; ++c) x[c] = u[c] >= threshold ? x[c] : X(0);
}

// dst[c] = u[c] >= threshold ? src[c] * a : 0 (dst may be src).
template <typename X>
inline void drop_scale_row(X* dst, const X* src, const uint8_t* u, int64_t n, uint8_t threshold, X a) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<X, float>) {
    const __m128i vt = _mm_set1_epi8(char(threshold));
    const __m512 va = _mm512_set1_ps(a);
    for (; c + 16 <= n; c += 16) {
      const __mmask16 keep = _mm_cmpge_epu8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + c)), vt);
      _mm512_storeu_ps(dst + c, _mm512_maskz_mul_ps(keep, _mm512_loadu_ps(src + c), va));
    }
  }
#endif
  for (; c < n; ++c) dst[c] = u[c] >= threshold ? src[c] * a : X(0);
}

ATTNKERNELS_COMMON_END

// Softmax attention for a few query rows against a long KV cache (decoding), forward only.
//
// One decode step reads every K/V row once and does ~4 flops per byte of it: it is
// bound by memory bandwidth, not by the FMA units, so the kernel is built around
// reading the cache once:
//   * GQA: the Hq / Hk query heads of a kv head, times the Nq query rows, are one
//     block of R = (Hq / Hk) · Nq rows that meets each K/V row together (a kernel per
//     query head would stream the cache Hq / Hk times);
//   * split-KV: the key range of each (batch, kv head) is cut into chunks, one task
//     per (b, kv head, chunk); the threads of torch's OpenMP team pull tasks from a
//     counter (ATTNKERNELS_CPU_DECODE_HELPERS=interop: the caller and helpers from ATen's
//     inter-op pool instead, the caller waiting only for tasks a helper has taken; see
//     run_shared for which wins where). Each task keeps the
//     online-softmax state (row max m, row sum l, unnormalised output acc) of its R rows
//     and writes it as a partial; the chunk of a (b, kv head) that finishes last merges
//     its partials by LSE in chunk order. The chunking depends only on the shapes (never
//     on the thread count), so the result is the same bits on any number of threads;
//   * inside a task, keys go in tiles of kTile: scores S = q·kᵀ (one vector dot per
//     row and key, q pre-scaled), the online softmax on S, then acc = acc·α + P V with
//     the rescale folded into the accumulator load of a register-blocked loop; on
//     AVX-512 the scores of 4 rows x 4 keys are 16 FMA chains reduced together by a
//     transpose-and-add tree, and the next tile's rows are prefetched.
// bf16 on a CPU with AMX-BF16 (R <= 16, D and Dv multiples of 32; ATTNKERNELS_CPU_NO_AMX=1 forces
// the vector path below): both products on the tile units, raw tile instructions, one tile
// configuration per thread and call. Sᵀ[32 keys, 16] = K · Qᵀ takes K rows straight from the cache
// as the A operand (a K row is a row of an A tile; only Qᵀ, the group's R query rows padded to 16
// columns, is packed, once per task); P·V takes P (rounded to bf16, as the matrix-unit softmax
// kernels do) as the A operand and V's rows interleaved in pairs (two unpacks per 32 values) as B;
// float accumulation, the online softmax as below. Measured here (thread CPU time, 1 thread, B=1,
// Hq=32, Hk=8, D=128): per key and kv head with K / V in L2 ~23 ns against ~43 ns on the vector
// path; P·V by vdpbf16ps on the same V pairs instead: ~33 ns (the FMA ports bound it as they bind
// the float FMAs). At Nk=4096 (16 MB of K / V) the step then waits on memory, not on arithmetic.
// Otherwise bf16 / fp16 K/V rows are widened to float in registers as they are read (AVX-512,
// query blocks up to kDirectRows rows), else a tile at a time into a buffer that stays
// in L1; float32 math for bf16 / fp16 / fp32, float64 for float64.
// Tried for bf16 and not kept (this host, thread CPU time, 1 thread, B=1, Hq=32, Hk=8, D=128,
// Nk=4096, where a call costs ~36 ns per key and kv head whether K / V come from L2 or L3):
// AVX512-BF16 vdpbf16ps dot products on the bf16 rows for q·k and P·V (P in bf16): 0.96-0.99x;
// the tile units through cpublas::brgemm (Sᵀ = K qᵀ, P V from VNNI-paired V rows): 0.64x with
// 32-key tiles, 0.9-1.0x with 256; widening bf16 as even / odd halves of 32-bit words (2 ops per
// 32 values instead of 4): 1.03-1.05x back to back on the same K / V but 0.93-0.97x interleaved
// with SDPA, a copy and a matmul as the benchmark report runs them; kTile = 64: no change.
//
// Strided K/V: only the last dim must be contiguous; batch, head and row strides are
// taken as they come, so a KV-cache prefix k_full[:, :, :n] or a (B, N, H, D) cache
// seen as (B, H, N, D) runs without a copy.
//
// KV caches (attention_kvcache_fwd): per-row lengths L_b (cache_seqlens, after any append)
// and paged caches (num_pages, Hk, page_size, D) read through block_table (B, max_pages)
// page by page, straight from the pages (no gather): a tile of kTile keys over a page
// boundary is read as one run of consecutive rows per page (scores and P·V per run, one
// online-softmax step per tile), so 16-row pages keep full tiles. Measured here, 1 thread,
// B=1, Hk=8, D=128, Nk=32768, interleaved against the contiguous cache: pages of 16 / 64 /
// 256 rows cost 1.1-1.2x / 1.03-1.05x / 1.0x (tiles cut at page boundaries instead: 1.20x at
// 16, fp32); prefetching further ahead for pages made it slower (1.26-1.42x at 16).
// The chunking is planned on the longest row's band; a chunk past a shorter row's band is
// an empty task (its partial is m = −inf and the merge skips it), so the split still
// depends on the shapes and lengths only. Query blocks over kMaxBlockRows rows (chunked
// prefill) run as consecutive blocks of at most kMaxBlockRows rows, each one pass over the
// cache: correct for any Nq, meant for short chunks (a long prefill belongs to attention()).
//
// Modifiers, on the scaled logits in the order of DESIGN.md: softcap s ← c·tanh(s/c),
// then ALiBi s ← s − slope[b, h]·|i + L_b − Nq − j|.
//
// Masks: bottom-right aligned causal / window (query i sees key j iff j < L_b and
// i + L_b − Nq − left <= j <= i + L_b − Nq + right, −1 = unbounded; L_b = Nk without a
// cache) and a key padding mask (B, Nk), True = ignored. A row that sees no key gets
// out 0 and LSE −inf.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"
#include "common/row_math.h"
#include "common/tile_gemm.h"

#if defined(CPU_CAPABILITY_AVX512) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DECODE_AMX 1
#else
#define DECODE_AMX 0
#endif

namespace {

namespace common = ATTNKERNELS_NS::common;

template <typename T>
using acc_type = at::opmath_type<T>;  // float for float / bf16 / fp16, double for double

// Keys per inner tile: S [R, kTile] and, for 16-bit inputs, the float copies of the
// K and V tiles (kTile x 128 floats = 16 KB each) stay in L1.
constexpr int64_t kTile = 32;
// The chunking of the key range: enough tasks for the threads to balance (B · Hk ·
// chunks >= kTargetTasks where the cache is long enough), but never chunks under
// kMinChunk keys, whose partials would cost more to merge than they save.
constexpr int64_t kTargetTasks = 64;
constexpr int64_t kMinChunk = 512;
// The vector path always prefetches the next tile's K and V rows. Measured here as the benchmark
// report runs a decode row (each call interleaved with SDPA, a copy of K and a 1024³ matmul, so the
// cache comes from L3 or memory), fp32, 1 thread, B=1, Hk=8, D=128, contiguous cache: 1.17-1.22x
// faster at Nk=4096 (32 MB of K / V; the step had prefetched only above 64 MB, from a measurement
// of back-to-back calls, where L3 holds the cache: 10-20% slower there), 1.06-1.10x at Nk=512-1024.
// Paged caches gain the same way (the hardware prefetcher restarts at every page: measured B=1,
// Hk=8, D=128, Nk=4096, pages 16-256 rows: 0.7-0.86x the time without it). Shape-only, and it
// never changes a result.
// bf16 on the tile units never prefetches. Measured (same rounds, 1 thread, B=1, Hk=8, D=128,
// Nk=4096, contiguous / pages of 64): the next tile into L1 0.74x / 0.91x the speed; into L2 one,
// two, four or eight tiles ahead, or K or V alone 0.84-0.97x / 0.90-1.06x; spread over the tile's
// phases, or one line per 4 KB page (the TLB and the hardware prefetcher's start) 0.95-1.02x.
// Why, measured by taking the tile's work away piece by piece: the step is the sum of its memory
// time and its compute, not their max (reading K and V alone in this order: 1.16 ms contiguous /
// 1.86 ms paged; + the V pairs and the score tiles 1.52 / 2.48; + softmax, P·V: 2.04 / 2.98). Probably
// (no counters on this host to confirm it) because a tile's tile stores (Sᵀ, P·V) must retire before
// the loads that read them, so the next tile's loads cannot start early, and a prefetch only takes
// fill buffers from this tile's own loads.
// Also measured and not kept: visiting a chunk's tiles round-robin over 2, 4 or 8 sub-ranges (more
// streams for the hardware prefetcher): 0.96-1.05x; P·V on vdpbf16ps with V paired in registers
// (no tile stores): 0.95x / 0.87x; P·V tiles of R rows instead of 16: 0.98-1.05x.
// Session 7, on an AMD EPYC (Zen 5) host of this project (AVX-512, AVX512-BF16, no AMX: bf16 takes the vector
// path here, ATTNKERNELS_CPU_NO_AMX or not; the AMX notes above are from a Sapphire-Rapids-class host and could
// not be re-checked), 1 thread, B=1, Hq=32, Hk=8, D=128, Nk=4096, each call after SDPA, a copy of K and a
// 1024³ matmul, 21 rounds, medians of pairwise ratios, contiguous / shuffled pages of 64 (host loaded by
// other builds: ratios only): the prefetch into L2 (prefetcht1) instead of L1: 0.93x / 0.93x fp32,
// 0.97x / 0.92x bf16; non-temporal (prefetchnta): 0.96x / 1.00x fp32, 0.96x / 0.91x bf16; two or three
// tiles ahead instead of one: 0.94x / 1.05x and 0.78x / 0.98x fp32, 0.94x / 0.97x and 0.83x / 0.94x bf16;
// none: 0.94x / 0.91x fp32, 0.57x / 0.54x bf16. Not kept: the next tile into L1 stays.
// Below this many flops per thread a parallel region costs more than it saves.
constexpr double kMinParallelFlops = 2e6;

struct Decode : common::QKVShape {  // B, Hq, Hk, Nq, Nk, D, Dv, group
  int64_t R = 0;  // query rows of a GQA group: group * Nq
  int64_t left = -1, right = -1;
  // Row b's diagonal offset is L_b + off_shift: −Nq for a whole query block, q0 − Nq_total for
  // rows [q0, q0 + Nq) of a longer one (row i of the block is row q0 + i of the call).
  int64_t off_shift = 0;
  int64_t lo = 0, hi = 0;               // the longest band of visible keys over the rows b (lo = 0: see plan)
  int64_t chunk = 0, n_chunks = 0;      // the split of a row's band [lo_b, hi_b) into chunks
  // k strides (elements); the last dim is contiguous. sk_b steps pages for a paged cache.
  int64_t sk_b = 0, sk_h = 0, sk_n = 0;
  int64_t sv_b = 0, sv_h = 0, sv_n = 0;
  const int32_t* seqlens = nullptr;     // [B] keys per row (L_b), or nullptr: every row has Nk
  const int32_t* pages = nullptr;       // block_table [B, bt_stride] or nullptr: contiguous (page b of row b)
  int64_t bt_stride = 0;
  int page_shift = 62;                  // log2(page_size); contiguous: one "page" holds the whole row
  const bool* kpm = nullptr;            // [B, Nk], true = ignored
  bool prefetch = true;
  double cap = 0;                       // softcap, 0 = off
  const void* slopes = nullptr;         // ALiBi slopes [B, Hq] in the accumulation type, or nullptr
};

inline int64_t row_length(const Decode& p, int64_t b) { return p.seqlens ? int64_t(p.seqlens[b]) : p.Nk; }

// Keys [lo, hi) that query row i of batch row b sees under the window (hi <= lo: none).
inline std::pair<int64_t, int64_t> row_band(const Decode& p, int64_t b, int64_t i) {
  const int64_t L = row_length(p, b), off = L + p.off_shift;
  const int64_t lo = p.left < 0 ? 0 : std::max<int64_t>(0, i + off - p.left);
  const int64_t hi = p.right < 0 ? L : std::min<int64_t>(L, i + off + p.right + 1);
  return {lo, hi};
}

// Row b's visible keys [lo, hi) over all its query rows, and each row's band.
inline std::pair<int64_t, int64_t> batch_band(const Decode& p, int64_t b, int64_t* row_lo, int64_t* row_hi) {
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
  for (int64_t i = 0; i < p.Nq; ++i) {
    std::tie(row_lo[i], row_hi[i]) = row_band(p, b, i);
    if (row_hi[i] > row_lo[i]) {
      lo = std::min(lo, row_lo[i]);
      hi = std::max(hi, row_hi[i]);
    }
  }
  return hi > 0 && hi > lo ? std::make_pair(lo, hi) : std::make_pair(int64_t(0), int64_t(0));
}

void plan_chunks(Decode& p) {
  std::vector<int64_t> rl(p.Nq), rh(p.Nq);
  int64_t band = 0;
  p.lo = 0;
  p.hi = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    const auto [lo, hi] = batch_band(p, b, rl.data(), rh.data());
    if (hi - lo > band) {
      band = hi - lo;
      p.lo = lo;
      p.hi = hi;
    }
  }
  if (band == 0) {
    p.lo = p.hi = 0;
    p.chunk = kTile;
    p.n_chunks = 0;
    return;
  }
  const int64_t pairs = std::max<int64_t>(1, p.B * p.Hk);
  const int64_t want = (kTargetTasks + pairs - 1) / pairs;
  const int64_t most = std::max<int64_t>(1, band / kMinChunk);
  const int64_t n = std::max<int64_t>(1, std::min(want, most));
  p.chunk = ((band + n - 1) / n + kTile - 1) / kTile * kTile;
  p.n_chunks = (band + p.chunk - 1) / p.chunk;
}

// ---------------------------------------------------------------------------
// Row helpers
// ---------------------------------------------------------------------------

// dst[0, n) = A(src[0, n)): bf16 / fp16 widened to float, vectorised (at::vec::convert
// has no vector path for this direction); a plain copy when the types agree.
template <typename T, typename A>
inline void widen_row(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::copy(src, src + n, dst);
  } else {
    static_assert(std::is_same_v<A, float>, "16-bit rows widen to float");
    using VecT = at::vec::Vectorized<T>;
    using Vec = at::vec::Vectorized<float>;
    constexpr int64_t W = VecT::size();  // 2 float vectors
    int64_t c = 0;
    for (; c + W <= n; c += W) {
      auto [a, b] = at::vec::convert_to_float<T>(VecT::loadu(src + c));
      a.store(dst + c);
      b.store(dst + c + Vec::size());
    }
    if (c < n) {
      const int64_t rest = n - c;
      auto [a, b] = at::vec::convert_to_float<T>(VecT::loadu(src + c, rest));
      if (rest <= Vec::size()) {
        a.store(dst + c, rest);
      } else {
        a.store(dst + c);
        b.store(dst + c + Vec::size(), rest - Vec::size());
      }
    }
  }
}

// Fully unroll the fixed register-block loops, so the accumulator arrays live in registers
// (without it GCC keeps the reduction's inputs on the stack).
#if defined(__clang__)
#define DECODE_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define DECODE_UNROLL _Pragma("GCC unroll 16")
#else
#define DECODE_UNROLL
#endif

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kAvx512 = true;
#else
constexpr bool kAvx512 = false;
#endif

// One vector of a K / V row (Vectorized<A>::size() values from p) as A. bf16 / fp16 rows
// are widened in registers on AVX-512 (a bf16 is the top half of a float; fp16 via F16C);
// elsewhere they go through a float buffer first (see `direct_rows`), and this scalar
// fallback only keeps the templates complete.
template <typename A, typename S>
inline at::vec::Vectorized<A> load_row(const S* p) {
  using Vec = at::vec::Vectorized<A>;
  if constexpr (std::is_same_v<A, S>) {
    return Vec::loadu(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<A, float> && std::is_same_v<S, at::BFloat16>) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else if constexpr (std::is_same_v<A, float> && std::is_same_v<S, at::Half>) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
#endif
    A tmp[Vec::size()];
    for (int64_t i = 0; i < Vec::size(); ++i) tmp[i] = A(p[i]);
    return Vec::loadu(tmp);
  }
}

// Rows of 16-bit K / V read in place (widened in registers) when the query block is small
// enough that each K / V vector is widened at most twice; larger blocks first widen the
// tile into a float buffer once. Without AVX-512, always the buffer.
constexpr int64_t kDirectRows = kAvx512 ? 8 : 0;

#if defined(CPU_CAPABILITY_AVX512)
// The horizontal sums of 16 float vectors in one vector, by a transpose-and-add tree
// (15 adds, 30 shuffles instead of 16 separate 4-step reductions). With the inputs in
// order x[4·j + r], lane 4·r + j holds sum(x[4·j + r]). A fixed order: deterministic.
inline __m512 reduce16(const __m512* x) {
  __m512 y1[8], y2[4], y3[2];
  DECODE_UNROLL for (int i = 0; i < 8; ++i) {
    const __m512 a = x[2 * i], b = x[2 * i + 1];
    y1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  DECODE_UNROLL for (int i = 0; i < 4; ++i) {
    const __m512 a = y1[2 * i], b = y1[2 * i + 1];
    y2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  DECODE_UNROLL for (int i = 0; i < 2; ++i) {
    const __m512d a = _mm512_castps_pd(y2[2 * i]), b = _mm512_castps_pd(y2[2 * i + 1]);
    y3[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(y3[0], y3[1], 0x88), _mm512_shuffle_ps(y3[0], y3[1], 0xDD));
}
#endif

// S[r, j] = q_r · k_j for RB rows of q (row stride D) and KB keys (row stride ks): RB·KB
// independent FMA chains over D, then one reduction per score.
template <int RB, int KB, typename A, typename S>
inline void dot_block(const A* q, int64_t D, const S* k, int64_t ks, A* out, int64_t os) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec acc[KB * RB];  // [j][r]
  DECODE_UNROLL for (int i = 0; i < KB * RB; ++i) acc[i] = Vec(A(0));
  int64_t c = 0;
  for (; c + W <= D; c += W) {
    Vec kv[KB];
    DECODE_UNROLL for (int j = 0; j < KB; ++j) kv[j] = load_row<A>(k + j * ks + c);
    DECODE_UNROLL for (int r = 0; r < RB; ++r) {
      const Vec qv = Vec::loadu(q + r * D + c);
      DECODE_UNROLL for (int j = 0; j < KB; ++j) acc[j * RB + r] = at::vec::fmadd(qv, kv[j], acc[j * RB + r]);
    }
  }
  DECODE_UNROLL for (int r = 0; r < RB; ++r)
    DECODE_UNROLL for (int j = 0; j < KB; ++j) out[r * os + j] = common::hsum<A>(acc[j * RB + r]);
  if (c < D) {  // the head-dim tail, scalar
    DECODE_UNROLL for (int r = 0; r < RB; ++r)
      DECODE_UNROLL for (int j = 0; j < KB; ++j) {
        A t = 0;
        for (int64_t d = c; d < D; ++d) t += q[r * D + d] * A(k[j * ks + d]);
        out[r * os + j] += t;
      }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// dot_block<4, 4> for float on AVX-512 with D % 16 == 0: the 16 chains on raw registers and
// the 16 reductions by reduce16 (GCC keeps a Vectorized array on the stack across it).
template <typename S>
inline void dot_4x4_avx512(const float* q, int64_t D, const S* k, int64_t ks, float* out, int64_t os) {
  __m512 acc[16];  // [j][r]
  DECODE_UNROLL for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) {
    __m512 kv[4];
    DECODE_UNROLL for (int j = 0; j < 4; ++j) kv[j] = load_row<float>(k + j * ks + c);
    DECODE_UNROLL for (int r = 0; r < 4; ++r) {
      const __m512 qv = _mm512_loadu_ps(q + r * D + c);
      DECODE_UNROLL for (int j = 0; j < 4; ++j) acc[j * 4 + r] = _mm512_fmadd_ps(qv, kv[j], acc[j * 4 + r]);
    }
  }
  const __m512 y = reduce16(acc);
  _mm_storeu_ps(out, _mm512_extractf32x4_ps(y, 0));
  _mm_storeu_ps(out + os, _mm512_extractf32x4_ps(y, 1));
  _mm_storeu_ps(out + 2 * os, _mm512_extractf32x4_ps(y, 2));
  _mm_storeu_ps(out + 3 * os, _mm512_extractf32x4_ps(y, 3));
}
#endif

// qt [D / 32][16][16][2] = the VNNI pairs of Qᵀ for the R rows of q (bf16 [R, D]), zero past R: the 32-bit
// word (q[r, 2i], q[r, 2i + 1]) of each row goes to column r of pair row i.
inline void pack_qt(const at::BFloat16* q, int64_t R, int64_t D, at::BFloat16* qt) {
  const uint32_t* src = reinterpret_cast<const uint32_t*>(q);
  uint32_t* dst = reinterpret_cast<uint32_t*>(qt);  // [D / 2][16]
  std::fill(dst, dst + D * 8, uint32_t(0));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < D / 2; ++i) dst[i * 16 + r] = src[r * (D / 2) + i];
}

#if DECODE_AMX
// ---------------------------------------------------------------------------
// bf16 scores on the tile units, K straight from the cache
// ---------------------------------------------------------------------------
// Sᵀ[keys, 16] = K[keys, D] · Qᵀ[D, 16]: a K row in the cache is exactly a row of the tile
// unit's A operand (16 rows x 32 bf16, any row stride), so K is never packed or widened;
// only the group's query rows (R <= 16, zero columns past R) are packed as the VNNI B
// operand, once per task. Raw tile instructions rather than cpublas::brgemm: oneDNN's
// per-call kernel lookup and tile configuration cost more than a 32-key tile's 8 tile
// products (brgemm with 32-key tiles measured 0.64x, see the top of the file).
// Tiles: 0, 1 = C (keys 0-15, 16-31 of a kTile block, float [16 keys, 16 query rows]),
// 2, 3 = A (those K rows, 32 of D), 4 = B (Qᵀ for those 32 of D, [16 pairs, 16, 2]).
static_assert(kTile == 32, "the tile-unit scores cover 32 keys per call");

struct AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the tile registers' state only on request (arch_prctl ARCH_REQ_XCOMP_PERM =
// 0x1023 for XFEATURE_XTILEDATA = 18), once per process; oneDNN asks too, asking twice is fine.
inline bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// bf16 with R <= 16 and D % 32 == 0 on a CPU with the tile units (AMX; not disabled by
// ATTNKERNELS_CPU_NO_AMX: common::tile_units_available). AVX512-BF16 alone takes the vector path.
inline bool amx_scores_ok(at::ScalarType t, int64_t R, int64_t D, int64_t Dv) {
  return t == at::kBFloat16 && R >= 1 && R <= 16 && D % 32 == 0 && D > 0 && Dv % 32 == 0 && Dv > 0 &&
         common::bf16_native_ok() &&
         common::tile_units_available(at::kBFloat16) && amx_permitted();
}

__attribute__((target("amx-tile,amx-bf16"))) inline void amx_configure() {
  AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // Not _tile_loadconfig: GCC 12 drops the stores above as dead (its builtin is not seen to read
  // memory; measured: ldtilecfg of a zero config, a fault).
  asm volatile("ldtilecfg %0" ::"m"(cfg));
}

// Released through cpublas (oneDNN's release_hw_context), not a bare tilerelease: torch caches
// which brgemm tile configuration a thread has loaded, and a bare release would leave that cache
// pointing at a configuration the thread no longer holds (its next brgemm would skip ldtilecfg).
inline void amx_release() { common::vnni_release(); }

// c [32, 16] float = K rows (k0: keys 0-15, k1: keys 16-31, row strides ks0 / ks1 bytes) · Qᵀ; qt: Qᵀ in
// VNNI pairs, [D / 32][16 pairs][16 rows of q][2].
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_scores32(const at::BFloat16* k0, int64_t ks0,
                                                                       const at::BFloat16* k1, int64_t ks1,
                                                                       const at::BFloat16* qt, int64_t D, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t d = 0; d < D; d += 32) {
    _tile_loadd(4, qt + d * 16, 64);
    _tile_loadd(2, k0 + d, ks0);
    _tile_loadd(3, k1 + d, ks1);
    _tile_dpbf16ps(0, 2, 4);
    _tile_dpbf16ps(1, 3, 4);
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 16 * 16, 64);
}

// Of a 32-column group of V rows (v0, v1) interleaved by unpacklo / unpackhi_epi16, which work per
// 128-bit lane, words 0-15 hold columns {0-3, 8-11, 16-19, 24-27} and words 16-31 columns
// {4-7, 12-15, 20-23, 28-31}. pair_inverse(part): for column 16 · part + c, its word in that order,
// as a _mm512_permutex2var_ps index (< 16: words 0-15, else 16-31).
inline __m512i pair_inverse(int part) {
  alignas(64) int32_t idx[16];
  for (int c = 0; c < 16; ++c) {
    const int d = 16 * part + c;
    idx[c] = (d % 8 < 4 ? 0 : 16) + 4 * (d / 8) + d % 4;
  }
  return _mm512_load_si512(idx);
}

// P [R, kTile] bf16 = the tile's n probabilities (float S, row stride kTile), zero past n.
__attribute__((target("avx512bf16"))) inline void round_p(const float* S, int64_t R, int64_t n, at::BFloat16* P) {
  for (int64_t r = 0; r < R; ++r) {
    const float* s = S + r * kTile;
    at::BFloat16* d = P + r * kTile;
    for (int64_t j = 0; j < n; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + j)));
    std::fill(d + n, d + kTile, at::BFloat16(0.f));
  }
}

// ---------------------------------------------------------------------------
// bf16 P·V on the tile units
// ---------------------------------------------------------------------------
// PV[16, Dv] = P[16 rows (R used), 32 keys] · V[32 keys, Dv]: V's B operand needs pairs of key rows
// interleaved, which unpacklo / unpackhi_epi16 make (4 ops per key pair and 32 columns) in the
// column order of pair_inverse; the tile product keeps that order and add_pv_rows puts it back
// as it adds PV to acc.
// vt [16 pairs][Dv words] = the VNNI pairs of the tile's V rows vrow[0, 2·pairs), zero pairs after.
inline void pack_v_pairs(const at::BFloat16* const* vrow, int64_t pairs, int64_t Dv, at::BFloat16* vt) {
  for (int64_t w = 0; w < pairs; ++w) {
    at::BFloat16* d = vt + w * 2 * Dv;
    for (int64_t c = 0; c < Dv; c += 32) {
      const __m512i a = _mm512_loadu_si512(vrow[2 * w] + c), b = _mm512_loadu_si512(vrow[2 * w + 1] + c);
      _mm512_storeu_si512(d + 2 * c, _mm512_unpacklo_epi16(a, b));
      _mm512_storeu_si512(d + 2 * c + 32, _mm512_unpackhi_epi16(a, b));
    }
  }
  if (pairs < 16) std::fill(vt + pairs * 2 * Dv, vt + 16 * 2 * Dv, at::BFloat16(0.f));
}

// pv [16, Dv] float (pair order) = P · V; P [16, 32] bf16 (row stride 64 bytes), vt from pack_v_pairs.
// Tiles 0-3: PV blocks of 16 columns, 5: P, 6, 7, 4: V blocks.
__attribute__((target("amx-tile,amx-bf16"))) inline void amx_pv32(const at::BFloat16* P, const at::BFloat16* vt,
                                                                   int64_t Dv, float* pv) {
  const int64_t ldv = Dv * 4, ldc = Dv * 4;  // bytes: a pair row of vt, a row of pv
  _tile_loadd(5, P, 64);
  for (int64_t c = 0; c < Dv; c += 64) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(6, vt + 2 * c, ldv);
    _tile_loadd(7, vt + 2 * c + 32, ldv);
    _tile_dpbf16ps(0, 5, 6);
    _tile_dpbf16ps(1, 5, 7);
    _tile_stored(0, pv + c, ldc);
    _tile_stored(1, pv + c + 16, ldc);
    if (c + 64 <= Dv) {
      _tile_zero(2);
      _tile_zero(3);
      _tile_loadd(4, vt + 2 * c + 64, ldv);
      _tile_loadd(6, vt + 2 * c + 96, ldv);
      _tile_dpbf16ps(2, 5, 4);
      _tile_dpbf16ps(3, 5, 6);
      _tile_stored(2, pv + c + 32, ldc);
      _tile_stored(3, pv + c + 48, ldc);
    }
  }
}

// acc[r, :] = α_r · acc[r, :] + pv[r, :] (pv in pair order) for the R rows; Dv % 32 == 0.
inline void add_pv_rows(const float* pv, int64_t R, int64_t Dv, const float* alpha, float* acc) {
  const __m512i inv0 = pair_inverse(0), inv1 = pair_inverse(1);
  for (int64_t r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int64_t c = 0; c < Dv; c += 32) {
      const __m512 lo = _mm512_loadu_ps(pv + r * Dv + c), hi = _mm512_loadu_ps(pv + r * Dv + c + 16);
      float* o = acc + r * Dv + c;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), a, _mm512_permutex2var_ps(lo, inv0, hi)));
      _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(_mm512_loadu_ps(o + 16), a, _mm512_permutex2var_ps(lo, inv1, hi)));
    }
  }
}
#else
inline bool amx_scores_ok(at::ScalarType, int64_t, int64_t, int64_t) { return false; }
#endif

template <int RB, typename A, typename S>
inline void dot_rows(const A* q, int64_t D, const S* k, int64_t ks, int64_t n, A* out, int64_t os) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (RB == 4 && std::is_same_v<A, float>) {
    if (D % 16 == 0)
      for (; j + 4 <= n; j += 4) dot_4x4_avx512(q, D, k + j * ks, ks, out + j, os);
  }
#endif
  for (; j + 4 <= n; j += 4) dot_block<RB, 4>(q, D, k + j * ks, ks, out + j, os);
  for (; j < n; ++j) dot_block<RB, 1>(q, D, k + j * ks, ks, out + j, os);
}

// S[r, j] = q_r · k_j for the R rows and n keys of a tile.
template <typename A, typename S>
inline void scores(const A* q, int64_t R, int64_t D, const S* k, int64_t ks, int64_t n, A* out, int64_t os) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) dot_rows<4>(q + r * D, D, k, ks, n, out + r * os, os);
  switch (R - r) {
    case 3: dot_rows<3>(q + r * D, D, k, ks, n, out + r * os, os); break;
    case 2: dot_rows<2>(q + r * D, D, k, ks, n, out + r * os, os); break;
    case 1: dot_rows<1>(q + r * D, D, k, ks, n, out + r * os, os); break;
    default: break;
  }
}

// acc[r, c0 : c0 + CB·W) = alpha[r] · acc[r, ...] + Σ_j P[r, j] v[j, ...] for RB rows.
template <int RB, int CB, typename A, typename S>
inline void pv_block(const A* P, int64_t ps, int64_t n, const S* v, int64_t vs, const A* alpha, A* acc,
                     int64_t as, int64_t c0) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  Vec o[RB][CB];
  DECODE_UNROLL for (int r = 0; r < RB; ++r) {
    const Vec a(alpha[r]);
    DECODE_UNROLL for (int c = 0; c < CB; ++c) o[r][c] = Vec::loadu(acc + r * as + c0 + c * W) * a;
  }
  for (int64_t j = 0; j < n; ++j) {
    Vec vv[CB];
    DECODE_UNROLL for (int c = 0; c < CB; ++c) vv[c] = load_row<A>(v + j * vs + c0 + c * W);
    DECODE_UNROLL for (int r = 0; r < RB; ++r) {
      const Vec pr(P[r * ps + j]);
      DECODE_UNROLL for (int c = 0; c < CB; ++c) o[r][c] = at::vec::fmadd(pr, vv[c], o[r][c]);
    }
  }
  DECODE_UNROLL for (int r = 0; r < RB; ++r)
    DECODE_UNROLL for (int c = 0; c < CB; ++c) o[r][c].store(acc + r * as + c0 + c * W);
}

template <int RB, typename A, typename S>
inline void pv_rows(const A* P, int64_t ps, int64_t n, const S* v, int64_t vs, int64_t Dv, const A* alpha, A* acc,
                    int64_t as) {
  constexpr int64_t W = at::vec::Vectorized<A>::size();
  int64_t c = 0;
  for (; c + 4 * W <= Dv; c += 4 * W) pv_block<RB, 4>(P, ps, n, v, vs, alpha, acc, as, c);
  for (; c + W <= Dv; c += W) pv_block<RB, 1>(P, ps, n, v, vs, alpha, acc, as, c);
  for (; c < Dv; ++c) {
    for (int r = 0; r < RB; ++r) {
      A o = acc[r * as + c] * alpha[r];
      for (int64_t j = 0; j < n; ++j) o += P[r * ps + j] * A(v[j * vs + c]);
      acc[r * as + c] = o;
    }
  }
}

template <typename A, typename S>
inline void accumulate_pv(const A* P, int64_t ps, int64_t R, int64_t n, const S* v, int64_t vs, int64_t Dv,
                          const A* alpha, A* acc) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) pv_rows<4>(P + r * ps, ps, n, v, vs, Dv, alpha + r, acc + r * Dv, Dv);
  switch (R - r) {
    case 3: pv_rows<3>(P + r * ps, ps, n, v, vs, Dv, alpha + r, acc + r * Dv, Dv); break;
    case 2: pv_rows<2>(P + r * ps, ps, n, v, vs, Dv, alpha + r, acc + r * Dv, Dv); break;
    case 1: pv_rows<1>(P + r * ps, ps, n, v, vs, Dv, alpha + r, acc + r * Dv, Dv); break;
    default: break;
  }
}

// out = acc / l in the output type, lse = m + log(l); a row that saw nothing (m = -inf) gets 0 / -inf.
template <typename T, typename A>
inline void finish_row(const A* acc, A m, A l, int64_t Dv, A* tmp, T* out, A* lse) {
  if (m == -std::numeric_limits<A>::infinity()) {
    std::fill(out, out + Dv, T(0));
    *lse = m;
    return;
  }
  const A inv = A(1) / l;
  if constexpr (std::is_same_v<T, A>) {
    std::copy(acc, acc + Dv, out);
    common::scale_row(out, Dv, inv);
  } else {
    std::copy(acc, acc + Dv, tmp);
    common::scale_row(tmp, Dv, inv);
    at::vec::convert(tmp, out, Dv);
  }
  *lse = m + std::log(l);
}

// ---------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------

// Merges the n_chunks partial states of the R rows of one (batch, kv head) `bh` in chunk
// order: M = max m_c, L = Σ l_c e^(m_c − M), out = Σ acc_c e^(m_c − M) / L, lse = M + log L.
template <typename T>
void merge_chunks(const Decode& p, int64_t bh, const acc_type<T>* part_ml, const acc_type<T>* part_acc, T* out,
                  acc_type<T>* lse, acc_type<T>* o, acc_type<T>* tmp) {
  using A = acc_type<T>;
  using Vec = at::vec::Vectorized<A>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t R = p.R, Dv = p.Dv, nC = p.n_chunks;
  for (int64_t r = 0; r < R; ++r) {
    const A* ml = part_ml + bh * nC * R * 2 + r * 2;
    const A* pa = part_acc + bh * nC * R * Dv + r * Dv;
    A M = kNegInf;
    for (int64_t c = 0; c < nC; ++c) M = common::max_keep_nan(M, ml[c * R * 2]);
    const int64_t row = bh * R + r;  // (b, hk, r) -> (b, hk·group + r / Nq, r % Nq)
    std::fill(o, o + Dv, A(0));
    A L = 0;
    if (M != kNegInf) {
      for (int64_t c = 0; c < nC; ++c) {
        const A mc = ml[c * R * 2];
        if (mc == kNegInf) continue;
        const A w = std::exp(mc - M);
        L += ml[c * R * 2 + 1] * w;
        const A* src = pa + c * R * Dv;
        const Vec vw(w);
        int64_t d = 0;
        for (; d + Vec::size() <= Dv; d += Vec::size())
          at::vec::fmadd(Vec::loadu(src + d), vw, Vec::loadu(o + d)).store(o + d);
        for (; d < Dv; ++d) o[d] += src[d] * w;
      }
    }
    finish_row<T, A>(o, M, L, Dv, tmp, out + row * Dv, lse + row);
  }
}

// A shared task counter for one call. Threads take tasks until none is left; with the
// inter-op helpers the caller waits only for tasks already taken (`finish` counts them),
// never for a helper that has not started: on a host whose cores are oversubscribed, an
// OpenMP team's join waits for a descheduled thread (measured interleaved, 2 threads, B=1, Nk=4096: 7.4 ms with
// at::parallel_for against 2.0 ms this way, 1.7 ms on one thread); here the caller
// simply does the work itself. Every task owns its outputs: the same bits either way.
// Re-checked in session 7 (issue 14: paged caches seemed not to scale to 2 threads), same Zen 5 host as the
// prefetch notes, 2 threads, B=1, Hk=8, D=128, Nk=4096, each call after SDPA, a copy of K and a 1024³
// matmul as the benchmark report runs them, host loaded by other processes: the task split of a paged
// cache is the contiguous one's (64 tasks of 512 keys), and a per-thread trace of 30 calls each showed the
// helper taking any task in 5 / 30 contiguous and 6 / 30 paged calls (it starts after the caller has taken
// all 64): what scales is whether the second core is free, not the cache layout. The OpenMP team
// (at::parallel_for over the same queue) instead of at::launch, interleaved in the same rounds: 0.45x /
// 0.16x fp32, 0.25x / 0.27x bf16 (contiguous / pages of 64; its join waits ~17 ms for a worker that is not
// scheduled). Not kept then; session 9 measured the team faster (run_shared).
struct TaskQueue {
  explicit TaskQueue(int64_t n) : total(n) {}
  int64_t take() {
    const int64_t t = next.fetch_add(1);
    return t < total ? t : -1;
  }
  void finish() { done.fetch_add(1, std::memory_order_release); }
  const int64_t total;
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> failed{false};
};

// Runs work_on() on `workers` threads. By default the threads of torch's OpenMP team
// (at::parallel_for, one work_on() per thread; its join waits for all of them). Session 9, on an
// AMD EPYC of family 25 model 1 (Zen 3, AVX2), 2 threads, Hq=32, Hk=8, D=128, each call followed by
// SDPA, a copy of K and a 1024³ matmul as the benchmark report runs them (A/B in the same rounds):
// the team 1.43-1.53x faster than the inter-op helpers at B=1 Nk=4096 fp32 (6.4-6.8 ms against
// 9.9; one thread 11.1 ms), 1.74x in bf16, 1.06x at B=8, 1.13x at Nk=32768. The team's threads are
// the ones every other torch op of a decode loop runs on, still spinning from the last op when the
// step starts, where an inter-op helper first waits to be scheduled (above: it often starts after
// the caller has taken every task). On a host oversubscribed by other processes the session-7
// measurement above went the other way, so ATTNKERNELS_CPU_DECODE_HELPERS=interop (read at every
// call) keeps the other way: work_on() on the calling thread and on workers - 1 helpers of ATen's
// inter-op pool (at::launch); a helper that starts after the queue is empty returns at once without
// touching anything but the queue (which it keeps alive), so the call may return before it. Both
// give the same bits: every task owns its outputs.
inline bool interop_helpers() {
  const char* env = std::getenv("ATTNKERNELS_CPU_DECODE_HELPERS");
  const std::string mode = env == nullptr ? "" : env;
  if (mode.empty() || mode == "openmp") return false;
  TORCH_CHECK(mode == "interop", "ATTNKERNELS_CPU_DECODE_HELPERS=", mode, ": expected 'openmp' (the default) or 'interop'");
  return true;
}

template <typename F>
void run_shared(const std::shared_ptr<TaskQueue>& queue, int64_t workers, const F& work_on) {
  if (workers > 1 && !interop_helpers()) {
    // A thread whose work_on() throws leaves its one task unfinished; the others drain the
    // queue, the join waits for them, and parallel_for rethrows.
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) work_on();
    });
    return;
  }
  for (int64_t w = 1; w < workers; ++w)
    at::launch([queue, work_on] {
      try {
        work_on();
      } catch (...) {  // at most the one task it held is unfinished: count it, report it
        queue->failed.store(true);
        queue->finish();
      }
    });
  try {
    work_on();
  } catch (...) {  // cancel the tasks nobody took, wait for the helpers' in-flight ones
    for (; queue->take() >= 0;) queue->finish();
    queue->finish();
    while (queue->done.load(std::memory_order_acquire) < queue->total) std::this_thread::yield();
    throw;
  }
  while (queue->done.load(std::memory_order_acquire) < queue->total) std::this_thread::yield();
  TORCH_CHECK(!queue->failed.load(), "attention_decode_fwd: a helper thread failed (out of memory?)");
}

// q: [B, Hq, Nq, D] contiguous, pre-scaled, in A; k, v strided in T; out [B, Hq, Nq, Dv] in T;
// lse [B, Hq, Nq] in A. part_ml [B, Hk, n_chunks, R, 2] and part_acc [B, Hk, n_chunks, R, Dv]
// hold the chunks' states when n_chunks > 1.
template <typename T>
void decode_kernel(const Decode& p, const acc_type<T>* q, const T* k, const T* v, T* out, acc_type<T>* lse,
                   acc_type<T>* part_ml, acc_type<T>* part_acc, const T* q_amx = nullptr, double scale = 1) {
  using A = acc_type<T>;
  constexpr bool kWiden = !std::is_same_v<T, A>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t R = p.R, D = p.D, Dv = p.Dv, Nq = p.Nq, nC = p.n_chunks;
  const int64_t tasks = p.B * p.Hk * nC;
  const double work = 2.0 * double(R) * double(p.chunk) * double(D + Dv);
  const bool direct = !kWiden || R <= kDirectRows;

  // Threads pull tasks from a shared counter (run_shared). Every task owns its outputs and
  // the chunk of a (b, kv head) that finishes last merges it (chunk order), so who runs
  // what never changes a bit.
  const int64_t workers = std::min<int64_t>(
      tasks, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                    int64_t(work * double(tasks) / kMinParallelFlops))));
  auto queue = std::make_shared<TaskQueue>(tasks);
  std::unique_ptr<std::atomic<int64_t>[]> left(nC > 1 ? new std::atomic<int64_t>[p.B * p.Hk] : nullptr);
  for (int64_t i = 0; nC > 1 && i < p.B * p.Hk; ++i) left[i].store(nC);
  auto work_on = [&, queue]() {
    // Take a task before touching the call's state: a helper that gets none may run after
    // the call returned; one that gets a task holds the call open until it finishes it.
    int64_t task = queue->take();
    if (task < 0) return;
    std::vector<A> S(R * kTile), m(R), l(R), alpha(R), acc(R * Dv), tmp(Dv);
    std::vector<A> kbuf(direct ? 0 : kTile * D), vbuf(direct ? 0 : kTile * Dv);
    std::vector<int64_t> row_lo(Nq), row_hi(Nq);
    const std::vector<A> ones(R, A(1));
    const A* slopes = static_cast<const A*>(p.slopes);
    const A cap = A(p.cap), inv_cap = p.cap > 0 ? A(1.0 / p.cap) : A(0);
    const int64_t page_mask = (int64_t(1) << p.page_shift) - 1;
    const bool amx = DECODE_AMX && q_amx != nullptr;
    // q_amx: the raw bf16 query rows [B, Hq, Nq, D]; scores on the tile units (amx_scores32), scaled here
    // in float (the same rounding as a float q·k of the bf16 q: none before the scale).
    std::vector<T> stage(amx ? kTile * D : 0);     // [kTile, D]: K rows that are not one tile in the cache
    std::vector<at::BFloat16> qt(amx ? D * 16 : 0);  // Qᵀ, VNNI pairs (pack_qt)
    std::vector<float> cbuf(amx ? kTile * 16 : 0);  // Sᵀ [kTile, 16]
    // P [16, kTile] in bf16 (rows past R zero), a zero V row, V's VNNI pairs [kTile / 2, Dv, 2], PV [16, Dv]
    std::vector<at::BFloat16> pbuf(amx ? 16 * kTile : 0, at::BFloat16(0.f)), zrow(amx ? Dv : 0, at::BFloat16(0.f));
    std::vector<at::BFloat16> vt(amx ? kTile * Dv : 0);
    std::vector<float> pvbuf(amx ? 16 * Dv : 0);
    std::vector<const T*> vrows(amx ? kTile : 0);
#if DECODE_AMX
    const float fscale = float(scale);
    if (amx) amx_configure();
    struct Release {  // the tile state is per thread: give it back on every way out
      bool on;
      ~Release() {
        if (on) amx_release();
      }
    } release{amx};
#endif
    for (; task >= 0; task = queue->take()) {
      const int64_t c = task % nC, bh = task / nC, hk = bh % p.Hk, b = bh / p.Hk;
      const A* qg = q ? q + (b * p.Hq + hk * p.group) * Nq * D : nullptr;  // the group's R rows (not on the tile units)
      const int32_t* bt = p.pages ? p.pages + b * p.bt_stride : nullptr;
      // The K / V row of key j of this (b, kv head): page bt[j / page_size] (or row b), slot j % page_size.
      auto k_row = [&](int64_t j) {
        return k + (bt ? int64_t(bt[j >> p.page_shift]) : b) * p.sk_b + hk * p.sk_h + (j & page_mask) * p.sk_n;
      };
      auto v_row = [&](int64_t j) {
        return v + (bt ? int64_t(bt[j >> p.page_shift]) : b) * p.sv_b + hk * p.sv_h + (j & page_mask) * p.sv_n;
      };
      // Keys [t, min(end, the end of t's page)): consecutive rows of one page.
      auto segment = [&](int64_t t, int64_t end) {
        return std::min(end, ((t >> p.page_shift) + 1) << p.page_shift) - t;
      };
      // S[r, j] for the tile's n keys from t0 on the tile units (see amx_scores32).
      auto amx_tile = [&](int64_t t0, int64_t n) {
#if DECODE_AMX
        if constexpr (std::is_same_v<T, at::BFloat16>) {
          // V's pairs first: they do not depend on the scores, and their loads then overlap the
          // tile loads of K (measured: V's loads were where the kernel waited).
          for (int64_t j = 0; j < n; ++j) vrows[j] = v_row(t0 + j);
          if (n % 2) vrows[n] = zrow.data();
          pack_v_pairs(vrows.data(), (n + 1) / 2, Dv, vt.data());
          // Each half (16 keys) straight from the cache when its rows are consecutive ones of
          // one page, else copied into `stage` (zero rows past n, whose scores are not used).
          const T* half[2];
          int64_t stride[2];  // bytes
          for (int h = 0; h < 2; ++h) {
            const int64_t t = t0 + 16 * h, rows = std::max<int64_t>(0, std::min<int64_t>(16, n - 16 * h));
            if (rows == 16 && segment(t, t + 16) == 16) {
              half[h] = k_row(t);
              stride[h] = int64_t(sizeof(T)) * p.sk_n;
            } else {
              T* st = stage.data() + 16 * h * D;
              for (int64_t j = 0; j < rows; ++j) std::copy(k_row(t + j), k_row(t + j) + D, st + j * D);
              std::fill(st + rows * D, st + 16 * D, T(0.f));
              half[h] = st;
              stride[h] = int64_t(sizeof(T)) * D;
            }
          }
          amx_scores32(half[0], stride[0], half[1], stride[1], qt.data(), D, cbuf.data());
          // cbuf [32 keys, 16 rows] -> S [R, kTile], scaled
          for (int64_t r = 0; r < R; ++r)
            for (int64_t j = 0; j < n; ++j) S[r * kTile + j] = cbuf[j * 16 + r] * fscale;
        }
#endif
      };
      // acc = α · acc + P V for the tile's n keys on the tile units, P rounded to bf16, V from amx_tile's vt.
      auto amx_pv = [&](int64_t t0, int64_t n) {
#if DECODE_AMX
        if constexpr (std::is_same_v<T, at::BFloat16>) {
          round_p(S.data(), R, n, pbuf.data());
          amx_pv32(pbuf.data(), vt.data(), Dv, pvbuf.data());
          add_pv_rows(pvbuf.data(), R, Dv, alpha.data(), acc.data());
        }
#endif
      };
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (amx) pack_qt(q_amx + (b * p.Hq + hk * p.group) * Nq * D, R, D, qt.data());
      }
      const bool* pad = p.kpm ? p.kpm + b * p.Nk : nullptr;
      const int64_t off = row_length(p, b) + p.off_shift;  // row i's diagonal: key i + off
      const auto [blo, bhi] = batch_band(p, b, row_lo.data(), row_hi.data());
      const int64_t j0 = blo + c * p.chunk, j1 = std::min(bhi, j0 + p.chunk);  // j0 >= j1: an empty task
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), A(0));
      std::fill(acc.begin(), acc.end(), A(0));

      for (int64_t t0 = j0, n = 0; t0 < j1; t0 += n) {
        // kTile keys; a tile over a page boundary is read as runs of consecutive rows, one per page
        // (`segment`), so small pages (16 rows) keep full-size tiles for the online softmax.
        n = std::min(kTile, j1 - t0);
        if (p.prefetch) {  // the next tile's K and V rows (see the measurements above struct Decode)
          const int64_t e = std::min(j1, t0 + n + kTile);
          for (int64_t j = t0 + n; j < e; ++j) {
            const char* kr = reinterpret_cast<const char*>(k_row(j));
            const char* vr = reinterpret_cast<const char*>(v_row(j));
            for (int64_t x = 0; x < int64_t(D * sizeof(T)); x += 64) __builtin_prefetch(kr + x, 0, 3);
            for (int64_t x = 0; x < int64_t(Dv * sizeof(T)); x += 64) __builtin_prefetch(vr + x, 0, 3);
          }
        }
        if (amx) {
          amx_tile(t0, n);
        } else if (direct) {
          for (int64_t s0 = 0, len = 0; s0 < n; s0 += len) {
            len = segment(t0 + s0, t0 + n);
            scores(qg, R, D, k_row(t0 + s0), p.sk_n, len, S.data() + s0, kTile);
          }
        } else {
          for (int64_t j = 0; j < n; ++j) widen_row(k_row(t0 + j), kbuf.data() + j * D, D);
          scores(qg, R, D, kbuf.data(), D, n, S.data(), kTile);
        }

        bool padded = false;
        if (pad)
          for (int64_t j = 0; j < n; ++j) padded |= pad[t0 + j];
        for (int64_t r = 0; r < R; ++r) {
          A* s = S.data() + r * kTile;
          const int64_t i = r % Nq;
          if (cap > A(0)) {  // s = cap · tanh(s / cap), on the scaled logits
            using Vec = at::vec::Vectorized<A>;
            int64_t j = 0;
            for (; j + Vec::size() <= n; j += Vec::size())
              ((Vec::loadu(s + j) * Vec(inv_cap)).tanh() * Vec(cap)).store(s + j);
            for (; j < n; ++j) s[j] = cap * std::tanh(s[j] * inv_cap);
          }
          if (slopes) {  // s -= slope[b, h] · |i + off − j|, h = the row's query head
            const A slope = slopes[b * p.Hq + hk * p.group + r / Nq];
            const int64_t diag = i + off - t0;
            for (int64_t j = 0; j < n; ++j) s[j] -= slope * A(std::abs(diag - j));
          }
          const int64_t vlo = row_lo[i], vhi = row_hi[i];
          if (vlo > t0 || vhi < t0 + n || padded) {
            for (int64_t j = 0; j < n; ++j) {
              const int64_t key = t0 + j;
              if (key < vlo || key >= vhi || (pad && pad[key])) s[j] = kNegInf;
            }
          }
          const A m_new = common::max_keep_nan(m[r], common::row_max(s, n));
          if (m_new == kNegInf) {  // nothing visible yet: P = 0, the state stays empty
            std::fill(s, s + n, A(0));
            alpha[r] = A(1);
            continue;
          }
          alpha[r] = std::exp(m[r] - m_new);  // exp(-inf) = 0 on the first visible tile
          l[r] = l[r] * alpha[r] + common::exp_fma_sum(s, n, A(1), m_new);
          m[r] = m_new;
        }

        if (amx) {
          amx_pv(t0, n);
        } else if (direct) {
          for (int64_t s0 = 0, len = 0; s0 < n; s0 += len) {  // the rescale by alpha once, with the first run
            len = segment(t0 + s0, t0 + n);
            accumulate_pv(S.data() + s0, kTile, R, len, v_row(t0 + s0), p.sv_n, Dv,
                          s0 == 0 ? alpha.data() : ones.data(), acc.data());
          }
        } else {
          for (int64_t j = 0; j < n; ++j) widen_row(v_row(t0 + j), vbuf.data() + j * Dv, Dv);
          accumulate_pv(S.data(), kTile, R, n, vbuf.data(), Dv, Dv, alpha.data(), acc.data());
        }
      }

      if (nC == 1) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t row = (b * p.Hq + hk * p.group) * Nq + r;  // rows of a group are consecutive
          finish_row<T, A>(acc.data() + r * Dv, m[r], l[r], Dv, tmp.data(), out + row * Dv, lse + row);
        }
      } else {
        A* ml = part_ml + task * R * 2;
        for (int64_t r = 0; r < R; ++r) {
          ml[2 * r] = m[r];
          ml[2 * r + 1] = l[r];
        }
        std::copy(acc.begin(), acc.end(), part_acc + task * R * Dv);
        if (left[bh].fetch_sub(1) == 1)
          merge_chunks<T>(p, bh, part_ml, part_acc, out, lse, acc.data(), tmp.data());
      }
      queue->finish();
    }
  };
  run_shared(queue, workers, work_on);
}

// ---------------------------------------------------------------------------
// The op
// ---------------------------------------------------------------------------

// A view with a contiguous last dim as it is, anything else copied.
at::Tensor rows_contiguous(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// Query rows per pass over the cache: a longer query block runs as consecutive blocks of
// at most this many rows (the partial buffers hold B·Hk·chunks·group·rows·Dv values).
constexpr int64_t kMaxBlockRows = 16;

// The checked modifier arguments, kept alive for the call.
struct DecodeModifiers {
  double cap = 0;
  at::Tensor slopes;  // [B, Hq] contiguous in the accumulation type, or undefined
};

DecodeModifiers check_modifiers(const char* op, const common::QKVShape& s, at::ScalarType acc, double softcap,
                                const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be a finite float >= 0 (0 = off), got ",
              softcap);
  DecodeModifiers md;
  md.cap = softcap;
  if (alibi_slopes.has_value()) {
    const at::Tensor& sl = *alibi_slopes;
    TORCH_CHECK(sl.device().is_cpu() && sl.is_floating_point(), op,
                ": alibi_slopes must be a floating CPU tensor, got ", sl.scalar_type(), " on ", sl.device());
    TORCH_CHECK(sl.dim() == 2 && sl.size(0) == s.B && sl.size(1) == s.Hq, op, ": alibi_slopes must be (B, Hq) = (",
                s.B, ", ", s.Hq, "), got ", sl.sizes());
    md.slopes = sl.to(acc).contiguous();
  }
  return md;
}

// Runs the kernel for the query rows [q0, q0 + Nq_block) of q [B, Hq, Nq_total, D]: `p` holds the call's
// shapes, strides and masks with Nq = Nq_total; out_rows / lse_rows are [B, Hq, Nq_block, Dv] / [B, Hq,
// Nq_block], contiguous.
void run_block(Decode p, const at::Tensor& q, double scale, const at::Tensor& k, const at::Tensor& v, int64_t q0,
               int64_t rows, at::Tensor& out_rows, at::Tensor& lse_rows) {
  const int64_t total = p.Nq;
  p.Nq = rows;
  p.R = p.group * rows;
  p.off_shift = q0 - total;
  plan_chunks(p);
  if (p.n_chunks == 0) {
    out_rows.zero_();
    lse_rows.fill_(-std::numeric_limits<double>::infinity());
    return;
  }
  const auto acc = lse_rows.scalar_type();
  // bf16 scores on the tile units take the raw query rows; the vector path a pre-scaled copy in A.
  const bool amx = amx_scores_ok(q.scalar_type(), p.R, p.D, p.Dv);
  p.prefetch = !amx;  // see the measurements above struct Decode
  at::Tensor qs = amx ? q.narrow(2, q0, rows).contiguous() : (q.narrow(2, q0, rows).to(acc) * scale).contiguous();
  at::Tensor part_ml, part_acc;
  if (p.n_chunks > 1) {
    part_ml = at::empty({p.B, p.Hk, p.n_chunks, p.R, 2}, lse_rows.options());
    part_acc = at::empty({p.B, p.Hk, p.n_chunks, p.R, p.Dv}, lse_rows.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_decode_fwd", [&] {
    using A = acc_type<scalar_t>;
    decode_kernel<scalar_t>(p, amx ? nullptr : qs.data_ptr<A>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                            out_rows.data_ptr<scalar_t>(), lse_rows.data_ptr<A>(),
                            p.n_chunks > 1 ? part_ml.data_ptr<A>() : nullptr,
                            p.n_chunks > 1 ? part_acc.data_ptr<A>() : nullptr,
                            amx ? qs.data_ptr<scalar_t>() : nullptr, scale);
  });
}

// All query rows of `p` (Nq = the call's rows), in blocks of at most max_rows: (out, lse).
std::tuple<at::Tensor, at::Tensor> run_decode(const Decode& p, const at::Tensor& q, double scale, const at::Tensor& k,
                                              const at::Tensor& v, int64_t max_rows) {
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({p.B, p.Hq, p.Nq, p.Dv}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Nq}, q.options().dtype(acc));
  if (p.B == 0 || p.Hq == 0 || p.Nq == 0) return {out, lse};
  if (p.Nq <= max_rows) {
    run_block(p, q, scale, k, v, 0, p.Nq, out, lse);
    return {out, lse};
  }
  for (int64_t q0 = 0; q0 < p.Nq; q0 += max_rows) {
    const int64_t rows = std::min(max_rows, p.Nq - q0);
    at::Tensor o = at::empty({p.B, p.Hq, rows, p.Dv}, q.options());
    at::Tensor l = at::empty({p.B, p.Hq, rows}, lse.options());
    run_block(p, q, scale, k, v, q0, rows, o, l);
    out.narrow(2, q0, rows).copy_(o);
    lse.narrow(2, q0, rows).copy_(l);
  }
  return {out, lse};
}

void set_strides(Decode& p, const at::Tensor& k, const at::Tensor& v) {
  p.sk_b = k.stride(0);
  p.sk_h = k.stride(1);
  p.sk_n = k.stride(2);
  p.sv_b = v.stride(0);
  p.sv_h = v.stride(1);
  p.sv_n = v.stride(2);
}

std::tuple<at::Tensor, at::Tensor> attention_decode_fwd(const at::Tensor& q, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, double scale, int64_t window_left,
                                                        int64_t window_right,
                                                        const std::optional<at::Tensor>& key_padding_mask,
                                                        double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "attention_decode_fwd";
  const common::QKVShape s = common::check_qkv(op, q, k_in, v_in);
  common::check_window(op, window_left, window_right);
  const at::Tensor k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  Decode p;
  static_cast<common::QKVShape&>(p) = s;
  p.left = window_left;
  p.right = window_right;
  set_strides(p, k, v);
  at::Tensor kpm;
  if (key_padding_mask.has_value()) {
    kpm = common::check_key_padding_mask(op, *key_padding_mask, s.B, s.Nk);
    p.kpm = kpm.data_ptr<bool>();
  }
  const DecodeModifiers md =
      check_modifiers(op, s, q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat, softcap, alibi_slopes);
  p.cap = md.cap;
  p.slopes = md.slopes.defined() ? md.slopes.data_ptr() : nullptr;
  // One block of all rows: this op's callers send few rows (cpu_launch.DECODE_MAX_Q_LEN).
  return run_decode(p, q, scale, k, v, std::max<int64_t>(1, s.Nq));
}

// (min, max) of a non-empty contiguous int32 tensor: a loop over its few entries (tensor reductions
// and .item() cost microseconds each, a decode step's call makes four).
std::pair<int64_t, int64_t> int_range(const at::Tensor& t) {
  const int32_t* x = t.data_ptr<int32_t>();
  int32_t lo = x[0], hi = x[0];
  for (int64_t i = 1; i < t.numel(); ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  return {lo, hi};
}

// A KV-cache step: q [B, Hq, Nq, D] against row b's first cache_seqlens[b] keys of k_cache / v_cache, either
// contiguous [B, Hk, Nc, D] / [B, Hk, Nc, Dv] or, with block_table [B, max_pages] int32, paged
// [num_pages, Hk, page_size, D] (page_size a power of two; key j of row b in page block_table[b, j / page_size],
// slot j % page_size). Nothing is appended here: the caller wrote the new keys, cache_seqlens counts them.
std::tuple<at::Tensor, at::Tensor> attention_kvcache_fwd(const at::Tensor& q, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const at::Tensor& cache_seqlens,
                                                         const std::optional<at::Tensor>& block_table, double scale,
                                                         int64_t window_left, int64_t window_right, double softcap,
                                                         const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "attention_kvcache_fwd";
  common::check_float_tensor(op, "q", q, 4);
  common::check_float_tensor(op, "k_cache", k_in, 4);
  common::check_float_tensor(op, "v_cache", v_in, 4);
  TORCH_CHECK(k_in.scalar_type() == q.scalar_type() && v_in.scalar_type() == q.scalar_type(), op,
              ": q, k_cache, v_cache must share one dtype, got ", q.scalar_type(), ", ", k_in.scalar_type(), ", ",
              v_in.scalar_type());
  common::check_window(op, window_left, window_right);
  common::QKVShape s;
  s.B = q.size(0);
  s.Hq = q.size(1);
  s.Nq = q.size(2);
  s.D = q.size(3);
  s.Hk = k_in.size(1);
  s.Dv = v_in.size(3);
  TORCH_CHECK(k_in.size(3) == s.D, op, ": k_cache's head dim ", k_in.size(3), " must equal q's ", s.D);
  TORCH_CHECK(v_in.size(0) == k_in.size(0) && v_in.size(1) == s.Hk && v_in.size(2) == k_in.size(2), op,
              ": v_cache must match k_cache in all but the last dim, got ", v_in.sizes(), " and ", k_in.sizes());
  common::set_group(op, s);
  Decode p;
  at::Tensor pages;
  int64_t capacity = 0;
  if (block_table.has_value()) {
    pages = *block_table;
    TORCH_CHECK(pages.device().is_cpu() && pages.scalar_type() == at::kInt && pages.dim() == 2 &&
                    pages.size(0) == s.B,
                op, ": block_table must be an int32 CPU tensor (B=", s.B, ", max_pages), got ", pages.scalar_type(),
                " ", pages.sizes());
    pages = pages.contiguous();
    const int64_t page_size = k_in.size(2);
    TORCH_CHECK(page_size > 0 && (page_size & (page_size - 1)) == 0, op,
                ": the page size (k_cache.size(2)) must be a power of two, got ", page_size);
    if (pages.numel() > 0) {
      const auto [lo, hi] = int_range(pages);
      TORCH_CHECK(lo >= 0 && hi < k_in.size(0), op, ": block_table entries must lie in [0, ", k_in.size(0),
                  "), got [", lo, ", ", hi, "]");
    }
    p.pages = pages.data_ptr<int32_t>();
    p.bt_stride = pages.size(1);
    p.page_shift = 0;
    while ((int64_t(1) << p.page_shift) < page_size) ++p.page_shift;
    capacity = pages.size(1) * page_size;
  } else {
    TORCH_CHECK(k_in.size(0) == s.B, op, ": a contiguous k_cache must have q's batch size ", s.B, ", got ",
                k_in.size(0));
    capacity = k_in.size(2);
  }
  TORCH_CHECK(cache_seqlens.device().is_cpu() && cache_seqlens.scalar_type() == at::kInt &&
                  cache_seqlens.dim() == 1 && cache_seqlens.size(0) == s.B,
              op, ": cache_seqlens must be an int32 CPU tensor (B=", s.B, ",), got ", cache_seqlens.scalar_type(), " ",
              cache_seqlens.sizes());
  const at::Tensor lens = cache_seqlens.contiguous();
  if (s.B > 0) {
    const auto [lo, hi] = int_range(lens);
    TORCH_CHECK(lo >= 0 && hi <= capacity, op, ": cache_seqlens must lie in [0, ", capacity, "] (the cache's slots), got [",
                lo, ", ", hi, "]");
  }
  s.Nk = capacity;
  const at::Tensor k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  static_cast<common::QKVShape&>(p) = s;
  p.left = window_left;
  p.right = window_right;
  p.seqlens = lens.data_ptr<int32_t>();
  set_strides(p, k, v);
  const DecodeModifiers md =
      check_modifiers(op, s, q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat, softcap, alibi_slopes);
  p.cap = md.cap;
  p.slopes = md.slopes.defined() ? md.slopes.data_ptr() : nullptr;
  return run_decode(p, q, scale, k, v, kMaxBlockRows);
}

// How the key range of a decode call is split: (first key, chunk length, number of chunks).
// For tests and benchmarks: the split depends on the shapes only.
std::vector<int64_t> attention_decode_plan(int64_t batch, int64_t kv_heads, int64_t q_len, int64_t kv_len,
                                           int64_t window_left, int64_t window_right) {
  TORCH_CHECK(batch >= 0 && kv_heads >= 0 && q_len >= 0 && kv_len >= 0, "attention_decode_plan: sizes must be >= 0");
  Decode p;
  p.B = batch;
  p.Hk = kv_heads;
  p.Nq = q_len;
  p.Nk = kv_len;
  p.left = window_left;
  p.right = window_right;
  p.off_shift = -q_len;
  plan_chunks(p);
  return {p.lo, p.chunk, p.n_chunks};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ATTNKERNELS_NS, m) {
  m.def(
      "attention_decode_fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, "
      "Tensor? key_padding_mask, float softcap=0., Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_kvcache_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
      "float scale, int window_left, int window_right, float softcap=0., Tensor? alibi_slopes=None) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "attention_decode_plan(int batch, int kv_heads, int q_len, int kv_len, int window_left, int window_right) "
      "-> int[]",
      &attention_decode_plan);
}

TORCH_LIBRARY_IMPL(ATTNKERNELS_NS, CPU, m) {
  m.impl("attention_decode_fwd", &attention_decode_fwd);
  m.impl("attention_kvcache_fwd", &attention_kvcache_fwd);
}

// Host attention over a ragged, head-major KV cache: decode (one query per row) and verification
// (T new queries per row, causal among themselves), GQA-aware, fp32 accumulation, online softmax.
//
// Inputs (see runtime/host_attention.py for the Python side):
//   q      [B, T, H, Dh]  fp32, contiguous
//   k, v   [N, Hkv, L, Dh] fp32 / bf16 / fp16, last dim contiguous, any other strides (a whole
//          cache or a view of it); row b reads k[rows[b]]
//   rows   [B] int64, q_pos [B, T] int64, kv_len [B] int64; window <= 0 means none
// Output  [B, T, H, Dh] fp32.
//
// Query t of row b sees key j iff j < kv_len[b], j <= q_pos[b, t] and (with a window W)
// j > q_pos[b, t] - W. A query that sees no key gets 0.
//
// Work: one item per (row, kv head, chunk of CHUNK keys at absolute positions). The G query heads
// that share a kv head and all T queries of the row are handled together (R = T*G query rows), so each
// K/V vector is read from memory once per (row, kv head). Chunks and the 32-key tiles inside them sit at
// fixed absolute positions, so a query's result does not depend on the batch it is in, on T, or on the
// number of threads (the same sums in the same order). Per tile (AVX-512 path):
//   - the tile's keys are transposed once into scratch (keys into lanes; bf16 caches as bf16 pairs);
//   - scores: the R rows in groups of up to 12, each group a 12 x 2-vector block of accumulators in
//     registers, so every key vector loaded serves the whole group and every broadcast query element two
//     key vectors; sums over the head dim in order (bf16 caches: vdpbf16ps on bf16 pairs);
//   - one online-softmax step per row per tile (max over 32 keys, vectorised exp);
//   - P.V: rows x 64 head-dim columns (6 x 4 vectors) of accumulators in registers over the whole tile,
//     the rescale of the previous tile's accumulator fused into their load; V read once per group. bf16
//     caches with AVX-512 BF16 (head dim a multiple of 32): vdpbf16ps on pairs of keys, P rounded to bf16
//     and V of keys 2j, 2j+1 interleaved per column in registers (see pv_tile_dp); without BF16 a bf16 V
//     is read as even / odd halves of each 32 columns, P in fp32 (see Bf16EO);
//   - the next tile's K and V lines are prefetched a few at a time across the tile's work.
// A row's sums never depend on the group it lands in. Rows with several chunks write one partial
// (max, sum, accumulator) per chunk, merged in chunk order afterwards. Items are taken from a
// shared counter, longest rows first, by as many threads as the torch intra-op pool has (at::parallel_for is
// inline OpenMP: the module must be built with -fopenmp, or it runs everything on the calling thread).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Register-blocked loops must be unrolled completely for their accumulators to stay in registers.
#define UNROLL _Pragma("GCC unroll 32")

constexpr int64_t BLK = 16;      // keys per vector of scores (and per block of the portable loops)
constexpr int64_t TILE = 32;     // keys per tile: two vectors of scores, one online-softmax step
constexpr int64_t CHUNK = 512;   // keys per work item (a multiple of TILE)

inline float to_f32(float x) { return x; }
inline float to_f32(at::BFloat16 x) { return static_cast<float>(x); }
inline float to_f32(at::Half x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// e^x for finite x <= 0 (lanes below -87 flush towards 0); relative error ~1e-7.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2 in two steps (ln2 split into a short high part and the rest), |r| <= ln2 / 2
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  // e^r by its Taylor series to degree 7 (truncation < 1e-8 on |r| <= 0.35), Horner form
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// In-place transpose of a 16 x 16 matrix of 32-bit elements held as 16 vectors (row i -> vector i).
__attribute__((always_inline)) inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  UNROLL
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + k], 128-bit lane L: element 4L + k of rows 4i .. 4i + 3
  UNROLL
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  UNROLL
  for (int k = 0; k < 4; ++k) {
    const __m512 a0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88), a1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD);
    const __m512 b0 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88), b1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);
    r[k] = _mm512_shuffle_f32x4(a0, b0, 0x88);
    r[4 + k] = _mm512_shuffle_f32x4(a1, b1, 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(a0, b0, 0xDD);
    r[12 + k] = _mm512_shuffle_f32x4(a1, b1, 0xDD);
  }
}

// Scores of NR query rows against one tile of 32 keys whose K is stored transposed: kt[d * TILE + jj] is
// element d of key jj. s[i] lane jj = sum over d (in order) of q[i, d] * k[jj, d]: each query element is
// broadcast once for two vectors of keys and each key vector serves all NR rows, with the scores coming
// out keys-in-lanes (no horizontal sums). q: scaled queries transposed over all R rows of the item,
// q[d * qs + i] (qs = R), starting at the group's first row. Out: [NR, TILE].
template <int NR>
inline void scores_f32(const float* kt, const float* q, int64_t qs, int64_t Dh, float* out) {
  __m512 s0[NR], s1[NR];
  UNROLL
  for (int i = 0; i < NR; ++i) { s0[i] = _mm512_setzero_ps(); s1[i] = _mm512_setzero_ps(); }
  for (int64_t d = 0; d < Dh; ++d) {
    const __m512 k0 = _mm512_loadu_ps(kt + d * TILE), k1 = _mm512_loadu_ps(kt + d * TILE + 16);
    const float* qd = q + d * qs;
    UNROLL
    for (int i = 0; i < NR; ++i) {
      const __m512 b = _mm512_set1_ps(qd[i]);
      s0[i] = _mm512_fmadd_ps(b, k0, s0[i]);
      s1[i] = _mm512_fmadd_ps(b, k1, s1[i]);
    }
  }
  UNROLL
  for (int i = 0; i < NR; ++i) { _mm512_storeu_ps(out + i * TILE, s0[i]); _mm512_storeu_ps(out + i * TILE + 16, s1[i]); }
}

#if defined(__AVX512BF16__)
// The same with bf16 pairs: kt2[p * TILE + jj] (a dword) holds (k[jj, 2p], k[jj, 2p + 1]); q: the queries in
// bf16, unscaled, pairs transposed, q[(p * qs + i) * 2 + e] = q[i, 2p + e].
template <int NR>
inline void scores_bf16(const float* kt2, const uint16_t* q, int64_t qs, int64_t Dh, float scale, float* out) {
  __m512 s0[NR], s1[NR];
  UNROLL
  for (int i = 0; i < NR; ++i) { s0[i] = _mm512_setzero_ps(); s1[i] = _mm512_setzero_ps(); }
  for (int64_t p = 0; p < Dh / 2; ++p) {
    const __m512bh k0 = (__m512bh)_mm512_castps_si512(_mm512_loadu_ps(kt2 + p * TILE));
    const __m512bh k1 = (__m512bh)_mm512_castps_si512(_mm512_loadu_ps(kt2 + p * TILE + 16));
    const uint16_t* qp = q + p * qs * 2;
    UNROLL
    for (int i = 0; i < NR; ++i) {
      int32_t pair;
      std::memcpy(&pair, qp + 2 * i, sizeof(pair));
      const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
      s0[i] = _mm512_dpbf16_ps(s0[i], k0, b);
      s1[i] = _mm512_dpbf16_ps(s1[i], k1, b);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  UNROLL
  for (int i = 0; i < NR; ++i) {
    _mm512_storeu_ps(out + i * TILE, _mm512_mul_ps(s0[i], sc));
    _mm512_storeu_ps(out + i * TILE + 16, _mm512_mul_ps(s1[i], sc));
  }
}
#endif

// A bf16 cache's V read in the even / odd layout: 32 bf16 (one 64-byte load) give two fp32 vectors, the
// even elements (a shift) and the odd ones (a mask), with no shuffle; accumulators then hold each block of
// 32 head-dim columns as [16 even, 16 odd] and are put back in order once per item (unshuffle_eo).
struct Bf16EO { uint16_t x; };

template <int NC, typename V>
inline void load_v(const V* row, int64_t c0, __m512* vv) {
  UNROLL
  for (int n = 0; n < NC; ++n) vv[n] = load16(row + c0 + 16 * n);
}
template <int NC>
inline void load_v(const Bf16EO* row, int64_t c0, __m512* vv) {
  static_assert(NC % 2 == 0, "the even / odd layout works on blocks of 32 columns");
  UNROLL
  for (int n = 0; n < NC; n += 2) {
    const __m512i x = _mm512_loadu_si512(row + c0 + 16 * n);
    vv[n] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    vv[n + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
}

// Rows [0, R) of acc, each block of 32 columns [a: 16 | b: 16] rewritten as
// [permutex2var(a, i0, b) | permutex2var(a, i1, b)]: puts a register layout back in column order.
inline void permute_blocks(float* acc, int64_t R, int64_t Dh, __m512i i0, __m512i i1) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < Dh; c += 32) {
      const __m512 a = _mm512_loadu_ps(acc + r * Dh + c), b = _mm512_loadu_ps(acc + r * Dh + c + 16);
      _mm512_storeu_ps(acc + r * Dh + c, _mm512_permutex2var_ps(a, i0, b));
      _mm512_storeu_ps(acc + r * Dh + c + 16, _mm512_permutex2var_ps(a, i1, b));
    }
}

// Rows [0, R) of acc from the even / odd layout back to column order.
inline void unshuffle_eo(float* acc, int64_t R, int64_t Dh) {
  permute_blocks(acc, R, Dh, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
                 _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
}

// acc[i, c0 : c0 + 16 NC] = corr[i] * acc[i, ...] + sum over jj < nb (in order) of p[i, jj] * v[jj, ...]:
// NR rows x NC vectors of accumulators stay in registers for the whole tile, each V vector loaded serves
// the NR rows and each broadcast probability the NC vectors. v: fp32 rows at stride vs; p: [NR, TILE].
template <int NR, int NC, typename V>
inline void pv_tile(const V* v, int64_t vs, int64_t nb, const float* p, const float* corr, float* acc,
                    int64_t Dh, int64_t c0) {
  __m512 a[NR][NC];
  UNROLL
  for (int i = 0; i < NR; ++i) {
    const __m512 cv = _mm512_set1_ps(corr[i]);
    UNROLL
    for (int n = 0; n < NC; ++n) a[i][n] = _mm512_mul_ps(cv, _mm512_loadu_ps(acc + i * Dh + c0 + 16 * n));
  }
  for (int64_t jj = 0; jj < nb; ++jj) {
    __m512 vv[NC];
    load_v<NC>(v + jj * vs, c0, vv);
    UNROLL
    for (int i = 0; i < NR; ++i) {
      const __m512 pb = _mm512_set1_ps(p[i * TILE + jj]);
      UNROLL
      for (int n = 0; n < NC; ++n) a[i][n] = _mm512_fmadd_ps(pb, vv[n], a[i][n]);
    }
  }
  UNROLL
  for (int i = 0; i < NR; ++i)
    UNROLL
    for (int n = 0; n < NC; ++n) _mm512_storeu_ps(acc + i * Dh + c0 + 16 * n, a[i][n]);
}

// Rows [0, R) in ceil(R / max_nr) groups of nearly equal size (a row's sums never depend on its group).
template <typename F>
inline void row_groups(int64_t R, int64_t max_nr, F&& f) {
  const int64_t ng = (R + max_nr - 1) / max_nr;
  if (ng == 0) return;
  const int64_t base = R / ng, extra = R % ng;
  for (int64_t g = 0, r0 = 0; g < ng; ++g) {
    const int nr = static_cast<int>(base + (g < extra ? 1 : 0));
    f(r0, nr);
    r0 += nr;
  }
}

// Calls F::template call<N>() for a runtime N in 1..12.
#define DISPATCH12(n, EXPR)                                   \
  switch (n) {                                                \
    case 1: { constexpr int N_ = 1; EXPR; } break;            \
    case 2: { constexpr int N_ = 2; EXPR; } break;            \
    case 3: { constexpr int N_ = 3; EXPR; } break;            \
    case 4: { constexpr int N_ = 4; EXPR; } break;            \
    case 5: { constexpr int N_ = 5; EXPR; } break;            \
    case 6: { constexpr int N_ = 6; EXPR; } break;            \
    case 7: { constexpr int N_ = 7; EXPR; } break;            \
    case 8: { constexpr int N_ = 8; EXPR; } break;            \
    case 9: { constexpr int N_ = 9; EXPR; } break;            \
    case 10: { constexpr int N_ = 10; EXPR; } break;          \
    case 11: { constexpr int N_ = 11; EXPR; } break;          \
    default: { constexpr int N_ = 12; EXPR; } break;          \
  }
#define DISPATCH6(n, EXPR)                                    \
  switch (n) {                                                \
    case 1: { constexpr int N_ = 1; EXPR; } break;            \
    case 2: { constexpr int N_ = 2; EXPR; } break;            \
    case 3: { constexpr int N_ = 3; EXPR; } break;            \
    case 4: { constexpr int N_ = 4; EXPR; } break;            \
    case 5: { constexpr int N_ = 5; EXPR; } break;            \
    default: { constexpr int N_ = 6; EXPR; } break;           \
  }

constexpr int64_t QK_ROWS = 12;  // rows per scores group: 2 x 12 accumulators
constexpr int64_t PV_ROWS4 = 6;  // rows per P.V group with 4 vectors of the head dim: 24 accumulators
constexpr int64_t PV_ROWS1 = 12; // with 1 or 2 vectors

// Software prefetch of the next tile's K and V lines, spread over the work on this tile (a burst of
// hundreds of prefetches stalls on the miss buffers; the hardware streams stop at every 4 KiB page).
struct Prefetcher {
  const char* p = nullptr;     // the key row being fetched (K rows first, then V rows)
  const char* v = nullptr;
  int64_t ks = 0, vs = 0;      // bytes between keys
  int64_t lines = 0, line = 0; // 64-byte lines per key row, next line of the current row
  int64_t left = 0, v_keys = 0;// rows left in the current tensor, V rows still to come
  int64_t per_step = 0;
  void start(const char* k_, const char* v_, int64_t ks_, int64_t vs_, int64_t row_bytes, int64_t n_keys,
             int64_t steps) {
    p = k_; v = v_; ks = ks_; vs = vs_; lines = (row_bytes + 63) / 64; line = 0;
    left = n_keys; v_keys = n_keys;
    const int64_t total = 2 * n_keys * lines;
    per_step = steps > 0 ? (total + steps - 1) / steps : total;
  }
  inline void step_n(int64_t n) {
    for (; n > 0; --n) {
      if (left == 0) {
        if (v_keys == 0) return;
        p = v; ks = vs; left = v_keys; v_keys = 0;
      }
      _mm_prefetch(p + line * 64, _MM_HINT_T0);
      if (++line == lines) { line = 0; p += ks; --left; }
    }
  }
  inline void step() { step_n(per_step); }
  inline void finish() { step_n(std::numeric_limits<int64_t>::max()); }
};

// The last 16-wide slice of the head dim (none in the even / odd layout, which needs Dh % 32 == 0).
template <typename V>
inline void pv_tail(const V* v, int64_t vs, int64_t nb, const float* p, const float* corr, float* acc,
                    int64_t R, int64_t Dh, Prefetcher& pf, int64_t c0) {
  for (; c0 < Dh; c0 += 16)
    row_groups(R, PV_ROWS1, [&](int64_t r0, int nr) {
      pf.step();
      DISPATCH12(nr, (pv_tile<N_, 1>(v, vs, nb, p + r0 * TILE, corr + r0, acc + r0 * Dh, Dh, c0)));
    });
}
inline void pv_tail(const Bf16EO*, int64_t, int64_t, const float*, const float*, float*, int64_t, int64_t,
                    Prefetcher&, int64_t) {}

// acc[r] = corr[r] * acc[r] + p[r] . v for all R rows, the head dim in slices of 64 (then 32, 16).
template <typename V>
inline void pv_all(const V* v, int64_t vs, int64_t nb, const float* p, const float* corr, float* acc,
                   int64_t R, int64_t Dh, Prefetcher& pf) {
  int64_t c0 = 0;
  for (; c0 + 64 <= Dh; c0 += 64)
    row_groups(R, PV_ROWS4, [&](int64_t r0, int nr) {
      pf.step();
      DISPATCH6(nr, (pv_tile<N_, 4>(v, vs, nb, p + r0 * TILE, corr + r0, acc + r0 * Dh, Dh, c0)));
    });
  for (; c0 + 32 <= Dh; c0 += 32)
    row_groups(R, PV_ROWS1, [&](int64_t r0, int nr) {
      pf.step();
      DISPATCH12(nr, (pv_tile<N_, 2>(v, vs, nb, p + r0 * TILE, corr + r0, acc + r0 * Dh, Dh, c0)));
    });
  pv_tail(v, vs, nb, p, corr, acc, R, Dh, pf, c0);
}

#if defined(__AVX512BF16__)
// P.V with bf16 dot products (a bf16 cache, head dim a multiple of 32). p2[i * TILE / 2 + jp] (a dword) holds
// row i's probabilities of keys 2jp and 2jp + 1 rounded to bf16 (nearest even); V of the same two keys is
// interleaved per column in registers: vpunpcklwd / vpunpckhwd of the two 64-byte rows give, per 128-bit
// lane L, the pairs of columns 8L..8L+3 and 8L+4..8L+7, so an accumulator block of 32 columns holds them
// as [lo: 0-3, 8-11, 16-19, 24-27 | hi: 4-7, 12-15, 20-23, 28-31] (put back in order by unshuffle_pairs).
// An odd key count pairs the last key with zeros (its partner's V is never read). fp32 accumulation:
// acc[i, c] += p'(2jp) v(2jp, c) + p'(2jp + 1) v(2jp + 1, c), keys pair by pair in order.
template <int NR, int NC>
inline void pv_tile_dp(const uint16_t* v, int64_t vs, int64_t nb, const uint32_t* p2, const float* corr,
                       float* acc, int64_t Dh, int64_t c0) {
  static_assert(NC % 2 == 0, "pairs of keys are interleaved in blocks of 32 columns");
  __m512 a[NR][NC];
  UNROLL
  for (int i = 0; i < NR; ++i) {
    const __m512 cv = _mm512_set1_ps(corr[i]);
    UNROLL
    for (int n = 0; n < NC; ++n) a[i][n] = _mm512_mul_ps(cv, _mm512_loadu_ps(acc + i * Dh + c0 + 16 * n));
  }
  const int64_t np = (nb + 1) / 2;
  for (int64_t jp = 0; jp < np; ++jp) {
    const uint16_t* r0 = v + 2 * jp * vs + c0;
    const bool whole = 2 * jp + 1 < nb;
    __m512bh vv[NC];
    UNROLL
    for (int n = 0; n < NC; n += 2) {
      const __m512i x = _mm512_loadu_si512(r0 + 16 * n);
      const __m512i y = whole ? _mm512_loadu_si512(r0 + vs + 16 * n) : _mm512_setzero_si512();
      vv[n] = (__m512bh)_mm512_unpacklo_epi16(x, y);
      vv[n + 1] = (__m512bh)_mm512_unpackhi_epi16(x, y);
    }
    UNROLL
    for (int i = 0; i < NR; ++i) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(p2[i * (TILE / 2) + jp]));
      UNROLL
      for (int n = 0; n < NC; ++n) a[i][n] = _mm512_dpbf16_ps(a[i][n], vv[n], pb);
    }
  }
  UNROLL
  for (int i = 0; i < NR; ++i)
    UNROLL
    for (int n = 0; n < NC; ++n) _mm512_storeu_ps(acc + i * Dh + c0 + 16 * n, a[i][n]);
}

// All R rows, the head dim in slices of 64 columns (then one of 32).
inline void pv_all_dp(const uint16_t* v, int64_t vs, int64_t nb, const uint32_t* p2, const float* corr,
                      float* acc, int64_t R, int64_t Dh, Prefetcher& pf) {
  int64_t c0 = 0;
  for (; c0 + 64 <= Dh; c0 += 64)
    row_groups(R, PV_ROWS4, [&](int64_t r0, int nr) {
      pf.step();
      DISPATCH6(nr, (pv_tile_dp<N_, 4>(v, vs, nb, p2 + r0 * (TILE / 2), corr + r0, acc + r0 * Dh, Dh, c0)));
    });
  for (; c0 + 32 <= Dh; c0 += 32)
    row_groups(R, PV_ROWS1, [&](int64_t r0, int nr) {
      pf.step();
      DISPATCH12(nr, (pv_tile_dp<N_, 2>(v, vs, nb, p2 + r0 * (TILE / 2), corr + r0, acc + r0 * Dh, Dh, c0)));
    });
}

// Rows [0, R) of acc from the key-pair layout (see pv_tile_dp) back to column order.
inline void unshuffle_pairs(float* acc, int64_t R, int64_t Dh) {
  permute_blocks(acc, R, Dh, _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
                 _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31));
}
#endif
#endif

struct Shape {
  int64_t B, T, H, Hkv, G, Dh, L;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;  // strides of k and v (elements)
  int64_t window;
  float scale;
};

// Per-thread scratch for one item: R = T*G query rows.
struct Scratch {
  std::vector<float> q;    // [R, Dh] scaled queries
  std::vector<float> acc;  // [R, Dh]
  std::vector<float> m, l; // [R]
  std::vector<float> s;    // [R, TILE] scores, then probabilities
  std::vector<int64_t> lo, hi;  // [R] visible key range of each query row
  std::vector<float> qt;        // [Dh, R] scaled queries transposed (see scores_f32)
  std::vector<uint16_t> qbt;    // [Dh / 2, R, 2] the queries in bf16, pairs transposed (see scores_bf16)
  std::vector<float> lv;        // [R, BLK] softmax denominators per lane (summed over lanes at the end)
  std::vector<float> corr;      // [R] this tile's rescaling of a row's accumulator (its max went up)
  std::vector<float> kt;        // [Dh, TILE] the tile's keys transposed (bf16 pairs: [Dh / 2, TILE] dwords)
  std::vector<float> vt;        // [TILE, Dh] the tile's values in fp32 (bf16 / fp16 caches)
  std::vector<uint32_t> p2;     // [R, TILE / 2] probabilities as bf16 pairs of keys (bf16 P.V, see pv_tile_dp)
  void resize(int64_t R, int64_t Dh) {
    q.resize(R * Dh); acc.resize(R * Dh); m.resize(R); l.resize(R); s.resize(R * TILE);
    lo.resize(R); hi.resize(R); qt.resize(R * Dh); qbt.resize(R * Dh + 2); lv.resize(R * BLK);
    corr.resize(R); kt.resize(Dh * TILE); vt.resize(TILE * Dh); p2.resize(R * (TILE / 2));
  }
};

#if defined(__AVX512F__)
// Transpose keys [j0, j0 + nb) (nb <= TILE; missing keys are zeros) of one (row, kv head) into sc.kt.
template <typename T>
__attribute__((always_inline)) inline void transpose_tile(const T* kp, int64_t ks, int64_t j0, int64_t nb, int64_t Dh, bool bf_pairs, float* kt) {
  __m512 rr[16];
  for (int64_t h = 0; h < TILE / BLK; ++h) {
    const int64_t n = std::min<int64_t>(BLK, std::max<int64_t>(0, nb - h * BLK));
    const T* k0 = kp + (j0 + h * BLK) * ks;
    if (bf_pairs) {
      // 32 bf16 of a key = 16 dwords (pairs); transpose dwords so kt[p] lane jj = pair p of key jj
      for (int64_t c = 0; c < Dh; c += 32) {
        for (int64_t jj = 0; jj < BLK; ++jj)
          rr[jj] = jj < n ? _mm512_loadu_ps(reinterpret_cast<const float*>(k0 + jj * ks + c)) : _mm512_setzero_ps();
        if (n > 0) transpose16(rr);
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (c / 2 + i) * TILE + h * BLK, rr[i]);
      }
    } else {
      for (int64_t c = 0; c < Dh; c += 16) {
        for (int64_t jj = 0; jj < BLK; ++jj) rr[jj] = jj < n ? load16(k0 + jj * ks + c) : _mm512_setzero_ps();
        if (n > 0) transpose16(rr);
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (c + i) * TILE + h * BLK, rr[i]);
      }
    }
  }
}
#endif

// Attend rows [0, R) of scratch over keys [j_begin, j_end) (tile aligned start) of one (row, kv head).
template <typename T>
void attend_range(const Shape& sh, const T* kp, const T* vp, Scratch& sc, int64_t R, int64_t j_begin,
                  int64_t j_end) {
  const int64_t Dh = sh.Dh;
  float* qb = sc.q.data();
  float* acc = sc.acc.data();
  float* sb = sc.s.data();
#if defined(__AVX512F__)
  if (Dh % 16 == 0) {
    float* lvb = sc.lv.data();
    float* corr = sc.corr.data();
    std::fill(sc.lv.begin(), sc.lv.end(), 0.f);
#if defined(__AVX512BF16__)
    const bool bf_dot = std::is_same<T, at::BFloat16>::value && Dh % 32 == 0;
#else
    const bool bf_dot = false;
#endif
    // bf16 P.V with dot products on pairs of keys (see pv_tile_dp) where the CPU has them and the head dim is
    // a multiple of 32; otherwise a bf16 V in the even / odd layout (see Bf16EO), P in fp32.
#if defined(SPECOFFLOAD_FP32_PV)
    const bool dp_pv = false;  // a build for comparisons: P.V in fp32 for bf16 caches too
#else
    const bool dp_pv = bf_dot;
#endif
    const bool eo = std::is_same<T, at::BFloat16>::value && Dh % 32 == 0 && !dp_pv;
    uint32_t* p2 = sc.p2.data();
    const int64_t row_bytes = Dh * static_cast<int64_t>(sizeof(T));
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    // Steps per tile at which the prefetcher issues some lines: score groups, softmax rows, P.V groups.
    const int64_t pf_steps = (R + QK_ROWS - 1) / QK_ROWS + R + (Dh / 64) * ((R + PV_ROWS4 - 1) / PV_ROWS4) +
                             ((Dh % 64) / 16) * ((R + PV_ROWS1 - 1) / PV_ROWS1);
    Prefetcher pf;
    for (int64_t j0 = j_begin; j0 < j_end; j0 += TILE) {
      const int64_t nb = std::min<int64_t>(TILE, j_end - j0);
      bool any = false;
      for (int64_t r = 0; r < R; ++r) any |= (sc.lo[r] < j0 + nb && sc.hi[r] > j0);
      if (!any) continue;
      // Ask for the next tile's K and V while this one is computed, a few lines at every step below.
      const int64_t n_next = std::max<int64_t>(0, std::min<int64_t>(TILE, j_end - (j0 + TILE)));
      pf.start(reinterpret_cast<const char*>(kp + (j0 + TILE) * sh.ks2),
               reinterpret_cast<const char*>(vp + (j0 + TILE) * sh.vs2), sh.ks2 * static_cast<int64_t>(sizeof(T)),
               sh.vs2 * static_cast<int64_t>(sizeof(T)), row_bytes, n_next, pf_steps);
      // Scores s[r, jj] = q[r] . k[j0 + jj]: the tile's keys transposed once, then register-blocked row groups.
      float* kt = sc.kt.data();
      transpose_tile(kp, sh.ks2, j0, nb, Dh, bf_dot, kt);
      row_groups(R, QK_ROWS, [&](int64_t r0, int nr) {
        pf.step();
        float* o = sb + r0 * TILE;
#if defined(__AVX512BF16__)
        if (bf_dot) {
          const uint16_t* qh = sc.qbt.data() + r0 * 2;
          DISPATCH12(nr, (scores_bf16<N_>(kt, qh, R, Dh, sh.scale, o)));
          return;
        }
#endif
        const float* qr = sc.qt.data() + r0;
        DISPATCH12(nr, (scores_f32<N_>(kt, qr, R, Dh, o)));
      });
      // Online softmax per query row, one step per tile (32 keys, two vectors).
      const __m512i jv0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j0)), iota);
      const __m512i jv1 = _mm512_add_epi32(jv0, _mm512_set1_epi32(16));
      const __mmask16 in0 = static_cast<__mmask16>(nb >= 16 ? 0xFFFF : ((1u << nb) - 1u));
      const __mmask16 in1 = static_cast<__mmask16>(nb >= 32 ? 0xFFFF : nb > 16 ? ((1u << (nb - 16)) - 1u) : 0u);
      for (int64_t r = 0; r < R; ++r) {
        const __m512i lo_v = _mm512_set1_epi32(static_cast<int>(sc.lo[r]));
        const __m512i hi_v = _mm512_set1_epi32(static_cast<int>(sc.hi[r]));
        const __mmask16 vis0 = in0 & _mm512_cmpge_epi32_mask(jv0, lo_v) & _mm512_cmplt_epi32_mask(jv0, hi_v);
        const __mmask16 vis1 = in1 & _mm512_cmpge_epi32_mask(jv1, lo_v) & _mm512_cmplt_epi32_mask(jv1, hi_v);
        float* srow = sb + r * TILE;
        corr[r] = 1.f;
        pf.step();
        if (!(vis0 | vis1)) {
          _mm512_storeu_ps(srow, _mm512_setzero_ps());
          _mm512_storeu_ps(srow + 16, _mm512_setzero_ps());
          if (dp_pv) _mm512_storeu_si512(p2 + r * (TILE / 2), _mm512_setzero_si512());
          continue;
        }
        const __m512 s0 = _mm512_loadu_ps(srow), s1 = _mm512_loadu_ps(srow + 16);
        const float bmax = _mm512_reduce_max_ps(
            _mm512_max_ps(_mm512_mask_mov_ps(ninf, vis0, s0), _mm512_mask_mov_ps(ninf, vis1, s1)));
        const float mnew = std::max(sc.m[r], bmax);
        const __m512 mv = _mm512_set1_ps(mnew);
        const __m512 p0 = _mm512_maskz_mov_ps(vis0, exp16(_mm512_sub_ps(s0, mv)));
        const __m512 p1 = _mm512_maskz_mov_ps(vis1, exp16(_mm512_sub_ps(s1, mv)));
        _mm512_storeu_ps(srow, p0);
        _mm512_storeu_ps(srow + 16, p1);
#if defined(__AVX512BF16__)
        // keys 2jp, 2jp + 1 -> dword jp, rounded to nearest even (the denominator keeps the fp32 weights)
        if (dp_pv) _mm512_storeu_si512(p2 + r * (TILE / 2), (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
#endif
        __m512 lsum = _mm512_loadu_ps(lvb + r * BLK);
        if (mnew > sc.m[r]) {
          corr[r] = std::exp(sc.m[r] - mnew);  // 0 when m was -inf
          lsum = _mm512_mul_ps(_mm512_set1_ps(corr[r]), lsum);
          sc.m[r] = mnew;
        }
        _mm512_storeu_ps(lvb + r * BLK, _mm512_add_ps(lsum, _mm512_add_ps(p0, p1)));
      }
      // acc[r] = corr[r] acc[r] + sum_jj p[r, jj] v[j0 + jj] in fp32, rows x head-dim slices register-blocked.
      // fp32 V is read from the cache. An fp16 V (or a bf16 one whose head dim is not a multiple of 32) is
      // converted in registers by up to four row groups per slice of the head dim (the loads interleave with
      // the FMAs); with more groups the tile is converted to fp32 once and the groups read that.
#if defined(__AVX512BF16__)
      if (dp_pv) {
        pv_all_dp(reinterpret_cast<const uint16_t*>(vp + j0 * sh.vs2), sh.vs2, nb, p2, corr, acc, R, Dh, pf);
      } else
#endif
      if (eo) {
        // bf16 (even / odd): each group reads V from the cache, one shift or mask per vector (measured faster
        // than a converted copy of the tile up to 36 rows)
        pv_all(reinterpret_cast<const Bf16EO*>(vp + j0 * sh.vs2), sh.vs2, nb, sb, corr, acc, R, Dh, pf);
      } else if (std::is_same<T, float>::value || R <= 4 * PV_ROWS4) {
        pv_all(vp + j0 * sh.vs2, sh.vs2, nb, sb, corr, acc, R, Dh, pf);
      } else {
        float* vt = sc.vt.data();
        for (int64_t jj = 0; jj < nb; ++jj) {
          const T* vj = vp + (j0 + jj) * sh.vs2;
          for (int64_t c = 0; c < Dh; c += 16) _mm512_storeu_ps(vt + jj * Dh + c, load16(vj + c));
        }
        pv_all(static_cast<const float*>(vt), Dh, nb, sb, corr, acc, R, Dh, pf);
      }
      pf.finish();
    }
    for (int64_t r = 0; r < R; ++r) sc.l[r] += _mm512_reduce_add_ps(_mm512_loadu_ps(lvb + r * BLK));
    if (eo) unshuffle_eo(acc, R, Dh);
#if defined(__AVX512BF16__)
    if (dp_pv) unshuffle_pairs(acc, R, Dh);
#endif
    return;
  }
#endif
  // Portable path (no AVX-512, or a head dim that is not a multiple of 16).
  for (int64_t j0 = j_begin; j0 < j_end; j0 += BLK) {
    const int64_t nb = std::min<int64_t>(BLK, j_end - j0);
    bool any = false;
    for (int64_t r = 0; r < R; ++r) any |= (sc.lo[r] < j0 + nb && sc.hi[r] > j0);
    if (!any) continue;
    for (int64_t jj = 0; jj < nb; ++jj) {
      const T* kj = kp + (j0 + jj) * sh.ks2;
      for (int64_t r = 0; r < R; ++r) {
        float d = 0.f;
        const float* qr = qb + r * Dh;
        for (int64_t c = 0; c < Dh; ++c) d += qr[c] * to_f32(kj[c]);
        sb[r * BLK + jj] = d;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      float* srow = sb + r * BLK;
      float bmax = -std::numeric_limits<float>::infinity();
      for (int64_t jj = 0; jj < nb; ++jj) {
        const int64_t j = j0 + jj;
        if (j >= sc.lo[r] && j < sc.hi[r]) bmax = std::max(bmax, srow[jj]);
      }
      if (bmax == -std::numeric_limits<float>::infinity()) {
        for (int64_t jj = 0; jj < BLK; ++jj) srow[jj] = 0.f;
        continue;
      }
      const float mnew = std::max(sc.m[r], bmax);
      if (mnew > sc.m[r]) {
        const float corr = std::exp(sc.m[r] - mnew);
        sc.l[r] *= corr;
        for (int64_t c = 0; c < Dh; ++c) acc[r * Dh + c] *= corr;
        sc.m[r] = mnew;
      }
      for (int64_t jj = 0; jj < BLK; ++jj) {
        const int64_t j = j0 + jj;
        const bool v = jj < nb && j >= sc.lo[r] && j < sc.hi[r];
        srow[jj] = v ? std::exp(srow[jj] - mnew) : 0.f;
        sc.l[r] += srow[jj];
      }
    }
    for (int64_t jj = 0; jj < nb; ++jj) {
      const T* vj = vp + (j0 + jj) * sh.vs2;
      for (int64_t r = 0; r < R; ++r) {
        const float p = sb[r * BLK + jj];
        if (p == 0.f) continue;
        float* ar = acc + r * Dh;
        for (int64_t c = 0; c < Dh; ++c) ar[c] += p * to_f32(vj[c]);
      }
    }
  }
}

#if defined(SPECOFFLOAD_THREAD_STATS)
// A diagnostic build (-DSPECOFFLOAD_THREAD_STATS; tools/bench_cpu_attention.py --thread-stats): per worker of the
// last call, its items and when it started and finished, seconds from the call's start.
struct ThreadStat { int64_t items = 0; double start = 0.0, end = 0.0; };
std::vector<ThreadStat> g_stats;
double g_stats_wall = 0.0, g_stats_merge = 0.0;  // workers done, merge done (0: no merge)
#endif

struct Item {
  int64_t b, h, chunk, part;  // part: index of this item's partial block, -1 when written directly
};

template <typename T>
void run(const Shape& sh, const float* q, const T* k, const T* v, const int64_t* rows, const int64_t* q_pos,
         const int64_t* kv_len, float* out) {
  const int64_t B = sh.B, T_ = sh.T, G = sh.G, Dh = sh.Dh, Hkv = sh.Hkv, R = sh.T * sh.G;
#if defined(SPECOFFLOAD_THREAD_STATS)
  const auto t_call = std::chrono::steady_clock::now();
  auto since = [&]() { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t_call).count(); };
  g_stats_merge = 0.0;
#endif
  // Visible key range per (row, query): [lo, hi).
  std::vector<int64_t> lo(B * T_), hi(B * T_), klo(B), khi(B);
  for (int64_t b = 0; b < B; ++b) {
    klo[b] = std::numeric_limits<int64_t>::max();
    khi[b] = 0;
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t p = q_pos[b * T_ + t];
      int64_t h_ = std::min(p + 1, kv_len[b]);
      int64_t l_ = sh.window > 0 ? std::max<int64_t>(0, p - sh.window + 1) : 0;
      h_ = std::min(h_, sh.L);
      if (h_ <= l_) { l_ = 0; h_ = 0; }
      lo[b * T_ + t] = l_;
      hi[b * T_ + t] = h_;
      if (h_ > l_) { klo[b] = std::min(klo[b], l_); khi[b] = std::max(khi[b], h_); }
    }
    if (khi[b] == 0) klo[b] = 0;
  }
  // Work items, longest rows first; rows spanning several chunks get partial slots.
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return khi[a] - klo[a] > khi[c] - klo[c]; });
  std::vector<Item> items;
  std::vector<int64_t> first_part(B, -1), n_chunks(B, 0);
  int64_t n_parts = 0;
  for (int64_t b : order) {
    const int64_t c0 = klo[b] / CHUNK, c1 = khi[b] > klo[b] ? (khi[b] - 1) / CHUNK + 1 : c0 + 1;
    n_chunks[b] = c1 - c0;
    if (n_chunks[b] > 1) { first_part[b] = n_parts; n_parts += (c1 - c0) * Hkv; }
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t c = c0; c < c1; ++c)
        items.push_back({b, h, c, n_chunks[b] > 1 ? first_part[b] + h * n_chunks[b] + (c - c0) : -1});
  }
  // Partials: per part, R rows of (m, l, acc[Dh]).
  const int64_t part_stride = R * (Dh + 2);
  // Not value-initialised: every slot is written by its item before the merge reads it (a zeroing pass here was
  // a serial memset of the whole buffer on the calling thread, 34 MiB per call at batch 256 x 4096 keys).
  std::unique_ptr<float[]> parts(new float[static_cast<size_t>(std::max<int64_t>(1, n_parts * part_stride))]);
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));

#if defined(SPECOFFLOAD_THREAD_STATS)
  g_stats.assign(static_cast<size_t>(n_threads), ThreadStat{});
#endif
  auto worker = [&](int64_t tid, int64_t) {
#if defined(SPECOFFLOAD_THREAD_STATS)
    ThreadStat& st = g_stats[tid];
    st.start = since();
#else
    (void)tid;
#endif
    Scratch sc;
    sc.resize(R, Dh);
    for (int64_t i; (i = next.fetch_add(1)) < n_items;) {
      const Item it = items[i];
#if defined(SPECOFFLOAD_THREAD_STATS)
      ++st.items;
#endif
      const int64_t b = it.b, h = it.h;
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = t * G + g;
          sc.lo[r] = lo[b * T_ + t];
          sc.hi[r] = hi[b * T_ + t];
          sc.m[r] = -std::numeric_limits<float>::infinity();
          sc.l[r] = 0.f;
        }
      std::fill(sc.acc.begin(), sc.acc.end(), 0.f);
      // The queries: [R, Dh] scaled (portable loops), [Dh, R] scaled (fp32 scores) or bf16 pairs [Dh / 2, R]
      // unscaled (bf16 scores), row r = t * G + g.
      bool laid_out = false;
#if defined(__AVX512F__)
      if (Dh % 16 == 0) {
        laid_out = true;
#if defined(__AVX512BF16__)
        if (std::is_same<T, at::BFloat16>::value && Dh % 32 == 0) {
          alignas(64) uint32_t pairs[16];
          for (int64_t r = 0; r < R; ++r) {
            const float* qs = q + ((b * T_ + r / G) * sh.H + h * G + r % G) * Dh;
            for (int64_t d = 0; d < Dh; d += 32) {
              // pair p = (q[2p], q[2p + 1]), rounded to nearest even
              const __m512bh bh = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qs + d + 16), _mm512_loadu_ps(qs + d));
              _mm512_store_si512(reinterpret_cast<__m512i*>(pairs), (__m512i)bh);
              uint32_t* dst = reinterpret_cast<uint32_t*>(sc.qbt.data());
              for (int64_t i = 0; i < 16; ++i) dst[(d / 2 + i) * R + r] = pairs[i];
            }
          }
        } else
#endif
        {
          for (int64_t r = 0; r < R; ++r) {
            const float* qs = q + ((b * T_ + r / G) * sh.H + h * G + r % G) * Dh;
            for (int64_t d = 0; d < Dh; ++d) sc.qt[d * R + r] = qs[d] * sh.scale;
          }
        }
      }
#endif
      if (!laid_out)
        for (int64_t r = 0; r < R; ++r) {
          const float* qs = q + ((b * T_ + r / G) * sh.H + h * G + r % G) * Dh;
          for (int64_t c = 0; c < Dh; ++c) sc.q[r * Dh + c] = qs[c] * sh.scale;
        }
      const int64_t j_begin = std::max(it.chunk * CHUNK, (klo[b] / TILE) * TILE);
      const int64_t j_end = std::min((it.chunk + 1) * CHUNK, khi[b]);
      if (j_end > j_begin)
        attend_range<T>(sh, k + rows[b] * sh.ks0 + h * sh.ks1, v + rows[b] * sh.vs0 + h * sh.vs1, sc, R,
                        j_begin, j_end);
      if (it.part < 0) {
        for (int64_t t = 0; t < T_; ++t)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = t * G + g;
            float* o = out + ((b * T_ + t) * sh.H + h * G + g) * Dh;
            const float inv = sc.l[r] > 0.f ? 1.f / sc.l[r] : 0.f;
            for (int64_t c = 0; c < Dh; ++c) o[c] = sc.acc[r * Dh + c] * inv;
          }
      } else {
        float* p = parts.get() + it.part * part_stride;
        for (int64_t r = 0; r < R; ++r) {
          p[r * (Dh + 2)] = sc.m[r];
          p[r * (Dh + 2) + 1] = sc.l[r];
          std::copy(sc.acc.begin() + r * Dh, sc.acc.begin() + (r + 1) * Dh, p + r * (Dh + 2) + 2);
        }
      }
    }
  };
#if defined(SPECOFFLOAD_THREAD_STATS)
  at::parallel_for(0, n_threads, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t t = b0; t < b1; ++t) { worker(t, t + 1); g_stats[t].end = since(); }
  });
  g_stats_wall = since();
#else
  at::parallel_for(0, n_threads, 1, worker);
#endif
  if (n_parts == 0) return;
  // Merge the chunks of long rows, in chunk order.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      if (first_part[b] < 0) continue;
      const float* p0 = parts.get() + (first_part[b] + h * n_chunks[b]) * part_stride;
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = t * G + g;
          float M = -std::numeric_limits<float>::infinity();
          for (int64_t c = 0; c < n_chunks[b]; ++c) M = std::max(M, p0[c * part_stride + r * (Dh + 2)]);
          float* o = out + ((b * T_ + t) * sh.H + h * G + g) * Dh;
          std::fill(o, o + Dh, 0.f);
          if (M == -std::numeric_limits<float>::infinity()) continue;
          float Lsum = 0.f;
          for (int64_t c = 0; c < n_chunks[b]; ++c) {
            const float* pc = p0 + c * part_stride + r * (Dh + 2);
            if (pc[1] == 0.f) continue;
            const float w = std::exp(pc[0] - M);
            Lsum += w * pc[1];
            for (int64_t d = 0; d < Dh; ++d) o[d] += w * pc[2 + d];
          }
          const float inv = Lsum > 0.f ? 1.f / Lsum : 0.f;
          for (int64_t d = 0; d < Dh; ++d) o[d] *= inv;
        }
    }
  });
#if defined(SPECOFFLOAD_THREAD_STATS)
  g_stats_merge = since();
#endif
}

torch::Tensor host_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor rows,
                             torch::Tensor q_pos, torch::Tensor kv_len, int64_t window) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be contiguous fp32 [B, T, H, Dh]");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(), "k and v must be [N, Hkv, L, Dh] of one shape");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v must share a dtype");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k and v must be contiguous along the head dim");
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && q.device().is_cpu(), "host attention runs on CPU tensors");
  TORCH_CHECK(rows.scalar_type() == at::kLong && q_pos.scalar_type() == at::kLong && kv_len.scalar_type() == at::kLong,
              "rows, q_pos and kv_len must be int64");
  rows = rows.contiguous(); q_pos = q_pos.contiguous(); kv_len = kv_len.contiguous();
  Shape sh;
  sh.B = q.size(0); sh.T = q.size(1); sh.H = q.size(2); sh.Dh = q.size(3);
  sh.Hkv = k.size(1); sh.L = k.size(2);
  TORCH_CHECK(k.size(3) == sh.Dh, "head dims of q and k differ");
  TORCH_CHECK(sh.Hkv > 0 && sh.H % sh.Hkv == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(rows.numel() == sh.B && kv_len.numel() == sh.B && q_pos.numel() == sh.B * sh.T, "rows/q_pos/kv_len shapes");
  sh.G = sh.H / sh.Hkv;
  sh.ks0 = k.stride(0); sh.ks1 = k.stride(1); sh.ks2 = k.stride(2);
  sh.vs0 = v.stride(0); sh.vs1 = v.stride(1); sh.vs2 = v.stride(2);
  sh.window = window;
  sh.scale = 1.0f / std::sqrt(static_cast<float>(sh.Dh));
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < sh.B; ++b) TORCH_CHECK(rp[b] >= 0 && rp[b] < k.size(0), "row index out of range");
  auto out = torch::empty({sh.B, sh.T, sh.H, sh.Dh}, q.options());
  if (out.numel() == 0) return out;
  const float* qp = q.data_ptr<float>();
  switch (k.scalar_type()) {
    case at::kFloat:
      run<float>(sh, qp, k.data_ptr<float>(), v.data_ptr<float>(), rp, q_pos.data_ptr<int64_t>(),
                 kv_len.data_ptr<int64_t>(), out.data_ptr<float>());
      break;
    case at::kBFloat16:
      run<at::BFloat16>(sh, qp, k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), rp,
                        q_pos.data_ptr<int64_t>(), kv_len.data_ptr<int64_t>(), out.data_ptr<float>());
      break;
    case at::kHalf:
      run<at::Half>(sh, qp, k.data_ptr<at::Half>(), v.data_ptr<at::Half>(), rp, q_pos.data_ptr<int64_t>(),
                    kv_len.data_ptr<int64_t>(), out.data_ptr<float>());
      break;
    default:
      TORCH_CHECK(false, "host attention supports fp32, bf16 and fp16 caches, not ", k.scalar_type());
  }
  return out;
}

bool has_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

// How many distinct threads run the n tasks of one at::parallel_for in this module (each task waits, up to a
// second, for all n to have started, so that one thread cannot run them all back to back): torch's intra-op
// thread count when the module is built with OpenMP, 1 when its parallel_for runs serially.
int64_t parallel_threads(int64_t n) {
  TORCH_CHECK(n >= 1, "parallel_threads: n >= 1");
  std::atomic<int64_t> arrived{0};
  std::vector<std::thread::id> ids(static_cast<size_t>(n));
  at::parallel_for(0, n, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      ids[i] = std::this_thread::get_id();
      arrived.fetch_add(1);
    }
    const auto t0 = std::chrono::steady_clock::now();
    while (arrived.load() < n && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(1)) std::this_thread::yield();
  });
  std::sort(ids.begin(), ids.end());
  return std::unique(ids.begin(), ids.end()) - ids.begin();
}

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// Measured compute peak of one core: GFLOP/s of a loop of independent 512-bit fp32 FMAs ("fma") or bf16
// pair dot products ("dpbf16"), 24 accumulator chains (enough to cover the latency on both pipes), repeated
// for about `seconds`; the best of five runs. 0 when the build lacks the instruction.
double peak_gflops(const std::string& kind, double seconds) {
  TORCH_CHECK(kind == "fma" || kind == "dpbf16", "peak_gflops: kind must be 'fma' or 'dpbf16', not '", kind, "'");
#if defined(__AVX512F__)
  constexpr int NA = 24;
  constexpr int64_t ITERS = 1 << 14;
  const bool bf = kind == "dpbf16";
#if !defined(__AVX512BF16__)
  if (bf) return 0.0;
#endif
  const double flops_per_iter = NA * (bf ? 64.0 : 32.0);
  double best = 0.0;
  volatile float sink = 0.f;
  for (int run_ = 0; run_ < 5; ++run_) {
    __m512 a[NA];
    for (int i = 0; i < NA; ++i) a[i] = _mm512_set1_ps(0.001f * i);
    // a = a * 0.999 + 1e-4 stays bounded and normal; the bf16 pairs are (0.5, 0.25) . (0.001, 0.001)
    const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-4f);
    int64_t n = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double dt = 0.0;
    do {
      for (int64_t it = 0; it < ITERS; ++it) {
#if defined(__AVX512BF16__)
        if (bf) {
          const __m512bh bx = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f));
          const __m512bh by = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.001f), _mm512_set1_ps(0.001f));
          UNROLL
          for (int i = 0; i < NA; ++i) a[i] = _mm512_dpbf16_ps(a[i], bx, by);
          continue;
        }
#endif
        UNROLL
        for (int i = 0; i < NA; ++i) a[i] = _mm512_fmadd_ps(a[i], x, y);
      }
      n += ITERS;
      dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } while (dt < seconds / 5);
    __m512 t = a[0];
    for (int i = 1; i < NA; ++i) t = _mm512_add_ps(t, a[i]);
    sink = sink + _mm512_reduce_add_ps(t);
    best = std::max(best, flops_per_iter * n / dt / 1e9);
  }
  (void)sink;
  return best;
#else
  (void)seconds;
  return 0.0;
#endif
}

// The read-only baseline of tools/bench_cpu_attention.py: the sum of a contiguous fp32 or bf16 tensor, each
// byte read once, as a stream, with almost no work per byte (bf16: one shift or mask and one add per 16
// elements; eight independent accumulator chains per thread), so its GB/s is the rate at which this many
// threads can read memory, the ceiling for anything that reads the KV cache once. Blocks of READ_BLOCK
// elements are split over torch's intra-op threads in contiguous ranges (each thread one stream); each
// block's fp32 partial is added in block order in double, so the result does not depend on the thread count.
constexpr int64_t READ_BLOCK = 1 << 16;

template <typename T>
float sum_block(const T* x, int64_t n) {
  float s = 0.f;
#if defined(__AVX512F__)
  constexpr int64_t STEP = std::is_same<T, float>::value ? 16 : 32;  // elements per 64-byte line
  __m512 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 4 * STEP <= n; i += 4 * STEP) {
    UNROLL
    for (int u = 0; u < 4; ++u) {
      if constexpr (std::is_same<T, float>::value) {
        a[2 * u] = _mm512_add_ps(a[2 * u], _mm512_loadu_ps(reinterpret_cast<const float*>(x) + i + 16 * u));
      } else {
        const __m512i w = _mm512_loadu_si512(reinterpret_cast<const uint16_t*>(x) + i + 32 * u);
        if constexpr (std::is_same<T, at::BFloat16>::value) {
          a[2 * u] = _mm512_add_ps(a[2 * u], _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
          a[2 * u + 1] = _mm512_add_ps(
              a[2 * u + 1], _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))));
        } else {
          a[2 * u] = _mm512_add_ps(a[2 * u], _mm512_cvtph_ps(_mm512_castsi512_si256(w)));
          a[2 * u + 1] = _mm512_add_ps(a[2 * u + 1], _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1)));
        }
      }
    }
  }
  __m512 t = a[0];
  for (int k = 1; k < 8; ++k) t = _mm512_add_ps(t, a[k]);
  s = _mm512_reduce_add_ps(t);
  for (; i < n; ++i) s += to_f32(x[i]);
#else
  float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) lanes[u] += to_f32(x[i + u]);
  for (int u = 0; u < 8; ++u) s += lanes[u];
  for (; i < n; ++i) s += to_f32(x[i]);
#endif
  return s;
}

double read_sum(torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "read_sum: a contiguous CPU tensor");
  const int64_t n = x.numel();
  if (n == 0) return 0.0;
  const int64_t nblk = (n + READ_BLOCK - 1) / READ_BLOCK;
  std::vector<float> part(static_cast<size_t>(nblk));
  auto blocks = [&](auto* p) {
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        part[b] = sum_block(p + b * READ_BLOCK, std::min<int64_t>(READ_BLOCK, n - b * READ_BLOCK));
    });
  };
  switch (x.scalar_type()) {
    case at::kFloat: blocks(x.data_ptr<float>()); break;
    case at::kBFloat16: blocks(x.data_ptr<at::BFloat16>()); break;
    case at::kHalf: blocks(x.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "read_sum: fp32, bf16 or fp16, not ", x.scalar_type());
  }
  double s = 0.0;
  for (float p : part) s += p;
  return s;
}

#if defined(SPECOFFLOAD_THREAD_STATS)
py::tuple thread_stats() {
  py::list l;
  for (const auto& t : g_stats) l.append(py::make_tuple(t.items, t.start, t.end));
  return py::make_tuple(l, g_stats_wall, g_stats_merge);
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("host_attention", &host_attention, "ragged GQA attention over a head-major host KV cache");
  m.def("peak_gflops", &peak_gflops, "measured GFLOP/s of one core: kind 'fma' (fp32) or 'dpbf16'",
        py::arg("kind"), py::arg("seconds") = 0.5);
  m.def("read_sum", &read_sum, "sum of a contiguous fp32 / bf16 / fp16 CPU tensor, read once as a stream "
        "(the bench's read-only baseline; torch's intra-op threads)", py::arg("x"));
#if defined(SPECOFFLOAD_THREAD_STATS)
  m.def("thread_stats", &thread_stats, "([(items, start_s, end_s) per worker], workers_done_s, merge_done_s or 0) of the last call, seconds from its start");
#endif
  m.def("has_openmp", &has_openmp, "whether the module was built with OpenMP (its parallel_for uses torch's threads)");
  m.def("parallel_threads", &parallel_threads, "distinct threads that ran the n tasks of one parallel_for",
        py::arg("n"));
  m.def("has_avx512", &has_avx512, "whether the kernel was compiled with the AVX-512 path");
}

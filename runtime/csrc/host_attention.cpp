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
// that share a kv head and all T queries of the row are handled together, so each K/V vector is
// read from memory once per (row, kv head). Chunks and the 16-key blocks inside them sit at fixed
// absolute positions, so a query's result does not depend on the batch it is in, on T, or on the
// number of threads (the same sums in the same order). Inside a 16-key block (AVX-512 path) the keys
// are transposed once into scratch, and the R = T*G query rows run in register-blocked groups of up to
// 24: scores are sums over the head dim in order, one vector of 16 keys per row (no horizontal sums),
// and P.V reads each V vector once per group. A row's sums never depend on the group it lands in. Rows with several chunks write one partial
// (max, sum, accumulator) per chunk, merged in chunk order afterwards. Items are taken from a
// shared counter, longest rows first, by as many threads as the torch intra-op pool has.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Register-blocked loops must be unrolled completely for their accumulators to stay in registers.
#define UNROLL _Pragma("GCC unroll 32")

constexpr int64_t BLK = 16;      // keys per block (one vector of scores)
constexpr int64_t CHUNK = 512;   // keys per work item (a multiple of BLK)

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
inline void transpose16(__m512* r) {
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

// Scores of NR query rows against one block of 16 keys whose K is stored transposed: kt[d] holds
// element d of the 16 keys. s[i] lane jj = sum over d (in order) of q[i, d] * k[jj, d]: every key
// vector read once serves all NR rows, and the scores come out with keys in lanes (no horizontal sums).
// q: the group's scaled queries transposed, q[d * NR + i] (one pointer serves all NR broadcasts).
template <int NR>
inline void scores_f32(const float* kt, const float* q, int64_t Dh, float* out) {
  __m512 s[NR];
  UNROLL
  for (int i = 0; i < NR; ++i) s[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < Dh; ++d) {
    const __m512 kv = _mm512_loadu_ps(kt + d * 16);
    UNROLL
    for (int i = 0; i < NR; ++i) s[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[d * NR + i]), kv, s[i]);
  }
  UNROLL
  for (int i = 0; i < NR; ++i) _mm512_storeu_ps(out + i * 16, s[i]);
}

#if defined(__AVX512BF16__)
// The same with bf16 pairs: kt2[p] lane jj holds (k[jj, 2p], k[jj, 2p + 1]); q: the group's queries in
// bf16, unscaled, as pairs transposed, q[(p * NR + i) * 2 + e] = q[i, 2p + e].
template <int NR>
inline void scores_bf16(const float* kt2, const uint16_t* q, int64_t Dh, float scale, float* out) {
  __m512 s[NR];
  UNROLL
  for (int i = 0; i < NR; ++i) s[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < Dh / 2; ++p) {
    const __m512bh kv = (__m512bh)_mm512_castps_si512(_mm512_loadu_ps(kt2 + p * 16));
    UNROLL
    for (int i = 0; i < NR; ++i) {
      int32_t pair;
      std::memcpy(&pair, q + (p * NR + i) * 2, sizeof(pair));
      s[i] = _mm512_dpbf16_ps(s[i], kv, (__m512bh)_mm512_set1_epi32(pair));
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  UNROLL
  for (int i = 0; i < NR; ++i) _mm512_storeu_ps(out + i * 16, _mm512_mul_ps(s[i], sc));
}
#endif

// acc[i, :] += sum over jj < nb (in order) of p[i, jj] * v[jj, :], NC 16-wide slices of Dh at a time;
// each V vector read once serves all NR rows.
template <int NR, int NC, typename T>
inline void pv_block(const T* v0, int64_t vs, int64_t nb, const float* p, float* acc, int64_t Dh) {
  for (int64_t c = 0; c < Dh; c += 16 * NC) {
    __m512 a[NR][NC];
    UNROLL
    for (int i = 0; i < NR; ++i)
      UNROLL
      for (int n = 0; n < NC; ++n) a[i][n] = _mm512_loadu_ps(acc + i * Dh + c + 16 * n);
    for (int64_t jj = 0; jj < nb; ++jj) {
      __m512 vv[NC];
      UNROLL
      for (int n = 0; n < NC; ++n) vv[n] = load16(v0 + jj * vs + c + 16 * n);
      UNROLL
      for (int i = 0; i < NR; ++i) {
        const __m512 pb = _mm512_set1_ps(p[i * 16 + jj]);
        UNROLL
        for (int n = 0; n < NC; ++n) a[i][n] = _mm512_fmadd_ps(pb, vv[n], a[i][n]);
      }
    }
    UNROLL
    for (int i = 0; i < NR; ++i)
      UNROLL
      for (int n = 0; n < NC; ++n) _mm512_storeu_ps(acc + i * Dh + c + 16 * n, a[i][n]);
  }
}

template <int NR, typename T>
inline void pv_rows(const T* v0, int64_t vs, int64_t nb, const float* p, float* acc, int64_t Dh) {
  constexpr int NC = NR >= 16 ? 1 : NR >= 8 ? 2 : 4;
  if (Dh % (16 * NC) == 0) pv_block<NR, NC>(v0, vs, nb, p, acc, Dh);
  else pv_block<NR, 1>(v0, vs, nb, p, acc, Dh);
}

// Rows [0, R) in groups of 24, 16, 8, 4, 2, 1 (a row's sums do not depend on its group).
template <typename F>
inline void for_row_groups(int64_t R, F&& f) {
  for (int64_t r0 = 0; r0 < R;) {
    const int64_t rem = R - r0;
    const int nr = rem >= 24 ? 24 : rem >= 16 ? 16 : rem >= 8 ? 8 : rem >= 4 ? 4 : rem >= 2 ? 2 : 1;
    f(r0, nr);
    r0 += nr;
  }
}
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
  std::vector<float> s;    // [R, BLK] scores, then probabilities
  std::vector<int64_t> lo, hi;  // [R] visible key range of each query row
  std::vector<uint16_t> qbf;    // [R, Dh] the scaled queries in bf16 (bf16 caches with AVX-512 BF16)
  std::vector<float> qt;        // [R, Dh] scaled queries, each row group transposed (see scores_f32)
  std::vector<uint16_t> qbt;    // [R, Dh] bf16 queries, each row group transposed in pairs (see scores_bf16)
  std::vector<float> lv;        // [R, BLK] softmax denominators per lane (summed over lanes at the end)
  std::vector<float> kt;        // [Dh, BLK] the block's keys transposed (bf16 pairs: [Dh / 2, BLK] dwords)
  void resize(int64_t R, int64_t Dh) {
    q.resize(R * Dh); acc.resize(R * Dh); m.resize(R); l.resize(R); s.resize(R * BLK);
    lo.resize(R); hi.resize(R); qbf.resize(R * Dh); kt.resize(Dh * BLK); lv.resize(R * BLK); qt.resize(R * Dh); qbt.resize(R * Dh);
  }
};

// Attend rows [0, R) of scratch over keys [j_begin, j_end) (block aligned start) of one (row, kv head).
template <typename T>
void attend_range(const Shape& sh, const T* kp, const T* vp, Scratch& sc, int64_t R, int64_t j_begin,
                  int64_t j_end) {
  const int64_t Dh = sh.Dh;
  float* qb = sc.q.data();
  float* acc = sc.acc.data();
  float* sb = sc.s.data();
#if defined(__AVX512F__)
  float* lvb = sc.lv.data();
  std::fill(sc.lv.begin(), sc.lv.end(), 0.f);
#endif
  for (int64_t j0 = j_begin; j0 < j_end; j0 += BLK) {
    const int64_t nb = std::min<int64_t>(BLK, j_end - j0);
    // Which rows see any key of this block.
    bool any = false;
    for (int64_t r = 0; r < R; ++r) any |= (sc.lo[r] < j0 + nb && sc.hi[r] > j0);
    if (!any) continue;
#if defined(__AVX512F__)
    if (Dh % 16 == 0) {
      // Ask for the next block's K and V while this one is computed.
      const int64_t n_next = std::min<int64_t>(BLK, j_end - (j0 + BLK));
      const int64_t row_bytes = Dh * static_cast<int64_t>(sizeof(T));
      for (int64_t jj = 0; jj < n_next; ++jj) {
        const char* kn = reinterpret_cast<const char*>(kp + (j0 + BLK + jj) * sh.ks2);
        const char* vn = reinterpret_cast<const char*>(vp + (j0 + BLK + jj) * sh.vs2);
        for (int64_t off = 0; off < row_bytes; off += 64) {
          _mm_prefetch(kn + off, _MM_HINT_T0);
          _mm_prefetch(vn + off, _MM_HINT_T0);
        }
      }
      // Scores: s[r, jj] = q[r] . k[j0 + jj]. The block's keys are transposed once (keys into lanes),
      // then each query row's 16 scores are one vector of sums over d in order, whatever the row count.
#if defined(__AVX512BF16__)
      const bool bf_dot = std::is_same<T, at::BFloat16>::value && Dh % 32 == 0;
#else
      const bool bf_dot = false;
#endif
      float* kt = sc.kt.data();
      __m512 rr[16];
      if (bf_dot) {
        // 32 bf16 of a key = 16 dwords (pairs); transpose dwords so kt[p] lane jj = pair p of key jj
        for (int64_t c = 0; c < Dh; c += 32) {
          for (int64_t jj = 0; jj < BLK; ++jj)
            rr[jj] = jj < nb ? _mm512_loadu_ps(reinterpret_cast<const float*>(kp + (j0 + jj) * sh.ks2 + c))
                             : _mm512_setzero_ps();
          transpose16(rr);
          for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (c / 2 + i) * BLK, rr[i]);
        }
      } else {
        for (int64_t c = 0; c < Dh; c += 16) {
          for (int64_t jj = 0; jj < BLK; ++jj)
            rr[jj] = jj < nb ? load16(kp + (j0 + jj) * sh.ks2 + c) : _mm512_setzero_ps();
          transpose16(rr);
          for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (c + i) * BLK, rr[i]);
        }
      }
      for_row_groups(R, [&](int64_t r0, int nr) {
#if defined(__AVX512BF16__)
        if (bf_dot) {
          const uint16_t* qh = sc.qbt.data() + r0 * Dh;
          float* o = sb + r0 * BLK;
          switch (nr) {
            case 24: scores_bf16<24>(kt, qh, Dh, sh.scale, o); break;
            case 16: scores_bf16<16>(kt, qh, Dh, sh.scale, o); break;
            case 8: scores_bf16<8>(kt, qh, Dh, sh.scale, o); break;
            case 4: scores_bf16<4>(kt, qh, Dh, sh.scale, o); break;
            case 2: scores_bf16<2>(kt, qh, Dh, sh.scale, o); break;
            default: scores_bf16<1>(kt, qh, Dh, sh.scale, o); break;
          }
          return;
        }
#endif
        const float* qr = sc.qt.data() + r0 * Dh;
        float* o = sb + r0 * BLK;
        switch (nr) {
          case 24: scores_f32<24>(kt, qr, Dh, o); break;
          case 16: scores_f32<16>(kt, qr, Dh, o); break;
          case 8: scores_f32<8>(kt, qr, Dh, o); break;
          case 4: scores_f32<4>(kt, qr, Dh, o); break;
          case 2: scores_f32<2>(kt, qr, Dh, o); break;
          default: scores_f32<1>(kt, qr, Dh, o); break;
        }
      });
      // Online softmax update per query row, 16 keys at a time.
      const __m512i jv = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j0)),
                                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
      const __mmask16 inblk = static_cast<__mmask16>(nb == 16 ? 0xFFFF : ((1u << nb) - 1u));
      for (int64_t r = 0; r < R; ++r) {
        const __mmask16 vis = inblk &
            _mm512_cmpge_epi32_mask(jv, _mm512_set1_epi32(static_cast<int>(sc.lo[r]))) &
            _mm512_cmplt_epi32_mask(jv, _mm512_set1_epi32(static_cast<int>(sc.hi[r])));
        float* srow = sb + r * BLK;
        if (!vis) { _mm512_storeu_ps(srow, _mm512_setzero_ps()); continue; }
        const __m512 s = _mm512_loadu_ps(srow);
        const float bmax = _mm512_mask_reduce_max_ps(vis, s);
        const float mnew = std::max(sc.m[r], bmax);
        const __m512 p = _mm512_maskz_mov_ps(vis, exp16(_mm512_sub_ps(s, _mm512_set1_ps(mnew))));
        _mm512_storeu_ps(srow, p);
        if (mnew > sc.m[r]) {
          const float corr = std::exp(sc.m[r] - mnew);  // 0 when m was -inf
          const __m512 cv = _mm512_set1_ps(corr);
          _mm512_storeu_ps(lvb + r * BLK, _mm512_mul_ps(cv, _mm512_loadu_ps(lvb + r * BLK)));
          for (int64_t c = 0; c < Dh; c += 16)
            _mm512_storeu_ps(acc + r * Dh + c, _mm512_mul_ps(cv, _mm512_loadu_ps(acc + r * Dh + c)));
          sc.m[r] = mnew;
        }
        _mm512_storeu_ps(lvb + r * BLK, _mm512_add_ps(p, _mm512_loadu_ps(lvb + r * BLK)));
      }
      // acc[r] += sum_jj p[r, jj] * v[j0 + jj], rows in register-blocked groups.
      const T* v0 = vp + j0 * sh.vs2;
      for_row_groups(R, [&](int64_t r0, int nr) {
        const float* pr = sb + r0 * BLK;
        float* ar = acc + r0 * Dh;
        switch (nr) {
          case 24: pv_rows<24>(v0, sh.vs2, nb, pr, ar, Dh); break;
          case 16: pv_rows<16>(v0, sh.vs2, nb, pr, ar, Dh); break;
          case 8: pv_rows<8>(v0, sh.vs2, nb, pr, ar, Dh); break;
          case 4: pv_rows<4>(v0, sh.vs2, nb, pr, ar, Dh); break;
          case 2: pv_rows<2>(v0, sh.vs2, nb, pr, ar, Dh); break;
          default: pv_rows<1>(v0, sh.vs2, nb, pr, ar, Dh); break;
        }
      });
      continue;
    }
#endif
    // Portable path (no AVX-512, or a head dim that is not a multiple of 16).
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
#if defined(__AVX512F__)
  if (Dh % 16 == 0)
    for (int64_t r = 0; r < R; ++r) sc.l[r] += _mm512_reduce_add_ps(_mm512_loadu_ps(lvb + r * BLK));
#endif
}

struct Item {
  int64_t b, h, chunk, part;  // part: index of this item's partial block, -1 when written directly
};

template <typename T>
void run(const Shape& sh, const float* q, const T* k, const T* v, const int64_t* rows, const int64_t* q_pos,
         const int64_t* kv_len, float* out) {
  const int64_t B = sh.B, T_ = sh.T, G = sh.G, Dh = sh.Dh, Hkv = sh.Hkv, R = sh.T * sh.G;
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
  std::vector<float> parts(static_cast<size_t>(n_parts * part_stride));
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));

  auto worker = [&](int64_t, int64_t) {
    Scratch sc;
    sc.resize(R, Dh);
    for (int64_t i; (i = next.fetch_add(1)) < n_items;) {
      const Item it = items[i];
      const int64_t b = it.b, h = it.h;
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = t * G + g;
          const float* qs = q + ((b * T_ + t) * sh.H + h * G + g) * Dh;
          for (int64_t c = 0; c < Dh; ++c) sc.q[r * Dh + c] = qs[c] * sh.scale;
          sc.lo[r] = lo[b * T_ + t];
          sc.hi[r] = hi[b * T_ + t];
          sc.m[r] = -std::numeric_limits<float>::infinity();
          sc.l[r] = 0.f;
          if (std::is_same<T, at::BFloat16>::value)
            for (int64_t c = 0; c < Dh; ++c) sc.qbf[r * Dh + c] = at::BFloat16(qs[c]).x;  // unscaled
        }
      std::fill(sc.acc.begin(), sc.acc.end(), 0.f);
#if defined(__AVX512F__)
      if (Dh % 16 == 0)
        for_row_groups(R, [&](int64_t r0, int nr) {
          for (int i = 0; i < nr; ++i)
            for (int64_t d = 0; d < Dh; ++d) {
              sc.qt[r0 * Dh + d * nr + i] = sc.q[(r0 + i) * Dh + d];
              sc.qbt[r0 * Dh + ((d / 2) * nr + i) * 2 + d % 2] = sc.qbf[(r0 + i) * Dh + d];
            }
        });
#endif
      const int64_t j_begin = std::max(it.chunk * CHUNK, (klo[b] / BLK) * BLK);
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
        float* p = parts.data() + it.part * part_stride;
        for (int64_t r = 0; r < R; ++r) {
          p[r * (Dh + 2)] = sc.m[r];
          p[r * (Dh + 2) + 1] = sc.l[r];
          std::copy(sc.acc.begin() + r * Dh, sc.acc.begin() + (r + 1) * Dh, p + r * (Dh + 2) + 2);
        }
      }
    }
  };
  at::parallel_for(0, n_threads, 1, worker);
  if (n_parts == 0) return;
  // Merge the chunks of long rows, in chunk order.
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      if (first_part[b] < 0) continue;
      const float* p0 = parts.data() + (first_part[b] + h * n_chunks[b]) * part_stride;
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

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("host_attention", &host_attention, "ragged GQA attention over a head-major host KV cache");
  m.def("has_avx512", &has_avx512, "whether the kernel was compiled with the AVX-512 path");
}

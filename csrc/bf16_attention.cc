// Fused softmax attention, bf16 q/k/v with float32 logits, softmax and sums, on AVX512-BF16 (VDPBF16PS).
// The [Lq, Lk] logits never exist whole: each task takes 16 queries of one (batch, head) through all keys
// in blocks of 128 with an online (running max) softmax, as flash attention does.
//
// Layout: q [B, Lq, H, D], k and v [B, Lk, H, D], out [B, Lq, H, D] (bf16), lse [B, H, Lq] (f32: the
// log-sum-exp of each query's logits, what a backward pass needs to rebuild the probabilities). q is
// already scaled (the caller multiplies by D^-1/2, as the unfused path does).
//
// Numerics against the unfused path (logits in f32, softmax in f32, probabilities rounded to bf16, p.v
// summed in f32): here the weights are exp(s - running max) rounded to bf16 and the division by the f32
// row sum happens once at the end; both are within bf16 rounding of each other (tests/test_gemm.py).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_gemm.h"

#define SAN_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

constexpr int QT = 16;   // queries per task (two groups of 8 rows in the logits kernel)
constexpr int KB = 128;  // keys per online-softmax block (the logits kernel takes 32 at a time)
constexpr int MAX_DV = 8;  // head dim <= 128 (8 vectors of 16)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Job {
  int64_t B, Lq, Lk, H, D;
  const uint16_t *q, *k, *v;
  uint16_t* out;
  float* lse;
  int64_t D2, DV, Lk_pad;  // k-pairs of the head dim; 16-wide vectors of it; keys padded to KB
  uint32_t* kpack;  // per (b, h): [Lk_pad / 16][D2][16] uint32 (two bf16 of the head dim per key)
  uint32_t* vpack;  // per (b, h): [Lk_pad / 2][DV * 16] uint32 (the same dim of two consecutive keys)
  int64_t tiles;    // query tiles per (b, h)
  std::atomic<int64_t> next{0};
};

inline uint16_t at(const uint16_t* base, const Job& j, int64_t b, int64_t l, int64_t L, int64_t h, int64_t d) {
  return base[((b * L + l) * j.H + h) * j.D + d];
}

// Packs k and v of one (b, h) (zeros beyond Lk and D).
void pack_bh(Job& j, int64_t bh) {
  const int64_t b = bh / j.H, h = bh % j.H;
  uint32_t* kp = j.kpack + bh * (j.Lk_pad * j.D2);
  uint32_t* vp = j.vpack + bh * (j.Lk_pad / 2 * j.DV * 16);
  for (int64_t kb = 0; kb < j.Lk_pad / 16; ++kb)
    for (int64_t d2 = 0; d2 < j.D2; ++d2)
      for (int t = 0; t < 16; ++t) {
        const int64_t key = kb * 16 + t, d = 2 * d2;
        uint32_t lo = 0, hi = 0;
        if (key < j.Lk) {
          lo = at(j.k, j, b, key, j.Lk, h, d);
          hi = d + 1 < j.D ? at(j.k, j, b, key, j.Lk, h, d + 1) : 0;
        }
        kp[(kb * j.D2 + d2) * 16 + t] = lo | (hi << 16);
      }
  for (int64_t p = 0; p < j.Lk_pad / 2; ++p)
    for (int64_t d = 0; d < j.DV * 16; ++d) {
      uint32_t lo = 0, hi = 0;
      if (d < j.D) {
        if (2 * p < j.Lk) lo = at(j.v, j, b, 2 * p, j.Lk, h, d);
        if (2 * p + 1 < j.Lk) hi = at(j.v, j, b, 2 * p + 1, j.Lk, h, d);
      }
      vp[p * j.DV * 16 + d] = lo | (hi << 16);
    }
}

// exp(x) for x <= 0 (softmax arguments), ~1e-7 relative: 2^t with t = x log2(e) = n + f, |f| <= 1/2,
// 2^f by its degree-6 Taylor polynomial; scalef applies 2^n. Arguments below -87 give ~0.
SAN_TGT inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// S[8 rows][32 keys] = Q8 . K32^T: qp[r][d2] (uint32 pairs, row stride D2), kp: two 16-key panels.
SAN_TGT inline void logits_8x32(const uint32_t* __restrict qp, int64_t D2, const uint32_t* __restrict kp0,
                                const uint32_t* __restrict kp1, float* __restrict S, int ldS) {
  __m512 c[8][2];
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
  for (int64_t d2 = 0; d2 < D2; ++d2) {
    const __m512bh k0 = (__m512bh)_mm512_load_si512((const void*)(kp0 + d2 * 16));
    const __m512bh k1 = (__m512bh)_mm512_load_si512((const void*)(kp1 + d2 * 16));
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)qp[r * D2 + d2]);
      c[r][0] = _mm512_dpbf16_ps(c[r][0], a, k0);
      c[r][1] = _mm512_dpbf16_ps(c[r][1], a, k1);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) {
    _mm512_store_ps(S + r * ldS, c[r][0]);
    _mm512_store_ps(S + r * ldS + 16, c[r][1]);
  }
}

// O[R rows][DV vectors] += P[R][npairs key pairs] . V: P as uint32 pairs (row stride KB / 2).
template <int R, int DVT>
SAN_TGT inline void pv_rows(const uint32_t* __restrict P, int64_t npairs, const uint32_t* __restrict vp,
                            int64_t ldv, float* __restrict O, int ldO) {
  __m512 c[R][DVT];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < DVT; ++j) c[r][j] = _mm512_load_ps(O + r * ldO + 16 * j);
  for (int64_t p = 0; p < npairs; ++p) {
    __m512bh vv[DVT];
#pragma GCC unroll 8
    for (int j = 0; j < DVT; ++j) vv[j] = (__m512bh)_mm512_load_si512((const void*)(vp + p * ldv + 16 * j));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)P[r * (KB / 2) + p]);
#pragma GCC unroll 8
      for (int j = 0; j < DVT; ++j) c[r][j] = _mm512_dpbf16_ps(c[r][j], a, vv[j]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < DVT; ++j) _mm512_store_ps(O + r * ldO + 16 * j, c[r][j]);
}

template <int DVT>
SAN_TGT void pv_tile(const uint32_t* P, int64_t npairs, const uint32_t* vp, int64_t ldv, float* O, int ldO) {
  constexpr int R = DVT <= 4 ? 4 : 2;
  for (int r = 0; r < QT; r += R) pv_rows<R, DVT>(P + r * (KB / 2), npairs, vp, ldv, O + r * ldO, ldO);
}

SAN_TGT void pv_dispatch(int64_t DV, const uint32_t* P, int64_t npairs, const uint32_t* vp, float* O) {
  const int64_t ldv = DV * 16;
  const int ldO = MAX_DV * 16;
  switch (DV) {
    case 1: pv_tile<1>(P, npairs, vp, ldv, O, ldO); break;
    case 2: pv_tile<2>(P, npairs, vp, ldv, O, ldO); break;
    case 3: pv_tile<3>(P, npairs, vp, ldv, O, ldO); break;
    case 4: pv_tile<4>(P, npairs, vp, ldv, O, ldO); break;
    case 5: pv_tile<5>(P, npairs, vp, ldv, O, ldO); break;
    case 6: pv_tile<6>(P, npairs, vp, ldv, O, ldO); break;
    case 7: pv_tile<7>(P, npairs, vp, ldv, O, ldO); break;
    default: pv_tile<8>(P, npairs, vp, ldv, O, ldO); break;
  }
}

inline uint16_t to_bf16(float x) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

SAN_TGT void tile(Job& j, int64_t task) {
  const int64_t bh = task / j.tiles, q0 = (task % j.tiles) * QT;
  const int64_t b = bh / j.H, h = bh % j.H;
  const int rows = (int)std::min<int64_t>(QT, j.Lq - q0);
  alignas(64) uint32_t qp[QT * 64];          // [QT][D2] query pairs (D <= 128)
  alignas(64) float S[QT * KB];              // logits of one key block
  alignas(64) uint32_t P[QT * (KB / 2)];     // exp(S - max) as bf16 pairs
  alignas(64) float O[QT * MAX_DV * 16];     // running sums of p . v
  float m[QT], l[QT];
  for (int r = 0; r < QT; ++r)
    for (int64_t d2 = 0; d2 < j.D2; ++d2) {
      uint32_t lo = 0, hi = 0;
      if (r < rows) {
        lo = at(j.q, j, b, q0 + r, j.Lq, h, 2 * d2);
        hi = 2 * d2 + 1 < j.D ? at(j.q, j, b, q0 + r, j.Lq, h, 2 * d2 + 1) : 0;
      }
      qp[r * j.D2 + d2] = lo | (hi << 16);
    }
  std::fill(O, O + QT * MAX_DV * 16, 0.0f);
  std::fill(m, m + QT, -INFINITY);
  std::fill(l, l + QT, 0.0f);
  const uint32_t* kbase = j.kpack + bh * (j.Lk_pad * j.D2);
  const uint32_t* vbase = j.vpack + bh * (j.Lk_pad / 2 * j.DV * 16);
  for (int64_t k0 = 0; k0 < j.Lk; k0 += KB) {
    const int kn = (int)std::min<int64_t>(KB, j.Lk - k0);
    const int groups = (kn + 31) / 32;
    for (int g = 0; g < groups; ++g) {
      const uint32_t* kp0 = kbase + ((k0 + 32 * g) / 16) * j.D2 * 16;
      const uint32_t* kp1 = kp0 + j.D2 * 16;
      logits_8x32(qp, j.D2, kp0, kp1, S + 32 * g, KB);
      logits_8x32(qp + 8 * j.D2, j.D2, kp0, kp1, S + 8 * KB + 32 * g, KB);
    }
    const int kvec = groups * 2;  // 16-key vectors computed (keys beyond kn are padding)
    const __mmask16 last = (kn % 16) ? (__mmask16)((1u << (kn % 16)) - 1) : (__mmask16)0xFFFF;
    const int full = kn / 16;
    for (int r = 0; r < QT; ++r) {
      float* s = S + r * KB;
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int t = 0; t < full; ++t) mx = _mm512_max_ps(mx, _mm512_load_ps(s + 16 * t));
      if (full < kvec && (kn % 16)) mx = _mm512_mask_max_ps(mx, last, mx, _mm512_load_ps(s + 16 * full));
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
      const float alpha = std::exp(m[r] - m_new);  // 0 on the first block (m = -inf)
      m[r] = m_new;
      const __m512 mv = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      uint16_t* prow = reinterpret_cast<uint16_t*>(P + r * (KB / 2));
      for (int t = 0; t < kvec; ++t) {
        __m512 e = exp_ps(_mm512_sub_ps(_mm512_load_ps(s + 16 * t), mv));
        if (t >= full) e = _mm512_maskz_mov_ps(t == full && (kn % 16) ? last : (__mmask16)0, e);  // padding keys
        // The row sum takes the float32 weights, the products their bf16 roundings (as the unfused path
        // normalises in float32 and then rounds the probabilities).
        _mm256_storeu_si256((__m256i*)(prow + 16 * t), (__m256i)_mm512_cvtneps_pbh(e));
        sum = _mm512_add_ps(sum, e);
      }
      for (int t = kvec; t < KB / 16; ++t) _mm256_storeu_si256((__m256i*)(prow + 16 * t), _mm256_setzero_si256());
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
      if (alpha != 1.0f) {
        const __m512 av = _mm512_set1_ps(alpha);
        float* o = O + r * MAX_DV * 16;
        for (int64_t dv = 0; dv < j.DV; ++dv) _mm512_store_ps(o + 16 * dv, _mm512_mul_ps(_mm512_load_ps(o + 16 * dv), av));
      }
    }
    pv_dispatch(j.DV, P, (kn + 1) / 2, vbase + (k0 / 2) * j.DV * 16, O);
  }
  for (int r = 0; r < rows; ++r) {
    const float inv = 1.0f / l[r];
    uint16_t* dst = j.out + ((b * j.Lq + q0 + r) * j.H + h) * j.D;
    const float* o = O + r * MAX_DV * 16;
    for (int64_t d = 0; d < j.D; ++d) dst[d] = to_bf16(o[d] * inv);
    j.lse[(b * j.H + h) * j.Lq + q0 + r] = m[r] + std::log(l[r]);
  }
}

void pack_part(void* arg, int) {
  Job& j = *static_cast<Job*>(arg);
  for (int64_t t; (t = j.next.fetch_add(1)) < j.B * j.H;) pack_bh(j, t);
}

void tile_part(void* arg, int) {
  Job& j = *static_cast<Job*>(arg);
  const int64_t n = j.B * j.H * j.tiles;
  for (int64_t t; (t = j.next.fetch_add(1)) < n;) tile(j, t);
}

}  // namespace

extern "C" int san_bf16_attention(int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D, const uint16_t* q,
                                  const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse) {
  if (D <= 0 || D > 16 * MAX_DV || Lk <= 0) return 1;
  if (B <= 0 || Lq <= 0 || H <= 0) return 0;
  if (!san_bf16_gemm_supported()) return 2;
  Job j;
  j.B = B; j.Lq = Lq; j.Lk = Lk; j.H = H; j.D = D;
  j.q = q; j.k = k; j.v = v; j.out = out; j.lse = lse;
  j.D2 = (D + 1) / 2;
  j.DV = ceil_div(D, 16);
  j.Lk_pad = ceil_div(Lk, KB) * KB;
  j.tiles = ceil_div(Lq, QT);
  // 64-byte aligned scratch for the packed keys and values of every (b, h).
  const size_t kwords = (size_t)(B * H) * j.Lk_pad * j.D2, vwords = (size_t)(B * H) * (j.Lk_pad / 2) * j.DV * 16;
  std::vector<uint32_t> scratch(kwords + vwords + 32);
  uint32_t* base = scratch.data();
  base += (16 - (reinterpret_cast<uintptr_t>(base) / 4) % 16) % 16;
  j.kpack = base;
  j.vpack = base + ((kwords + 15) / 16) * 16;
  san_parallel_run(B * H, pack_part, &j);
  j.next.store(0);
  san_parallel_run(B * H * j.tiles, tile_part, &j);
  return 0;
}

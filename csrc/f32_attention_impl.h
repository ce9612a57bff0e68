// The float32 fused attention's kernel, written once with GCC vector extensions over a vector of W floats and
// included twice by f32_attention.cc: once under `#pragma GCC target("avx2,fma")` (W = 8) and once under
// `#pragma GCC target("avx512f")` (W = 16), each in its own namespace. Not a header to include elsewhere.
//
// Expects before inclusion: SAN_W (floats per vector), SAN_R (query rows per logits micro-kernel call),
// SAN_NP (W-key panels per logits call), SAN_QT (queries per task), SAN_ACC (vector accumulators the p.v
// kernel may hold). On a 2-core Zen 3 (AVX2) the side ViT's attention (6 heads x 1,700 tokens, D 40) took
// 29-33 ms with (R, NP, QT) = (4, 2, 16), (4, 3, 16), (2, 4, 16) or (6, 2, 24) alike: within that machine's
// run-to-run noise; about 45% of it is q.k^T, 35% p.v, 20% the softmax.

constexpr int W = SAN_W;
constexpr int R = SAN_R;             // query rows of one logits micro-kernel call
constexpr int NP = SAN_NP;           // key panels (W keys each) of one logits call
constexpr int KG = NP * W;           // keys of one logits call
constexpr int KB = 4 * KG;
static_assert(SAN_QT % SAN_R == 0, "QT must be a multiple of the logits rows");           // keys per online-softmax block
constexpr int QT = SAN_QT;           // queries per task
constexpr int MAX_D = 128;           // head dim limit (the tile buffers' width)
constexpr int MAX_DV = MAX_D / W;    // vectors of one padded head-dim row

typedef float vf __attribute__((vector_size(W * 4)));
typedef int vi __attribute__((vector_size(W * 4)));

inline vf splat(float x) { return vf{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }  // aligned in practice
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < W; ++i) m = std::max(m, v[i]); return m; }
inline float hsum(vf v) {  // pairwise, as a tree
  float s[W];
  std::memcpy(s, &v, sizeof v);
  for (int n = W / 2; n >= 1; n /= 2)
    for (int i = 0; i < n; ++i) s[i] += s[i + n];
  return s[0];
}

// exp(x) for x <= 0 (softmax arguments), ~1e-7 relative: 2^t with t = x log2(e) = n + f, |f| <= 1/2, 2^f by its
// degree-6 Taylor polynomial, 2^n put into the exponent bits. Arguments below -87 give exp(-87) (~1.6e-38,
// which adds nothing to a row sum >= 1).
inline vf exp_neg(vf x) {
  x = vmax(x, splat(-87.0f));
  const vf t = x * splat(1.4426950408889634f);
  const vf n = (t + splat(12582912.0f)) - splat(12582912.0f);  // round to nearest (|t| < 2^22)
  const vf f = t - n;
  vf p = splat(1.5403530393381606e-4f);
  p = p * f + splat(1.3333558146428443e-3f);
  p = p * f + splat(9.6181291076284772e-3f);
  p = p * f + splat(5.5504108664821580e-2f);
  p = p * f + splat(2.4022650695910071e-1f);
  p = p * f + splat(6.9314718055994531e-1f);
  p = p * f + splat(1.0f);
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n, n in [-126, 0]
  vf scale;
  std::memcpy(&scale, &e, sizeof e);
  return p * scale;
}

struct Job {
  int64_t B, Lq, Lk, H, D;
  const float *q, *k, *v;
  float* out;
  float* lse;
  int64_t DV, Lk_pad;  // vectors of a padded head-dim row; keys padded to KB
  float* kpack;        // per (b, h): [Lk_pad / W][D][W] (W keys side by side for each head dim)
  float* vpack;        // per (b, h): [Lk_pad][DV * W] (zero rows beyond Lk, zero columns beyond D)
  int64_t tiles;       // query tiles per (b, h)
  std::atomic<int64_t> next{0};
};

// Packs k and v of one (b, h).
inline void pack_bh(Job& j, int64_t bh) {
  const int64_t b = bh / j.H, h = bh % j.H, ldv = j.DV * W;
  float* kp = j.kpack + bh * (j.Lk_pad * j.D);
  float* vp = j.vpack + bh * (j.Lk_pad * ldv);
  std::memset(kp, 0, sizeof(float) * j.Lk_pad * j.D);
  std::memset(vp, 0, sizeof(float) * j.Lk_pad * ldv);
  for (int64_t key = 0; key < j.Lk; ++key) {
    const float* ks = j.k + ((b * j.Lk + key) * j.H + h) * j.D;
    const float* vs = j.v + ((b * j.Lk + key) * j.H + h) * j.D;
    float* kd = kp + (key / W) * j.D * W + key % W;
    for (int64_t d = 0; d < j.D; ++d) kd[d * W] = ks[d];
    std::memcpy(vp + key * ldv, vs, sizeof(float) * j.D);
  }
}

// S[R rows][KG keys] = Q[R rows] . K^T for the KG keys whose panels start at kp (panel stride D * W).
inline void logits(const float* __restrict qt, int64_t D, const float* __restrict kp, float* __restrict S) {
  vf c[R][NP];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) c[r][p] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    vf kv[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) kv[p] = load(kp + (p * D + d) * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf a = splat(qt[r * MAX_D + d]);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) c[r][p] += a * kv[p];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) store(S + r * KB + p * W, c[r][p]);
}

// C[RR rows][TV vectors] += A[RR rows][n] (row stride lda) . Bm[n][TV vectors] (row stride ldb); C row
// stride ldc. The forward's P.V (A = P, Bm = V) and the backward's three products.
template <int RR, int TV>
inline void acc_rows(const float* __restrict A, int64_t lda, int n, const float* __restrict Bm, int64_t ldb,
                     float* __restrict C, int64_t ldc) {
  vf c[RR][TV];
#pragma GCC unroll 16
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < TV; ++t) c[r][t] = load(C + r * ldc + t * W);
  for (int i = 0; i < n; ++i) {
    vf b[TV];
#pragma GCC unroll 16
    for (int t = 0; t < TV; ++t) b[t] = load(Bm + i * ldb + t * W);
#pragma GCC unroll 16
    for (int r = 0; r < RR; ++r) {
      const vf a = splat(A[r * lda + i]);
#pragma GCC unroll 16
      for (int t = 0; t < TV; ++t) c[r][t] += a * b[t];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 16
    for (int t = 0; t < TV; ++t) store(C + r * ldc + t * W, c[r][t]);
}

// All QT rows of O for DVT vectors of the head dim: RR rows at a time, RR * DVT <= SAN_ACC accumulators.
template <int DVT>
inline void pv_chunk(const float* P, int n, const float* vp, int64_t ldv, float* O) {
  constexpr int RR = SAN_ACC / DVT >= 8 ? 8 : SAN_ACC / DVT >= 4 ? 4 : SAN_ACC / DVT >= 2 ? 2 : 1;
  static_assert(QT % RR == 0, "QT must be a multiple of the p.v rows");
  for (int r = 0; r < QT; r += RR) acc_rows<RR, DVT>(P + r * KB, KB, n, vp, ldv, O + r * MAX_D, MAX_D);
}

inline void pv(int64_t DV, const float* P, int n, const float* vp, float* O) {
  const int64_t ldv = DV * W;
  constexpr int MAXT = SAN_ACC >= 16 ? 8 : 6;  // widest chunk (at least one row of accumulators)
  for (int64_t t0 = 0; t0 < DV; t0 += MAXT) {
    const int64_t t = std::min<int64_t>(MAXT, DV - t0);
    const float* v = vp + t0 * W;
    float* o = O + t0 * W;
    switch (t) {
      case 1: pv_chunk<1>(P, n, v, ldv, o); break;
      case 2: pv_chunk<2>(P, n, v, ldv, o); break;
      case 3: pv_chunk<3>(P, n, v, ldv, o); break;
      case 4: pv_chunk<4>(P, n, v, ldv, o); break;
      case 5: pv_chunk<5>(P, n, v, ldv, o); break;
      case 6: pv_chunk<6>(P, n, v, ldv, o); break;
#if SAN_ACC >= 16
      case 7: pv_chunk<7>(P, n, v, ldv, o); break;
      default: pv_chunk<8>(P, n, v, ldv, o); break;
#endif
    }
  }
}

// One task: QT queries of one (b, h) through all keys, KB at a time, with a running-max softmax.
inline void tile(Job& j, int64_t task) {
  const int64_t bh = task / j.tiles, q0 = (task % j.tiles) * QT;
  const int64_t b = bh / j.H, h = bh % j.H;
  const int rows = (int)std::min<int64_t>(QT, j.Lq - q0);
  alignas(64) float qt[QT * MAX_D];  // the tile's queries (zero rows beyond Lq)
  alignas(64) float S[QT * KB];      // logits, then weights, of one key block
  alignas(64) float O[QT * MAX_D];   // running sums of p . v
  float m[QT], l[QT];
  std::memset(qt, 0, sizeof qt);
  for (int r = 0; r < rows; ++r) std::memcpy(qt + r * MAX_D, j.q + ((b * j.Lq + q0 + r) * j.H + h) * j.D, sizeof(float) * j.D);
  std::memset(O, 0, sizeof O);
  std::fill(m, m + QT, -INFINITY);
  std::fill(l, l + QT, 0.0f);
  const int64_t ldv = j.DV * W;
  const float* kbase = j.kpack + bh * (j.Lk_pad * j.D);
  const float* vbase = j.vpack + bh * (j.Lk_pad * ldv);
  for (int64_t k0 = 0; k0 < j.Lk; k0 += KB) {
    const int kn = (int)std::min<int64_t>(KB, j.Lk - k0);
    const int groups = (kn + KG - 1) / KG;
    for (int g = 0; g < groups; ++g) {
      const float* kp = kbase + ((k0 + KG * g) / W) * j.D * W;
      for (int r = 0; r < QT; r += R) logits(qt + r * MAX_D, j.D, kp, S + r * KB + KG * g);
    }
    const int nv = (kn + W - 1) / W;  // vectors holding the kn valid keys
    for (int r = 0; r < QT; ++r) {
      float* s = S + r * KB;
      for (int i = kn; i < nv * W; ++i) s[i] = -INFINITY;  // padding keys: weight 0 below
      vf mx = splat(-INFINITY);
      for (int t = 0; t < nv; ++t) mx = vmax(mx, load(s + W * t));
      const float m_new = std::max(m[r], hmax(mx));
      const float alpha = std::exp(m[r] - m_new);  // 0 on the first block (m = -inf)
      m[r] = m_new;
      const vf mv = splat(m_new);
      vf sum = vf{};
      for (int t = 0; t < nv; ++t) {
        vf x = load(s + W * t) - mv;
        vf e = exp_neg(x);
        e = x == splat(-INFINITY) ? vf{} : e;
        store(s + W * t, e);
        sum += e;
      }
      l[r] = l[r] * alpha + hsum(sum);
      if (alpha != 1.0f) {
        float* o = O + r * MAX_D;
        const vf av = splat(alpha);
        for (int64_t t = 0; t < j.DV; ++t) store(o + W * t, load(o + W * t) * av);
      }
    }
    pv(j.DV, S, kn, vbase + k0 * ldv, O);
  }
  for (int r = 0; r < rows; ++r) {
    const float inv = 1.0f / l[r];
    float* dst = j.out + ((b * j.Lq + q0 + r) * j.H + h) * j.D;
    const float* o = O + r * MAX_D;
    for (int64_t d = 0; d < j.D; ++d) dst[d] = o[d] * inv;
    j.lse[(b * j.H + h) * j.Lq + q0 + r] = m[r] + std::log(l[r]);
  }
}

inline void pack_part(void* arg, int) {
  Job& j = *static_cast<Job*>(arg);
  for (int64_t t; (t = j.next.fetch_add(1)) < j.B * j.H;) pack_bh(j, t);
}

inline void tile_part(void* arg, int) {
  Job& j = *static_cast<Job*>(arg);
  const int64_t n = j.B * j.H * j.tiles;
  for (int64_t t; (t = j.next.fetch_add(1)) < n;) tile(j, t);
}

void run(int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D, const float* q, const float* k, const float* v,
         float* out, float* lse) {
  Job j;
  j.B = B; j.Lq = Lq; j.Lk = Lk; j.H = H; j.D = D;
  j.q = q; j.k = k; j.v = v; j.out = out; j.lse = lse;
  j.DV = (D + W - 1) / W;
  j.Lk_pad = (Lk + KB - 1) / KB * KB;
  j.tiles = (Lq + QT - 1) / QT;
  const size_t kfloats = (size_t)(B * H) * j.Lk_pad * D, vfloats = (size_t)(B * H) * j.Lk_pad * j.DV * W;
  std::vector<float> scratch(kfloats + vfloats + 32);
  float* base = scratch.data();
  base += (16 - (reinterpret_cast<uintptr_t>(base) / 4) % 16) % 16;  // 64-byte aligned
  j.kpack = base;
  j.vpack = base + (kfloats + 15) / 16 * 16;
  san_parallel_run(B * H, pack_part, &j);
  j.next.store(0);
  san_parallel_run(B * H * j.tiles, tile_part, &j);
}

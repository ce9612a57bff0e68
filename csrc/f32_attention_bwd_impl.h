// The float32 fused attention's backward, included by f32_attention.cc right after f32_attention_impl.h in
// each ISA's namespace (it uses that file's vectors, exp_neg and the logits and acc_rows micro-kernels). Not a header to
// include elsewhere.
//
// Given the forward's q (scaled), k, v, out and lse (log-sum-exp per query) and the cotangent g of out:
//   P = exp(q k^T - lse),  dv = P^T g,  dP = g v^T,  dS = P * (dP - delta)  with delta_i = g_i . out_i,
//   dq = dS k,  dk = dS^T q.
// One task per (batch, head): it walks the keys a block of KB at a time and, within a block, the queries QB
// at a time, recomputing the block's logits and probabilities from lse (they never exist whole, as in the
// forward); dk and dv of a key block are complete when its block ends, dq accumulates in the task's own
// buffer over the key blocks in order, so no two threads write one value and the sums' order is fixed.
//
// Why: XLA:CPU's backward of the unfused attention materialises P, dP and dS ([heads, Lq, Lk] floats each,
// 69 MB per side-ViT block at 1,700 tokens) and streams them several times; here they live QT x KB at a time.

// C[rows][DV vectors] += A[rows][n] . Bm[n][DV vectors]; rows a multiple of 4.
inline void acc_product(const float* A, int64_t lda, int rows, int n, const float* Bm, int64_t ldb, float* C,
                        int64_t ldc, int64_t DV) {
  constexpr int RR = 4, TVMAX = SAN_ACC / RR;  // RR x TV accumulators
  for (int r = 0; r < rows; r += RR) {
    for (int64_t t0 = 0; t0 < DV; t0 += TVMAX) {
      const float* b = Bm + t0 * W;
      float* c = C + r * ldc + t0 * W;
      const float* a = A + r * lda;
      switch (std::min<int64_t>(TVMAX, DV - t0)) {
        case 1: acc_rows<RR, 1>(a, lda, n, b, ldb, c, ldc); break;
        case 2: acc_rows<RR, 2>(a, lda, n, b, ldb, c, ldc); break;
#if SAN_ACC >= 24
        case 3: acc_rows<RR, 3>(a, lda, n, b, ldb, c, ldc); break;
        case 4: acc_rows<RR, 4>(a, lda, n, b, ldb, c, ldc); break;
        case 5: acc_rows<RR, 5>(a, lda, n, b, ldb, c, ldc); break;
        default: acc_rows<RR, 6>(a, lda, n, b, ldb, c, ldc); break;
#else
        default: acc_rows<RR, 3>(a, lda, n, b, ldb, c, ldc); break;
#endif
      }
    }
  }
}

struct BwdJob {
  int64_t B, Lq, Lk, H, D, DV;
  const float *q, *k, *v, *o, *lse, *g;
  float *dq, *dk, *dv;
  std::atomic<int64_t> next{0};
};

// Packs keys [k0, k0 + kn) of one (b, h) from x [B, Lk, H, D] as W-key panels ([KB / W][D][W], zero beyond kn).
inline void pack_panels(const BwdJob& j, const float* x, int64_t b, int64_t h, int64_t k0, int kn, float* pan) {
  std::memset(pan, 0, sizeof(float) * KB * j.D);
  for (int key = 0; key < kn; ++key) {
    const float* src = x + ((b * j.Lk + k0 + key) * j.H + h) * j.D;
    float* dst = pan + (key / W) * j.D * W + key % W;
    for (int64_t d = 0; d < j.D; ++d) dst[d * W] = src[d];
  }
}

constexpr int QB = 64;  // queries per backward tile: dk and dv take QB-long sums per accumulator load
static_assert(QB % R == 0 && QB % 4 == 0, "QB must be a multiple of the logits rows and of 4");

inline void bwd_task(BwdJob& j, int64_t bh) {
  const int64_t b = bh / j.H, h = bh % j.H, D = j.D, DV = j.DV, ld = DV * W;
  const int64_t Lq_pad = (j.Lq + QB - 1) / QB * QB, D4 = (D + 3) / 4 * 4;
  // Zero-initialised (std::vector): rows beyond Lq and columns beyond D stay zero.
  std::vector<float> buf(2 * Lq_pad * MAX_D + 2 * D4 * Lq_pad + Lq_pad * ld + 2 * Lq_pad + 2 * KB * D +
                         KB * ld + 2 * D4 * KB + 16);
  float* base = buf.data();
  base += (16 - (reinterpret_cast<uintptr_t>(base) / 4) % 16) % 16;
  float* qrow = base;                    // [Lq_pad][MAX_D] (the logits kernel's query layout)
  float* grow = qrow + Lq_pad * MAX_D;   // [Lq_pad][MAX_D]
  float* qT = grow + Lq_pad * MAX_D;     // [D4][Lq_pad]
  float* gT = qT + D4 * Lq_pad;          // [D4][Lq_pad]
  float* dq = gT + D4 * Lq_pad;          // [Lq_pad][ld]
  float* lse = dq + Lq_pad * ld;         // [Lq_pad]
  float* delta = lse + Lq_pad;           // [Lq_pad]
  float* kpan = delta + Lq_pad;          // [KB / W][D][W]
  float* vpan = kpan + KB * D;           // [KB / W][D][W]
  float* krow = vpan + KB * D;           // [KB][ld]
  float* dkT = krow + KB * ld;           // [D4][KB]
  float* dvT = dkT + D4 * KB;            // [D4][KB]
  for (int64_t i = 0; i < j.Lq; ++i) {
    const int64_t at = ((b * j.Lq + i) * j.H + h) * D;
    std::memcpy(qrow + i * MAX_D, j.q + at, sizeof(float) * D);
    std::memcpy(grow + i * MAX_D, j.g + at, sizeof(float) * D);
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      qT[d * Lq_pad + i] = j.q[at + d];
      gT[d * Lq_pad + i] = j.g[at + d];
      s += j.g[at + d] * j.o[at + d];
    }
    delta[i] = s;
    lse[i] = j.lse[bh * j.Lq + i];
  }
  alignas(64) float S[QB * KB], dP[QB * KB];
  for (int64_t k0 = 0; k0 < j.Lk; k0 += KB) {
    const int kn = (int)std::min<int64_t>(KB, j.Lk - k0);
    const int groups = (kn + KG - 1) / KG, nv = (kn + W - 1) / W;
    pack_panels(j, j.k, b, h, k0, kn, kpan);
    pack_panels(j, j.v, b, h, k0, kn, vpan);
    std::memset(krow, 0, sizeof(float) * (KB * ld + 2 * D4 * KB));  // krow, dkT, dvT
    for (int key = 0; key < kn; ++key)
      std::memcpy(krow + key * ld, j.k + ((b * j.Lk + k0 + key) * j.H + h) * D, sizeof(float) * D);
    for (int64_t q0 = 0; q0 < j.Lq; q0 += QB) {
      const int rows = (int)std::min<int64_t>(QB, j.Lq - q0);
      const int rows_r = (rows + R - 1) / R * R;
      for (int g = 0; g < groups; ++g)
        for (int r = 0; r < rows_r; r += R) {
          logits(qrow + (q0 + r) * MAX_D, D, kpan + g * NP * D * W, S + r * KB + KG * g);
          logits(grow + (q0 + r) * MAX_D, D, vpan + g * NP * D * W, dP + r * KB + KG * g);
        }
      for (int r = 0; r < QB; ++r) {
        float* s = S + r * KB;
        float* dp = dP + r * KB;
        if (r >= rows) {  // padding queries: no contribution
          std::memset(s, 0, sizeof(float) * nv * W);
          std::memset(dp, 0, sizeof(float) * nv * W);
          continue;
        }
        const vf m = splat(lse[q0 + r]), dl = splat(delta[q0 + r]);
        for (int t = 0; t < nv; ++t) {
          const vf p = exp_neg(load(s + W * t) - m);
          store(s + W * t, p);
          store(dp + W * t, p * (load(dp + W * t) - dl));
        }
        for (int i = kn; i < nv * W; ++i) s[i] = dp[i] = 0.0f;  // padding keys
      }
      // S now holds P and dP holds dS, [QB][KB] each.
      const int n = (rows + 3) / 4 * 4;  // zero rows beyond `rows`
      acc_product(gT + q0, Lq_pad, (int)D4, n, S, KB, dvT, KB, nv);   // dv^T += g^T P
      acc_product(qT + q0, Lq_pad, (int)D4, n, dP, KB, dkT, KB, nv);  // dk^T += q^T dS
      acc_product(dP, KB, n, nv * W, krow, ld, dq + q0 * ld, ld, DV);  // dq += dS k
    }
    for (int key = 0; key < kn; ++key) {
      const int64_t at = ((b * j.Lk + k0 + key) * j.H + h) * D;
      for (int64_t d = 0; d < D; ++d) {
        j.dk[at + d] = dkT[d * KB + key];
        j.dv[at + d] = dvT[d * KB + key];
      }
    }
  }
  for (int64_t i = 0; i < j.Lq; ++i)
    std::memcpy(j.dq + ((b * j.Lq + i) * j.H + h) * D, dq + i * ld, sizeof(float) * D);
}

inline void bwd_part(void* arg, int) {
  BwdJob& j = *static_cast<BwdJob*>(arg);
  for (int64_t t; (t = j.next.fetch_add(1)) < j.B * j.H;) bwd_task(j, t);
}

void run_backward(int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D, const float* q, const float* k,
                  const float* v, const float* o, const float* lse, const float* g, float* dq, float* dk,
                  float* dv) {
  BwdJob j;
  j.B = B; j.Lq = Lq; j.Lk = Lk; j.H = H; j.D = D; j.DV = (D + W - 1) / W;
  j.q = q; j.k = k; j.v = v; j.o = o; j.lse = lse; j.g = g;
  j.dq = dq; j.dk = dk; j.dv = dv;
  san_parallel_run(B * H, bwd_part, &j);
}

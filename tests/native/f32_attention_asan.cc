// tests/test_f32_attention.py builds this with -fsanitize=address,undefined against csrc/ and runs it: the
// fused float32 attention on edge geometries (one key, one query, odd and maximal head dims, key counts off
// the block sizes) must read and write nothing out of bounds, and equal a float64 reference within 1e-3.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "bf16_gemm.h"

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  const int shapes[][5] = {{1, 1, 1, 1, 1},   {2, 37, 50, 3, 40}, {1, 17, 300, 2, 64}, {1, 130, 129, 1, 33},
                           {1, 20, 16, 2, 128}, {3, 5, 97, 2, 7},   {1, 65, 65, 2, 32},  {2, 1, 200, 3, 127}};
  double worst = 0;
  for (const auto& s : shapes) {
    const int B = s[0], Lq = s[1], Lk = s[2], H = s[3], D = s[4];
    // Exactly sized buffers: any read or write past them is an AddressSanitizer error.
    std::vector<float> q(B * Lq * H * D), k(B * Lk * H * D), v(B * Lk * H * D), o(B * Lq * H * D), lse(B * H * Lq);
    for (auto* a : {&q, &k, &v})
      for (auto& x : *a) x = normal(rng);
    if (san_f32_attention(B, Lq, Lk, H, D, q.data(), k.data(), v.data(), o.data(), lse.data()) != 0) {
      std::printf("san_f32_attention refused B=%d Lq=%d Lk=%d H=%d D=%d\n", B, Lq, Lk, H, D);
      return 1;
    }
    auto at = [&](int b, int l, int L, int h) { return ((b * L + l) * H + h) * D; };
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < Lq; ++i) {
          std::vector<double> p(Lk);
          double m = -1e300, l = 0;
          for (int j = 0; j < Lk; ++j) {
            double acc = 0;
            for (int d = 0; d < D; ++d) acc += (double)q[at(b, i, Lq, h) + d] * k[at(b, j, Lk, h) + d];
            p[j] = acc;
            m = std::max(m, acc);
          }
          for (auto& x : p) l += (x = std::exp(x - m));
          for (int d = 0; d < D; ++d) {
            double acc = 0;
            for (int j = 0; j < Lk; ++j) acc += p[j] * v[at(b, j, Lk, h) + d];
            worst = std::max(worst, std::fabs(acc / l - o[at(b, i, Lq, h) + d]));
          }
          worst = std::max(worst, std::fabs(m + std::log(l) - lse[(b * H + h) * Lq + i]));
        }
  }
  std::printf("worst abs err %.3g\n", worst);
  return worst < 1e-3 ? 0 : 1;
}

// tests/test_f32_attention.py builds this with -fsanitize=address,undefined against csrc/ and runs it: the
// fused float32 attention and its backward on edge geometries (one key, one query, odd and maximal head dims,
// key and query counts off the block and tile sizes) must read and write nothing out of bounds, and equal a
// float64 reference within 1e-3 (the gradients: 1e-3 of the array's largest magnitude, at least 1).
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
                           {1, 20, 16, 2, 128}, {3, 5, 97, 2, 7},   {1, 65, 65, 2, 32},  {2, 1, 200, 3, 127},
                           {1, 70, 300, 2, 9}};
  double worst = 0, worst_grad = 0;
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
    std::vector<float> g(o.size()), dq(q.size()), dk(k.size()), dv(v.size());
    for (auto& x : g) x = normal(rng);
    if (san_f32_attention_bwd(B, Lq, Lk, H, D, q.data(), k.data(), v.data(), o.data(), lse.data(), g.data(),
                              dq.data(), dk.data(), dv.data()) != 0) {
      std::printf("san_f32_attention_bwd refused B=%d Lq=%d Lk=%d H=%d D=%d\n", B, Lq, Lk, H, D);
      return 1;
    }
    auto at = [&](int b, int l, int L, int h) { return ((b * L + l) * H + h) * D; };
    // float64 gradients of sum(out * g): P = softmax(q k^T), dv = P^T g, dS = P (g v^T - rowsum(P g v^T)),
    // dq = dS k, dk = dS^T q.
    std::vector<double> rdq(q.size()), rdk(k.size()), rdv(v.size());
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < Lq; ++i) {
          std::vector<double> p(Lk), dp(Lk);
          double m = -1e300, l = 0, delta = 0;
          for (int j = 0; j < Lk; ++j) {
            double s = 0, t = 0;
            for (int d = 0; d < D; ++d) {
              s += (double)q[at(b, i, Lq, h) + d] * k[at(b, j, Lk, h) + d];
              t += (double)g[at(b, i, Lq, h) + d] * v[at(b, j, Lk, h) + d];
            }
            p[j] = s;
            dp[j] = t;
            m = std::max(m, s);
          }
          for (auto& x : p) l += (x = std::exp(x - m));
          for (int j = 0; j < Lk; ++j) delta += (p[j] /= l) * dp[j];
          for (int j = 0; j < Lk; ++j) {
            const double ds = p[j] * (dp[j] - delta);
            for (int d = 0; d < D; ++d) {
              rdv[at(b, j, Lk, h) + d] += p[j] * g[at(b, i, Lq, h) + d];
              rdq[at(b, i, Lq, h) + d] += ds * k[at(b, j, Lk, h) + d];
              rdk[at(b, j, Lk, h) + d] += ds * q[at(b, i, Lq, h) + d];
            }
          }
        }
    const std::vector<float>* got[] = {&dq, &dk, &dv};
    const std::vector<double>* want[] = {&rdq, &rdk, &rdv};
    for (int a = 0; a < 3; ++a) {
      double scale = 1, err = 0;
      for (double x : *want[a]) scale = std::max(scale, std::fabs(x));
      for (size_t i = 0; i < want[a]->size(); ++i) err = std::max(err, std::fabs((*got[a])[i] - (*want[a])[i]));
      worst_grad = std::max(worst_grad, err / scale);
    }

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
  std::printf("worst abs err %.3g, gradients %.3g of their largest magnitude\n", worst, worst_grad);
  return worst < 1e-3 && worst_grad < 1e-3 ? 0 : 1;
}

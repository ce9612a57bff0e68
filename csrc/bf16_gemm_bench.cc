// Test + benchmark for csrc/bf16_gemm.cc.
//   g++ -O3 -std=c++17 csrc/bf16_gemm_bench.cc csrc/bf16_gemm.cc -o /tmp/bf16_bench -lpthread
//   /tmp/bf16_bench            correctness, then the GFLOP/s table
//   /tmp/bf16_bench check      correctness only
//   /tmp/bf16_bench bench      table only
//   /tmp/bf16_bench M N K ta tb [threads]   one shape (GFLOP/s, 1 and 2 threads unless given)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bf16_gemm.h"

namespace {

uint16_t f2bf(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}
double bf2d(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::vector<uint16_t> random_bf16(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = f2bf(d(rng));
  return v;
}

// Logical A [M, K] and B [K, N] (row-major) -> stored form for the given trans flag.
std::vector<uint16_t> transpose(const std::vector<uint16_t>& x, int64_t rows, int64_t cols) {
  std::vector<uint16_t> y(x.size());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) y[j * rows + i] = x[i * cols + j];
  return y;
}

bool check_shape(int64_t M, int64_t N, int64_t K, std::mt19937& rng) {
  auto A = random_bf16(M * K, rng);  // logical [M, K]
  auto B = random_bf16(K * N, rng);  // logical [K, N]
  auto At = transpose(A, M, K);      // [K, M]
  auto Bt = transpose(B, K, N);      // [N, K]
  std::vector<double> ref(M * N, 0.0), mag(M * N, 0.0);
  {
    std::vector<double> Ad(M * K), Bd(K * N);
    for (size_t i = 0; i < Ad.size(); ++i) Ad[i] = bf2d(A[i]);
    for (size_t i = 0; i < Bd.size(); ++i) Bd[i] = bf2d(B[i]);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        const double a = Ad[m * K + k];
        const double* b = &Bd[k * N];
        double* r = &ref[m * N];
        double* g = &mag[m * N];
        for (int64_t n = 0; n < N; ++n) {
          r[n] += a * b[n];
          g[n] += std::fabs(a * b[n]);
        }
      }
  }
  bool all_ok = true;
  const double eps = std::ldexp(1.0, -22);
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (int threads : {1, 2, 0}) {
        std::vector<float> C(M * N, std::nanf(""));
        san_bf16_gemm(M, N, K, ta ? At.data() : A.data(), ta, tb ? Bt.data() : B.data(), tb, C.data(), threads);
        double worst = 0.0;  // max of err / bound
        bool ok = true;
        for (int64_t i = 0; i < M * N; ++i) {
          const double err = std::fabs((double)C[i] - ref[i]);
          const double bound = std::max<int64_t>(K, 1) * eps * mag[i] + 1e-30;
          if (!(err <= bound)) ok = false;  // also catches NaN (C never written)
          worst = std::max(worst, err / bound);
        }
        if (!ok || threads == 1)
          std::printf("  %-5s %5lld x %5lld x %5lld  ta=%d tb=%d threads=%d  max err/bound %.3g\n",
                      ok ? "PASS" : "FAIL", (long long)M, (long long)N, (long long)K, ta, tb, threads, worst);
        all_ok &= ok;
      }
  return all_ok;
}

double bench(int64_t M, int64_t N, int64_t K, int ta, int tb, int threads) {
  static std::mt19937 rng(7);
  auto A = random_bf16(M * K, rng);
  auto B = random_bf16(K * N, rng);
  std::vector<float> C(M * N);
  const double flops = 2.0 * M * N * K;
  // Warm-up, then enough inner repetitions per sample that one sample is >= ~20 ms.
  san_bf16_gemm(M, N, K, A.data(), ta, B.data(), tb, C.data(), threads);
  auto t0 = std::chrono::steady_clock::now();
  san_bf16_gemm(M, N, K, A.data(), ta, B.data(), tb, C.data(), threads);
  double one = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int reps = std::max(1, (int)(0.02 / std::max(one, 1e-7)));
  std::vector<double> samples;
  for (int s = 0; s < 7; ++s) {
    auto t1 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) san_bf16_gemm(M, N, K, A.data(), ta, B.data(), tb, C.data(), threads);
    samples.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count() / reps);
  }
  std::sort(samples.begin(), samples.end());
  return flops / samples[3] / 1e9;
}

struct Shape {
  int64_t M, N, K;
  int ta, tb;
  const char* what;
};

}  // namespace

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "all";
  if (!san_bf16_gemm_supported()) {
    std::printf("CPU lacks AVX512-BF16: san_bf16_gemm_supported() = 0\n");
    return 2;
  }
  if (argc >= 6) {
    const int64_t M = atoll(argv[1]), N = atoll(argv[2]), K = atoll(argv[3]);
    const int ta = atoi(argv[4]), tb = atoi(argv[5]);
    for (int t : argc > 6 ? std::vector<int>{atoi(argv[6])} : std::vector<int>{1, 2})
      std::printf("%lld x %lld x %lld ta=%d tb=%d threads=%d: %.1f GFLOP/s\n", (long long)M, (long long)N,
                  (long long)K, ta, tb, t, bench(M, N, K, ta, tb, t));
    return 0;
  }
  int rc = 0;
  if (mode == "all" || mode == "check") {
    std::printf("Correctness vs double reference (bound: K * 2^-22 * sum|a||b|; threads 1, 2, all):\n");
    std::mt19937 rng(1234);
    const int64_t shapes[][3] = {{1, 1, 1},     {5, 7, 0},       {1, 1, 2},       {3, 5, 7},
                                 {37, 53, 71},  {14, 32, 256},   {15, 33, 257},   {13, 31, 513},
                                 {100, 100, 777}, {1, 2048, 240}, {2048, 1, 240},  {50, 2100, 301},
                                 {400, 70, 33}, {9, 49, 1}, {8, 48, 2}, {20, 100, 2501}, {1700, 720, 240}, {240, 720, 1700}, {1700, 240, 720}};
    bool ok = true;
    for (auto& s : shapes) ok &= check_shape(s[0], s[1], s[2], rng);
    {  // Two concurrent callers (one gets the pool, the other runs serially): both must be right.
      const int64_t M = 700, N = 500, K = 300;
      auto A = random_bf16(M * K, rng), B = random_bf16(K * N, rng);
      std::vector<float> C0(M * N), C1(M * N), C2(M * N);
      san_bf16_gemm(M, N, K, A.data(), 0, B.data(), 0, C0.data(), 1);
      bool same = true;
      for (int rep = 0; rep < 20; ++rep) {
        std::thread th([&] { san_bf16_gemm(M, N, K, A.data(), 0, B.data(), 0, C1.data(), 0); });
        san_bf16_gemm(M, N, K, A.data(), 0, B.data(), 0, C2.data(), 0);
        th.join();
        same &= std::memcmp(C0.data(), C1.data(), 4 * M * N) == 0 && std::memcmp(C0.data(), C2.data(), 4 * M * N) == 0;
      }
      std::printf("  %-5s concurrent calls from 2 threads (700 x 500 x 300, 20 times)\n", same ? "PASS" : "FAIL");
      ok &= same;
    }
    std::printf("Correctness: %s\n", ok ? "PASS" : "FAIL");
    if (!ok) rc = 1;
  }
  if (mode == "all" || mode == "bench") {
    std::vector<Shape> shapes = {
        {2048, 2048, 2048, 0, 0, "square"}, {2048, 2048, 2048, 1, 0, "square"},
        {2048, 2048, 2048, 0, 1, "square"}, {2048, 2048, 2048, 1, 1, "square"},
    };
    const int64_t fwd[][3] = {{1700, 720, 240}, {1700, 240, 240}, {1700, 960, 240}, {1700, 240, 960},
                              {400, 2304, 768}, {400, 768, 768},  {400, 3072, 768}, {400, 768, 3072}};
    for (auto& f : fwd) shapes.push_back({f[0], f[1], f[2], 0, 0, "fwd X@W"});
    for (auto& f : fwd) shapes.push_back({f[2], f[1], f[0], 1, 0, "dW = X^T@G"});
    for (auto& f : fwd) shapes.push_back({f[0], f[2], f[1], 0, 1, "dX = G@W^T"});
    std::printf("\n%-12s %6s %6s %6s %3s %3s %10s %10s\n", "kind", "M", "N", "K", "ta", "tb", "1 thr", "2 thr");
    for (auto& s : shapes) {
      const double g1 = bench(s.M, s.N, s.K, s.ta, s.tb, 1);
      const double g2 = bench(s.M, s.N, s.K, s.ta, s.tb, 2);
      std::printf("%-12s %6lld %6lld %6lld %3d %3d %10.1f %10.1f\n", s.what, (long long)s.M, (long long)s.N,
                  (long long)s.K, s.ta, s.tb, g1, g2);
      std::fflush(stdout);
    }
  }
  return rc;
}

// bf16 x bf16 -> f32 GEMM for x86-64 with AVX512-BF16 (VDPBF16PS). Interface: bf16_gemm.h.
//
// Structure (Goto / BLIS):
//   for jc in N step NC                       (B block KC x NC lives in L3)
//     for pc in K step KC                     pack B[pc:pc+KC, jc:jc+NC] into NR-wide VNNI panels
//       for ic in M step MC                   pack A[ic:ic+MC, pc:pc+KC] into MR-high panels (A block in L2)
//         for jr in NC step NR                (B micro-panel KC x NR, from L1/L2)
//           for ir in MC step MR              micro-kernel: C[MR x NR] (+)= Ap * Bp
// Packed layouts (uint32 = a pair of bf16 for k = 2p, 2p + 1, the lower k in the low half):
//   B panel: [KC/2][NR] uint32   -> one 512-bit load gives 16 columns x 2 k
//   A panel: [KC/2][MR] uint32   -> one 32-bit vpbroadcastd from memory per row
// Odd K is padded with a zero k, ragged M / N edges with zero rows / columns in the packed panels; the
// micro-kernel always computes a full MR x NR tile and writes back only the valid part (masked stores).
// Packing handles both storage orders (trans_a / trans_b), so there is a single micro-kernel.
//
// Threads: a persistent pool (created on first use, never destroyed); workers sleep on a condition variable
// between calls (no spinning after a call returns; inside a call the caller, once its own part is done,
// spins at most 100 us for the others before blocking). Problems under ~16 MFLOP stay on the calling
// thread. Results are bit-identical for any thread count (the K order never depends on the split).
// The M x N problem is split into Tm x Tn rectangles, one per thread, each computed independently with
// thread-private, 64-byte aligned packing buffers. A second concurrent caller (pool busy) simply runs
// single-threaded on its own thread.
#include "bf16_gemm.h"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cpuid.h>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define SAN_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

// ---------------------------------------------------------------------------------------------------------
// Block sizes.
// Micro-kernel MR x NR = 8 x 48: 24 zmm accumulators + 3 zmm for B (A is vpbroadcastd from memory); per
// k-pair 3 vector loads + 8 broadcasts feed 24 VDPBF16PS. VDPBF16PS on Zen 5: 2 / cycle, ~6 cycle latency,
// so >= 12 independent accumulators are needed. Measured (1 thread, best-of, noisy box): 8x48 ~5-10%
// ahead of 9x48, 6x64, 12x32 and 14x32 (14x32 suffered most: 14 C rows at a 2^k stride alias one L1 set).
// NR = 48 also divides the model's N (240, 720, 960, 768, 2304, 3072) exactly.
#ifndef SAN_MR
#define SAN_MR 8
#define SAN_NV 3
#endif
constexpr int MR = SAN_MR;
constexpr int NV = SAN_NV;     // zmm per row
constexpr int NR = 16 * NV;    // 48 columns
// KC = 1024 (512 k-pairs): large, because every extra K block re-reads and re-writes the C tile, which
// cost far more than the B micro-panel (96 KiB) no longer fitting L1: it streams from L2 (1 MiB / core)
// at 144 B per 12 cycles, well within L2 bandwidth. KC 256 / 512 measured 5-20% slower on 2048^3.
// MC = 144 = 18 * MR: A block 144 x 1024 bf16 = 288 KiB in L2 with the current B micro-panel.
// NC = 2048: B block 1024 x 2048 bf16 = 4 MiB in L3 (32 MiB); a large NC amortises packing A.
// All three are upper bounds: each dimension is split into equal blocks (see gemm_single).
constexpr int KC = 1024;
constexpr int MC = 144;
constexpr int NC = 2048;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------------------
// CPU feature check.
bool cpu_supported() {
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d) || a < 7) return false;
  __get_cpuid(1, &a, &b, &c, &d);
  if (!(c & (1u << 27))) return false;  // OSXSAVE
  unsigned xlo, xhi;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  if ((xlo & 0xE6) != 0xE6) return false;  // XMM, YMM, opmask, ZMM_Hi256, Hi16_ZMM saved by the OS
  __cpuid_count(7, 0, a, b, c, d);
  const bool f = b & (1u << 16), bw = b & (1u << 30), vl = b & (1u << 31);
  if (!(f && bw && vl)) return false;
  __cpuid_count(7, 1, a, b, c, d);
  return a & (1u << 5);  // AVX512_BF16
}

// ---------------------------------------------------------------------------------------------------------
// Micro-kernel: C[mr x nr] (+)= sum_p Ap[p][0..MR) (x) Bp[p][0..NR), kp k-pairs.
SAN_TGT __attribute__((noinline)) void micro_kernel(int64_t kp, const uint32_t* __restrict Ap,
                                                     const uint32_t* __restrict Bp, float* __restrict C,
                                                     int64_t ldc, int mr, int nr, bool accumulate) {
  // Pull the C tile towards L1 while the k loop runs (it is read-modify-written at the end).
  for (int i = 0; i < mr; ++i) {
    __builtin_prefetch(C + i * ldc, 1, 3);
    if (NR > 16) __builtin_prefetch(C + i * ldc + 16, 1, 3);
    if (NR > 32) __builtin_prefetch(C + i * ldc + 32, 1, 3);
  }
  __m512 c[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[i][j] = _mm512_setzero_ps();

  for (int64_t p = 0; p < kp; ++p) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = (__m512bh)_mm512_load_si512((const void*)(Bp + 16 * j));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)Ap[i]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[i][j] = _mm512_dpbf16_ps(c[i][j], a, b[j]);
    }
    Ap += MR;
    Bp += NR;
  }

  if (mr == MR && nr == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        float* ptr = C + i * ldc + 16 * j;
        __m512 v = c[i][j];
        if (accumulate) v = _mm512_add_ps(v, _mm512_loadu_ps(ptr));
        _mm512_storeu_ps(ptr, v);
      }
  } else {
    __mmask16 mask[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const int rem = nr - 16 * j;
      mask[j] = rem >= 16 ? (__mmask16)0xFFFF : rem <= 0 ? (__mmask16)0 : (__mmask16)((1u << rem) - 1);
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      if (i >= mr) break;
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        float* ptr = C + i * ldc + 16 * j;
        __m512 v = c[i][j];
        if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask[j], ptr));
        _mm512_mask_storeu_ps(ptr, mask[j], v);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Packing. Both produce a W-wide panel dst[kp][W] (uint32 pairs), rows >= `rows` zero, odd kc zero padded.
//
// "r-contiguous" source: element (r, k) at src[k * ld + r]  (A with trans_a = 1, B with trans_b = 0).
template <int W>
SAN_TGT void pack_rcontig(const uint16_t* src, int64_t ld, int rows, int kc, uint32_t* __restrict dst) {
  const int kfull = kc / 2;
  for (int p = 0; p < kfull; ++p) {
    const uint16_t* r0 = src + (int64_t)(2 * p) * ld;
    const uint16_t* r1 = r0 + ld;
    for (int c = 0; c < W; c += 16) {
      const int nvalid = std::min(16, rows - c);
      const __mmask16 lm = nvalid >= 16 ? (__mmask16)0xFFFF : nvalid <= 0 ? 0 : (__mmask16)((1u << nvalid) - 1);
      const __m512i lo = _mm512_maskz_cvtepu16_epi32((__mmask16)0xFFFF, _mm256_maskz_loadu_epi16(lm, r0 + c));
      const __m512i hi = _mm512_maskz_cvtepu16_epi32((__mmask16)0xFFFF, _mm256_maskz_loadu_epi16(lm, r1 + c));
      const __m512i v = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      if (W - c >= 16)
        _mm512_storeu_si512((void*)(dst + c), v);
      else
        _mm512_mask_storeu_epi32(dst + c, (__mmask16)((1u << (W - c)) - 1), v);
    }
    dst += W;
  }
  if (kc & 1) {
    const uint16_t* r0 = src + (int64_t)(kc - 1) * ld;
    for (int c = 0; c < W; c += 16) {
      const int nvalid = std::min(16, rows - c);
      const __mmask16 lm = nvalid >= 16 ? (__mmask16)0xFFFF : nvalid <= 0 ? 0 : (__mmask16)((1u << nvalid) - 1);
      const __m512i v = _mm512_maskz_cvtepu16_epi32((__mmask16)0xFFFF, _mm256_maskz_loadu_epi16(lm, r0 + c));
      if (W - c >= 16)
        _mm512_storeu_si512((void*)(dst + c), v);
      else
        _mm512_mask_storeu_epi32(dst + c, (__mmask16)((1u << (W - c)) - 1), v);
    }
  }
}

// "k-contiguous" source: element (r, k) at src[r * ld + k]  (A with trans_a = 0, B with trans_b = 1).
// A transpose of 32-bit pairs: 16 rows x 16 pairs at a time through a 16x16 in-register transpose.
SAN_TGT inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // now 128-bit lane l of r[4q + s] holds rows 4q..4q+3 of column 4l + s; regroup the lanes.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);       // lanes 0,2 of r[i], 0,2 of r[i+4]
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);   // lanes 1,3
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

template <int W>
SAN_TGT void pack_kcontig(const uint16_t* src, int64_t ld, int rows, int kc, uint32_t* __restrict dst) {
  const int kfull = kc / 2;  // full pairs
  const int kp = (kc + 1) / 2;
  for (int r0 = 0; r0 < W; r0 += 16) {
    const int rn = std::min(16, W - r0);             // rows of this group inside the panel
    const int rv = std::max(0, std::min(rn, rows - r0));  // valid source rows
    const __mmask16 smask = rn >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rn) - 1);
    int p = 0;
    if (rv == 16 || (rv > 0 && rn == rv)) {
      // Full group: 16 x 16 pair tiles through registers.
      for (; p + 16 <= kfull; p += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = i < rv ? _mm512_loadu_si512((const void*)(src + (int64_t)(r0 + i) * ld + 2 * p))
                        : _mm512_setzero_si512();
        transpose16x16_epi32(r);
        for (int q = 0; q < 16; ++q) _mm512_mask_storeu_epi32(dst + (int64_t)(p + q) * W + r0, smask, r[q]);
      }
    }
    // Remainder pairs (and partial groups): scalar.
    for (int i = 0; i < rn; ++i) {
      uint32_t* d = dst + r0 + i;
      if (i < rv) {
        const uint16_t* s = src + (int64_t)(r0 + i) * ld;
        for (int q = p; q < kfull; ++q) {
          uint32_t v;
          std::memcpy(&v, s + 2 * q, 4);
          d[(int64_t)q * W] = v;
        }
        if (kc & 1) d[(int64_t)(kp - 1) * W] = s[kc - 1];
      } else {
        for (int q = p; q < kp; ++q) d[(int64_t)q * W] = 0;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Thread-private packing buffers (64-byte aligned, grown on demand, freed at thread exit).
struct Buffers {
  uint32_t* a = nullptr;
  size_t a_n = 0;
  uint32_t* b = nullptr;
  size_t b_n = 0;
  static uint32_t* grow(uint32_t*& p, size_t& have, size_t need) {
    if (need > have) {
      std::free(p);
      p = static_cast<uint32_t*>(std::aligned_alloc(64, ((need * 4 + 63) / 64) * 64));
      have = need;
    }
    return p;
  }
  ~Buffers() {
    std::free(a);
    std::free(b);
  }
};
thread_local Buffers tl_buf;

struct Operand {
  const uint16_t* p;
  int64_t ld;
  int trans;
};

// One thread: C[M x N] (ldc) = op(A) op(B) for the (already offset) operands.
// A: trans 0 -> (m, k) at p[m * ld + k]; trans 1 -> p[k * ld + m].
// B: trans 0 -> (k, n) at p[k * ld + n]; trans 1 -> p[n * ld + k].
SAN_TGT void gemm_single(int64_t M, int64_t N, int64_t K, Operand A, Operand B, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(float) * N);
    return;
  }
  // Balanced blocks: split each dimension into the fewest blocks of at most KC / MC / NC, of equal size
  // (rounded up to even / MR / NR), e.g. K = 1700 -> 2 x 850 rather than 1024 + 676.
  const int64_t kb = ceil_div(ceil_div(K, ceil_div(K, KC)), 2) * 2;
  const int64_t mb = ceil_div(ceil_div(M, ceil_div(M, MC)), MR) * MR;
  const int64_t nb = ceil_div(ceil_div(N, ceil_div(N, NC)), NR) * NR;
  const int64_t kp_max = kb / 2;
  uint32_t* Abuf = Buffers::grow(tl_buf.a, tl_buf.a_n, (size_t)(mb * kp_max));
  uint32_t* Bbuf = Buffers::grow(tl_buf.b, tl_buf.b_n, (size_t)(nb * kp_max));

  for (int64_t jc = 0; jc < N; jc += nb) {
    const int64_t nc = std::min<int64_t>(nb, N - jc);
    const int64_t npan = ceil_div(nc, NR);
    for (int64_t pc = 0; pc < K; pc += kb) {
      const int kc = (int)std::min<int64_t>(kb, K - pc);
      const int64_t kp = (kc + 1) / 2;
      // Pack B[pc:pc+kc, jc:jc+nc].
      for (int64_t jp = 0; jp < npan; ++jp) {
        const int cols = (int)std::min<int64_t>(NR, nc - jp * NR);
        const int64_t n0 = jc + jp * NR;
        if (B.trans == 0)
          pack_rcontig<NR>(B.p + pc * B.ld + n0, B.ld, cols, kc, Bbuf + jp * kp * NR);
        else
          pack_kcontig<NR>(B.p + n0 * B.ld + pc, B.ld, cols, kc, Bbuf + jp * kp * NR);
      }
      const bool acc = pc > 0;
      for (int64_t ic = 0; ic < M; ic += mb) {
        const int64_t mc = std::min<int64_t>(mb, M - ic);
        const int64_t mpan = ceil_div(mc, MR);
        for (int64_t ip = 0; ip < mpan; ++ip) {
          const int rows = (int)std::min<int64_t>(MR, mc - ip * MR);
          const int64_t m0 = ic + ip * MR;
          if (A.trans == 0)
            pack_kcontig<MR>(A.p + m0 * A.ld + pc, A.ld, rows, kc, Abuf + ip * kp * MR);
          else
            pack_rcontig<MR>(A.p + pc * A.ld + m0, A.ld, rows, kc, Abuf + ip * kp * MR);
        }
        for (int64_t jp = 0; jp < npan; ++jp) {
          const int nr = (int)std::min<int64_t>(NR, nc - jp * NR);
          const uint32_t* Bp = Bbuf + jp * kp * NR;
          float* Cb = C + ic * ldc + jc + jp * NR;
          for (int64_t ip = 0; ip < mpan; ++ip) {
            const int mr = (int)std::min<int64_t>(MR, mc - ip * MR);
            micro_kernel(kp, Abuf + ip * kp * MR, Bp, Cb + ip * MR * ldc, ldc, mr, nr, acc);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Persistent thread pool. Workers block on a condition variable; a call publishes a task (generation
// counter), runs part 0 itself, and waits for the others. One call at a time (try_lock); others go serial.
struct Pool {
  std::mutex call_mu;  // held for the duration of a parallel call
  std::mutex mu;
  std::condition_variable cv_work, cv_done;
  int nworkers = 0;  // threads besides the caller
  uint64_t gen = 0;
  int nparts = 0;
  int pending = 0;
  std::atomic<int> pending_atomic{0};
  void (*fn)(void*, int) = nullptr;
  void* arg = nullptr;

  void worker(int id) {  // id >= 1
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      cv_work.wait(lk, [&] { return gen != seen; });
      seen = gen;
      if (id >= nparts) continue;
      auto f = fn;
      void* a = arg;
      lk.unlock();
      f(a, id);
      lk.lock();
      pending_atomic.fetch_sub(1, std::memory_order_release);
      if (--pending == 0) cv_done.notify_one();
    }
  }
  void ensure(int n) {  // caller holds call_mu
    while (nworkers < n) {
      const int id = ++nworkers;
      std::thread([this, id] { worker(id); }).detach();
    }
  }
  void run(int parts, void (*f)(void*, int), void* a) {  // caller holds call_mu
    ensure(parts - 1);
    {
      std::lock_guard<std::mutex> lk(mu);
      fn = f;
      arg = a;
      nparts = parts;
      pending = parts - 1;
      pending_atomic.store(parts - 1, std::memory_order_relaxed);
      ++gen;
    }
    cv_work.notify_all();
    f(a, 0);
    // The other parts normally finish about when ours does: spin briefly (within this call only), then
    // block. Sleeping right away costs a futex wake-up (tens of us on a VM) on the critical path.
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
    for (int spin = 0; pending_atomic.load(std::memory_order_acquire) != 0; ++spin) {
      _mm_pause();
      if ((spin & 63) == 63 && std::chrono::steady_clock::now() > spin_until) break;
    }
    std::unique_lock<std::mutex> lk(mu);
    cv_done.wait(lk, [&] { return pending == 0; });
  }
};

std::atomic<Pool*> g_pool{nullptr};
std::mutex g_pool_init_mu;

void atfork_child() {
  // Worker threads do not survive fork(): leak the old pool, build a fresh one on next use.
  g_pool.store(nullptr);
  new (&g_pool_init_mu) std::mutex();
}

Pool* get_pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return p;
  std::lock_guard<std::mutex> lk(g_pool_init_mu);
  p = g_pool.load();
  if (!p) {
    static bool atfork_done = false;
    if (!atfork_done) {
      pthread_atfork(nullptr, nullptr, atfork_child);
      atfork_done = true;
    }
    p = new Pool();  // intentionally never deleted (detached workers)
    g_pool.store(p, std::memory_order_release);
  }
  return p;
}

int process_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned h = std::thread::hardware_concurrency();
  return h ? (int)h : 1;
}

struct Job {
  int64_t M, N, K;
  const uint16_t* A;
  int ta;
  const uint16_t* B;
  int tb;
  float* C;
  int Tm, Tn;
  int64_t mblk, nblk;  // rows / cols per part (multiples of MR / NR)
};

void job_part(void* arg, int t) {
  const Job& j = *static_cast<const Job*>(arg);
  const int ti = t / j.Tn, tj = t % j.Tn;
  const int64_t m0 = ti * j.mblk, n0 = tj * j.nblk;
  const int64_t m1 = std::min(j.M, m0 + j.mblk), n1 = std::min(j.N, n0 + j.nblk);
  if (m0 >= m1 || n0 >= n1) return;
  Operand A{j.ta ? j.A + m0 : j.A + m0 * j.K, j.ta ? j.M : j.K, j.ta};
  Operand B{j.tb ? j.B + n0 * j.K : j.B + n0, j.tb ? j.K : j.N, j.tb};
  gemm_single(m1 - m0, n1 - n0, j.K, A, B, j.C + m0 * j.N + n0, j.N);
}

}  // namespace

extern "C" {

void san_parallel_run(int64_t items, void (*fn)(void*, int), void* arg) {
  const int T = (int)std::min<int64_t>(process_cpus(), std::max<int64_t>(items, 1));
  if (T > 1) {
    Pool* pool = get_pool();
    std::unique_lock<std::mutex> lk(pool->call_mu, std::try_to_lock);
    if (lk.owns_lock()) {
      pool->run(T, fn, arg);
      return;
    }
  }
  fn(arg, 0);
}

int san_bf16_gemm_supported() {
  static const int ok = cpu_supported() ? 1 : 0;
  return ok;
}

void san_bf16_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int trans_a, const uint16_t* B,
                   int trans_b, float* C, int num_threads) {
  if (M <= 0 || N <= 0) return;
  trans_a = trans_a ? 1 : 0;
  trans_b = trans_b ? 1 : 0;
  if (!san_bf16_gemm_supported()) {  // never SIGILL: slow scalar fallback (callers should check first)
    auto f = [](uint16_t b) { uint32_t u = (uint32_t)b << 16; float x; std::memcpy(&x, &u, 4); return x; };
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k)
          acc += f(trans_a ? A[k * M + m] : A[m * K + k]) * f(trans_b ? B[n * K + k] : B[k * N + n]);
        C[m * N + n] = acc;
      }
    return;
  }
  Job job{M, N, K, A, trans_a, B, trans_b, C, 1, 1, M, N};
  const double flops = 2.0 * M * N * (double)std::max<int64_t>(K, 1);
  int T = num_threads > 0 ? num_threads : process_cpus();
  // One thread per >= 8 MFLOP: waking a sleeping worker costs ~10-30 us on this VM; measured crossover
  // (1 vs 2 threads) is around 200^3 = 16 MFLOP.
  T = (int)std::min<double>(T, std::max(1.0, flops / 8e6));
  T = std::min(T, 256);
  if (T > 1) {
    // Split into Tm x Tn rectangles minimising the slowest thread's estimated cost:
    // micro-kernel work (padded to MR x NR tiles) + packing (each thread packs its columns of B once and
    // its rows of A once per NC block of its columns). Splitting M duplicates B packing, splitting N A's.
    const int64_t mt = ceil_div(M, MR), nt = ceil_div(N, NR);
    double best = 1e300;
    for (int tm = 1; tm <= T; ++tm) {
      if (T % tm) continue;
      const int tn = T / tm;
      if (tm > mt || tn > nt) continue;
      const int64_t mb = ceil_div(mt, tm) * MR, nb = ceil_div(nt, tn) * NR;
      const double work = (double)mb * nb * K / 64.0;                                  // ~cycles
      const double pack = (double)K * (mb * (double)ceil_div(nb, NC) + nb) * 1.0;     // ~1 cycle / elem
      const double cost = work + pack;
      if (cost < best) {
        best = cost;
        job.Tm = tm;
        job.Tn = tn;
        job.mblk = mb;
        job.nblk = nb;
      }
    }
    if (job.Tm * job.Tn == 1) T = 1;
  }
  if (T > 1) {
    Pool* pool = get_pool();
    std::unique_lock<std::mutex> lk(pool->call_mu, std::try_to_lock);
    if (lk.owns_lock()) {
      pool->run(job.Tm * job.Tn, job_part, &job);
      return;
    }
    // Pool busy (concurrent call from another thread): run this one serially.
  }
  Operand a{A, trans_a ? M : K, trans_a};
  Operand b{B, trans_b ? K : N, trans_b};
  gemm_single(M, N, K, a, b, C, N);
}

}  // extern "C"

// san-jax's native CPU kernels (libsan_native.so): the bf16 x bf16 -> f32 GEMM on AVX512-BF16 (VDPBF16PS,
// bf16_gemm.cc), the fused bf16 attention (bf16_attention.cc) and the fused float32 attention
// (f32_attention.cc), and the matcher's minimum-cost assignment (hungarian.cc).
#pragma once
#include <cstdint>
extern "C" {
// 1 when this CPU can run the kernel (AVX512F + AVX512BW + AVX512VL + AVX512_BF16, checked at run time with
// __builtin_cpu_supports / cpuid, and the OS saves ZMM state), else 0.
int san_bf16_gemm_supported();
// C[M, N] = op(A)[M, K] @ op(B)[K, N]; all row-major and contiguous; bf16 passed as its raw uint16 bits;
// C (float32) is overwritten, never read. trans_a = 0: A is stored [M, K]; 1: A is stored [K, M].
// trans_b = 0: B is stored [K, N]; 1: B is stored [N, K]. Products summed in float32 (VDPBF16PS).
// num_threads <= 0 means: all the process's CPUs (std::thread::hardware_concurrency or sched_getaffinity).
// Any M, N, K >= 0 (K = 0 writes zeros; odd K, ragged M/N edges must be right).
// Runs fn(arg, part) for part = 0 .. min(items, the process's CPUs) - 1 on the GEMM's persistent thread
// pool (the caller runs part 0); each part takes work items from a counter in arg. Serial when the pool is
// busy with another call.
void san_parallel_run(int64_t items, void (*fn)(void*, int), void* arg);
// Fused attention (bf16_attention.cc): q [B, Lq, H, D] (already scaled), k, v [B, Lk, H, D] -> out
// [B, Lq, H, D] bf16 and lse [B, H, Lq] f32 (log-sum-exp of each query's logits). D <= 128.
// Returns 0, or 1 for an unsupported shape, 2 for a CPU without AVX512-BF16.
int san_bf16_attention(int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D, const uint16_t* q,
                       const uint16_t* k, const uint16_t* v, uint16_t* out, float* lse);
// Fused attention in float32 (f32_attention.cc), same layout as san_bf16_attention, on AVX2 + FMA or
// AVX-512F. Returns 0, or 1 for an unsupported shape, 2 for a CPU without AVX2 + FMA.
int san_f32_attention(int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D, const float* q, const float* k,
                      const float* v, float* out, float* lse);
// Its backward (f32_attention_bwd_impl.h): from san_f32_attention's q, k, v, out, lse and the cotangent g of
// out ([B, Lq, H, D]), dq [B, Lq, H, D], dk and dv [B, Lk, H, D] (overwritten). Same return codes.
int san_f32_attention_bwd(int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D, const float* q,
                          const float* k, const float* v, const float* out, const float* lse, const float* g,
                          float* dq, float* dk, float* dv);
// Which kernel san_f32_attention runs: 2 AVX-512F, 1 AVX2 + FMA, 0 none (checked at run time).
int san_f32_attention_isa();
// scipy.optimize.linear_sum_assignment of each of `batch` float32 [rows, cols] matrices (row-major,
// contiguous) restricted to its first counts[b] columns (clamped to [0, cols]): rows_out, cols_out
// [batch, min(rows, cols)] int32 get the min(rows, counts[b]) pairs by ascending row, then zeros. NaN and
// +-inf costs count as 0 and +-1e30 (as the Python path's np.nan_to_num). Returns 0, 1 for a negative size,
// 2 if no assignment is finite (cannot happen after that replacement).
int san_linear_sum_assignment(int64_t batch, int64_t rows, int64_t cols, const float* cost,
                              const int32_t* counts, int32_t* rows_out, int32_t* cols_out);
void san_bf16_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int trans_a,
                   const uint16_t* B, int trans_b, float* C, int num_threads);
}

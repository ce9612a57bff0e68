// bf16 x bf16 -> f32 GEMM on AVX512-BF16 (VDPBF16PS); implementation in bf16_gemm.cc.
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
void san_bf16_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int trans_a,
                   const uint16_t* B, int trans_b, float* C, int num_threads);
}

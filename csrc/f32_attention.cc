// Fused softmax attention in float32 on AVX2 + FMA or AVX-512F: the [Lq, Lk] logits never exist whole. Each
// task takes 16 queries of one (batch, head) through all keys, a block at a time, with an online (running
// max) softmax, as flash attention does; k is packed once per (batch, head) as panels of W keys, v as rows
// padded to whole vectors.
//
// Layout: q [B, Lq, H, D] (already scaled: the caller multiplies by D^-1/2, as the unfused path does), k and
// v [B, Lk, H, D], out [B, Lq, H, D], lse [B, H, Lq] (the log-sum-exp of each query's logits).
//
// Why: XLA:CPU computes float32 attention as a dot, a softmax over the materialised [H, Lq, Lk] logits and a
// second dot; at the side ViT's ~1,700 tokens the logits are 6 x 1,700 x 1,700 floats (69 MB) per block,
// written and read several times. Here they live 16 x KB at a time in L1.
//
// Numerics against the unfused float32 path: the same products summed in another order, exp by a polynomial
// within ~1e-7 relative, one division by the row sum at the end; within float32 rounding of each other
// (tests/test_gemm.py derives the bound).
//
// The backward (f32_attention_bwd_impl.h) recomputes each block's probabilities from lse and gives dq, dk, dv.
//
// The kernel is written once (f32_attention_impl.h, GCC vector extensions) and compiled twice, for 8-float
// (AVX2) and 16-float (AVX-512F) vectors; the CPU is checked at run time, so the library loads anywhere.
#include <cpuid.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_gemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace san_avx2 {
#define SAN_W 8
#define SAN_R 4
#define SAN_NP 2
#define SAN_QT 16
#define SAN_ACC 12
#include "f32_attention_impl.h"
#include "f32_attention_bwd_impl.h"
#undef SAN_W
#undef SAN_R
#undef SAN_NP
#undef SAN_ACC
#undef SAN_QT
}  // namespace san_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace san_avx512 {
#define SAN_W 16
#define SAN_R 8
#define SAN_NP 2
#define SAN_QT 16
#define SAN_ACC 24
#include "f32_attention_impl.h"
#include "f32_attention_bwd_impl.h"
#undef SAN_W
#undef SAN_R
#undef SAN_NP
#undef SAN_ACC
#undef SAN_QT
}  // namespace san_avx512
#pragma GCC pop_options

namespace {

// 2: AVX-512F, 1: AVX2 + FMA, 0: neither (or the OS does not save the registers).
int detect_isa() {
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d) || a < 7) return 0;
  __get_cpuid(1, &a, &b, &c, &d);
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28);
  if (!(fma && osxsave && avx)) return 0;
  unsigned xlo, xhi;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  if ((xlo & 0x6) != 0x6) return 0;  // XMM and YMM state saved by the OS
  __cpuid_count(7, 0, a, b, c, d);
  if (!(b & (1u << 5))) return 0;  // AVX2
  const bool avx512f = b & (1u << 16);
  return avx512f && (xlo & 0xE0) == 0xE0 ? 2 : 1;
}

}  // namespace

extern "C" int san_f32_attention_isa() {
  static const int isa = detect_isa();
  return isa;
}

extern "C" int san_f32_attention(int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D, const float* q,
                                 const float* k, const float* v, float* out, float* lse) {
  if (D <= 0 || D > 128 || Lk <= 0) return 1;
  if (B <= 0 || Lq <= 0 || H <= 0) return 0;
  switch (san_f32_attention_isa()) {
    case 2: san_avx512::run(B, Lq, Lk, H, D, q, k, v, out, lse); return 0;
    case 1: san_avx2::run(B, Lq, Lk, H, D, q, k, v, out, lse); return 0;
    default: return 2;
  }
}

extern "C" int san_f32_attention_bwd(int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D, const float* q,
                                     const float* k, const float* v, const float* out, const float* lse,
                                     const float* g, float* dq, float* dk, float* dv) {
  if (D <= 0 || D > 128 || Lk <= 0) return 1;
  if (B <= 0 || Lq <= 0 || H <= 0) return 0;
  switch (san_f32_attention_isa()) {
    case 2: san_avx512::run_backward(B, Lq, Lk, H, D, q, k, v, out, lse, g, dq, dk, dv); return 0;
    case 1: san_avx2::run_backward(B, Lq, Lk, H, D, q, k, v, out, lse, g, dq, dk, dv); return 0;
    default: return 2;
  }
}

// XLA FFI handler "san_bf16_gemm": C = op(A) @ op(B) in bfloat16 with float32 sums, on the CPU's AVX512-BF16
// units (csrc/bf16_gemm.cc). Registered from Python by san_jax/ops/gemm.py; built by scripts/setup.sh.
//
//   a: bf16 [M, K] (trans_a = false) or [K, M] (trans_a = true), optionally with one leading batch dim
//   b: bf16 [K, N] (trans_b = false) or [N, K] (trans_b = true), the same leading batch dim when a has one
//   c: f32  [M, N] (or [batch, M, N])
//
// XLA FFI handler "san_bf16_attention": fused softmax attention (csrc/bf16_attention.cc), registered by
// san_jax/ops/gemm.py:
//   q: bf16 [B, Lq, H, D] (already scaled), k, v: bf16 [B, Lk, H, D]
//   out: bf16 [B, Lq, H, D], lse: f32 [B, H, Lq]; D <= 128, Lk >= 1
// XLA FFI handler "san_f32_attention": the same in float32 (csrc/f32_attention.cc, AVX2 + FMA or AVX-512F):
//   q: f32 [B, Lq, H, D] (already scaled), k, v: f32 [B, Lk, H, D]; out: f32 [B, Lq, H, D], lse: f32 [B, H, Lq]
// XLA FFI handler "san_f32_attention_bwd": its backward: q, k, v, out, lse (as above), g: f32 [B, Lq, H, D];
//   dq: f32 [B, Lq, H, D], dk, dv: f32 [B, Lk, H, D]
// XLA FFI handler "san_linear_sum_assignment": the matcher's assignment (csrc/hungarian.cc):
//   cost: f32 [..., Q, T], counts: s32 [...] (valid target columns per matrix);
//   rows, cols: s32 [..., min(Q, T)] (scipy's pairs by ascending row, zero padded)
// Shapes are checked here too (Python checks them before tracing): a mismatch is an InvalidArgument error
// naming both shapes, never a read out of bounds.
#include <cstdint>
#include <string>

#include "bf16_gemm.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

std::string ShapeString(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

ffi::Error Bf16Gemm(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, ffi::ResultBuffer<ffi::F32> c,
                    bool trans_a, bool trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const size_t rank = ad.size();
  auto bad = [&](const char* why) {
    return ffi::Error::InvalidArgument(std::string("san_bf16_gemm: ") + why + ": a " + ShapeString(ad) +
                                       ", b " + ShapeString(bd) + ", c " + ShapeString(cd));
  };
  if ((rank != 2 && rank != 3) || bd.size() != rank || cd.size() != rank) return bad("ranks must be 2 or 3, equal");
  const int64_t batch = rank == 3 ? ad[0] : 1;
  if (rank == 3 && (bd[0] != batch || cd[0] != batch)) return bad("batch dims differ");
  const size_t r = rank - 2;
  const int64_t M = trans_a ? ad[r + 1] : ad[r], K = trans_a ? ad[r] : ad[r + 1];
  const int64_t N = trans_b ? bd[r] : bd[r + 1], Kb = trans_b ? bd[r + 1] : bd[r];
  if (K != Kb) return bad("contracted dims differ");
  if (cd[r] != M || cd[r + 1] != N) return bad("result shape is not [M, N]");
  if (!san_bf16_gemm_supported()) return ffi::Error::Internal("san_bf16_gemm: this CPU lacks AVX512-BF16");
  const uint16_t* pa = a.typed_data();
  const uint16_t* pb = b.typed_data();
  float* pc = c->typed_data();
  for (int64_t i = 0; i < batch; ++i) {
    san_bf16_gemm(M, N, K, pa + i * M * K, trans_a, pb + i * K * N, trans_b, pc + i * M * N, /*num_threads=*/0);
  }
  return ffi::Error::Success();
}

// The shape checks of both fused attentions: q, k, v, out [B, L, H, D], lse [B, H, Lq], D <= 128, Lk >= 1.
using Dims = ffi::Span<const int64_t>;
ffi::Error CheckAttention(const char* name, Dims qd, Dims kd, Dims vd, Dims od, Dims ld) {
  auto bad = [&](const char* why) {
    return ffi::Error::InvalidArgument(std::string(name) + ": " + why + ": q " + ShapeString(qd) +
                                       ", k " + ShapeString(kd) + ", v " + ShapeString(vd) + ", out " +
                                       ShapeString(od) + ", lse " + ShapeString(ld));
  };
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || od.size() != 4 || ld.size() != 3)
    return bad("q, k, v, out must be [B, L, H, D] and lse [B, H, Lq]");
  const int64_t B = qd[0], Lq = qd[1], H = qd[2], D = qd[3], Lk = kd[1];
  for (int i : {0, 2, 3})
    if (kd[i] != qd[i] || vd[i] != qd[i]) return bad("q, k, v differ in B, H or D");
  if (vd[1] != Lk) return bad("k and v differ in length");
  for (int i = 0; i < 4; ++i)
    if (od[i] != qd[i]) return bad("out is not q's shape");
  if (ld[0] != B || ld[1] != H || ld[2] != Lq) return bad("lse is not [B, H, Lq]");
  if (D > 128 || Lk < 1) return bad("the kernel takes head dims <= 128 and at least one key");
  return ffi::Error::Success();
}

ffi::Error Bf16Attention(ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k, ffi::Buffer<ffi::BF16> v,
                         ffi::ResultBuffer<ffi::BF16> out, ffi::ResultBuffer<ffi::F32> lse) {
  ffi::Error err = CheckAttention("san_bf16_attention", q.dimensions(), k.dimensions(), v.dimensions(),
                                  out->dimensions(), lse->dimensions());
  if (err.failure()) return err;
  auto qd = q.dimensions();
  const int rc = san_bf16_attention(qd[0], qd[1], k.dimensions()[1], qd[2], qd[3], q.typed_data(),
                                    k.typed_data(), v.typed_data(), out->typed_data(), lse->typed_data());
  if (rc == 2) return ffi::Error::Internal("san_bf16_attention: this CPU lacks AVX512-BF16");
  if (rc != 0) return ffi::Error::InvalidArgument("san_bf16_attention: unsupported shape");
  return ffi::Error::Success();
}

ffi::Error F32Attention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  ffi::Error err = CheckAttention("san_f32_attention", q.dimensions(), k.dimensions(), v.dimensions(),
                                  out->dimensions(), lse->dimensions());
  if (err.failure()) return err;
  auto qd = q.dimensions();
  const int rc = san_f32_attention(qd[0], qd[1], k.dimensions()[1], qd[2], qd[3], q.typed_data(),
                                   k.typed_data(), v.typed_data(), out->typed_data(), lse->typed_data());
  if (rc == 2) return ffi::Error::Internal("san_f32_attention: this CPU lacks AVX2 + FMA");
  if (rc != 0) return ffi::Error::InvalidArgument("san_f32_attention: unsupported shape");
  return ffi::Error::Success();
}

ffi::Error F32AttentionBwd(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                           ffi::ResultBuffer<ffi::F32> dv) {
  ffi::Error err = CheckAttention("san_f32_attention_bwd", q.dimensions(), k.dimensions(), v.dimensions(),
                                  out.dimensions(), lse.dimensions());
  if (err.failure()) return err;
  if (!(g.dimensions() == q.dimensions() && dq->dimensions() == q.dimensions() &&
        dk->dimensions() == k.dimensions() && dv->dimensions() == v.dimensions()))
    return ffi::Error::InvalidArgument("san_f32_attention_bwd: g and dq must be q's shape " +
                                       ShapeString(q.dimensions()) + ", dk and dv k's " +
                                       ShapeString(k.dimensions()) + "; got g " + ShapeString(g.dimensions()) +
                                       ", dq " + ShapeString(dq->dimensions()) + ", dk " +
                                       ShapeString(dk->dimensions()) + ", dv " + ShapeString(dv->dimensions()));
  auto qd = q.dimensions();
  const int rc = san_f32_attention_bwd(qd[0], qd[1], k.dimensions()[1], qd[2], qd[3], q.typed_data(),
                                       k.typed_data(), v.typed_data(), out.typed_data(), lse.typed_data(),
                                       g.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data());
  if (rc == 2) return ffi::Error::Internal("san_f32_attention_bwd: this CPU lacks AVX2 + FMA");
  if (rc != 0) return ffi::Error::InvalidArgument("san_f32_attention_bwd: unsupported shape");
  return ffi::Error::Success();
}

ffi::Error LinearSumAssignment(ffi::Buffer<ffi::F32> cost, ffi::Buffer<ffi::S32> counts,
                               ffi::ResultBuffer<ffi::S32> rows, ffi::ResultBuffer<ffi::S32> cols) {
  auto cd = cost.dimensions(), nd = counts.dimensions(), rd = rows->dimensions(), td = cols->dimensions();
  auto bad = [&](const char* why) {
    return ffi::Error::InvalidArgument(std::string("san_linear_sum_assignment: ") + why + ": cost " +
                                       ShapeString(cd) + ", counts " + ShapeString(nd) + ", rows " +
                                       ShapeString(rd) + ", cols " + ShapeString(td));
  };
  if (cd.size() < 2) return bad("cost must be [..., Q, T]");
  const size_t lead = cd.size() - 2;
  const int64_t q = cd[lead], t = cd[lead + 1], k = q < t ? q : t;
  if (nd.size() != lead || rd.size() != lead + 1 || td.size() != lead + 1)
    return bad("counts must be cost's leading dims, rows and cols those dims + [min(Q, T)]");
  int64_t batch = 1;
  for (size_t i = 0; i < lead; ++i) {
    if (nd[i] != cd[i] || rd[i] != cd[i] || td[i] != cd[i]) return bad("leading dims differ");
    batch *= cd[i];
  }
  if (rd[lead] != k || td[lead] != k) return bad("rows and cols must end in min(Q, T)");
  const int rc = san_linear_sum_assignment(batch, q, t, cost.typed_data(), counts.typed_data(),
                                           rows->typed_data(), cols->typed_data());
  if (rc != 0) return ffi::Error::Internal("san_linear_sum_assignment: no finite assignment");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanF32AttentionBwd, F32AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanLinearSumAssignment, LinearSumAssignment,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanBf16Attention, Bf16Attention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanF32Attention, F32Attention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SanBf16Gemm, Bf16Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

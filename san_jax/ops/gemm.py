"""san-jax's native CPU kernels as XLA FFI custom calls: bfloat16 matmuls on AVX512-BF16, fused attention in
bfloat16 (AVX512-BF16) and in float32 (AVX2 + FMA or AVX-512F), and the matcher's assignment.

XLA:CPU (jaxlib 0.10.2) computes a bfloat16 dot by widening to float32: measured on a 2-core AMD EPYC with
avx512_bf16, a 2048^3 bf16 dot runs at ~260 GFLOP/s against ~390 for float32, so `compute_dtype=bfloat16`
was slower than float32, and none of XLA's CPU options (oneDNN, XNNPACK, YNNPACK fusions, the oneDNN custom
call) changed that (issue 15's note has the numbers). `csrc/bf16_gemm.cc` is a packed GEMM whose inner
loop is VDPBF16PS (two bf16 products summed into a float32 lane per instruction: twice a float32 FMA's
work), built by `scripts/setup.sh` into `san_jax/ops/_native/libsan_native.so` with the machine's g++.

`dot_general` is a drop-in for `lax.dot_general` that `layers.linear` hands to every `nnx.Linear`: a
bfloat16 x bfloat16 product of the Linear pattern (x[..., K] @ W[K, N]) becomes the custom call on a CPU,
with a custom VJP whose two gradient products are custom calls too (dx = g @ W^T, dW = x^T @ g, each
flattened to 2-D); `layers.attention` runs its two bf16 products (q k^T, weights v) through `matmul`, the
differentiable batched form. Everything else -- float32, other contractions, other platforms (the choice is made by
`lax.platform_dependent` at lowering), a CPU without AVX512-BF16, no built library, or
`SAN_JAX_NATIVE=0` -- keeps `lax.dot_general`, and the numbers only differ by summation order: both
sum exact bf16 products in float32 and round the result once.

A custom call has no sharding rule: in a program XLA partitions over a mesh, XLA would gather its operands.
`layers` therefore keeps XLA's ops while a step is traced under `layers.activation_sharding` or a program
under a multi-device mesh (the Segmenter's batch-split programs); inside shard_map the custom calls apply.

Where the custom call applies, a bf16 Linear returns the float32 sums unrounded, so on a CPU
`compute_dtype=bfloat16` means: every product's operands in bf16 (as torch's autocast rounds them), the
activations between products in float32. XLA:CPU has no bf16 arithmetic -- each bf16 elementwise op is a
float32 op between two conversions -- and measured that way ([401, 3072] bias + quick GELU after the 401 x
768 x 3072 product, 2026-12-03) the bf16 epilogue cost 1.7 ms against 0.9 ms in float32, after a 2.4 ms
product. Keeping float32 there is both faster and closer to the float32 model; `layers.attention` casts
q, k and v back to the module's dtype for its products.

`fused_attention` is the same library's fused softmax attention (csrc/bf16_attention.cc): 16 queries of one
head at a time through all keys in 128-key blocks with a running-max softmax, bf16 VDPBF16PS products
and float32 logits that never leave the tile. `layers.attention` uses it for bf16 attention without a
bias (the side ViT's and CLIP's blocks) on such a CPU for inference; under a gradient it takes the unfused
path (`layers._fused_forward`). Why: profiled on a 2-core AMD EPYC (2026-12-04), ~80% of the side ViT's
bf16 forward at 1,700 tokens was attention when its two products were GEMM custom calls with an XLA
softmax and bf16 conversions between them (`python -m benchmarks` gives the same-run ratios to torch).

`fused_attention` takes float32 q/k/v too (csrc/f32_attention.cc, the same tiling with float32 products,
written once with GCC vector extensions and built for 8- and 16-float vectors, the CPU checked at run time):
XLA:CPU's float32 attention materialises the [heads, Lq, Lk] logits (69 MB per side-ViT block at 1,700
tokens) and runs its softmax over them; measured on a 2-core Zen 3 (2026-12-07, AVX2) the side ViT's
attention took 31 ms fused against 49 ms unfused. float32 is the parity precision: the fused kernel sums the
same products in another order (tests/test_f32_attention.py bounds the difference from float64 and from the
unfused path by float32 rounding), and the golden cases pass with it as before. `fused_attention_bwd` is its
backward (csrc/f32_attention_bwd_impl.h): from q, k, v, the output and its log-sum-exp it recomputes each
tile's probabilities, so a float32 train step stores no [heads, Lq, Lk] array for attention at all
(`layers._fused_forward` has the train-step measurements).

`linear_sum_assignment` is scipy's assignment as a custom call (csrc/hungarian.cc: the same algorithm, tie
rules and float64 arithmetic, so the pairs are scipy's): `losses.matcher` uses it on a CPU instead of a host
callback, so a train step holds no Python callback and JAX's persistent compilation cache keeps it (JAX
never caches a program with a host callback), and no step waits on Python's GIL for its matching.

`availability()` (bf16), `f32_attention_availability()` and `assignment_availability()` say which path runs
and why; `SAN_JAX_NATIVE=0` turns every kernel off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

ENV_VAR = "SAN_JAX_NATIVE"  # "0" puts everything back on XLA: dots and attention
LIBRARY = Path(__file__).with_name("_native") / "libsan_native.so"
_TARGET = "san_bf16_gemm"
_ATTENTION_TARGET = "san_bf16_attention"
_F32_ATTENTION_TARGET = "san_f32_attention"
_ASSIGNMENT_TARGET = "san_linear_sum_assignment"
_F32_ATTENTION_BWD_TARGET = "san_f32_attention_bwd"
ATTENTION_MAX_HEAD_DIM = 128  # the fused kernels' limit (csrc/bf16_attention.cc, csrc/f32_attention.cc)
_BF16 = jnp.dtype(jnp.bfloat16)
_F32 = jnp.dtype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[Optional[ctypes.CDLL], str]:
  """(the library with its XLA targets registered, "") or (None, why not). Registering a target is harmless
  on a CPU that lacks its instructions: each kernel's availability is asked separately before a call."""
  if not LIBRARY.exists():
    return None, f"{LIBRARY} is not built (scripts/setup.sh builds it with g++)"
  try:
    lib = ctypes.CDLL(str(LIBRARY))
  except OSError as e:
    return None, f"{LIBRARY} does not load: {e}"
  for target, symbol in ((_TARGET, "SanBf16Gemm"), (_ATTENTION_TARGET, "SanBf16Attention"),
                         (_F32_ATTENTION_TARGET, "SanF32Attention"),
                         (_ASSIGNMENT_TARGET, "SanLinearSumAssignment"),
                         (_F32_ATTENTION_BWD_TARGET, "SanF32AttentionBwd")):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return lib, ""


def _available(kernel: Callable[[ctypes.CDLL], Tuple[bool, str]]) -> Tuple[bool, str]:
  if os.environ.get(ENV_VAR, "1") == "0":
    return False, f"disabled by {ENV_VAR}=0"
  lib, why = _load()
  return (False, why) if lib is None else kernel(lib)


def availability() -> Tuple[bool, str]:
  """(whether bfloat16 Linear products and attention on a CPU use the custom calls, why / which)."""
  return _available(lambda lib: (True, f"AVX512-BF16 GEMM and fused attention ({LIBRARY.name})")
                    if lib.san_bf16_gemm_supported() else
                    (False, "this CPU lacks AVX512-BF16 (avx512f/bw/vl + avx512_bf16)"))


def f32_attention_availability() -> Tuple[bool, str]:
  """(whether float32 attention without a bias on a CPU runs as the fused custom call, why / which)."""
  def kernel(lib):
    isa = lib.san_f32_attention_isa()
    if not isa:
      return False, "this CPU lacks AVX2 + FMA"
    return True, f"fused float32 attention on {'AVX-512F' if isa == 2 else 'AVX2 + FMA'} ({LIBRARY.name})"
  return _available(kernel)


def assignment_availability() -> Tuple[bool, str]:
  """(whether the matcher's assignment on a CPU runs as the custom call, why / which). Plain C++: any
  x86-64 CPU the library builds for."""
  return _available(lambda lib: (True, f"native linear_sum_assignment ({LIBRARY.name})"))


def linear_sum_assignment(cost: jax.Array, counts: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """scipy.optimize.linear_sum_assignment of every [Q, T] matrix of `cost` restricted to its first
  counts[...] columns, as one custom call (CPU only; `assignment_availability()` first).

  cost: float32 [..., Q, T]; counts: int32 [...] (clamped to [0, T]). Returns (rows, cols) int32
  [..., min(Q, T)]: scipy's pairs, rows ascending, then zeros. NaN / +-inf costs count as 0 / +-1e30.
  """
  if cost.ndim < 2 or counts.shape != cost.shape[:-2]:
    raise ValueError(f"linear_sum_assignment takes cost [..., Q, T] and counts [...] of its leading dims, got "
                     f"cost {cost.shape} and counts {counts.shape}")
  ok, why = assignment_availability()
  if not ok:
    raise RuntimeError(f"linear_sum_assignment: the custom call is unavailable: {why}")
  out = jax.ShapeDtypeStruct(cost.shape[:-2] + (min(cost.shape[-2:]),), jnp.int32)
  return jax.ffi.ffi_call(_ASSIGNMENT_TARGET, (out, out), vmap_method="broadcast_all")(
      cost.astype(jnp.float32), counts.astype(jnp.int32))


def gemm(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """float32 op(a) @ op(b) by the custom call (CPU only; call `availability()` first).

  a: bf16 [M, K] ([K, M] if trans_a), b: bf16 [K, N] ([N, K] if trans_b), both optionally with one equal
  leading batch dim. Returns float32 [..., M, N]. Not differentiable by itself (`matmul` is).
  """
  if a.dtype != _BF16 or b.dtype != _BF16:
    raise TypeError(f"gemm takes bfloat16 operands, got {a.dtype} and {b.dtype}")
  if a.ndim not in (2, 3) or b.ndim != a.ndim or a.shape[:-2] != b.shape[:-2]:
    raise ValueError(f"gemm takes two 2-D or two equally batched 3-D operands, got {a.shape} and {b.shape}")
  m, ka = (a.shape[-1], a.shape[-2]) if trans_a else a.shape[-2:]
  kb, n = (b.shape[-1], b.shape[-2]) if trans_b else b.shape[-2:]
  if ka != kb:
    raise ValueError(f"gemm: contracted dims differ: a {a.shape} (trans_a={trans_a}), b {b.shape} (trans_b={trans_b})")
  ok, why = availability()
  if not ok:
    raise RuntimeError(f"gemm: the AVX512-BF16 custom call is unavailable: {why}")
  out = jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.float32)
  return jax.ffi.ffi_call(_TARGET, out, vmap_method="broadcast_all")(
      a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """`gemm` with gradients: float32 op(a) @ op(b), bf16 cotangents (as XLA's own bf16 dot takes them).

  With C = op(A) op(B) and G = dC: dop(A) = G op(B)^T and dop(B) = op(A)^T G, each again one custom call
  whose flags absorb every transpose (no copies), e.g. dA = G @ B^T is gemm(G, B, trans_b=not trans_b)."""
  return gemm(a, b, trans_a, trans_b)


def _matmul_fwd(a, b, trans_a, trans_b):
  return gemm(a, b, trans_a, trans_b), (a, b)


def _matmul_bwd(trans_a, trans_b, res, g):
  a, b = res
  g = g.astype(_BF16)
  # dA as stored: [M, K] = G @ op(B)^T, or [K, M] = op(B) @ G^T when a is stored transposed.
  da = gemm(b, g, trans_b, True) if trans_a else gemm(g, b, False, not trans_b)
  # dB as stored: [K, N] = op(A)^T @ G, or [N, K] = G^T @ op(A) when b is stored transposed.
  db = gemm(g, a, True, trans_a) if trans_b else gemm(a, g, not trans_a, False)
  return da.astype(a.dtype), db.astype(b.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """softmax(q k^T) v by a fused custom call (CPU only; `attention_applies` first), not differentiable
  (`layers.attention` gives it the unfused path's gradient).

  q: [B, Lq, H, D], already scaled; k, v: [B, Lk, H, D]; all bfloat16 (csrc/bf16_attention.cc) or all float32
  (csrc/f32_attention.cc). Returns (out [B, Lq, H, D] in q's dtype, lse float32 [B, H, Lq], the log-sum-exp of
  each query's logits). The [Lq, Lk] logits exist only 16 queries x one key block at a time, in float32; in
  bf16 the weights are rounded to bf16 for the products with v, as in `layers.attention`'s unfused path.
  """
  if not attention_applies(q, k, v):
    raise ValueError(f"fused_attention does not apply to q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, "
                     f"v {v.shape} {v.dtype} (all bf16 or all float32 [B, L, H, D <= {ATTENTION_MAX_HEAD_DIM}], "
                     "the library built for this CPU)")
  b, lq, h, d = q.shape
  target = _ATTENTION_TARGET if jnp.dtype(q.dtype) == _BF16 else _F32_ATTENTION_TARGET
  out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32))
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(q, k, v)


def fused_attention_bwd(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array,
                        g: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The gradients (dq, dk, dv) of float32 `fused_attention` from its inputs, its outputs (out, lse) and the
  cotangent g of out, by one custom call (csrc/f32_attention_bwd_impl.h: the probabilities recomputed from
  lse a tile at a time, never the whole [H, Lq, Lk]). dq is the gradient of the scaled q it was given."""
  if not (attention_applies(q, k, v) and {jnp.dtype(x.dtype) for x in (q, k, v, out, lse, g)} == {_F32}
          and out.shape == g.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])):
    raise ValueError(f"fused_attention_bwd does not apply to q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, "
                     f"v {v.shape} {v.dtype}, out {out.shape} {out.dtype}, lse {lse.shape} {lse.dtype}, "
                     f"g {g.shape} {g.dtype} (float32 only, out and g of q's shape, lse [B, H, Lq])")
  shapes = (jax.ShapeDtypeStruct(q.shape, _F32), jax.ShapeDtypeStruct(k.shape, _F32),
            jax.ShapeDtypeStruct(v.shape, _F32))
  return jax.ffi.ffi_call(_F32_ATTENTION_BWD_TARGET, shapes, vmap_method="sequential")(q, k, v, out, lse, g)


def attention_applies(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether `fused_attention` can take these operands: all bfloat16 where `applies`, or all float32 where
  `f32_attention_availability` (and not under `xla_only`, the default backend a CPU); rank 4 [B, L, H, D]
  with equal B, H, D, k and v of one length >= 1, D <= ATTENTION_MAX_HEAD_DIM."""
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if dtypes == {_BF16}:
    available = applies(q, k, v)
  elif dtypes == {_F32}:
    available = _native_applies(f32_attention_availability, (q, k, v))
  else:
    return False
  return (available and q.ndim == k.ndim == v.ndim == 4 and k.shape == v.shape
          and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:] and k.shape[1] >= 1
          and q.shape[3] <= ATTENTION_MAX_HEAD_DIM)


def _is_linear(lhs, rhs, dimension_numbers) -> bool:
  (lc, rc), (lb, rb) = dimension_numbers
  return (tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2
          and lhs.ndim >= 1)


_XLA_ONLY = []  # non-empty while `xla_only()` is entered


@contextlib.contextmanager
def xla_only() -> Iterator[None]:
  """Programs traced inside use XLA's dot everywhere: `jax.export` (san_jax/export.py) must not carry a
  custom call that only this build registers, and that jax.export refuses to serialise."""
  _XLA_ONLY.append(True)
  try:
    yield
  finally:
    _XLA_ONLY.pop()


def applies(*operands: jax.Array) -> bool:
  """Whether products of these operands go to the custom call: all bfloat16, non-empty, the library
  available and the default backend a CPU (where a program is lowered for another platform as well,
  `lax.platform_dependent` still gives that platform XLA's dot)."""
  return all(jnp.dtype(x.dtype) == _BF16 for x in operands) and _native_applies(availability, operands)


def _native_applies(available, operands) -> bool:
  return (not _XLA_ONLY and all(x.size for x in operands) and jax.default_backend() == "cpu"
          and available()[0])


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
  """`lax.dot_general` with the bf16 Linear product on the custom call where it applies (module docstring)."""
  def xla(lhs, rhs):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, out_sharding=out_sharding)

  if out_sharding is not None or not _is_linear(lhs, rhs, dimension_numbers) or not applies(lhs, rhs):
    return xla(lhs, rhs)
  # The float32 sums, unrounded (module docstring: bf16 operands, float32 activations on a CPU).
  out_dtype = jnp.dtype(preferred_element_type) if preferred_element_type is not None else jnp.dtype(jnp.float32)
  xla_f32 = lambda lhs, rhs: lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                             preferred_element_type=out_dtype)

  def custom(lhs, rhs):
    y = matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
    return y.reshape(lhs.shape[:-1] + rhs.shape[-1:]).astype(out_dtype)

  return lax.platform_dependent(lhs, rhs, cpu=custom, default=xla_f32)


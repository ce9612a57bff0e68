"""The AVX512-BF16 GEMM custom call (san_jax/ops/gemm.py, csrc/) against an independent float64 reference and
XLA's own dot, its gradients, and the fallback to XLA's dot wherever it does not apply.

Bounds: both the custom call and XLA:CPU multiply bf16 values exactly (8-bit mantissas: the product fits a
float32) and sum in float32, so each differs from the float64 sum of the same products by at most
K * 2^-24 * sum_k |a_ik| |b_kj| (the classic recursive-summation bound, one rounding per addition; blocked
sums are tighter). A bf16 result adds its one final rounding: half a bf16 ulp (2^-8 relative) of the value.
"""

import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from san_jax.models import layers
from san_jax.ops import gemm

ON = gemm.availability()[0]
needs_kernel = pytest.mark.skipif(not ON, reason=f"custom call unavailable: {gemm.availability()[1]}")
DN = (((1,), (0,)), ((), ()))


def _bf16(rng, shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _f64(x):
  return np.asarray(x.astype(jnp.float32), np.float64)


def _ref_and_bound(a, b):
  """float64 a @ b and the float32 summation bound per element."""
  a64, b64 = _f64(a), _f64(b)
  k = a64.shape[-1]
  return a64 @ b64, k * 2.0 ** -24 * (np.abs(a64) @ np.abs(b64))


def _jit(fn):
  """A fresh jit (jax caches traces per function object: the fallback test changes the environment)."""
  return jax.jit(lambda *args: fn(*args))


def _uses_custom_call(fn, *args) -> bool:
  return "san_bf16_gemm" in _jit(fn).lower(*args).as_text()


def test_library_is_built_where_it_can_be():
  """scripts/setup.sh builds the library on an x86-64 machine with g++ (CI's): a build that silently failed
  would leave every bf16 product on XLA's dot and this suite green."""
  if platform.machine() != "x86_64" or shutil.which("g++") is None:
    pytest.skip("no x86-64 g++ here: the library is not built, XLA's dot is used")
  assert gemm.LIBRARY.exists(), gemm.availability()[1]
  cpu_has = "avx512_bf16" in open("/proc/cpuinfo").read()
  assert gemm.availability() == (cpu_has, gemm.availability()[1])


@needs_kernel
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (37, 53, 71), (5, 33, 2), (1, 64, 240), (130, 97, 257),
                                   (300, 48, 17)])
def test_gemm_equals_float64_and_xla_within_float32_summation(m, n, k, trans_a, trans_b):
  rng = np.random.default_rng(m * 1000 + n + k)
  a, b = _bf16(rng, (m, k)), _bf16(rng, (k, n))
  ref, bound = _ref_and_bound(a, b)
  got = gemm.gemm(a.T if trans_a else a, b.T if trans_b else b, trans_a, trans_b)
  assert got.dtype == jnp.float32 and got.shape == (m, n)
  assert np.all(np.abs(np.asarray(got, np.float64) - ref) <= bound)
  xla = jax.lax.dot_general(a, b, DN, preferred_element_type=jnp.float32)
  assert np.all(np.abs(np.asarray(got, np.float64) - np.asarray(xla, np.float64)) <= 2 * bound)


@needs_kernel
def test_gemm_batched_and_zero_k():
  rng = np.random.default_rng(1)
  a, b = _bf16(rng, (3, 17, 40)), _bf16(rng, (3, 40, 9))
  got = np.asarray(gemm.gemm(a, b), np.float64)
  for i in range(3):
    ref, bound = _ref_and_bound(a[i], b[i])
    assert np.all(np.abs(got[i] - ref) <= bound)
  zero = gemm.gemm(jnp.zeros((4, 0), jnp.bfloat16), jnp.zeros((0, 5), jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(zero), np.zeros((4, 5), np.float32))


def test_gemm_rejects_bad_operands_before_tracing():
  with pytest.raises(TypeError, match="bfloat16 operands, got float32"):
    gemm.gemm(jnp.zeros((2, 3)), jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match=r"contracted dims differ: a \(2, 3\).*b \(4, 4\)"):
    gemm.gemm(jnp.zeros((2, 3), jnp.bfloat16), jnp.zeros((4, 4), jnp.bfloat16))


@needs_kernel
def test_linear_product_and_gradients_use_the_custom_call_within_bf16_rounding():
  """dot_general on x[..., K] @ W[K, N] in bf16: the custom call in the forward and both gradient products.
  The forward returns the float32 sums unrounded (within the summation bound of float64); the gradients
  are bf16, within half a bf16 ulp plus the bound."""
  rng = np.random.default_rng(2)
  x, w = _bf16(rng, (2, 45, 96)), _bf16(rng, (96, 80))
  dn = (((2,), (0,)), ((), ()))
  f = lambda x, w: gemm.dot_general(x, w, dn)
  assert _uses_custom_call(f, x, w)
  y = jax.jit(f)(x, w)
  assert y.dtype == jnp.float32 and y.shape == (2, 45, 80)
  ref, bound = _ref_and_bound(x.reshape(-1, 96), w)
  assert np.all(np.abs(np.asarray(y, np.float64).reshape(-1, 80) - ref) <= bound)
  # the XLA branch (a GPU lowering, or the fallback) has the same result type
  gpu = jax.export.export(jax.jit(f), platforms=["cuda"])(x, w)
  assert gpu.out_avals[0].dtype == jnp.float32

  g = _bf16(rng, (2, 45, 80)).astype(jnp.float32)  # cotangent of y (bf16 values: the VJP rounds it to bf16)
  vjp = jax.jit(lambda x, w, g: jax.vjp(f, x, w)[1](g))
  assert "san_bf16_gemm" in vjp.lower(x, w, g).as_text()
  dx, dw = vjp(x, w, g)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  g2 = g.reshape(-1, 80)
  for got, (ref, bound) in [(dx.reshape(-1, 96), _ref_and_bound(g2, w.T)),
                            (dw, _ref_and_bound(x.reshape(-1, 96).T, g2))]:
    assert np.all(np.abs(_f64(got) - ref) <= 2.0 ** -8 * np.abs(ref) + bound)


def test_fallback_is_xla_dot_bit_for_bit(monkeypatch):
  """Where the custom call does not apply, dot_general is lax.dot_general itself: float32, other contractions,
  SAN_JAX_NATIVE=0, a missing library, and (by lax.platform_dependent) a program lowered for a GPU."""
  rng = np.random.default_rng(3)
  x, w = _bf16(rng, (33, 64)), _bf16(rng, (64, 40))
  f = lambda x, w: gemm.dot_general(x, w, DN)
  xla = lambda x, w: jax.lax.dot_general(x, w, DN)
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
  assert not _uses_custom_call(f, x32, w32)
  np.testing.assert_array_equal(_jit(f)(x32, w32), _jit(xla)(x32, w32))
  batched = (((2,), (1,)), ((0,), (0,)))
  xb, wb = _bf16(rng, (2, 5, 8)), _bf16(rng, (2, 8, 3))
  assert not _uses_custom_call(lambda a, b: gemm.dot_general(a, b, batched), xb, wb)

  gpu = jax.export.export(jax.jit(f), platforms=["cuda"])(x, w)
  assert "san_bf16_gemm" not in gpu.mlir_module()

  monkeypatch.setenv(gemm.ENV_VAR, "0")
  assert gemm.availability() == (False, "disabled by SAN_JAX_NATIVE=0")
  assert not _uses_custom_call(f, x, w)
  np.testing.assert_array_equal(_jit(f)(x, w), _jit(xla)(x, w))
  monkeypatch.delenv(gemm.ENV_VAR)

  monkeypatch.setattr(gemm, "LIBRARY", gemm.LIBRARY.with_name("missing.so"))
  gemm._load.cache_clear()
  try:
    ok, why = gemm.availability()
    assert not ok and "missing.so is not built" in why
    assert not _uses_custom_call(f, x, w)
    np.testing.assert_array_equal(_jit(f)(x, w), _jit(xla)(x, w))
  finally:
    monkeypatch.undo()
    gemm._load.cache_clear()


@needs_kernel
def test_partitioned_step_keeps_xla_dot():
  """Under layers.activation_sharding (a step XLA partitions over a mesh) every Linear keeps XLA's dot: the
  custom call has no sharding rule. Inference (no resolver) takes the custom call."""
  rng = np.random.default_rng(4)
  x = _bf16(rng, (4, 24))
  from flax import nnx
  lin = layers.linear(24, 16, ("embed", "mlp"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  fn = lambda x: lin(x)
  assert _uses_custom_call(fn, x)
  with layers.activation_sharding(lambda names, shape: None):
    assert not _uses_custom_call(fn, x)



@needs_kernel
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_gradients_for_every_layout(trans_a, trans_b):
  """gemm.matmul's VJP (batched, as the attention uses it): dA and dB as stored, within half a bf16 ulp plus
  the summation bound of float64 G op(B)^T and op(A)^T G on the same bf16 operands."""
  rng = np.random.default_rng(5)
  m, n, k = 19, 23, 41
  a = _bf16(rng, (2, k, m) if trans_a else (2, m, k))
  b = _bf16(rng, (2, n, k) if trans_b else (2, k, n))
  g = _bf16(rng, (2, m, n))
  (y, vjp) = jax.vjp(lambda a, b: gemm.matmul(a, b, trans_a, trans_b), a, b)
  da, db = vjp(g.astype(jnp.float32))
  assert da.shape == a.shape and db.shape == b.shape and da.dtype == db.dtype == jnp.bfloat16
  for i in range(2):
    op_a = a[i].T if trans_a else a[i]
    op_b = b[i].T if trans_b else b[i]
    ref, bound = _ref_and_bound(op_a, op_b)
    assert np.all(np.abs(np.asarray(y[i], np.float64) - ref) <= bound)
    for got, (ref, bound), transposed in [(da[i], _ref_and_bound(g[i], op_b.T), trans_a),
                                          (db[i], _ref_and_bound(op_a.T, g[i]), trans_b)]:
      got = _f64(got.T if transposed else got)
      assert np.all(np.abs(got - ref) <= 2.0 ** -8 * np.abs(ref) + bound)


@needs_kernel
def test_attention_runs_its_bf16_products_on_the_custom_call(monkeypatch):
  """layers.attention in bf16: both products (forward and backward) are custom calls, and the output is
  XLA's within what the two paths' roundings allow: logits differ by float32 summation order, so a softmax
  weight rounded to bf16 can land one ulp (2^-8 relative) apart, moving an output by <= 2^-8 max|v|; each
  output then rounds once to bf16 (half an ulp each side)."""
  rng = np.random.default_rng(6)
  q, k, v = (_bf16(rng, (2, 30, 3, 8)) for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((2, 3, 30, 30)), jnp.float32)
  attn = lambda q, k, v: layers.attention(q, k, v, bias, query_chunk=16, impl="exact")
  assert _uses_custom_call(attn, q, k, v)
  loss = lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) ** 2)
  grad_hlo = _jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
  assert grad_hlo.count("san_bf16_gemm") >= 6  # 2 forward products per query chunk, 4 backward
  got = _f64(_jit(attn)(q, k, v))
  monkeypatch.setenv(gemm.ENV_VAR, "0")
  assert not _uses_custom_call(attn, q, k, v)
  ref = _f64(_jit(attn)(q, k, v))
  bound = 2.0 ** -8 * np.abs(_f64(v)).max() + 2.0 ** -8 * np.maximum(np.abs(got), np.abs(ref))
  assert np.all(np.abs(got - ref) <= bound)


@needs_kernel
def test_export_never_carries_the_custom_call():
  """jax.export refuses custom calls without a compatibility guarantee, and a serving artifact must run on
  plain jax: under gemm.xla_only() (san_jax/export.py) a bf16 Linear exports as XLA's dot."""
  rng = np.random.default_rng(7)
  x, w = _bf16(rng, (8, 32)), _bf16(rng, (32, 16))
  f = lambda x, w: gemm.dot_general(x, w, DN)
  assert _uses_custom_call(f, x, w)
  with gemm.xla_only():
    exp = jax.export.export(_jit(f), platforms=["cpu"])(x, w)
  assert "san_bf16_gemm" not in exp.mlir_module()
  np.testing.assert_array_equal(exp.call(x, w), jax.lax.dot_general(x, w, DN))  # XLA's own bf16 result


# ---- the fused attention (csrc/bf16_attention.cc) ---------------------------------------------------------
def _attention_f64(q, k, v):
  """float64 softmax(q k^T / sqrt(D)) v of the bf16 operands, [B, L, H, D] layout."""
  q64, k64, v64 = _f64(q), _f64(k), _f64(v)
  s = np.einsum("bqhd,bkhd->bhqk", q64 * q.shape[-1] ** -0.5, k64)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v64)


def _uses_fused(fn, *args) -> bool:
  return "san_bf16_attention" in _jit(fn).lower(*args).as_text()


@needs_kernel
@pytest.mark.parametrize("b,lq,lk,h,d", [(1, 1, 1, 1, 1), (2, 37, 50, 3, 40), (1, 17, 300, 2, 64),
                                         (1, 130, 129, 1, 33), (1, 20, 16, 2, 128), (1, 401, 401, 12, 64)])
def test_fused_attention_equals_float64_and_the_unfused_path_within_bf16_rounding(monkeypatch, b, lq, lk, h, d):
  """layers.attention in bf16 without a bias is one fused custom call. Its weights exp(s - max) are rounded
  to bf16 (half an ulp, 2^-9 relative, as the unfused path rounds its softmax) and normalised once by the
  float32 sum, so an output moves by <= 2^-9 max|v| from the float64 attention of the same bf16 operands,
  plus the output's own rounding to bf16 (2^-9 relative); float32 logits add ~D 2^-24 |q||k| to each
  exponent, far below. Against the unfused bf16 path both sides carry those roundings: <= 2^-8 max|v| +
  2^-8 max|out| (the bound of the unfused path's own test above). Edges: one key, one query, odd and
  maximal head dims, key counts off the kernel's 16- and 128-key blocks."""
  rng = np.random.default_rng(b * 7 + lq + lk + d)
  q, k, v = _bf16(rng, (b, lq, h, d)), _bf16(rng, (b, lk, h, d)), _bf16(rng, (b, lk, h, d))
  attn = lambda q, k, v: layers.attention(q, k, v, query_chunk=64)
  assert _uses_fused(attn, q, k, v)
  got = _jit(attn)(q, k, v)
  assert got.dtype == jnp.bfloat16 and got.shape == q.shape
  got = _f64(got)
  ref = _attention_f64(q, k, v)
  vmax = np.abs(_f64(v)).max()
  assert np.all(np.abs(got - ref) <= 2.0 ** -9 * vmax * (1 + 2.0 ** -8) + 2.0 ** -9 * np.abs(ref) + 1e-6 * vmax)
  monkeypatch.setattr(gemm, "attention_applies", lambda *a: False)
  assert not _uses_fused(attn, q, k, v)
  unfused = _f64(_jit(attn)(q, k, v))
  assert np.all(np.abs(got - unfused) <= 2.0 ** -8 * vmax + 2.0 ** -8 * np.maximum(np.abs(got), np.abs(unfused)))


@needs_kernel
def test_fused_attention_gradients_are_the_unfused_paths_bit_for_bit(monkeypatch):
  """Under a gradient the forward is the unfused path's (layers._fused_forward): training computes exactly
  what it did without the fused kernel, in the forward value and in every gradient."""
  rng = np.random.default_rng(8)
  q, k, v = (_bf16(rng, (1, 70, 2, 40)) for _ in range(3))
  ct = jnp.asarray(rng.standard_normal((1, 70, 2, 40)), jnp.float32)
  loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, query_chunk=32).astype(jnp.float32) * ct)
  vg = lambda q, k, v: jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
  assert "san_bf16_attention" in _jit(loss).lower(q, k, v).as_text()
  fused_value, fused_grads = _jit(vg)(q, k, v)
  monkeypatch.setattr(gemm, "attention_applies", lambda *a: False)
  value, grads = _jit(vg)(q, k, v)
  assert float(fused_value) == float(value)
  for a, b in zip(fused_grads, grads):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


@needs_kernel
def test_fused_attention_only_where_it_applies():
  """Not for float32 (that is csrc/f32_attention.cc's, tests/test_f32_attention.py), with an additive bias, a head dim above the kernel's 128, under
  gemm.xla_only() (exports), under activation_sharding (a partitioned step), or in a program lowered for a
  GPU (lax.platform_dependent gives it the unfused path)."""
  rng = np.random.default_rng(9)
  q, k, v = (_bf16(rng, (1, 20, 2, 16)) for _ in range(3))
  attn = lambda q, k, v: layers.attention(q, k, v)
  assert _uses_fused(attn, q, k, v)
  assert not _uses_fused(attn, *(t.astype(jnp.float32) for t in (q, k, v)))
  bias = jnp.zeros((1, 2, 20, 20), jnp.float32)
  assert not _uses_fused(lambda q, k, v: layers.attention(q, k, v, bias), q, k, v)
  wide = _bf16(rng, (1, 4, 1, 136))
  assert not _uses_fused(attn, wide, wide, wide)
  with gemm.xla_only():
    assert not _uses_fused(attn, q, k, v)
  with layers.activation_sharding(lambda names, shape: None):
    assert not _uses_fused(attn, q, k, v)
  gpu = jax.export.export(_jit(attn), platforms=["cuda"])(q, k, v)
  assert "san_bf16_attention" not in gpu.mlir_module()


def test_fused_attention_rejects_what_it_cannot_take():
  with pytest.raises(ValueError, match=r"fused_attention does not apply to q \(1, 4, 2, 8\) float16"):
    gemm.fused_attention(*(jnp.zeros((1, 4, 2, 8), jnp.float16) for _ in range(3)))
  bf = lambda *s: jnp.zeros(s, jnp.bfloat16)
  with pytest.raises(ValueError, match=r"k \(1, 5, 2, 8\) bfloat16, v \(1, 6, 2, 8\)"):
    gemm.fused_attention(bf(1, 4, 2, 8), bf(1, 5, 2, 8), bf(1, 6, 2, 8))

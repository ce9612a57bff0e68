"""The fused float32 attention (csrc/f32_attention.cc through san_jax/ops/gemm.py) against an independent
float64 reference and XLA's unfused attention, its gradients, and where it must not run.

Bound (float32 attention of the same operands against float64): a logit s = q.k sums D products, so it is
within e_s = D 2^-24 sum_d |q_d||k_d| of the exact one (recursive summation); the row maximum too. A weight
exp(s - m) then moves by <= 2 e_s relative, plus the kernel's exp polynomial (<= 2^-22 relative) and the
rounding of s - m (<= 2^-24 |s - m| relative, i.e. <= 2^-24 / e absolute against a row sum >= 1). The output
sum_k p_k v_k / sum_k p_k moves by twice the weights' relative error times max|v|, and the two float32 sums
over Lk keys add <= Lk 2^-24 max|v| each; the output's own rounding adds 2^-24 |out|. So

  |out - ref| <= max|v| (4 e_s + 2^-21 + 3 Lk 2^-24) + 2^-24 |ref|,

and XLA's unfused float32 path obeys the same bound, so the two are within twice it of each other.
"""

import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from san_jax.models import layers
from san_jax.ops import gemm

ON, WHY = gemm.f32_attention_availability()
needs_kernel = pytest.mark.skipif(not ON, reason=f"fused float32 attention unavailable: {WHY}")


@pytest.fixture(autouse=True)
def _fuse_every_size(monkeypatch):
  """The kernel at every geometry here, small ones included (layers.attention fuses float32 attention only
  from F32_FUSED_MIN_LOGITS on; test_small_attention_stays_on_xla checks that threshold)."""
  monkeypatch.setattr(layers, "F32_FUSED_MIN_LOGITS", 1)


def _jit(fn):
  """A fresh jit (jax caches traces per function object; some tests change the environment)."""
  return jax.jit(lambda *args: fn(*args))


def _uses_fused(fn, *args) -> bool:
  return "san_f32_attention" in _jit(fn).lower(*args).as_text()


def _operands(rng, b, lq, lk, h, d, scale=1.0):
  shapes = ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d))
  return tuple(jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for s in shapes)


def _ref_and_bound(q, k, v):
  """float64 softmax(q k^T / sqrt(D)) v of the float32 operands and the module docstring's bound."""
  d = q.shape[-1]
  q64 = np.asarray(q, np.float64) * np.float64(np.float32(d ** -0.5))  # the path scales q in float32 first
  q64 = np.asarray(np.float32(q64), np.float64)
  k64, v64 = np.asarray(k, np.float64), np.asarray(v, np.float64)
  s = np.einsum("bqhd,bkhd->bhqk", q64, k64)
  e_s = d * 2.0 ** -24 * np.einsum("bqhd,bkhd->bhqk", np.abs(q64), np.abs(k64))
  p = np.exp(s - s.max(-1, keepdims=True))
  ref = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v64)
  vmax = np.abs(v64).max()
  bound = vmax * (4 * e_s.max() + 2.0 ** -21 + 3 * k.shape[1] * 2.0 ** -24) + 2.0 ** -24 * np.abs(ref)
  return ref, bound


def test_library_offers_the_kernel_where_the_cpu_can_run_it():
  """scripts/setup.sh builds the library on x86-64 with g++ (CI's machine): a build that silently failed, or
  a CPU check that said no on an AVX2 machine, would leave float32 attention on XLA and this suite green."""
  if platform.machine() != "x86_64" or shutil.which("g++") is None:
    pytest.skip("no x86-64 g++ here: the library is not built, XLA's attention is used")
  flags = set(open("/proc/cpuinfo").read().split())
  assert ON == ({"avx2", "fma"} <= flags), WHY
  if ON:
    assert WHY.startswith("fused float32 attention on " + ("AVX-512F" if "avx512f" in flags else "AVX2 + FMA"))


@needs_kernel
@pytest.mark.parametrize("b,lq,lk,h,d,scale", [
    (1, 1, 1, 1, 1, 1.0), (2, 37, 50, 3, 40, 1.0), (1, 17, 300, 2, 64, 3.0), (1, 130, 129, 1, 33, 1.0),
    (1, 20, 16, 2, 128, 1.0), (1, 401, 401, 12, 64, 1.0), (1, 1700, 1700, 6, 40, 3.0), (3, 5, 97, 2, 7, 10.0)])
def test_fused_equals_float64_and_the_unfused_path_within_float32_rounding(monkeypatch, b, lq, lk, h, d, scale):
  """layers.attention in float32 without a bias is one fused custom call on a CPU with AVX2 + FMA. Geometries:
  one key and one query, the side ViT's (6 heads x 1,700 tokens, D 40) and CLIP B/16's (12 x 401, D 64),
  odd and maximal head dims, key counts off the kernel's 8-, 16- and block-key multiples; scale 3 and 10 make
  nearly one-hot softmax rows (large logits: the running maximum changes between key blocks)."""
  q, k, v = _operands(np.random.default_rng(b * 7 + lq + lk + d), b, lq, lk, h, d, scale)
  attn = lambda q, k, v: layers.attention(q, k, v, query_chunk=256)
  assert _uses_fused(attn, q, k, v)
  got = _jit(attn)(q, k, v)
  assert got.dtype == jnp.float32 and got.shape == q.shape
  ref, bound = _ref_and_bound(q, k, v)
  err = np.abs(np.asarray(got, np.float64) - ref)
  assert np.all(err <= bound), f"max err {err.max():.3g}, bound at the worst element {bound.flat[err.argmax()]:.3g}"
  monkeypatch.setattr(gemm, "attention_applies", lambda *a: False)
  assert not _uses_fused(attn, q, k, v)
  unfused = np.asarray(_jit(attn)(q, k, v), np.float64)
  assert np.all(np.abs(unfused - ref) <= bound)  # the bound is not the kernel's alone
  assert np.all(np.abs(np.asarray(got, np.float64) - unfused) <= 2 * bound)


@needs_kernel
def test_lse_is_the_log_sum_exp_of_each_querys_logits():
  rng = np.random.default_rng(5)
  q, k, v = _operands(rng, 2, 33, 140, 3, 24, 2.0)
  out, lse = jax.jit(gemm.fused_attention)(q, k, v)
  s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
  ref = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
  e_s = 24 * 2.0 ** -24 * np.einsum("bqhd,bkhd->bhqk", np.abs(np.asarray(q, np.float64)), np.abs(np.asarray(k, np.float64)))
  # the maximum and the sum's log each move by the logits' error, plus float32 rounding of the result
  assert lse.shape == (2, 3, 33) and np.all(np.abs(np.asarray(lse) - ref) <= 3 * e_s.max() + 2.0 ** -21 * (1 + np.abs(ref)))
  assert out.shape == q.shape


@needs_kernel
def test_gradients_are_the_unfused_paths_bit_for_bit(monkeypatch):
  """Under a gradient the forward is the unfused path's (layers._fused_forward): training computes exactly what
  it did without the fused kernel, in the forward value and in every gradient."""
  rng = np.random.default_rng(8)
  q, k, v = _operands(rng, 1, 70, 70, 2, 40)
  ct = jnp.asarray(rng.standard_normal((1, 70, 2, 40)), jnp.float32)
  loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, query_chunk=32) * ct)
  vg = lambda q, k, v: jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
  assert _uses_fused(loss, q, k, v)
  fused_value, fused_grads = _jit(vg)(q, k, v)
  monkeypatch.setattr(gemm, "attention_applies", lambda *a: False)
  value, grads = _jit(vg)(q, k, v)
  assert float(fused_value) == float(value)
  for a, b in zip(fused_grads, grads):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_kernel
def test_only_where_it_applies(monkeypatch):
  """Not with an additive bias, a head dim above 128, mixed dtypes, under gemm.xla_only() (exports), under
  activation_sharding (a partitioned step) or a multi-device mesh (the Segmenter's batch-split programs: a
  custom call there would run whole on every device), in a program lowered for a GPU, with SAN_JAX_NATIVE=0,
  or without the library; inside shard_map (each device's own share) it does apply."""
  rng = np.random.default_rng(9)
  q, k, v = _operands(rng, 1, 20, 20, 2, 16)
  attn = lambda q, k, v: layers.attention(q, k, v)
  assert _uses_fused(attn, q, k, v)
  bias = jnp.zeros((1, 2, 20, 20), jnp.float32)
  assert not _uses_fused(lambda q, k, v: layers.attention(q, k, v, bias), q, k, v)
  wide = jnp.zeros((1, 4, 1, 136), jnp.float32)
  assert not _uses_fused(attn, wide, wide, wide)
  assert not _uses_fused(attn, q.astype(jnp.float16), k, v)
  with gemm.xla_only():
    assert not _uses_fused(attn, q, k, v)
  with layers.activation_sharding(lambda names, shape: None):
    assert not _uses_fused(attn, q, k, v)
  two = jax.sharding.AbstractMesh((2,), ("batch",))
  with jax.sharding.use_abstract_mesh(two):
    assert not _uses_fused(attn, q, k, v)
  one = jax.sharding.AbstractMesh((1,), ("batch",))
  with jax.sharding.use_abstract_mesh(one):
    assert _uses_fused(attn, q, k, v)
  gpu = jax.export.export(_jit(attn), platforms=["cuda"])(q, k, v)
  assert "san_f32_attention" not in gpu.mlir_module()
  monkeypatch.setenv(gemm.ENV_VAR, "0")
  assert gemm.f32_attention_availability() == (False, "disabled by SAN_JAX_NATIVE=0")
  assert not _uses_fused(attn, q, k, v)
  monkeypatch.delenv(gemm.ENV_VAR)
  monkeypatch.setattr(gemm, "LIBRARY", gemm.LIBRARY.with_name("missing.so"))
  gemm._load.cache_clear()
  try:
    ok, why = gemm.f32_attention_availability()
    assert not ok and "missing.so is not built" in why
    assert not _uses_fused(attn, q, k, v)
  finally:
    monkeypatch.undo()
    gemm._load.cache_clear()


@needs_kernel
def test_small_attention_stays_on_xla(monkeypatch):
  """Below F32_FUSED_MIN_LOGITS logits per head (Lq x Lk) float32 attention keeps XLA's ops (the custom call's
  fixed costs outweigh its gain there, layers.py has the measurements); from it on, the fused kernel."""
  monkeypatch.setattr(layers, "F32_FUSED_MIN_LOGITS", 100 * 100)
  rng = np.random.default_rng(4)
  attn = lambda q, k, v: layers.attention(q, k, v)
  assert not _uses_fused(attn, *_operands(rng, 32, 65, 65, 2, 32))  # the demo's tiny CLIP
  assert not _uses_fused(attn, *_operands(rng, 1, 99, 101, 2, 32))
  assert _uses_fused(attn, *_operands(rng, 1, 100, 100, 2, 32))
  assert _uses_fused(attn, *_operands(rng, 1, 50, 200, 2, 32))


@needs_kernel
def test_the_kernel_rejects_mismatched_shapes_naming_them():
  """The FFI handler checks shapes itself (a call that bypasses gemm.fused_attention's checks must fail with
  the shapes named, never read out of bounds)."""
  q = jnp.zeros((1, 4, 2, 8), jnp.float32)
  k = jnp.zeros((1, 5, 2, 8), jnp.float32)
  v = jnp.zeros((1, 6, 2, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"k \(1, 5, 2, 8\) float32, v \(1, 6, 2, 8\)"):
    gemm.fused_attention(q, k, v)
  out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((1, 2, 4), jnp.float32))
  with pytest.raises(Exception, match=r"san_f32_attention: k and v differ in length: q \[1, 4, 2, 8\], "
                                      r"k \[1, 5, 2, 8\], v \[1, 6, 2, 8\]"):
    jax.block_until_ready(jax.ffi.ffi_call("san_f32_attention", out)(q, k, v))


@needs_kernel
def test_the_kernel_stays_in_bounds_under_address_sanitizer(tmp_path):
  """tests/native/f32_attention_asan.cc built with -fsanitize=address,undefined against csrc/ (the same
  sources the library is built from): the kernel on edge geometries in exactly sized buffers, against a
  float64 reference (inputs of unit scale, so 1e-3 absolute is far above float32 rounding and far below
  any indexing error)."""
  import subprocess
  from pathlib import Path
  repo = Path(__file__).resolve().parents[1]
  exe = tmp_path / "asan"
  src = [repo / "tests/native/f32_attention_asan.cc"] + [repo / "csrc" / n for n in
                                                          ("bf16_gemm.cc", "bf16_attention.cc", "f32_attention.cc")]
  build = subprocess.run(["g++", "-O1", "-g", "-std=c++17", "-fsanitize=address,undefined",
                          "-fno-sanitize-recover=all", f"-I{repo / 'csrc'}", *map(str, src), "-o", str(exe),
                          "-lpthread"], capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stderr[-3000:]
  run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
  assert run.returncode == 0 and "worst abs err" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]

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


def _grad_ref_and_bounds(q, k, v, g):
  """float64 gradients (dq, dk, dv) of sum(attention(q, k, v) * g) from the float32 operands, and a
  first-order bound on the error of a float32 computation of them (u = 2^-24; |x| elementwise; products of
  two error terms dropped), valid for the fused backward and for XLA's backward of the unfused path:

    P (scaled-q logits s, softmax over keys): relative error eps_P = e_s + max_k e_s + 2^-21 + Lk u
      + u |s - lse| (the logits' error as in the module docstring, the row's shift, the exp polynomial and
      the normaliser's sum), and the exp's floor: the kernel clamps its argument at -87 (e^-87 < 2^-125),
      XLA's exp underflows to 0 below 2^-126; so |P_err| <= P eps_P + 2^-125 =: E_P
    dv = P^T g:          E_P^T |g| + Lq u P^T |g| + u |dv|
    dP = g v^T:          D u |g| |v|^T + u |dP|
    delta = rowsum(P * dP) (XLA) or g . out (the kernel): the larger of
                         sum_k (E_P |dP| + P E_dP) + Lk u sum_k P |dP|  and  D u |g|.|out| + |g|.E_out
    dS = P (dP - delta): E_P |dP - delta| + P (E_dP + E_delta) + 2 u P (|dP| + |delta|)
    dq = scale (dS k):   scale (E_dS |k| + Lk u |dS| |k|) + 2 u |dq|
    dk = dS^T (scale q): E_dS^T |q_s| + Lq u |dS|^T |q_s| + u |dk|
  where E_out = E_P |v| + Lk u P |v| + u |out| is the forward's."""
  u = 2.0 ** -24
  d = q.shape[-1]
  scale = np.float64(np.float32(d ** -0.5))
  qs = np.asarray(np.float32(np.asarray(q, np.float64) * scale), np.float64)  # the path scales q in float32
  k, v, g = (np.asarray(x, np.float64) for x in (k, v, g))
  lq, lk = q.shape[1], k.shape[1]
  mm = lambda spec, a, b: np.einsum(spec, a, b)
  s = mm("bqhd,bkhd->bhqk", qs, k)
  e_s = d * u * mm("bqhd,bkhd->bhqk", np.abs(qs), np.abs(k))
  lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) + s.max(-1, keepdims=True)
  p = np.exp(s - lse)
  e_p = p * (e_s + e_s.max(-1, keepdims=True) + 2.0 ** -21 + lk * u + u * np.abs(s - lse)) + 2.0 ** -125
  out = mm("bhqk,bkhd->bqhd", p, v)
  e_out = mm("bhqk,bkhd->bqhd", e_p, np.abs(v)) + lk * u * mm("bhqk,bkhd->bqhd", p, np.abs(v)) + u * np.abs(out)
  dv = mm("bhqk,bqhd->bkhd", p, g)
  e_dv = mm("bhqk,bqhd->bkhd", e_p, np.abs(g)) + lq * u * mm("bhqk,bqhd->bkhd", p, np.abs(g)) + u * np.abs(dv)
  dp = mm("bqhd,bkhd->bhqk", g, v)
  e_dp = d * u * mm("bqhd,bkhd->bhqk", np.abs(g), np.abs(v)) + u * np.abs(dp)
  delta = (p * dp).sum(-1, keepdims=True)
  rows = lambda x: np.moveaxis(x.sum(-1), 1, 2)[..., None]  # [B, Lq, H, D] summed over D -> [B, H, Lq, 1]
  e_delta = np.maximum((e_p * np.abs(dp) + p * e_dp).sum(-1, keepdims=True) + lk * u * (p * np.abs(dp)).sum(
      -1, keepdims=True), rows(d * u * np.abs(g) * np.abs(out) + np.abs(g) * e_out)) + u * np.abs(delta)
  ds = p * (dp - delta)
  e_ds = e_p * np.abs(dp - delta) + p * (e_dp + e_delta) + 2 * u * p * (np.abs(dp) + np.abs(delta))
  dqs = mm("bhqk,bkhd->bqhd", ds, k)
  dq = scale * dqs
  e_dq = scale * (mm("bhqk,bkhd->bqhd", e_ds, np.abs(k)) + lk * u * mm("bhqk,bkhd->bqhd", np.abs(ds), np.abs(k)))
  e_dq += 2 * u * np.abs(dq)
  dk = mm("bhqk,bqhd->bkhd", ds, qs)
  e_dk = mm("bhqk,bqhd->bkhd", e_ds, np.abs(qs)) + lq * u * mm("bhqk,bqhd->bkhd", np.abs(ds), np.abs(qs))
  e_dk += u * np.abs(dk)
  return (dq, dk, dv), (e_dq, e_dk, e_dv)


@needs_kernel
@pytest.mark.parametrize("b,lq,lk,h,d,scale", [
    (1, 1, 1, 1, 1, 1.0), (2, 37, 50, 3, 40, 1.0), (1, 17, 300, 2, 64, 3.0), (1, 130, 129, 1, 33, 1.0),
    (1, 20, 16, 2, 128, 1.0), (1, 401, 401, 12, 64, 1.0), (1, 1700, 1700, 6, 40, 3.0), (3, 5, 97, 2, 7, 10.0)])
def test_fused_gradients_equal_float64_and_the_unfused_paths_within_float32_rounding(
    monkeypatch, b, lq, lk, h, d, scale):
  """Differentiated in float32, layers.attention is the fused forward and one fused backward call
  (gemm.fused_attention_bwd: probabilities recomputed from the log-sum-exp, never stored whole); its
  value and gradients are within float32 rounding (the bound of _grad_ref_and_bounds) of float64 and of XLA's
  backward of the unfused path, at the forward test's geometries."""
  rng = np.random.default_rng(b * 11 + lq + lk + d)
  q, k, v = _operands(rng, b, lq, lk, h, d, scale)
  ct = jnp.asarray(rng.standard_normal((b, lq, h, d)), jnp.float32)
  loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, query_chunk=256) * ct)
  grads = lambda q, k, v: jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  text = _jit(grads).lower(q, k, v).as_text()
  assert "@san_f32_attention(" in text and "@san_f32_attention_bwd(" in text
  fused = [np.asarray(x, np.float64) for x in _jit(grads)(q, k, v)]
  refs, bounds = _grad_ref_and_bounds(q, k, v, ct)
  monkeypatch.setattr(gemm, "attention_applies", lambda *a: False)
  assert "san_f32_attention" not in _jit(grads).lower(q, k, v).as_text()
  unfused = [np.asarray(x, np.float64) for x in _jit(grads)(q, k, v)]
  for name, got, xla, ref, bound in zip(("dq", "dk", "dv"), fused, unfused, refs, bounds):
    err = np.abs(got - ref)
    assert np.all(err <= bound), (f"{name}: max err {err.max():.3g}, bound at the worst element "
                                  f"{bound.flat[err.argmax()]:.3g}")
    assert np.all(np.abs(xla - ref) <= bound), name  # the bound is not the kernel's alone
    assert np.all(np.abs(got - xla) <= 2 * bound), name


@needs_kernel
def test_bfloat16_gradients_keep_the_unfused_backward():
  """bf16 under a gradient: the unfused path's forward and backward (layers._fused_forward), no float32
  backward call."""
  q, k, v = (x.astype(jnp.bfloat16) for x in _operands(np.random.default_rng(3), 1, 120, 120, 2, 32))
  if not gemm.attention_applies(q, k, v):
    pytest.skip(f"no bf16 attention kernel here: {gemm.availability()[1]}")
  loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v).astype(jnp.float32))
  text = _jit(lambda q, k, v: jax.grad(loss, argnums=(0, 1, 2))(q, k, v)).lower(q, k, v).as_text()
  assert "san_f32_attention_bwd" not in text


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
  # the backward's own checks: its cotangent must have q's shape
  v, lse = jnp.zeros((1, 5, 2, 8), jnp.float32), jnp.zeros((1, 2, 4), jnp.float32)
  g = jnp.zeros((1, 3, 2, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"g \(1, 3, 2, 8\) float32"):
    gemm.fused_attention_bwd(q, k, v, q, lse, g)
  grads = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  with pytest.raises(Exception, match=r"san_f32_attention_bwd: g and dq must be q's shape \[1, 4, 2, 8\].*"
                                      r"got g \[1, 3, 2, 8\]"):
    jax.block_until_ready(jax.ffi.ffi_call("san_f32_attention_bwd", grads)(q, k, v, q, lse, g))


@needs_kernel
def test_the_kernel_stays_in_bounds_under_address_sanitizer(tmp_path):
  """tests/native/f32_attention_asan.cc built with -fsanitize=address,undefined against csrc/ (the same
  sources the library is built from): the kernel and its backward on edge geometries in exactly sized buffers, against a
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


STEP_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from san_jax.models import layers
from san_jax.train import sharding, steps
from tests.train_utils import model_config, tiny_batch, tiny_config
layers.F32_FUSED_MIN_LOGITS = 1  # the tiny model's attention is below the size the kernel starts at
def calls(data, deterministic):
  cfg = tiny_config(deterministic_reductions=deterministic)
  cfg.mesh.shape.data, cfg.mesh.shape.fsdp, cfg.mesh.shape.model = data, 1, 1
  mesh = sharding.make_mesh(cfg.mesh.shape.to_dict(), jax.devices()[:data])
  tr = steps.Trainer(model_config(cfg), cfg.train, mesh, [tuple(r) for r in cfg.mesh.rules], 3)
  state, frozen = tr.init(jax.random.key(0))
  batch = sharding.global_batch(tiny_batch(batch_size=2), mesh, tr.rules)
  ce = jnp.zeros((3, 32), jnp.float32)
  step = tr.compile_step({k: v.ndim for k, v in batch.items()})
  with jax.set_mesh(mesh):
    text = step.jitted.lower(*step.args(state, frozen, batch, ce, jax.random.key(1))).as_text()
  return sorted(t for t in ("san_f32_attention", "san_f32_attention_bwd") if f"@{t}(" in text)
print(json.dumps([calls(1, False), calls(2, False), calls(2, True)]))
"""


@needs_kernel
def test_the_one_device_train_step_runs_the_fused_attention_and_its_backward():
  """A train step on one device has nothing to partition (steps.Trainer.step_fn applies no activation
  rules there), so its attention is the fused forward and backward, as in inference; a step XLA partitions
  over two devices keeps XLA's attention (a custom call would run whole on each); the deterministic step's
  shard_map computes each device's share whole, with the fused calls again. Lowered only (no compile)."""
  import json
  import os
  import subprocess
  import sys
  from pathlib import Path
  repo = Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(repo),
             JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", STEP_SCRIPT], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
  both = ["san_f32_attention", "san_f32_attention_bwd"]
  assert json.loads(run.stdout.strip().splitlines()[-1]) == [both, [], both], run.stdout[-2000:]

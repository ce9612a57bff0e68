"""layers.attention's implementation switch: the exact path stays the CPU default, bit for bit; jax.nn's
"xla" implementation computes the same attention; "auto" picks cuDNN only where cuDNN applies."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from san_jax.models import layers


def _qkv_bias(length: int, head_dim: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(1, length, 4, head_dim)).astype(np.float32)) for _ in range(3))
  bias = jnp.asarray(3 * rng.normal(size=(1, 4, length, length)).astype(np.float32))
  return q, k, v, bias


@pytest.mark.parametrize("length,chunk", [(300, 128), (700, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_xla_implementation_equals_exact_path(length, chunk, with_bias):
  """jax.nn.dot_product_attention(implementation="xla") scales the float32 logits, the exact path scales q
  (head dim 40: 40**-0.5 is inexact, so they round differently): measured max |diff| 4e-7 to 7e-7 of the
  largest output (1.5e-6 absolute at most; also 1.5e-6 of it at 1,700 tokens); bound 1e-5 of it."""
  q, k, v, bias = _qkv_bias(length, 40)
  b = bias if with_bias else None
  with jax.default_matmul_precision("float32"):  # no TF32 where a GPU runs this
    exact = layers.attention(q, k, v, b, query_chunk=chunk, impl="exact")
    xla = layers.attention(q, k, v, b, query_chunk=chunk, impl="xla")
  assert float(jnp.max(jnp.abs(xla - exact))) <= 1e-5 * float(jnp.max(jnp.abs(exact)))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU default is what is tested")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_default_is_the_exact_path_bit_for_bit(dtype):
  """On CPU, "auto" is the exact path: identical bits (the "xla" implementation's differ, so the check can
  tell them apart), and nothing of cuDNN in the compiled program."""
  q, k, v, _ = _qkv_bias(300, 40)
  q, k, v = (t.astype(dtype) for t in (q, k, v))
  auto = jax.jit(lambda *a: layers.attention(*a, query_chunk=128))
  exact = jax.jit(lambda *a: layers.attention(*a, query_chunk=128, impl="exact"))
  xla = jax.jit(lambda *a: layers.attention(*a, query_chunk=128, impl="xla"))
  assert np.array_equal(np.asarray(auto(q, k, v)), np.asarray(exact(q, k, v)))
  assert not np.array_equal(np.asarray(xla(q, k, v)), np.asarray(exact(q, k, v)))
  hlo = auto.lower(q, k, v).compile().as_text()
  # the only custom calls allowed are ops/gemm.py's: the bf16 GEMM and fused attention (CPUs with
  # AVX512-BF16), the fused float32 attention (AVX2 + FMA)
  assert "cudnn" not in hlo.lower()
  assert set(re.findall(r'custom_call_target="([^"]+)"', hlo)) <= {"san_bf16_gemm", "san_bf16_attention",
                                                                    "san_f32_attention"}


def test_auto_picks_cudnn_only_where_it_applies():
  pick = layers.attention_impl
  bf16, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
  assert pick("auto", bf16, 40, False, backend="gpu") == "cudnn"  # the side ViT
  assert pick("auto", f16, 64, False, backend="gpu") == "cudnn"   # CLIP B/16 and L/14
  assert pick("auto", f32, 64, False, backend="gpu") == "exact"   # float32: the parity precision
  assert pick("auto", bf16, 36, False, backend="gpu") == "exact"  # head dim not a multiple of 8
  assert pick("auto", bf16, 136, False, backend="gpu") == "exact"
  assert pick("auto", bf16, 64, True, backend="gpu") == "exact"   # the text tower's causal bias
  assert pick("auto", bf16, 64, False, backend="cpu") == "exact"
  assert pick("xla", f32, 36, True, backend="cpu") == "xla"
  assert pick("cudnn", bf16, 64, True, backend="gpu") == "cudnn"  # asked for: jax takes the bias


def test_explicit_cudnn_that_cannot_apply_names_why():
  with pytest.raises(ValueError, match=r"attention_impl='cudnn' does not apply: backend 'cpu' is not 'gpu'; "
                                       r"dtype float32 is not bfloat16/float16"):
    layers.attention_impl("cudnn", jnp.float32, 64, False, backend="cpu")
  with pytest.raises(ValueError, match=r"attention_impl='flash': expected one of \['auto', 'exact', 'xla', 'cudnn'\]"):
    layers.attention_impl("flash", jnp.bfloat16, 64, False)


def test_models_take_the_implementation_from_their_configs():
  """SANConfig's clip.attention_impl / side.attention_impl reach every attention module of the CLIP image
  tower (recognition head included) and of the side ViT; the text tower keeps "auto" (its causal bias
  makes that the exact path); a bad name fails when the model is built."""
  import dataclasses

  from flax import nnx

  from san_jax.models import san
  from tests.train_utils import model_config, tiny_config
  cfg = model_config(tiny_config())
  cfg = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, attention_impl="xla"),
                            side=dataclasses.replace(cfg.side, attention_impl="exact"))
  model = san.SAN(cfg, rngs=nnx.Rngs(0))
  impls = lambda module: [m.attention_impl for _, m in nnx.iter_graph(module)
                          if isinstance(m, nnx.Module) and hasattr(m, "attention_impl")]
  assert impls(model.clip_visual) == ["xla"] * cfg.clip.vision.layers
  assert impls(model.side_adapter_network) == ["exact"] * cfg.side.depth
  assert impls(model.ov_classifier) == ["auto"] * cfg.clip.text.layers
  bad = dataclasses.replace(cfg, side=dataclasses.replace(cfg.side, attention_impl="flash"))
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    san.SAN(bad, rngs=nnx.Rngs(0))


def test_attention_impl_is_not_geometry():
  """A checkpoint's geometry check ignores which kernel runs attention (as it ignores query chunks)."""
  import dataclasses

  from san_jax import pretrained
  from san_jax.models import san
  cfg = san.san_config("san_vit_b16")
  other = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, attention_impl="cudnn"),
                              side=dataclasses.replace(cfg.side, attention_impl="xla", heads=8))
  assert pretrained.geometry_differences(cfg, other) == {"side.heads": (6, 8)}


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("head_dim", [40, 64])
def test_cudnn_matches_exact_path_in_bfloat16_on_gpu(head_dim):
  """On a GPU, "auto" in bfloat16 is cuDNN's fused attention (a custom call in the compiled program) and
  equals the exact bfloat16 path within bfloat16 rounding. Not yet measured on a GPU: the bound is 2 bf16
  ulps (2 * 2**-7 relative) of the largest output, both paths rounding the softmax weights to bfloat16."""
  q, k, v, _ = _qkv_bias(1700, head_dim)
  q, k, v = (t.astype(jnp.bfloat16) for t in (q, k, v))
  auto = jax.jit(lambda *a: layers.attention(*a, query_chunk=256))
  assert "cudnn" in auto.lower(q, k, v).compile().as_text().lower()
  exact = layers.attention(q, k, v, query_chunk=256, impl="exact").astype(jnp.float32)
  got = auto(q, k, v).astype(jnp.float32)
  assert float(jnp.max(jnp.abs(got - exact))) <= 2 * 2 ** -7 * float(jnp.max(jnp.abs(exact)))


def test_softmax_is_jax_nn_forward_and_its_gradient_within_the_dot_rounding_bound():
  """layers.softmax: jax.nn.softmax's forward, bit for bit; its backward y * (g - sum_k g_k y_k) with the
  row sum taken as a dot. Checked against the float64 formula with the rounding bound of a float32 dot of
  n terms (gamma_n * sum |g_k y_k|, gamma_n = n u / (1 - n u)) plus a few ulps of the final products."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(3 * rng.normal(size=(2, 3, 40, 1700)).astype(np.float32))
  g = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  y, vjp = jax.vjp(layers.softmax, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.nn.softmax(x, axis=-1)))
  got = np.asarray(jax.jit(vjp)(g)[0], np.float64)
  y64, g64 = np.asarray(y, np.float64), np.asarray(g, np.float64)
  dot = np.sum(g64 * y64, axis=-1, keepdims=True)
  want = y64 * (g64 - dot)
  u, n = 2.0 ** -24, x.shape[-1]
  gamma = n * u / (1 - n * u)
  bound = y64 * (gamma * np.sum(np.abs(g64 * y64), axis=-1, keepdims=True) + 4 * u * np.abs(g64 - dot)) + 1e-45
  assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) / bound))
  # and a wrong backward (the row sum dropped) is far outside it
  assert not np.all(np.abs(y64 * g64 - want) <= bound)

"""Rematerialisation (SANConfig.remat, layers.rematerialized): the same gradients as without it, and the
backward's temporaries actually shrink on XLA:CPU (where `jax.checkpoint` alone does not shrink them).

The whole SAN with remat "full" (the default) is checked against the official code by the golden cases
(tests/test_san_model.py: tiny_b16's gradients of the side network and CLIP's positional embedding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from san_jax.models import clip as clip_lib
from san_jax.models import rec_head
from san_jax.models import san as san_lib
from san_jax.models.side_adapter import SideAdapterConfig, SideAdapterNetwork
from tests import train_utils

VISION = clip_lib.VisionConfig(image_size=64, patch_size=16, width=64, layers=4, heads=4, output_dim=32)
SIDE = SideAdapterConfig(image_size=128, width=48, depth=3, heads=3, num_queries=8, clip_width=64,
                         fusion_map=((0, 0), (1, 1), (2, 2)), deep_supervision_idxs=(2, 3), attn_bias_heads=4,
                         attn_bias_embed=32, attn_bias_mlp=32)


def _grads(remat: str):
  """Gradients of a loss through CLIP blocks 0-1 (frozen), the recognition blocks 2-3 (frozen) and the
  side network (trainable), w.r.t. CLIP's positional embedding and every side-network parameter."""
  visual = clip_lib.VisionTransformer(VISION, rngs=nnx.Rngs(0), remat=remat)
  side = SideAdapterNetwork(SIDE, rngs=nnx.Rngs(1), remat=remat)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 128, 160, 3)).astype(np.float32))
  clip_in = images[:, ::2, ::2]  # 64x80: a 4x5 CLIP grid
  vis_def, pos, vis_rest = nnx.split(visual, lambda p, _: p[-1] == "positional_embedding", ...)
  side_def, side_params = nnx.split(side)

  def loss_fn(pos, side_params):
    vis = nnx.merge(vis_def, pos, vis_rest)
    sn = nnx.merge(side_def, side_params)
    _, taps = vis(clip_in, stop_at_layer=2)
    maps = {i: clip_lib.tokens_to_map(taps[i], (4, 5))[1] for i in (0, 1, 2)}
    outs = sn(images, maps)
    bias = jnp.stack([a for _, a in outs], axis=1)
    embs, _ = rec_head.recognize(vis, taps[2], (4, 5), bias, 2)
    masks = jnp.stack([m for m, _ in outs], axis=1)
    return jnp.sum(embs * jnp.arange(embs.shape[-1])) + jnp.mean(jnp.tanh(masks))

  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(pos, side_params)


def test_remat_same_loss_and_gradients():
  """remat "full" recomputes the same ops: equal up to float reassociation. Tolerance 1e-5 of each leaf's
  largest gradient, ~10x the largest deviation measured (0 for most leaves, where XLA fuses alike)."""
  ref_loss, ref = _grads("none")
  loss, got = _grads("full")
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  ref_flat = jax.tree_util.tree_leaves_with_path(ref)
  got_flat = jax.tree_util.tree_leaves_with_path(got)
  assert [p for p, _ in ref_flat] == [p for p, _ in got_flat]
  pos_grad = np.asarray(ref_flat[0][1])
  assert pos_grad.shape == (VISION.grid_size ** 2 + 1, VISION.width) and np.abs(pos_grad).max() > 0
  for (path, r), (_, g) in zip(ref_flat, got_flat):
    r, g = np.asarray(r), np.asarray(g)
    assert np.abs(g - r).max() <= 1e-5 * max(np.abs(r).max(), 1e-12), (jax.tree_util.keystr(path),
                                                                         np.abs(g - r).max(), np.abs(r).max())


def _block_stack_temp_bytes(remat: str) -> int:
  """XLA's temporaries for the gradient through 6 frozen CLIP blocks at 512 tokens (w.r.t. the input)."""
  tf = clip_lib.Transformer(64, 6, 4, 4.0, True, rngs=nnx.Rngs(0), remat=remat)
  x = jnp.ones((1, 512, 64), jnp.float32)
  fn = jax.jit(jax.grad(lambda x: jnp.sum(tf(x) ** 2)))
  return fn.lower(x).compile().memory_analysis().temp_size_in_bytes


def test_remat_shrinks_backward_temporaries():
  """Without remat the backward keeps every block's [1, 4, 512, 512] float32 attention probabilities
  (4 MiB each) and MLP activations; with it, about one block's. Measured here: none ~39 MiB, full ~12 MiB;
  the bound (half) leaves room for XLA's choices."""
  none, full = _block_stack_temp_bytes("none"), _block_stack_temp_bytes("full")
  assert full < 0.5 * none, {"none": none, "full": full}


def test_remat_unknown_value_is_refused():
  cfg = dataclasses.replace(train_utils.model_config(train_utils.tiny_config()), remat="some")
  with pytest.raises(ValueError, match="remat='some'"):
    san_lib.SAN(cfg, rngs=nnx.Rngs(0))

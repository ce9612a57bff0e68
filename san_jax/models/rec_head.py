"""SAN's recognition head: the last CLIP blocks re-run with Q "SOS" copies of the class token that see
the image only through the side adapter's attention biases.

The official head builds one (Q+1+L)^2 mask per (image, head): SOS rows see their own column (0), the
other SOS and the CLS columns at -100, and the patch columns through the bias; CLS and patch rows see
CLS and patches freely and the SOS columns at -100. A -100 logit weighs exp(-100) ~ 4e-44 against the
rest, below float32 resolution, so the CLS/patch stream is just CLIP's own forward: it is computed once
here and shared by every SOS stream (every deep-supervision output in one batched pass), while the SOS
rows keep every term of the official row (the -100 columns included). Parameters are CLIP's: the blocks
`feature_last_layer_idx..end`, `ln_post` and `proj` of the image tower.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from san_jax.models import clip as clip_lib
from san_jax.models import layers
from san_jax.ops import resize

MASKED = -100.0  # the official mask value for "do not attend"


def downsample_bias(bias: jax.Array, grid_hw: Tuple[int, int], method: str = "max") -> jax.Array:
  """[..., h, w] -> [..., h', w'] as the official `downsample2d` (adaptive pooling or interpolation)."""
  if tuple(bias.shape[-2:]) == tuple(grid_hw) and method in ("max", "avg"):
    return bias
  if method == "max":
    return resize.adaptive_max_pool2d(bias, grid_hw)
  if method == "avg":
    return adaptive_avg_pool2d(bias, grid_hw)
  if method in ("bilinear", "bicubic"):
    return resize.interpolate(bias, size=grid_hw, method=method, axes=(-2, -1))
  raise ValueError(f"unknown attention-bias downsample method {method!r}; expected max, avg, bilinear, bicubic")


def adaptive_avg_pool2d(x: jax.Array, output_size: Tuple[int, int]) -> jax.Array:
  """`F.adaptive_avg_pool2d` over the last two axes (same windows as the max pool)."""

  def pool_matrix(n_in, n_out):
    m = np.zeros((n_out, n_in), np.float32)
    for i, (lo, hi) in enumerate(resize.adaptive_windows(n_in, n_out)):
      m[i, lo:hi] = 1.0 / (hi - lo)
    return m

  mh = jnp.asarray(pool_matrix(x.shape[-2], output_size[0]))
  mw = jnp.asarray(pool_matrix(x.shape[-1], output_size[1]))
  return jnp.einsum("...hw,ih,jw->...ij", x, mh, mw, precision=jax.lax.Precision.HIGHEST)


def _rec_block(block: clip_lib.ResidualAttentionBlock, ctx: jax.Array, sos: jax.Array, bias: jax.Array,
               update_ctx: bool) -> Tuple[jax.Array, jax.Array]:
  """One CLIP block on the shared [CLS; patches] stream `ctx` [B, 1+L, D] and the SOS streams
  `sos` [B, N, Q, D] (N bias sets), SOS rows biased by `bias` [B, N, heads, Q, L]."""
  attn = block.attn
  heads = attn.heads
  ctx, sos = (layers.constrain(t, layers.tokens_axes(t.ndim)) for t in (ctx, sos))
  h_ctx = block.ln_1(ctx)
  k_ctx = layers.split_heads(attn.k_proj(h_ctx), heads)  # [B, 1+L, H, dh]
  v_ctx = layers.split_heads(attn.v_proj(h_ctx), heads)
  h_sos = block.ln_1(sos)
  head_dim = k_ctx.shape[-1]
  q_sos = layers.split_heads(attn.q_proj(h_sos), heads) * jnp.asarray(head_dim ** -0.5, sos.dtype)  # [B,N,Q,H,dh]
  k_sos = layers.split_heads(attn.k_proj(h_sos), heads)
  v_sos = layers.split_heads(attn.v_proj(h_sos), heads)

  f32 = jnp.float32
  n_q = sos.shape[2]
  logits_sos = jnp.einsum("bnqhd,bnkhd->bnhqk", q_sos, k_sos, preferred_element_type=f32)
  logits_sos = logits_sos + jnp.where(jnp.eye(n_q, dtype=bool), 0.0, MASKED).astype(f32)
  logits_ctx = jnp.einsum("bnqhd,bkhd->bnhqk", q_sos, k_ctx, preferred_element_type=f32)
  logits_ctx = jnp.concatenate([logits_ctx[..., :1] + MASKED, logits_ctx[..., 1:] + bias.astype(f32)], axis=-1)
  weights = layers.softmax(jnp.concatenate([logits_sos, logits_ctx], axis=-1)).astype(sos.dtype)
  out = (jnp.einsum("bnhqk,bnkhd->bnqhd", weights[..., :n_q], v_sos)
         + jnp.einsum("bnhqk,bkhd->bnqhd", weights[..., n_q:], v_ctx))
  sos = sos + attn.out_proj(out.reshape(sos.shape))
  sos = sos + block.mlp(block.ln_2(sos))

  if update_ctx:  # the plain CLIP block, reusing k/v
    q_ctx = layers.split_heads(attn.q_proj(h_ctx), heads)
    ctx_out = layers.attention(q_ctx, k_ctx, v_ctx, query_chunk=attn.query_chunk, impl=attn.attention_impl,
                               dtype=attn.q_proj.dtype)
    ctx = ctx + attn.out_proj(ctx_out.reshape(ctx.shape))
    ctx = ctx + block.mlp(block.ln_2(ctx))
  return ctx, sos


def recognize(visual: clip_lib.VisionTransformer, tokens: jax.Array, grid_hw: Tuple[int, int],
              attn_bias: jax.Array, start_block: int, downsample_method: str = "max") -> Tuple[jax.Array, jax.Array]:
  """Mask embeddings from CLIP tokens of layer `start_block` and the side adapter's biases.

  tokens: [B, 1+h*w, D] (CLS then patches) after CLIP block `start_block`; attn_bias:
  [B, N, layers, heads, Q, hs, ws] for N bias sets (deep-supervision outputs). Returns the L2-normalised
  mask embeddings [B, N, Q, E] and the downsampled biases [B, N, layers, heads, Q, h, w]. Each block is
  rematerialised as the tower's blocks are (`visual.transformer.remat`).
  """
  blocks = visual.transformer.resblocks
  n_rec = len(blocks) - start_block
  if n_rec <= 0:
    raise ValueError(f"feature_last_layer_idx={start_block} leaves no CLIP block for recognition "
                     f"(the tower has {len(blocks)})")
  b, n_sets, n_layers, n_heads, n_q = attn_bias.shape[:5]
  clip_heads = blocks[start_block].attn.heads
  if n_heads not in (1, clip_heads):
    raise ValueError(f"attention bias has {n_heads} heads; CLIP recognition blocks have {clip_heads} (or use 1)")
  if n_layers not in (1, n_rec):
    raise ValueError(f"attention bias has {n_layers} layers; expected 1 or {n_rec} (one per recognition block)")
  small = downsample_bias(attn_bias, grid_hw, downsample_method)
  flat = small.reshape(small.shape[:5] + (grid_hw[0] * grid_hw[1],))
  flat = jnp.broadcast_to(flat, flat.shape[:3] + (clip_heads,) + flat.shape[4:])
  sos = jnp.broadcast_to(tokens[:, None, None, 0], (b, n_sets, n_q, tokens.shape[-1]))  # copies of CLS
  ctx = tokens
  for r in range(n_rec):
    layer_bias = flat[:, :, r if n_layers > 1 else 0]
    update_ctx = r < n_rec - 1
    block = layers.rematerialized(
        lambda blk, c, s, bb, update_ctx=update_ctx: _rec_block(blk, c, s, bb, update_ctx),
        blocks[start_block + r], visual.transformer.remat)
    ctx, sos = block(ctx, sos, layer_bias)
  return clip_lib.l2_normalize(visual.head(sos)), small

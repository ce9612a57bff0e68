"""SAN's side adapter network: a small timm-style ViT with learnable queries, CLIP-feature fusion and an
MLP mask decoder that emits mask logits and per-head attention biases.

Attribute paths mirror the official `side_adapter_network.*` state-dict keys: `query_embed`,
`query_pos_embed`, `vit_model.{pos_embed, patch_embed.proj, blocks[i].{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}}`, `fusion_layers.layer_<j>.input_proj[0 (LayerNorm), 1 (1x1 conv)]`,
`mask_decoder.{query_mlp, pix_mlp, attn_mlp}.layers[i]`, `mask_decoder.bias_scaling`.
Layout: images NHWC; pixel maps NHWC; outputs mask_preds [B, Q, h, w] and attention biases
[B, layers, heads, Q, h, w] (the official layout, with the layer chunks stacked).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from san_jax.models import layers
from san_jax.ops import resize

SIDE_LN_EPS = 1e-6  # timm ViT and the fusion's channel LayerNorm


@dataclasses.dataclass(frozen=True)
class SideAdapterConfig:
  image_size: int = 640          # the pos_embed grid is image_size // patch_size
  patch_size: int = 16
  width: int = 240
  depth: int = 8
  heads: int = 6
  mlp_ratio: float = 4.0
  num_queries: int = 100
  clip_width: int = 768
  # (clip_layer, side_block): CLIP layer i is fused after side block j (1-based; j=0: before block 1).
  fusion_map: Tuple[Tuple[int, int], ...] = ((0, 0), (3, 1), (6, 2), (9, 3))
  deep_supervision_idxs: Tuple[int, ...] = (7, 8)
  attn_bias_heads: int = 12
  attn_bias_layers: int = 1
  attn_bias_embed: int = 256
  attn_bias_mlp: int = 256
  attn_bias_mlp_layers: int = 3
  rescale_attn_bias: bool = True
  # Queries per attention block: the ~1,700-token logits never exist whole (CPU cache); None = one block.
  attention_query_chunk: Optional[int] = 256
  # How the side ViT's attention runs (layers.attention_impl): "auto" = cuDNN on a GPU in bf16/fp16.
  attention_impl: str = "auto"

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def validate(self):
    blocks = {j for _, j in self.fusion_map}
    if any(not 0 <= j <= self.depth for j in blocks) or len(blocks) != len(self.fusion_map):
      raise ValueError(f"fusion_map {self.fusion_map}: side blocks must be distinct and in [0, {self.depth}]")
    if not self.deep_supervision_idxs or any(not 1 <= i <= self.depth for i in self.deep_supervision_idxs):
      raise ValueError(f"deep_supervision_idxs {self.deep_supervision_idxs} must be in [1, {self.depth}]")
    if self.width % self.heads:
      raise ValueError(f"side width {self.width} not divisible by {self.heads} heads")


def parse_fusion_map(entries: Sequence[str]) -> Tuple[Tuple[int, int], ...]:
  """["0->0", "3->1"] -> ((0, 0), (3, 1))."""
  out = []
  for e in entries:
    try:
      src, dst = (int(s) for s in str(e).split("->"))
    except ValueError as err:
      raise ValueError(f"bad FUSION_MAP entry {e!r}; expected 'clip_layer->side_block'") from err
    out.append((src, dst))
  return tuple(out)


class Attention(nnx.Module):
  """timm Attention: fused qkv Linear, softmax(q k^T / sqrt(d)) v, proj."""

  def __init__(self, width: int, heads: int, *, rngs, dtype=None, param_dtype=jnp.float32, query_chunk=None,
               attention_impl: str = "auto"):
    self.heads = heads
    self.query_chunk = query_chunk
    self.attention_impl = layers.check_attention_impl(attention_impl)
    self.qkv = layers.linear(width, 3 * width, ("embed", "heads"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = layers.linear(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    b, n, d = x.shape
    qkv = layers.constrain(self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads),
                           ("batch", "length", None, "heads"))
    out = layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], query_chunk=self.query_chunk,
                           impl=self.attention_impl, dtype=self.qkv.dtype)
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, *, rngs, dtype=None, param_dtype=jnp.float32):
    self.fc1 = layers.linear(width, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc2 = layers.linear(hidden, width, ("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    return self.fc2(layers.gelu_exact(layers.constrain(self.fc1(x), layers.tokens_axes(x.ndim, "mlp"))))


class Block(nnx.Module):
  def __init__(self, cfg: SideAdapterConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.layer_norm(cfg.width, SIDE_LN_EPS, **kw)
    self.attn = Attention(cfg.width, cfg.heads, query_chunk=cfg.attention_query_chunk,
                          attention_impl=cfg.attention_impl, **kw)
    self.norm2 = layers.layer_norm(cfg.width, SIDE_LN_EPS, **kw)
    self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), **kw)

  def __call__(self, x):
    x = layers.constrain(x, layers.tokens_axes(x.ndim))
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nnx.Module):
  def __init__(self, cfg: SideAdapterConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
    p = cfg.patch_size
    self.patch_size = p
    self.proj = nnx.Conv(3, cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype, param_dtype=param_dtype,
                         kernel_init=layers.with_axes(layers.default_kernel_init, (None, None, None, "embed")),
                         bias_init=layers.with_axes(layers.zeros, ("embed",)), rngs=rngs)

  def __call__(self, images):
    p = self.patch_size
    if images.shape[1] < p or images.shape[2] < p:
      raise ValueError(f"side adapter input {images.shape[1]}x{images.shape[2]} is smaller than one {p}x{p} patch")
    x = self.proj(images)  # VALID conv: the remainder is dropped, as torch's strided conv does
    b, h, w, d = x.shape
    return x.reshape(b, h * w, d), (h, w)


class VisionTransformer(nnx.Module):
  """The side ViT's parameters (no class token, no final norm); the forward lives in SideAdapterNetwork."""

  def __init__(self, cfg: SideAdapterConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.patch_embed = PatchEmbed(cfg, **kw)
    self.pos_embed = layers.param(rngs, nnx.initializers.truncated_normal(0.02), (1, cfg.grid_size ** 2, cfg.width),
                                  (None, None, "embed"), param_dtype)
    self.blocks = nnx.List([Block(cfg, **kw) for _ in range(cfg.depth)])


class AddFusion(nnx.Module):
  """CLIP map -> channel LayerNorm -> 1x1 conv to the side width -> bilinear resize -> added to the tokens."""

  def __init__(self, side_width: int, clip_width: int, *, rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.input_proj = nnx.List([
        layers.layer_norm(clip_width, SIDE_LN_EPS, axis_name="clip_embed", **kw),
        layers.linear(clip_width, side_width, ("clip_embed", "embed"), **kw),  # the 1x1 conv
    ])

  def __call__(self, tokens: jax.Array, clip_map: jax.Array, grid_hw: Tuple[int, int]) -> jax.Array:
    y = self.input_proj[1](self.input_proj[0](clip_map))  # [B, h', w', d]
    y = resize.interpolate(y, size=grid_hw, method="bilinear", axes=(1, 2))
    return tokens + y.reshape(tokens.shape).astype(tokens.dtype)


class FusionLayers(nnx.Module):
  """Holds `layer_<j>` for every side block j that receives a CLIP feature."""

  def __init__(self, cfg: SideAdapterConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
    for _, j in cfg.fusion_map:
      setattr(self, f"layer_{j}", AddFusion(cfg.width, cfg.clip_width, rngs=rngs, dtype=dtype,
                                            param_dtype=param_dtype))


class MLP(nnx.Module):
  """n Linear layers (1x1 convs for pixel maps: same math on NHWC) with ReLU between them."""

  def __init__(self, in_dim: int, hidden: int, out_dim: int, n_layers: int, *, rngs, dtype=None,
               param_dtype=jnp.float32):
    dims = [in_dim] + [hidden] * (n_layers - 1) + [out_dim]
    self.layers = nnx.List([layers.linear(a, b, (None, "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                            for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class MLPMaskDecoder(nnx.Module):
  def __init__(self, cfg: SideAdapterConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.cfg = cfg
    n, mlp, emb = cfg.attn_bias_mlp_layers, cfg.attn_bias_mlp, cfg.attn_bias_embed
    self.query_mlp = MLP(cfg.width, mlp, emb, n, **kw)
    self.pix_mlp = MLP(cfg.width, mlp, emb, n, **kw)
    self.attn_mlp = MLP(cfg.width, mlp, emb * cfg.attn_bias_heads * cfg.attn_bias_layers, n, **kw)
    if cfg.rescale_attn_bias:
      self.bias_scaling = nnx.Linear(1, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, queries: jax.Array, pixels: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """queries [B, Q, d], pixels [B, h, w, d] -> mask logits [B, Q, h, w], bias [B, layers, heads, Q, h, w]."""
    cfg = self.cfg
    q = self.query_mlp(queries)
    pix = self.pix_mlp(pixels)
    mask_preds = jnp.einsum("bqc,bhwc->bqhw", q, pix)
    attn = self.attn_mlp(pixels)
    b, h, w, _ = attn.shape
    # torch reshapes the channel axis as (layers*heads, embed): heads outer, embed inner
    attn = attn.reshape(b, h, w, cfg.attn_bias_layers, cfg.attn_bias_heads, cfg.attn_bias_embed)
    bias = jnp.einsum("bqc,bhwlnc->blnqhw", q, attn)
    if cfg.rescale_attn_bias:
      kernel = self.bias_scaling.kernel[...].reshape(())
      bias = bias * kernel.astype(bias.dtype) + self.bias_scaling.bias[...].reshape(()).astype(bias.dtype)
    return mask_preds, bias


class SideAdapterNetwork(nnx.Module):
  """`remat` ("none" or "full"; see layers.rematerialized) applies to each ViT block when differentiated."""

  def __init__(self, cfg: SideAdapterConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
               remat: str = "none"):
    cfg.validate()
    self.cfg = cfg
    self.remat = layers.check_remat(remat)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    normal = nnx.initializers.normal(0.02)
    self.query_embed = layers.param(rngs, normal, (1, cfg.num_queries, cfg.width), (None, None, "embed"), param_dtype)
    self.query_pos_embed = layers.param(rngs, normal, (1, cfg.num_queries, cfg.width), (None, None, "embed"),
                                        param_dtype)
    self.vit_model = VisionTransformer(cfg, **kw)
    self.fusion_layers = FusionLayers(cfg, **kw)
    self.mask_decoder = MLPMaskDecoder(cfg, **kw)

  @property
  def clip_layers_read(self) -> Tuple[int, ...]:
    return tuple(sorted({i for i, _ in self.cfg.fusion_map}))

  def _patch_pos_embed(self, grid_hw: Tuple[int, int], num_tokens: int) -> jax.Array:
    pos = self.vit_model.pos_embed[...]
    if pos.shape[1] == num_tokens:  # resized only when the token count differs (the official rule)
      return pos
    g = self.cfg.grid_size
    grid = pos.reshape(1, g, g, -1)
    return resize.interpolate(grid, size=grid_hw, method="bicubic", axes=(1, 2)).reshape(1, num_tokens, -1)

  def _fuse(self, block_idx: int, x: jax.Array, clip_maps: Dict[int, jax.Array], grid_hw, num_tokens: int):
    for src, dst in self.cfg.fusion_map:
      if dst == block_idx:
        fusion = getattr(self.fusion_layers, f"layer_{dst}")
        x = jnp.concatenate([x[:, :-num_tokens], fusion(x[:, -num_tokens:], clip_maps[src], grid_hw)], axis=1)
    return x

  def __call__(self, images: jax.Array, clip_maps: Dict[int, jax.Array], *,
               deep_supervision_idxs: Optional[Sequence[int]] = None) -> List[Tuple[jax.Array, jax.Array]]:
    """images NHWC (normalised, padded); clip_maps {clip layer: [B, h', w', D]}.

    Returns [(mask_preds [B, Q, h, w], attn_bias [B, layers, heads, Q, h, w])] for each deep-supervision
    index asked for (default: all of the config's; inference asks only for the last).
    """
    cfg = self.cfg
    idxs = tuple(cfg.deep_supervision_idxs if deep_supervision_idxs is None else deep_supervision_idxs)
    missing = [i for i in self.clip_layers_read if i not in clip_maps]
    if missing:
      raise ValueError(f"side adapter needs CLIP layers {list(self.clip_layers_read)}; missing {missing}")
    x, grid_hw = self.vit_model.patch_embed(images)
    b, n = x.shape[0], x.shape[1]
    pos = jnp.concatenate([self.query_pos_embed[...], self._patch_pos_embed(grid_hw, n)], axis=1).astype(x.dtype)
    queries = jnp.broadcast_to(self.query_embed[...].astype(x.dtype), (b,) + self.query_embed[...].shape[1:])
    x = jnp.concatenate([queries, x], axis=1) + pos
    x = self._fuse(0, x, clip_maps, grid_hw, n)
    outs = []
    last = max(idxs)
    for i, blk in enumerate(self.vit_model.blocks, start=1):
      x = layers.rematerialized(lambda b, t: b(t), blk, self.remat)(x)
      x = self._fuse(i, x, clip_maps, grid_hw, n)
      if i in idxs:
        pixels = x[:, -n:].reshape(b, grid_hw[0], grid_hw[1], -1)
        outs.append(self.mask_decoder(x[:, :-n], pixels))
      if i >= last:
        break  # later blocks feed nothing that is asked for
      x = x + pos
    return outs

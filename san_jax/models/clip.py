"""CLIP image and text towers (OpenAI / open_clip architecture) in Flax NNX.

Attribute paths mirror open_clip's module names (`visual.transformer.resblocks[i].attn.out_proj`,
`ln_final`, `text_projection`, ...), so weight conversion is a table (convert/clip_checkpoint.py). The one
structural difference: torch's fused `attn.in_proj_weight` is held as `attn.q_proj/k_proj/v_proj`.

What SAN needs from CLIP and this module provides:
  * per-layer taps of the image tower (layer 0 = after ln_pre, layer i = after block i);
  * any input size, with the grid part of the positional embedding resized bicubically exactly as torch;
  * an additive attention bias in every block and a way to run a slice of blocks on a given sequence.
Layout: images are NHWC float (already normalised); token sequences are [B, L, D].
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from san_jax.models import layers
from san_jax.ops import resize

CLIP_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  output_dim: int = 512

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_ratio: float = 4.0
  output_dim: int = 512


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  quick_gelu: bool = True  # OpenAI weights were trained with QuickGELU
  # Long sequences split their queries into chunks of this size (CPU cache friendliness); None = whole.
  attention_query_chunk: Optional[int] = 256
  # How the image tower's attention runs (layers.attention_impl): "auto" = cuDNN flash attention on a GPU
  # in bfloat16/float16, the exact path everywhere else; "exact", "xla", "cudnn" force one. (The text
  # tower keeps "auto": its causal bias makes that the exact path.)
  attention_impl: str = "auto"

  @property
  def embed_dim(self) -> int:
    return self.vision.output_dim


def config_to_dict(cfg: CLIPConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_dict(d) -> CLIPConfig:
  """Inverse of `config_to_dict` (JSON-able); fields left out keep their defaults."""
  d = dict(d)
  return CLIPConfig(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


def _named(embed_dim, image_size, patch, v_width, v_layers, v_heads, t_width, t_heads, t_layers):
  return CLIPConfig(
      vision=VisionConfig(image_size=image_size, patch_size=patch, width=v_width, layers=v_layers,
                          heads=v_heads, output_dim=embed_dim),
      text=TextConfig(width=t_width, heads=t_heads, layers=t_layers, output_dim=embed_dim))


CLIP_VARIANTS: Dict[str, CLIPConfig] = {
    "ViT-B/32": _named(512, 224, 32, 768, 12, 12, 512, 8, 12),
    "ViT-B/16": _named(512, 224, 16, 768, 12, 12, 512, 8, 12),
    "ViT-L/14": _named(768, 224, 14, 1024, 24, 16, 768, 12, 12),
    "ViT-L/14-336": _named(768, 336, 14, 1024, 24, 16, 768, 12, 12),
}


def clip_config(name: str) -> CLIPConfig:
  """The config of a named OpenAI CLIP variant ("ViT-B/16", "ViT-L/14-336", ...)."""
  if name not in CLIP_VARIANTS:
    raise ValueError(f"unknown CLIP variant {name!r}; known: {sorted(CLIP_VARIANTS)}")
  return CLIP_VARIANTS[name]


def clip_config_from_open_clip(cfg: dict, quick_gelu: Optional[bool] = None) -> CLIPConfig:
  """From an open_clip model-config dict ({"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"})."""
  v, t = cfg["vision_cfg"], cfg["text_cfg"]
  v_width = int(v.get("width", 768))
  v_heads = v_width // int(v.get("head_width", 64))
  qg = cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu
  return CLIPConfig(
      vision=VisionConfig(image_size=int(v.get("image_size", 224)), patch_size=int(v["patch_size"]),
                          width=v_width, layers=int(v["layers"]), heads=v_heads,
                          mlp_ratio=float(v.get("mlp_ratio", 4.0)), output_dim=int(cfg["embed_dim"])),
      text=TextConfig(context_length=int(t.get("context_length", 77)), vocab_size=int(t.get("vocab_size", 49408)),
                      width=int(t.get("width", 512)), heads=int(t.get("heads", 8)), layers=int(t.get("layers", 12)),
                      mlp_ratio=float(t.get("mlp_ratio", 4.0)), output_dim=int(cfg["embed_dim"])),
      quick_gelu=bool(qg))


class MultiheadAttention(nnx.Module):
  """torch.nn.MultiheadAttention (batch-first here) with an additive float attention bias."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
               query_chunk: Optional[int] = None, attention_impl: str = "auto"):
    if width % heads:
      raise ValueError(f"attention width {width} is not divisible by {heads} heads")
    self.heads = heads
    self.query_chunk = query_chunk
    self.attention_impl = layers.check_attention_impl(attention_impl)
    mk = lambda: layers.linear(width, width, ("embed", "heads"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj, self.k_proj, self.v_proj = mk(), mk(), mk()
    self.out_proj = layers.linear(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)

  def __call__(self, x: jax.Array, attn_bias: Optional[jax.Array] = None) -> jax.Array:
    split = lambda t: layers.split_heads(t, self.heads)
    out = layers.attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), attn_bias,
                           query_chunk=self.query_chunk, impl=self.attention_impl, dtype=self.q_proj.dtype)
    return self.out_proj(out.reshape(x.shape))


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, quick_gelu: bool, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.c_fc = layers.linear(width, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.c_proj = layers.linear(hidden, width, ("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.quick_gelu = quick_gelu

  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.constrain(self.c_fc(x), layers.tokens_axes(x.ndim, "mlp"))
    h = layers.quick_gelu(h) if self.quick_gelu else layers.gelu_exact(h)
    return self.c_proj(h)


class ResidualAttentionBlock(nnx.Module):
  """open_clip's pre-norm block: x + attn(ln_1(x), bias); x + mlp(ln_2(x))."""

  def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool, *, rngs: nnx.Rngs,
               dtype=None, param_dtype=jnp.float32, query_chunk: Optional[int] = None, attention_impl: str = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.ln_1 = layers.layer_norm(width, CLIP_LN_EPS, **kw)
    self.attn = MultiheadAttention(width, heads, query_chunk=query_chunk, attention_impl=attention_impl, **kw)
    self.ln_2 = layers.layer_norm(width, CLIP_LN_EPS, **kw)
    self.mlp = Mlp(width, int(width * mlp_ratio), quick_gelu, **kw)

  def __call__(self, x: jax.Array, attn_bias: Optional[jax.Array] = None) -> jax.Array:
    x = layers.constrain(x, layers.tokens_axes(x.ndim))
    x = x + self.attn(self.ln_1(x), attn_bias)
    return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
  """`remat` ("none" or "full"; see layers.rematerialized) applies per block when differentiated."""

  def __init__(self, width: int, n_layers: int, heads: int, mlp_ratio: float, quick_gelu: bool, *,
               rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32, query_chunk: Optional[int] = None,
               remat: str = "none", attention_impl: str = "auto"):
    self.remat = layers.check_remat(remat)
    self.resblocks = nnx.List([
        ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype, query_chunk=query_chunk, attention_impl=attention_impl)
        for _ in range(n_layers)])

  def __call__(self, x: jax.Array, attn_bias: Optional[jax.Array] = None, *, start: int = 0,
               stop: Optional[int] = None, taps: Optional[Dict[int, jax.Array]] = None,
               tap_layers: Optional[Sequence[int]] = None) -> jax.Array:
    """Runs blocks [start, stop); block i's output is tap i+1 (the input of block 0 is tap 0)."""
    stop = len(self.resblocks) if stop is None else stop
    for i in range(start, stop):
      x = layers.rematerialized(lambda blk, x, b: blk(x, b), self.resblocks[i], self.remat)(x, attn_bias)
      if taps is not None and (tap_layers is None or i + 1 in tap_layers):
        taps[i + 1] = x
    return x


class VisionTransformer(nnx.Module):
  """The CLIP image tower. `__call__` returns (image embedding or None, {layer: tokens [B, 1+h*w, D]})."""

  def __init__(self, cfg: VisionConfig, quick_gelu: bool = True, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32, query_chunk: Optional[int] = None, remat: str = "none",
               attention_impl: str = "auto"):
    self.cfg = cfg
    self.dtype = dtype
    w, p = cfg.width, cfg.patch_size
    scale = w ** -0.5
    self.conv1 = nnx.Conv(3, w, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=dtype,
                          param_dtype=param_dtype,
                          kernel_init=layers.with_axes(layers.default_kernel_init, (None, None, None, "embed")),
                          rngs=rngs)
    normal = nnx.initializers.normal(scale)
    self.class_embedding = layers.param(rngs, normal, (w,), ("embed",), param_dtype)
    self.positional_embedding = layers.param(rngs, normal, (cfg.grid_size ** 2 + 1, w), (None, "embed"), param_dtype)
    self.ln_pre = layers.layer_norm(w, CLIP_LN_EPS, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu, rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype, query_chunk=query_chunk, remat=remat,
                                   attention_impl=attention_impl)
    self.ln_post = layers.layer_norm(w, CLIP_LN_EPS, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = layers.param(rngs, normal, (w, cfg.output_dim), ("embed", None), param_dtype)

  def grid_for(self, height: int, width: int) -> Tuple[int, int]:
    """Token grid for an input size: the patch conv drops the remainder."""
    p = self.cfg.patch_size
    if height < p or width < p:
      raise ValueError(f"CLIP input {height}x{width} is smaller than one {p}x{p} patch")
    return height // p, width // p

  def resized_positional_embedding(self, grid_hw: Tuple[int, int]) -> jax.Array:
    """[1 + h*w, D]: the class row as is, the grid part bicubically resized (torch-exact) to grid_hw."""
    pos = self.positional_embedding[...]
    g = self.cfg.grid_size
    grid = pos[1:].reshape(g, g, -1)
    grid = resize.interpolate(grid, size=grid_hw, method="bicubic", axes=(0, 1))
    return jnp.concatenate([pos[:1], grid.reshape(grid_hw[0] * grid_hw[1], -1)], axis=0)

  def embed(self, images: jax.Array) -> Tuple[jax.Array, Tuple[int, int]]:
    """Patchify, prepend the class token, add positions, ln_pre: tokens [B, 1+h*w, D] (tap 0)."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"CLIP expects NHWC images with 3 channels, got shape {images.shape}")
    grid_hw = self.grid_for(images.shape[1], images.shape[2])
    p = self.cfg.patch_size
    images = images[:, :grid_hw[0] * p, :grid_hw[1] * p]  # the remainder is dropped, as the torch conv does
    x = self.conv1(images)
    b = x.shape[0]
    x = x.reshape(b, grid_hw[0] * grid_hw[1], -1)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.resized_positional_embedding(grid_hw).astype(x.dtype)
    return self.ln_pre(x), grid_hw

  def pool(self, tokens: jax.Array) -> jax.Array:
    """ln_post on the class token, then the projection: the image embedding [B, E]."""
    return self.ln_post(tokens[:, 0]) @ self.proj[...].astype(tokens.dtype)

  def head(self, tokens: jax.Array) -> jax.Array:
    """ln_post then proj on every token (SAN's recognition head applies it to its SOS tokens)."""
    return self.ln_post(tokens) @ self.proj[...].astype(tokens.dtype)

  def run_blocks(self, tokens: jax.Array, start: int, stop: Optional[int] = None,
                 attn_bias: Optional[jax.Array] = None) -> jax.Array:
    """Blocks [start, stop) on a given sequence with an additive bias broadcastable to [B, heads, L, L]."""
    return self.transformer(tokens, attn_bias, start=start, stop=stop)

  def __call__(self, images: jax.Array, *, stop_at_layer: Optional[int] = None,
               tap_layers: Optional[Sequence[int]] = None,
               attn_bias: Optional[jax.Array] = None) -> Tuple[Optional[jax.Array], Dict[int, jax.Array]]:
    """Image embedding (None when stopped early) and the taps {layer: tokens}; all layers by default."""
    n = len(self.transformer.resblocks)
    stop = n if stop_at_layer is None else stop_at_layer
    if not 0 <= stop <= n:
      raise ValueError(f"stop_at_layer={stop_at_layer} outside [0, {n}]")
    x, _ = self.embed(images)
    taps: Dict[int, jax.Array] = {}
    if tap_layers is None or 0 in tap_layers:
      taps[0] = x
    x = self.transformer(x, attn_bias, start=0, stop=stop, taps=taps, tap_layers=tap_layers)
    return (self.pool(x) if stop == n else None), taps


def tokens_to_map(tokens: jax.Array, grid_hw: Tuple[int, int]) -> Tuple[jax.Array, jax.Array]:
  """Split [B, 1+h*w, D] tokens into the class token [B, D] and the spatial map [B, h, w, D]."""
  b, _, d = tokens.shape
  return tokens[:, 0], tokens[:, 1:].reshape(b, grid_hw[0], grid_hw[1], d)


def causal_mask(length: int) -> np.ndarray:
  """open_clip's text attention mask: -inf above the diagonal, 0 elsewhere."""
  return np.triu(np.full((length, length), -np.inf, np.float32), 1)


class TextTower(nnx.Module):
  """The CLIP text transformer and its projection (attributes named as open_clip's top-level CLIP)."""

  def __init__(self, cfg: TextConfig, quick_gelu: bool = True, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.text_cfg = cfg
    w = cfg.width
    self.token_embedding = nnx.Embed(cfg.vocab_size, w, dtype=dtype, param_dtype=param_dtype,
                                     embedding_init=layers.with_axes(nnx.initializers.normal(0.02), ("vocab", "embed")),
                                     rngs=rngs)
    self.positional_embedding = layers.param(rngs, nnx.initializers.normal(0.01), (cfg.context_length, w),
                                             (None, "embed"), param_dtype)
    self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu, rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype)
    self.ln_final = layers.layer_norm(w, CLIP_LN_EPS, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.text_projection = layers.param(rngs, nnx.initializers.normal(w ** -0.5), (w, cfg.output_dim),
                                        ("embed", None), param_dtype)

  def encode_text(self, tokens: jax.Array, normalize: bool = False) -> jax.Array:
    """[B, L] int token ids (EOT = the largest id) -> [B, E] text embeddings (EOT pooling)."""
    if tokens.ndim != 2 or tokens.shape[1] > self.text_cfg.context_length:
      raise ValueError(f"text tokens must be [B, L<={self.text_cfg.context_length}], got {tokens.shape}")
    length = tokens.shape[1]
    x = self.token_embedding(tokens) + self.positional_embedding[...][:length].astype(self.token_embedding.embedding[...].dtype)
    x = self.transformer(x, jnp.asarray(causal_mask(length)))
    x = self.ln_final(x)
    eot = jnp.argmax(tokens, axis=-1)
    x = x[jnp.arange(x.shape[0]), eot] @ self.text_projection[...].astype(x.dtype)
    return l2_normalize(x) if normalize else x

  def text_embeddings(self, tokens: jax.Array) -> jax.Array:
    """tokens [T, C, L] (templates x classes) -> per-template L2-normalised embeddings [T, C, E].

    One template at a time (a loop, as the official classifier's loop over templates): all T*C prompts at
    once would hold the text tower's activations for every prompt, ~10 GB of XLA temporaries for the 14
    "vild" templates x 171 classes at ViT-L/14 ([2394, 77, 3072] per MLP hidden alone); per template
    it is 1/T of that."""
    if tokens.ndim != 3:
      raise ValueError(f"text tokens must be [templates, classes, length], got shape {tokens.shape}")
    return jax.lax.map(lambda t: self.encode_text(t, normalize=True), tokens)

  def class_embeddings(self, tokens: jax.Array) -> jax.Array:
    """[T, C, L] -> [C, E]: the template mean of the normalised embeddings, renormalised. In SAN
    (`OVClassifier`) it depends only on the frozen text tower, so it is computed once per vocabulary and
    cached (san_jax.text.classifier); the demo's CLIP pretraining scores its zero-shot accuracy with it."""
    return l2_normalize(self.text_embeddings(tokens).mean(axis=0))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize: x / max(||x||, eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
  return (x / jnp.maximum(norm, eps)).astype(x.dtype)


class CLIP(TextTower):
  """The full CLIP model: `visual`, the text tower's attributes at top level, and `logit_scale`."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    super().__init__(cfg.text, cfg.quick_gelu, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.cfg = cfg
    self.visual = VisionTransformer(cfg.vision, cfg.quick_gelu, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                    query_chunk=cfg.attention_query_chunk, attention_impl=cfg.attention_impl)
    self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), param_dtype))

  def encode_image(self, images: jax.Array, normalize: bool = False) -> jax.Array:
    emb, _ = self.visual(images, tap_layers=())
    return l2_normalize(emb) if normalize else emb

  def __call__(self, images: jax.Array, tokens: jax.Array):
    """(image embeddings, text embeddings, logit_scale.exp()), as open_clip's CLIP.forward."""
    return (self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True),
            jnp.exp(self.logit_scale[...]))

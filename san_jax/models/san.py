"""SAN: frozen CLIP + side adapter network + recognition with attention biases + open-vocabulary classifier.

Attribute paths: `clip_visual` (the whole CLIP image tower: the official checkpoint splits it into
`clip_visual_extractor` = blocks [0, K) and `clip_rec_head` = blocks [K, end) + ln_post + proj),
`side_adapter_network`, `ov_classifier` (CLIP's text tower + `logit_scale` + `bg_embed`).

Inputs are normalised, zero-padded NHWC batches (see `preprocess`); everything inside the forward has
static shapes so it jits once per input size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from san_jax.models import clip as clip_lib
from san_jax.models import layers
from san_jax.models import rec_head
from san_jax.models.side_adapter import SideAdapterConfig, SideAdapterNetwork, parse_fusion_map
from san_jax.ops import resize

# OpenAI CLIP's normalisation in 0..255 units (DESIGN §1).
PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)


DEFAULT_CLIP = "ViT-B/16"  # the official SAN's CLIP; SANConfig's defaults are its geometry


@dataclasses.dataclass(frozen=True)
class SANConfig:
  clip: clip_lib.CLIPConfig = clip_lib.clip_config(DEFAULT_CLIP)
  side: SideAdapterConfig = SideAdapterConfig()
  clip_resolution: float = 0.5
  feature_last_layer_idx: int = 9
  size_divisibility: int = 32
  rec_downsample_method: str = "max"
  sos_token_format: str = "cls_token"
  template_set: str = "vild"
  pixel_mean: Tuple[float, float, float] = PIXEL_MEAN
  pixel_std: Tuple[float, float, float] = PIXEL_STD
  # Backward memory: every CLIP block (feature extractor and recognition head) and every side ViT block is
  # rematerialised ("full": only block inputs are kept, see layers.rematerialized; "none"). Training
  # keeps gradients of the side network and CLIP's positional embedding, which flow back through all
  # frozen CLIP blocks: without remat their activations all stay alive (in float32 on a CPU not their
  # attention probabilities: the fused attention's backward recomputes them). Inference is unaffected.
  # The price is time: the B/16 train step (640x640, batch 1, float32, a 2-core Zen 3, 2026-12-07, both
  # programs in one process, alternating, medians of 7) took 4.32 s with "full" against 3.47 s with "none",
  # at peak RSS 2.40 against 3.21 GB (L/14: 5.02 against 7.59 GB). Only "full" fits under the official
  # code's peaks (2.8 GB B/16, 7.4 GB L/14), so it is the default; "none" trades memory for speed.
  remat: str = "full"

  def validate(self):
    layers.check_remat(self.remat)
    self.side.validate()
    k, n = self.feature_last_layer_idx, self.clip.vision.layers
    if not 0 < k < n:
      raise ValueError(f"feature_last_layer_idx={k} must be in (0, {n}) for a {n}-layer CLIP")
    bad = [i for i, _ in self.side.fusion_map if i > k]
    if bad:
      raise ValueError(f"fusion_map reads CLIP layers {bad} beyond feature_last_layer_idx={k}")
    if self.side.clip_width != self.clip.vision.width:
      raise ValueError(f"side adapter clip_width {self.side.clip_width} != CLIP width {self.clip.vision.width}")
    if self.sos_token_format != "cls_token":
      raise NotImplementedError(f"sos_token_format={self.sos_token_format!r}: only 'cls_token' is implemented")
    if self.clip.text.output_dim != self.clip.text.width:
      # The official bg_embed has the text width and is concatenated to embeddings of the output dim.
      raise ValueError("SAN assumes CLIP text width == embed dim (bg_embed has the text width): "
                       f"{self.clip.text.width} != {self.clip.text.output_dim}")


def san_config(name: str, **overrides) -> SANConfig:
  """The official geometries: "san_vit_b16" and "san_vit_l14" (ViT-L/14-336)."""
  if name == "san_vit_b16":
    cfg = SANConfig()
  elif name == "san_vit_l14":
    cfg = SANConfig(clip=clip_lib.clip_config("ViT-L/14-336"), clip_resolution=0.7, feature_last_layer_idx=18,
                    side=SideAdapterConfig(clip_width=1024, fusion_map=((0, 0), (6, 1), (12, 2), (18, 3)),
                                           attn_bias_heads=16))
  else:
    raise ValueError(f"unknown SAN config {name!r}; known: san_vit_b16, san_vit_l14")
  return dataclasses.replace(cfg, **overrides)


def config_to_dict(cfg: SANConfig) -> Dict[str, Any]:
  """A JSON-able dict of the config (saved beside checkpoints)."""
  return dataclasses.asdict(cfg)


def config_from_dict(d: Dict[str, Any]) -> SANConfig:
  """Inverse of `config_to_dict`; `clip` may also be a variant name ("ViT-B/16") and `side.fusion_map`
  a list of "clip_layer->side_block" strings (the official notation), as configs write them."""
  d = dict(d)
  c = d.pop("clip", DEFAULT_CLIP)
  if isinstance(c, str):
    clip_cfg = clip_lib.clip_config(c)
  else:
    clip_cfg = clip_lib.config_from_dict(c)
  side = dict(d.pop("side", {}))
  fm = side.get("fusion_map")
  if fm is not None:
    side["fusion_map"] = (parse_fusion_map(fm) if fm and isinstance(fm[0], str)
                          else tuple(tuple(int(v) for v in x) for x in fm))
  if "deep_supervision_idxs" in side:
    side["deep_supervision_idxs"] = tuple(int(i) for i in side["deep_supervision_idxs"])
  side.setdefault("clip_width", clip_cfg.vision.width)
  rest = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
  return SANConfig(clip=clip_cfg, side=SideAdapterConfig(**side), **rest)


class OVClassifier(clip_lib.TextTower):
  """CLIP's text tower (open_clip names) plus the learnable background embedding and logit scale."""

  def __init__(self, cfg: clip_lib.CLIPConfig, *, rngs, dtype=None, param_dtype=jnp.float32):
    super().__init__(cfg.text, cfg.quick_gelu, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), param_dtype))
    self.bg_embed = layers.param(rngs, nnx.initializers.normal(1.0), (1, cfg.text.width), (None, "embed"),
                                 param_dtype)

  def classifier(self, class_embeddings: jax.Array) -> Dict[str, jax.Array]:
    """[C, E] class embeddings -> the classifier: bg row appended, rows normalised, times exp(logit_scale).
    Runs inside every forward: bg_embed is trainable."""
    bg = self.bg_embed[...].astype(class_embeddings.dtype)
    if class_embeddings.ndim != 2 or class_embeddings.shape[-1] != bg.shape[-1]:
      raise ValueError(f"class embeddings must be [num_classes, {bg.shape[-1]}] (this CLIP's text embedding "
                       f"width), got {tuple(class_embeddings.shape)}")
    normed = clip_lib.l2_normalize(jnp.concatenate([class_embeddings, bg], 0))
    return {"classifier_normed": normed, "classifier_weight": jnp.exp(self.logit_scale[...]) * normed}


class SAN(nnx.Module):
  def __init__(self, cfg: SANConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    cfg.validate()
    self.cfg = cfg
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.clip_visual = clip_lib.VisionTransformer(cfg.clip.vision, cfg.clip.quick_gelu,
                                                  query_chunk=cfg.clip.attention_query_chunk, remat=cfg.remat,
                                                  attention_impl=cfg.clip.attention_impl, **kw)
    self.side_adapter_network = SideAdapterNetwork(cfg.side, remat=cfg.remat, **kw)
    self.ov_classifier = OVClassifier(cfg.clip, **kw)

  # ---- pieces -----------------------------------------------------------------------------------------
  def clip_features(self, clip_in: jax.Array) -> Tuple[Dict[int, jax.Array], Tuple[int, int]]:
    """CLIP taps {layer: tokens [B, 1+h*w, D]} for layers 0..feature_last_layer_idx, and the grid."""
    k = self.cfg.feature_last_layer_idx
    _, taps = self.clip_visual(clip_in, stop_at_layer=k)
    return taps, self.clip_visual.grid_for(clip_in.shape[1], clip_in.shape[2])

  def __call__(self, images: jax.Array, class_embeddings: jax.Array, *, train: bool = False,
               return_intermediates: bool = False) -> Dict[str, Any]:
    """images: normalised, padded NHWC [B, H, W, 3]; class_embeddings [C, E] (text only, from
    `ov_classifier.class_embeddings`, cached per vocabulary).

    Returns {"mask_preds": [B, N, Q, H/p, W/p], "mask_logits": [B, N, Q, C+1]} with N = number of
    deep-supervision outputs in training and 1 (the last) in inference; with `return_intermediates`, also
    the CLIP taps, attention biases, downsampled biases and mask embeddings.
    """
    cfg = self.cfg
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"SAN expects a normalised NHWC batch [B, H, W, 3]; got shape {images.shape}")
    clip_in = clip_input(images, cfg)
    taps, grid_hw = self.clip_features(clip_in)
    clip_maps = {i: clip_lib.tokens_to_map(taps[i], grid_hw)[1] for i in self.side_adapter_network.clip_layers_read}
    idxs = cfg.side.deep_supervision_idxs if train else cfg.side.deep_supervision_idxs[-1:]
    outs = self.side_adapter_network(images, clip_maps, deep_supervision_idxs=idxs)
    mask_preds = jnp.stack([m for m, _ in outs], axis=1)
    attn_bias = jnp.stack([a for _, a in outs], axis=1)  # [B, N, layers, heads, Q, h, w]
    mask_embs, small_bias = rec_head.recognize(self.clip_visual, taps[cfg.feature_last_layer_idx], grid_hw,
                                               attn_bias, cfg.feature_last_layer_idx, cfg.rec_downsample_method)
    classifier_weight = self.ov_classifier.classifier(class_embeddings)["classifier_weight"]
    mask_logits = jnp.einsum("bnqc,kc->bnqk", mask_embs, classifier_weight.astype(mask_embs.dtype))
    result = {"mask_preds": mask_preds, "mask_logits": mask_logits}
    if return_intermediates:
      result.update(clip_input=clip_in, clip_taps=taps, attn_bias=attn_bias,
                    attn_bias_downsampled=small_bias, mask_embs=mask_embs,
                    classifier_weight=classifier_weight)
    return result


# ---- pre- and post-processing ------------------------------------------------------------------------

def preprocess(images: Sequence[np.ndarray], cfg: SANConfig,
               pad_to: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, List[Tuple[int, int]]]:
  """uint8 HWC RGB images of any sizes -> normalised NHWC float32 batch zero-padded bottom/right to a
  multiple of `size_divisibility` (or to `pad_to`), and the image sizes. Normalisation happens before
  padding, as in the official code, so the padding is 0 in normalised units."""
  sizes = []
  for i, img in enumerate(images):
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
      raise ValueError(f"image {i}: expected an RGB image [H, W, 3], got shape {img.shape} "
                       "(convert grayscale or RGBA images to RGB first, e.g. san_jax.data.image_io.to_rgb)")
    sizes.append(img.shape[:2])
  hmax, wmax = max(s[0] for s in sizes), max(s[1] for s in sizes)
  target = resize.padded_size((hmax, wmax), cfg.size_divisibility) if pad_to is None else tuple(pad_to)
  if target[0] < hmax or target[1] < wmax:
    raise ValueError(f"pad_to={target} is smaller than the largest image {(hmax, wmax)}")
  mean = np.asarray(cfg.pixel_mean, np.float32)
  std = np.asarray(cfg.pixel_std, np.float32)
  batch = np.zeros((len(sizes), target[0], target[1], 3), np.float32)
  for i, img in enumerate(images):
    h, w = sizes[i]
    batch[i, :h, :w] = (np.asarray(img).astype(np.float32) - mean) / std
  return batch, sizes


def normalize_on_device(images: jax.Array, image_sizes: Optional[jax.Array], cfg: SANConfig) -> jax.Array:
  """uint8 NHWC canvases + content sizes [B, 2] -> normalised float32, zero outside each image's content:
  what the official model sees after normalising and zero-padding a batch (the pad is 0 after
  normalisation), computed on device so the input pipeline ships uint8. `image_sizes` None: every canvas
  is all content (nothing is zeroed)."""
  mean = jnp.asarray(cfg.pixel_mean, jnp.float32)
  std = jnp.asarray(cfg.pixel_std, jnp.float32)
  x = (images.astype(jnp.float32) - mean) / std
  if image_sizes is None:
    return x
  h, w = images.shape[1], images.shape[2]
  inside = ((jnp.arange(h)[None, :, None] < image_sizes[:, 0, None, None])
            & (jnp.arange(w)[None, None, :] < image_sizes[:, 1, None, None]))
  return jnp.where(inside[..., None], x, 0.0)


def clip_input(images: jax.Array, cfg: SANConfig) -> jax.Array:
  """The CLIP branch's input: the normalised, padded batch [B, H, W, 3] resized by `cfg.clip_resolution`
  (bilinear, torch's scale_factor rule: [B, floor(H * s), floor(W * s), 3]; s = 1 is the identity)."""
  return resize.interpolate(images, scale_factor=cfg.clip_resolution, method="bilinear", axes=(1, 2))


def mask_class_combination(mask_logits: jax.Array, masks: jax.Array, query_axis: int = 0) -> jax.Array:
  """The paper's per-class probabilities, in one place: sum over queries q of softmax(class logits)[q, c]
  (the no-object column dropped after the softmax) x sigmoid(mask logits)[q, ...].

  mask_logits [Q, C+1]; masks: mask logits already at the output resolution, queries on `query_axis` (0:
  [Q, H, W] -> [C, H, W]; -1: [H, W, Q] -> [H, W, C], one plain [H*W, Q] x [Q, C] matmul).
  """
  probs = jax.nn.softmax(mask_logits.astype(jnp.float32), axis=-1)[:, :-1]
  masks = jax.nn.sigmoid(masks.astype(jnp.float32))
  if query_axis == 0:
    return jnp.einsum("qc,q...->c...", probs, masks)
  return masks @ probs


UNROLLED_ARGMAX_MAX_CLASSES = 200


def class_argmax(probs: jax.Array, axis: int = 0) -> jax.Array:
  """int32 label map: the index of the largest class probability along `axis` (the first on ties), as
  `jnp.argmax`. With <= UNROLLED_ARGMAX_MAX_CLASSES classes on the leading axis it is a running maximum
  over the class slices, which XLA fuses into one elementwise pass: measured on a 2-core AMD EPYC
  (2026-12-04), [150, 640, 640] float32 took 11 ms against jnp.argmax's 136 ms (XLA:CPU's (value, index)
  reduction over a major axis); at 256 classes the fusion splits and both take ~270 ms, so larger
  vocabularies keep jnp.argmax. Class probabilities are finite (softmax x sigmoid), so NaN handling is
  not a concern here (jnp.argmax would pick a NaN, the running maximum skips it)."""
  axis = axis % probs.ndim
  if axis != 0 or probs.shape[0] > UNROLLED_ARGMAX_MAX_CLASSES:
    return jnp.argmax(probs, axis=axis).astype(jnp.int32)
  best, idx = probs[0], jnp.zeros(probs.shape[1:], jnp.int32)
  for c in range(1, probs.shape[0]):
    better = probs[c] > best
    best = jnp.where(better, probs[c], best)
    idx = jnp.where(better, jnp.int32(c), idx)
  return idx


def semantic_inference(mask_logits: jax.Array, mask_preds: jax.Array, padded_hw: Tuple[int, int],
                       image_hw: Tuple[int, int], output_hw: Tuple[int, int], layout: str = "chw") -> jax.Array:
  """One image's per-class probabilities (official order, POSTPROCESS_BEFORE_INFERENCE): mask logits
  upsampled to the padded size, cropped to the image, resized to the output size, then
  `mask_class_combination`. The sizes are static (one program per size); `semantic_probs` takes them as data.

  mask_logits [Q, C+1], mask_preds [Q, h, w] (logits). Returns [C, H, W] (layout "chw", the official
  layout) or [H, W, C] ("hwc": the masks are resized with queries last so the combination is one plain
  [H*W, Q] x [Q, C] matmul and no 100 x H x W array is ever transposed; ~25% faster on CPU).
  """
  if layout not in ("chw", "hwc"):
    raise ValueError(f"layout must be 'chw' or 'hwc', got {layout!r}")
  if layout == "hwc":
    masks = mask_preds.transpose(1, 2, 0)  # [h, w, Q]: small, cheap to transpose here
    axes = (0, 1)
  else:
    masks, axes = mask_preds, (1, 2)
  masks = resize.interpolate(masks, size=padded_hw, method="bilinear", axes=axes)
  masks = masks[:image_hw[0], :image_hw[1]] if layout == "hwc" else masks[:, :image_hw[0], :image_hw[1]]
  masks = resize.interpolate(masks, size=output_hw, method="bilinear", axes=axes)
  return mask_class_combination(mask_logits, masks, query_axis=-1 if layout == "hwc" else 0)


def semantic_probs(mask_logits: jax.Array, mask_preds: jax.Array, padded_hw: Tuple[int, int],
                   rows: jax.Array, cols: jax.Array) -> jax.Array:
  """`semantic_inference` with the image's sizes as data: the crop and the output resize are the
  `resize.crop_resize_matrix` rows [Ho, H] and cols [Wo, W] of padded_hw (H, W), so one compiled program
  serves every image on that canvas. [Q, C+1], [Q, h, w] -> [C, Ho, Wo]; outside the output size the mask
  logits are 0 (the values there mean nothing: crop them)."""
  masks = resize.interpolate(mask_preds, size=padded_hw, method="bilinear", axes=(1, 2))
  return mask_class_combination(mask_logits, resize.apply_crop_resize(masks.astype(jnp.float32), rows, cols))

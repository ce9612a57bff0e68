"""Contrastive pretraining of a tiny CLIP on the synthetic shapes: the image-text alignment SAN assumes.

SAN starts from a CLIP that already aligns images with text; the demo has no such CLIP, so it makes one:
`pretrain(cfg, out_dir)` trains the NNX `CLIP` of `cfg.model.clip` from scratch with the symmetric InfoNCE
loss and a learnable temperature, on (image, caption) pairs, and saves a params checkpoint with CLIP's own
leaf paths (`visual.*`, `token_embedding`, `transformer.*`, ...), which `train.init_from` maps onto SAN.

Data, two modes. "single": one object per image (the scene renderer's textured backgrounds and object
scales), captioned as a whole, as web captions describe their image: plain CLIP. "regions" (the demo's):
scenes of 1..`max_regions` objects, one caption per object, whose embedding is computed the way SAN's
recognition head computes a mask's: a copy of the class token that sees only the object's patches through
CLIP's last blocks (`region_embeddings`); with `dense_weight` > 0, every patch that an object covers is also
classified against all class captions (`dense_loss`). Both make the patch tokens carry their object's colour
and shape, which is what SAN reads through its attention biases; "regions" trains that very path (measured on
the demo's geometry: "single" still named the shape of 29% of held-out objects after 600 steps of 128
images, "regions" with the dense loss 55% after 900 steps of 64 and 74% after 2400 steps of 32). Captions fill a prompt
template drawn at random ("a photo of a red triangle.", "There is a large red triangle in the scene", ...).
All 48 classes are captioned, the 12 that SAN never trains on included: the pretraining stands for the
web-scale data a real CLIP saw (SAN is only as open as its CLIP).

The loss: a batch of B images holds several images of the same class (48 classes), so the plain InfoNCE
target (the diagonal) would push apart matching pairs. The targets are therefore label-aware (UniCL): image
i's target distribution is uniform over the captions of the same class in the batch, and likewise for
each caption; the loss is the mean of the image->text and text->image cross entropies. With one image per
class it is exactly CLIP's loss. The logit scale starts at log(1/0.07) and is clamped at log(100), as in
CLIP (in the loss, and in the saved parameter). AdamW (no decay on gains, biases, embeddings and the logit
scale), linear warmup, cosine decay: san_jax.train.optim's factory, from `optimizer_config`.

The CLIP sees what SAN's CLIP branch sees: images normalised and resized by `model.clip_resolution` with
SAN's own functions (`san.normalize_on_device`, `san.clip_input`); captions are tokenised by the classifier's
`prompt_tokens` and classes embedded by the text tower's `class_embeddings`, as SAN embeds its vocabulary. The
images are rendered on the host by a background thread (while the step compiles and while it runs); images
are flipped at random on device. Progress lines, step rates and the metrics file are the training loop's
(`loop.progress_line`, `loop.StepTimer`, `loop.MetricsWriter`).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from san_jax import checkpoint
from san_jax.data import shapes
from san_jax.models import clip as clip_lib
from san_jax.models import rec_head
from san_jax.models import san as san_lib
from san_jax.ops import resize
from san_jax.text import classifier
from san_jax.text import templates as templates_lib
from san_jax.train import loop, optim

MAX_LOGIT_SCALE = math.log(100.0)
# No weight decay (regexes over dotted parameter paths, as optim.decay_mask reads them): biases, LayerNorm
# gains (`scale`), embeddings (`token_embedding.embedding`, `class_embedding`, `positional_embedding`) and
# the logit scale. What is decayed: the kernels, `proj` and `text_projection`.
NO_DECAY_PATTERNS = (r"\.bias$", r"\.scale$", r"embedding$", r"^logit_scale$")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  steps: int = 300
  batch_size: int = 128
  lr: float = 2e-3
  weight_decay: float = 0.05
  warmup_steps: int = 30
  seed: int = 0
  num_images: int = 8192
  image_size: int = 64
  min_radius: float = 0.08
  max_radius: float = 0.25
  rotate: bool = True  # shapes.ShapesSpec.rotate
  text_length: int = 24
  templates: str = "vild"
  log_every: int = 20
  mode: str = "single"  # "single": one object per image, whole-image captions; "regions": see ExamplePool
  max_regions: int = 4  # objects per scene in mode "regions"
  dense_weight: float = 0.0  # weight of the per-patch caption loss (see `dense_loss`)
  dense_min_cover: float = 0.5  # a patch is labelled with a class that covers at least this fraction of it
  num_eval: int = 480  # held-out renders for the zero-shot accuracy
  eval_every: int = 0  # also print the zero-shot accuracy every this many steps (0: at the end only)

  @classmethod
  def from_config(cls, cfg) -> "PretrainConfig":
    """From a run config's `clip_pretrain` section (and `data.shapes_image_size`)."""
    p = cfg.clip_pretrain
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: p[k] for k in p.keys() if k in fields}
    kw.setdefault("image_size", int(cfg.data.get("shapes_image_size", cls.image_size)))
    return cls(**kw)


# ---- data ------------------------------------------------------------------------------------------------
def render_single(index: int, class_id: int, pc: PretrainConfig, split: str = "train", with_label: bool = False):
  """One object of `class_id` on a textured background, uint8 [S, S, 3] (or the {"image", "label"} dict)."""
  spec = shapes.ShapesSpec(image_size=(pc.image_size, pc.image_size), min_objects=1, max_objects=1,
                           min_radius=pc.min_radius, max_radius=pc.max_radius, classes=(int(class_id),),
                           rotate=pc.rotate)
  # A seed of its own: these renders are not the SAN training scenes.
  ex = shapes.render(index, seed=pc.seed + 7919, split=split, spec=spec)
  return ex if with_label else ex["image"]


def render_scene(index: int, pc: PretrainConfig, split: str = "train") -> Dict:
  """A multi-object scene of any classes (SAN's object scales), {"image", "label"}."""
  spec = shapes.ShapesSpec(image_size=(pc.image_size, pc.image_size), min_objects=1, max_objects=pc.max_regions,
                           min_radius=pc.min_radius, max_radius=pc.max_radius, rotate=pc.rotate)
  return shapes.render(index, seed=pc.seed + 7919, split=split, spec=spec)


def clip_grid(pc: PretrainConfig, clip_cfg: clip_lib.CLIPConfig, clip_resolution: float) -> Tuple[int, int]:
  """The CLIP token grid of an S x S image (torch's floor(S * scale) input size, the conv's floor)."""
  g = resize.output_size_for_scale(pc.image_size, clip_resolution) // clip_cfg.vision.patch_size
  return g, g


def region_coverage(label: np.ndarray, class_ids: Sequence[int], grid_hw: Tuple[int, int]) -> np.ndarray:
  """bool [len(class_ids), h, w]: the CLIP patches holding any pixel of each class's region (the rule of
  SAN's max-pooled attention bias: a patch is visible when any of its pixels is, over torch's adaptive
  pooling windows)."""
  masks = np.stack([label == c for c in class_ids] or [np.zeros(label.shape, bool)])
  by_row = np.stack([masks[:, lo:hi].any(1) for lo, hi in resize.adaptive_windows(label.shape[0], grid_hw[0])], 1)
  cells = np.stack([by_row[:, :, lo:hi].any(2) for lo, hi in resize.adaptive_windows(label.shape[1], grid_hw[1])], 2)
  return cells[:len(class_ids)]


def patch_labels(label: np.ndarray, grid_hw: Tuple[int, int], min_cover: float) -> np.ndarray:
  """int32 [h, w]: per CLIP patch, the class covering the largest fraction of it if that is >= min_cover,
  else -1. The grid must divide the label map (the CLIP input is the image, resized by an exact factor)."""
  h, w = label.shape
  gh, gw = grid_hw
  if h % gh or w % gw:
    raise ValueError(f"label map {label.shape} is not a multiple of the CLIP grid {grid_hw}")
  blocks = label.reshape(gh, h // gh, gw, w // gw).transpose(0, 2, 1, 3).reshape(gh, gw, -1).astype(np.int64)
  counts = np.zeros((gh, gw, 256), np.int64)
  np.add.at(counts, (np.arange(gh)[:, None, None], np.arange(gw)[None, :, None], blocks), 1)
  counts[..., shapes.IGNORE_LABEL] = 0
  best = counts.argmax(-1)
  frac = counts.max(-1) / blocks.shape[-1]
  return np.where(frac >= min_cover, best, -1).astype(np.int32)


class ExamplePool:
  """`num_images` captioned examples, rendered by a background thread; `sample` draws a batch from those
  rendered so far (waiting for the first batch).

  Every example is an image with up to Q regions, each a set of CLIP patches and a class: mode "single"
  renders one object of class i % 48 for example i and its region is the whole image (Q = 1: plain CLIP,
  the caption describes the image); mode "regions" renders scenes of 1..Q objects and each object's region
  is the patches it covers (a caption per region, as region-text pretraining does).
  """

  def __init__(self, pc: PretrainConfig, num_classes: int, grid_hw: Tuple[int, int], split: str = "train",
               num_images: Optional[int] = None, background: bool = True, mode: Optional[str] = None):
    if mode is not None:
      pc = dataclasses.replace(pc, mode=mode)
    self.pc = pc
    self.split = split
    self.grid_hw = grid_hw
    self.num_images = n = pc.num_images if num_images is None else int(num_images)
    self.num_classes = num_classes
    q = 1 if pc.mode == "single" else pc.max_regions
    if pc.mode not in ("single", "regions"):
      raise ValueError(f"clip_pretrain.mode must be 'single' or 'regions', got {pc.mode!r}")
    self.images = np.zeros((n, pc.image_size, pc.image_size, 3), np.uint8)
    self.classes = np.full((n, q), -1, np.int32)  # -1: no region
    self.regions = np.zeros((n, q) + tuple(grid_hw), bool)
    self.patch_labels = np.full((n,) + tuple(grid_hw), -1, np.int32)  # -1: no class covers the patch enough
    self.ready = 0
    self._cond = threading.Condition()
    self._error: Optional[BaseException] = None
    if background:
      self._thread = threading.Thread(target=self._fill, daemon=True)
      self._thread.start()
    else:
      self._thread = None
      self._fill()
      if self._error is not None:
        raise self._error

  def _render(self, i: int):
    if self.pc.mode == "single":
      c = i % self.num_classes
      ex = render_single(i, c, self.pc, self.split, with_label=True)
      self.images[i] = ex["image"]
      self.classes[i, 0] = c
      self.regions[i, 0] = True
    else:
      ex = render_scene(i, self.pc, self.split)
      self.images[i] = ex["image"]
      ids = [int(c) for c in np.unique(ex["label"]) if c != shapes.IGNORE_LABEL][:self.classes.shape[1]]
      self.classes[i, :len(ids)] = ids
      self.regions[i, :len(ids)] = region_coverage(ex["label"], ids, self.grid_hw)
    self.patch_labels[i] = patch_labels(ex["label"], self.grid_hw, self.pc.dense_min_cover)

  def _fill(self):
    try:
      for i in range(self.num_images):
        self._render(i)
        if i % 64 == 63 or i == self.num_images - 1:
          with self._cond:
            self.ready = i + 1
            self._cond.notify_all()
    except BaseException as err:  # surfaced by sample()
      with self._cond:
        self._error = err
        self._cond.notify_all()

  def wait(self) -> None:
    """Blocks until every example is rendered (or raises the renderer's error)."""
    with self._cond:
      self._cond.wait_for(lambda: self.ready >= self.num_images or self._error)
      if self._error is not None:
        raise RuntimeError("rendering the pretraining images failed") from self._error

  def sample(self, rng: np.random.Generator, batch_size: int) -> Tuple[np.ndarray, ...]:
    """(images uint8 [B, S, S, 3], classes int32 [B, Q] (-1: none), regions bool [B, Q, h, w],
    patch labels int32 [B, h, w]), drawn from the whole pool (waiting for it), so that the batches are a
    function of `rng` alone, not of how far the renderer got."""
    self.wait()
    idx = rng.choice(self.num_images, size=batch_size, replace=self.num_images < batch_size)
    return self.images[idx], self.classes[idx], self.regions[idx], self.patch_labels[idx]

  def join(self):
    if self._thread is not None:
      self._thread.join()


def caption_tokens(class_names: Sequence[str], template_set: str, length: int) -> np.ndarray:
  """[T, C, length] token ids of every template filled with every class name (the SAN classifier's
  prompts, so the text tower learns exactly the prompts SAN will embed). The tokenizer would silently cut
  a longer caption (keeping an end token), so captions are tokenized at full context and checked."""
  templates = templates_lib.get_templates(template_set)
  full = classifier.prompt_tokens(class_names, templates)  # [T, C, 77]
  n_tokens = full.argmax(-1) + 1  # the end-of-text token has the largest id
  if n_tokens.max() > length:
    t, c = np.unravel_index(n_tokens.argmax(), n_tokens.shape)
    raise ValueError(f"caption {templates[t].format(class_names[c])!r} has {n_tokens.max()} tokens, more than "
                     f"clip_pretrain.text_length={length}")
  return full[..., :length].astype(np.int32)


# ---- model, loss, step -----------------------------------------------------------------------------------
def clip_images(images_u8: jax.Array, san_cfg: san_lib.SANConfig) -> jax.Array:
  """uint8 [B, S, S, 3] -> what SAN's CLIP branch sees: normalised with the model's mean/std (every pixel is
  content: no padding), resized by its clip_resolution (SAN's own two functions)."""
  return san_lib.clip_input(san_lib.normalize_on_device(images_u8, None, san_cfg), san_cfg)


def region_embeddings(model: clip_lib.CLIP, images: jax.Array, regions: jax.Array, start_block: int,
                      with_patches: bool = False):
  """L2-normalised embeddings [B, Q, E] of image regions, computed as SAN's recognition head computes mask
  embeddings: CLIP's blocks up to `start_block`, then the remaining blocks with Q copies of the class token
  that see only their region's patches (attention bias 0 inside, -100 outside), then ln_post and proj.
  regions: bool [B, Q, h, w] on the CLIP grid. A region covering the whole image gives exactly CLIP's own
  image embedding (the copy of the class token then sees what the class token sees).

  with_patches: also return the L2-normalised patch embeddings [B, h*w, E] of the last layer (ln_post and
  proj applied to every patch token)."""
  n_layers = len(model.visual.transformer.resblocks)
  stop = n_layers if with_patches else start_block
  _, taps = model.visual(images, stop_at_layer=stop, tap_layers=(start_block, n_layers) if with_patches else (start_block,))
  grid_hw = model.visual.grid_for(images.shape[1], images.shape[2])
  bias = jnp.where(regions, 0.0, rec_head.MASKED).astype(jnp.float32)[:, None, None, None]  # [B,1,1,1,Q,h,w]
  emb, _ = rec_head.recognize(model.visual, taps[start_block], grid_hw, bias, start_block, "max")
  if not with_patches:
    return emb[:, 0]
  return emb[:, 0], clip_lib.l2_normalize(model.visual.head(taps[n_layers][:, 1:]))


def dense_loss(patches: jax.Array, class_text: jax.Array, patch_labels: jax.Array, logit_scale: jax.Array):
  """Per-patch caption loss: every patch covered by an object is classified against the captions of all
  classes (one random template each); cross entropy, averaged over the labelled patches.
  patches [B, P, E], class_text [C, E] (L2-normalised), patch_labels [B, P] (-1: unlabelled)."""
  logits = jnp.exp(jnp.clip(logit_scale, 0.0, MAX_LOGIT_SCALE)) * patches @ class_text.T
  valid = patch_labels >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(patch_labels, 0))
  n = jnp.maximum(valid.sum(), 1)
  acc = ((jnp.argmax(logits, -1) == patch_labels) & valid).sum() / n
  return (ce * valid).sum() / n, acc


def contrastive_loss(img: jax.Array, txt: jax.Array, labels: jax.Array, logit_scale: jax.Array,
                     valid: Optional[jax.Array] = None):
  """Symmetric InfoNCE with label-aware targets. img, txt: L2-normalised [N, E] (pair i = image region i and
  its caption); labels [N]; valid bool [N] (padding pairs take no part)."""
  n = img.shape[0]
  valid = jnp.ones((n,), bool) if valid is None else valid
  logits = jnp.exp(jnp.clip(logit_scale, 0.0, MAX_LOGIT_SCALE)) * img @ txt.T  # [N regions, N captions]
  pair = valid[:, None] & valid[None, :]
  logits = jnp.where(pair, logits, -1e9)
  same = ((labels[:, None] == labels[None, :]) & pair).astype(jnp.float32)
  w = valid.astype(jnp.float32)
  denom = jnp.maximum(w.sum(), 1.0)

  def xent(lg, tgt):
    tgt = tgt / jnp.maximum(tgt.sum(1, keepdims=True), 1.0)
    return optax.softmax_cross_entropy(lg, tgt)

  i2t = (xent(logits, same) * w).sum() / denom
  t2i = (xent(logits.T, same.T) * w).sum() / denom
  acc = (jnp.take_along_axis(same, jnp.argmax(logits, 1)[:, None], 1)[:, 0] * w).sum() / denom
  return 0.5 * (i2t + t2i), {"loss_i2t": i2t, "loss_t2i": t2i, "batch_acc": acc}


def optimizer_config(pc: PretrainConfig) -> ml_collections.ConfigDict:
  """The pretraining's recipe as the `train` section san_jax.train.optim reads: CLIP's AdamW (b2 0.98, eps
  1e-6: the values CLIP trained with), no decay on NO_DECAY_PATTERNS, gradients clipped to global norm 1, a
  linear warm-up then cosine decay to 2% of the peak learning rate."""
  return ml_collections.ConfigDict(dict(
      steps=pc.steps, clip_grad_norm=1.0,
      optimizer=dict(name="adamw", lr=pc.lr, weight_decay=pc.weight_decay, b1=0.9, b2=0.98, eps=1e-6,
                     no_decay_patterns=list(NO_DECAY_PATTERNS)),
      schedule=dict(name="cosine", warmup_steps=pc.warmup_steps, end_factor=0.02)))


def make_optimizer(pc: PretrainConfig) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """(the optimizer, its learning-rate schedule) from san_jax.train.optim's factory."""
  train_cfg = optimizer_config(pc)
  return optim.make_optimizer(train_cfg), optim.learning_rate_schedule(train_cfg)


class Pretrainer:
  """The CLIP, its optimizer and the jitted step, for one caption bank.

  Only the token-embedding rows of the bank's tokens are trained (a compact [U, width] table; tokens are
  renumbered 0..U-1 in id order, so the end-of-text token stays the largest): the other 49,000-odd rows of
  CLIP's vocabulary would get zero gradients and zero Adam moments and are not decayed (NO_DECAY_PATTERNS),
  so AdamW would never move them, but updating them densely cost time and memory: the full table is 3.2M of
  the demo CLIP's 3.5M parameters (measured on the 2-core Zen 3: the demo's step 126 ms against 137 ms with
  the full table, alternating in one process; AdamW alone over the full table's parameters 20 ms).
  `flat_params` writes the trained rows back into the full table."""

  def __init__(self, san_cfg: san_lib.SANConfig, pc: PretrainConfig, caption_bank: np.ndarray):
    """The CLIP of `san_cfg.clip`, seen as SAN's CLIP branch sees it (`clip_images`); regions are recognised
    from block `san_cfg.feature_last_layer_idx` on, as SAN's recognition head does. caption_bank [T, C, L]:
    the token ids of every template x class caption (`caption_tokens`), the captions of every step."""
    self.pc = pc
    self.san_cfg = san_cfg
    self.clip_cfg = san_cfg.clip
    self.start_block = san_cfg.feature_last_layer_idx
    model = clip_lib.CLIP(self.clip_cfg, rngs=nnx.Rngs(pc.seed))
    self.graphdef, self.params = nnx.split(model, nnx.Param)
    self.num_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(self.params))
    table = self.params["token_embedding"]["embedding"]
    self._full_table = np.asarray(table[...])
    self.vocabulary = np.unique(np.asarray(caption_bank))
    self._position = np.full(self._full_table.shape[0], -1, np.int64)
    self._position[self.vocabulary] = np.arange(self.vocabulary.size)
    self.params["token_embedding"]["embedding"] = table.replace(jnp.asarray(self._full_table[self.vocabulary]))
    self.bank = self.compact_tokens(caption_bank)
    self.tx, self.schedule = make_optimizer(pc)
    self.opt_state = self.tx.init(self.params)
    self._step = jax.jit(self._step_impl, donate_argnums=(0, 1))
    self._embed_regions = jax.jit(self._embed_regions_impl)
    self._embed_classes = jax.jit(self._embed_classes_impl)

  def _loss(self, params, images, regions, tokens, labels, class_tokens, patch_labels):
    model = nnx.merge(self.graphdef, params)
    dense = self.pc.dense_weight > 0
    out = region_embeddings(model, images, regions, self.start_block, with_patches=dense)
    img = (out[0] if dense else out).reshape(-1, self.clip_cfg.embed_dim)
    txt = model.encode_text(tokens, normalize=True)
    loss, aux = contrastive_loss(img, txt, jnp.maximum(labels, 0), model.logit_scale[...], labels >= 0)
    if dense:
      d_loss, d_acc = dense_loss(out[1], model.encode_text(class_tokens, normalize=True),
                                 patch_labels.reshape(patch_labels.shape[0], -1), model.logit_scale[...])
      aux = {**aux, "loss_region": loss, "loss_dense": d_loss, "dense_acc": d_acc}
      loss = loss + self.pc.dense_weight * d_loss
    return loss, aux

  def _step_impl(self, params, opt_state, images_u8, classes, regions, patch_labels, caption_bank, key):
    """images uint8 [B, S, S, 3], classes [B, Q] (-1: none), regions bool [B, Q, h, w], patch_labels
    [B, h, w]; caption_bank [T, C, L] (compact token ids): a random template per region (and per class for
    the dense loss)."""
    k_t, k_h, k_v, k_c = jax.random.split(key, 4)
    labels = classes.reshape(-1)
    template = jax.random.randint(k_t, labels.shape, 0, caption_bank.shape[0])
    tokens = caption_bank[template, jnp.maximum(labels, 0)]
    n_cls = caption_bank.shape[1]
    # A random template per class: the captions the dense loss classifies patches against.
    class_tokens = caption_bank[jax.random.randint(k_c, (n_cls,), 0, caption_bank.shape[0]), jnp.arange(n_cls)]
    x = clip_images(images_u8, self.san_cfg)
    b = x.shape[0]
    # Random flips of image and regions together (the shapes' names do not change under flips).
    flip_h = jax.random.bernoulli(k_h, 0.5, (b,))
    flip_v = jax.random.bernoulli(k_v, 0.5, (b,))
    x = jnp.where(flip_h[:, None, None, None], x[:, :, ::-1], x)
    x = jnp.where(flip_v[:, None, None, None], x[:, ::-1], x)
    regions = jnp.where(flip_h[:, None, None, None], regions[..., ::-1], regions)
    regions = jnp.where(flip_v[:, None, None, None], regions[..., ::-1, :], regions)
    patch_labels = jnp.where(flip_h[:, None, None], patch_labels[..., ::-1], patch_labels)
    patch_labels = jnp.where(flip_v[:, None, None], patch_labels[..., ::-1, :], patch_labels)
    (loss, aux), grads = jax.value_and_grad(self._loss, has_aux=True)(params, x, regions, tokens, labels,
                                                                      class_tokens, patch_labels)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, **aux, "logit_scale": jnp.exp(jnp.clip(params["logit_scale"][...], 0.0, MAX_LOGIT_SCALE)),
               "grad_norm": optax.tree.norm(grads)}
    return params, opt_state, metrics

  def _embed_regions_impl(self, params, images_u8, regions):
    model = nnx.merge(self.graphdef, params)
    return region_embeddings(model, clip_images(images_u8, self.san_cfg), regions, self.start_block)

  def _embed_classes_impl(self, params, caption_bank):
    return nnx.merge(self.graphdef, params).class_embeddings(caption_bank)

  def compact_tokens(self, tokens) -> jax.Array:
    """CLIP token ids -> positions in the trained rows (order-preserving); ValueError for an id that no
    caption of the bank uses (its row is not trained)."""
    tokens = np.asarray(tokens)
    missing = np.setdiff1d(tokens, self.vocabulary)
    if missing.size:
      raise ValueError(f"token ids {missing[:10].tolist()} are not in the pretraining captions' vocabulary "
                       f"({self.vocabulary.size} ids)")
    return jnp.asarray(self._position[tokens].astype(np.int32))

  def compile(self, pool: "ExamplePool", batch_size: int) -> None:
    """Compiles the step ahead of time for the pool's array shapes (while its renderer is still running)."""
    args = (self.params, self.opt_state, np.zeros((batch_size,) + pool.images.shape[1:], np.uint8),
            np.zeros((batch_size,) + pool.classes.shape[1:], np.int32),
            np.zeros((batch_size,) + pool.regions.shape[1:], bool),
            np.zeros((batch_size,) + pool.patch_labels.shape[1:], np.int32), self.bank, jax.random.key(0))
    self._step = self._step.lower(*args).compile()

  def step(self, images_u8, classes, regions, patch_labels, key):
    self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, images_u8, classes, regions,
                                                      patch_labels, self.bank, key)
    return metrics

  def class_embeddings(self, tokens=None) -> jax.Array:
    """[T, C, L] caption tokens (CLIP ids; default: the bank's) -> [C, E]: the text tower's
    `class_embeddings`, the function SAN embeds its vocabulary with (per-template normalised, averaged over
    templates, renormalised)."""
    return self._embed_classes(self.params, self.bank if tokens is None else self.compact_tokens(tokens))

  def classify_regions(self, pool: "ExamplePool", chunk: int = 128) -> np.ndarray:
    """Predicted class ids [N, Q] of every region of a (fully rendered) pool against every class's prompts."""
    cls = self.class_embeddings()
    preds = []
    for i in range(0, pool.num_images, chunk):
      emb = self._embed_regions(self.params, jnp.asarray(pool.images[i:i + chunk]),
                                jnp.asarray(pool.regions[i:i + chunk]))
      preds.append(np.asarray(jnp.argmax(emb @ cls.T, axis=-1)))
    return np.concatenate(preds)

  def flat_params(self) -> Dict[Tuple, np.ndarray]:
    """{NNX path: array}: the whole CLIP, the trained token-embedding rows written into the full table; the
    logit scale clamped as the loss used it (CLIP clamps the parameter)."""
    flat = {k: np.asarray(v) for k, v in checkpoint.flatten(self.params).items()}
    table = self._full_table.copy()
    table[self.vocabulary] = flat[("token_embedding", "embedding")]
    flat[("token_embedding", "embedding")] = table
    flat[("logit_scale",)] = np.clip(flat[("logit_scale",)], 0.0, MAX_LOGIT_SCALE).astype(np.float32)
    return flat


# ---- the run ---------------------------------------------------------------------------------------------
def zero_shot_report(trainer: Pretrainer, pools: Dict[str, "ExamplePool"]) -> Dict[str, float]:
  """48-way zero-shot accuracy on held-out pools: "single" (whole single-object images, CLIP's own task) and
  "regions" (each object of a multi-object scene through its ground-truth region, what SAN's recognition
  head does with perfect masks: the ceiling SAN can reach with this CLIP). Per pool: overall, seen and
  unseen classes, and whether the predicted colour and the predicted shape are right."""
  names = shapes.class_names()
  unseen = set(shapes.class_ids(shapes.unseen_classes()))
  out = {}
  for key, pool in pools.items():
    pred = trainer.classify_regions(pool).reshape(-1)
    labels = pool.classes.reshape(-1)
    keep = labels >= 0
    pred, labels = pred[keep], labels[keep]
    is_unseen = np.array([c in unseen for c in labels])
    correct = pred == labels
    out[f"{key}_acc"] = float(correct.mean())
    out[f"{key}_acc_seen"] = float(correct[~is_unseen].mean())
    out[f"{key}_acc_unseen"] = float(correct[is_unseen].mean())
    out[f"{key}_colour_acc"] = float(np.mean([names[p].split()[0] == names[c].split()[0] for p, c in zip(pred, labels)]))
    out[f"{key}_shape_acc"] = float(np.mean([names[p].split()[1] == names[c].split()[1] for p, c in zip(pred, labels)]))
  return out


def format_report(z: Dict[str, float]) -> str:
  parts = []
  for key in ("single", "regions"):
    if f"{key}_acc" in z:
      parts.append(f"{key} {z[key + '_acc']:.3f} (seen {z[key + '_acc_seen']:.3f} unseen {z[key + '_acc_unseen']:.3f}; "
                   f"colour {z[key + '_colour_acc']:.3f} shape {z[key + '_shape_acc']:.3f})")
  return "; ".join(parts)


def pretrain(cfg, out_dir: str, *, log: Callable[[str], None] = print,
             metrics_path: Optional[str] = None) -> Dict[str, Any]:
  """Trains the tiny CLIP of `cfg.model.clip` (section `cfg.clip_pretrain`) and saves a params checkpoint
  to `out_dir` (config: the CLIPConfig dict). Appends one JSON row per logged step to `metrics_path`.
  Returns a summary (time, final metrics, zero-shot accuracies on held-out renders, seen/unseen)."""
  pc = PretrainConfig.from_config(cfg)
  san_cfg = san_lib.config_from_dict(cfg.model.to_dict())
  grid_hw = clip_grid(pc, san_cfg.clip, float(san_cfg.clip_resolution))
  names = shapes.class_names()
  t_start = time.perf_counter()
  pool = ExamplePool(pc, len(names), grid_hw)
  bank = caption_tokens(names, pc.templates, pc.text_length)
  trainer = Pretrainer(san_cfg, pc, bank)
  n_params = trainer.num_params
  what = "single-object images" if pc.mode == "single" else f"scenes (<= {pc.max_regions} captioned regions each)"
  log(f"CLIP pretraining: {n_params:,} parameters, {pc.steps} steps of {pc.batch_size} {what} "
      f"({pc.num_images} renders, {len(names)} classes x {bank.shape[0]} caption templates)")
  trainer.compile(pool, pc.batch_size)  # overlaps the rendering
  log(f"clip: compiled the step ({time.perf_counter() - t_start:.0f}s since start), "
      f"{pool.ready}/{pool.num_images} renders ready")
  pool.wait()
  rng = np.random.default_rng(pc.seed)
  key = jax.random.key(pc.seed)
  cache: Dict[str, ExamplePool] = {}

  def held_out() -> Dict[str, ExamplePool]:
    if not cache:
      cache["single"] = ExamplePool(pc, len(names), grid_hw, "val", pc.num_eval, background=False, mode="single")
      cache["regions"] = ExamplePool(pc, len(names), grid_hw, "val", pc.num_eval // 2, background=False,
                                     mode="regions")
    return cache

  rows = []
  writer = loop.MetricsWriter(metrics_path)
  timer = loop.StepTimer(0)
  try:
    for step in range(pc.steps):
      images, classes, regions, plabels = pool.sample(rng, pc.batch_size)
      metrics = trainer.step(jnp.asarray(images), jnp.asarray(classes), jnp.asarray(regions), jnp.asarray(plabels),
                             jax.random.fold_in(key, step))
      done = step + 1
      if done == 1:  # the first call compiled the step: keep compile time out of the rate
        jax.block_until_ready(metrics)
        timer.restart(done)
        log(f"clip step {done}/{pc.steps}: ran the first step ({time.perf_counter() - t_start:.0f}s since start)")
      if done % pc.log_every == 0 or done == pc.steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = timer.lap(done)
        row = {"step": done, **m, "lr": float(trainer.schedule(step)), "step_time_s": dt if math.isfinite(dt) else None}
        rows.append(row)
        writer.write(row)
        if not math.isfinite(m["loss"]):
          raise FloatingPointError(f"CLIP pretraining diverged at step {done}: {m}")
        dense = f"  dense acc {m['dense_acc']:.2f}" if "dense_acc" in m else ""
        log(loop.progress_line("clip ", done, pc.steps, f"loss {m['loss']:.3f}  batch acc {m['batch_acc']:.2f}{dense}  "
                               f"scale {m['logit_scale']:.1f}", dt))
      if pc.eval_every and done % pc.eval_every == 0 and done < pc.steps:
        log(f"clip step {done}: zero-shot accuracy {format_report(zero_shot_report(trainer, held_out()))}")
        timer.restart(done)  # keep the evaluation out of the step rate
  finally:
    writer.close()
  train_time = time.perf_counter() - t_start
  summary = {"steps": pc.steps, "time_s": train_time, "params": n_params, "final": rows[-1] if rows else {},
             **zero_shot_report(trainer, held_out())}
  log(f"CLIP zero-shot accuracy (48-way, held-out renders): {format_report(summary)}")
  checkpoint.save_params(out_dir, trainer.flat_params(), clip_lib.config_to_dict(san_cfg.clip), force=True)
  pool.join()
  return summary

"""Inference: images + a vocabulary in, per-class probabilities and label maps out.

`Segmenter` owns a SAN model and caches class text embeddings per vocabulary. Three ways to run it:

* `segment(image, vocabulary)`: one image, the official post-processing verbatim
  (`san.semantic_inference`), jitted per (input size, output size). The reference path.
* `predict(image, vocabulary, resize_to=, tta=, sliding=)`: one image with the test resize, optional
  multi-scale + flip test-time augmentation and sliding windows; label map (and probabilities) at the
  image's original size.
* `evaluate_batch(batch, ...)`: a batch of the evaluation pipeline (images on a common canvas), label maps
  and the confusion matrix computed on device; what `san_jax.evaluation.runner.evaluate` drives.

Every path ends in the paper's formula, `san.mask_class_combination`: `segment` and the sliding windows
through `san.semantic_inference` (static sizes), the others through `san.semantic_probs` (sizes as data).

Static shapes. Everything jitted here sees only *canvas* shapes: images are zero-padded to a canvas (a
multiple of `canvas_multiple`, 32 by default, the official `size_divisibility`), outputs live on an output
canvas (a multiple of `output_multiple`). Each image's own sizes enter as data: the official "upsample to
the padded size, crop to the image, resize to the output size" becomes, after the (static) upsampling to
the canvas, two small matmuls with per-image crop-and-resize matrices built on the host by
`resize.crop_resize_matrix` (the torch-exact weights, zero outside the image), so one compiled program serves
every image whose canvas matches. With one image per batch and `canvas_multiple` = 32 the model sees
exactly the official padded input; images batched onto a larger common canvas see more zero padding than
the official batch-of-one evaluation (SAN's attention has no padding mask), a small, documented deviation.

Test-time augmentation (SAN's `SemanticSegmentorWithTTA`, copied from Mask2Former, with detectron2's
`DatasetMapperTTA`): for each short side in MIN_SIZES (SAN: 320, 480, 640, 800, 960, 1120 = 640 x
(0.5 ... 1.75), long side capped at MAX_SIZE 4480) the input image is resized (ResizeShortestEdge, PIL
bilinear) and, with FLIP, also mirrored; every variant's semantic probabilities are computed at the
output size (the flipped ones mirrored back) and averaged. In SAN's evaluation the TTA input is the image
already resized by the test loader (short side 640), so it is resized twice; `runner.evaluate` reproduces
that.

Sliding windows (not in SAN; an option for large images): windows of `window` x `window` (clipped to the
image) every `stride` pixels, the last row/column aligned to the image's far edge (mmseg's grid); each
window's probabilities are computed at its own resolution, overlapping windows are averaged, and the
averaged map is resized to the output size. When one window covers the image this is plain inference.
"""

from __future__ import annotations

import dataclasses
from typing import List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from san_jax.data.augment import resize_image, shortest_edge_shape
from san_jax.data.image_io import to_rgb
from san_jax.evaluation import sem_seg
from san_jax.models import san as san_lib
from san_jax.ops import resize
from san_jax.text.classifier import ClassEmbeddingCache


# ---- options ----------------------------------------------------------------------------------------------
# SAN's test-time augmentation: short sides 640 x these scales (TEST.AUG.MIN_SIZES 320 .. 1120), long side
# <= 2560 x the largest (TEST.AUG.MAX_SIZE 4480), plus flips.
SAN_TTA_SCALES: Tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclasses.dataclass(frozen=True)
class TTAConfig:
  """detectron2 TEST.AUG: MIN_SIZES, MAX_SIZE, FLIP."""
  min_sizes: Tuple[int, ...] = tuple(int(640 * s) for s in SAN_TTA_SCALES)
  max_size: int = int(round(2560 * max(SAN_TTA_SCALES)))
  flip: bool = True

  @classmethod
  def from_scales(cls, scales: Sequence[float], min_size: int = 640, max_size: int = 2560,
                  flip: bool = True) -> "TTAConfig":
    """Scales of the test resize: short sides int(min_size * s), long side max_size * max(scales) (SAN's
    [0.5 .. 1.75] x 640 / 2560 give its MIN_SIZES and MAX_SIZE 4480)."""
    if not scales or min(scales) <= 0:
      raise ValueError(f"TTA scales must be positive, got {list(scales)}")
    return cls(tuple(int(min_size * s) for s in scales), int(round(max_size * max(scales))), bool(flip))


@dataclasses.dataclass(frozen=True)
class SlidingWindow:
  window: int = 640
  stride: int = 426

  def __post_init__(self):
    if self.window < 1 or not 0 < self.stride <= self.window:
      raise ValueError(f"sliding window needs window >= 1 and 0 < stride <= window (otherwise pixels are "
                       f"skipped); got window={self.window}, stride={self.stride}")


# ---- host-side geometry -----------------------------------------------------------------------------------
def window_grid(h: int, w: int, sliding: SlidingWindow) -> Tuple[List[Tuple[int, int]], Tuple[int, int]]:
  """Top-left corners of the windows over an h x w image and the (common) window size."""
  wh, ww = min(sliding.window, h), min(sliding.window, w)
  ny = max(h - wh + sliding.stride - 1, 0) // sliding.stride + 1
  nx = max(w - ww + sliding.stride - 1, 0) // sliding.stride + 1
  return [(min(i * sliding.stride, h - wh), min(j * sliding.stride, w - ww))
          for i in range(ny) for j in range(nx)], (wh, ww)


def _host_local(tree):
  """Arrays this process cannot address whole (a multi-host training state) gathered to the host."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return x
  return jax.tree.map(one, tree)


# ---- the segmenter ----------------------------------------------------------------------------------------
class Segmenter:
  """A SAN model ready for inference on this process's devices (parameters replicated on them).

  canvas_multiple: images are padded to multiples of this (default: the model's size_divisibility).
  output_multiple: output canvases are rounded up to multiples of this, so images of nearby sizes share a
    compiled program (the padding is cropped away and never counted).
  """

  def __init__(self, model: san_lib.SAN, template_set: Optional[str] = None, *,
               canvas_multiple: Optional[int] = None, output_multiple: int = 64):
    self.cfg = model.cfg
    devices = jax.local_devices()
    self.mesh = jax.make_mesh((len(devices),), ("batch",), (jax.sharding.AxisType.Auto,), devices=devices)
    self._replicated = NamedSharding(self.mesh, P())
    self._sharded = NamedSharding(self.mesh, P("batch"))
    self.graphdef = None
    self.set_model(model)
    # The text tower of the copy on this process's devices: a training run's model spans every host's.
    self.class_embeddings = ClassEmbeddingCache(nnx.merge(self.graphdef, self.state).ov_classifier,
                                                template_set or model.cfg.template_set)
    self.canvas_multiple = int(canvas_multiple or self.cfg.size_divisibility or 1)
    self.output_multiple = max(int(output_multiple), 1)
    self._forward = jax.jit(self._forward_impl, static_argnums=(3, 4))
    self._batch_labels = jax.jit(self._batch_labels_impl, static_argnums=(7, 8))
    self._probs_sum = jax.jit(self._probs_sum_impl)
    self._sliding_sum = jax.jit(self._sliding_sum_impl, static_argnums=(3,))
    self._finish = jax.jit(self._finish_impl, static_argnums=(3, 4))

  def set_model(self, model: san_lib.SAN) -> None:
    """Swaps in new parameters of the same architecture (a training run's periodic evaluation) without
    recompiling anything. The class-embedding cache is kept: the text tower is frozen."""
    graphdef, state = nnx.split(model)
    if self.graphdef is not None and graphdef != self.graphdef:
      raise ValueError("set_model: the new model's structure differs from this Segmenter's")
    self.graphdef = graphdef
    self.state = jax.device_put(_host_local(state), self._replicated)

  def embeddings(self, vocabulary: Sequence[str]) -> jax.Array:
    """Class embeddings [C, D] of `vocabulary` (validated, cached per vocabulary), replicated on this
    Segmenter's devices: the `class_emb` argument of its programs."""
    return jax.device_put(self.class_embeddings(vocabulary), self._replicated)

  # -- the reference single-image path ---------------------------------------------------------------------
  def _forward_impl(self, state, batch, class_emb, image_hw: Tuple[int, int], output_hw: Tuple[int, int]):
    out = self._model_call(state, batch, class_emb)
    probs = san_lib.semantic_inference(out["mask_logits"][0, -1], out["mask_preds"][0, -1],
                                       tuple(batch.shape[1:3]), image_hw, output_hw)
    return probs, san_lib.class_argmax(probs)

  def segment(self, image: np.ndarray, vocabulary: Sequence[str],
              output_hw: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One image (any of: uint8/uint16/float, gray, RGB, RGBA) -> (probs [C, h, w], labels [h, w] int32),
    at `output_hw` (default: the image's size). No resizing of the input: the official post-processing
    verbatim, compiled per (input size, output size)."""
    rgb = to_rgb(image)
    emb = self.class_embeddings(vocabulary)
    batch, sizes = san_lib.preprocess([rgb], self.cfg)
    out_hw = tuple(sizes[0]) if output_hw is None else tuple(int(s) for s in output_hw)
    probs, labels = self._forward(self.state, jnp.asarray(batch), emb, tuple(sizes[0]), out_hw)
    return np.asarray(probs), np.asarray(labels)

  # -- jitted canvas programs ------------------------------------------------------------------------------
  def _outputs(self, state, images, image_sizes, class_emb):
    """uint8 canvases [B, H, W, 3] + content sizes -> last mask logits [B, Q, C+1] and masks [B, Q, h, w]."""
    out = self._model_call(state, san_lib.normalize_on_device(images, image_sizes, self.cfg), class_emb)
    return out["mask_logits"][:, -1], out["mask_preds"][:, -1]

  def _model_call(self, state, images, class_emb):
    """The model on normalised images, traced under this Segmenter's mesh: over several devices the batch is
    split by XLA, and the model then keeps XLA's ops instead of the CPU custom calls (`layers._xla_partitions`)."""
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      return nnx.merge(self.graphdef, state)(images, class_emb)

  def _batch_labels_impl(self, state, images, image_sizes, rows, cols, class_emb, gt, num_classes: int,
                         ignore: int):
    """Label maps [B, Ho, Wo] and the batch's confusion matrix. Post-processing runs one image at a time
    (lax.map: a [C, Ho, Wo] probability map per image, not per batch), split over the local devices."""
    logits, preds = self._outputs(state, images, image_sizes, class_emb)
    padded_hw = tuple(images.shape[1:3])
    b = images.shape[0]
    n = self.mesh.size if b % self.mesh.size == 0 else 1

    def one(args):
      lg, pr, r, c = args
      return san_lib.class_argmax(san_lib.semantic_probs(lg, pr, padded_hw, r, c))

    split = lambda x: x.reshape((n, b // n) + x.shape[1:])
    labels = jax.vmap(lambda xs: jax.lax.map(one, xs))(tuple(map(split, (logits, preds, rows, cols))))
    labels = labels.reshape((b,) + labels.shape[2:])
    return labels, sem_seg.confusion_matrix(labels, gt, num_classes, ignore)

  def _probs_sum_impl(self, state, images, image_sizes, rows, cols, class_emb):
    """Sum over the batch (variants of one image) of the probabilities on the output canvas."""
    logits, preds = self._outputs(state, images, image_sizes, class_emb)
    padded_hw = tuple(images.shape[1:3])
    init = jnp.zeros((logits.shape[-1] - 1, rows.shape[1], cols.shape[1]), jnp.float32)

    def add(acc, args):
      lg, pr, r, c = args
      return acc + san_lib.semantic_probs(lg, pr, padded_hw, r, c), None

    return jax.lax.scan(add, init, (logits, preds, rows, cols))[0]

  def _sliding_sum_impl(self, state, windows, offsets, window_hw: Tuple[int, int], rows, cols, class_emb):
    """Windows [n, h', w', 3] (content window_hw, top-left `offsets` [n, 2]) of one image -> probabilities
    averaged where windows overlap, on the image canvas (rows/cols' input sizes), then crop-resized."""
    n = windows.shape[0]
    sizes = jnp.broadcast_to(jnp.asarray(window_hw, jnp.int32), (n, 2))
    logits, preds = self._outputs(state, windows, sizes, class_emb)
    padded_hw = tuple(windows.shape[1:3])
    c = logits.shape[-1] - 1
    wh, ww = window_hw
    acc = jnp.zeros((c, rows.shape[1], cols.shape[1]), jnp.float32)
    count = jnp.zeros((rows.shape[1], cols.shape[1]), jnp.float32)

    def add(carry, args):
      acc, count = carry
      lg, pr, off = args
      p = san_lib.semantic_inference(lg, pr, padded_hw, window_hw, window_hw).astype(jnp.float32)
      y, x = off[0], off[1]
      acc = jax.lax.dynamic_update_slice(acc, jax.lax.dynamic_slice(acc, (0, y, x), (c, wh, ww)) + p, (0, y, x))
      count = jax.lax.dynamic_update_slice(count, jax.lax.dynamic_slice(count, (y, x), (wh, ww)) + 1.0, (y, x))
      return (acc, count), None

    (acc, count), _ = jax.lax.scan(add, (acc, count), (logits, preds, offsets))
    return resize.apply_crop_resize(acc / jnp.maximum(count, 1.0), rows, cols)

  def _finish_impl(self, probs_sum, count, gt, num_classes: int, ignore: int):
    probs = probs_sum / count
    labels = san_lib.class_argmax(probs)
    conf = None if gt is None else sem_seg.confusion_matrix(labels, gt, num_classes, ignore)
    return probs, labels, conf

  # -- host drivers ----------------------------------------------------------------------------------------
  def _put(self, x, batch_axis: bool = False):
    sharded = batch_axis and x.shape[0] % self.mesh.size == 0
    return jax.device_put(np.asarray(x), self._sharded if sharded else self._replicated)

  def _variants_sum(self, image: np.ndarray, class_emb, out_hw, out_canvas, flips: Sequence[bool],
                    sliding: Optional[SlidingWindow]):
    """Summed probabilities [C, Ho, Wo] (device) of `image` and its mirrored copies, at out_hw."""
    h, w = image.shape[:2]
    windows = window_grid(h, w, sliding) if sliding is not None else None
    canvas = resize.padded_size((h, w), self.canvas_multiple)
    rows = resize.crop_resize_matrix(h, out_hw[0], canvas[0], out_canvas[0])
    colss = [resize.crop_resize_matrix(w, out_hw[1], canvas[1], out_canvas[1], flip=f) for f in flips]
    variants = [image[:, ::-1] if f else image for f in flips]
    if windows is None or len(windows[0]) == 1:
      batch = np.zeros((len(flips),) + canvas + (3,), np.uint8)
      for i, v in enumerate(variants):
        batch[i, :h, :w] = v
      sizes = np.tile(np.asarray([[h, w]], np.int32), (len(flips), 1))
      return self._probs_sum(self.state, self._put(batch), self._put(sizes), self._put(np.stack([rows] * len(flips))),
                             self._put(np.stack(colss)), class_emb)
    offsets, (wh, ww) = windows
    wcanvas = resize.padded_size((wh, ww), self.canvas_multiple)
    total = None
    for v, cols in zip(variants, colss):
      crops = np.zeros((len(offsets),) + wcanvas + (3,), np.uint8)
      for i, (y, x) in enumerate(offsets):
        crops[i, :wh, :ww] = v[y:y + wh, x:x + ww]
      s = self._sliding_sum(self.state, self._put(crops), self._put(np.asarray(offsets, np.int32)), (wh, ww),
                            self._put(rows), self._put(cols), class_emb)
      total = s if total is None else total + s
    return total

  def probs_sum(self, image: np.ndarray, class_emb, output_hw: Tuple[int, int], out_canvas: Tuple[int, int], *,
                tta: Optional[TTAConfig] = None, sliding: Optional[SlidingWindow] = None):
    """(sum of probabilities [C, Ho, Wo] on device, number of summed variants) for one uint8 RGB image."""
    if tta is None:
      return self._variants_sum(image, class_emb, output_hw, out_canvas, (False,), sliding), 1
    flips = (False, True) if tta.flip else (False,)
    total = None
    h, w = image.shape[:2]
    for min_size in tta.min_sizes:
      scaled = resize_image(image, shortest_edge_shape(h, w, min_size, tta.max_size))
      s = self._variants_sum(scaled, class_emb, output_hw, out_canvas, flips, sliding)
      total = s if total is None else total + s
    return total, len(tta.min_sizes) * len(flips)

  def predict(self, image: np.ndarray, vocabulary: Sequence[str], *, output_hw: Optional[Tuple[int, int]] = None,
              resize_to: Optional[Tuple[int, int]] = None, tta: Optional[TTAConfig] = None,
              sliding: Optional[SlidingWindow] = None,
              return_probs: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """One image -> (labels [H, W] int32, probs [C, H, W] or None) at `output_hw` (default: its size).

    resize_to: (min_size, max_size) of the test resize (detectron2 ResizeShortestEdge; SAN: (640, 2560))
    applied before inference; None feeds the image as it is.
    """
    rgb = to_rgb(image)
    out_hw = tuple(int(s) for s in (output_hw or rgb.shape[:2]))
    if resize_to is not None and resize_to[0]:
      rgb = resize_image(rgb, shortest_edge_shape(rgb.shape[0], rgb.shape[1], int(resize_to[0]), int(resize_to[1])))
    emb = self.embeddings(vocabulary)
    out_canvas = resize.padded_size(out_hw, self.output_multiple)
    total, count = self.probs_sum(rgb, emb, out_hw, out_canvas, tta=tta, sliding=sliding)
    probs, labels, _ = self._finish(total, jnp.float32(count), None, 0, 0)
    labels = np.asarray(labels)[:out_hw[0], :out_hw[1]]
    return labels, (np.asarray(probs)[:, :out_hw[0], :out_hw[1]] if return_probs else None)

  # -- evaluation ------------------------------------------------------------------------------------------
  def evaluate_batch(self, batch: Mapping[str, np.ndarray], class_emb, num_classes: int, ignore: int):
    """One evaluation batch of the pipeline -> (labels [B, Ho, Wo], confusion matrix), both on device.

    batch: `image` uint8 [B, H, W, 3] (content top-left, zero padding) with content sizes `image_size`
    [B, 2], original-size ground truth `sem_seg` [B, Hl, Wl] with sizes `orig_size` [B, 2], and
    `example_valid` [B] (False: batch padding, counted nowhere). Each prediction is resized to its ground
    truth's size and compared on an output canvas large enough for all of them.
    """
    images = np.asarray(batch["image"])
    b, hc, wc = images.shape[:3]
    valid = np.asarray(batch["example_valid"], bool)
    label_sizes = np.asarray(batch["orig_size"], np.int64)
    largest = label_sizes[valid].max(axis=0) if valid.any() else (1, 1)
    out_canvas = resize.padded_size(tuple(int(v) for v in largest), self.output_multiple)
    rows = np.zeros((b, out_canvas[0], hc), np.float32)
    cols = np.zeros((b, out_canvas[1], wc), np.float32)
    gt = np.full((b,) + out_canvas, ignore, np.int32)
    sizes = np.asarray(batch["image_size"], np.int32).copy()
    for i in np.flatnonzero(valid):
      (ih, iw), (oh, ow) = sizes[i], label_sizes[i]
      rows[i] = resize.crop_resize_matrix(int(ih), int(oh), hc, out_canvas[0])
      cols[i] = resize.crop_resize_matrix(int(iw), int(ow), wc, out_canvas[1])
      gt[i, :oh, :ow] = batch["sem_seg"][i, :oh, :ow]
    sizes[~valid] = (hc, wc)  # padding: any valid size; its zero matrices and ignored gt count nothing
    return self._batch_labels(self.state, self._put(images, True), self._put(sizes, True), self._put(rows, True),
                              self._put(cols, True), class_emb, self._put(gt, True), int(num_classes), int(ignore))

  def evaluate_image(self, image: np.ndarray, gt: np.ndarray, class_emb, num_classes: int, ignore: int, *,
                     tta: Optional[TTAConfig] = None, sliding: Optional[SlidingWindow] = None):
    """One (test-resized) image with TTA and/or sliding windows -> (labels, confusion matrix) on device,
    the prediction resized to the ground truth's size."""
    out_hw = gt.shape[:2]
    out_canvas = resize.padded_size(out_hw, self.output_multiple)
    gt_canvas = np.full(out_canvas, ignore, np.int32)
    gt_canvas[:out_hw[0], :out_hw[1]] = gt
    total, count = self.probs_sum(image, class_emb, out_hw, out_canvas, tta=tta, sliding=sliding)
    _, labels, conf = self._finish(total, jnp.float32(count), self._put(gt_canvas), int(num_classes), int(ignore))
    return labels, conf

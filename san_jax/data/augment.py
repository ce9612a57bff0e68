"""Host-side (numpy/PIL) augmentation and target building, as SAN's detectron2 data path does it.

Training (SAN's `MaskFormerSemanticDatasetMapper` with the COCO-Stuff config), in this order:
  1. ResizeShortestEdge: short side drawn from MIN_SIZE_TRAIN = (320, 384, ..., 960) ("choice"), long side
     capped at 2560. Images bilinear through PIL (detectron2 resizes uint8 images with PIL), labels with
     torch's `nearest` (detectron2 resizes the label map, held as float64, with F.interpolate).
  2. RandomCrop_CategoryAreaConstraint: an "absolute" 640x640 crop (smaller sides kept whole), redrawn up
     to 10 times while one category covers more than SINGLE_CATEGORY_MAX_AREA of the crop's labelled
     pixels. SAN sets the area to 1.0, which makes it a single plain random crop.
  3. ColorAugSSDTransform: SSD photometric distortion in Mask2Former's order (brightness, then either
     contrast/saturation/hue or saturation/hue/contrast), each step applied with probability 1/2, in
     OpenCV's 8-bit HSV space.
  4. RandomFlip: horizontal, probability 1/2.
  5. Padding to SIZE_DIVISIBILITY (640) at the bottom/right: the image with 128 (the official mapper pads
     raw pixels with 128 before the model normalises them), the label with the ignore value.
Then `semantic_to_targets` turns the label map into one binary mask per class present, padded to a fixed
count so batches have static shapes.

Evaluation (detectron2's DatasetMapper): the image alone is resized with short side 640, long side <= 2560;
the label stays at the original size (the evaluator compares at that size).

Every random draw comes from an explicit `np.random.Generator`, so a pipeline position fixes the result.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from san_jax.ops import resize

# detectron2 ResizeShortestEdge MIN_SIZE_TRAIN of SAN's configs: [int(x * 0.1 * 640) for x in range(5, 16)].
MIN_SIZE_TRAIN: Tuple[int, ...] = tuple(int(x * 0.1 * 640) for x in range(5, 16))


@dataclasses.dataclass(frozen=True)
class TrainAugConfig:
  """SAN's training augmentation (configs/Base-coco-stuff-164K-171.yaml); field names follow the project
  config (`cfg.data`)."""
  min_size_train: Tuple[int, ...] = MIN_SIZE_TRAIN
  max_size_train: int = 2560
  min_size_train_sampling: str = "choice"  # or "range": uniform integer in [min, max]
  crop_size: Tuple[int, int] = (640, 640)
  single_category_max_area: float = 1.0
  color_aug_ssd: bool = True
  flip: bool = True
  pad_size: Optional[Tuple[int, int]] = None  # canvas (h, w) to pad to; None: crop_size
  image_pad_value: int = 128
  ignore_label: int = 255
  max_targets: int = 64
  with_masks: bool = True  # False: no [K, H, W] masks (build them on device from sem_seg and labels)


@dataclasses.dataclass(frozen=True)
class EvalAugConfig:
  """detectron2's test-time resize; padding makes batches static (the image's own size is returned)."""
  min_size_test: int = 640
  max_size_test: int = 2560
  size_divisibility: int = 32
  image_canvas: Optional[Tuple[int, int]] = None  # fixed (h, w) for the resized image; None: next multiple
  label_canvas: Optional[Tuple[int, int]] = None  # fixed (h, w) for the original-size label; None: as is
  image_pad_value: int = 0
  ignore_label: int = 255


# ----------------------------------------------------------------------------------------------------------
# Resizing


def shortest_edge_shape(h: int, w: int, short_edge: int, max_size: int) -> Tuple[int, int]:
  """detectron2 `ResizeShortestEdge.get_output_shape`: (new_h, new_w), rounded half up."""
  scale = short_edge * 1.0 / min(h, w)
  if h < w:
    newh, neww = short_edge * 1.0, scale * w
  else:
    newh, neww = scale * h, short_edge * 1.0
  if max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh, neww = newh * scale, neww * scale
  return int(newh + 0.5), int(neww + 0.5)


def sample_short_edge(rng: np.random.Generator, sizes: Sequence[int], sampling: str = "choice") -> int:
  if sampling == "choice":
    return int(sizes[rng.integers(len(sizes))])
  if sampling == "range":
    if len(sizes) != 2:
      raise ValueError(f"'range' sampling takes (min, max), got {sizes}")
    return int(rng.integers(sizes[0], sizes[1] + 1))
  raise ValueError(f"unknown sampling {sampling!r}")


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, C] -> [h, w, C], PIL bilinear (what detectron2's ResizeTransform does for uint8)."""
  h, w = size
  if image.shape[:2] == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_label(label: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """[H, W] label map -> [h, w], nearest as torch computes it (detectron2 resizes labels with torch)."""
  h, w = size
  if label.shape[:2] == (h, w):
    return label
  return label[resize.nearest_indices(label.shape[0], h)[:, None], resize.nearest_indices(label.shape[1], w)[None, :]]


# ----------------------------------------------------------------------------------------------------------
# Cropping


def crop_size_for(shape: Tuple[int, int], crop_size: Tuple[int, int]) -> Tuple[int, int]:
  """detectron2 RandomCrop "absolute": the crop, shrunk to the image where the image is smaller."""
  return min(crop_size[0], shape[0]), min(crop_size[1], shape[1])


def random_crop_box(rng: np.random.Generator, label: np.ndarray, crop_size: Tuple[int, int],
                    single_category_max_area: float = 1.0, ignore_label: int = 255,
                    max_tries: int = 10) -> Tuple[int, int, int, int]:
  """(y0, x0, h, w) of detectron2's RandomCrop_CategoryAreaConstraint.

  With `single_category_max_area` >= 1 it is one plain random crop. Otherwise crops are redrawn (at most
  `max_tries`) until at least two categories are present and none covers `single_category_max_area` or
  more of the non-ignored pixels; the last draw is kept if none qualifies.
  """
  h, w = label.shape[:2]
  ch, cw = crop_size_for((h, w), crop_size)
  if single_category_max_area >= 1.0:
    return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw
  for _ in range(max_tries):
    y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    values, counts = np.unique(label[y0:y0 + ch, x0:x0 + cw], return_counts=True)
    counts = counts[values != ignore_label]
    if len(counts) > 1 and counts.max() < counts.sum() * single_category_max_area:
      break
  return y0, x0, ch, cw


# ----------------------------------------------------------------------------------------------------------
# Photometric distortion (Mask2Former/detectron2 ColorAugSSDTransform), OpenCV 8-bit HSV semantics

# OpenCV's fixed-point tables (hsv_shift = 12), folded into lookup tables over (value, difference) and
# (hue numerator, difference) so that a conversion is a few integer ops and two gathers.
_HSV_SHIFT = 12
_HALF = 1 << (_HSV_SHIFT - 1)


def _build_s_table() -> np.ndarray:
  """s[v * 256 + diff] = (diff * round(255 * 4096 / v) + 2048) >> 12, OpenCV's saturation."""
  sdiv = np.array([0] + [int(round((255 << _HSV_SHIFT) / v)) for v in range(1, 256)], np.int64)
  diff = np.arange(256, dtype=np.int64)
  return ((diff[None, :] * sdiv[:, None] + _HALF) >> _HSV_SHIFT).clip(0, 255).astype(np.uint8).ravel()


def _build_h_table() -> np.ndarray:
  """h[(num + 255) * 256 + diff] for num in [-255, 1275] (5 * diff at most): OpenCV's hue, in [0, 180)."""
  hdiv = np.array([0] + [int(round((180 << _HSV_SHIFT) / (6.0 * d))) for d in range(1, 256)], np.int64)
  num = np.arange(-255, 1276, dtype=np.int64)
  h = (num[:, None] * hdiv[None, :] + _HALF) >> _HSV_SHIFT
  h = np.where(h < 0, h + 180, h)
  return h.astype(np.uint8).ravel()


_S_TABLE = _build_s_table()
_H_TABLE = _build_h_table()


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
  """uint8 RGB -> uint8 HSV with H in [0, 180), as OpenCV's COLOR_RGB2HSV (its fixed-point tables).

  Checked equal to opencv-python 5.0 over all 2^24 colours.
  """
  r, g, b = (image[..., i].astype(np.int32) for i in range(3))
  v = np.maximum(np.maximum(r, g), b)
  diff = v - np.minimum(np.minimum(r, g), b)
  s = _S_TABLE[(v << 8) | diff]
  # The hue numerator of the max channel (red wins ties, then green), offset to index the table.
  num = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = _H_TABLE[((num + 255) << 8) | diff]
  out = np.empty(image.shape[:-1] + (3,), np.uint8)
  out[..., 0], out[..., 1], out[..., 2] = h, s, v
  return out


# OpenCV's sector table: which of (v, p, q, t) goes to (b, g, r) in each 60-degree sector.
_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def _build_rgb_multipliers() -> np.ndarray:
  """m[c, h * 256 + s]: channel c (RGB) of HSV->RGB is v * m, OpenCV's vectorised 8-bit arithmetic.

  h * 6/180 in float32, sector = trunc, f the fraction; p = 1 - s, q = 1 - s*f and t = 1 - s*(1 - f),
  the latter two rounded once (x86-64 builds fuse them into an FMA; s*f is exact in float64, so one cast
  reproduces that).
  """
  f32 = np.float32
  hh = np.arange(180, dtype=np.float32) * f32(6.0 / 180.0)
  pre = np.trunc(hh)
  frac = (hh - pre)[:, None]
  sector = np.mod(pre.astype(np.int64), 6)
  s = (np.arange(256, dtype=np.float32) * f32(1.0 / 255.0))[None, :]
  s64 = s.astype(np.float64)
  tab = np.stack([np.ones((180, 256), f32), np.broadcast_to(f32(1.0) - s, (180, 256)),
                  (1.0 - s64 * frac).astype(f32), (1.0 - s64 * (f32(1.0) - frac)).astype(f32)], axis=-1)
  bgr = np.take_along_axis(tab, np.broadcast_to(_SECTORS[sector][:, None, :], (180, 256, 3)), axis=-1)
  return np.ascontiguousarray(bgr[..., ::-1].reshape(180 * 256, 3).T)


_RGB_MULT = _build_rgb_multipliers()
_V_SCALED = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """uint8 HSV (H in [0, 180)) -> uint8 RGB, as OpenCV's COLOR_HSV2RGB computes it.

  Follows OpenCV's vectorised 8-bit path (which converts all but the last few pixels of each row): float32
  math, results truncated, not rounded, to uint8. Checked equal to opencv-python 5.0 over all 180*256*256
  inputs.
  """
  idx = (hsv[..., 0].astype(np.int32) << 8) | hsv[..., 1]
  v = _V_SCALED[hsv[..., 2]]
  out = np.empty(hsv.shape[:-1] + (3,), np.uint8)
  for c in range(3):
    x = v * _RGB_MULT[c][idx]
    x *= np.float32(255.0)
    out[..., c] = np.minimum(x, np.float32(255.0))  # truncates toward zero; x >= 0
  return out


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """ColorAugSSDTransform.convert: float32 affine, clip to [0, 255], truncate to uint8."""
  return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def color_aug_ssd(image: np.ndarray, rng: np.random.Generator, *, brightness_delta: float = 32,
                  contrast_range: Tuple[float, float] = (0.5, 1.5),
                  saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
  """SSD photometric distortion of a uint8 RGB image (Mask2Former's ColorAugSSDTransform)."""

  def brightness(img):
    if rng.integers(2):
      return _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    return img

  def contrast(img):
    if rng.integers(2):
      return _convert(img, alpha=rng.uniform(*contrast_range))
    return img

  def saturation(img):
    if rng.integers(2):
      hsv = rgb_to_hsv(img)
      hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
      return hsv_to_rgb(hsv)
    return img

  def hue(img):
    if rng.integers(2):
      hsv = rgb_to_hsv(img)
      shift = int(rng.integers(-hue_delta, hue_delta + 1))
      hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 180
      return hsv_to_rgb(hsv)
    return img

  image = brightness(image)
  if rng.integers(2):
    return hue(saturation(contrast(image)))
  return contrast(hue(saturation(image)))


# ----------------------------------------------------------------------------------------------------------
# Padding and targets


def pad_to(image: np.ndarray, label: Optional[np.ndarray], size: Tuple[int, int], *, image_value: int = 0,
           ignore_label: int = 255) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Pads image [h, w, C] and label [h, w] at the bottom/right to `size`; fails if they are larger."""
  H, W = size
  h, w = image.shape[:2]
  if h > H or w > W:
    raise ValueError(f"cannot pad {(h, w)} to the smaller {size}")
  out = np.full((H, W) + image.shape[2:], image_value, image.dtype)
  out[:h, :w] = image
  if label is None:
    return out, None
  lab = np.full((H, W), ignore_label, label.dtype)
  lab[:label.shape[0], :label.shape[1]] = label
  return out, lab


def pad_label(label: np.ndarray, size: Tuple[int, int], ignore_label: int = 255) -> np.ndarray:
  H, W = size
  h, w = label.shape
  if h > H or w > W:
    raise ValueError(f"cannot pad label {(h, w)} to the smaller {size}")
  out = np.full((H, W), ignore_label, label.dtype)
  out[:h, :w] = label
  return out


def semantic_to_targets(label: np.ndarray, max_targets: int, *, ignore_label: int = 255,
                        with_masks: bool = True) -> Dict[str, np.ndarray]:
  """One binary mask per class present in `label`, padded to `max_targets` rows.

  Returns labels int32 [K] (class ids ascending, -1 in unused rows), valid bool [K], masks uint8 [K, H, W]
  (zeros in unused rows; omitted without `with_masks`) and num_dropped, the classes beyond K left out.
  When more than K classes are present the K largest by area are kept (a warning-worthy event: raise
  max_targets), still in ascending id order.
  """
  values, counts = np.unique(label, return_counts=True)
  keep = values != ignore_label
  values, counts = values[keep], counts[keep]
  dropped = max(len(values) - max_targets, 0)
  if dropped:
    largest = np.sort(np.argsort(-counts, kind="stable")[:max_targets])
    values = values[largest]
  n = len(values)
  labels = np.full((max_targets,), -1, np.int32)
  labels[:n] = values
  out = {"labels": labels, "valid": np.arange(max_targets) < n, "num_dropped": np.int32(dropped)}
  if with_masks:
    masks = np.zeros((max_targets,) + label.shape, np.uint8)
    if n:
      masks[:n] = label[None] == values[:, None, None]
    out["masks"] = masks
  return out


# ----------------------------------------------------------------------------------------------------------
# Whole chains


def train_transform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    cfg: TrainAugConfig = TrainAugConfig()) -> Dict[str, np.ndarray]:
  """The training chain on one example; every output has a shape fixed by `cfg`.

  Returns image uint8 [H, W, 3], sem_seg int32 [H, W] (ignore outside the content), image_size int32 [2]
  (content size before padding), and the targets of `semantic_to_targets`.
  """
  h, w = image.shape[:2]
  if label.shape != (h, w):
    raise ValueError(f"image {image.shape} and label {label.shape} sizes differ")
  short = sample_short_edge(rng, cfg.min_size_train, cfg.min_size_train_sampling)
  size = shortest_edge_shape(h, w, short, cfg.max_size_train)
  image, label = resize_image(image, size), resize_label(label, size)
  y0, x0, ch, cw = random_crop_box(rng, label, tuple(cfg.crop_size), cfg.single_category_max_area,
                                   cfg.ignore_label)
  image, label = image[y0:y0 + ch, x0:x0 + cw], label[y0:y0 + ch, x0:x0 + cw]
  if cfg.color_aug_ssd:
    image = color_aug_ssd(image, rng)
  if cfg.flip and rng.uniform() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  content = image.shape[:2]
  canvas = tuple(cfg.pad_size or cfg.crop_size)
  image, label = pad_to(np.ascontiguousarray(image), np.ascontiguousarray(label).astype(np.int32), canvas,
                        image_value=cfg.image_pad_value, ignore_label=cfg.ignore_label)
  out = {"image": image, "sem_seg": label, "image_size": np.asarray(content, np.int32)}
  out.update(semantic_to_targets(label, cfg.max_targets, ignore_label=cfg.ignore_label,
                                 with_masks=cfg.with_masks))
  return out


def eval_transform(image: np.ndarray, label: np.ndarray,
                   cfg: EvalAugConfig = EvalAugConfig()) -> Dict[str, np.ndarray]:
  """The evaluation chain: resized image padded to its canvas, original-size label padded to its own.

  Returns image uint8, image_size int32 [2] (resized content size: the model crops its output to it),
  sem_seg int32 (original-size label, ignore outside), orig_size int32 [2] (the label's size: the output
  is resized to it).
  """
  h, w = image.shape[:2]
  size = shortest_edge_shape(h, w, cfg.min_size_test, cfg.max_size_test)
  resized = resize_image(image, size)
  canvas = tuple(cfg.image_canvas) if cfg.image_canvas else resize.padded_size(size, cfg.size_divisibility)
  padded, _ = pad_to(resized, None, canvas, image_value=cfg.image_pad_value)
  lab = label.astype(np.int32)
  if cfg.label_canvas:
    lab = pad_label(lab, tuple(cfg.label_canvas), cfg.ignore_label)
  return {"image": padded, "image_size": np.asarray(size, np.int32), "sem_seg": lab,
          "orig_size": np.asarray((h, w), np.int32)}

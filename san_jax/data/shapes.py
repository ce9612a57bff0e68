"""A synthetic open-vocabulary segmentation set: coloured shapes on textured backgrounds.

Every class is a (colour, shape) combination ("red triangle", prompted as "a red triangle"), so a model can
be trained on part of the combinations and evaluated on the rest: `unseen_classes()` is a fixed held-out
subset in which every colour and every shape still occurs among the seen classes, i.e. the unseen classes
are new *combinations* of known words, the setting open-vocabulary segmentation is about.

Images are a pure function of (seed, split, index), so any example can be rendered on demand: `ShapesSource`
is a random-access source that needs no build step (tests, the demo), and the `shapes` TFDS builder writes
the same examples to ArrayRecord files. Labels follow the conventions of the real sets: ids index
`class_names()`, background and unlabeled pixels are 255 (ignored).

One rasterised (non-antialiased) mask per object writes both its pixels and its label, so image and label
are aligned pixel for pixel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

IGNORE_LABEL = 255

# Saturated, mutually distinct colours (RGB). The background is kept near grey so colour names stay true.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 210, 35),
    "purple": (135, 55, 180),
    "orange": (245, 135, 25),
    "pink": (240, 115, 185),
    "cyan": (35, 200, 210),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond")
SPLITS: Tuple[str, ...] = ("train", "val", "test")

# Held-out combinations: (colour index - shape index) % _HOLDOUT_PERIOD == 0. With 8 colours and 6 shapes
# this holds out 12 of 48 classes, 1 or 2 shapes per colour and 2 colours per shape.
_HOLDOUT_PERIOD = 4


def all_classes() -> Tuple[Tuple[str, str], ...]:
  """Every (colour, shape) combination, colour-major; the position is the label id."""
  return tuple((c, s) for c in COLORS for s in SHAPES)


def class_names() -> Tuple[str, ...]:
  """Class names in label-id order, e.g. "red circle" (the vocabulary a model is prompted with)."""
  return tuple(f"{c} {s}" for c, s in all_classes())


def captions() -> Tuple[str, ...]:
  """One caption per class, e.g. "a red circle"."""
  return tuple(f"a {name}" for name in class_names())


def class_id(color: str, shape: str) -> int:
  return all_classes().index((color, shape))


def unseen_classes() -> Tuple[str, ...]:
  """The held-out class names (deterministic); their words all appear in `seen_classes()`."""
  colors, shapes = list(COLORS), list(SHAPES)
  return tuple(f"{c} {s}" for c, s in all_classes()
               if (colors.index(c) - shapes.index(s)) % _HOLDOUT_PERIOD == 0)


def seen_classes() -> Tuple[str, ...]:
  unseen = set(unseen_classes())
  return tuple(n for n in class_names() if n not in unseen)


def class_ids(names: Sequence[str]) -> Tuple[int, ...]:
  index = {n: i for i, n in enumerate(class_names())}
  return tuple(index[n] for n in names)


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
  """Vertices of `shape` with circumradius r around (cx, cy), rotated by `angle` radians."""
  if shape == "circle":
    n, radii = 48, [r]
  elif shape == "square":
    n, radii = 4, [r]
    angle += math.pi / 4  # axis-aligned at angle 0, so it never looks like the diamond
  elif shape == "triangle":
    n, radii = 3, [r]
  elif shape == "hexagon":
    n, radii = 6, [r]
  elif shape == "star":
    n, radii = 10, [r, 0.45 * r]
  elif shape == "diamond":  # a rhombus, narrower than tall
    pts = [(0.0, -r), (0.6 * r, 0.0), (0.0, r), (-0.6 * r, 0.0)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]
  else:
    raise ValueError(f"unknown shape {shape!r}")
  pts = []
  for k in range(n):
    t = angle + 2 * math.pi * k / n - math.pi / 2
    rk = radii[k % len(radii)]
    pts.append((cx + rk * math.cos(t), cy + rk * math.sin(t)))
  return pts


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A low-saturation textured background: tinted grey, a linear gradient, stripes or checks, noise."""
  base = rng.uniform(70, 190)
  tint = rng.uniform(-12, 12, size=3).astype(np.float32)
  yy, xx = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32),
                       indexing="ij")
  theta = rng.uniform(0, 2 * math.pi)
  gradient = np.float32(rng.uniform(10, 40)) * (math.cos(theta) * xx + math.sin(theta) * yy)
  period = rng.uniform(0.08, 0.4)
  kind = rng.integers(3)
  if kind == 0:  # stripes
    texture = np.sign(np.sin((xx * math.cos(theta + 1) + yy * math.sin(theta + 1)) * math.pi / period))
  elif kind == 1:  # checks
    texture = np.sign(np.sin(xx * math.pi / period) * np.sin(yy * math.pi / period))
  else:  # none
    texture = np.zeros_like(xx)
  lum = np.float32(base) + gradient + np.float32(rng.uniform(5, 18)) * texture
  img = lum[..., None] + tint[None, None, :]
  img = img + np.float32(rng.uniform(3, 12)) * rng.standard_normal((h, w, 1), dtype=np.float32)
  return img.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
  """What a shapes split looks like. `classes`: the label ids objects are drawn from (None: all)."""
  image_size: Tuple[int, int] = (128, 128)  # (height, width)
  min_objects: int = 1
  max_objects: int = 4
  min_radius: float = 0.08  # fractions of min(height, width)
  max_radius: float = 0.25
  classes: Optional[Tuple[int, ...]] = None
  # Random rotation of the rotation-invariant-named shapes (circle, triangle, star, hexagon) over the full
  # turn; False keeps every shape upright (within the square/diamond's small tilt): an easier set, for
  # models that must learn shape from a few thousand images (the CPU demo's tiny CLIP).
  rotate: bool = True


def spec_from_config(data_cfg, *, all_classes: bool = False) -> ShapesSpec:
  """The ShapesSpec a run config's `data` section describes (keys `shapes_*`; absent keys keep the defaults).
  all_classes: ignore `shapes_classes` (evaluation draws objects of every class, seen and unseen)."""
  d, default = data_cfg, ShapesSpec()
  size = int(d.get("shapes_image_size", default.image_size[0]))
  classes = None if all_classes else d.get("shapes_classes", None)
  return ShapesSpec(image_size=(size, size),
                    min_objects=int(d.get("shapes_min_objects", default.min_objects)),
                    max_objects=int(d.get("shapes_max_objects", default.max_objects)),
                    min_radius=float(d.get("shapes_min_radius", default.min_radius)),
                    max_radius=float(d.get("shapes_max_radius", default.max_radius)),
                    classes=tuple(int(c) for c in classes) if classes else None,
                    rotate=bool(d.get("shapes_rotate", default.rotate)))


def _paint(img: np.ndarray, label: np.ndarray, pts, cid: int, color, rng: np.random.Generator) -> None:
  """Composites a shaded, noisy object of `color` inside polygon `pts` into `img` and `cid` into `label`.

  Works on the polygon's bounding box only. One rasterised mask sets both the pixels and the label, so the
  two agree by construction.
  """
  h, w = img.shape[:2]
  xs, ys = [p[0] for p in pts], [p[1] for p in pts]
  x0, y0 = max(int(math.floor(min(xs))) - 1, 0), max(int(math.floor(min(ys))) - 1, 0)
  x1, y1 = min(int(math.ceil(max(xs))) + 2, w), min(int(math.ceil(max(ys))) + 2, h)
  if x1 <= x0 or y1 <= y0:
    return
  mask_img = Image.new("L", (x1 - x0, y1 - y0), 0)
  ImageDraw.Draw(mask_img).polygon([(x - x0, y - y0) for x, y in pts], fill=1)
  mask = np.asarray(mask_img, dtype=bool)
  rgb = np.asarray(color, np.float32) + rng.uniform(-15, 15, size=3).astype(np.float32)
  shade = 1.0 + np.float32(rng.uniform(-0.15, 0.15)) * np.linspace(-1, 1, y1 - y0, dtype=np.float32)
  obj = rgb[None, None, :] * shade[:, None, None]
  obj = obj + 5 * rng.standard_normal((y1 - y0, x1 - x0, 1), dtype=np.float32)
  img[y0:y1, x0:x1][mask] = obj[mask]
  label[y0:y1, x0:x1][mask] = cid


def render(index: int, *, seed: int = 0, split: str = "train", spec: ShapesSpec = ShapesSpec()) -> Dict:
  """Example `index` of `split`: {"image": uint8 [H, W, 3], "label": uint8 [H, W], "file_name": str}."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  h, w = spec.image_size
  img = _background(rng, h, w)
  label = np.full((h, w), IGNORE_LABEL, np.uint8)
  combos = all_classes()
  pool = spec.classes if spec.classes is not None else tuple(range(len(combos)))
  n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
  side = min(h, w)
  for _ in range(n_obj):
    cid = int(pool[rng.integers(len(pool))])
    color, shape = combos[cid]
    r = rng.uniform(spec.min_radius, spec.max_radius) * side
    cx, cy = rng.uniform(0.5 * r, w - 0.5 * r), rng.uniform(0.5 * r, h - 0.5 * r)
    upright = shape in ("square", "diamond") or not spec.rotate
    angle = rng.uniform(-0.25, 0.25) if upright else rng.uniform(0, 2 * math.pi)
    pts = _polygon(shape, cx, cy, r, angle)
    _paint(img, label, pts, cid, COLORS[color], rng)
  image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
  return {"image": image, "label": label, "file_name": f"{split}_{index:08d}"}


class ShapesSource:
  """Random-access, in-memory shapes split: `len()` examples, each rendered on demand by `render`.

  Has the interface of `tfds.data_source` splits (`__len__`, `__getitem__` -> dict of numpy arrays), so the
  input pipeline takes it directly. Picklable (it holds only its parameters).
  """

  def __init__(self, num_examples: int, *, seed: int = 0, split: str = "train",
               spec: ShapesSpec = ShapesSpec()):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self.split = split
    self.spec = spec

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    return render(index, seed=self.seed, split=self.split, spec=self.spec)

  def __repr__(self) -> str:
    return f"ShapesSource({self.num_examples}, seed={self.seed}, split={self.split!r}, spec={self.spec})"

  @property
  def class_names(self) -> Tuple[str, ...]:
    return class_names()

  @property
  def ignore_label(self) -> int:
    return IGNORE_LABEL

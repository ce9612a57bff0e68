"""Pictures of segmentations: a palette, colour overlays, legends, and image | ground truth | prediction grids.

numpy + PIL only (the font is PIL's built-in scalable one), so it runs anywhere predict.py and the demo
run. Label maps are integer arrays of class ids; an `ignore` value (255 in most data sets) is drawn as
neither class nor overlay.
"""

from __future__ import annotations

import colorsys
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = Tuple[int, int, int]
IGNORE_COLOR: Color = (0, 0, 0)

# The first colours: saturated, mutually distinct, readable against white text backgrounds.
_BASE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128)], np.uint8)


def palette(n: int) -> np.ndarray:
  """n distinct RGB colours [n, 3] uint8, the same for every call: 20 hand-picked ones, then hues spaced
  by the golden angle with alternating saturation and brightness (neighbouring ids stay distinguishable
  for vocabularies of any size)."""
  n = int(n)
  if n <= len(_BASE):
    return _BASE[:n].copy()
  extra = []
  for i in range(n - len(_BASE)):
    hue = (0.13 + i * 0.618033988749895) % 1.0
    sat = (0.95, 0.6, 0.8)[i % 3]
    val = (0.9, 0.7, 1.0, 0.55)[(i // 3) % 4]
    extra.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)])
  return np.concatenate([_BASE, np.asarray(extra, np.uint8)], axis=0)


def _as_rgb(image: np.ndarray) -> np.ndarray:
  from san_jax.data.image_io import to_rgb  # pylint: disable=g-import-not-at-top
  return to_rgb(np.asarray(image))


def colorize(labels: np.ndarray, colors: np.ndarray, ignore: Optional[int] = None) -> np.ndarray:
  """Label map [H, W] -> RGB [H, W, 3]; `ignore` pixels and ids beyond the palette in IGNORE_COLOR."""
  labels = np.asarray(labels).astype(np.int64)
  valid = (labels >= 0) & (labels < len(colors))
  if ignore is not None:
    valid &= labels != ignore
  out = np.zeros(labels.shape + (3,), np.uint8)
  out[:] = IGNORE_COLOR
  out[valid] = np.asarray(colors, np.uint8)[labels[valid]]
  return out


def boundaries(labels: np.ndarray) -> np.ndarray:
  """bool [H, W]: pixels whose right or lower neighbour has another label."""
  labels = np.asarray(labels)
  edge = np.zeros(labels.shape, bool)
  edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
  edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
  return edge


def overlay(image: np.ndarray, labels: np.ndarray, colors: np.ndarray, *, alpha: float = 0.5,
            ignore: Optional[int] = None, draw_boundaries: bool = True) -> np.ndarray:
  """The image with each class region tinted by its colour (weight `alpha`) and region borders drawn in
  white; ignored pixels keep the image as it is."""
  rgb = _as_rgb(image).astype(np.float32)
  labels = np.asarray(labels)
  if labels.shape != rgb.shape[:2]:
    raise ValueError(f"label map {labels.shape} and image {rgb.shape[:2]} sizes differ")
  tint = colorize(labels, colors, ignore).astype(np.float32)
  mask = (labels >= 0) & (labels < len(colors))
  if ignore is not None:
    mask &= labels != ignore
  out = np.where(mask[..., None], (1 - alpha) * rgb + alpha * tint, rgb)
  if draw_boundaries:
    out[boundaries(np.where(mask, labels, -1))] = 255.0
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def font(size: int = 14) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font
    return ImageFont.load_default()


def legend(entries: Sequence[Tuple[str, Color]], *, max_height: Optional[int] = None, font_size: int = 14,
           background: Color = (255, 255, 255)) -> Image.Image:
  """Colour swatches with their names, in columns no taller than `max_height`."""
  fnt = font(font_size)
  pad, sw = 6, font_size
  row_h = font_size + 6
  if not entries:
    entries = [("(no classes)", background)]
  per_col = len(entries)
  if max_height:
    per_col = max(1, (max_height - 2 * pad) // row_h)
  cols = [entries[i:i + per_col] for i in range(0, len(entries), per_col)]
  draw0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  widths = [max(int(draw0.textlength(name, font=fnt)) for name, _ in col) + sw + 3 * pad for col in cols]
  height = 2 * pad + row_h * min(per_col, len(entries))
  img = Image.new("RGB", (sum(widths), height), background)
  draw = ImageDraw.Draw(img)
  x0 = 0
  for col, width in zip(cols, widths):
    for r, (name, color) in enumerate(col):
      y = pad + r * row_h
      draw.rectangle([x0 + pad, y + 2, x0 + pad + sw, y + 2 + sw], fill=tuple(int(c) for c in color),
                     outline=(60, 60, 60))
      draw.text((x0 + 2 * pad + sw, y + 1), name, fill=(0, 0, 0), font=fnt)
    x0 += width
  return img


def present_classes(labels: np.ndarray, num_classes: int, ignore: Optional[int] = None) -> List[Tuple[int, int]]:
  """[(class id, pixel count)] of the classes in `labels`, largest first."""
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  keep = (labels >= 0) & (labels < num_classes)
  if ignore is not None:
    keep &= labels != ignore
  counts = np.bincount(labels[keep], minlength=num_classes)
  ids = np.nonzero(counts)[0]
  return sorted(((int(i), int(counts[i])) for i in ids), key=lambda t: (-t[1], t[0]))


def side_by_side(panels: Sequence[Image.Image], gap: int = 4, background: Color = (255, 255, 255)) -> Image.Image:
  width = sum(p.width for p in panels) + gap * (len(panels) - 1)
  out = Image.new("RGB", (width, max(p.height for p in panels)), background)
  x = 0
  for p in panels:
    out.paste(p, (x, 0))
    x += p.width + gap
  return out


def overlay_with_legend(image: np.ndarray, labels: np.ndarray, names: Sequence[str], *,
                        colors: Optional[np.ndarray] = None, alpha: float = 0.5, ignore: Optional[int] = None,
                        show_fraction: bool = True) -> Image.Image:
  """The overlay and, on its right, a legend of the classes present (largest first, with their share of
  the labelled pixels)."""
  colors = palette(len(names)) if colors is None else colors
  over = Image.fromarray(overlay(image, labels, colors, alpha=alpha, ignore=ignore))
  present = present_classes(labels, len(names), ignore)
  total = max(sum(c for _, c in present), 1)
  entries = [(f"{names[i]}  {100 * c / total:.1f}%" if show_fraction else names[i], tuple(colors[i]))
             for i, c in present]
  return side_by_side([over, legend(entries, max_height=max(over.height, 120))])


def _titled(img: Image.Image, title: str, font_size: int = 14) -> Image.Image:
  fnt = font(font_size)
  out = Image.new("RGB", (img.width, img.height + font_size + 8), (255, 255, 255))
  ImageDraw.Draw(out).text((4, 3), title, fill=(0, 0, 0), font=fnt)
  out.paste(img, (0, font_size + 8))
  return out


def comparison_grid(rows: Sequence[Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]], names: Sequence[str], *,
                    ignore: Optional[int] = 255, colors: Optional[np.ndarray] = None, alpha: float = 0.6,
                    titles: Sequence[str] = ("image", "ground truth", "prediction")) -> Image.Image:
  """One row per example: image | ground truth | prediction (overlays), with a legend of every class in
  either label map of the row. The ground truth may be None (shown as the bare image)."""
  colors = palette(len(names)) if colors is None else colors
  rendered = []
  for image, gt, pred in rows:
    rgb = _as_rgb(image)
    panels = [Image.fromarray(rgb)]
    panels.append(Image.fromarray(overlay(rgb, gt, colors, alpha=alpha, ignore=ignore) if gt is not None else rgb))
    panels.append(Image.fromarray(overlay(rgb, pred, colors, alpha=alpha, ignore=ignore)))
    ids = sorted({i for i, _ in present_classes(pred, len(names), ignore)} |
                 ({i for i, _ in present_classes(gt, len(names), ignore)} if gt is not None else set()))
    key = legend([(names[i], tuple(colors[i])) for i in ids], max_height=max(rgb.shape[0], 120))
    if not rendered:
      panels = [_titled(p, t) for p, t in zip(panels, titles)]
      key = _titled(key, "classes")
    rendered.append(side_by_side(panels + [key], gap=6))
  width = max(r.width for r in rendered)
  out = Image.new("RGB", (width, sum(r.height for r in rendered) + 6 * (len(rendered) - 1)), (255, 255, 255))
  y = 0
  for r in rendered:
    out.paste(r, (0, y))
    y += r.height + 6
  return out

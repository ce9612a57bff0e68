"""Reading user images into what SAN takes: uint8 RGB [H, W, 3].

Handles what people actually have on disk: grayscale (L, 16-bit I;16 / I), palette, RGBA / LA (the alpha
channel is dropped: SAN sees colour only), CMYK, EXIF-rotated JPEGs, and 16-bit PNGs
(scaled to 8 bits by their full range). Errors name the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(ValueError):
  """An image file that cannot be read; the message names the file."""


def to_rgb(array: np.ndarray) -> np.ndarray:
  """Any [H, W], [H, W, 1], [H, W, 2] (gray+alpha), [H, W, 3] or [H, W, 4] array -> uint8 RGB [H, W, 3].

  Alpha is dropped (the colour channels are kept as stored); 16-bit and float inputs are rescaled:
  uint16 by /257 (65535 -> 255), floats in [0, 1] by *255.
  """
  a = np.asarray(array)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f"cannot make an RGB image from an array of shape {np.shape(array)}")
  if a.shape[-1] in (2, 4):
    a = a[..., :-1]  # drop alpha
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  if a.dtype == np.uint8:
    return np.ascontiguousarray(a)
  if a.dtype == np.uint16:
    return np.ascontiguousarray((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
  if np.issubdtype(a.dtype, np.floating):
    return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
  if np.issubdtype(a.dtype, np.integer):
    hi = max(int(a.max()), 1)
    scale = 255.0 / (65535 if hi > 255 else 255)
    return np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
  raise ValueError(f"unsupported image dtype {a.dtype}")


def read_rgb(path: Union[str, Path]) -> np.ndarray:
  """Reads an image file as uint8 RGB [H, W, 3] (EXIF orientation applied)."""
  try:
    with Image.open(path) as img:
      img = ImageOps.exif_transpose(img)
      if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        if arr.dtype != np.uint16:
          arr = np.clip(arr, 0, 65535).astype(np.uint16)
        return to_rgb(arr)
      if img.mode not in ("RGB", "L", "RGBA", "LA"):
        img = img.convert("RGBA" if "A" in img.getbands() or img.mode == "P" and "transparency" in img.info else "RGB")
      return to_rgb(np.asarray(img))
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ImageReadError(f"{path}: cannot read image ({e})") from e

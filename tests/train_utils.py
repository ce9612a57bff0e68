"""A tiny, fixed training batch and trainer for the training tests."""

from __future__ import annotations

import numpy as np

from configs import tiny
from san_jax.losses import criterion
from san_jax.models import san as san_lib


def tiny_config(**train_overrides):
  cfg = tiny.get_config()
  for k, v in train_overrides.items():
    cfg.train[k] = v
  return cfg


def tiny_batch(batch_size: int = 2, size: int = 128, num_classes: int = 3, seed: int = 0, max_targets: int = 8):
  """Images with a few flat-coloured rectangles whose class is their colour; targets padded to max_targets."""
  rng = np.random.default_rng(seed)
  colours = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 230], [230, 220, 40]], np.uint8)[:num_classes]
  images = np.zeros((batch_size, size, size, 3), np.uint8)
  labels, masks = [], []
  for b in range(batch_size):
    images[b] = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    sem = np.full((size, size), 255, np.int32)
    for c in rng.permutation(num_classes)[:2]:
      y0, x0 = rng.integers(0, size // 2, size=2)
      h, w = rng.integers(size // 4, size // 2, size=2)
      images[b, y0:y0 + h, x0:x0 + w] = colours[c]
      sem[y0:y0 + h, x0:x0 + w] = c
    present = np.unique(sem[sem != 255])
    labels.append(present)
    masks.append(np.stack([(sem == c).astype(np.uint8) for c in present]))
  t = criterion.pad_targets(labels, masks, (size, size), max_targets)
  return {"image": images, "image_size": np.full((batch_size, 2), size, np.int32), **t}


def model_config(cfg):
  return san_lib.config_from_dict(cfg.model.to_dict())

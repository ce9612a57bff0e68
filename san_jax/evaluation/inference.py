"""Inference: images + a vocabulary in, per-class probabilities and label maps out.

`Segmenter` owns a SAN model, caches class text embeddings per vocabulary, and jits one forward per
padded input size (the padded size is a multiple of `size_divisibility`, so nearby sizes share it).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from san_jax.data.image_io import to_rgb
from san_jax.models import san as san_lib
from san_jax.text.classifier import ClassEmbeddingCache


class Segmenter:
  def __init__(self, model: san_lib.SAN, template_set: Optional[str] = None):
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)
    self.class_embeddings = ClassEmbeddingCache(model.ov_classifier, template_set or model.cfg.template_set)
    self._forward = jax.jit(self._forward_impl, static_argnums=(3, 4))

  def _forward_impl(self, state, batch, class_emb, image_hw: Tuple[int, int], output_hw: Tuple[int, int]):
    model = nnx.merge(self.graphdef, state)
    out = model(batch, class_emb)
    probs = san_lib.semantic_inference(out["mask_logits"][0, -1], out["mask_preds"][0, -1],
                                       tuple(batch.shape[1:3]), image_hw, output_hw)
    return probs, jnp.argmax(probs, axis=0).astype(jnp.int32)

  def segment(self, image: np.ndarray, vocabulary: Sequence[str],
              output_hw: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One image (any of: uint8/uint16/float, gray, RGB, RGBA) -> (probs [C, h, w], labels [h, w] int32),
    at `output_hw` (default: the image's size)."""
    rgb = to_rgb(image)
    emb = self.class_embeddings(vocabulary)
    batch, sizes = san_lib.preprocess([rgb], self.cfg)
    out_hw = tuple(sizes[0]) if output_hw is None else tuple(int(s) for s in output_hw)
    probs, labels = self._forward(self.state, jnp.asarray(batch), emb, tuple(sizes[0]), out_hw)
    return np.asarray(probs), np.asarray(labels)

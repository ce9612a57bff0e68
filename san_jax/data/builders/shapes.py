"""The synthetic shapes set (san_jax.data.shapes) as a TFDS builder: no manual files, any image size.

Configs fix the image size, the split sizes and which classes training images draw from ("all", or
"seen" to hold out `shapes.unseen_classes()` for an open-vocabulary evaluation). A custom config can be
passed as `Shapes(config=ShapesConfig(...))`; `python -m san_jax.data.build shapes --image_size 96 ...`
builds one.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from san_jax.data import shapes


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: Tuple[int, int] = (128, 128)
  num_train: int = 2000
  num_val: int = 200
  seed: int = 0
  max_objects: int = 4
  train_classes: str = "all"  # or "seen"

  def spec(self, split: str) -> shapes.ShapesSpec:
    classes = None
    if split == "train" and self.train_classes == "seen":
      classes = shapes.class_ids(shapes.seen_classes())
    elif self.train_classes not in ("all", "seen"):
      raise ValueError(f"train_classes must be 'all' or 'seen', got {self.train_classes!r}")
    return shapes.ShapesSpec(image_size=tuple(self.image_size), max_objects=self.max_objects, classes=classes)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes on textured backgrounds; classes are colour-shape combinations ("a red star")."""

  name = "shapes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="small", description="64x64, 256 train / 64 val", image_size=(64, 64), num_train=256,
                   num_val=64),
      ShapesConfig(name="default", description="128x128, 2000 train / 200 val"),
      ShapesConfig(name="open_vocab", description="128x128, train without the unseen classes",
                   train_classes="seen"),
      ShapesConfig(name="640", description="640x640, 2000 train / 200 val", image_size=(640, 640)),
  ]
  DEFAULT_CONFIG_NAME = "default"
  code_path = None  # no download checksums to find (see common.SemSegBuilder)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Synthetic coloured shapes with semantic masks (san_jax.data.shapes).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
            "file_name": tfds.features.Text(),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            vocabulary="shapes", class_names=list(shapes.class_names()), captions=list(shapes.captions()),
            unseen_classes=list(shapes.unseen_classes()), num_classes=len(shapes.class_names()),
            ignore_label=shapes.IGNORE_LABEL),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples("train", self.builder_config.num_train),
            "val": self._generate_examples("val", self.builder_config.num_val)}

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    spec = cfg.spec(split)
    for i in range(num):
      ex = shapes.render(i, seed=cfg.seed, split=split, spec=spec)
      buf = io.BytesIO()
      Image.fromarray(ex["image"]).save(buf, format="PNG")
      yield ex["file_name"], {"image": buf.getvalue(), "label": ex["label"], "file_name": ex["file_name"]}

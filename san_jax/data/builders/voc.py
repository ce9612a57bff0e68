"""Pascal VOC 2012 segmentation: 20 classes with background ignored (SAN's VOC-20) or 21 with it kept.

Layout (root: <manual_dir>/VOC2012, <manual_dir>/VOCdevkit/VOC2012 or <manual_dir>), the VOC2012 download:
  JPEGImages/*.jpg
  SegmentationClass/*.png             palette PNG: 0 background, 1..20 the classes, 255 object boundaries
  ImageSets/Segmentation/{train,val}.txt
VOC-20 maps as SAN's prepare_voc_sem_seg.py does: 0 -> 255, c -> c - 1, 255 stays; label maps left
all-unlabeled (background-only images) are dropped, as the script does not write them. VOC-21 keeps the raw
ids (0 = background) and every image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from san_jax.data.builders import common

_SPLITS = ("train", "val")


class _Voc(common.SemSegBuilder, skip_registration=True):
  HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Extract VOCtrainval_11-May-2012.tar into <manual_dir> (giving <manual_dir>/VOCdevkit/VOC2012).
  """

  def _split_pairs(self, manual_dir: Path) -> Dict[str, List[common.Pair]]:
    root = common.find_root(manual_dir, ["VOC2012", "VOCdevkit/VOC2012"], ["JPEGImages"])
    out = {}
    for split in _SPLITS:
      list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
      if list_file.is_file():
        out[split] = common.pairs_from_list(list_file, root / "JPEGImages", root / "SegmentationClass",
                                            ".jpg", ".png")
    return out


class Voc20(_Voc):
  """VOC 2012, 20 classes, background ignored (SAN's protocol); val has 1,449 images."""

  name = "voc_20"
  VOCABULARY = "voc_20"
  DESCRIPTION = "Pascal VOC 2012 semantic segmentation, 20 classes, background ignored (as SAN)."
  DROP_ALL_IGNORED = True

  def _label_table(self, pair: common.Pair) -> np.ndarray:
    return _TABLE_20


class Voc21(_Voc):
  """VOC 2012, 21 classes: background (0) is a class."""

  name = "voc_21"
  VOCABULARY = "voc_21"
  DESCRIPTION = "Pascal VOC 2012 semantic segmentation, 21 classes (background kept as class 0)."

  def _label_table(self, pair: common.Pair) -> np.ndarray:
    return _TABLE_21


_TABLE_20 = common.shift_table(20, 255, 256, keep=[255])
_TABLE_21 = common.identity_table(21, 255, 256)

"""Pascal Context (VOC2010 images) with 59 and with 459 classes, as SAN's prepare scripts write them.

Pascal Context-59 layout (root: <manual_dir>/pcontext or <manual_dir>), from SAN's
prepare_pcontext_sem_seg_59cls.py (the Detail API's masks mapped to the 59 classes):
  {train,val}/image/*.jpg
  {train,val}/label/*.png          uint8: 0..58, 255 unlabeled
Pascal Context-459 layout (root: <manual_dir>/pcontext_full or <manual_dir>), from SAN's
prepare_pcontext_sem_seg_459cls.py (the trainval/*.mat LabelMaps minus 1):
  {train,val}/image/*.jpg
  {train,val}/label/*.tif          uint16: 0..458, 65535 unlabeled (0 - 1 wrapped, detectron2's ignore_label)
Class 255 is a real class of the 459-class set, so its ignore label stays 65535 and labels are uint16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from san_jax.data.builders import common

_SPLITS = ("train", "val")


class _PascalContext(common.SemSegBuilder, skip_registration=True):
  ROOT_NAME = ""
  LABEL_EXT = ""

  def _split_pairs(self, manual_dir: Path) -> Dict[str, List[common.Pair]]:
    root = common.find_root(manual_dir, [self.ROOT_NAME], [f"{s}/label" for s in _SPLITS])
    out = {}
    for split in _SPLITS:
      image_dir, label_dir = root / split / "image", root / split / "label"
      if image_dir.is_dir() and label_dir.is_dir():
        out[split] = common.pair_by_stem(image_dir, label_dir, ".jpg", self.LABEL_EXT, f"{self.name}/{split}")
    return out


class PascalContext59(_PascalContext):
  """Pascal Context, 59 classes; splits train (4,996) and val (5,104)."""

  name = "pcontext_59"
  VOCABULARY = "pcontext_59"
  ROOT_NAME = "pcontext"
  LABEL_EXT = ".png"
  HOMEPAGE = "https://cs.stanford.edu/~roozbeh/pascal-context/"
  DESCRIPTION = "Pascal Context semantic segmentation, 59 classes."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Run SAN's datasets/prepare_pcontext_sem_seg_59cls.py --ori_root_dir VOCdevkit/VOC2010
  --save_dir <manual_dir>/pcontext (needs VOC2010 JPEGImages, trainval_merged.json and the Detail API).
  """

  def _label_table(self, pair: common.Pair) -> np.ndarray:
    return _TABLE_59


class PascalContext459(_PascalContext):
  """Pascal Context-full, 459 classes; splits train (4,996) and val (5,104)."""

  name = "pcontext_459"
  VOCABULARY = "pcontext_459"
  ROOT_NAME = "pcontext_full"
  LABEL_EXT = ".tif"
  IGNORE_LABEL = 65535
  LABEL_DTYPE = np.uint16
  HOMEPAGE = "https://cs.stanford.edu/~roozbeh/pascal-context/"
  DESCRIPTION = "Pascal Context-full semantic segmentation, 459 classes."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Run SAN's datasets/prepare_pcontext_sem_seg_459cls.py --img_dir VOCdevkit/VOC2010
  --anno_dir <trainval/ with the .mat files> --save_dir <manual_dir>/pcontext_full.
  """

  def _label_table(self, pair: common.Pair) -> np.ndarray:
    return _TABLE_459


_TABLE_59 = common.identity_table(59, 255, 256)
_TABLE_459 = common.identity_table(459, 65535, 65536)

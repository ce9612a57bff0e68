"""ADE20K with 150 classes (SceneParsing challenge) and with 847 classes (ADE20K-full, 2021 release).

ADE20K-150 layout (root: <manual_dir>/ADEChallengeData2016 or <manual_dir>):
  images/{training,validation}/*.jpg
  annotations/{training,validation}/*.png               raw: 0 unlabeled, 1..150 the classes
  or annotations_detectron2/{training,validation}/*.png detectron2's prepare_ade20k_sem_seg.py: id - 1,
                                                        0 -> 255 (used when present)
ADE20K-847 layout (root: <manual_dir>/ADE20K_2021_17_01 or <manual_dir>), produced from the ADE20K 2021
release by Mask2Former's/SAN's prepare_ade20k_full_sem_seg.py (images with the short side > 512 resized to
512):
  images_detectron2/{training,validation}/*.jpg
  annotations_detectron2/{training,validation}/*.tif    uint16: trainIds 0..846, 65535 unlabeled
Class 255 is a real class of ADE20K-847, so its ignore label stays 65535 (detectron2's `ignore_label` for
this set) and labels are stored as uint16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from san_jax.data.builders import common

_SPLITS = {"train": "training", "val": "validation"}


class Ade20k150(common.SemSegBuilder):
  """ADE20K SceneParsing, 150 classes; splits train (20,210) and val (2,000)."""

  name = "ade20k_150"
  VOCABULARY = "ade20k_150"
  HOMEPAGE = "http://sceneparsing.csail.mit.edu/"
  DESCRIPTION = "ADE20K SceneParsing (ADEChallengeData2016) semantic segmentation, 150 classes."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Extract ADEChallengeData2016.zip into <manual_dir> (giving <manual_dir>/ADEChallengeData2016/images and
  annotations).
  """

  def _split_pairs(self, manual_dir: Path) -> Dict[str, List[common.Pair]]:
    root = common.find_root(manual_dir, ["ADEChallengeData2016"], ["images"])
    out = {}
    for split, folder in _SPLITS.items():
      image_dir = root / "images" / folder
      prepared, raw = root / "annotations_detectron2" / folder, root / "annotations" / folder
      label_dir, kind = (prepared, "prepared") if prepared.is_dir() else (raw, "raw")
      if image_dir.is_dir() and label_dir.is_dir():
        out[split] = common.pair_by_stem(image_dir, label_dir, ".jpg", ".png", f"{self.name}/{split}", kind)
    return out

  def _label_table(self, pair: common.Pair) -> np.ndarray:
    return _RAW_150 if pair.kind == "raw" else _PREPARED_150


class Ade20k847(common.SemSegBuilder):
  """ADE20K-full, 847 classes; splits train (25,574) and val (2,000)."""

  name = "ade20k_847"
  VOCABULARY = "ade20k_847"
  IGNORE_LABEL = 65535
  LABEL_DTYPE = np.uint16
  HOMEPAGE = "https://groups.csail.mit.edu/vision/datasets/ADE20K/"
  DESCRIPTION = "ADE20K-full (2021_17_01) semantic segmentation, 847 classes."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Extract ADE20K_2021_17_01.zip into <manual_dir> and run prepare_ade20k_full_sem_seg.py (from SAN's or
  Mask2Former's datasets/ folder) with DETECTRON2_DATASETS=<manual_dir>; it writes
  ADE20K_2021_17_01/images_detectron2 and annotations_detectron2.
  """

  def _split_pairs(self, manual_dir: Path) -> Dict[str, List[common.Pair]]:
    root = common.find_root(manual_dir, ["ADE20K_2021_17_01"], ["images_detectron2"])
    out = {}
    for split, folder in _SPLITS.items():
      image_dir = root / "images_detectron2" / folder
      label_dir = root / "annotations_detectron2" / folder
      if image_dir.is_dir() and label_dir.is_dir():
        out[split] = common.pair_by_stem(image_dir, label_dir, ".jpg", ".tif", f"{self.name}/{split}")
    return out

  def _label_table(self, pair: common.Pair) -> np.ndarray:
    return _PREPARED_847


_RAW_150 = common.shift_table(150, 255, 256)
_PREPARED_150 = common.identity_table(150, 255, 256)
_PREPARED_847 = common.identity_table(847, 65535, 65536)

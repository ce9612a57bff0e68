"""COCO-Stuff-171 (COCO 2017 images, 80 thing + 91 stuff classes): SAN's training set and first benchmark.

Layout (root: <manual_dir>/coco or <manual_dir> itself):
  train2017/*.jpg, val2017/*.jpg
  stuffthingmaps_detectron2/{train2017,val2017}/*.png   prepared by SAN's prepare_coco_stuff_164k_sem_seg.py:
                                                         0..170 contiguous ids, 255 unlabeled
  or, when that folder is absent, the raw download:
  stuffthingmaps/{train2017,val2017}/*.png               COCO category id - 1 (0..181), 255 unlabeled
Raw ids are mapped as the prepare script does: the 171 used category ids to 0..170 in id order, everything
else to 255, and label maps left all-unlabeled are dropped (the script does not write them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from san_jax.data.builders import common

# The 171 COCO category ids with a semantic class: things 1..90 minus the 10 ids COCO never used,
# stuff 92..182. Their order is the contiguous id order (= vocabularies.COCO_STUFF_171).
_UNUSED_THING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_STUFF_IDS = tuple([i for i in range(1, 91) if i not in _UNUSED_THING_IDS] + list(range(92, 183)))


def raw_table() -> np.ndarray:
  """stuffthingmaps value (category id - 1) -> contiguous id; unused ids -> 255; > 181 invalid."""
  table = np.full((256,), common.INVALID, np.int64)
  table[:182] = 255
  for contiguous, cat_id in enumerate(COCO_STUFF_IDS):
    table[cat_id - 1] = contiguous
  table[255] = 255
  return table


class CocoStuff171(common.SemSegBuilder):
  """COCO-Stuff 164k with SAN's 171 classes; splits train (118k) and val (5k)."""

  name = "coco_stuff_171"
  VOCABULARY = "coco_stuff_171"
  HOMEPAGE = "https://github.com/nightrome/cocostuff"
  DESCRIPTION = "COCO-Stuff-164k semantic segmentation, 171 classes (SAN's training set)."
  DROP_ALL_IGNORED = True
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put COCO 2017 train2017/ and val2017/ images and COCO-Stuff's stuffthingmaps_trainval2017.zip, extracted
  to stuffthingmaps/ (or SAN's prepared stuffthingmaps_detectron2/), in <manual_dir>/coco/.
  """
  SPLITS = {"train": "train2017", "val": "val2017"}

  def _split_pairs(self, manual_dir: Path) -> Dict[str, List[common.Pair]]:
    root = common.find_root(manual_dir, ["coco"], ["stuffthingmaps_detectron2", "stuffthingmaps"])
    out = {}
    for split, folder in self.SPLITS.items():
      if not (root / folder).is_dir():
        continue
      prepared = root / "stuffthingmaps_detectron2" / folder
      label_dir, kind = (prepared, "prepared") if prepared.is_dir() else (root / "stuffthingmaps" / folder, "raw")
      if label_dir.is_dir():
        out[split] = common.pair_by_stem(root / folder, label_dir, ".jpg", ".png", f"{self.name}/{split}", kind)
    return out

  def _label_table(self, pair: common.Pair) -> np.ndarray:
    if pair.kind == "raw":
      return _RAW_TABLE
    return _PREPARED_TABLE


_RAW_TABLE = raw_table()
_PREPARED_TABLE = common.identity_table(171, 255, 256)

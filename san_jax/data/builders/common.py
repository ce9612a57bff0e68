"""What every semantic-segmentation builder shares: features, file pairing, reading, checking, skipping.

Each builder reads one data set from its standard on-disk layout (the one SAN's and detectron2's prepare
scripts produce, see san_jax/data/README.md) in a manual directory and writes ArrayRecord files readable
with `tfds.data_source` without TensorFlow. An example is
  image      the RGB image, stored as the original JPEG bytes (PNG when the file needed converting: not
             RGB, or an EXIF rotation, which detectron2's `read_image` applies)
  label      uint8 [H, W] (uint16 for the 459- and 847-class sets) class ids: 0..C-1 index the vocabulary
             (`metadata["class_names"]`), `metadata["ignore_label"]` is unlabeled
  file_name  the image's file name
A subclass says where the pairs of files are (`_split_pairs`) and how raw label values map to class ids
(`_label_table`). Every example is checked before it is written: both files decode completely, the sizes
agree, and every label value is one the layout allows. A failure raises `CorruptExampleError` naming the
file, or, with `skip_corrupt=True`, drops the example, logs it, and counts it in `builder.skipped`.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image, ImageOps

from san_jax.data import vocabularies

# A raw label value the layout does not allow maps to this in a label table: the example is rejected.
INVALID = -1


class CorruptExampleError(ValueError):
  """An image or label file that cannot be read, or whose content contradicts the layout."""


@dataclasses.dataclass(frozen=True)
class Pair:
  key: str  # unique within the split (the file stem)
  image: Path
  label: Path
  kind: str = ""  # which label convention the file follows, for builders that read several


def find_root(manual_dir: Path, candidates: Sequence[str], markers: Sequence[str]) -> Path:
  """The data set's folder: the first of manual_dir/candidate, or manual_dir itself, holding a marker.

  Lets --manual_dir point either at a detectron2 `datasets/` root or at the data set's own folder.
  """
  roots = [manual_dir / c for c in candidates] + [manual_dir]
  for root in roots:
    if any((root / m).exists() for m in markers):
      return root
  tried = ", ".join(str(r / m) for r in roots for m in markers)
  raise FileNotFoundError(f"none of {tried} exists; see san_jax/data/README.md for the layout")


def _stems(folder: Path, ext: str) -> Dict[str, Path]:
  with os.scandir(folder) as it:
    return {Path(e.name).stem: Path(e.path) for e in it if e.is_file() and e.name.endswith(ext)}


def pair_by_stem(image_dir: Path, label_dir: Path, image_ext: str, label_ext: str, what: str = "",
                 kind: str = "") -> List[Pair]:
  """Images and labels matched by file stem, sorted, as detectron2's `load_sem_seg` does.

  Files without a partner are left out with a warning: the official preparation drops label files that
  would be all-unlabeled, so a missing label is normal there.
  """
  images, labels = _stems(image_dir, image_ext), _stems(label_dir, label_ext)
  keys = sorted(images.keys() & labels.keys())
  if len(keys) != len(images) or len(keys) != len(labels):
    logging.warning("%s: %d images in %s and %d labels in %s; using the %d with both", what, len(images),
                    image_dir, len(labels), label_dir, len(keys))
  return [Pair(k, images[k], labels[k], kind) for k in keys]


def pairs_from_list(list_file: Path, image_dir: Path, label_dir: Path, image_ext: str, label_ext: str,
                    kind: str = "") -> List[Pair]:
  """Pairs named by an id list (one stem per line, as VOC's ImageSets); missing files fail at read time."""
  ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
  return [Pair(i, image_dir / f"{i}{image_ext}", label_dir / f"{i}{label_ext}", kind) for i in ids]


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_image(path: Path) -> Tuple[bytes, Tuple[int, int]]:
  """Encoded RGB image and its (h, w) after EXIF orientation, decoding it fully to catch corruption."""
  try:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      orientation = im.getexif().get(0x0112, 1)
      if im.format == "JPEG" and im.mode == "RGB" and orientation == 1:
        return data, (im.height, im.width)
      im = ImageOps.exif_transpose(im).convert("RGB")
      buf = io.BytesIO()
      im.save(buf, format="PNG")
      return buf.getvalue(), (im.height, im.width)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise CorruptExampleError(f"cannot read image {path}: {e}") from e


def read_label(path: Path) -> np.ndarray:
  """The raw id map of a label file (palette PNGs give their indices, 16-bit TIFFs uint16)."""
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
        raise CorruptExampleError(f"label {path} has mode {im.mode!r}: expected a single-channel id map")
      arr = np.array(im)
  except CorruptExampleError:
    raise
  except (OSError, ValueError, SyntaxError) as e:
    raise CorruptExampleError(f"cannot read label {path}: {e}") from e
  if arr.ndim != 2:
    raise CorruptExampleError(f"label {path} has shape {arr.shape}: expected [H, W]")
  if arr.dtype.kind == "i":
    if arr.size and arr.min() < 0:
      raise CorruptExampleError(f"label {path} has negative values")
    arr = arr.astype(np.uint32)
  return arr


def apply_table(raw: np.ndarray, table: np.ndarray, path: Path) -> np.ndarray:
  """Maps raw values through `table` (int32, INVALID for disallowed values), naming the file on failure."""
  if raw.size and int(raw.max()) >= len(table):
    bad = np.unique(raw[raw >= len(table)])[:10]
    raise CorruptExampleError(f"label {path} has values {bad.tolist()} the layout does not allow")
  mapped = table[raw]
  if (mapped == INVALID).any():
    bad = np.unique(raw[mapped == INVALID])[:10]
    raise CorruptExampleError(f"label {path} has values {bad.tolist()} the layout does not allow")
  return mapped


def identity_table(num_classes: int, ignore_label: int, size: int) -> np.ndarray:
  """0..C-1 kept, `ignore_label` kept, everything else invalid: for already-prepared label files."""
  table = np.full((size,), INVALID, np.int64)
  table[:num_classes] = np.arange(num_classes)
  table[ignore_label] = ignore_label
  return table


def shift_table(num_classes: int, ignore_label: int, size: int, keep: Sequence[int] = ()) -> np.ndarray:
  """Raw 0 (unlabeled) -> ignore, raw 1..C -> 0..C-1, `keep` values map to themselves, rest invalid."""
  table = np.full((size,), INVALID, np.int64)
  table[0] = ignore_label
  table[1:num_classes + 1] = np.arange(num_classes)
  for k in keep:
    table[k] = k
  return table


# ----------------------------------------------------------------------------------------------------------
# The builder base


class SemSegBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the real-data builders; a subclass sets the class attributes and the two hooks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  VOCABULARY: str = ""  # key of san_jax.data.vocabularies.VOCABULARIES
  IGNORE_LABEL: int = 255
  LABEL_DTYPE = np.uint8
  HOMEPAGE: str = ""
  DESCRIPTION: str = ""
  # Whether an example whose label is all `IGNORE_LABEL` is left out (the official preparation of some
  # sets never writes such label files).
  DROP_ALL_IGNORED: bool = False
  # TFDS looks for a download-checksums file next to the builder's code, and finding that code inside a
  # package needs the `importlib_resources` backport, which is not installed. Nothing is downloaded.
  code_path = None

  def __init__(self, *, skip_corrupt: bool = False, **kwargs):
    self.skip_corrupt = skip_corrupt
    self.skipped: Dict[str, List[Tuple[str, str]]] = {}  # split -> [(file, reason)]
    self.dropped_all_ignored: Dict[str, int] = {}
    super().__init__(**kwargs)

  @classmethod
  def class_names(cls) -> Tuple[str, ...]:
    return vocabularies.get_vocabulary(cls.VOCABULARY)

  def _info(self) -> tfds.core.DatasetInfo:
    names = self.class_names()
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.Tensor(shape=(None, None), dtype=self.LABEL_DTYPE, encoding="zlib"),
            "file_name": tfds.features.Text(),
        }),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,  # keep the sorted file order: reproducible, easy to debug
        metadata=tfds.core.MetadataDict(vocabulary=self.VOCABULARY, class_names=list(names),
                                        num_classes=len(names), ignore_label=self.IGNORE_LABEL),
    )

  # Hooks ------------------------------------------------------------------------------------------------

  def _split_pairs(self, manual_dir: Path) -> Dict[str, List[Pair]]:
    """{split: pairs} for the splits present under `manual_dir` (at least one)."""
    raise NotImplementedError

  def _label_table(self, pair: Pair) -> np.ndarray:
    """Raw label value -> class id / IGNORE_LABEL / INVALID for this pair's label file."""
    raise NotImplementedError

  # Generation -------------------------------------------------------------------------------------------

  def _split_generators(self, dl_manager):
    splits = self._split_pairs(Path(dl_manager.manual_dir))
    if not splits:
      raise FileNotFoundError(f"no split of {self.name} found under {dl_manager.manual_dir}")
    return {split: self._generate_examples(split, pairs) for split, pairs in splits.items()}

  def load_example(self, pair: Pair) -> Optional[dict]:
    """The checked example of `pair`; None when it is left out on purpose (DROP_ALL_IGNORED)."""
    image, (h, w) = read_image(pair.image)
    raw = read_label(pair.label)
    if raw.shape != (h, w):
      raise CorruptExampleError(f"label {pair.label} is {raw.shape[1]}x{raw.shape[0]} but image "
                                f"{pair.image} is {w}x{h}")
    label = apply_table(raw, self._label_table(pair), pair.label).astype(self.LABEL_DTYPE)
    if self.DROP_ALL_IGNORED and (label == self.IGNORE_LABEL).all():
      return None
    return {"image": image, "label": label, "file_name": pair.image.name}

  def _generate_examples(self, split: str, pairs: Sequence[Pair]) -> Iterator[Tuple[str, dict]]:
    skipped = self.skipped.setdefault(split, [])
    dropped = 0
    for pair in pairs:
      try:
        example = self.load_example(pair)
      except CorruptExampleError as e:
        if not self.skip_corrupt:
          raise
        logging.warning("%s/%s: skipping %s: %s", self.name, split, pair.key, e)
        skipped.append((str(pair.image), str(e)))
        continue
      if example is None:
        dropped += 1
        continue
      yield pair.key, example
    self.dropped_all_ignored[split] = dropped
    if skipped:
      logging.warning("%s/%s: skipped %d corrupt examples of %d", self.name, split, len(skipped), len(pairs))
    if dropped:
      logging.info("%s/%s: left out %d all-unlabeled examples", self.name, split, dropped)

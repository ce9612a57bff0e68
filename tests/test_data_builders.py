"""TFDS builders on tiny fake trees in each data set's real layout and id conventions.

Every test writes its own files (a few 12x16 images), builds ArrayRecord data with the builder, and reads
it back with `tfds.data_source` (no TensorFlow), checking the id mapping, the vocabulary and the ignore
label; corrupt files must fail the build with the file's name, or be skipped and counted on request.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from san_jax.data import builders, shapes, vocabularies
from san_jax.data.builders import coco_stuff

H, W = 12, 16


# ----------------------------------------------------------------------------------------------------------
# Fake files


def write_jpeg(path: Path, seed: int) -> np.ndarray:
  path.parent.mkdir(parents=True, exist_ok=True)
  img = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
  Image.fromarray(img).save(path, format="JPEG", quality=95)
  return np.asarray(Image.open(path).convert("RGB"))  # what a decoder gives back


def write_png(path: Path, label: np.ndarray, palette: bool = False) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  im = Image.fromarray(label.astype(np.uint8), mode="L")
  if palette:  # VOC's SegmentationClass files are palette PNGs: the pixel values are palette indices
    im = Image.frombytes("P", im.size, im.tobytes())
    im.putpalette([int(v) for v in np.random.default_rng(0).integers(0, 256, 768)])
  im.save(path)


def write_tif16(path: Path, label: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(label.astype(np.uint16)).save(path)


def label_with(values, seed: int = 0) -> np.ndarray:
  """An H x W map using every value in `values` (each at least once)."""
  rng = np.random.default_rng(seed)
  flat = np.concatenate([np.asarray(values), rng.choice(values, H * W - len(values))])
  return rng.permutation(flat).reshape(H, W)


def build(name: str, manual_dir: Path, data_dir: Path, **kwargs):
  builder = builders.get_builder_class(name)(data_dir=str(data_dir), file_format="array_record", **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def read_split(name: str, split: str, data_dir: Path):
  ds = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
  return {ex["file_name"].decode(): ex for ex in (ds[i] for i in range(len(ds)))}


def check_info(builder, vocab: str, num_classes: int, ignore: int) -> None:
  meta = builder.info.metadata
  assert meta["num_classes"] == num_classes == len(meta["class_names"])
  assert tuple(meta["class_names"]) == vocabularies.get_vocabulary(vocab)
  assert meta["ignore_label"] == ignore


# ----------------------------------------------------------------------------------------------------------
# COCO-Stuff-171


def test_coco_stuff_prepared_layout(tmp_path):
  root = tmp_path / "raw" / "coco"
  expected = {}
  for split, folder in (("train", "train2017"), ("val", "val2017")):
    for k in range(2):
      stem = f"{folder}_{k:012d}"
      img = write_jpeg(root / folder / f"{stem}.jpg", seed=k)
      lab = label_with([0, 80, 170, 255], seed=k)
      write_png(root / "stuffthingmaps_detectron2" / folder / f"{stem}.png", lab)
      expected[(split, f"{stem}.jpg")] = (img, lab)
  b = build("coco_stuff_171", tmp_path / "raw", tmp_path / "out")
  check_info(b, "coco_stuff_171", 171, 255)
  for split in ("train", "val"):
    got = read_split("coco_stuff_171", split, tmp_path / "out")
    assert len(got) == 2
    for fname, ex in got.items():
      img, lab = expected[(split, fname)]
      np.testing.assert_array_equal(ex["image"], img)
      np.testing.assert_array_equal(ex["label"], lab)
      assert ex["label"].dtype == np.uint8


def test_coco_stuff_raw_stuffthingmaps_ids(tmp_path):
  assert len(coco_stuff.COCO_STUFF_IDS) == 171
  root = tmp_path / "coco"
  write_jpeg(root / "val2017" / "a.jpg", 0)
  # raw value = COCO category id - 1: person (id 1), stop sign (13), banner (92), wood (182); 11 is the
  # unused id 12 (-> unlabeled, as the official script maps it); 255 unlabeled.
  raw = label_with([0, 12, 91, 181, 11, 255])
  write_png(root / "stuffthingmaps" / "val2017" / "a.png", raw)
  write_jpeg(root / "val2017" / "b.jpg", 1)  # all-unlabeled: dropped like the official script does
  write_png(root / "stuffthingmaps" / "val2017" / "b.png", np.full((H, W), 255))
  b = build("coco_stuff_171", root, tmp_path / "out")
  got = read_split("coco_stuff_171", "val", tmp_path / "out")
  assert list(got) == ["a.jpg"]
  assert b.dropped_all_ignored["val"] == 1
  want = {0: 0, 12: 11, 91: 80, 181: 170, 11: 255, 255: 255}
  np.testing.assert_array_equal(got["a.jpg"]["label"], np.vectorize(want.get)(raw))
  names = vocabularies.COCO_STUFF_171
  assert (names[0], names[11], names[80], names[170]) == ("person", "stop sign", "banner", "wood")


def test_coco_stuff_rejects_unknown_raw_value(tmp_path):
  root = tmp_path / "coco"
  write_jpeg(root / "val2017" / "a.jpg", 0)
  write_png(root / "stuffthingmaps" / "val2017" / "a.png", label_with([0, 200]))
  with pytest.raises(builders.CorruptExampleError, match=r"a\.png.*\[200\]"):
    build("coco_stuff_171", root, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# ADE20K-150 and -847


def test_ade20k_150_shifts_ids(tmp_path):
  root = tmp_path / "ADEChallengeData2016"
  write_jpeg(root / "images" / "validation" / "ADE_val_00000001.jpg", 0)
  raw = label_with([0, 1, 13, 150])
  write_png(root / "annotations" / "validation" / "ADE_val_00000001.png", raw)
  b = build("ade20k_150", tmp_path, tmp_path / "out")
  check_info(b, "ade20k_150", 150, 255)
  assert list(b.info.splits) == ["val"]
  got = read_split("ade20k_150", "val", tmp_path / "out")["ADE_val_00000001.jpg"]
  np.testing.assert_array_equal(got["label"], np.where(raw == 0, 255, raw - 1))


def test_ade20k_150_prepared_annotations_and_bad_value(tmp_path):
  root = tmp_path / "ADEChallengeData2016"
  write_jpeg(root / "images" / "training" / "x.jpg", 0)
  lab = label_with([0, 149, 255])
  write_png(root / "annotations_detectron2" / "training" / "x.png", lab)
  build("ade20k_150", tmp_path, tmp_path / "out")
  np.testing.assert_array_equal(read_split("ade20k_150", "train", tmp_path / "out")["x.jpg"]["label"], lab)
  write_png(root / "annotations_detectron2" / "training" / "x.png", label_with([0, 150]))
  with pytest.raises(builders.CorruptExampleError, match=r"x\.png.*\[150\]"):
    build("ade20k_150", tmp_path, tmp_path / "out2")


def test_ade20k_847_uint16_tif(tmp_path):
  root = tmp_path / "ADE20K_2021_17_01"
  write_jpeg(root / "images_detectron2" / "validation" / "ADE_frame_1.jpg", 0)
  lab = label_with([0, 255, 846, 65535])
  write_tif16(root / "annotations_detectron2" / "validation" / "ADE_frame_1.tif", lab)
  b = build("ade20k_847", tmp_path, tmp_path / "out")
  check_info(b, "ade20k_847", 847, 65535)
  got = read_split("ade20k_847", "val", tmp_path / "out")["ADE_frame_1.jpg"]["label"]
  assert got.dtype == np.uint16
  np.testing.assert_array_equal(got, lab)


# ----------------------------------------------------------------------------------------------------------
# Pascal Context-59 and -459


def test_pcontext_59(tmp_path):
  root = tmp_path / "pcontext"
  write_jpeg(root / "val" / "image" / "2008_000002.jpg", 0)
  lab = label_with([0, 36, 58, 255])
  write_png(root / "val" / "label" / "2008_000002.png", lab)
  b = build("pcontext_59", tmp_path, tmp_path / "out")
  check_info(b, "pcontext_59", 59, 255)
  np.testing.assert_array_equal(read_split("pcontext_59", "val", tmp_path / "out")["2008_000002.jpg"]["label"],
                                lab)
  write_png(root / "val" / "label" / "2008_000002.png", label_with([0, 59]))
  with pytest.raises(builders.CorruptExampleError, match="2008_000002.png"):
    build("pcontext_59", tmp_path, tmp_path / "out2")


def test_pcontext_459_uint16(tmp_path):
  root = tmp_path / "pcontext_full"
  write_jpeg(root / "val" / "image" / "2008_000002.jpg", 0)
  lab = label_with([0, 255, 458, 65535])  # 65535: LabelMap 0 (unlabeled) minus 1, wrapped
  write_tif16(root / "val" / "label" / "2008_000002.tif", lab)
  b = build("pcontext_459", tmp_path, tmp_path / "out")
  check_info(b, "pcontext_459", 459, 65535)
  got = read_split("pcontext_459", "val", tmp_path / "out")["2008_000002.jpg"]["label"]
  np.testing.assert_array_equal(got, lab)


# ----------------------------------------------------------------------------------------------------------
# Pascal VOC, background ignored (20) or kept (21)


def make_voc(tmp_path) -> dict:
  root = tmp_path / "VOCdevkit" / "VOC2012"
  labels = {"2007_000032": label_with([0, 1, 15, 20, 255]),  # 255: the object boundaries
            "2007_000033": np.zeros((H, W), np.uint8)}  # background only
  for stem, lab in labels.items():
    write_jpeg(root / "JPEGImages" / f"{stem}.jpg", 0)
    write_png(root / "SegmentationClass" / f"{stem}.png", lab, palette=True)
  (root / "ImageSets" / "Segmentation").mkdir(parents=True)
  (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(labels) + "\n")
  return labels


def test_voc_20_ignores_background(tmp_path):
  labels = make_voc(tmp_path)
  b = build("voc_20", tmp_path, tmp_path / "out")
  check_info(b, "voc_20", 20, 255)
  got = read_split("voc_20", "val", tmp_path / "out")
  assert list(got) == ["2007_000032.jpg"]  # the background-only image has nothing to evaluate
  raw = labels["2007_000032"]
  want = np.where((raw == 0) | (raw == 255), 255, raw - 1)
  np.testing.assert_array_equal(got["2007_000032.jpg"]["label"], want)


def test_voc_21_keeps_background(tmp_path):
  labels = make_voc(tmp_path)
  b = build("voc_21", tmp_path, tmp_path / "out")
  check_info(b, "voc_21", 21, 255)
  assert b.info.metadata["class_names"][0] == "background"
  got = read_split("voc_21", "val", tmp_path / "out")
  assert sorted(got) == ["2007_000032.jpg", "2007_000033.jpg"]
  for stem, raw in labels.items():
    np.testing.assert_array_equal(got[f"{stem}.jpg"]["label"], raw)


# ----------------------------------------------------------------------------------------------------------
# Corrupt files


def make_ade_val(tmp_path, n=3):
  root = tmp_path / "ADEChallengeData2016"
  for k in range(n):
    write_jpeg(root / "images" / "validation" / f"img{k}.jpg", k)
    write_png(root / "annotations" / "validation" / f"img{k}.png", label_with([0, 1, 2], seed=k))
  return root


def test_truncated_image_fails_naming_the_file(tmp_path):
  root = make_ade_val(tmp_path)
  bad = root / "images" / "validation" / "img1.jpg"
  bad.write_bytes(bad.read_bytes()[:200])
  with pytest.raises(builders.CorruptExampleError, match=r"img1\.jpg"):
    build("ade20k_150", tmp_path, tmp_path / "out")


def test_garbage_label_fails_naming_the_file(tmp_path):
  root = make_ade_val(tmp_path)
  (root / "annotations" / "validation" / "img2.png").write_bytes(b"not a png at all")
  with pytest.raises(builders.CorruptExampleError, match=r"img2\.png"):
    build("ade20k_150", tmp_path, tmp_path / "out")


def test_label_of_the_wrong_size_fails(tmp_path):
  root = make_ade_val(tmp_path)
  write_png(root / "annotations" / "validation" / "img0.png", np.ones((H + 1, W), np.uint8))
  with pytest.raises(builders.CorruptExampleError, match=r"img0\.png.*img0\.jpg"):
    build("ade20k_150", tmp_path, tmp_path / "out")


def test_rgb_label_fails(tmp_path):
  root = make_ade_val(tmp_path)
  Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "annotations" / "validation" / "img0.png")
  with pytest.raises(builders.CorruptExampleError, match=r"img0\.png.*RGB"):
    build("ade20k_150", tmp_path, tmp_path / "out")


def test_skip_corrupt_drops_and_counts(tmp_path, caplog):
  root = make_ade_val(tmp_path, n=4)
  bad = root / "images" / "validation" / "img1.jpg"
  bad.write_bytes(bad.read_bytes()[:200])
  (root / "annotations" / "validation" / "img3.png").write_bytes(b"junk")
  with caplog.at_level(logging.WARNING):
    b = build("ade20k_150", tmp_path, tmp_path / "out", skip_corrupt=True)
  assert [Path(p).name for p, _ in b.skipped["val"]] == ["img1.jpg", "img3.jpg"]
  assert sorted(read_split("ade20k_150", "val", tmp_path / "out")) == ["img0.jpg", "img2.jpg"]
  assert "skipped 2 corrupt examples" in caplog.text


def test_missing_listed_file_fails(tmp_path):
  make_voc(tmp_path)
  (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000033.jpg").unlink()
  with pytest.raises(builders.CorruptExampleError, match="2007_000033.jpg"):
    build("voc_21", tmp_path, tmp_path / "out")


def test_exif_rotated_and_grayscale_images_are_stored_upright_rgb(tmp_path):
  root = make_ade_val(tmp_path, n=1)
  # A grayscale JPEG stored sideways (W x H pixels) with EXIF orientation 6 (rotate 90 degrees clockwise):
  # upright it is H x W, matching the label, as detectron2's read_image sees it.
  gray = np.random.default_rng(0).integers(0, 256, (W, H), dtype=np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(gray, mode="L").save(root / "images" / "validation" / "img0.jpg", format="JPEG", exif=exif)
  build("ade20k_150", tmp_path, tmp_path / "out")
  img = read_split("ade20k_150", "val", tmp_path / "out")["img0.jpg"]["image"]
  with Image.open(root / "images" / "validation" / "img0.jpg") as im:
    want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  assert img.shape == (H, W, 3)
  np.testing.assert_array_equal(img, want)


def test_missing_layout_names_what_was_expected(tmp_path):
  (tmp_path / "something").mkdir()
  with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
    build("ade20k_150", tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# Synthetic shapes


def test_shapes_builder_matches_in_memory_source(tmp_path):
  cfg = builders.ShapesConfig(name="t", image_size=(24, 32), num_train=3, num_val=2, seed=5)
  b = builders.Shapes(config=cfg, data_dir=str(tmp_path), file_format="array_record")
  b.download_and_prepare()
  meta = b.info.metadata
  assert meta["num_classes"] == 48 and tuple(meta["class_names"]) == shapes.class_names()
  assert meta["ignore_label"] == 255
  ds = b.as_data_source(split="val")
  src = shapes.ShapesSource(2, seed=5, split="val", spec=shapes.ShapesSpec(image_size=(24, 32)))
  assert len(ds) == 2
  for i in range(2):
    np.testing.assert_array_equal(ds[i]["image"], src[i]["image"])
    np.testing.assert_array_equal(ds[i]["label"], src[i]["label"])


def test_build_cli_shapes(tmp_path, capsys):
  from san_jax.data import build as build_cli
  assert build_cli.main(["shapes", "--data_dir", str(tmp_path), "--image_size", "16,24", "--num_train",
                         "2", "--num_val", "1"]) == 0
  out = capsys.readouterr().out
  assert "train: 2 examples" in out and "val: 1 examples" in out
  from san_jax.data import pipeline
  src = pipeline.load_source("shapes", "train", tmp_path, config="custom_16x24_n2_1_s0_all")
  assert len(src) == 2 and src[0]["image"].shape == (16, 24, 3) and src.ignore_label == 255
  assert src.class_names == shapes.class_names()


def test_build_cli_needs_manual_dir(tmp_path, capsys):
  from san_jax.data import build as build_cli
  assert build_cli.main(["voc_20", "--data_dir", str(tmp_path)]) == 2
  assert "voc_20 needs --manual_dir" in capsys.readouterr().err

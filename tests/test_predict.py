"""predict.py end to end (in process) on the image formats people have, and the pictures of san_jax.viz."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import predict
from configs import tiny
from san_jax import checkpoint, pretrained, viz
from san_jax.data import shapes

H, W = 128, 160  # short side 128: the tiny config's test resize keeps the size, so one compiled program


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  flat, san_config = pretrained.quick_random_params(tiny.get_config().model, seed=0)
  return checkpoint.save_params(tmp_path_factory.mktemp("ckpt") / "params", flat, {"san_config": san_config})


def _scene():
  ex = shapes.render(3, split="val", spec=shapes.ShapesSpec(image_size=(H, W)))
  return ex["image"], ex["label"]


def _write_images(folder):
  rgb, _ = _scene()
  (folder / "sub").mkdir(parents=True)
  Image.fromarray(rgb).save(folder / "rgb.jpg", quality=90)
  Image.fromarray(rgb).convert("L").save(folder / "gray.png")
  Image.fromarray(np.dstack([rgb, np.full((H, W), 100, np.uint8)])).save(folder / "sub" / "rgba.png")
  Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(folder / "deep16.png")
  (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
  (folder / "notes.txt").write_text("not an image: ignored")
  return ["rgb", "gray", "sub/rgba", "deep16"]


def test_predict_writes_label_overlay_and_areas_for_every_format(ckpt, tmp_path, capsys):
  stems = _write_images(tmp_path / "in")
  out = tmp_path / "out"
  rc = predict.main(["--checkpoint", ckpt, "--config", "configs/tiny.py", "--vocab", "red circle, blue square, grass",
                     "--aug_vocab", "coco_stuff", "--image", str(tmp_path / "in"), "--recursive", "--out", str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  assert "4 of 5 images segmented" in text
  assert "broken.png" in text and "cannot read image" in text  # reported, and the rest went on
  assert Image.open(tmp_path / "in" / "deep16.png").mode.startswith("I")  # the input really is 16-bit
  for stem in stems:
    labels = Image.open(out / f"{stem}_label.png")
    assert labels.mode == "L" and labels.size == (W, H)  # uint8: 94 classes
    overlay = Image.open(out / f"{stem}_overlay.png")
    assert overlay.height == H and overlay.width > W  # the image plus its legend
    info = json.loads((out / f"{stem}.json").read_text())
    # COCO-Stuff's 91 stuff classes, less "grass", which the user gave already
    assert info["num_user_classes"] == 3 and len(info["vocabulary"]) == 3 + 91 - 1
    assert info["vocabulary"][:3] == ["red circle", "blue square", "grass"]
    assert info["vocabulary"].count("grass") == 1  # the user's "grass" is not added again
    assert sum(c["pixels"] for c in info["classes"]) == H * W
    assert sum(c["fraction"] for c in info["classes"]) == pytest.approx(1.0)
    ids = np.asarray(labels)
    for c in info["classes"]:
      assert (ids == c["id"]).sum() == c["pixels"] and info["vocabulary"][c["id"]] == c["name"]
  assert not (out / "broken_label.png").exists() and not (out / "notes_label.png").exists()


def test_large_vocabularies_give_16_bit_label_maps(tmp_path):
  labels = np.array([[0, 255], [256, 299]])
  png, dtype = predict.label_png(labels, 300)
  png.save(tmp_path / "x_label.png")
  back = Image.open(tmp_path / "x_label.png")
  assert dtype == "uint16" and back.mode.startswith("I;16")
  np.testing.assert_array_equal(np.asarray(back), labels)
  png, dtype = predict.label_png(labels.clip(0, 255), 256)
  assert dtype == "uint8" and png.mode == "L"
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("# comment\n" + "\n".join(f"thing {i}" for i in range(300)) + "\n")
  names, n_user = predict.build_vocabulary("cat", str(vocab), None)
  assert names[0] == "cat" and len(names) == n_user == 301


def test_nothing_readable_is_a_failure_with_a_clear_message(tmp_path, capsys):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "bad.jpg").write_bytes(b"garbage")
  rc = predict.main(["--config", "configs/tiny.py", "--random_init", "--vocab", "cat",
                     "--image", str(tmp_path / "in"), "--out", str(tmp_path / "out")])
  assert rc == 1
  text = capsys.readouterr().out
  assert "0 of 1 images" in text and "bad.jpg" in text and "cannot read image" in text


def test_argument_errors(tmp_path, capsys):
  assert predict.main(["--random_init", "--vocab", "cat", "--image", "x", "--out", "y"]) == 2  # no --config
  assert "--random_init needs --config" in capsys.readouterr().err
  assert predict.main(["--config", "configs/tiny.py", "--random_init", "--vocab", "cat, Cat",
                       "--image", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
  assert "duplicate class names" in capsys.readouterr().err
  assert predict.main(["--config", "configs/tiny.py", "--random_init", "--vocab", "cat",
                       "--image", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_colliding_names_keep_their_extension():
  from pathlib import Path
  base = Path("/data")
  assert predict.output_stems(base, [base / "a.jpg", base / "a.png", base / "b.png"]) == ["a_jpg", "a_png", "b"]


def test_viz_pictures():
  rgb, gt = _scene()
  names = shapes.class_names()
  colors = viz.palette(300)
  assert colors.shape == (300, 3) and len({tuple(c) for c in colors}) == 300
  pred = gt.copy()
  pred[:, : W // 2][pred[:, : W // 2] != 255] = 0  # a "prediction" that gets the left half wrong
  over = viz.overlay(rgb, gt, colors, ignore=255)
  assert over.shape == rgb.shape
  np.testing.assert_array_equal(over[gt == 255][:50], rgb[gt == 255][:50])  # ignored pixels untouched
  grid = viz.comparison_grid([(rgb, gt, pred), (rgb, None, pred)], names)
  assert grid.width > 3 * W and grid.height > 2 * H
  key = viz.legend([(n, tuple(c)) for n, c in zip(names, colors)], max_height=200)
  assert key.height <= 200 and key.width > 100  # 48 names in several columns


@pytest.mark.slow
def test_predict_from_a_training_run_and_from_its_exported_params(tiny_run, tmp_path, capsys):
  """predict.py --workdir RUN (the latest step, and --step 1), convert.export_params RUN OUT, then
  predict.py --checkpoint OUT: the exported checkpoint gives the run's label maps bit for bit (the run's
  model itself is checked against the trainer's own restore in test_pretrained)."""
  from convert import export_params
  rgb, _ = _scene()
  Image.fromarray(rgb).save(tmp_path / "scene.png")
  vocab = ["--vocab", "red circle, blue square, green triangle", "--image", str(tmp_path / "scene.png")]
  assert predict.main(["--workdir", str(tiny_run), *vocab, "--out", str(tmp_path / "run")]) == 0
  assert "(step 2)" in capsys.readouterr().out
  assert predict.main(["--workdir", str(tiny_run), "--step", "1", *vocab, "--out", str(tmp_path / "run1")]) == 0
  assert "(step 1)" in capsys.readouterr().out
  assert export_params.main([str(tiny_run), str(tmp_path / "exported")]) == 0
  meta = checkpoint.restore_params(tmp_path / "exported")[1]
  assert meta["source"]["step"] == 2 and meta["run_config"]["train"]["steps"] == 2 and "san_config" in meta
  assert export_params.main([str(tiny_run), str(tmp_path / "exported")]) == 2  # never overwrites
  assert "exists" in capsys.readouterr().err
  assert predict.main(["--checkpoint", str(tmp_path / "exported"), *vocab, "--out", str(tmp_path / "ckpt")]) == 0
  a = np.asarray(Image.open(tmp_path / "run" / "scene_label.png"))
  b = np.asarray(Image.open(tmp_path / "ckpt" / "scene_label.png"))
  assert a.shape == (H, W) and np.array_equal(a, b)


@pytest.mark.slow
def test_predict_names_the_kind_of_a_training_checkpoint_given_as_params(tiny_run, tmp_path, capsys):
  rgb, _ = _scene()
  Image.fromarray(rgb).save(tmp_path / "scene.png")
  args = ["--vocab", "a, b", "--image", str(tmp_path / "scene.png"), "--out", str(tmp_path / "o")]
  assert predict.main(["--checkpoint", str(tiny_run), *args]) == 2
  err = capsys.readouterr().err
  assert "is a training run directory, not a parameters checkpoint: pass it with --workdir" in err
  assert predict.main(["--checkpoint", str(tiny_run / "checkpoints" / "2"), *args]) == 2
  assert "train-state checkpoint" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()  # nothing written

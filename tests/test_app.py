"""app.py's action without a browser (the browser test is test_app_browser.py): outputs, downloads, the
vocabulary cache, and the message when the default model has not been made yet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from configs import tiny
from san_jax import checkpoint, pretrained
from san_jax.data import shapes


def test_missing_default_model_names_the_command_that_makes_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no runs/demo/san here
  state = app.SegmentApp(out_dir=str(tmp_path / "out"))
  image = np.zeros((32, 48, 3), np.uint8)
  with pytest.raises(FileNotFoundError, match=r"\.venv/bin/python demo\.py"):
    state.segment(image, "a, b")
  with pytest.raises(ValueError, match="Upload an image"):
    state.segment(None, "a, b")


def test_segment_gives_overlay_legend_and_downloads(tmp_path):
  flat, san_config = pretrained.quick_random_params(tiny.get_config().model, seed=0)
  ckpt = checkpoint.save_params(tmp_path / "params", flat, {"san_config": san_config})
  state = app.SegmentApp(ckpt, min_size=128, out_dir=str(tmp_path / "out"))
  image = shapes.render(2, split="val", spec=shapes.ShapesSpec(image_size=(96, 160)))["image"]
  over, legend, label_path, json_path, status = state.segment(image, "red circle, blue square", "coco_stuff")
  assert over.shape == image.shape and over.dtype == np.uint8
  assert "red circle" in legend and "blue square" in legend and status.startswith("request 1:")
  labels = np.asarray(Image.open(label_path))
  info = json.loads(Path(json_path).read_text())
  assert labels.shape == image.shape[:2] and info["num_user_classes"] == 2 and len(info["vocabulary"]) == 2 + 91
  assert sum(c["pixels"] for c in info["classes"] if c["pixels"]) == labels.size
  for c in info["classes"]:
    assert (labels == c["id"]).sum() == c["pixels"]
  _, seg, _ = state.model(ckpt)
  state.segment(image, "red circle, blue square", "coco_stuff")
  assert len(seg.class_embeddings._cache) == 1  # pylint: disable=protected-access  (one vocabulary, embedded once)

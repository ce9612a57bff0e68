"""python -m san_jax.export -> serve_export.py in a fresh process that imports only jax and numpy: the
served label maps are the live model's (Segmenter.segment at that size), for several batch sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import tiny
from san_jax import checkpoint, export, pretrained
from san_jax.data import shapes

REPO = Path(__file__).resolve().parents[1]
H, W = 96, 128
VOCAB = ["red circle", "blue square", "green triangle", "grass"]

SERVE = """
import sys, numpy as np
import serve_export
run, meta = serve_export.load(sys.argv[1])
images = np.load(sys.argv[2])
out = {}
for b in (1, 3):  # the batch dimension is symbolic: any size runs the same artifact
  labels, probs = run(images[:b])
  out[f"labels_{b}"], out[f"probs_{b}"] = labels, probs
np.savez(sys.argv[3], **out)
assert not [m for m in sys.modules if m.split(".")[0] in ("san_jax", "flax", "convert")], "imported more than jax"
"""


def test_exported_artifact_served_without_san_jax_gives_the_live_label_maps(tmp_path):
  flat, san_config = pretrained.quick_random_params(tiny.get_config().model, seed=2)
  ckpt = checkpoint.save_params(tmp_path / "params", flat, {"san_config": san_config})
  out = tmp_path / "artifact"
  assert export.main(["--model", ckpt, "--vocab", ", ".join(VOCAB), "--size", f"{H},{W}", "--out", str(out)]) == 0
  meta = json.loads((out / export.META).read_text())
  assert meta["class_names"] == VOCAB and meta["size"] == [H, W] and meta["inputs"][0]["shape"][0] == "B"
  images = np.stack([shapes.render(i, split="val", spec=shapes.ShapesSpec(image_size=(H, W)))["image"]
                     for i in range(3)])
  np.save(tmp_path / "images.npy", images)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", SERVE, str(out), str(tmp_path / "images.npy"), str(tmp_path / "served.npz")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  served = np.load(tmp_path / "served.npz")
  seg = pretrained.load(ckpt).segmenter()
  for i in range(3):
    probs, labels = seg.segment(images[i], VOCAB)  # the live model, the official post-processing
    np.testing.assert_array_equal(served["labels_3"][i], labels)
    # measured: 6e-8 (XLA's fusion of the same float32 ops differs between the two programs)
    np.testing.assert_allclose(served["probs_3"][i], probs, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(served["labels_1"][0], served["labels_3"][0])


def test_export_refuses_an_existing_directory_and_a_bad_vocabulary(tmp_path, capsys):
  (tmp_path / "taken").mkdir()
  assert export.main(["--model", "san_vit_b16", "--vocab", "a", "--size", "32,32", "--out", str(tmp_path / "taken")]) == 2
  assert "exists" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match="no model.jaxexport"):
    import serve_export
    serve_export.load(str(tmp_path / "taken"))

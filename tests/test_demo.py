"""demo.py (README command 1) end to end at toy length, its chance level, and the shapes options it uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import demo  # noqa: E402  (the repository root is not a package)
from san_jax.data import shapes  # noqa: E402

SMOKE = ["--config.clip_pretrain.steps=3", "--config.clip_pretrain.num_images=96", "--config.clip_pretrain.num_eval=48",
         "--config.clip_pretrain.batch_size=16", "--config.train.steps=3", "--config.train.batch_size=2",
         "--config.data.num_examples=8", "--config.data.shapes_num_val=12", "--config.demo.grid_examples=2",
         "--config.demo.chance_draws=2"]


def _run(workdir, *extra):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "demo.py", "--workdir", str(workdir), *SMOKE, *extra], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_its_pictures(tmp_path):
  out = _run(tmp_path)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  for stage in ("[1/3]", "[2/3]", "[3/3]"):
    assert stage in out.stdout
  assert "mIoU, seen classes" in out.stdout and "mIoU, unseen classes" in out.stdout and "chance:" in out.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  for key in ("mIoU_seen", "mIoU_unseen", "chance_mIoU_unseen"):
    assert isinstance(summary[key], float) and 0.0 <= summary[key] <= 100.0, (key, summary[key])
  assert (tmp_path / "clip" ).exists() and (tmp_path / "san" / "checkpoints").exists()
  grid = Image.open(tmp_path / "segmentations.png")
  size = 64 * 3  # demo_shapes' image size, upscaled 3x
  assert grid.width > 3 * size and grid.height >= 2 * size  # 2 rows of image | truth | prediction | legend
  assert np.asarray(grid.convert("L")).std() > 10  # not a blank canvas
  curves = Image.open(tmp_path / "curves.png")
  assert curves.width > 600 and np.asarray(curves.convert("L")).std() > 10
  clip_rows = [json.loads(l) for l in (tmp_path / "clip_metrics.jsonl").read_text().splitlines()]
  assert clip_rows and all(np.isfinite(r["loss"]) for r in clip_rows)

  # A second run reuses the finished stages: the CLIP is not retrained and the SAN run resumes at its end.
  again = _run(tmp_path)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert "CLIP: reusing" in again.stdout and "clip step" not in again.stdout
  assert "step 1/3" not in again.stdout
  # A changed CLIP recipe is not mistaken for the finished one.
  changed = _run(tmp_path, "--config.clip_pretrain.lr=1e-3")
  assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
  assert "trained with other settings" in changed.stdout and "clip step" in changed.stdout
  assert "step 1/3" in changed.stdout  # and SAN, which depends on it, trains again


def test_chance_level_matches_its_definition():
  spec = shapes.ShapesSpec(image_size=(32, 32), max_objects=3)
  source = shapes.ShapesSource(24, split="val", spec=spec)
  names = shapes.class_names()
  subsets = {"seen": shapes.class_ids(shapes.seen_classes()), "unseen": shapes.class_ids(shapes.unseen_classes())}
  # One class in the vocabulary: the guess is always right wherever there is an object of class 0.
  one = shapes.ShapesSource(6, split="val", spec=shapes.ShapesSpec(image_size=(32, 32), classes=(0,)))
  assert demo.chance_level(one, 1, {}, draws=2)["mIoU"] == pytest.approx(100.0)
  # 48 names: a random name is right 1/48 of the time, so the IoU per class is a few percent at most.
  chance = demo.chance_level(source, len(names), subsets, draws=5)
  assert 0.0 <= chance["mIoU-unseen"] < 10.0 and 0.0 <= chance["mIoU-seen"] < 10.0
  assert chance["mIoU-unseen_max"] >= chance["mIoU-unseen"]


def test_upright_shapes_change_only_the_angles():
  """`rotate=False` draws the same scenes (classes, places, sizes, colours) with upright shapes: a set of
  squares and diamonds (upright either way) renders identically, and every triangle points up."""
  boxy = shapes.class_ids([n for n in shapes.class_names() if n.endswith(("square", "diamond"))])
  for i in range(4):
    a = shapes.render(i, spec=shapes.ShapesSpec(image_size=(48, 48), classes=boxy))
    b = shapes.render(i, spec=shapes.ShapesSpec(image_size=(48, 48), classes=boxy, rotate=False))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  triangles = shapes.class_ids([n for n in shapes.class_names() if n.endswith("triangle")])
  pointing_up = []
  for rotate in (False, True):
    spec = shapes.ShapesSpec(image_size=(64, 64), max_objects=1, min_radius=0.2, classes=triangles, rotate=rotate)
    ups = 0
    for i in range(12):
      ys = np.nonzero(shapes.render(i, spec=spec)["label"] != shapes.IGNORE_LABEL)[0]
      ups += ys.mean() > (ys.min() + ys.max()) / 2  # the area lies low: apex up (centroid at 2/3 height)
    pointing_up.append(ups)
  assert pointing_up[0] == 12 and pointing_up[1] < 10


def test_evaluation_draws_the_runs_own_scenes_with_every_class():
  """eval.py / the periodic evaluation build the shapes set from the run config's shapes_* keys (the demo's
  upright, larger objects), with objects of every class, the unseen ones included."""
  from configs import demo_shapes
  from san_jax.evaluation import runner
  cfg = demo_shapes.get_config()
  source = runner.make_source("shapes", runner.EvalOptions.from_config(cfg))
  want = shapes.spec_from_config(cfg.data, all_classes=True)
  assert source.spec == want and want.rotate is False and want.classes is None
  assert want.max_objects == cfg.data.shapes_max_objects and want.min_radius == cfg.data.shapes_min_radius
  assert len(source) == cfg.data.shapes_num_val
  drawn = set()
  for i in range(len(source)):
    drawn |= {int(c) for c in np.unique(source[i]["label"]) if c != shapes.IGNORE_LABEL}
  assert drawn & set(shapes.class_ids(shapes.unseen_classes()))
  # A config without shapes_* keys keeps the set's defaults.
  from configs import tiny
  plain = runner.make_source("shapes", runner.EvalOptions.from_config(tiny.get_config()))
  assert plain.spec == shapes.ShapesSpec(image_size=plain.spec.image_size)

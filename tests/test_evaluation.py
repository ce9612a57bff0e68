"""Evaluation: detectron2's SemSegEvaluator metrics, batched/TTA/sliding-window inference, eval.py end to end.

Tiny config, random weights (numpy-drawn, see pretrained.quick_random_params), synthetic data.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs import tiny
from san_jax import checkpoint, pretrained
from san_jax.data import shapes
from san_jax.evaluation import inference, runner
from san_jax.evaluation import sem_seg

VOCAB = ["red circle", "blue square", "green triangle", "grass"]


# ---- metrics -----------------------------------------------------------------------------------------------
def reference_metrics(preds, gts, k, ignore):
  """An independent implementation of detectron2 v0.6's definitions, class by class from the pixels."""
  pred = np.concatenate([p.ravel() for p in preds])
  gt = np.concatenate([g.ravel() for g in gts])
  keep = gt != ignore
  pred, gt = pred[keep], gt[keep]
  iou, acc = np.full(k, np.nan), np.full(k, np.nan)
  iou_valid = 0
  for c in range(k):
    in_gt, in_pred = gt == c, pred == c
    tp = np.sum(in_gt & in_pred)
    if in_gt.any():
      acc[c] = tp / in_gt.sum()
      iou[c] = tp / np.sum(in_gt | in_pred)
    iou_valid += bool(in_gt.any() or in_pred.any())
  freq = np.array([np.sum(gt == c) for c in range(k)]) / len(gt)
  has = ~np.isnan(iou)
  return {"mIoU": 100 * np.nansum(iou) / iou_valid, "fwIoU": 100 * np.sum(iou[has] * freq[has]),
          "mACC": 100 * np.nanmean(acc), "pACC": 100 * np.mean(pred == gt), "iou": iou, "acc": acc}


def test_evaluator_matches_an_independent_implementation():
  rng = np.random.default_rng(0)
  k, ignore = 7, 255
  preds, gts = [], []
  for shape in [(13, 17), (20, 9), (8, 8)]:
    gt = rng.integers(0, k - 1, shape)  # class k-1 never in the ground truth ...
    gt[rng.random(shape) < 0.2] = ignore
    pred = rng.integers(0, k, shape)  # ... but predicted: NaN IoU, counted in the mIoU's denominator
    preds.append(pred)
    gts.append(gt)
  ev = sem_seg.SemSegEvaluator([f"c{i}" for i in range(k)], ignore)
  for p, g in zip(preds, gts):
    ev.process(p, g)
  got, want = ev.evaluate(), reference_metrics(preds, gts, k, ignore)
  for key in ("mIoU", "fwIoU", "mACC", "pACC"):
    assert got[key] == pytest.approx(want[key], rel=1e-12), key
  np.testing.assert_allclose(got["iou"], want["iou"], rtol=1e-12)
  np.testing.assert_allclose(got["acc"], want["acc"], rtol=1e-12)
  assert np.isnan(got["IoU"][f"c{k - 1}"]) and np.isnan(got["ACC"][f"c{k - 1}"])
  assert got["num_images"] == 3

  # the jitted matrix (ragged sizes padded with the ignore label) and merging give the same matrix
  device = sum(np.asarray(jax.jit(sem_seg.confusion_matrix, static_argnums=(2, 3))(
      np.pad(p, ((0, 3), (0, 2))), np.pad(g, ((0, 3), (0, 2)), constant_values=ignore), k, ignore), np.int64)
      for p, g in zip(preds, gts))
  # column k (ignored ground truth) also counts the padding; no metric reads it
  np.testing.assert_array_equal(device[:, :k], ev.matrix[:, :k])
  a, b = sem_seg.SemSegEvaluator(ev.class_names, ignore), sem_seg.SemSegEvaluator(ev.class_names, ignore)
  a.process(preds[0], gts[0])
  b.process(np.stack([preds[2]]), np.stack([gts[2]]))
  b.process(preds[1], gts[1])
  a.merge(b)
  np.testing.assert_array_equal(a.matrix, ev.matrix)
  a.all_reduce()  # one process: a no-op
  np.testing.assert_array_equal(a.matrix, ev.matrix)
  assert a.num_images == 3


def test_hand_computed_absent_and_never_predicted_classes():
  # pixels (pred, gt): (0,0) (0,0) (2,0) (1,1) (0,1) and one ignored; class 3 appears nowhere
  gt = np.array([[0, 0, 0, 1, 1, 255]])
  pred = np.array([[0, 0, 2, 1, 0, 2]])
  ev = sem_seg.SemSegEvaluator(["a", "b", "c", "d"])
  ev.process(pred, gt)
  r = ev.evaluate()
  # tp = (2, 1, 0), pos_gt = (3, 2, 0), pos_pred = (3, 1, 1): IoU a = 2/4, b = 1/2; c has no gt (NaN) but
  # was predicted, so detectron2 v0.6 divides by 3 valid classes; d counts nowhere.
  assert r["mIoU"] == pytest.approx(100 / 3)
  assert r["mACC"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
  assert r["pACC"] == pytest.approx(60.0)
  assert r["fwIoU"] == pytest.approx(100 * (0.5 * 3 / 5 + 0.5 * 2 / 5))
  assert r["IoU"]["a"] == pytest.approx(50.0) and np.isnan(r["IoU"]["c"]) and np.isnan(r["IoU"]["d"])
  newer = sem_seg.metrics_from_matrix(ev.matrix, legacy_miou=False)
  assert newer["mIoU"] == pytest.approx(50.0)  # later detectron2: the predicted-only class is left out
  ready = sem_seg.json_ready(r)
  assert ready["IoU"]["c"] is None and "iou" not in ready
  json.dumps(ready, allow_nan=False)


def test_hand_computed_frequency_weighting_and_subsets():
  gt = np.array([[0, 0, 0, 0, 1, 1]])
  pred = np.array([[0, 0, 0, 1, 1, 0]])
  ev = sem_seg.SemSegEvaluator(["a", "b"], subsets={"seen": [0], "unseen": [1]})
  ev.process(pred, gt)
  r = ev.evaluate()
  # IoU a = 3/5, b = 1/3; frequencies 4/6 and 2/6
  assert r["fwIoU"] == pytest.approx(100 * (0.6 * 4 / 6 + (1 / 3) * 2 / 6))
  assert r["mIoU"] == pytest.approx(100 * (0.6 + 1 / 3) / 2)
  assert r["mACC"] == pytest.approx(100 * (3 / 4 + 1 / 2) / 2)
  assert r["mIoU-seen"] == pytest.approx(60.0) and r["mIoU-unseen"] == pytest.approx(100 / 3)
  assert r["hIoU"] == pytest.approx(2 * 60 * (100 / 3) / (60 + 100 / 3))


def test_bad_ground_truth_values_are_rejected_with_their_values():
  ev = sem_seg.SemSegEvaluator(["a", "b"])
  with pytest.raises(ValueError, match=r"\[7\]"):
    ev.process(np.zeros((2, 2), int), np.array([[0, 1], [7, 255]]))


def test_allreduce_halves_round_trip_large_counts():
  m = np.array([[2 ** 40 + 5, 3], [0, 2 ** 31]], np.int64)
  assert (sem_seg.allreduce_matrix(m) == m).all()


# ---- inference ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def params():
  return pretrained.quick_random_params(tiny.get_config().model, seed=0)


@pytest.fixture(scope="module")
def segmenter(params):
  return inference.Segmenter(pretrained.model_from_params(*params))


def _image(h, w, index=0):
  return shapes.render(index, split="val", spec=shapes.ShapesSpec(image_size=(h, w)))["image"]


def test_canvas_path_matches_the_reference_post_processing(segmenter):
  img = _image(100, 150)
  probs, labels = segmenter.segment(img, VOCAB, output_hw=(110, 160))
  got, got_probs = segmenter.predict(img, VOCAB, output_hw=(110, 160), return_probs=True)
  assert got.shape == (110, 160) and got_probs.shape == (len(VOCAB), 110, 160)
  np.testing.assert_allclose(got_probs, probs, atol=1e-5)
  assert (got == labels).mean() > 0.999


def test_sliding_window_covering_the_image_is_plain_inference(segmenter):
  img = _image(100, 150)
  plain, plain_probs = segmenter.predict(img, VOCAB, return_probs=True)
  for window in (150, 640):  # exactly the long side, and larger
    labels, probs = segmenter.predict(img, VOCAB, sliding=inference.SlidingWindow(window, 100), return_probs=True)
    np.testing.assert_array_equal(probs, plain_probs)
    np.testing.assert_array_equal(labels, plain)


def test_sliding_window_averages_overlapping_windows(segmenter):
  img = _image(100, 150)
  sliding = inference.SlidingWindow(96, 54)
  offsets, (wh, ww) = inference.window_grid(100, 150, sliding)
  assert (wh, ww) == (96, 96) and offsets == [(0, 0), (0, 54), (4, 0), (4, 54)]
  labels, probs = segmenter.predict(img, VOCAB, sliding=sliding, return_probs=True)
  assert labels.shape == (100, 150) and probs.shape == (len(VOCAB), 100, 150)
  acc, count = np.zeros(probs.shape), np.zeros(probs.shape[1:])
  for y, x in offsets:
    p, _ = segmenter.segment(img[y:y + wh, x:x + ww], VOCAB)
    acc[:, y:y + wh, x:x + ww] += p
    count[y:y + wh, x:x + ww] += 1
  np.testing.assert_allclose(probs, acc / count, atol=1e-5)


def test_tta_flip_averages_the_mirrored_prediction_and_keeps_the_size(segmenter):
  img = _image(96, 128)
  tta = inference.TTAConfig(min_sizes=(96,), max_size=1000, flip=True)
  labels, probs = segmenter.predict(img, VOCAB, tta=tta, return_probs=True)
  _, plain = segmenter.predict(img, VOCAB, return_probs=True)
  _, mirrored = segmenter.predict(img[:, ::-1], VOCAB, return_probs=True)
  np.testing.assert_allclose(probs, (plain + mirrored[:, :, ::-1]) / 2, atol=1e-5)
  assert labels.shape == (96, 128)
  multi = inference.TTAConfig.from_scales((0.5, 1.25), min_size=96, max_size=320, flip=False)
  assert multi.min_sizes == (48, 120) and multi.max_size == 400
  # SAN's own TTA sizes
  san = inference.TTAConfig.from_scales((0.5, 0.75, 1.0, 1.25, 1.5, 1.75), 640, 2560)
  assert san.min_sizes == (320, 480, 640, 800, 960, 1120) and san.max_size == 4480


def test_batched_evaluation_on_a_common_canvas(segmenter):
  emb = segmenter.embeddings(VOCAB)
  a, b = _image(64, 96, 1), _image(96, 64, 2)
  images = np.zeros((3, 96, 96, 3), np.uint8)
  images[0, :64, :96], images[1, :96, :64] = a, b
  rng = np.random.default_rng(0)
  gts = [rng.integers(0, 4, (50, 70)), rng.integers(0, 4, (120, 80))]  # the third example: batch padding
  gts[0][:5] = 255
  sem = np.full((3, 120, 80), 255, np.int32)
  sem[0, :50, :70], sem[1] = gts
  batch = {"image": images, "image_size": np.array([[64, 96], [96, 64], [32, 32]]), "sem_seg": sem,
           "orig_size": np.array([[50, 70], [120, 80], [1, 1]]), "example_valid": np.array([True, True, False])}
  labels, conf = segmenter.evaluate_batch(batch, emb, 4, 255)
  labels = np.asarray(labels)
  assert labels.shape == (3, 128, 128)  # the output canvas: a multiple of 64 holding both ground truths
  want = sem_seg.confusion_matrix_np(labels[0, :50, :70], gts[0], 4) + \
      sem_seg.confusion_matrix_np(labels[1, :120, :80], gts[1], 4)
  np.testing.assert_array_equal(np.asarray(conf)[:, :4], want[:, :4])  # column 4: ignored, padding included


# ---- eval.py end to end ------------------------------------------------------------------------------------
def test_eval_cli_on_the_shapes_set(params, segmenter, tmp_path):
  import eval as eval_cli
  ckpt = checkpoint.save_params(tmp_path / "ckpt", params[0], {"san_config": params[1]})
  out = tmp_path / "out"
  rc = eval_cli.main(["--config", "configs/tiny.py", "--checkpoint", ckpt, "--datasets", "shapes",
                      "--max_examples", "5", "--batch_size", "2", "--out", str(out)])
  assert rc == 0
  doc = json.loads((out / "eval_shapes.json").read_text())
  assert doc["dataset"] == "shapes" and doc["num_images"] == 5
  for key in ("mIoU", "fwIoU", "mACC", "pACC", "mIoU-seen", "mIoU-unseen"):
    assert key in doc["metrics"]
  assert len(doc["per_class"]["IoU"]) == len(shapes.class_names())
  assert doc["checkpoint"] == ckpt

  # the same numbers from the reference path, image by image (128x128 images: no test resize at 128)
  seg = segmenter  # the same weights
  src = shapes.ShapesSource(5, seed=0, split="val", spec=shapes.ShapesSpec(image_size=(128, 128)))
  ev = sem_seg.SemSegEvaluator(shapes.class_names())
  for i in range(5):
    _, labels = seg.segment(src[i]["image"], shapes.class_names())
    ev.process(labels, src[i]["label"])
  want = sem_seg.json_ready(ev.evaluate())
  for key in ("mIoU", "fwIoU", "mACC", "pACC"):
    assert doc["metrics"][key] == pytest.approx(want[key], abs=1e-9)


def test_eval_cli_rejects_bad_arguments(params, tmp_path, capsys):
  import eval as eval_cli
  assert eval_cli.main(["--datasets", "shapes"]) == 2
  assert "exactly one of --workdir, --checkpoint and --model" in capsys.readouterr().err
  assert eval_cli.main(["--checkpoint", str(tmp_path), "--datasets", "nope"]) == 2
  assert "unknown data sets ['nope']" in capsys.readouterr().err
  # a config of another geometry than the checkpoint's: the differing keys, before any work
  ckpt = checkpoint.save_params(tmp_path / "ckpt", params[0], {"san_config": params[1]})
  assert eval_cli.main(["--config", "configs/tiny.py", "--config.model.side.width=96",
                        "--config.model.side.num_queries=12", "--checkpoint", ckpt, "--datasets", "shapes"]) == 2
  err = capsys.readouterr().err
  assert "side.width: config 96, checkpoint 48" in err and "side.num_queries: config 12, checkpoint 8" in err
  assert "Traceback" not in err


def test_evaluate_with_tta_and_sliding_window_runs(segmenter):
  # two scales, flips and 2x2 windows at 64 px; the 96 px ground truth: predictions resized to it
  opts = runner.EvalOptions(min_size=64, max_size=128, tta=True, tta_scales=(0.75, 1.0), tta_flip=True,
                            sliding_window=True, window=40, stride=24, max_examples=2, shapes_image_size=96)
  res = runner.evaluate(segmenter, "shapes", options=opts, log=None)
  assert res["num_images"] == 2
  labelled = sum(int((shapes.render(i, split="val", spec=shapes.ShapesSpec(image_size=(96, 96)))["label"]
                      != 255).sum()) for i in range(2))
  assert res["confusion_matrix"][:-1, :-1].sum() == labelled


_MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from configs import tiny
from san_jax import pretrained
from san_jax.evaluation import inference
from san_jax.models import layers
from san_jax.ops import gemm
assert gemm.f32_attention_availability()[0], gemm.f32_attention_availability()
layers.F32_FUSED_MIN_LOGITS = 1  # the tiny model's sequences are below the size where it pays
seg = inference.Segmenter(pretrained.model_from_params(*pretrained.quick_random_params(tiny.get_config().model)))
images = jnp.zeros((2, 64, 64, 3), jnp.uint8)
sizes = jnp.full((2, 2), 64, jnp.int32)
hlo = jax.jit(seg._outputs).lower(seg.state, images, sizes, seg.embeddings(["red circle", "grass"])).as_text()
print(len(jax.local_devices()), "san_f32_attention" in hlo)
"""


@pytest.mark.parametrize("devices,fused", [(1, True), (2, False)])
def test_segmenter_uses_the_fused_attention_on_one_device_only(devices, fused):
  """On one CPU device the Segmenter's programs run float32 attention as the fused custom call; over several
  devices (the batch split by XLA) they keep XLA's attention: a custom call has no sharding rule, so XLA
  would gather its operands and run it whole on every device (layers._xla_partitions)."""
  import os
  import subprocess
  import sys
  from san_jax.ops import gemm
  if not gemm.f32_attention_availability()[0]:
    pytest.skip(gemm.f32_attention_availability()[1])
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=repo)
  res = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
  assert res.stdout.split()[-2:] == [str(devices), str(fused)]

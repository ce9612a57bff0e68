"""train.py end to end: metrics, checkpoints, exact resumption after kill -9, corrupt checkpoints,
non-finite losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from san_jax import checkpoint

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--config", "configs/tiny.py", "--config.train.log_every=1", "--config.train.checkpoint_every=3",
          "--config.data.num_examples=16", "--config.train.keep_checkpoints=10", "--config.train.eval_every=0"]


def _run(workdir, steps, extra=(), wait=True):
  cmd = [sys.executable, "train.py", "--workdir", str(workdir), *COMMON, f"--config.train.steps={steps}", *extra]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  if wait:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(workdir):
  rows = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    # several rows may share a step (training metrics, evaluation): merged
    rows.setdefault(row["step"], {}).update(row)
  return rows


LOSS_KEYS = ("loss", "loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0", "grad_norm")


@pytest.mark.slow
def test_kill_dash_nine_then_resume_gives_the_uninterrupted_losses(tmp_path):
  steps = 12
  ref = _run(tmp_path / "ref", steps)
  assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-4000:]
  expected = _metrics(tmp_path / "ref")
  assert sorted(expected) == list(range(1, steps + 1))
  assert "ETA" in ref.stdout and "steps/s" in ref.stdout

  work = tmp_path / "killed"
  proc = _run(work, steps, wait=False)
  deadline = time.time() + 600
  ckpt = work / "checkpoints"
  while time.time() < deadline:  # wait for a finished checkpoint at step 6, then kill hard
    if (ckpt / "6").is_dir() and _metrics_upto(work) >= 7:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = _metrics_upto(work)
  assert killed_at < steps, "the run finished before it could be killed"

  resumed = _run(work, steps)
  assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
  got = _metrics(work)
  assert sorted(got) == list(range(1, steps + 1))
  logged = [json.loads(l)["step"] for l in (work / "metrics.jsonl").read_text().splitlines() if l.strip()]
  assert logged == list(range(1, steps + 1)), "one row per step: the rows after the restored step are dropped"
  for s in range(1, steps + 1):
    for k in LOSS_KEYS:
      assert got[s][k] == expected[s][k], (s, k, got[s][k], expected[s][k])


def _metrics_upto(workdir) -> int:
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  return max((r["step"] for r in lines), default=0)


@pytest.mark.slow
def test_nonfinite_loss_stops_with_the_step_and_no_poisoned_checkpoint(tmp_path):
  # An absurd learning rate makes the parameters overflow within a few steps.
  out = _run(tmp_path / "nan", 9, extra=["--config.train.optimizer.lr=1e30", "--config.train.clip_grad_norm=0"])
  assert out.returncode != 0
  assert "NonFiniteLossError" in out.stderr and "non-finite loss or gradient at step" in out.stderr
  ckpts = checkpoint.TrainCheckpoints(tmp_path / "nan" / "checkpoints")
  for step in ckpts.steps():
    flat, _ = _restore_params_np(ckpts, step)
    assert all(np.isfinite(v).all() for v in flat), f"checkpoint {step} holds non-finite parameters"


def _restore_params_np(ckpts, step):
  import orbax.checkpoint as ocp
  restored = ckpts._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  return [np.asarray(x) for x in jax.tree.leaves(restored["state"])], restored["data"]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, caplog):
  state = {"w": jax.numpy.arange(1000.0), "step": jax.numpy.int32(0)}
  ck = checkpoint.TrainCheckpoints(tmp_path, keep=3)
  ck.save(1, state, {"pos": 1})
  ck.save(2, {"w": state["w"] * 2, "step": jax.numpy.int32(2)}, {"pos": 2})
  ck.wait()
  for root, _, files in os.walk(tmp_path / "2"):  # damage every data file of the latest step
    for f in files:
      if f.startswith("d") or "ocdbt" in root:
        Path(root, f).write_bytes(b"garbage")
  restored, data = ck.restore_latest(state)
  assert data == {"pos": 1}
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(1000.0))
  assert any("step 2" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
  ck.close()


def test_checkpoint_holds_state_data_position_and_config_together(tmp_path):
  ck = checkpoint.TrainCheckpoints(tmp_path, keep=2)
  ck.save(5, {"w": jax.numpy.ones(3)}, {"batches": 5}, {"train": {"steps": 10}})
  ck.wait()
  state, data = ck.restore_latest({"w": jax.numpy.zeros(3)})
  assert data == {"batches": 5} and ck.config(5) == {"train": {"steps": 10}}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(3))
  ck.close()


def test_init_from_a_converted_clip_checkpoint_sets_sans_clip(tmp_path):
  """train.init_from with a CLIP params checkpoint (convert.clip_checkpoint's output) initialises SAN's
  CLIP image tower and text tower from it; the side network keeps its own initialisation."""
  from flax import nnx
  from san_jax.models import clip as clip_lib
  from san_jax.models import params as params_lib
  from san_jax.train import loop, sharding, steps
  from tests.train_utils import model_config, tiny_config
  cfg = tiny_config()
  mcfg = model_config(cfg)
  clip_model = clip_lib.CLIP(mcfg.clip, rngs=nnx.Rngs(7))
  flat = {p: np.asarray(v) for p, v in params_lib.flat_params(clip_model).items()}
  checkpoint.save_params(tmp_path / "clip", flat, {"clip_config": clip_lib.config_to_dict(mcfg.clip)})
  init = loop._load_init_params(str(tmp_path / "clip"))
  mesh = sharding.make_mesh(cfg.mesh.shape.to_dict(), jax.devices()[:1])
  tr = steps.Trainer(mcfg, cfg.train, mesh, [tuple(r) for r in cfg.mesh.rules], 3)
  state, frozen = tr.init(jax.random.key(0), init)
  model = tr.model(state, frozen)
  np.testing.assert_array_equal(np.asarray(model.clip_visual.conv1.kernel[...]), flat[("visual", "conv1", "kernel")])
  np.testing.assert_array_equal(np.asarray(model.clip_visual.positional_embedding[...]),
                                flat[("visual", "positional_embedding")])  # trainable, initialised too
  np.testing.assert_array_equal(np.asarray(model.ov_classifier.token_embedding.embedding[...]),
                                flat[("token_embedding", "embedding")])
  np.testing.assert_array_equal(np.asarray(model.ov_classifier.logit_scale[...]), flat[("logit_scale",)])


def test_progress_line_and_metrics_writer(tmp_path):
  """The console line both training loops print (rate and ETA from the step time, by hand: 0.5 s/step, 60
  steps left = 30 s) and the JSON-lines file both write (appended, none without a path)."""
  from san_jax.train import loop
  assert (loop.progress_line("clip ", 40, 100, "loss 1.000", 0.5, batch_size=16)
          == "clip step 40/100  loss 1.000  2.00 steps/s  32.0 img/s  ETA 0:00:30")
  assert loop.progress_line("", 1, 7200 + 1, "x", 1.0) == "step 1/7201  x  1.00 steps/s  ETA 2:00:00"
  assert loop.progress_line("", 1, 3, "x", float("nan")) == "step 1/3  x  rate ?  ETA ?"
  timer = loop.StepTimer(5)
  assert np.isnan(timer.lap(5)) and timer.lap(7) >= 0.0
  path = tmp_path / "m.jsonl"
  writer = loop.MetricsWriter(path)
  writer.write({"step": 1, "loss": 2.5})
  writer.write({"step": 2, "loss": 1.5})
  writer.close()
  assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1, "loss": 2.5},
                                                                          {"step": 2, "loss": 1.5}]
  loop.MetricsWriter(None).write({"step": 1})  # no path: nothing is written, nothing fails
  loop.MetricsWriter(tmp_path / "off.jsonl", enabled=False).write({"step": 1})
  assert not (tmp_path / "off.jsonl").exists()

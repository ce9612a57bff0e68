"""Nothing lost, nothing silently wrong (issue 14): a run never deletes or overwrites checkpoints it could
not read, refuses another run's workdir, holds a workdir lock, validates its whole config before writing,
stops at once with one line on a failed save, and exits 143 after a SIGTERM; metrics.jsonl has one row per
step after a resume.

Each probe command of the issue is reproduced with train.py where it matters (the refusals happen before
any compilation: a few seconds each); the rest drives the functions train.py runs on small states.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from san_jax import checkpoint
from san_jax.train import loop, validate
from san_jax.train import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny.py", "--config.train.log_every=1", "--config.data.num_examples=16",
        "--config.train.eval_every=0"]


def _train(workdir, *args, config=None, env_extra=None, wait=True):
  """`python train.py --workdir W [--config CONFIG] ARGS` (tiny config unless `config`)."""
  base = ["--config", config] if config else TINY
  cmd = [sys.executable, "train.py", "--workdir", str(workdir), *base, *args]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **(env_extra or {}))
  if wait:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _snapshot(directory) -> dict:
  """{relative path: sha256} of every file under `directory` (to show nothing was changed)."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = Path(root, f)
      out[str(p.relative_to(directory))] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def _damage_step(step_dir):
  """Truncates every array data file of a checkpoint step (what a half-copied or bit-rotted step is)."""
  n = 0
  for root, _, files in os.walk(step_dir):
    for f in files:
      if "ocdbt" in root and (f.startswith("d") or root.endswith("/d")):
        p = Path(root, f)
        p.write_bytes(p.read_bytes()[:7])
        n += 1
  assert n, f"no data files found under {step_dir}"


def _rows(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


# ---- 1. checkpoints never deleted or overwritten by a run that could not read them -------------------
@pytest.mark.slow
def test_another_config_or_unreadable_checkpoints_stop_the_run_and_nothing_is_lost(tmp_path):
  """The probe: T steps=4 checkpoint_every=2, then configs/demo_shapes.py on the same workdir (another
  geometry) deleted steps 2 and 4 and overwrote config.json; then a damaged only checkpoint restarted from
  scratch silently. Now both refuse, naming the problem, and leave every file as it was (fresh=True: the
  tests below)."""
  w = tmp_path / "w"
  first = _train(w, "--config.train.steps=4", "--config.train.checkpoint_every=2")
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(w / "checkpoints")) == ["2", "4"]
  before = _snapshot(w)

  other = _train(w, "--config.train.steps=8", "--config.train.init_from=", config="configs/demo_shapes.py")
  assert other.returncode == 1, other.stderr[-3000:]
  assert "holds another run" in other.stderr and "model.side.width: workdir has 48, this run has 64" in other.stderr
  assert "--config.train.fresh=True" in other.stderr
  assert _snapshot(w) == before, "a refused run changed the workdir"

  for step in ("2", "4"):
    _damage_step(w / "checkpoints" / step)
  damaged = _snapshot(w)
  again = _train(w, "--config.train.steps=4", "--config.train.checkpoint_every=2")
  assert again.returncode == 1, again.stderr[-3000:]
  assert "could read none" in again.stderr
  assert "step 4: " in again.stderr and "step 2: " in again.stderr  # each step, and why
  assert "train.py: found checkpoints in" in again.stderr and "\nNothing was changed." in again.stderr
  assert again.stderr.rstrip().splitlines()[-1].startswith("Nothing was changed.")  # not buried in orbax's noise
  assert "OUT_OF_RANGE" in again.stderr  # the root cause (tensorstore's), not orbax's generic wrapper
  assert _snapshot(w) == damaged, "a run that could read no checkpoint changed the workdir"


def _small_state(scale=1.0):
  return {"w": jnp.arange(1000.0) * scale, "step": jnp.int32(0)}


def test_a_damaged_latest_step_is_set_aside_not_deleted_and_retention_keeps_the_rest(tmp_path, caplog):
  """Restoring falls back to step 2 past a damaged step 3; step 3 is moved to set_aside/ (neither retention
  nor the run's own save of step 3 can delete or overwrite it), and is never counted as restored."""
  ck = checkpoint.TrainCheckpoints(tmp_path / "checkpoints", keep=2)
  for s in (1, 2, 3):
    ck.save(s, _small_state(s), {"pos": s})
  ck.wait()
  assert ck.steps() == [2, 3]
  _damage_step(tmp_path / "checkpoints" / "3")
  damaged = _snapshot(tmp_path / "checkpoints" / "3")
  caplog.set_level(logging.INFO)
  restored = loop._restore_own(ck, _small_state(), tmp_path, fresh=False, is_main=True)
  state, data = restored
  assert data == {"pos": 2}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(1000.0) * 2)
  aside = list((tmp_path / workdir_lib.SET_ASIDE_DIR).iterdir())
  assert len(aside) == 1 and _snapshot(aside[0] / "checkpoints" / "3") == damaged
  assert ck.steps() == [2]
  assert any("unreadable checkpoint steps [3]" in r.getMessage() for r in caplog.records)
  for s in (3, 4):  # the resumed run saves again: retention (keep=2) drops step 2, nothing else
    ck.save(s, _small_state(s), {"pos": s})
  ck.wait()
  assert ck.steps() == [3, 4]
  assert _snapshot(aside[0] / "checkpoints" / "3") == damaged
  ck.close()


def test_no_readable_checkpoint_is_an_error_naming_each_step(tmp_path):
  ck = checkpoint.TrainCheckpoints(tmp_path / "checkpoints", keep=3)
  for s in (1, 2):
    ck.save(s, _small_state(s), {"pos": s})
  ck.wait()
  before = _snapshot(tmp_path)
  # another geometry: the arrays are not those of the target
  with pytest.raises(workdir_lib.WorkdirError, match=r"could read none:\n  step 2: .*\n  step 1: "):
    loop._restore_own(ck, {"v": jnp.zeros(3), "step": jnp.int32(0)}, tmp_path, fresh=False, is_main=True)
  assert _snapshot(tmp_path) == before
  ck.close()


def test_resume_from_that_cannot_be_read_is_an_error_not_a_fresh_start(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(workdir_lib.WorkdirError, match="resume_from=.*empty: holds no checkpoint steps"):
    loop._restore_other(str(tmp_path / "empty"), _small_state())
  ck = checkpoint.TrainCheckpoints(tmp_path / "other", keep=3)
  ck.save(5, _small_state(5), {"pos": 5})
  ck.close()
  with pytest.raises(workdir_lib.WorkdirError, match=r"no step could be read:\n  step 5: "):
    loop._restore_other(str(tmp_path / "other"), {"v": jnp.zeros(3)})
  state, data = loop._restore_other(str(tmp_path / "other"), _small_state())
  assert data == {"pos": 5} and sorted(os.listdir(tmp_path / "other")) == ["5"]


def test_a_transient_read_error_is_retried_not_a_fallback(tmp_path, monkeypatch):
  """An object store's hiccup on the newest step: retried (here it fails once), the newest step is
  restored, nothing is set aside."""
  ck = checkpoint.TrainCheckpoints(tmp_path / "checkpoints", keep=3)
  for s in (1, 2):
    ck.save(s, _small_state(s), {"pos": s})
  ck.wait()
  real, calls = ck.restore, []

  def flaky(step, target):
    calls.append(step)
    if len(calls) == 1:
      raise OSError(errno.EIO, "Input/output error (simulated transient read error)")
    return real(step, target)

  monkeypatch.setattr(ck, "restore", flaky)
  restored, step, failures = ck.restore_newest(_small_state(), retry_delay_s=0.01)
  assert step == 2 and failures == {} and calls == [2, 2]
  assert restored[1] == {"pos": 2}
  assert not (tmp_path / workdir_lib.SET_ASIDE_DIR).exists()
  ck.close()


def test_fresh_sets_another_run_aside_and_keeps_every_file(tmp_path):
  from configs import tiny
  old = json.loads(tiny.get_config().to_json_best_effort())
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "checkpoints" / "4" / "x").write_text("old state")
  (tmp_path / "config.json").write_text(json.dumps(old))
  (tmp_path / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
  before = _snapshot(tmp_path)
  new = json.loads(json.dumps(old))
  new["model"]["side"]["width"] = 64
  with pytest.raises(workdir_lib.WorkdirError, match="model.side.width: workdir has 48, this run has 64"):
    loop._check_workdir_run(tmp_path, new, fresh=False, is_main=True)
  assert _snapshot(tmp_path) == before
  loop._check_workdir_run(tmp_path, new, fresh=True, is_main=True)
  (aside,) = list((tmp_path / workdir_lib.SET_ASIDE_DIR).iterdir())
  assert _snapshot(aside) == before
  assert sorted(os.listdir(tmp_path)) == [workdir_lib.SET_ASIDE_DIR]
  loop._check_workdir_run(tmp_path, new, fresh=False, is_main=True)  # nothing left to differ from


def test_fresh_with_only_unreadable_checkpoints_sets_them_aside_with_the_metrics(tmp_path):
  ck = checkpoint.TrainCheckpoints(tmp_path / "checkpoints", keep=3)
  ck.save(2, _small_state(2), {"pos": 2})
  ck.wait()
  _damage_step(tmp_path / "checkpoints" / "2")
  (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
  before = _snapshot(tmp_path)
  assert loop._restore_own(ck, _small_state(), tmp_path, fresh=True, is_main=True) is None
  (aside,) = list((tmp_path / workdir_lib.SET_ASIDE_DIR).iterdir())
  assert _snapshot(aside) == before
  assert ck.steps() == []
  ck.close()


def test_identity_differences_name_model_trainable_and_data_keys_only():
  from configs import tiny
  a = json.loads(tiny.get_config().to_json_best_effort())
  b = json.loads(tiny.get_config().to_json_best_effort())
  b["train"]["steps"] = 999  # not identity: a run may be extended
  b["train"]["optimizer"]["lr"] = 0.5
  b["model"]["remat"] = "none"  # how the backward computes, not what it trains (absent from older configs)
  a["model"].pop("remat", None)
  assert workdir_lib.identity_differences(a, b) == []
  b["model"]["side"]["depth"] = 5
  b["train"]["trainable_patterns"] = ["^side_adapter_network\\."]
  b["data"]["train"] = "ade20k_150"
  diffs = workdir_lib.identity_differences(a, b)
  assert diffs == ["data.train: workdir has \"shapes\", this run has \"ade20k_150\"",
                   "model.side.depth: workdir has 3, this run has 5",
                   "train.trainable_patterns: workdir has " + json.dumps(a["train"]["trainable_patterns"]) +
                   ", this run has [\"^side_adapter_network\\\\.\"]"]


# ---- 2. workdir lock ------------------------------------------------------------------------------------
def _lock_file(workdir, host, pid):
  Path(workdir).mkdir(parents=True, exist_ok=True)
  (Path(workdir) / workdir_lib.LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid, "started": "earlier"}))


def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
  """The probe ran the same command twice at once: both wrote metrics.jsonl and one died inside orbax.
  Here the holder is a live process on this host; train.py refuses before writing anything."""
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    _lock_file(tmp_path, socket.gethostname(), holder.pid)
    lock_before = (tmp_path / "lock").read_text()
    out = _train(tmp_path, "--config.train.steps=2")
    assert out.returncode == 1, out.stderr[-3000:]
    assert "is locked by another run" in out.stderr and f"pid {holder.pid}" in out.stderr
    assert sorted(os.listdir(tmp_path)) == ["lock"] and (tmp_path / "lock").read_text() == lock_before
  finally:
    holder.kill()
    holder.wait()


def test_lock_of_a_dead_process_on_this_host_is_reported_and_taken_over(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _lock_file(tmp_path, socket.gethostname(), dead.pid)
  caplog.set_level(logging.WARNING)
  lock = workdir_lib.WorkdirLock(tmp_path).acquire()
  held = json.loads((tmp_path / "lock").read_text())
  assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
  assert any("stale workdir lock" in r.getMessage() and f"pid {dead.pid}" in r.getMessage() for r in caplog.records)
  assert json.loads((tmp_path / "lock.stale").read_text())["pid"] == dead.pid  # kept for the record
  with pytest.raises(workdir_lib.WorkdirError, match="this host"):  # held: a second acquire is refused
    workdir_lib.WorkdirLock(tmp_path).acquire()
  lock.release()
  assert not (tmp_path / "lock").exists()


def test_lock_of_another_host_is_never_broken(tmp_path):
  _lock_file(tmp_path, "some-other-host-xyz", 1)
  before = (tmp_path / "lock").read_text()
  with pytest.raises(workdir_lib.WorkdirError, match="held by host some-other-host-xyz, pid 1.*never broken"):
    workdir_lib.WorkdirLock(tmp_path).acquire()
  assert (tmp_path / "lock").read_text() == before
  assert workdir_lib.WorkdirLock(tmp_path, enabled=False).acquire().held is False  # processes > 0 hold none


# ---- 3. the whole config validated before any file is written ------------------------------------------
def test_bad_config_is_one_error_listing_every_problem_before_the_workdir_exists(tmp_path):
  """The probe: on_nonfinite=sometimes behaved as "skip"; a batch not divisible by the data axis failed in
  jax after 20 s, after config.json was written; an unknown data.train advised building a set that the
  builder does not know. Two CPU devices, batch 3."""
  w = tmp_path / "never"
  out = _train(w, "--config.train.on_nonfinite=sometimes", "--config.train.batch_size=3",
               "--config.data.train=coco", "--config.train.compute_dtype=fp16",
               "--config.model.rec_downsample_method=median",
               env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert out.returncode == 1, out.stderr[-3000:]
  err = out.stderr
  assert "the config has 5 problems" in err
  assert "train.on_nonfinite='sometimes': expected one of 'stop', 'skip'" in err
  assert "train.compute_dtype='fp16'" in err
  assert "model.rec_downsample_method='median'" in err
  assert "data.train='coco': unknown data set; expected one of" in err and "coco_stuff_171" in err
  assert "train.batch_size=3 is not divisible by the data-parallel mesh size data x fsdp = 2 x 1 = 2" in err
  assert "Traceback" not in err
  assert not w.exists()


def test_validation_checks_mesh_data_sets_and_paths(tmp_path):
  from configs import tiny
  assert validate.train_config_problems(tiny.get_config(), device_count=1, process_count=1) == []
  cfg = tiny.get_config()
  cfg.mesh.shape.fsdp = 3
  cfg.mesh.shape.data = 1
  cfg.data.train = "ade20k_150"
  cfg.data.data_dir = str(tmp_path)  # exists, but nothing was built there
  cfg.train.init_from = str(tmp_path / "missing")
  cfg.train.keep_checkpoints = 0
  cfg.eval.evaluators = ["sem_seg", "panoptic"]
  problems = validate.train_config_problems(cfg, device_count=4, process_count=1)
  assert len(problems) == 5, problems
  assert "eval.evaluators[1]='panoptic': expected one of 'sem_seg'" in problems
  assert any("mesh.shape {'data': 1, 'fsdp': 3, 'model': 1} needs 3 devices, there are 4" in p for p in problems)
  assert any(p.startswith("data.train='ade20k_150': no built data set under") for p in problems)
  assert any(p.startswith("train.init_from=") and "no such directory" in p for p in problems)
  assert any(p.startswith("train.keep_checkpoints=0") for p in problems)
  cfg = tiny.get_config()
  cfg.mesh.shape.data = -1
  cfg.mesh.shape.fsdp = 2
  cfg.train.batch_size = 6  # 6 % (2 x 2) != 0 on 4 devices; 6 % 2 == 0 on the 2 hosts
  problems = validate.train_config_problems(cfg, device_count=4, process_count=2)
  assert problems == ["train.batch_size=6 is not divisible by the data-parallel mesh size data x fsdp = 2 x 2 = 4 "
                      "(mesh {'data': 2, 'fsdp': 2, 'model': 1}, 4 devices)"]
  # A model axis: the batch splits over data x fsdp = 2, but the deterministic step splits it over all 4 devices.
  cfg.mesh.shape.fsdp, cfg.mesh.shape.model = 1, 2
  problems = validate.train_config_problems(cfg, device_count=4, process_count=2)
  assert problems == ["train.batch_size=6 is not divisible by the 4 devices, which train.deterministic_reductions=True "
                      "splits it over (or set it False)"], problems
  cfg.train.deterministic_reductions = False
  assert validate.train_config_problems(cfg, device_count=4, process_count=2) == []
  del cfg.train["deterministic_reductions"]  # a config file that writes a string (ConfigDict types an override)
  cfg.train.deterministic_reductions = "yes"
  assert validate.train_config_problems(cfg, device_count=4, process_count=2) == [
      "train.deterministic_reductions='yes': expected True or False"]


def test_known_data_sets_are_exactly_the_builders():
  """validate.known_datasets (no TensorFlow import) lists the same names as the TFDS builders."""
  from san_jax.data import builders
  assert set(validate.known_datasets()) == set(builders.BUILDERS)


# ---- 4. a failed save stops training at once ------------------------------------------------------------
def _fail_json_writes(monkeypatch):
  """Every JSON item write raises ENOSPC (orbax's writer of the data position and config of a step), the
  way a full disk fails orbax's background commit."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

  async def full(self, x, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full)


def test_a_failed_save_is_one_line_naming_the_path_and_the_os_error(tmp_path, monkeypatch):
  ck = checkpoint.TrainCheckpoints(tmp_path, keep=3)
  ck.save(1, _small_state(1), {"pos": 1})
  ck.wait()
  before = _snapshot(tmp_path / "1")
  _fail_json_writes(monkeypatch)
  ck.save(2, _small_state(2), {"pos": 2})
  with pytest.raises(checkpoint.CheckpointSaveError) as info:
    for _ in range(200):  # poll() is what the loop calls every step; it raises once the write failed
      ck.poll()
      time.sleep(0.05)
    ck.wait()
  msg = str(info.value)
  assert "\n" not in msg
  assert f"could not save checkpoint step 2 to {tmp_path / '2'}: [Errno 28] No space left on device (ENOSPC)" in msg
  assert "intact: [1]" in msg
  assert sorted(os.listdir(tmp_path)) == ["1"]  # no *.orbax-checkpoint-tmp left behind
  assert _snapshot(tmp_path / "1") == before
  ck.wait()  # the failure was reported once; closing does not raise it again
  ck.close()
  monkeypatch.undo()
  restored = checkpoint.TrainCheckpoints(tmp_path).restore_latest(_small_state())
  assert restored[1] == {"pos": 1}


def test_tensorstore_disk_full_text_is_read_as_the_os_error():
  """tensorstore reports a full disk as text in a ValueError (measured on a 300 KiB tmpfs)."""
  err = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/x/": Failed to write '
                   "1261947 bytes to file 4: No space left on device [os_error_code='28']")
  assert checkpoint._os_error_of(err) == "[Errno 28] No space left on device (ENOSPC)"
  chained = RuntimeError("outer")
  chained.__cause__ = PermissionError(errno.EACCES, "Permission denied")
  assert checkpoint._os_error_of(chained) == "[Errno 13] Permission denied (EACCES)"


@pytest.mark.slow
def test_train_stops_at_the_failed_save_with_one_line(tmp_path):
  """train.py with every checkpoint write failing (ENOSPC) after the first save: exit 1 within a step of
  the failure, one line naming the step's path and the OS error, step 2 intact, no temporary directory."""
  w = tmp_path / "w"
  script = ("import errno, os, sys\n"
            "from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh\n"
            "orig = jh.JsonCheckpointHandler._save_fn\n"
            "async def save(self, x, directory):\n"
            "  if '/2.orbax' not in str(directory):\n"
            "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))\n"
            "  return await orig(self, x, directory)\n"
            "jh.JsonCheckpointHandler._save_fn = save\n"
            "sys.argv = ['train.py'] + sys.argv[1:]\n"
            "import runpy; runpy.run_path('train.py', run_name='__main__')\n")
  cmd = [sys.executable, "-c", script, "--workdir", str(w), *TINY, "--config.train.steps=10",
         "--config.train.checkpoint_every=2"]
  out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 1, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("train.py: could not save checkpoint step 4 to ") and \
      "[Errno 28] No space left on device (ENOSPC)" in last, last
  assert max(r["step"] for r in _rows(w)) <= 6  # stopped within a step or two of the save at step 4
  assert sorted(os.listdir(w / "checkpoints")) == ["2"]
  import orbax.checkpoint as ocp
  ck = checkpoint.TrainCheckpoints(w / "checkpoints")
  step2 = ck._manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                         data=ocp.args.JsonRestore()))
  assert int(np.asarray(step2["state"]["step"])) == 2  # readable, and the state of step 2
  ck.close()


# ---- 7. metrics one row per step after a resume, SIGTERM exit status ------------------------------------
def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path):
  rows = [{"step": s, "loss": float(s)} for s in range(1, 8)] + [{"step": 3, "eval/shapes/mIoU": 0.5}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')
  assert workdir_lib.truncate_metrics(tmp_path, 3) == 5  # steps 4-7 and the line cut by a kill
  assert _rows(tmp_path) == [r for r in rows if r["step"] <= 3]
  assert workdir_lib.truncate_metrics(tmp_path, 3) == 0


@pytest.mark.slow
def test_sigterm_saves_then_exits_143_and_the_resumed_run_has_one_row_per_step(tmp_path):
  """The probe: a SIGTERM exit returned 0, and after a resume metrics.jsonl had the steps between the
  checkpoint and the kill twice. Also the probe's "same command twice at once": the second is refused
  while the first holds the lock."""
  w = tmp_path / "w"
  args = ("--config.train.steps=500", "--config.train.checkpoint_every=1000")
  proc = _train(w, *args, wait=False)
  deadline = time.time() + 600
  while time.time() < deadline:
    if (w / "metrics.jsonl").exists() and len(_rows(w)) >= 2:
      break
    time.sleep(0.2)
  second = _train(w, *args)
  assert second.returncode == 1, second.stderr[-3000:]
  assert "is locked by another run" in second.stderr and f"pid {proc.pid}" in second.stderr
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == loop.PREEMPTED_EXIT_STATUS == 143, output[-3000:]
  assert "starting from scratch (step 0): no checkpoint in" in output
  saved = [int(s) for s in os.listdir(w / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and 2 <= saved[0] < 500, saved
  assert f"SIGTERM: saved step {saved[0]}" in output
  assert not (w / "lock").exists()
  assert [r["step"] for r in _rows(w)] == list(range(1, saved[0] + 1))  # the second run wrote nothing
  # what a kill -9 after a log line and before the next checkpoint leaves: rows past the saved step
  with open(w / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": saved[0] + 1, "loss": -1.0}) + "\n")
  end = saved[0] + 3
  resumed = _train(w, f"--config.train.steps={end}", "--config.train.checkpoint_every=1000")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {saved[0]}" in resumed.stderr
  steps_logged = [r["step"] for r in _rows(w)]
  assert steps_logged == list(range(1, end + 1)), steps_logged
  assert all(r["loss"] != -1.0 for r in _rows(w))


def test_a_url_workdir_is_refused_before_anything_is_written(tmp_path):
  """`--workdir gs://b/x` once made a local directory "gs:/b/x" and trained into it: now one line, nothing made."""
  res = _train("gs://bucket/run", "--config.train.steps=1")
  assert res.returncode == 1 and "train.py: --workdir=gs://bucket/run is a URL" in res.stderr, res.stderr[-2000:]
  assert not (REPO / "gs:").exists()


def test_config_json_is_never_seen_half_written(tmp_path):
  """Process 0 rewrites config.json at every start while the other processes read it (a CI run of the
  multi-process resume once read it empty): a reader racing 300 rewrites only ever sees a whole file."""
  import threading
  big = {"model": {f"key_{i}": list(range(50)) for i in range(200)}}  # ~100 KB: many write() calls
  workdir_lib.write_config(tmp_path, big)
  seen, stop = [], threading.Event()

  def reader():
    while not stop.is_set():
      try:
        seen.append(workdir_lib.read_config(tmp_path) == big)
      except workdir_lib.WorkdirError:
        seen.append(False)

  t = threading.Thread(target=reader)
  t.start()
  try:
    for _ in range(300):
      workdir_lib.write_config(tmp_path, big)
  finally:
    stop.set()
    t.join()
  assert seen and all(seen), f"{seen.count(False)} of {len(seen)} reads saw a partial config.json"
  assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lib.CONFIG_NAME]  # no temporary left

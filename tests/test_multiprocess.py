"""Multi-process training and evaluation, rehearsed on one machine (`python -m san_jax.launch`).

The reference is one process with 8 fake CPU devices (plain `train.py`, no launcher, no jax.distributed).
Every other run is the same 8-device mesh split over 2 or 4 processes (gloo CPU collectives over
loopback). One chain of runs in one work directory covers several items at once:

  A  4 processes x 2 devices, steps 1-4 (checkpoint at 4), mesh data=4, fsdp=2
  B  2 x 4 resumes from A's checkpoint (elastic 4 -> 2); process 1 is killed with SIGKILL after step 6
  C  the same launch command as B resumes from the last complete checkpoint, runs to step 12
  D  1 x 8 resumes from C (elastic 2 -> 1) and runs to step 16

and the losses of steps 1..16 in the chain's metrics.jsonl must be the reference's within 1e-5 relative.
Tolerance: the runs differ only in the order of floating-point reductions (gloo's cross-process sums,
the fsdp layout of A); measured here the relative differences are below 1e-6 (see the issue 11 note), and
a different batch, augmentation draw or matching would move the loss by 1e-2 or more.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5

TRAIN = ["train.py", "--config", "configs/tiny.py", "--config.train.batch_size=8", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.checkpoint_every=4", "--config.train.keep_checkpoints=10",
         "--config.data.num_examples=48", "--config.distributed.heartbeat_timeout_s=10",
         "--config.distributed.shutdown_timeout_s=10"]


def env(devices: int = 8) -> dict:
  e = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
           PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    e.pop(k, None)
  return e


def launch_argv(n: int, args, devices: int = 8):
  return [sys.executable, "-m", "san_jax.launch", "--processes", str(n), "--devices", str(devices),
          "--grace_s", "5", "--", *args]


def run(argv, timeout: float = 600, devices: int = 8) -> subprocess.CompletedProcess:
  return subprocess.run(argv, cwd=REPO, env=env(devices), capture_output=True, text=True, timeout=timeout)


def losses(workdir: Path) -> dict:
  """{step: loss} from metrics.jsonl (a step logged twice, before and after a crash, must agree: kept as a
  list)."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "loss" in row:
      out.setdefault(row["step"], []).append(row["loss"])
  return out


def assert_same_losses(got: dict, want: dict, steps):
  for s in steps:
    assert s in got, f"step {s} missing from {sorted(got)}"
    for value in got[s]:
      rel = abs(value - want[s][0]) / abs(want[s][0])
      assert rel <= RTOL, (s, value, want[s][0], rel)


# ---- fast: the launcher itself, and setups that must fail in one line --------------------------------------
CHILD = """
import sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
pid = int(args["process_id"])
print(f"hello from {pid} of {args['num_processes']} at {args['coordinator_address']}", flush=True)
if pid == 1:
  sys.exit(3)
time.sleep(120)
"""


def test_launcher_prefixes_lines_stops_the_others_and_returns_the_failure(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  t0 = time.perf_counter()
  res = run(launch_argv(3, [str(script)], devices=6), timeout=60)
  elapsed = time.perf_counter() - t0
  assert res.returncode == 3, res.stdout + res.stderr  # not the SIGTERM status of the processes it stopped
  for i in range(3):
    assert re.search(rf"^\[{i}\] hello from {i} of 3 at 127\.0\.0\.1:\d+$", res.stdout, re.M), res.stdout
  assert "[launch] process 1 exited with status 3" in res.stdout
  assert elapsed < 30, elapsed  # the sleeping processes were stopped, not waited for


def test_launcher_refuses_devices_that_do_not_split():
  res = run(launch_argv(3, ["train.py"], devices=8), timeout=60)
  assert res.returncode == 2 and "--devices=8 is not divisible by --processes=3" in res.stderr


def _one_line_error(res, needle):
  assert res.returncode != 0
  lines = [l for l in res.stderr.splitlines() if needle in l]
  assert lines, res.stderr[-3000:]
  assert "Traceback" not in res.stderr, res.stderr[-3000:]


@pytest.mark.slow
def test_setups_that_cannot_work_fail_in_one_line(tmp_path):
  # Half the distributed flags, on a machine with no cluster to detect.
  res = run([sys.executable, *TRAIN, "--workdir", str(tmp_path / "a"), "--num_processes=2"], timeout=300)
  _one_line_error(res, "train.py: multi-process launch needs all of --coordinator_address")
  # A mesh the devices do not fit (8 devices, data=3).
  res = run([sys.executable, *TRAIN, "--workdir", str(tmp_path / "b"), "--config.mesh.shape.data=3"], timeout=300)
  _one_line_error(res, "train.py: mesh {")
  # Two processes launched by hand with different configs: both stop, naming the odd one out.
  port = __import__("san_jax.launch", fromlist=["free_port"]).free_port()
  procs = [subprocess.Popen([sys.executable, *TRAIN, "--workdir", str(tmp_path / "c"), f"--config.train.seed={i}",
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode != 0
    assert "train.py: processes [1] were given a different config than process 0" in err, err[-3000:]
  assert not (tmp_path / "c" / "config.json").exists()  # nothing written before the check


# ---- slow: one chain of runs for trajectory, elastic resume, faults and evaluation --------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process, 8 devices, 16 steps: the trajectory every other layout must reproduce."""
  wd = tmp_path_factory.mktemp("ref") / "run"
  res = run([sys.executable, *TRAIN, "--workdir", str(wd), "--config.train.steps=16"])
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
  # Item 7: each host solves its own images; nothing is gathered to one device for the host callback.
  assert "Involuntary full rematerialization" not in res.stderr
  return wd, losses(wd)


def _children(pid: int):
  path = Path(f"/proc/{pid}/task/{pid}/children")
  return [int(c) for c in path.read_text().split()] if path.exists() else []


def _process_id_of(pid: int):
  try:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
  except FileNotFoundError:
    return None
  for a in argv:
    if a.startswith(b"--process_id="):
      return int(a.split(b"=")[1])
  return None


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  wd = tmp_path_factory.mktemp("chain") / "run"
  logs = {}
  # A: 4 x 2, fsdp=2, steps 1-4.
  res = run(launch_argv(4, [*TRAIN, "--workdir", str(wd), "--config.train.steps=4", "--config.mesh.shape.fsdp=2"]))
  logs["A"] = res
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
  # B: 2 x 4 to step 12; SIGKILL of process 1 once step 6 is logged.
  b_cmd = launch_argv(2, [*TRAIN, "--workdir", str(wd), "--config.train.steps=12"])
  launcher = subprocess.Popen(b_cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  killed_at = None
  try:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and launcher.poll() is None:
      if max(losses(wd)) >= 6:
        victim = [c for c in _children(launcher.pid) if _process_id_of(c) == 1]
        if victim:
          os.kill(victim[0], signal.SIGKILL)
          killed_at = time.monotonic()
          break
      time.sleep(0.2)
    out, _ = launcher.communicate(timeout=120)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  logs["B"] = (launcher.returncode, out, time.monotonic() - killed_at if killed_at else None)
  # C: the same command again.
  logs["C"] = run(b_cmd)
  # D: 1 x 8 to step 16.
  logs["D"] = run(launch_argv(1, [*TRAIN, "--workdir", str(wd), "--config.train.steps=16"]))
  return wd, logs


@pytest.mark.slow
def test_two_and_four_processes_follow_the_one_process_trajectory(reference, chain):
  _, want = reference
  wd, logs = chain
  for k in "CD":
    assert logs[k].returncode == 0, (k, logs[k].stdout[-4000:] + logs[k].stderr[-2000:])
  assert_same_losses(losses(wd), want, range(1, 17))


@pytest.mark.slow
def test_kill_9_of_one_process_stops_the_run_and_the_same_command_resumes(reference, chain):
  wd, logs = chain
  rc, out, after_kill_s = logs["B"]
  assert after_kill_s is not None, "the run finished before process 1 could be killed"
  assert rc == 128 + signal.SIGKILL, (rc, out[-3000:])  # the launcher reports the killed process's status
  assert after_kill_s < 60, after_kill_s  # bounded: the survivors were stopped, nobody hung
  # C resumed from a complete checkpoint (4 or 8; never a step process 1 did not finish writing).
  resumed = re.findall(r"resumed from step (\d+)", logs["C"].stdout + logs["C"].stderr)
  assert resumed and int(resumed[0]) in (4, 8), logs["C"].stdout[-3000:]
  assert re.findall(r"resumed from step (\d+)", logs["D"].stdout + logs["D"].stderr)[:1] == ["12"]


@pytest.fixture(scope="module")
def evaluations(chain, tmp_path_factory):
  wd, _ = chain
  out = tmp_path_factory.mktemp("eval")
  args = ["eval.py", "--workdir", str(wd), "--max_examples", "12"]
  one = run([sys.executable, *args, "--out", str(out / "one")])
  two = run(launch_argv(2, [*args, "--out", str(out / "two")]))
  return out, one, two


@pytest.mark.slow
def test_evaluation_on_two_processes_gives_the_one_process_numbers_written_once(evaluations):
  out, one, two = evaluations
  assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-2000:]
  assert sorted(p.name for p in (out / "two").iterdir()) == ["eval_shapes.json"]
  a, b = (json.loads((out / d / "eval_shapes.json").read_text()) for d in ("one", "two"))
  assert a["num_images"] == b["num_images"] == 12
  assert a["metrics"] == b["metrics"] and a["per_class"] == b["per_class"]
  assert two.stdout.count("results in") == 1  # one report, from process 0

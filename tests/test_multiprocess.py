"""Multi-process training and evaluation, rehearsed on one machine (`python -m san_jax.launch`).

The reference is one process with 8 fake CPU devices (plain `train.py`, no launcher, no jax.distributed),
16 steps. Every other run is the same 8-device mesh split over 1, 2 or 4 processes (gloo CPU collectives
over loopback) with the same command line (train.steps=16, so the learning-rate schedule is the
reference's); runs are cut short by SIGKILL, which is also the fault under test. One chain of runs in one
work directory covers several items at once:

  A  4 processes x 2 devices (mesh data=4, fsdp=2); process 1 is SIGKILLed once step 5 is logged
  B  2 x 4 resumes from A's last complete checkpoint (elastic 4 -> 2); process 1 SIGKILLed after step 9
  C  1 x 8 (through the launcher) resumes from B's (elastic 2 -> 1); SIGKILLed after step 13
  D  the same launch command as C resumes from C's last complete checkpoint and runs to step 16

and every loss term and gradient norm of steps 1..16 in the chain's metrics.jsonl (a step logged again
after a resume included) must be the reference's, bit for bit. The runs differ only in where the devices
sit (1, 2 or 4 processes, gloo between them) and in A's fsdp layout; the train step adds the devices'
losses and gradients in a fixed device order (`train.deterministic_reductions`, the default; ops/reduce.py),
so nothing depends on the layout. That includes the criterion's discontinuous parts (the top-k of uncertain
points, the Hungarian assignment): with XLA's all-reduces instead, the layouts' last-bit differences swapped
a near-tie of the top-k within 7 steps here and the runs parted by 1e-2 (issue 11 note). The issue asks for
1e-5 relative; measured here the difference is 0 for 20 steps on 1 x 8, 2 x 4, 4 x 2 and 4 x 2 with fsdp=2.
Evaluation (eval.py --workdir on the chain's last
checkpoint) on 2 processes must give exactly the 1-process numbers, written once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# jax.distributed's liveness timeouts for these runs. The heartbeat is the project's default (configs/common.py):
# with 10 s, a CI run on a loaded 2-core machine saw process 0 abort ("tasks unhealthy (stopped sending
# heartbeats): 1") while process 1 was alive and compiling, before any kill. The shutdown wait is cut so that
# a survivor of a kill exits within about HEARTBEAT_S + SHUTDOWN_S.
HEARTBEAT_S, SHUTDOWN_S = 100, 10
TRAIN = ["train.py", "--config", "configs/tiny.py", "--config.train.batch_size=8", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.checkpoint_every=4", "--config.train.keep_checkpoints=10",
         "--config.data.num_examples=48", f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}",
         f"--config.distributed.shutdown_timeout_s={SHUTDOWN_S}"]


def env(devices: int = 8, xla_flags: str = "") -> dict:
  e = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {xla_flags}".strip(),
           JAX_PLATFORMS="cpu",
           PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    e.pop(k, None)
  return e


def launch_argv(n: int, args, devices: int = 8):
  return [sys.executable, "-m", "san_jax.launch", "--processes", str(n), "--devices", str(devices),
          "--grace_s", "5", "--", *args]


def run(argv, timeout: float = 600, devices: int = 8, xla_flags: str = "") -> subprocess.CompletedProcess:
  return subprocess.run(argv, cwd=REPO, env=env(devices, xla_flags), capture_output=True, text=True,
                        timeout=timeout)


def losses(workdir: Path, keys=("loss",)) -> dict:
  """{step: [value of keys, ...]} from metrics.jsonl (a step logged twice, before and after a crash, is
  kept twice: both must agree)."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "loss" in row:
      out.setdefault(row["step"], []).append(row["loss"] if keys == ("loss",) else [row[k] for k in keys])
  return out


def step_terms(workdir: Path) -> dict:
  """Every loss term and the gradient norm per step."""
  first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
  return losses(workdir, tuple(sorted(k for k in first if k.startswith("loss")) + ["grad_norm"]))


def assert_same_steps(got: dict, want: dict, steps):
  for s in steps:
    assert s in got, f"step {s} missing from {sorted(got)}"
    for value in got[s]:
      assert value == want[s][0], (s, value, want[s][0])


# ---- fast: the launcher itself, and setups that must fail in one line --------------------------------------
CHILD = """
import sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
pid = int(args["process_id"])
print(f"hello from {pid} of {args['num_processes']} at {args['coordinator_address']}", flush=True)
if pid == 1:
  time.sleep(3)  # let the others print first (they start at their own pace)
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


CACHE_CHILD = """
import sys
import jax
from san_jax.train import sharding
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
n = int(args.get("num_processes", 1))
if n > 1:
  sharding.initialize_distributed(args["coordinator_address"], n, int(args["process_id"]))
print(f"processes {jax.process_count()} cache {jax.config.jax_enable_compilation_cache}", flush=True)
"""


def test_multi_process_cpu_runs_turn_the_persistent_compilation_cache_off(tmp_path):
  """On CPUs JAX keys one program differently in each process and writes entries from process 0 only, so a
  rerun with a cache gave process 0 its step from the cache while process 1 compiled, and gloo's 30 s wait for
  the first collective killed the run (measured: 2 x 4 devices, configs/tiny.py, one JAX_COMPILATION_CACHE_DIR,
  run twice). initialize_distributed turns the cache off for such runs, and says so; one process keeps it.
  (The end-to-end case is the heartbeat test below: the same 2 x 4 step as the chain's run B.)"""
  script = tmp_path / "child.py"
  script.write_text(CACHE_CHILD)
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
  two = subprocess.run(launch_argv(2, [str(script)], devices=4), cwd=REPO, env={**env(4), **cache},
                       capture_output=True, text=True, timeout=120)
  assert two.returncode == 0, two.stdout + two.stderr
  for i in range(2):
    assert f"[{i}] processes 2 cache False" in two.stdout, two.stdout
  assert two.stdout.count("persistent compilation cache") == 2, two.stdout  # one line per process
  one = subprocess.run([sys.executable, str(script)], cwd=REPO, env={**env(4), **cache}, capture_output=True,
                       text=True, timeout=120)
  assert "processes 1 cache True" in one.stdout, one.stdout + one.stderr


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
  _one_line_error(res, "mesh.shape {'data': 3, 'fsdp': 1, 'model': 1} needs 3 devices, there are 8")
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
  """One process, 8 devices, 16 steps: the trajectory every other layout must reproduce. XLA dumps the
  compiled train step's HLO (for item 7's test) into run/../hlo."""
  wd = tmp_path_factory.mktemp("ref") / "run"
  dump = f"--xla_dump_to={wd.parent / 'hlo'} --xla_dump_hlo_module_re=.*step_fn.*"
  res = run([sys.executable, *TRAIN, "--workdir", str(wd), "--config.train.steps=16"], xla_flags=dump)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
  # Item 7: each host solves its own images; nothing is gathered to one device for the host callback.
  assert "Involuntary full rematerialization" not in res.stderr
  return wd, step_terms(wd)


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


def _committed(wd: Path, step: int) -> bool:
  """Whether checkpoint `step` is complete: orbax writes STEP.orbax-checkpoint-tmp and renames it to STEP
  only when every process has written its part."""
  return (wd / "checkpoints" / str(step)).is_dir()


def _launch_and_kill(n: int, wd: Path, kill_after_step, extra=(), after_checkpoint=None):
  """Launches `n` processes on the chain's command; once `kill_after_step` is logged and checkpoint
  `after_checkpoint` is committed, SIGKILLs the process with --process_id=1 (0 when alone). Returns (status,
  output, seconds from the kill to the launcher's exit, or None when nothing was killed).

  Why wait for the commit: the save of a step finishes in the background after the step is logged, so on a
  loaded machine a kill right after step 5 was logged once came before step 4's commit; the next run then
  found no complete checkpoint and rightly started from scratch (same losses, no "resumed from step" line),
  which the chain's resume assertions read as a failure."""
  cmd = launch_argv(n, [*TRAIN, "--workdir", str(wd), "--config.train.steps=16", *extra])
  launcher = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  chunks = []
  reader = threading.Thread(target=lambda: chunks.append(launcher.stdout.read()), daemon=True)
  reader.start()
  killed_at = None
  try:
    deadline = time.monotonic() + 900
    while kill_after_step and time.monotonic() < deadline and launcher.poll() is None:
      logged = losses(wd) if (wd / "metrics.jsonl").exists() else {}
      if logged and max(logged) >= kill_after_step and (after_checkpoint is None or _committed(wd, after_checkpoint)):
        victim = [c for c in _children(launcher.pid) if _process_id_of(c) == min(1, n - 1)]
        if victim:
          os.kill(victim[0], signal.SIGKILL)
          killed_at = time.monotonic()
          break
      time.sleep(0.2)
    launcher.wait(timeout=900)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  reader.join(timeout=30)
  return launcher.returncode, "".join(chunks), (time.monotonic() - killed_at if killed_at else None)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  wd = tmp_path_factory.mktemp("chain") / "run"
  periodic = ["--config.train.eval_every=8", "--config.eval.max_examples=8"]  # B evaluates step 8 on 2 processes
  logs = {"A": _launch_and_kill(4, wd, 5, ["--config.mesh.shape.fsdp=2", *periodic], after_checkpoint=4),
          "B": _launch_and_kill(2, wd, 9, periodic, after_checkpoint=8),
          "C": _launch_and_kill(1, wd, 13, periodic, after_checkpoint=12),
          "D": _launch_and_kill(1, wd, None, periodic)}
  return wd, logs


@pytest.mark.slow
def test_two_and_four_processes_follow_the_one_process_trajectory(reference, chain):
  _, want = reference
  wd, logs = chain
  rc, out, _ = logs["D"]
  assert rc == 0, out[-5000:]
  assert_same_steps(step_terms(wd), want, range(1, 17))


@pytest.mark.slow
def test_kill_9_of_one_process_stops_the_run_and_the_same_command_resumes(chain):
  wd, logs = chain
  for k in "ABC":
    rc, out, after_kill_s = logs[k]
    assert after_kill_s is not None, f"run {k} ended before it could be killed: {out[-3000:]}"
    assert rc == 128 + signal.SIGKILL, (k, rc, out[-3000:])  # the killed process's status, not the stops'
    assert after_kill_s < 60, (k, after_kill_s)  # bounded: the survivors were stopped, nobody hung
  # Each run resumed from a complete checkpoint of the one before (orbax commits a step only when every
  # process has written its part; a step cut off by the kill is not there to be restored).
  for k, (lo, hi) in {"B": (4, 4), "C": (4, 8), "D": (8, 12)}.items():
    found = re.findall(r"resumed from step (\d+)", logs[k][1])
    assert found and lo <= int(found[0]) <= hi, (k, found, logs[k][1][-3000:])
  steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 16, steps


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1])  # victim 0 (the coordination service's host) measured too: see issue 11
def test_kill_9_without_the_launcher_the_survivor_exits_within_the_heartbeat_bound(tmp_path, victim):
  """A pod as a scheduler starts it: one train.py per host, no launcher to stop the others. After a SIGKILL
  of one process (1, or 0, which hosts JAX's coordination service), the other must exit by itself, with a
  failure status, within distributed.heartbeat_timeout_s + shutdown_timeout_s (HEARTBEAT_S + SHUTDOWN_S) plus
  a margin for this loaded machine, instead of hanging in its next collective."""
  wd = tmp_path / "run"
  port = __import__("san_jax.launch", fromlist=["free_port"]).free_port()
  # steps=16: the chain's run B compiled this very step (2 processes x 4 devices) earlier in the module; before
  # multi-process CPU runs turned the persistent cache off, process 0 loaded it from there and its first
  # collective timed out while process 1 compiled (test_multi_process_cpu_runs_turn_the_...).
  procs = [subprocess.Popen([sys.executable, *TRAIN, "--workdir", str(wd), "--config.train.steps=16",
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
      if (wd / "metrics.jsonl").exists() and max(losses(wd), default=0) >= 2:
        break
      time.sleep(0.2)
    if not all(p.poll() is None for p in procs):  # one died before the kill: show why
      raise AssertionError([(p.poll(), p.stderr.read()[-3000:] if p.poll() is not None else "") for p in procs])
    procs[victim].kill()
    killed_at = time.monotonic()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=300)
    after_kill_s = time.monotonic() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert survivor.returncode != 0, err[-3000:]
  assert after_kill_s < HEARTBEAT_S + SHUTDOWN_S + 40, (after_kill_s, err[-3000:])


@pytest.fixture(scope="module")
def evaluations(chain, tmp_path_factory):
  wd, _ = chain
  out = tmp_path_factory.mktemp("eval")
  args = ["eval.py", "--workdir", str(wd), "--max_examples", "12"]
  one = run([sys.executable, *args, "--out", str(out / "one")])
  two = run(launch_argv(2, [*args, "--out", str(out / "two")]))
  step8 = run([sys.executable, "eval.py", "--workdir", str(wd), "--step", "8", "--max_examples", "8",
               "--out", str(out / "step8")])
  return out, one, two, step8


@pytest.mark.slow
def test_evaluation_on_two_processes_gives_the_one_process_numbers_written_once(evaluations, chain):
  out, one, two, _ = evaluations
  assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
  assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-2000:]
  assert sorted(p.name for p in (out / "two").iterdir()) == ["eval_shapes.json"]
  a, b = (json.loads((out / d / "eval_shapes.json").read_text()) for d in ("one", "two"))
  assert a["num_images"] == b["num_images"] == 12
  assert a["metrics"] == b["metrics"] and a["per_class"] == b["per_class"]
  assert two.stdout.count("results in") == 1  # one report, from process 0
  # The hosts' slices together are the 12 images, none twice: the ground-truth pixels per class are those of
  # the split's first 12 labels, counted here from the data source itself (a 16-step model's predictions
  # are nearly all wrong, so the metrics alone, mostly 0, would not show a missing or doubled image).
  from san_jax.data import shapes
  cfg = json.loads((chain[0] / "config.json").read_text())["data"]
  source = shapes.ShapesSource(64, seed=0, split="val", spec=shapes.spec_from_config(
      {"shapes_image_size": cfg["shapes_image_size"]}, all_classes=True))
  names = shapes.class_names()
  counts = sum(np.bincount(np.asarray(source[i]["label"]).ravel(), minlength=256)[:len(names)] for i in range(12))
  assert b["per_class"]["gt_pixels"] == dict(zip(names, counts.tolist()))
  assert sum(b["per_class"]["pred_pixels"].values()) > 0


@pytest.mark.slow
def test_periodic_evaluation_on_two_processes_is_eval_py_on_one(chain, evaluations):
  """Run B (2 processes) evaluated step 8 inside the training loop: the same numbers as eval.py on one process
  with that step's checkpoint (the same parameters, so exactly the same pixels), written once by process 0."""
  wd, logs = chain
  out, _, _, step8 = evaluations
  assert step8.returncode == 0, step8.stdout[-2000:] + step8.stderr[-3000:]
  # C resumed from B's step 8, so nothing after B evaluated step 8 again (on one process).
  assert re.findall(r"resumed from step (\d+)", logs["C"][1])[:1] == ["8"], logs["C"][1][-3000:]
  assert sorted(p.name for p in (wd / "eval" / "step_8").iterdir()) == ["eval_shapes.json"]
  loop_doc = json.loads((wd / "eval" / "step_8" / "eval_shapes.json").read_text())
  cli_doc = json.loads((out / "step8" / "eval_shapes.json").read_text())
  assert loop_doc["num_images"] == cli_doc["num_images"] == 8
  assert loop_doc["metrics"] == cli_doc["metrics"] and loop_doc["per_class"] == cli_doc["per_class"]
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if r["step"] == 8 and "eval/shapes/mIoU" in r]
  assert len(evals) == 1 and evals[0]["eval/shapes/mIoU"] == cli_doc["metrics"]["mIoU"], evals


# ---- item 7: matching (and the importance sampling's top-k) per shard, nothing gathered ---------------------
HLO_SCRIPT = r"""
import re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from san_jax.losses import matcher

# The assignment under shard_map is scipy's, on meshes that split the batch over one or two axes (and a third
# that the matcher adds).
rng = np.random.default_rng(0)
cost = rng.normal(size=(2, 32, 100, 16)).astype(np.float32)
nv = rng.integers(0, 17, size=32).astype(np.int32)
want = matcher._assign_on_host(cost, np.broadcast_to(nv, (2, 32)))
for shape in [(8, 1, 1), (4, 2, 1), (2, 2, 2)]:
  mesh = jax.make_mesh(shape, ("data", "fsdp", "model"))
  with jax.set_mesh(mesh):
    f = jax.jit(jax.vmap(lambda c, n: tuple(matcher.assign(c, n, ("data", "fsdp"))[k] for k in ("pred_idx", "tgt_idx")),
                         in_axes=(0, None)))
    c = jax.device_put(cost, NamedSharding(mesh, P(None, ("data", "fsdp"))))
    n = jax.device_put(nv, NamedSharding(mesh, P(("data", "fsdp"))))
    got = f(c, n)
    assert all(np.array_equal(np.asarray(g), w) for g, w in zip(got, want)), shape
    # No cost matrix moves between devices; only the int32 assignments are gathered, along an axis that
    # is not a batch axis (model, in the last mesh), where the matcher splits the images further.
    moved = re.findall(r"= (\w+)\[[^\n]*? (?:all-gather|all-to-all|collective-permute)(?:-start)?\(",
                       f.lower(c, n).compile().as_text())
    assert set(moved) <= ({"s32"} if shape[2] > 1 else set()), (shape, moved)

# The importance sampling's top-k per shard too. (HLO_SCRIPT is the global program's criterion,
# train.deterministic_reductions=False; the deterministic step runs both inside its own shard_map, per device.)
from san_jax.ops import sampling
u = rng.normal(size=(32, 5, 300)).astype(np.float32)
for shape in [(8, 1, 1), (4, 2, 1)]:
  mesh = jax.make_mesh(shape, ("data", "fsdp", "model"))
  with jax.set_mesh(mesh):
    g = jax.jit(lambda v: sampling._top_k_indices(v, 64, ("data", "fsdp")))
    x = jax.device_put(u, NamedSharding(mesh, P(("data", "fsdp"))))
    assert np.array_equal(np.asarray(g(x)), np.argsort(-u, axis=-1, kind="stable")[..., :64]), shape
    assert not re.search(r"all-gather|all-to-all|collective-permute", g.lower(x).compile().as_text()), shape

print("OK")
"""


def test_matching_per_shard_is_scipys_and_gathers_nothing():
  res = run([sys.executable, "-c", HLO_SCRIPT], timeout=900)  # ~5 s alone; a bound against a hang, not a speed test
  assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
  assert "Involuntary full rematerialization" not in res.stderr


COLLECTIVE = re.compile(r"= (\S[^\n]*?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(")


@pytest.mark.slow
def test_compiled_train_step_moves_no_cost_matrix_and_adds_in_device_order(reference):
  """The reference run's compiled step (8 devices, data=8, the deterministic step): each device matches
  its own images on its own host; nothing is gathered for the assignment (no collective carries an array of
  rank 3 or more: cost matrices are [B, Q, T], masks [B, Q, h, w]); floats move only by all-gather and
  all-to-all (the ordered sums of the loss shares and gradients); the only all-reduces are of integers (the
  target count, exact in any order)."""
  wd, _ = reference
  dumps = sorted((wd.parent / "hlo").glob("*jit_step_fn*after_optimizations.txt"))
  assert dumps, sorted(p.name for p in (wd.parent / "hlo").iterdir())[:20]
  hlo = dumps[-1].read_text()
  found = COLLECTIVE.findall(hlo)
  kinds = {op for _, op in found}
  assert kinds == {"all-gather", "all-to-all", "all-reduce"}, sorted(kinds)
  for types, op in found:
    arrays = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", types)
    assert arrays, (op, types)
    for dtype, dims in arrays:
      assert len([d for d in dims.split(",") if d]) <= 2, (op, types)
      if op == "all-reduce":
        assert dtype.startswith(("s", "u")), (op, types)  # integers only
  from san_jax.ops import gemm
  # the assignment is in this module: the native custom call, or scipy's host callback without the library
  assert gemm._ASSIGNMENT_TARGET in hlo or (
    not gemm.assignment_availability()[0] and "callback" in hlo), gemm.assignment_availability()

"""A pod rehearsed on one machine: N local processes joined by `jax.distributed`.

  python -m san_jax.launch --processes 2 -- train.py --config configs/tiny.py --workdir runs/tiny2 \
      --config.train.batch_size=8 --config.mesh.shape.data=-1

starts N copies of the script (train.py, eval.py, or any entry point that takes the distributed flags
below) with `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i` (PORT: a free
loopback port), each seeing `--devices` / N fake CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count, JAX_PLATFORMS=cpu), so 1 x 8, 2 x 4 and 4 x 2 are the same
8-device mesh split over 1, 2 or 4 hosts. Every line a process prints comes out prefixed with `[i] `.
When one process fails (non-zero exit or a signal), the others get SIGTERM and, `--grace_s` later,
SIGKILL; the launcher exits with the worst status of the processes that ended on their own (a signal
counts as 128 + its number), so a failure is never hidden behind the stops it caused. Ctrl-C / SIGTERM
to the launcher is passed on to every process.

The same flags run a real pod: on every host the same command with that host's `--process_id` and
process 0's address (Cloud TPU pods and SLURM need none of them: JAX detects the cluster).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, List, Optional, Sequence

from absl import flags

from san_jax import cli

DEFAULT_DEVICES = 8


def add_distributed_flags(fv: flags.FlagValues) -> None:
  """Defines --coordinator_address, --num_processes, --process_id on the absl FlagValues `fv`, as flags of
  the calling tool (its --help lists them). Default: JAX's cluster auto-detection, else 1 process."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator for a multi-process run "
                      "(default: detected on Cloud TPU / SLURM / Open MPI / Kubernetes, else one process)",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run (default: detected, "
                       "else 1)", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes) (default: detected, "
                       "else 0)", flag_values=fv)
  for name in ("coordinator_address", "num_processes", "process_id"):
    fv.register_key_flag_for_module(_caller_module(), fv[name])


def _caller_module() -> str:
  """The module name absl files a flag under for the code two frames up (`sys.argv[0]` for `__main__`)."""
  name = sys._getframe(2).f_globals.get("__name__")  # pylint: disable=protected-access
  return sys.argv[0] if name == "__main__" else name


def initialize_from_flags(f: flags.FlagValues, config=None) -> bool:
  """`sharding.initialize_distributed` with the flags of `add_distributed_flags` (read from the parsed
  FlagValues `f`) and the timeouts of the config's `distributed` section (when it has one)."""
  from san_jax.train import sharding  # pylint: disable=g-import-not-at-top
  timeouts = None
  if config is not None and "distributed" in config:
    timeouts = dict(config["distributed"])
  return sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id, timeouts=timeouts)


def free_port() -> int:
  """A TCP port nobody listens on at this moment (the kernel's choice on loopback)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _exit_status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def _pump(stream: IO[bytes], prefix: bytes, out, lock: threading.Lock) -> None:
  for line in iter(stream.readline, b""):
    with lock:
      out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
      out.flush()
  stream.close()


def child_env(devices_per_process: int, base: Optional[dict] = None) -> dict:
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)  # the flags say it; a stale variable must not disagree with them
  return env


def launch(command: Sequence[str], processes: int, devices: int = DEFAULT_DEVICES, port: Optional[int] = None,
           grace_s: float = 10.0, python: str = sys.executable, out=None) -> int:
  """Runs `python COMMAND... --coordinator_address ... --process_id i` for i < processes; returns the
  worst exit status (see the module docstring)."""
  if processes < 1:
    raise ValueError(f"--processes must be >= 1, got {processes}")
  if devices % processes:
    raise ValueError(f"--devices={devices} is not divisible by --processes={processes}")
  if not command:
    raise ValueError("no command: python -m san_jax.launch --processes N -- train.py ARGS...")
  out = sys.stdout.buffer if out is None else out
  address = f"127.0.0.1:{port or free_port()}"
  env = child_env(devices // processes)
  procs: List[subprocess.Popen] = []
  lock = threading.Lock()
  pumps = []
  for i in range(processes):
    argv = [python, *command, f"--coordinator_address={address}", f"--num_processes={processes}",
            f"--process_id={i}"]
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ".encode(), out, lock), daemon=True)
    t.start()
    pumps.append(t)

  stopped = set()  # processes the launcher stopped: their status is not theirs

  def stop_all(sig: int) -> None:
    for j, p in enumerate(procs):
      if p.poll() is None:
        stopped.add(j)
        try:
          os.killpg(p.pid, sig)
        except ProcessLookupError:
          pass

  previous = {s: signal.signal(s, lambda signum, _: stop_all(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
  kill_at = None
  try:
    while [p.poll() for p in procs].count(None):  # poll every process (any() would stop at the first)
      failed = [j for j, p in enumerate(procs) if p.returncode not in (None, 0) and j not in stopped]
      if failed and kill_at is None:
        with lock:
          out.write(f"[launch] process {failed[0]} exited with status {_exit_status(procs[failed[0]].returncode)}: "
                    f"stopping the others\n".encode())
          out.flush()
        stop_all(signal.SIGTERM)
        kill_at = time.monotonic() + grace_s
      if kill_at is not None and time.monotonic() > kill_at:
        stop_all(signal.SIGKILL)
      time.sleep(0.1)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
  for t in pumps:
    t.join(timeout=5)
  own = [_exit_status(p.returncode) for j, p in enumerate(procs) if j not in stopped]
  return max(own) if own else max(_exit_status(p.returncode) for p in procs)


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_integer("processes", None, "number of local processes", lower_bound=1, flag_values=fv)
  flags.mark_flag_as_required("processes", flag_values=fv)
  flags.DEFINE_integer("devices", DEFAULT_DEVICES, "fake CPU devices in total, split evenly over the processes",
                       flag_values=fv)
  flags.DEFINE_integer("port", None, "coordinator port on 127.0.0.1 (default: a free one)", flag_values=fv)
  flags.DEFINE_float("grace_s", 10.0, "seconds between SIGTERM and SIGKILL of the others when one process fails",
                     flag_values=fv)


def _main(f: flags.FlagValues, command: List[str]) -> int:
  try:
    return launch(command, f.processes, f.devices, f.port, f.grace_s)
  except ValueError as err:
    print(f"san_jax.launch: {err}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m san_jax.launch --processes N [--devices 8] -- SCRIPT.py ARGS...`: absl stops reading flags at
  `--`; everything after it is the command."""
  return cli.run(_define_flags, _main, argv, prog="san_jax.launch", positional=None)


if __name__ == "__main__":
  main()

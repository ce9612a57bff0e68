"""A run's working directory kept safe: its lock, its identity (config.json), files set aside, metrics.

Nothing here deletes a file. What a run cannot use (checkpoints it cannot read, the files of a run it
replaces with `train.fresh=True`) is moved into WORKDIR/set_aside/<UTC time>/, and the log says where.

- `WorkdirLock`: WORKDIR/lock, created exclusively by the run's process 0 and holding its host, pid and
  start time; removed when the run ends. A second run on the same workdir refuses to start naming the
  holder. A lock left by a dead process on this host (kill -9, a crash) is reported and taken over; a lock
  from another host is never broken (its process cannot be checked from here): the error says to remove
  the file once that run is known to be dead.
- `identity_differences`: the keys that make two configs different runs (model geometry, trainable set,
  data set); a run whose identity differs from the workdir's config.json refuses to start.
- `truncate_metrics`: metrics.jsonl cut back to the rows of the restored step and before, so a resumed
  run has one row per step.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

log = logging.getLogger("san_jax.train")

LOCK_NAME = "lock"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SET_ASIDE_DIR = "set_aside"

# Config keys (dotted prefixes) that define what a run is: resuming with any of them changed would load
# state into another model or continue on other data. Everything else (steps, lr, logging, evaluation,
# mesh, ...) may change between a run's restarts.
IDENTITY_KEYS = ("model", "train.trainable_patterns", "data.train", "data.train_split", "data.num_examples",
                 "data.shapes_")
# Keys under IDENTITY_KEYS that say how a run computes, not what it trains: a resume may change them (trading
# memory for speed), and a config.json written before they existed lacks them.
EXECUTION_KEYS = ("model.remat",)


class WorkdirError(RuntimeError):
  """The workdir cannot be used by this run as asked (locked, another run's, unreadable checkpoints)."""


# ---- lock ---------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """WORKDIR/lock held from `acquire()` to `release()` (process 0 only; other processes hold nothing)."""

  def __init__(self, workdir: os.PathLike, enabled: bool = True):
    self.path = Path(workdir) / LOCK_NAME
    self.enabled = enabled
    self.held = False

  def _holder(self) -> Optional[Dict[str, Any]]:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable or half-written: treated as held by an unknown run

  def acquire(self) -> "WorkdirLock":
    if not self.enabled:
      return self
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(2):  # a second try after taking over a stale lock
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is None:
          continue  # released in between
        host, pid = holder.get("host"), holder.get("pid")
        if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
          log.warning("stale workdir lock %s: its run (host %s, pid %s, started %s) is no longer running; "
                      "taking it over", self.path, host, pid, holder.get("started", "?"))
          os.replace(self.path, self.path.with_name(f"{LOCK_NAME}.stale"))
          continue
        if host == me["host"]:
          why = f"pid {pid} on this host ({host}) is still running"
        elif host:
          why = (f"it is held by host {host}, pid {pid}, started {holder.get('started', '?')}; a lock of another "
                 f"host is never broken from here")
        else:
          why = "its contents are unreadable"
        raise WorkdirError(f"workdir {self.path.parent} is locked by another run ({self.path}: {why}). Use another "
                           f"--workdir, or remove {self.path} once that run is known to have ended.")
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise WorkdirError(f"could not take the workdir lock {self.path}")

  def release(self) -> None:
    if self.held:
      try:
        self.path.unlink()
      except FileNotFoundError:
        pass
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# ---- identity -----------------------------------------------------------------------------------------
def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def _identity(config: Mapping[str, Any]) -> Dict[str, Any]:
  flat = _flatten(config)
  return {k: v for k, v in flat.items() if k not in EXECUTION_KEYS and any(
      k == p or k.startswith(p if p.endswith("_") else p + ".") for p in IDENTITY_KEYS)}


def identity_differences(previous: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
  """The identity keys (IDENTITY_KEYS) that differ, one line each: "key: workdir has A, this run has B"."""
  a, b = _identity(previous), _identity(current)
  missing = object()
  lines = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, missing), b.get(k, missing)
    if va != vb:
      fa = "(absent)" if va is missing else json.dumps(va)
      fb = "(absent)" if vb is missing else json.dumps(vb)
      lines.append(f"{k}: workdir has {fa}, this run has {fb}")
  return lines


def read_config(workdir: os.PathLike) -> Optional[Dict[str, Any]]:
  """WORKDIR/config.json, None when absent; a damaged one is an error naming it (never overwritten)."""
  path = Path(workdir) / CONFIG_NAME
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as err:
    raise WorkdirError(f"{path} is unreadable ({type(err).__name__}: {err}); it describes the run in this workdir. "
                       "Fix or move it, or pass --config.train.fresh=True to set this workdir's run aside") from None


def write_config(workdir: os.PathLike, run_config: Dict[str, Any]) -> None:
  """Writes WORKDIR/config.json atomically (a temporary file, then os.replace): the other processes of a
  multi-host run read it while the main process rewrites it at every start, and a plain write let one of
  them read it half-written (a CI run: "config.json is unreadable (JSONDecodeError ...)" on a resume)."""
  write_atomic(Path(workdir) / CONFIG_NAME, json.dumps(run_config, indent=1))


def write_atomic(path: os.PathLike, text: str) -> None:
  """`path` holds either its old content or all of `text`, never a part (same-directory os.replace)."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


# ---- setting files aside ------------------------------------------------------------------------------
def set_aside(workdir: os.PathLike, paths: Iterable[os.PathLike], why: str) -> Optional[Path]:
  """Moves `paths` (inside workdir) into WORKDIR/set_aside/<UTC time>/, keeping their relative paths;
  returns that folder (None when nothing existed). Never deletes."""
  workdir = Path(workdir)
  paths = [Path(p) for p in paths if Path(p).exists()]
  if not paths:
    return None
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  dest = workdir / SET_ASIDE_DIR / stamp
  n = 1
  while dest.exists():
    n += 1
    dest = workdir / SET_ASIDE_DIR / f"{stamp}_{n}"
  for p in paths:
    target = dest / p.relative_to(workdir)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(p), str(target))
  log.warning("%s: moved %s to %s (nothing was deleted)", why, ", ".join(str(p.relative_to(workdir)) for p in paths),
              dest)
  return dest


# ---- metrics ------------------------------------------------------------------------------------------
def truncate_metrics(workdir: os.PathLike, step: int) -> int:
  """Drops the rows of metrics.jsonl after `step` (the restored step; 0 for a fresh run), which the run
  is about to log again; returns how many were dropped. A damaged last line (a kill during a write) is
  dropped too. The file is rewritten atomically (temporary file + rename)."""
  path = Path(workdir) / METRICS_NAME
  if not path.exists():
    return 0
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      keep = int(row["step"]) <= step
    except (ValueError, KeyError, TypeError):
      keep = False
    if keep:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    write_atomic(path, "".join(l + "\n" for l in kept))
    log.info("metrics.jsonl: dropped %d rows after step %d (they are logged again by this run)", dropped, step)
  return dropped

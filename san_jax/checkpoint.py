"""Checkpoints: the one module that talks to orbax.

Every checkpoint san-jax writes is an orbax composite checkpoint directory, written atomically (orbax
saves into a temporary directory and renames it on commit), holding named items. A parameters checkpoint
(`save_params`) holds two: `params`, the parameter tree, and `config`, a JSON dict describing the model
that owns them (a converted CLIP's CLIPConfig, for instance). The train-state checkpoints of a run
(`TrainCheckpoints`, an orbax CheckpointManager of steps) live here too.

Parameters are handled as flat dicts {path tuple: array}, the paths NNX uses (`("visual", "transformer",
"resblocks", 0, "attn", "q_proj", "kernel")`). On disk they are a nested dict keyed by strings (orbax's
natural tree); integer path components (list indices) are written as their decimal string and read back
as ints. NNX attribute names are identifiers, so a string component made only of digits cannot occur:
`save_params` refuses one rather than let it come back as an int.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

KeyPath = Tuple  # an NNX flat path: strings and ints
FlatParams = Dict[KeyPath, Any]

PARAMS_ITEM = "params"
CONFIG_ITEM = "config"


# ---- tree encoding ------------------------------------------------------------------------------------
def _is_index(part: str) -> bool:
  return part.isascii() and part.isdigit()


def _encode_key(part) -> str:
  if isinstance(part, (int, np.integer)) and not isinstance(part, bool):
    return str(int(part))
  if isinstance(part, str):
    if _is_index(part):
      raise ValueError(f"path component {part!r} is a digit string: it would be restored as an int")
    return part
  raise TypeError(f"path component {part!r} of type {type(part).__name__} is neither str nor int")


def _decode_key(part: str):
  return int(part) if _is_index(part) else part


def _leaf_value(x):
  """The array of a leaf: NNX Variables are unwrapped; jax/numpy arrays are kept (orbax writes both)."""
  if isinstance(x, nnx.Variable):
    x = x.get_value()
  return np.asarray(x) if isinstance(x, (int, float, bool, np.generic)) else x


def flatten(tree: Any) -> FlatParams:
  """{path tuple: array} from a flat dict, an `nnx.State`, or a nested dict (int or str keys)."""
  if isinstance(tree, nnx.State):
    tree = tree.to_pure_dict()
  if isinstance(tree, Mapping) and tree and all(isinstance(k, tuple) for k in tree):
    return {k: _leaf_value(v) for k, v in tree.items()}
  out: FlatParams = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, prefix + (k,))
    else:
      out[prefix] = _leaf_value(node)

  walk(tree, ())
  if () in out:
    raise ValueError("a parameter tree must be a mapping, got a single leaf")
  return out


def _nest(flat: Mapping[KeyPath, Any]) -> Dict[str, Any]:
  """Flat paths -> nested dict keyed by strings (the on-disk form). Not flax's traverse_util.unflatten_dict:
  it lets a subtree silently replace a leaf of the same path; here that is an error naming the path."""
  root: Dict[str, Any] = {}
  for path, value in flat.items():
    if not path:
      raise ValueError("empty parameter path")
    node = root
    for part in path[:-1]:
      node = node.setdefault(_encode_key(part), {})
      if not isinstance(node, dict):
        raise ValueError(f"path {path} runs through a leaf")
    last = _encode_key(path[-1])
    if last in node:
      raise ValueError(f"path {path} is both a leaf and a subtree, or given twice")
    node[last] = value
  return root


def _unnest(tree: Mapping[str, Any]) -> FlatParams:
  """The on-disk nested dict -> {path tuple: np.ndarray} (integer keys decoded)."""
  return {tuple(_decode_key(k) for k in path): np.asarray(v)
          for path, v in traverse_util.flatten_dict(dict(tree)).items()}


# ---- parameters checkpoints ---------------------------------------------------------------------------
def _checkpointer() -> ocp.Checkpointer:
  # Synchronous: a params checkpoint is written once (conversion, export); TrainCheckpoints saves the
  # train state asynchronously.
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_params(directory: str | os.PathLike, flat_or_state: Any, config: Optional[dict] = None, *,
                force: bool = False) -> str:
  """Writes parameters (flat dict, nnx.State or nested dict) and a JSON config to `directory`.

  The directory must not exist unless `force` (then it is replaced). Returns the absolute path.
  """
  directory = os.path.abspath(os.fspath(directory))
  tree = _nest(flatten(flat_or_state))
  if not tree:
    raise ValueError("no parameters to save")
  _checkpointer().save(directory, args=ocp.args.Composite(**{
      PARAMS_ITEM: ocp.args.StandardSave(tree),
      CONFIG_ITEM: ocp.args.JsonSave(dict(config or {}))}), force=force)
  return directory


def restore_params(directory: str | os.PathLike) -> Tuple[FlatParams, dict]:
  """Reads a `save_params` checkpoint: ({path tuple: np.ndarray}, config dict), on the host."""
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory at {directory}")
  restored = _checkpointer().restore(directory, args=ocp.args.Composite(**{
      PARAMS_ITEM: ocp.args.StandardRestore(),
      CONFIG_ITEM: ocp.args.JsonRestore()}))
  return _unnest(restored[PARAMS_ITEM]), dict(restored[CONFIG_ITEM] or {})


# ---- train-state checkpoints --------------------------------------------------------------------------
STATE_ITEM = "state"
DATA_ITEM = "data"
RUN_CONFIG_ITEM = "config"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step being written (renamed on commit)


class CheckpointSaveError(OSError):
  """A train-state checkpoint could not be written (disk full, permission, ...): one line naming the
  step's path and the OS error. The previous steps are intact and the partial step was removed."""


def _os_error_of(err: BaseException) -> str:
  """The OS error behind an orbax/tensorstore failure: "[Errno 28] No space left on device (ENOSPC)";
  tensorstore reports it as text (`... [os_error_code='28']`), Python writers as an OSError in the chain."""
  seen = set()
  node: Optional[BaseException] = err
  while node is not None and id(node) not in seen:
    seen.add(id(node))
    if isinstance(node, OSError) and node.errno:
      return f"[Errno {node.errno}] {os.strerror(node.errno)} ({errno.errorcode.get(node.errno, '?')})"
    found = re.search(r"os_error_code='?(\d+)", str(node))
    if found:
      code = int(found.group(1))
      return f"[Errno {code}] {os.strerror(code)} ({errno.errorcode.get(code, '?')})"
    node = node.__cause__ or node.__context__
  first = str(err).splitlines()[0] if str(err) else ""
  return f"{type(err).__name__}: {first[:300]}"


class TrainCheckpoints:
  """The checkpoints of one training run: an orbax CheckpointManager of steps under `directory`.

  Each step holds the train state (any pytree of arrays, NNX States included, sharded or not) and the
  data iterator's position (a JSON dict), saved together. Saving is asynchronous (the arrays are copied
  off the devices before `save` returns, so the caller may donate them to the next step) and atomic
  (orbax writes to a temporary directory and renames it when complete, so a run killed mid-save leaves
  the previous steps intact). The last `keep` steps are kept.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE_ITEM, DATA_ITEM, RUN_CONFIG_ITEM))
    self._pending: Optional[int] = None  # the step being saved in the background
    self._save_failed = False

  def steps(self):
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Optional[Mapping[str, Any]] = None,
           config: Optional[Mapping[str, Any]] = None, *, force: bool = True) -> bool:
    """Saves the state, the data position and the run's config (a JSON dict) together as `step`.

    The write goes on in the background; a failure (of this save or of the previous one, found when it
    is waited for) raises CheckpointSaveError, also from `poll()` and `wait()`.
    """
    self.wait()  # orbax waits for the previous save anyway; this surfaces its failure as ours
    self._pending = int(step)
    try:
      return self._manager.save(int(step), args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardSave(state),
          DATA_ITEM: ocp.args.JsonSave(dict(data_state or {})),
          RUN_CONFIG_ITEM: ocp.args.JsonSave(dict(config or {}))}), force=force)
    except Exception as err:  # a synchronous failure (creating the directory, writing metadata)
      self._failed(err)

  def _failed(self, err: BaseException):
    step, self._pending = self._pending, None
    self._save_failed = True
    path = os.path.join(self.directory, str(step))
    # orbax writes into STEP.orbax-checkpoint-tmp and renames it on commit: what is left is only ours. The
    # writers of the other items may still be running in orbax's threads after the first one failed (orbax
    # waits for the first failure only): they are joined first, so that nothing writes there any more.
    _join_orbax_threads(timeout_s=60.0)
    shutil.rmtree(path + TMP_SUFFIX, ignore_errors=True)
    kept = sorted(int(d) for d in os.listdir(self.directory) if d.isdigit()) if os.path.isdir(self.directory) else []
    raise CheckpointSaveError(f"could not save checkpoint step {step} to {path}: {_os_error_of(err)}; "
                              f"the steps already saved are intact: {kept}") from None

  def poll(self) -> None:
    """Raises CheckpointSaveError as soon as a background save has failed; returns at once otherwise
    (called every step, so a run stops within a step of a failed save, not at the next save)."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def config(self, step: int) -> dict:
    """The run config saved with `step`."""
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**{RUN_CONFIG_ITEM: ocp.args.JsonRestore()}))
    return dict(restored[RUN_CONFIG_ITEM] or {})

  def restore(self, step: int, target: Any) -> Tuple[Any, dict]:
    """Restores `step` into the structure, shapes, dtypes and shardings of `target` (concrete arrays or
    ShapeDtypeStructs)."""
    import jax

    abstract = jax.tree.map(_abstract_leaf, target)
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract), DATA_ITEM: ocp.args.JsonRestore()}))
    return restored[STATE_ITEM], dict(restored[DATA_ITEM] or {})

  def restore_newest(self, target: Any, attempts: int = 3, retry_delay_s: float = 1.0
                     ) -> Tuple[Optional[Tuple[Any, dict]], Optional[int], Dict[int, str]]:
    """(restored, its step, {newer unreadable step: why}); (None, None, {step: why}) when no step reads.

    Each step is tried `attempts` times, `retry_delay_s` apart (doubling), before it counts as unreadable,
    so a transient read error (an object store's hiccup) does not make a run fall back or stop. Every
    failure is logged as a warning naming the step and the error's first line.
    """
    failures: Dict[int, str] = {}
    for step in reversed(self.steps()):
      delay = retry_delay_s
      for attempt in range(attempts):
        try:
          return self.restore(step, target), step, failures
        except Exception as err:  # orbax raises many types for damaged files
          _quiet_failed_orbax_reads()
          why = _read_error_of(err)
          if attempt + 1 < attempts:
            time.sleep(delay)
            delay *= 2
      failures[step] = why
      logging.getLogger("san_jax.checkpoint").warning(
          "checkpoint step %d in %s is unreadable after %d attempts (%s)", step, self.directory, attempts, why)
    return None, None, failures

  def restore_latest(self, target: Any) -> Optional[Tuple[Any, dict]]:
    """The newest readable step, or None when there is none. An unreadable (corrupt, half-deleted)
    step is skipped with a warning naming it, and the one before it is tried (no retries: see
    `restore_newest`, which the training loop uses)."""
    restored, _, _ = self.restore_newest(target, attempts=1)
    return restored

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
      if self._pending is not None:
        self._manager.check_for_errors()
    except Exception as err:
      if self._pending is not None:
        self._failed(err)
      if not self._save_failed:  # orbax re-raises a failure already reported as CheckpointSaveError
        raise
    self._pending = None

  def reload(self) -> None:
    """Rereads the steps on disk (after steps were moved away)."""
    self._manager.reload()

  def close(self) -> None:
    try:
      self._manager.close()
    except Exception:
      if not self._save_failed:  # a failed save was already reported as CheckpointSaveError
        raise


def _read_error_of(err: BaseException) -> str:
  """One line for a failed restore: the root cause (orbax wraps tensorstore's precise error, e.g.
  "OUT_OF_RANGE: Error reading ... value of size 7", in a generic one), with a hint for a tree mismatch."""
  root, seen = err, set()
  while id(root) not in seen and (root.__cause__ or root.__context__) is not None:
    seen.add(id(root))
    root = root.__cause__ or root.__context__
  text = str(root).strip()
  line = text.splitlines()[0] if text else ""
  if "tree structures do not match" in text:
    line += " (the checkpoint holds another model or trainable set than this config)"
  return f"{type(root).__name__}: {line}"[:400]


_ORIGINAL_UNRAISABLEHOOK = None


def _quiet_failed_orbax_reads() -> None:
  """After a failed restore orbax leaves read coroutines that Python reports, when it collects them
  (often at exit, thousands of lines of TensorStore specs), as "Exception ignored in ..." and asyncio's
  "Task exception was never retrieved": those reports (and only those of orbax's coroutines) are dropped;
  the failure itself is reported by `restore_newest`."""
  import sys

  global _ORIGINAL_UNRAISABLEHOOK
  if _ORIGINAL_UNRAISABLEHOOK is not None:
    return
  _ORIGINAL_UNRAISABLEHOOK = original = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
      return
    original(unraisable)
  sys.unraisablehook = hook
  # the same reads' asyncio tasks, collected unretrieved, are logged by asyncio at ERROR
  logging.getLogger("asyncio").addFilter(
      lambda record: not ("never retrieved" in record.getMessage() and "orbax" in record.getMessage()))


def _join_orbax_threads(timeout_s: float) -> None:
  """Waits (at most `timeout_s` in all) for orbax's background save threads other than this one."""
  import threading

  deadline = time.monotonic() + timeout_s
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax."):
      thread.join(max(0.0, deadline - time.monotonic()))


def _abstract_leaf(x):
  import jax

  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def restore_train_params(directory: str | os.PathLike, step: int) -> FlatParams:
  """The trainable parameters of train-state step `step` of the run checkpoints under `directory`, as
  {path tuple: np.ndarray} on the host, read alone: orbax's partial restore skips the optimizer state,
  so evaluating or exporting a run needs no optimizer (and no mesh: the arrays come back on one CPU
  device whatever sharding they were saved with)."""
  import jax

  path = os.path.join(os.path.abspath(os.fspath(directory)), str(int(step)), STATE_ITEM)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no train-state checkpoint at {path}")
  # Each process reads on its own (eval.py and predict.py on every host of a pod): orbax's default restore
  # synchronises all processes through a computation over every device, which a one-device read is not.
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone), multiprocessing_options=alone)
  tree = ckptr.metadata(path).item_metadata.tree
  if not isinstance(tree, Mapping) or "params" not in tree:
    raise ValueError(f"{path}: a train state has a 'params' item; found {sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__}")
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree["params"])
  args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=dev, global_shape=a.shape, dtype=a.dtype), abstract)
  restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item={"params": abstract}, restore_args={"params": args},
                                                               partial_restore=True))
  out: FlatParams = {}
  for p, v in _unnest(restored["params"]).items():
    out[p[:-1] if p and p[-1] == "value" else p] = v  # an NNX Variable is stored as {"value": array}
  return out

"""Device meshes and shardings from logical axis names (MaxText style).

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `vocab`, `clip_embed`) in their NNX
metadata; activations use `batch`. Config rules map logical names to mesh axes (`data`, `fsdp`,
`model`). A dimension whose size the mesh axes do not divide stays replicated, so any geometry runs on
any mesh. Multi-host: `initialize_distributed()` before anything touches devices (explicit coordinator flags, or
JAX's cluster auto-detection); each host feeds its contiguous slice of the global batch and
`global_batch` assembles the global arrays.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger("san_jax.train")

MESH_AXES = ("data", "fsdp", "model")
Rules = Sequence[Tuple[str, Union[str, Sequence[str], None]]]


class TopologyError(ValueError):
  """The processes of a multi-process run cannot work together (disagreeing configs, a device count that
  does not fit the mesh, a batch the hosts cannot share); the message is one line naming the problem."""


# configs/common.py `distributed` holds the values a run uses (seconds); these are for configs without it.
DEFAULT_TIMEOUTS = {"initialization_timeout_s": 300, "heartbeat_timeout_s": 100, "shutdown_timeout_s": 60}


def detected_cluster() -> Optional[str]:
  """The name of the cluster environment JAX's auto-detection finds (Cloud TPU pod, SLURM, Open MPI,
  Kubernetes; mpi4py is opt-in in JAX and so not probed), or None on a plain machine."""
  try:
    from jax._src.clusters import ClusterEnv  # pylint: disable=g-import-not-at-top
  except ImportError:  # a JAX without the module: no auto-detection to ask
    return None
  for env in ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if not getattr(env, "opt_in_only_method", False):
      try:
        if env.is_env_present():
          return env.__name__
      except Exception:  # pylint: disable=broad-except  # a broken probe means: not this environment
        continue
  return None


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, timeouts: Optional[Mapping[str, int]] = None,
                           ) -> bool:
  """`jax.distributed.initialize` for every launch context; returns whether it was called.

  * Explicit: `coordinator_address` (host:port of process 0), `num_processes`, `process_id` (the
    train.py / eval.py flags; `python -m san_jax.launch` passes them). JAX reads only the address from
    the environment (JAX_COORDINATOR_ADDRESS), so the count and id are taken from JAX_NUM_PROCESSES /
    JAX_PROCESS_ID here when the flags are not given.
  * Automatic: when JAX's cluster detection finds a cluster (TPU pod slice, SLURM, Open MPI, Kubernetes),
    JAX fills in what is not given.
  * Neither (a plain machine): nothing is called; one process.

  Must run before anything touches the devices. CPU collectives go through gloo (the default CPU client
  has none across processes). `timeouts`: initialization_timeout_s, heartbeat_timeout_s and
  shutdown_timeout_s (config `distributed`; defaults DEFAULT_TIMEOUTS): a process that stops sending
  heartbeats for heartbeat_timeout_s is declared dead and the others stop instead of hanging.
  """
  import jax.distributed  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return True
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  given = [x is not None for x in (address, num_processes, process_id)]
  cluster = detected_cluster()
  if not any(given) and cluster is None:
    return False
  if any(given) and not all(given) and cluster is None:
    raise TopologyError(
        f"multi-process launch needs all of --coordinator_address, --num_processes and --process_id "
        f"(got coordinator_address={address}, num_processes={num_processes}, process_id={process_id}) "
        f"or a cluster JAX detects (Cloud TPU, SLURM, Open MPI, Kubernetes)")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise TopologyError(f"--process_id={process_id} is not in [0, --num_processes={num_processes})")
  t = {**DEFAULT_TIMEOUTS, **{k: int(v) for k, v in dict(timeouts or {}).items() if v is not None}}
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(address, num_processes, process_id,
                             initialization_timeout=t["initialization_timeout_s"],
                             heartbeat_timeout_seconds=t["heartbeat_timeout_s"],
                             shutdown_timeout_seconds=t["shutdown_timeout_s"])
  _no_persistent_cache_across_cpu_processes()
  return True


def _no_persistent_cache_across_cpu_processes() -> None:
  """Turns JAX's persistent compilation cache off in a multi-process run on CPUs (one line says so when one was
  set up). JAX writes cache entries from process 0 only, and on CPUs each process keys the same program
  differently (measured with jax 0.10.2: identical lowered modules, different keys), so in a rerun process 0
  loads its step from the cache and enters the first collective while the others still compile; gloo gives
  that collective 30 s ("Gloo context initialization failed: ... GetKeyValue() timed out"), less than a train
  step's compile, and the run died (2 processes x 4 devices, configs/tiny.py, run twice with one
  JAX_COMPILATION_CACHE_DIR). On TPUs and GPUs every process reads process 0's entry, so the cache stays."""
  if jax.process_count() == 1 or jax.default_backend() != "cpu":
    return
  if jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache:
    log.warning("persistent compilation cache (%s) not used: a multi-process run on CPUs can only hit it in "
                "process 0, whose collectives then time out waiting for the others' compiles",
                jax.config.jax_compilation_cache_dir)
  jax.config.update("jax_enable_compilation_cache", False)


def config_fingerprint(config: Any) -> str:
  """sha256 of a run config (a JSON-able dict, or a ConfigDict): what every process must agree on."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  if hasattr(config, "to_json_best_effort"):
    config = json.loads(config.to_json_best_effort())
  return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def check_processes_agree(config: Any, what: str = "config") -> None:
  """Raises TopologyError (on every process) unless all processes hold the same `config`."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.frombuffer(bytes.fromhex(config_fingerprint(config)), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine))  # [P, 32]
  differ = [p for p in range(every.shape[0]) if not np.array_equal(every[p], every[0])]
  if differ:
    raise TopologyError(f"processes {differ} were given a different {what} than process 0 "
                        f"(sha256 {every[differ[0]].tobytes().hex()[:12]} vs {every[0].tobytes().hex()[:12]}): "
                        f"launch every process with the same command and flags")


def check_batch_fits(mesh: Mesh, rules: Rules, global_batch_size: int) -> None:
  """Raises TopologyError unless the global batch splits evenly over the hosts and over the mesh axes
  that shard the batch, with each host feeding the contiguous rows [p*b, (p+1)*b) of every batch (the
  layout the input pipeline produces; see `data.pipeline`)."""
  n_proc = jax.process_count()
  if global_batch_size % n_proc:
    raise TopologyError(f"train.batch_size={global_batch_size} is not divisible by the {n_proc} processes")
  sh = batch_sharding(mesh, rules, 1)
  spec = sh.spec[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  ways = math.prod(mesh.shape[a] for a in axes)
  if global_batch_size % ways:
    raise TopologyError(f"train.batch_size={global_batch_size} is not divisible by the {ways} devices of the "
                        f"mesh axes {axes} that split the batch (mesh {dict(mesh.shape)})")
  rows = sorted({(idx[0].start or 0, idx[0].stop or global_batch_size)
                 for idx in sh.addressable_devices_indices_map((global_batch_size,)).values()})
  b = global_batch_size // n_proc
  p = jax.process_index()
  if rows[0][0] != p * b or rows[-1][1] != (p + 1) * b:
    raise TopologyError(f"process {p}'s devices hold batch rows {rows[0][0]}..{rows[-1][1]} of the mesh "
                        f"{dict(mesh.shape)}, not its contiguous slice {p * b}..{(p + 1) * b}: order the mesh's "
                        f"devices by process")


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A mesh over all (or the given) devices with axes data/fsdp/model; one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh shape {dict(shape)}: at most one axis may be -1")
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if len(devices) % known:
      raise TopologyError(f"mesh shape {dict(shape)} does not divide {len(devices)} devices")
    sizes[unknown[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise TopologyError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}"
                        + (f" ({jax.process_count()} processes x {jax.local_device_count()})"
                           if jax.process_count() > 1 else ""))
  # jax.make_mesh orders the devices by the chips' physical topology (TPU rings and tori; elsewhere their
  # order). Auto axes: the step's shardings are given explicitly and XLA propagates the rest (make_mesh's
  # own default is the Explicit sharding mode).
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_mesh(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
  """Logical axis names of one array -> a PartitionSpec over `mesh`, skipping mesh axes already used by
  an earlier dimension and any whose size does not divide the dimension."""
  table = {name: target for name, target in rules}
  used = set()
  spec = []
  for name, dim in zip(tuple(names) + (None,) * (len(shape) - len(names)), shape):
    target = table.get(name) if name is not None else None
    axes = [target] if isinstance(target, str) else list(target or [])
    chosen = []
    for ax in axes:
      size = mesh.shape[ax]
      if ax in used or size == 1 or dim % (size * math.prod(mesh.shape[a] for a in chosen)):
        continue
      chosen.append(ax)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return P(*spec)


def _names_of(var) -> Tuple[Optional[str], ...]:
  """A Variable's logical axis names: flax's `out_sharding` metadata, which `layers.param` and
  `nnx.with_partitioning` set (nnx.get_partition_spec reads the same). The names are resolved by
  `logical_to_mesh`, not flax's logical_to_mesh_axes, which cannot skip a mesh axis that does not divide
  the dimension."""
  meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
  return tuple(meta.get("out_sharding") or ())


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """NamedShardings for every leaf of an NNX State, from its logical axis names."""
  def one(var):
    value = var.get_value() if hasattr(var, "get_value") else var
    return var.replace(NamedSharding(mesh, logical_to_mesh(_names_of(var), value.shape, mesh, rules)))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """The batch axis split over the data-parallel mesh axes, everything else replicated."""
  table = dict(rules)
  axes = table.get("batch", ("data", "fsdp"))
  axes = (axes,) if isinstance(axes, str) else tuple(a for a in axes if mesh.shape[a] > 1)
  first = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> Dict[str, jax.Array]:
  """This host's slice of the batch -> global arrays sharded along the batch axis."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
  return out

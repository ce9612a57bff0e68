"""Device meshes and shardings from logical axis names (MaxText style).

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `vocab`, `clip_embed`) in their NNX
metadata; activations use `batch`. Config rules map logical names to mesh axes (`data`, `fsdp`,
`model`). A dimension whose size the mesh axes do not divide stays replicated, so any geometry runs on
any mesh. Multi-host: `initialize_distributed()` before anything touches devices; each host feeds its
slice and `global_batch` assembles the global arrays.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
Rules = Sequence[Tuple[str, Union[str, Sequence[str], None]]]


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` when launched as one of several processes (TPU pods set this up;
  elsewhere JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID name the coordinator)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


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
      raise ValueError(f"mesh shape {dict(shape)} does not divide {len(devices)} devices")
    sizes[unknown[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}")
  grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
  return Mesh(grid, MESH_AXES)


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
  meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
  names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding") or ()
  return tuple(names)


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

"""Flat views of an NNX module's parameters: {path tuple: array}, and back."""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def flat_params(module: nnx.Module) -> Dict[Tuple, jax.Array]:
  """{path: value} of every nnx.Param of `module`."""
  state = nnx.state(module, nnx.Param)
  return {tuple(path): v.get_value() if hasattr(v, "get_value") else v for path, v in nnx.to_flat_state(state)}


def param_shapes(module: nnx.Module) -> Dict[Tuple, Tuple[int, ...]]:
  return {p: tuple(v.shape) for p, v in flat_params(module).items()}


def load_flat_params(module: nnx.Module, flat: Mapping[Tuple, np.ndarray]) -> None:
  """Writes `flat` into the module's Params in place (dtypes kept as the module's)."""
  state = nnx.state(module, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    path = tuple(path)
    if path in flat:
      var.set_value(jnp.asarray(flat[path], dtype=var.get_value().dtype))
  nnx.update(module, state)


def dotted(path: Tuple) -> str:
  """("side_adapter_network", "vit_model", "blocks", 0, "attn") -> "side_adapter_network.vit_model.blocks.0.attn"."""
  return ".".join(str(p) for p in path)


def matches_any(path: Tuple, patterns: Sequence[str]) -> bool:
  name = dotted(path)
  return any(re.search(p, name) for p in patterns)


def select(flat: Mapping[Tuple, Any], patterns: Sequence[str]) -> Dict[Tuple, Any]:
  """The entries whose dotted path matches any of the regex `patterns`."""
  return {p: v for p, v in flat.items() if matches_any(p, patterns)}


def count(flat: Mapping[Tuple, Any]) -> int:
  return int(sum(int(np.prod(getattr(v, "shape", ()))) for v in flat.values()))

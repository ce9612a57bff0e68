"""Flat views of an NNX module's parameters: {path tuple: array}, and back."""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def flat_params(module: nnx.Module) -> Dict[Tuple, jax.Array]:
  """{path: value} of every nnx.Param of `module`."""
  state = nnx.state(module, nnx.Param)
  return {tuple(path): v.value if hasattr(v, "value") else v for path, v in nnx.to_flat_state(state)}


def param_shapes(module: nnx.Module) -> Dict[Tuple, Tuple[int, ...]]:
  return {p: tuple(v.shape) for p, v in flat_params(module).items()}


def load_flat_params(module: nnx.Module, flat: Mapping[Tuple, np.ndarray]) -> None:
  """Writes `flat` into the module's Params in place (dtypes kept as the module's)."""
  state = nnx.state(module, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    path = tuple(path)
    if path in flat:
      var.value = jnp.asarray(flat[path], dtype=var.value.dtype)
  nnx.update(module, state)

"""Point sampling: torch's `grid_sample` at given points, and PointRend's importance sampling.

`point_sample` is detectron2's `point_sample` (Mask2Former's matcher and criterion read masks only at
points): `F.grid_sample(x, 2*coords-1, mode="bilinear", padding_mode="zeros", align_corners=False)`.
The arithmetic follows torch's vectorised CPU kernel's formulas and order (pixel coordinate
(g+1)*size/2-0.5, corners accumulated nw, ne, sw, se from left to right). It is not bit-exact: torch's
kernel is compiled with FMA contraction, so it rounds the pixel coordinate and the corner sums once where
XLA rounds each operation; the difference is at most about an ulp of the pixel coordinate in the bilinear
weights (size * 2^-24 relative to the sampled values; tests/test_losses.py bounds it).

`uncertain_point_coords_with_randomness` (torch layouts) and `uncertain_points` (any leading dims) are
PointRend's training-time point selection, with the random draws injectable: pass a PRNG key, or the two
uniform draws (so a golden case's recorded draws can be replayed). Everything has static shapes, and
leading dimensions broadcast instead of being vmapped (batch-sharded maps meet replicated draws).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def sample_points(maps: jax.Array, coords: jax.Array) -> jax.Array:
  """Bilinear samples of maps [*A, H, W] at coords [*B, P, 2] -> [*broadcast(A, B), P], zero outside.

  The leading dimensions broadcast (no vmap: a batch sharded over devices may meet replicated points).
  coords are (x, y) in [0, 1] of the whole map: 0 is the left/top edge of the first pixel and 1 the
  right/bottom edge of the last (align_corners=False). Integer/bool maps are read as the coords' dtype.
  """
  if maps.ndim < 2 or coords.ndim < 2 or coords.shape[-1] != 2:
    raise ValueError(f"sample_points: maps [..., H, W] and coords [..., P, 2], got {maps.shape} and {coords.shape}")
  h, w = maps.shape[-2:]
  dtype = coords.dtype
  grid = 2.0 * coords - 1.0  # what detectron2 hands to grid_sample, rounded as it is there
  # torch's unnormalisation for align_corners=False, as its vector kernel evaluates it: (g + 1) * (size/2) - 0.5
  x = (grid[..., 0] + 1.0) * jnp.asarray(w / 2, dtype) - 0.5
  y = (grid[..., 1] + 1.0) * jnp.asarray(h / 2, dtype) - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  wx, wy = x - x0, y - y0  # distances to the west / north neighbour
  ex, sy = 1.0 - wx, 1.0 - wy
  xi, yi = x0.astype(jnp.int32), y0.astype(jnp.int32)
  lead = jnp.broadcast_shapes(maps.shape[:-2], coords.shape[:-2])
  flat = maps.reshape(maps.shape[:-2] + (h * w,))
  flat = flat.reshape((1,) * (len(lead) - flat.ndim + 1) + flat.shape)  # same rank as the indices

  def corner(dy, dx):
    cy, cx = yi + dy, xi + dx
    inside = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
    idx = jnp.where(inside, cy * w + cx, 0)
    idx = idx.reshape((1,) * (len(lead) + 1 - idx.ndim) + idx.shape)
    vals = jnp.take_along_axis(flat, idx, axis=-1).astype(dtype)
    return jnp.where(inside, vals, jnp.zeros((), dtype))

  # torch's order of accumulation: nw, ne, sw, se, left to right
  out = (corner(0, 0) * (sy * ex) + corner(0, 1) * (sy * wx)) + corner(1, 0) * (wy * ex)
  return out + corner(1, 1) * (wy * wx)


def point_sample(inputs: jax.Array, coords: jax.Array) -> jax.Array:
  """detectron2's point_sample in torch layouts: inputs [N, C, H, W] or [N, H, W] (any dtype: integer/bool
  masks are read as float), coords [N, P, 2] or [1, P, 2] (shared by every row), (x, y) in [0, 1].
  Returns [N, C, P] or [N, P] in the coordinates' float dtype. See `sample_points`.
  """
  n = inputs.shape[0]
  if inputs.ndim not in (3, 4):
    raise ValueError(f"point_sample: inputs must be [N, C, H, W] or [N, H, W], got shape {inputs.shape}")
  if coords.ndim != 3 or coords.shape[-1] != 2 or coords.shape[0] not in (1, n):
    raise ValueError(f"point_sample: coords must be [N or 1, P, 2] for N={n}, got shape {coords.shape}")
  return sample_points(inputs, coords[:, None] if inputs.ndim == 4 else coords)


def calculate_uncertainty(logits: jax.Array) -> jax.Array:
  """Mask2Former's uncertainty of class-agnostic mask logits: -|logit| (highest at the decision boundary)."""
  return -jnp.abs(logits)


def importance_counts(num_points: int, oversample_ratio: float, importance_sample_ratio: float
                      ) -> Tuple[int, int, int]:
  """(oversampled, importance-sampled, uniform) point counts, truncated with Python's int() as detectron2."""
  num_sampled = int(num_points * oversample_ratio)
  num_uncertain = int(importance_sample_ratio * num_points)
  if num_uncertain > num_sampled:
    raise ValueError(f"importance_sample_ratio*num_points={num_uncertain} exceeds the {num_sampled} "
                     "oversampled points (oversample_ratio must be >= importance_sample_ratio)")
  return num_sampled, num_uncertain, num_points - num_uncertain


def _top_k_indices(x: jax.Array, k: int, batch_axes: Tuple[str, ...]) -> jax.Array:
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty or x.ndim < 2 else tuple(a for a in batch_axes if a in mesh.axis_names)
  ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  if ways <= 1 or x.shape[0] % ways:
    return jax.lax.top_k(x, k)[1]
  spec = jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0])
  return jax.shard_map(lambda v: jax.lax.top_k(v, k)[1], in_specs=spec, out_specs=spec, check_vma=False)(x)


def uncertain_points(
    maps: jax.Array, uncertainty_fn: Callable[[jax.Array], jax.Array], num_points: int,
    oversample_ratio: float, importance_sample_ratio: float, *, rng: Optional[jax.Array] = None,
    oversample_coords: Optional[jax.Array] = None, random_coords: Optional[jax.Array] = None,
    batch_axes: Tuple[str, ...] = ()) -> jax.Array:
  """PointRend's training points for class-agnostic logit maps [*L, H, W] -> [*L, P, 2].

  batch_axes: mesh axes (of the mesh set with `jax.set_mesh`) that shard L[0]; the top-k then runs per
  shard (XLA's partitioner otherwise all-gathers the uncertainties over the batch for it).

  Draws: either `rng`, or `oversample_coords` [*L, int(P*oversample_ratio), 2] and `random_coords`
  [*L, P - int(importance_sample_ratio*P), 2], uniform in [0, 1). The result holds the
  int(importance_sample_ratio*P) most uncertain oversampled points in descending uncertainty (torch.topk
  order), then the random ones. No gradient flows into the selection.
  """
  lead = maps.shape[:-2]
  num_sampled, num_uncertain, num_random = importance_counts(num_points, oversample_ratio, importance_sample_ratio)
  if rng is not None:
    if oversample_coords is not None or random_coords is not None:
      raise ValueError("give either rng or the draws, not both")
    k_over, k_rand = jax.random.split(rng)
    # flat draws, reshaped: XLA:CPU compiles a 1-D threefry much faster than a multi-dimensional one
    size = int(np.prod(lead, dtype=np.int64)) * 2
    oversample_coords = jax.random.uniform(k_over, (size * num_sampled,), jnp.float32).reshape(lead + (num_sampled, 2))
    random_coords = jax.random.uniform(k_rand, (size * num_random,), jnp.float32).reshape(lead + (num_random, 2))
  if oversample_coords is None or random_coords is None:
    raise ValueError("importance sampling needs rng or both draws")
  if oversample_coords.shape != lead + (num_sampled, 2) or random_coords.shape != lead + (num_random, 2):
    raise ValueError(f"draws must be {lead + (num_sampled, 2)} and {lead + (num_random, 2)}; got "
                     f"{oversample_coords.shape} and {random_coords.shape}")
  if num_uncertain == 0:  # importance_sample_ratio 0: uniform points only (torch concatenates an empty top-k)
    return jax.lax.stop_gradient(random_coords.astype(oversample_coords.dtype))
  uncertainty = uncertainty_fn(sample_points(jax.lax.stop_gradient(maps), oversample_coords))
  idx = _top_k_indices(uncertainty, num_uncertain, batch_axes)
  chosen = jnp.take_along_axis(oversample_coords, idx[..., None], axis=-2)
  # Adding zeros shaped like `chosen` gives the random points chosen's sharding: with explicit-sharding
  # meshes a batch-sharded and a replicated array cannot be concatenated. x + 0 is exact.
  uniform = random_coords.astype(chosen.dtype) + jnp.zeros_like(chosen[..., :1, :])
  return jax.lax.stop_gradient(jnp.concatenate([chosen, uniform], axis=-2))


def uncertain_point_coords_with_randomness(
    logits: jax.Array, uncertainty_fn: Callable[[jax.Array], jax.Array], num_points: int,
    oversample_ratio: float, importance_sample_ratio: float, *, rng: Optional[jax.Array] = None,
    oversample_coords: Optional[jax.Array] = None, random_coords: Optional[jax.Array] = None) -> jax.Array:
  """detectron2's function in torch layouts: logits [N, 1, H, W] or [N, H, W], draws [N, S, 2] and
  [N, R, 2] (or `rng`) -> points [N, P, 2]. See `uncertain_points`."""
  if logits.ndim == 4 and logits.shape[1] != 1:
    raise ValueError(f"uncertainty needs class-agnostic logits [N, 1, H, W], got shape {logits.shape}")
  if logits.ndim not in (3, 4):
    raise ValueError(f"logits must be [N, 1, H, W] or [N, H, W], got shape {logits.shape}")
  maps = logits[:, 0] if logits.ndim == 4 else logits
  return uncertain_points(maps, uncertainty_fn, num_points, oversample_ratio, importance_sample_ratio, rng=rng,
                          oversample_coords=oversample_coords, random_coords=random_coords)

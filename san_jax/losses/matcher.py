"""Mask2Former's Hungarian matcher, jit-able with static shapes.

The cost of assigning query q to target t (per image) is

    mask_weight * BCE(q, t) + class_weight * (-softmax(logits_q)[label_t]) + dice_weight * dice(q, t)

with the two mask terms evaluated on P random points shared by every query and target of the image (the
same points for predictions and targets, read with `point_sample`). The terms, their summation order and
the float32 arithmetic follow Mask2Former's `batch_sigmoid_ce_loss` / `batch_dice_loss`.

Targets have a static count T per image: `labels [B, T]`, `masks [B, T, H, W]`, `valid [B, T]`, the valid
ones first (see `criterion.pad_targets`). The assignment is scipy's `linear_sum_assignment` on the
[Q, n_valid] block only, so padded targets never take part and the result is exactly scipy's (rows
ascending, as scipy returns them). On a CPU with san-jax's native library it runs as a custom call
(`gemm.linear_sum_assignment`: scipy's algorithm, tie rules and float64 arithmetic, tested pair for pair
against scipy), elsewhere as scipy itself through `jax.pure_callback`; the custom call keeps the train step
free of host callbacks, which JAX's persistent compilation cache refuses. Matches come back padded to
K = min(Q, T) with a validity mask. Given the mesh axes that shard the batch (`batch_axes`, the train
step's), the assignment runs inside a `shard_map` over them: every device hands its own images' cost
matrices to its own host, so each host solves only its images and no cost matrix is gathered to one device
(without it, XLA replicates the cost matrices onto device 0 for the callback or custom call: "involuntary
full rematerialization", and on a pod one host would solve the whole global batch). Costs are computed with
broadcasting leading dimensions rather than vmap, which explicit-sharding meshes refuse when
batch-sharded predictions meet replicated point draws.
"""

from __future__ import annotations

import math
from typing import Dict, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from san_jax.ops import gemm, sampling

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 contractions on GPU/TPU would otherwise use reduced precision


class MatchCosts(NamedTuple):
  class_weight: float = 2.0
  mask_weight: float = 5.0
  dice_weight: float = 5.0


def batch_sigmoid_ce_cost(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean sigmoid BCE of every prediction row [..., N, P] against every target row [..., M, P] -> [..., N, M]."""
  log_p = jax.nn.log_sigmoid(logits)
  pos = -log_p  # BCE against target 1
  neg = logits - log_p  # BCE against target 0
  loss = (jnp.einsum("...nc,...mc->...nm", pos, targets, precision=_HIGHEST)
          + jnp.einsum("...nc,...mc->...nm", neg, 1.0 - targets, precision=_HIGHEST))
  return loss / logits.shape[-1]


def batch_dice_cost(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Dice loss (+1 smoothing) of every prediction row [..., N, P] against every target row [..., M, P]."""
  probs = jax.nn.sigmoid(logits)
  numerator = 2.0 * jnp.einsum("...nc,...mc->...nm", probs, targets, precision=_HIGHEST)
  denominator = probs.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]
  return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def match_cost(pred_logits: jax.Array, pred_masks: jax.Array, labels: jax.Array, masks: jax.Array,
               points: jax.Array, costs: MatchCosts = MatchCosts()) -> jax.Array:
  """Cost matrices [..., Q, T] (float32), for one image or a batch (leading dims, no vmap).

  pred_logits [..., Q, C+1], pred_masks [..., Q, h, w] (logits), labels [..., T] (int; padded entries any
  valid class), masks [..., T, H, W] (0/1, any dtype, any resolution: points are normalised),
  points [..., P, 2] (x, y) in [0, 1), shared by the image's predictions and targets.
  """
  probs = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
  cost_class = -jnp.take_along_axis(probs, labels[..., None, :].astype(jnp.int32), axis=-1)
  pts = points[..., None, :, :].astype(jnp.float32)  # the same points for every row
  out = sampling.sample_points(pred_masks.astype(jnp.float32), pts)  # [..., Q, P]
  tgt = sampling.sample_points(masks, pts)  # [..., T, P]
  cost_mask = batch_sigmoid_ce_cost(out, tgt)
  cost_dice = batch_dice_cost(out, tgt)
  return costs.mask_weight * cost_mask + costs.class_weight * cost_class + costs.dice_weight * cost_dice


def _assign_on_host(cost: np.ndarray, counts: np.ndarray):
  """scipy's assignment of each [Q, T] matrix restricted to its first counts[i] columns."""
  from scipy.optimize import linear_sum_assignment

  cost, counts = np.asarray(cost), np.asarray(counts)
  lead, (q, t) = cost.shape[:-2], cost.shape[-2:]
  k = min(q, t)
  flat_cost, flat_n = cost.reshape((-1, q, t)), counts.reshape(-1)
  rows = np.zeros((flat_cost.shape[0], k), np.int32)
  cols = np.zeros((flat_cost.shape[0], k), np.int32)
  for i, n in enumerate(flat_n):
    block = flat_cost[i, :, :int(n)]
    if not np.isfinite(block).all():
      # A diverged step (NaN/inf logits): any assignment will do, the loss is non-finite and the train step
      # discards the update; scipy would raise from inside the callback instead.
      block = np.nan_to_num(block, nan=0.0, posinf=1e30, neginf=-1e30)
    r, c = linear_sum_assignment(block)
    rows[i, :len(r)], cols[i, :len(c)] = r, c
  return rows.reshape(lead + (k,)), cols.reshape(lead + (k,))


def _assign_callback(cost: jax.Array, num_valid: jax.Array):
  k = min(cost.shape[-2:])
  out_shape = jax.ShapeDtypeStruct(cost.shape[:-2] + (k,), jnp.int32)
  return jax.pure_callback(_assign_on_host, (out_shape, out_shape), cost, num_valid, vmap_method="broadcast_all")


def _assign_local(cost: jax.Array, num_valid: jax.Array):
  """The assignment of the matrices at hand: the native custom call on a CPU where the library is built
  (scipy's pairs without a host callback, see `gemm.linear_sum_assignment`), the scipy callback elsewhere
  (GPU, TPU: `lax.platform_dependent` lowers only the branch of the platform it compiles for)."""
  if not gemm.assignment_availability()[0]:
    return _assign_callback(cost, num_valid)
  return jax.lax.platform_dependent(cost, num_valid, cpu=gemm.linear_sum_assignment, default=_assign_callback)


def _sharded_axes(batch_axes: Sequence[str], batch: int) -> Tuple[str, ...]:
  """The axes of `batch_axes` the current mesh has, when they split the batch (more than one way, evenly),
  followed by the mesh's other axes (size > 1) that still split it evenly.

  The other axes: devices that differ only along them hold the same images, and a host callback under
  shard_map on such replicated copies intermittently deadlocks or aborts the process here (jaxlib 0.10.2
  on 8 CPU devices: 3 of 39 runs of a (4, 2) mesh with the callback's operand replicated along the second
  axis, 0 of 30 with it split along both); splitting the images over them as well gives every device its
  own images (and divides the host's work), at the price of an all-gather of the int32 assignments along
  those axes.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  ways = math.prod(mesh.shape[a] for a in axes)
  if ways <= 1 or batch % ways:
    return ()
  for a in mesh.axis_names:
    if a not in axes and mesh.shape[a] > 1 and batch % (ways * mesh.shape[a]) == 0:
      axes, ways = axes + (a,), ways * mesh.shape[a]
  return axes


def assign(cost: jax.Array, num_valid: jax.Array, batch_axes: Sequence[str] = ()) -> Dict[str, jax.Array]:
  """Optimal assignment per image (scipy's, natively on a CPU), callable under jit and vmap.

  cost [B, Q, T] (or any [..., Q, T] without batch_axes); num_valid [B] (int): only the first num_valid
  target columns are assigned. batch_axes: mesh axes (of the mesh set with `jax.set_mesh`) that shard B;
  the assignment then runs per shard (shard_map), on the host of the shard's device.
  Returns pred_idx, tgt_idx [..., K] int32 (K = min(Q, T); scipy's order: pred_idx ascending) and
  valid [..., K] (the first min(Q, num_valid) entries; the rest are zero padding).
  """
  q, t = cost.shape[-2:]
  k = min(q, t)
  num_valid = jnp.asarray(num_valid, jnp.int32)
  # No gradient flows through an assignment; stop_gradient keeps jax.grad away from the callback / custom call.
  cost = jax.lax.stop_gradient(cost)
  axes = _sharded_axes(batch_axes, cost.shape[0]) if cost.ndim == 3 else ()
  if axes:
    spec = P(axes if len(axes) > 1 else axes[0])
    # Manual over every mesh axis (host callbacks refuse partially automatic sharding, and a custom call
    # has no sharding rule); see _sharded_axes
    # for the axes beyond batch_axes.
    explicit = jax.sharding.AxisType.Explicit in jax.sharding.get_abstract_mesh().axis_types
    if explicit:  # explicit meshes do not reshard implicitly: the extra axes' split, and back after
      back = (jax.typeof(cost).sharding.spec[0],)
      cost, num_valid = jax.reshard(cost, spec), jax.reshard(num_valid, spec)
    rows, cols = jax.shard_map(_assign_local, in_specs=(spec, spec), out_specs=(spec, spec),
                               check_vma=False)(cost, num_valid)
    if explicit:
      rows, cols, num_valid = (jax.reshard(a, P(*back)) for a in (rows, cols, num_valid))
  else:
    rows, cols = _assign_local(cost, num_valid)
  valid = jnp.arange(k) < jnp.minimum(num_valid, q)[..., None]
  return {"pred_idx": rows, "tgt_idx": cols, "valid": valid}


def hungarian_match(pred_logits: jax.Array, pred_masks: jax.Array, labels: jax.Array, masks: jax.Array,
                    valid: jax.Array, points: jax.Array, costs: MatchCosts = MatchCosts(),
                    batch_axes: Sequence[str] = ()) -> Dict[str, jax.Array]:
  """Batched matching: pred_logits [B, Q, C+1], pred_masks [B, Q, h, w], labels [B, T], masks [B, T, H, W],
  valid [B, T] (valid targets first), points [B, P, 2] (one draw per image); batch_axes: see `assign`.

  Returns {"cost": [B, Q, T] (padded columns are meaningless), "pred_idx", "tgt_idx", "valid": [B, K]}.
  """
  cost = match_cost(jax.lax.stop_gradient(pred_logits), jax.lax.stop_gradient(pred_masks), labels, masks, points,
                    costs)
  match = assign(cost, valid.sum(-1), batch_axes)
  return {"cost": cost, **match}

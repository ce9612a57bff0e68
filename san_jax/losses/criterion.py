"""Mask2Former's set criterion as SAN trains with it: a pure, jit-able function of outputs and targets.

For every deep-supervision output (the last one unsuffixed, output i < last suffixed `_i`, as the
official `aux_outputs`):
  - Hungarian matching (`matcher.hungarian_match`) on P random points per image;
  - `loss_ce`: cross entropy over C+1 classes, unmatched queries labelled no-object, class weights
    [1, ..., 1, eos_coef], torch's weighted mean sum(w_i * nll_i) / sum(w_i);
  - `loss_mask` (sigmoid BCE, mean over points) and `loss_dice` on P points per matched mask chosen by
    PointRend importance sampling on the prediction; target masks are read at the same points;
    both summed over matched masks and divided by num_masks = the number of targets in the (global)
    batch, at least 1.
Each term is returned multiplied by its weight (class 2, mask 5, dice 5), as SAN.forward returns them.

Static shapes: targets come padded to T per image (`pad_targets`); matches are K = min(Q, T) slots per
image, valid slots first. Randomness is explicit: a PRNG key, or the draws themselves (`draw_shapes`,
`sample_draws`) so recorded draws can be replayed. Slot (b, k) of a draw belongs to the k-th match of
image b, i.e. the order of the official code's concatenated matched masks.

Global batch vs the official DDP: there each GPU divides its mask losses by (all-reduced count / world
size) and DDP averages the gradients, which is exactly the global-batch normalisation used here. The
cross entropy differs slightly: officially the mean over GPUs of per-GPU weighted means, here one
weighted mean over the global batch (equal when every GPU's weight sum is the same).

Inside the deterministic train step (`CriterionConfig.sum_axes`) each device evaluates its share of the
batch: the normalisers (target count, the cross entropy's weight sum) are the global batch's, so the
devices' terms add up (in device order, ops/reduce.py) to the global-batch terms above.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from san_jax.losses import matcher as matcher_lib
from san_jax.ops import reduce as reduce_lib
from san_jax.ops import sampling


@dataclasses.dataclass(frozen=True)
class CriterionConfig:
  num_classes: int
  eos_coef: float = 0.1  # weight of the no-object class in the cross entropy
  class_weight: float = 2.0
  mask_weight: float = 5.0
  dice_weight: float = 5.0
  num_points: int = 112 * 112
  oversample_ratio: float = 3.0
  importance_sample_ratio: float = 0.75
  batch_axes: Tuple[str, ...] = ()  # mesh axes sharding the batch: the matcher's host work runs per shard
  # Inside shard_map with these (manual) axes: the batch is this device's share, the normalisers are the
  # global batch's (exact int sums, `ordered_sum` of floats) and every term is the device's share of the
  # global term (the shares add up to it). Used with batch_axes=() (everything here is then local).
  sum_axes: Tuple[str, ...] = ()

  @property
  def costs(self) -> matcher_lib.MatchCosts:
    return matcher_lib.MatchCosts(self.class_weight, self.mask_weight, self.dice_weight)

  def draw_counts(self) -> Tuple[int, int, int]:
    return sampling.importance_counts(self.num_points, self.oversample_ratio, self.importance_sample_ratio)


# ---- targets and draws -------------------------------------------------------------------------------
def pad_targets(labels: Sequence[np.ndarray], masks: Sequence[np.ndarray], padded_hw: Tuple[int, int],
                max_targets: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Per-image targets (labels [n_i], masks [n_i, h_i, w_i]) -> static-shape arrays on the host.

  Masks are zero-padded bottom/right to the padded image size (SAN.prepare_targets); targets are padded
  to `max_targets` (default: the largest n_i) with label 0, empty masks and valid=False.
  """
  n_max = max((len(l) for l in labels), default=0) if max_targets is None else int(max_targets)
  b, (h, w) = len(labels), padded_hw
  out_labels = np.zeros((b, n_max), np.int32)
  out_masks = np.zeros((b, n_max, h, w), np.uint8)
  valid = np.zeros((b, n_max), bool)
  for i, (lab, msk) in enumerate(zip(labels, masks)):
    n = len(lab)
    if n > n_max:
      raise ValueError(f"image {i} has {n} targets, more than max_targets={n_max}")
    msk = np.asarray(msk)
    if msk.shape[0] != n or msk.shape[1] > h or msk.shape[2] > w:
      raise ValueError(f"image {i}: masks {msk.shape} do not fit {n} labels in the padded size {padded_hw}")
    out_labels[i, :n] = lab
    out_masks[i, :n, :msk.shape[1], :msk.shape[2]] = msk
    valid[i, :n] = True
  return {"labels": out_labels, "masks": out_masks, "valid": valid}


def draw_shapes(cfg: CriterionConfig, num_outputs: int, batch: int, slots: int) -> Dict[str, Tuple[int, ...]]:
  """Shapes of the uniform draws for `num_outputs` deep-supervision outputs, `slots` = K matches per image."""
  num_sampled, _, num_random = cfg.draw_counts()
  return {"matcher": (num_outputs, batch, cfg.num_points, 2),
          "oversample": (num_outputs, batch, slots, num_sampled, 2),
          "random": (num_outputs, batch, slots, num_random, 2)}


def sample_draws(rng: jax.Array, cfg: CriterionConfig, num_outputs: int, batch: int, slots: int
                 ) -> Dict[str, jax.Array]:
  """Uniform [0, 1) point draws: matcher points per image, and per matched slot the importance sampler's
  oversampled and uniform points (drawn for padded slots too; those are never used)."""
  shapes = draw_shapes(cfg, num_outputs, batch, slots)
  keys = jax.random.split(rng, len(shapes))
  # Drawn flat and reshaped: same distribution, and XLA:CPU compiles a 1-D threefry several times faster.
  return {name: jax.random.uniform(k, (int(np.prod(shape)),), jnp.float32).reshape(shape)
          for k, (name, shape) in zip(keys, shapes.items())}


# ---- the loss terms ----------------------------------------------------------------------------------
def loss_labels(pred_logits: jax.Array, labels: jax.Array, match: Mapping[str, jax.Array],
                num_classes: int, eos_coef: float, sum_axes: Sequence[str] = ()) -> jax.Array:
  """Weighted cross entropy over C+1 classes; pred_logits [B, Q, C+1], labels [B, T]. With `sum_axes`
  (see CriterionConfig) the weight sum is the global batch's and the result this device's share."""
  q = pred_logits.shape[1]
  matched = jnp.take_along_axis(labels, match["tgt_idx"], axis=1).astype(jnp.int32)  # [B, K]
  # Each query is matched at most once: a one-hot sum instead of a scatter (no ambiguity for a
  # batch-sharded scatter to resolve).
  hit = (match["pred_idx"][:, :, None] == jnp.arange(q)) & match["valid"][:, :, None]  # [B, K, Q]
  target = num_classes + jnp.sum(jnp.where(hit, (matched - num_classes)[:, :, None], 0), axis=1)  # [B, Q]
  logp = jax.nn.log_softmax(pred_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  w = jnp.where(target == num_classes, jnp.float32(eos_coef), jnp.float32(1.0))  # weights [1, ..., 1, eos_coef]
  return (w * nll).sum() / reduce_lib.ordered_sum(w.sum(), sum_axes)


def sigmoid_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """torch's binary_cross_entropy_with_logits, elementwise: (1 - t) * x - log_sigmoid(x).

  Not optax.sigmoid_binary_cross_entropy: it evaluates -t log σ(x) - (1 - t) log σ(-x), equal in exact
  arithmetic but rounded differently from the formula torch uses, which the golden gradients were taken with.
  """
  return (1.0 - targets) * logits - jax.nn.log_sigmoid(logits)


def dice(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Dice loss with +1 smoothing over the last axis."""
  probs = jax.nn.sigmoid(logits)
  numerator = 2.0 * (probs * targets).sum(-1)
  denominator = probs.sum(-1) + targets.sum(-1)
  return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def loss_masks(pred_masks: jax.Array, target_masks: jax.Array, match: Mapping[str, jax.Array],
               num_masks: jax.Array, oversample: jax.Array, random: jax.Array, cfg: CriterionConfig,
               points: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """(loss_mask, loss_dice, selected point coords [B, K, P, 2]) on importance-sampled points of the matches.

  pred_masks [B, Q, h, w] logits; target_masks [B, T, H, W] (0/1, padded image size); draws per slot.
  `points` [B, K, P, 2], when given, are the points the losses are taken at instead of the selection (a
  recorded selection replayed: the top-k is discontinuous, so float noise can swap a near-tie at the k-th
  place and move the losses' gradients far more than the noise itself); the selection from the draws is
  still computed and returned, so it can be compared with the recorded one.
  """
  src = jnp.take_along_axis(pred_masks.astype(jnp.float32), match["pred_idx"][:, :, None, None], axis=1)
  tgt = jnp.take_along_axis(target_masks, match["tgt_idx"][:, :, None, None], axis=1)
  coords = sampling.uncertain_points(
      src, sampling.calculate_uncertainty, cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio,
      oversample_coords=oversample, random_coords=random, batch_axes=cfg.batch_axes)  # [B, K, P, 2]
  used = coords if points is None else jax.lax.stop_gradient(points.astype(coords.dtype))
  point_labels = jax.lax.stop_gradient(sampling.sample_points(tgt, used))  # [B, K, P]
  point_logits = sampling.sample_points(src, used)
  valid = match["valid"]
  bce = jnp.where(valid, sigmoid_ce(point_logits, point_labels).mean(-1), 0.0).sum() / num_masks
  dsc = jnp.where(valid, dice(point_logits, point_labels), 0.0).sum() / num_masks
  return bce, dsc, coords


# ---- the criterion -----------------------------------------------------------------------------------
def output_suffix(i: int, num_outputs: int) -> str:
  """'' for the last deep-supervision output, '_i' for the others (the official aux_outputs naming)."""
  return "" if i == num_outputs - 1 else f"_{i}"


def num_target_masks(valid: jax.Array, sum_axes: Sequence[str] = ()) -> jax.Array:
  """The loss normaliser: valid targets in the whole (global) batch, at least 1, float32 (with `sum_axes`,
  the devices' counts are added as integers: exact in any order)."""
  count = valid.sum(dtype=jnp.int32)
  if sum_axes:
    count = jax.lax.psum(count, tuple(sum_axes))
  return jnp.maximum(count.astype(jnp.float32), 1.0)


def set_criterion(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array], cfg: CriterionConfig, *,
                  rng: Optional[jax.Array] = None, draws: Optional[Mapping[str, jax.Array]] = None
                  ) -> Tuple[Dict[str, jax.Array], Dict[str, Any]]:
  """Weighted loss terms of every deep-supervision output, and what produced them.

  outputs: {"mask_logits": [B, N, Q, C+1], "mask_preds": [B, N, Q, h, w]} (SAN's training outputs).
  targets: {"labels": [B, T] int, "masks": [B, T, H, W] 0/1, "valid": [B, T] bool} (`pad_targets`).
  Randomness: `rng`, or `draws` shaped as `draw_shapes(cfg, N, B, min(Q, T))`; `draws` may also hold
  "points" [N, B, K, P, 2], a recorded importance-sampled selection the mask losses are taken at (see
  `loss_masks`; the parity checker replays the official code's selection this way).
  Returns (losses {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", ...}, aux {"matches": per output
  {cost, pred_idx, tgt_idx, valid}, "point_coords": per output [B, K, P, 2] (the selection made from the
  draws), "num_masks"}).
  """
  logits, masks = outputs["mask_logits"], outputs["mask_preds"]
  b, n, q = masks.shape[:3]
  k = min(q, targets["labels"].shape[1])
  if (rng is None) == (draws is None):
    raise ValueError("set_criterion needs exactly one of rng and draws")
  if draws is None:
    draws = sample_draws(rng, cfg, n, b, k)
  shapes = draw_shapes(cfg, n, b, k)
  if "points" in draws:
    shapes["points"] = (n, b, k, cfg.num_points, 2)
  unknown = sorted(set(draws) - set(shapes))
  if unknown:
    raise ValueError(f"draws has unknown entries {unknown}; expected {sorted(shapes)}")
  for name, shape in shapes.items():
    if tuple(draws[name].shape) != shape:
      raise ValueError(f"draws[{name!r}] has shape {tuple(draws[name].shape)}, expected {shape}")
  num_masks = num_target_masks(targets["valid"], cfg.sum_axes)

  def one_output(logits_i, masks_i, matcher_pts, oversample, random, points=None):
    match = matcher_lib.hungarian_match(logits_i, masks_i, targets["labels"], targets["masks"],
                                        targets["valid"], matcher_pts, cfg.costs, cfg.batch_axes)
    ce = loss_labels(logits_i, targets["labels"], match, cfg.num_classes, cfg.eos_coef, cfg.sum_axes)
    bce, dsc, coords = loss_masks(masks_i, targets["masks"], match, num_masks, oversample, random, cfg, points)
    return {"loss_ce": ce, "loss_mask": bce, "loss_dice": dsc}, match, coords

  # One traced copy for all deep-supervision outputs (vmapped over them), not one per output.
  per_output = [draws["matcher"], draws["oversample"], draws["random"]] + ([draws["points"]] if "points" in draws else [])
  terms, matches, coords = jax.vmap(one_output, in_axes=(1, 1) + (0,) * len(per_output))(logits, masks, *per_output)
  weights = {"loss_ce": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}
  losses = {name + output_suffix(i, n): weights[name] * terms[name][i] for i in range(n) for name in weights}
  aux = {"matches": [jax.tree_util.tree_map(lambda a: a[i], matches) for i in range(n)],
         "point_coords": [coords[i] for i in range(n)], "num_masks": num_masks}
  return losses, aux


def total_loss(losses: Mapping[str, jax.Array]) -> jax.Array:
  return sum(losses.values())

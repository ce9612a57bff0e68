"""Point sampling, the Hungarian matcher and the set criterion against torch, scipy and the golden case.

References: torch's grid_sample (point_sample), a torch rewrite of PointRend's importance sampling and of
Mask2Former's matching costs (from their formulas), scipy's linear_sum_assignment, and the tiny_b16
golden case (official SAN training pass: recorded outputs, point draws, matches and weighted losses).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from convert import check_parity
from san_jax.losses import criterion as crit
from san_jax.losses import matcher
from san_jax.ops import sampling
from tests.conftest import REPO, case_dir


def torch_point_sample(x: np.ndarray, coords: np.ndarray) -> torch.Tensor:
  """detectron2's point_sample: grid_sample at 2*coords-1, bilinear, zeros padding, align_corners=False."""
  xt = torch.from_numpy(x)
  squeeze = xt.dim() == 3
  xt = xt[:, None] if squeeze else xt
  grid = 2.0 * torch.from_numpy(coords).unsqueeze(2) - 1.0
  out = F.grid_sample(xt, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]
  return out[:, 0] if squeeze else out


def border_coords(rng, n, p, h, w):
  """Uniform points plus corners, pixel centres next to the border, and points outside [0, 1]."""
  c = rng.random((n, p, 2)).astype(np.float32)
  special = np.array([[0, 0], [1, 1], [0, 1], [1, 0], [0.5 / w, 0.5 / h], [1 - 0.5 / w, 1 - 0.5 / h],
                      [0.25 / w, 0.5], [1 - 0.25 / w, 0.5], [0.5, 0.1 / h], [0.5, 1 - 0.1 / h],
                      [-0.01, 0.5], [1.01, 0.3], [0.3, 1.2], [-0.3, -0.2], [np.float32(1) - 1e-7, 1e-7]],
                     np.float32)
  c[:, :len(special)] = special
  return c


# ---- point_sample ------------------------------------------------------------------------------------
def rounding_bound(x: np.ndarray, h: int, w: int) -> float:
  """How far float32 rounding alone can take us from torch's CPU grid_sample.

  torch's vectorised kernel is compiled with FMA contraction: the pixel coordinate (g+1)*size/2-0.5 is
  rounded once there and twice here, so the bilinear weights may differ by an ulp of the coordinate,
  i.e. size * 2^-24 (observed: up to half of this bound). A half-pixel or edge-handling mistake is
  orders of magnitude larger.
  """
  return float(np.abs(x).max()) * 2.0 ** (np.floor(np.log2(max(h, w, 1))) - 23) + 1e-7


@pytest.mark.parametrize("shape", [(3, 2, 20, 22), (2, 17, 9), (1, 1, 1, 1), (4, 320, 352)])
def test_point_sample_matches_grid_sample(shape):
  rng = np.random.default_rng(sum(shape))
  x = (rng.normal(size=shape) * 10).astype(np.float32)
  h, w = shape[-2:]
  coords = border_coords(rng, shape[0], 301, h, w)
  ref = torch_point_sample(x, coords).numpy()
  got = np.asarray(jax.jit(sampling.point_sample)(jnp.asarray(x), jnp.asarray(coords)))
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=0, atol=rounding_bound(x, h, w))


def test_point_sample_shared_coords_int_masks_and_gradient():
  rng = np.random.default_rng(1)
  masks = (rng.random((3, 40, 30)) > 0.5).astype(np.uint8)
  coords = border_coords(rng, 1, 200, 40, 30)
  got = sampling.point_sample(jnp.asarray(masks), jnp.asarray(coords))  # one draw shared by all rows
  ref = torch_point_sample(masks.astype(np.float32), np.repeat(coords, 3, 0)).numpy()
  np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=rounding_bound(masks, 40, 30))
  # gradient w.r.t. the sampled map, as torch's grid_sample backward
  x = rng.normal(size=(2, 12, 14)).astype(np.float32)
  c = border_coords(rng, 2, 150, 12, 14)
  cot = rng.normal(size=(2, 150)).astype(np.float32)
  g = jax.grad(lambda v: (sampling.point_sample(v, jnp.asarray(c)) * cot).sum())(jnp.asarray(x))
  xt = torch.from_numpy(x).requires_grad_(True)
  grid = 2.0 * torch.from_numpy(c).unsqueeze(2) - 1.0
  (F.grid_sample(xt[:, None], grid, align_corners=False)[:, 0, :, 0] * torch.from_numpy(cot)).sum().backward()
  np.testing.assert_allclose(np.asarray(g), xt.grad.numpy(), rtol=0, atol=4 * rounding_bound(cot, 12, 14))


# ---- importance sampling -----------------------------------------------------------------------------
def torch_uncertain_points(logits, num_points, oversample_ratio, importance_ratio, over, rand):
  """PointRend's get_uncertain_point_coords_with_randomness with the two draws given (torch)."""
  logits = torch.from_numpy(logits)[:, None]
  n, num_sampled = logits.shape[0], int(num_points * oversample_ratio)
  over = torch.from_numpy(over)
  point_logits = F.grid_sample(logits, 2.0 * over.unsqueeze(2) - 1.0, align_corners=False)[..., 0]
  uncertainty = -point_logits.abs()
  k = int(importance_ratio * num_points)
  idx = torch.topk(uncertainty[:, 0, :], k=k, dim=1)[1]
  idx = idx + num_sampled * torch.arange(n)[:, None]
  chosen = over.reshape(-1, 2)[idx.reshape(-1)].reshape(n, k, 2)
  return torch.cat([chosen, torch.from_numpy(rand)], 1).numpy()


@pytest.mark.parametrize("num_points,oversample,importance", [(100, 3.0, 0.75), (37, 2.5, 0.6), (64, 1.0, 1.0), (50, 3.0, 0.0)])
def test_importance_sampling_matches_torch(num_points, oversample, importance):
  rng = np.random.default_rng(num_points)
  logits = (rng.normal(size=(5, 13, 17)) * 8).astype(np.float32)
  n_s, n_u, n_r = sampling.importance_counts(num_points, oversample, importance)
  over = rng.random((5, n_s, 2)).astype(np.float32)
  rand = rng.random((5, n_r, 2)).astype(np.float32)
  ref = torch_uncertain_points(logits, num_points, oversample, importance, over, rand)
  fn = jax.jit(functools.partial(sampling.uncertain_point_coords_with_randomness,
                                 uncertainty_fn=sampling.calculate_uncertainty, num_points=num_points,
                                 oversample_ratio=oversample, importance_sample_ratio=importance))
  got = np.asarray(fn(jnp.asarray(logits), oversample_coords=jnp.asarray(over), random_coords=jnp.asarray(rand)))
  assert got.shape == ref.shape == (5, num_points, 2)
  np.testing.assert_array_equal(got[:, n_u:], rand)  # uniform points appended as drawn
  # Same selected sets; the descending order agrees except where float rounding reorders a near-tie.
  if n_u:  # (importance 0: no selection, torch concatenates an empty top-k)
    np.testing.assert_array_equal(check_parity.common_points(got[:, :n_u], ref[:, :n_u]), 1.0)
  assert np.mean(np.all(got == ref, -1)) > 0.99
  # with a key instead of draws: right shape, in [0, 1), deterministic
  key_fn = jax.jit(lambda l, k: sampling.uncertain_point_coords_with_randomness(
      l, sampling.calculate_uncertainty, num_points, oversample, importance, rng=k))
  a, b = key_fn(jnp.asarray(logits), jax.random.key(0)), key_fn(jnp.asarray(logits), jax.random.key(0))
  assert a.shape == (5, num_points, 2) and np.array_equal(a, b) and float(a.min()) >= 0 and float(a.max()) < 1


# ---- matcher -----------------------------------------------------------------------------------------
def torch_costs(logits, pred_pts, labels, tgt_pts, w_class=2.0, w_mask=5.0, w_dice=5.0):
  """Mask2Former's matching cost on sampled points (torch, from the formulas)."""
  logits, x, t = (torch.from_numpy(a) for a in (logits, pred_pts, tgt_pts))
  cost_class = -logits.softmax(-1)[:, torch.from_numpy(labels)]
  pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
  neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
  cost_mask = (torch.einsum("nc,mc->nm", pos, t) + torch.einsum("nc,mc->nm", neg, 1 - t)) / x.shape[1]
  s = x.sigmoid()
  cost_dice = 1 - (2 * torch.einsum("nc,mc->nm", s, t) + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
  return (w_mask * cost_mask + w_class * cost_class + w_dice * cost_dice).numpy()


def test_match_cost_matches_torch():
  rng = np.random.default_rng(3)
  b, q, c, t, p = 2, 12, 9, 5, 500
  logits = (rng.normal(size=(b, q, c + 1)) * 3).astype(np.float32)
  pred = (rng.normal(size=(b, q, 10, 11)) * 6).astype(np.float32)
  masks = (rng.random((b, t, 40, 44)) > 0.6).astype(np.uint8)
  labels = rng.integers(0, c, (b, t))
  pts = rng.random((b, p, 2)).astype(np.float32)
  got = np.asarray(jax.jit(matcher.match_cost)(jnp.asarray(logits), jnp.asarray(pred), jnp.asarray(labels),
                                               jnp.asarray(masks), jnp.asarray(pts)))
  assert got.shape == (b, q, t)
  for i in range(b):  # the batched costs are each image's own
    ref = torch_costs(logits[i], torch_point_sample(pred[i], np.repeat(pts[i][None], q, 0)).numpy(), labels[i],
                      torch_point_sample(masks[i].astype(np.float32), np.repeat(pts[i][None], t, 0)).numpy())
    np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("q,t", [(10, 4), (3, 5), (6, 6)])
def test_assign_matches_scipy_and_never_matches_padding(q, t):
  rng = np.random.default_rng(q * 10 + t)
  b = 5
  cost = rng.normal(size=(b, q, t)).astype(np.float32)
  num_valid = np.array([0, 1, t, max(t - 2, 0), t], np.int32)[:b]
  bait = cost.copy()
  for i, n in enumerate(num_valid):
    bait[i, :, n:] = -1e6  # padded columns are the cheapest by far: they must still never be assigned
  out = jax.jit(matcher.assign)(jnp.asarray(bait), jnp.asarray(num_valid))
  k = min(q, t)
  assert out["pred_idx"].shape == out["tgt_idx"].shape == out["valid"].shape == (b, k)
  for i, n in enumerate(num_valid):
    r, c = linear_sum_assignment(cost[i, :, :n])
    valid = np.asarray(out["valid"][i])
    assert valid.sum() == len(r) == min(q, n) and valid[:len(r)].all()
    np.testing.assert_array_equal(np.asarray(out["pred_idx"][i])[valid], r)
    np.testing.assert_array_equal(np.asarray(out["tgt_idx"][i])[valid], c)
    assert (np.asarray(out["tgt_idx"][i])[valid] < n).all()
  # vmapped over an extra axis gives the same
  both = jax.vmap(matcher.assign)(jnp.stack([jnp.asarray(bait)] * 2), jnp.stack([jnp.asarray(num_valid)] * 2))
  np.testing.assert_array_equal(np.asarray(both["tgt_idx"][1]), np.asarray(out["tgt_idx"]))


# ---- criterion on the golden case --------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def golden():
  d = case_dir("tiny_b16")
  meta = json.loads((d / "case.json").read_text())
  inp, out = dict(np.load(d / "inputs.npz")), dict(np.load(d / "outputs.npz"))
  idxs = meta["san_cfg"]["MODEL"]["SIDE_ADAPTER"]["DEEP_SUPERVISION_IDXS"]
  outputs = {"mask_preds": np.stack([out[f"train_ds{i}_mask_preds"] for i in idxs], 1),
             "mask_logits": np.stack([out[f"train_ds{i}_mask_logits"] for i in idxs], 1)}
  n_img = len(meta["images"])
  targets = crit.pad_targets([inp[f"gt_{i}_labels"] for i in range(n_img)], [inp[f"gt_{i}_masks"] for i in range(n_img)],
                             tuple(meta["padded_input_hw"]))
  q = outputs["mask_preds"].shape[2]
  k = min(q, targets["labels"].shape[1])
  slots = np.arange(k)[None] < np.minimum(targets["valid"].sum(1), q)[:, None]
  tags = [check_parity.output_tag(s, len(idxs)) for s in range(len(idxs))]
  draws = {"matcher": np.stack([np.concatenate([inp[f"points_matcher_{t}_img{b}"] for b in range(n_img)]) for t in tags]),
           "oversample": np.stack([check_parity.scatter_slots(inp[f"points_criterion_{t}_oversample"], slots, t) for t in tags]),
           "random": np.stack([check_parity.scatter_slots(inp[f"points_criterion_{t}_random"], slots, t) for t in tags])}
  cfg = check_parity.criterion_config_from_official(meta["san_cfg"], outputs["mask_logits"].shape[-1] - 1)
  return meta, inp, out, outputs, targets, draws, tags, slots, cfg


def run_criterion(outputs, targets, cfg, draws):
  return jax.jit(lambda o, t, d: crit.set_criterion(o, t, cfg, draws=d))(outputs, targets, draws)


def test_criterion_matches_golden_case():
  meta, inp, out, outputs, targets, draws, tags, slots, cfg = golden()
  losses, aux = run_criterion(outputs, targets, cfg, draws)
  assert sorted(losses) == sorted(meta["losses"])
  for name, ref in meta["losses"].items():
    assert abs(float(losses[name]) - ref) <= 1e-5 * abs(ref), (name, float(losses[name]), ref)
  assert abs(float(crit.total_loss(losses)) - meta["loss_total"]) <= 1e-5 * meta["loss_total"]
  assert float(aux["num_masks"]) == meta["criterion"]["num_masks_normalizer"]
  for s, tag in enumerate(tags):
    match = jax.tree_util.tree_map(np.asarray, aux["matches"][s])
    for b in range(targets["labels"].shape[0]):
      n = int(targets["valid"][b].sum())
      ref_cost = out[f"match_{tag}_img{b}_cost"]
      np.testing.assert_allclose(match["cost"][b, :, :n], ref_cost, rtol=1e-5, atol=1e-5 * np.abs(ref_cost).max())
      np.testing.assert_array_equal(match["pred_idx"][b][match["valid"][b]], out[f"match_{tag}_img{b}_pred_idx"])
      np.testing.assert_array_equal(match["tgt_idx"][b][match["valid"][b]], out[f"match_{tag}_img{b}_tgt_idx"])
    # fed the official logits, the importance sampler picks the recorded points, in the recorded order
    np.testing.assert_array_equal(np.asarray(aux["point_coords"][s])[slots], inp[f"points_criterion_{tag}"])


def torch_mask_losses_at(src: np.ndarray, tgt: np.ndarray, points: np.ndarray, num_masks: float):
  """Mask2Former's loss_masks (sigmoid BCE mean over points, dice with +1 smoothing), summed over the
  matched masks and divided by num_masks, at given points: torch, from the formulas."""
  logits = torch_point_sample(src, points)
  labels = torch_point_sample(tgt.astype(np.float32), points)
  bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks
  p = logits.sigmoid()
  dice = (1 - (2 * (p * labels).sum(-1) + 1) / (p.sum(-1) + labels.sum(-1) + 1)).sum() / num_masks
  return float(bce), float(dice)


def test_criterion_takes_the_mask_losses_at_given_points():
  """draws["points"] (a recorded selection, as the parity checker replays it) replaces the selection in
  the mask losses, while aux["point_coords"] still reports the selection made from the draws. Reference:
  torch's grid_sample + BCE + dice at the given points, on the golden case's matched masks."""
  meta, inp, out, outputs, targets, draws, tags, slots, cfg = golden()
  recorded = np.stack([check_parity.scatter_slots(inp[f"points_criterion_{t}"], slots, t) for t in tags])
  same, _ = run_criterion(outputs, targets, cfg, {**draws, "points": recorded})
  for name, ref in meta["losses"].items():  # the recorded points are the official selection itself
    assert abs(float(same[name]) - ref) <= 1e-5 * abs(ref), name
  # Swap points for others: a third of every row's importance-sampled points for oversampled ones it did
  # not pick, so the selection and the given points really differ.
  moved = recorded.copy()
  n_imp = cfg.draw_counts()[1]
  moved[..., : n_imp // 3, :] = draws["oversample"][..., -(n_imp // 3):, :]
  got, aux = run_criterion(outputs, targets, cfg, {**draws, "points": moved})
  s = len(tags) - 1  # the final output: losses unsuffixed
  match = jax.tree_util.tree_map(np.asarray, aux["matches"][s])
  src = np.stack([outputs["mask_preds"][b, s, match["pred_idx"][b, k]] for b, k in zip(*np.nonzero(slots))])
  tgt = np.stack([targets["masks"][b, match["tgt_idx"][b, k]] for b, k in zip(*np.nonzero(slots))])
  bce, dice = torch_mask_losses_at(src, tgt, moved[s][slots], float(aux["num_masks"]))
  assert float(got["loss_mask"]) == pytest.approx(cfg.mask_weight * bce, rel=1e-5)
  assert float(got["loss_dice"]) == pytest.approx(cfg.dice_weight * dice, rel=1e-5)
  assert abs(float(got["loss_mask"]) - meta["losses"]["loss_mask"]) > 1e-3  # the points did matter
  np.testing.assert_array_equal(np.asarray(aux["point_coords"][s])[slots], inp[f"points_criterion_{tags[s]}"])
  with pytest.raises(ValueError, match="points"):
    run_criterion(outputs, targets, cfg, {**draws, "points": moved[:, :, :, :10]})


def test_common_points_counts_a_swapped_point_once():
  """One point of a row replaced (a near-tie swapped at the k-th place) costs 1/P of that row, wherever it
  sits; order does not matter. Reference: Python sets of coordinate pairs."""
  rng = np.random.default_rng(3)
  ref = rng.random((3, 1024, 2)).astype(np.float32)
  got = ref[:, rng.permutation(1024)].copy()
  got[1, 17] = np.float32([0.123, 0.456])  # not among the reference's points
  want = [len({tuple(p) for p in g} & {tuple(p) for p in r}) / 1024 for g, r in zip(got.tolist(), ref.tolist())]
  np.testing.assert_allclose(check_parity.common_points(got, ref), want)
  assert want == [1.0, 1023 / 1024, 1.0]


def test_criterion_ignores_extra_target_padding():
  _, _, _, outputs, targets, draws, _, slots, cfg = golden()
  ref, _ = run_criterion(outputs, targets, cfg, draws)
  t = targets["labels"].shape[1]
  more = crit.pad_targets([l[v] for l, v in zip(targets["labels"], targets["valid"])],
                          [m[v] for m, v in zip(targets["masks"], targets["valid"])], targets["masks"].shape[2:], t + 3)
  pad = lambda a: np.pad(a, [(0, 0), (0, 0), (0, 3)] + [(0, 0)] * (a.ndim - 3))
  got, aux = run_criterion(outputs, more, cfg, {"matcher": draws["matcher"], "oversample": pad(draws["oversample"]),
                                                "random": pad(draws["random"])})
  for name in ref:
    assert float(got[name]) == pytest.approx(float(ref[name]), rel=1e-6), name
  assert all((np.asarray(m["tgt_idx"])[np.asarray(m["valid"])] < t).all() for m in aux["matches"])


def test_criterion_jit_grad_with_rng():
  """The rng path under jit + grad, with an image without targets: finite, non-zero gradients, and the
  same key gives the same losses."""
  rng = np.random.default_rng(7)
  b, n, q, c, t = 2, 2, 6, 4, 3
  outputs = {"mask_logits": jnp.asarray(rng.normal(size=(b, n, q, c + 1)).astype(np.float32)),
             "mask_preds": jnp.asarray((rng.normal(size=(b, n, q, 8, 8)) * 5).astype(np.float32))}
  masks = [(rng.random((k, 32, 30)) > 0.5).astype(np.uint8) for k in (t, 0)]
  targets = crit.pad_targets([rng.integers(0, c, t), np.zeros(0, np.int64)], masks, (32, 32))
  cfg = crit.CriterionConfig(num_classes=c, num_points=64)

  def total(o, key):
    losses, aux = crit.set_criterion(o, targets, cfg, rng=key)
    return crit.total_loss(losses), aux

  fn = jax.jit(jax.value_and_grad(total, has_aux=True))
  (loss, aux), grads = fn(outputs, jax.random.key(0))
  for name, g in grads.items():
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0, name
  assert np.asarray(aux["matches"][0]["valid"]).sum(1).tolist() == [t, 0]
  assert float(aux["num_masks"]) == t
  assert np.isfinite(float(loss)) and float(fn(outputs, jax.random.key(0))[0][0]) == float(loss)


SHARDED_SCRIPT = """
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from san_jax.losses import criterion as crit
rng = np.random.default_rng(7)
b, n, q, c = 8, 2, 6, 4
outputs = {"mask_logits": rng.normal(size=(b, n, q, c + 1)).astype(np.float32),
           "mask_preds": (rng.normal(size=(b, n, q, 8, 8)) * 5).astype(np.float32)}
masks = [(rng.random((k, 32, 30)) > 0.5).astype(np.uint8) for k in [3, 1, 0, 2, 3, 3, 1, 2]]
targets = crit.pad_targets([rng.integers(0, c, len(m)) for m in masks], masks, (32, 32))
cfg = crit.CriterionConfig(num_classes=c, num_points=64)

def total(o, t, key):
  losses, aux = crit.set_criterion(o, t, cfg, rng=key)
  return crit.total_loss(losses), aux["matches"][0]["pred_idx"]

ref, ref_idx = jax.jit(total)(outputs, targets, jax.random.key(0))
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
with jax.set_mesh(mesh):
  put = lambda tree: jax.tree.map(lambda a: jax.device_put(a, P("data")), tree)
  (loss, idx), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(put(outputs), put(targets), jax.random.key(0))
assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref)), (float(loss), float(ref))
assert np.array_equal(np.asarray(idx), np.asarray(ref_idx))
assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())
print("sharded ok")
"""


def test_criterion_on_a_batch_sharded_over_8_devices():
  """jit + grad with the batch sharded over an explicit-sharding mesh of 8 fake CPU devices (the train
  step's layout: batch-sharded outputs and targets meet replicated point draws) gives the unsharded loss."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=str(REPO))
  res = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True)
  assert res.returncode == 0 and "sharded ok" in res.stdout, res.stderr[-3000:]


# The whole golden case (forward, losses, assignments, gradients) through the parity checker is
# tests/test_san_model.py::test_parity_tiny_b16_every_array.


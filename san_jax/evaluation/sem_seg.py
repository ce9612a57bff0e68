"""Semantic segmentation metrics with detectron2's SemSegEvaluator definitions (mIoU, fwIoU, mACC, pACC).

The state is one confusion matrix M of shape (K+1, K+1), int64, over K classes plus an "ignore" slot:
M[p, g] counts pixels predicted p whose ground truth is g, with ignored ground truth (the ignore label)
moved to column K, exactly as detectron2 builds it (`bincount((K+1) * pred + gt)`). Everything follows
from M, so matrices from different batches, devices and hosts simply add.

Metrics (detectron2 v0.6, the version SAN's install.sh pins), with tp = diag(M)[:K], pos_gt the column
sums and pos_pred the row sums of M[:K, :K] (ignored pixels never count, predictions included):
  acc_valid = pos_gt > 0, iou_valid = pos_gt + pos_pred > 0
  ACC[c] = tp / pos_gt                        (NaN where not acc_valid)
  IoU[c] = tp / (pos_gt + pos_pred - tp)      (NaN where not acc_valid)
  mACC  = mean of ACC over acc_valid
  mIoU  = sum of IoU over acc_valid / count of iou_valid
  fwIoU = sum over acc_valid of IoU * pos_gt / sum(pos_gt)
  pACC  = sum(tp) / sum(pos_gt)
all reported in percent. A class that is predicted somewhere but has no ground-truth pixel therefore has
no IoU of its own (NaN) yet counts as 0 in the mIoU. detectron2 releases after v0.6 changed that rule
(`iou_valid = acc_valid & union > 0`: such classes are left out); `legacy_miou=False` gives that variant.

`confusion_matrix` is the jittable form for on-device accumulation (static shapes; padding marked with the
ignore label); `SemSegEvaluator` accumulates on the host in int64 and all-reduces across processes.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255


# ---- the confusion matrix --------------------------------------------------------------------------------
def confusion_matrix(pred: jax.Array, gt: jax.Array, num_classes: int, ignore: int = IGNORE_LABEL) -> jax.Array:
  """Jittable detectron2 confusion matrix [K+1, K+1] (int32) of one or many label maps of equal shape.

  `pred` must hold class ids in [0, K) (an argmax). Ground truth equal to `ignore`, and any value outside
  [0, K) (canvas padding, a dataset's unlabeled marker), goes to column K, which no metric reads (so
  matrices of padded and unpadded maps differ only there). int32 is
  enough for one batch (< 2^31 pixels); accumulate across batches in int64 on the host.
  """
  k = int(num_classes)
  gt = gt.astype(jnp.int32)
  gt = jnp.where((gt == ignore) | (gt < 0) | (gt >= k), k, gt)
  flat = pred.astype(jnp.int32).reshape(-1) * (k + 1) + gt.reshape(-1)
  return jnp.bincount(flat, length=(k + 1) ** 2).reshape(k + 1, k + 1).astype(jnp.int32)


def confusion_matrix_np(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int = IGNORE_LABEL) -> np.ndarray:
  """Host version of `confusion_matrix` (int64), strict like detectron2: a ground-truth value that is neither
  a class id nor the ignore label is an error (it usually means the wrong vocabulary or ignore label)."""
  k = int(num_classes)
  pred = np.asarray(pred).astype(np.int64)
  gt = np.asarray(gt).astype(np.int64)
  if pred.shape != gt.shape:
    raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} shapes differ")
  if pred.size and (pred.min() < 0 or pred.max() >= k):
    raise ValueError(f"predictions must be class ids in [0, {k}), got [{pred.min()}, {pred.max()}]")
  gt = np.where(gt == ignore, k, gt)
  bad = (gt < 0) | (gt > k)
  if bad.any():
    raise ValueError(f"ground truth holds values {np.unique(gt[bad])[:10].tolist()} that are neither class ids "
                     f"in [0, {k}) nor the ignore label {ignore}")
  return np.bincount((k + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=(k + 1) ** 2).reshape(k + 1, k + 1)


# ---- metrics ---------------------------------------------------------------------------------------------
def _nanfloat(x) -> Optional[float]:
  x = float(x)
  return None if math.isnan(x) else x


def metrics_from_matrix(matrix: np.ndarray, class_names: Optional[Sequence[str]] = None, *,
                        subsets: Optional[Mapping[str, Iterable[int]]] = None,
                        legacy_miou: bool = True) -> Dict[str, Any]:
  """detectron2's SemSegEvaluator.evaluate on a (K+1, K+1) matrix (see the module docstring).

  Returns {"mIoU", "fwIoU", "mACC", "pACC"} in percent, "IoU" and "ACC" (per class, by name, NaN where the
  class has no ground truth), the raw per-class arrays "iou"/"acc" (fractions), and for each named subset
  of class ids (e.g. seen/unseen) "mIoU-<name>" (the same rule restricted to the subset; NaN when none of
  its classes is valid). With both "seen" and "unseen" subsets, "hIoU" is their harmonic mean.
  """
  m = np.asarray(matrix, np.int64)
  k = m.shape[0] - 1
  if m.shape != (k + 1, k + 1) or k < 1:
    raise ValueError(f"confusion matrix must be square (K+1, K+1) with K >= 1, got {m.shape}")
  names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
  if len(names) != k:
    raise ValueError(f"{len(names)} class names for a matrix of {k} classes")
  tp = np.diagonal(m)[:-1].astype(np.float64)
  pos_gt = m[:-1, :-1].sum(axis=0).astype(np.float64)
  pos_pred = m[:-1, :-1].sum(axis=1).astype(np.float64)
  acc_valid = pos_gt > 0
  union = pos_gt + pos_pred - tp
  iou_valid = (pos_gt + pos_pred) > 0 if legacy_miou else acc_valid & (union > 0)
  acc = np.full(k, np.nan)
  iou = np.full(k, np.nan)
  acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
  iou[acc_valid] = tp[acc_valid] / union[acc_valid]
  total_gt = pos_gt.sum()

  def ratio(num, den):
    return float(num / den) if den > 0 else float("nan")

  out: Dict[str, Any] = {
      "mIoU": 100 * ratio(iou[acc_valid].sum(), iou_valid.sum()),
      "fwIoU": 100 * float((iou[acc_valid] * pos_gt[acc_valid]).sum() / total_gt) if total_gt > 0 else float("nan"),
      "mACC": 100 * ratio(acc[acc_valid].sum(), acc_valid.sum()),
      "pACC": 100 * ratio(tp.sum(), total_gt),
  }
  for name, ids in (subsets or {}).items():
    sel = np.zeros(k, bool)
    sel[list(ids)] = True
    out[f"mIoU-{name}"] = 100 * ratio(iou[acc_valid & sel].sum(), (iou_valid & sel).sum())
  if subsets and "seen" in subsets and "unseen" in subsets:
    s, u = out["mIoU-seen"], out["mIoU-unseen"]
    out["hIoU"] = 2 * s * u / (s + u) if s + u > 0 else float("nan")
  out["IoU"] = {n: 100 * float(v) for n, v in zip(names, iou)}
  out["ACC"] = {n: 100 * float(v) for n, v in zip(names, acc)}
  out["iou"], out["acc"] = iou, acc
  return out


def json_ready(metrics: Mapping[str, Any]) -> Dict[str, Any]:
  """The metrics as JSON-able values: NaN -> null, arrays dropped (per-class values are in IoU/ACC)."""
  out: Dict[str, Any] = {}
  for key, v in metrics.items():
    if isinstance(v, np.ndarray):
      continue
    if isinstance(v, Mapping):
      out[key] = {n: _nanfloat(x) for n, x in v.items()}
    elif isinstance(v, (float, np.floating)):
      out[key] = _nanfloat(v)
    else:
      out[key] = v
  return out


# ---- accumulation across hosts ---------------------------------------------------------------------------
def allreduce_matrix(matrix: np.ndarray) -> np.ndarray:
  """The sum of every process's int64 matrix (a no-op on one process).

  JAX arrays are int32 unless x64 is on, and counts over a whole data set can pass 2^31, so the matrix
  travels as two int32 halves (low 31 bits and the rest) and is put back together in int64.
  """
  m = np.asarray(matrix, np.int64)
  if jax.process_count() == 1:
    return m
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if (m < 0).any() or (m >> 62).any():
    raise ValueError("confusion matrix counts must be non-negative and below 2^62")
  lo = (m & (2 ** 31 - 1)).astype(np.int32)
  hi = (m >> 31).astype(np.int32)
  gathered = multihost_utils.process_allgather({"lo": lo, "hi": hi})  # [P, K+1, K+1] each
  return (np.asarray(gathered["hi"], np.int64) << 31).sum(axis=0) + np.asarray(gathered["lo"], np.int64).sum(axis=0)


class SemSegEvaluator:
  """Accumulates a confusion matrix over images and reports detectron2's metrics.

  `process(pred, gt)` adds label maps on the host; `add(matrix)` adds a matrix computed on device with
  `confusion_matrix`; `merge(other)` adds another evaluator; `all_reduce()` sums over processes (call it on
  every process before `evaluate()`).
  """

  def __init__(self, class_names: Sequence[str], ignore_label: int = IGNORE_LABEL, *,
               subsets: Optional[Mapping[str, Iterable[int]]] = None, legacy_miou: bool = True):
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)
    self.ignore_label = int(ignore_label)
    self.subsets = {k: tuple(int(i) for i in v) for k, v in (subsets or {}).items()}
    self.legacy_miou = legacy_miou
    self.reset()

  def reset(self) -> None:
    self.matrix = np.zeros((self.num_classes + 1,) * 2, np.int64)
    self.num_images = 0

  def process(self, pred: np.ndarray, gt: np.ndarray) -> None:
    """One label map [H, W] or a stack [B, H, W] and its ground truth (same shape)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    self.matrix += confusion_matrix_np(pred, gt, self.num_classes, self.ignore_label)
    self.num_images += 1 if pred.ndim == 2 else pred.shape[0]

  def add(self, matrix, num_images: int = 0) -> None:
    m = np.asarray(matrix).astype(np.int64)
    if m.shape != self.matrix.shape:
      raise ValueError(f"matrix {m.shape} does not fit this evaluator's {self.matrix.shape}")
    self.matrix += m
    self.num_images += int(num_images)

  def merge(self, other: "SemSegEvaluator") -> "SemSegEvaluator":
    if other.class_names != self.class_names or other.ignore_label != self.ignore_label:
      raise ValueError("cannot merge evaluators of different vocabularies or ignore labels")
    self.add(other.matrix, other.num_images)
    return self

  def all_reduce(self) -> None:
    self.matrix = allreduce_matrix(self.matrix)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.num_images = int(np.asarray(multihost_utils.process_allgather(np.int32(self.num_images))).sum())

  def evaluate(self) -> Dict[str, Any]:
    out = metrics_from_matrix(self.matrix, self.class_names, subsets=self.subsets, legacy_miou=self.legacy_miou)
    out["num_images"] = self.num_images
    return out

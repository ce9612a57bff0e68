"""Evaluating a model on a data set: `evaluate(model_or_segmenter, dataset_name, ...)`.

The core of `eval.py` and of a training run's periodic evaluation. Each data set is prompted with its own
vocabulary; images go through detectron2's test resize (short side 640, long side <= 2560 for SAN), in
batches on a common canvas (or one at a time with test-time augmentation / sliding windows); predictions
are resized to the original label size and compared there, on device, into a confusion matrix that is
summed over batches and hosts (`sem_seg.SemSegEvaluator`). Every host reads its own slice of the data.

Data sets: the built TFDS sets (`python -m san_jax.data.build NAME ...`, read from `data_dir`) and
`shapes`, the synthetic set rendered in memory (its val split), for which mIoU is also reported over the
seen and unseen classes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from san_jax.evaluation import inference
from san_jax.evaluation import sem_seg

DATASETS = ("coco_stuff_171", "ade20k_150", "ade20k_847", "pcontext_59", "pcontext_459", "voc_20", "voc_21",
            "shapes")


SHAPES_SPEC_KEYS = ("shapes_rotate", "shapes_min_radius", "shapes_max_radius", "shapes_min_objects",
                    "shapes_max_objects")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  batch_size: int = 1  # per host; 1 reproduces the official padding exactly
  min_size: int = 640  # detectron2 INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST
  max_size: int = 2560
  tta: bool = False
  tta_scales: Tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  tta_flip: bool = True
  sliding_window: bool = False
  window: int = 640
  stride: int = 426
  canvas_multiple: int = 0  # image canvases: multiples of this (0: the model's size_divisibility)
  output_multiple: int = 64  # output canvases (padding there is never counted)
  split: str = "val"
  max_examples: Optional[int] = None  # evaluate the first N examples only
  legacy_miou: bool = True  # detectron2 v0.6's mIoU (see sem_seg)
  num_threads: int = 2  # data loading threads
  shapes_num_examples: int = 64
  shapes_image_size: int = 128
  shapes_seed: int = 0
  # The run config's other `shapes_*` keys (rotation, radii, objects per scene: shapes.spec_from_config), so
  # that a run is evaluated on scenes like those it trained on; every class is drawn, unseen ones included.
  shapes_spec: Tuple[Tuple[str, Any], ...] = ()

  @classmethod
  def from_config(cls, cfg, **overrides) -> "EvalOptions":
    """From a run config's `eval` and `data` sections (configs/common.py), then keyword overrides."""
    e, d = cfg.eval, cfg.data
    kw = dict(batch_size=int(e.get("batch_size", 1)), tta=bool(e.get("tta", False)),
              tta_scales=tuple(float(s) for s in e.get("tta_scales", cls.tta_scales)),
              tta_flip=bool(e.get("tta_flip", True)), sliding_window=bool(e.get("sliding_window", False)),
              window=int(e.get("window", 640)), stride=int(e.get("stride", 426)),
              min_size=int(d.get("eval_min_size", 640)), max_size=int(d.get("eval_max_size", 2560)),
              shapes_num_examples=int(d.get("shapes_num_val", cls.shapes_num_examples)),
              shapes_image_size=int(d.get("shapes_image_size", cls.shapes_image_size)),
              shapes_seed=int(d.get("shapes_seed", 0)),
              shapes_spec=tuple(sorted((k, d[k]) for k in d.keys() if k in SHAPES_SPEC_KEYS)))
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**kw)

  def tta_config(self) -> Optional[inference.TTAConfig]:
    if not self.tta:
      return None
    return inference.TTAConfig.from_scales(self.tta_scales, self.min_size, self.max_size, self.tta_flip)

  def sliding(self) -> Optional[inference.SlidingWindow]:
    return inference.SlidingWindow(self.window, self.stride) if self.sliding_window else None


# ---- data --------------------------------------------------------------------------------------------------
class _Head:
  """The first n examples of a source (same interface)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(int(n), len(source))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]

  def __getattr__(self, name):
    if name.startswith("__") or name in ("source", "n"):  # not yet set (unpickling): no recursion
      raise AttributeError(name)
    return getattr(self.source, name)


def make_source(name: str, options: EvalOptions = EvalOptions(), data_dir: Optional[str] = None):
  """The evaluation split of a data set: `shapes` in memory, anything else built under data_dir."""
  if name == "shapes":
    from san_jax.data import shapes  # pylint: disable=g-import-not-at-top
    keys = {"shapes_image_size": options.shapes_image_size, **dict(options.shapes_spec)}
    source = shapes.ShapesSource(options.shapes_num_examples, seed=options.shapes_seed, split=options.split,
                                 spec=shapes.spec_from_config(keys, all_classes=True))
  else:
    if not data_dir:
      raise ValueError(f"data set {name!r} needs --data_dir: the directory `python -m san_jax.data.build "
                       f"{name} --manual_dir ... --data_dir DIR` wrote")
    from san_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    source = pipeline.load_source(name, options.split, data_dir)
  if options.max_examples is not None:
    source = _Head(source, options.max_examples)
  return source


def class_names_of(source, name: str) -> Tuple[str, ...]:
  names = getattr(source, "class_names", None)
  if callable(names):
    names = names()
  if names:
    return tuple(names)
  from san_jax.data import vocabularies  # pylint: disable=g-import-not-at-top
  return tuple(vocabularies.get_vocabulary(name))


def class_subsets(source, name: str, names: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
  """{"seen": ids, "unseen": ids} where the data set defines them (shapes; or a builder's metadata)."""
  seen = unseen = None
  if name == "shapes":
    from san_jax.data import shapes  # pylint: disable=g-import-not-at-top
    seen, unseen = shapes.seen_classes(), shapes.unseen_classes()
  else:
    meta = getattr(source, "metadata", None) or {}
    seen, unseen = meta.get("seen_classes"), meta.get("unseen_classes")
  if not seen or not unseen:
    return {}
  index = {n: i for i, n in enumerate(names)}
  return {"seen": tuple(index[n] for n in seen if n in index), "unseen": tuple(index[n] for n in unseen if n in index)}


# ---- progress ----------------------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


class Progress:
  """'name: done/total images, rate, ETA' at most every `every_s` seconds, and once at the end."""

  def __init__(self, name: str, total: int, log: Optional[Callable[[str], None]], every_s: float = 10.0):
    self.name, self.total, self.log, self.every_s = name, total, log, every_s
    self.start = self.last = time.perf_counter()
    self.done = 0

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if self.log is not None and (now - self.last >= self.every_s or self.done >= self.total):
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      self.log(f"{self.name}: {self.done}/{self.total} images  {rate:.2f} img/s  "
               f"elapsed {format_duration(now - self.start)}  ETA {format_duration(eta)}")

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self.start


# ---- the loop ----------------------------------------------------------------------------------------------
class _LaggedSum:
  """Adds device confusion matrices into the evaluator one step late, so the host prepares the next batch
  while the device still computes this one."""

  def __init__(self, evaluator: sem_seg.SemSegEvaluator):
    self.evaluator = evaluator
    self.pending = None

  def push(self, matrix, num_images: int) -> None:
    self.flush()
    self.pending = (matrix, num_images)

  def flush(self) -> None:
    if self.pending is not None:
      matrix, n = self.pending
      self.evaluator.add(np.asarray(jax.device_get(matrix)), n)
      self.pending = None


def evaluate(model_or_segmenter, dataset_name: str, *, options: EvalOptions = EvalOptions(),
             data_dir: Optional[str] = None, source=None, vocabulary: Optional[Sequence[str]] = None,
             out_dir: Optional[str] = None, extra: Optional[Mapping[str, Any]] = None,
             log: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
  """Evaluates a SAN (or a `Segmenter`, reused across calls without recompiling) on one data set.

  Returns the metrics of `sem_seg.metrics_from_matrix` plus "dataset", "num_images" and "time_s"; with
  `out_dir`, process 0 also writes out_dir/eval_<dataset>.json (JSON-able metrics, per-class IoU/ACC,
  options, and `extra`). `source` overrides the data set's own (anything with len, [i] -> {"image",
  "label"}); `vocabulary` overrides its class names.
  """
  from san_jax.data import augment, pipeline  # pylint: disable=g-import-not-at-top
  if isinstance(model_or_segmenter, inference.Segmenter):
    seg = model_or_segmenter
  else:
    seg = inference.Segmenter(model_or_segmenter, canvas_multiple=options.canvas_multiple or None,
                              output_multiple=options.output_multiple)
  if source is None:
    source = make_source(dataset_name, options, data_dir)
  elif options.max_examples is not None:
    source = _Head(source, options.max_examples)
  names = tuple(vocabulary) if vocabulary is not None else class_names_of(source, dataset_name)
  ignore = int(getattr(source, "ignore_label", sem_seg.IGNORE_LABEL))
  evaluator = sem_seg.SemSegEvaluator(names, ignore, subsets=class_subsets(source, dataset_name, names),
                                      legacy_miou=options.legacy_miou)
  emb = seg.embeddings(names)
  tta, sliding = options.tta_config(), options.sliding()
  eval_aug = augment.EvalAugConfig(min_size_test=options.min_size, max_size_test=options.max_size,
                                   size_divisibility=seg.canvas_multiple, ignore_label=ignore)
  per_image = tta is not None or sliding is not None
  pipe = pipeline.make_pipeline(source, mode="eval", batch_size=1 if per_image else max(int(options.batch_size), 1),
                                eval_aug=eval_aug, ignore_label=ignore, num_threads=options.num_threads)
  mine = pipeline.host_indices(len(source), pipe.config.process_index, pipe.config.process_count, even=False)
  progress = Progress(dataset_name, len(mine), log)
  sums = _LaggedSum(evaluator)
  with pipe:
    for batch in pipe:
      n_valid = int(np.sum(batch["example_valid"]))
      if per_image:
        if n_valid:
          (h, w), (oh, ow) = batch["image_size"][0], batch["orig_size"][0]
          _, conf = seg.evaluate_image(batch["image"][0, :h, :w], batch["sem_seg"][0, :oh, :ow], emb, len(names),
                                       ignore, tta=tta, sliding=sliding)
          sums.push(conf, 1)
      else:
        _, conf = seg.evaluate_batch(batch, emb, len(names), ignore)
        sums.push(conf, n_valid)
      progress.update(n_valid)
  sums.flush()
  evaluator.all_reduce()
  results = evaluator.evaluate()
  results.update(dataset=dataset_name, time_s=progress.elapsed, confusion_matrix=evaluator.matrix)
  if out_dir and jax.process_index() == 0:
    write_results(os.path.join(out_dir, f"eval_{dataset_name}.json"), results, options, names, ignore, extra)
  return results


def write_results(path: str, results: Mapping[str, Any], options: EvalOptions, names: Sequence[str], ignore: int,
                  extra: Optional[Mapping[str, Any]] = None) -> None:
  ready = sem_seg.json_ready(results)
  per_class = {k: ready.pop(k) for k in ("IoU", "ACC")}
  # Pixel counts per class (the confusion matrix's margins): what the percentages are fractions of, and a
  # check that several hosts' slices together saw the same pixels and predicted the same as one host.
  m = np.asarray(results["confusion_matrix"], np.int64)[:-1, :-1]
  per_class["gt_pixels"] = dict(zip(names, m.sum(axis=0).tolist()))
  per_class["pred_pixels"] = dict(zip(names, m.sum(axis=1).tolist()))
  doc = {"dataset": ready.pop("dataset"), "split": options.split, "num_images": ready.pop("num_images"),
         "time_s": ready.pop("time_s"), "metrics": ready, "per_class": per_class, "num_classes": len(names),
         "ignore_label": ignore,
         "metric_definition": ("detectron2 v0.6 SemSegEvaluator (percent; per-class null: no ground truth)"
                               if options.legacy_miou else "detectron2 >= 2022 SemSegEvaluator (percent)"),
         "options": dataclasses.asdict(options), **dict(extra or {})}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=1)
  os.replace(tmp, path)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A plain-text table of the headline metrics, one row per data set."""
  cols = ["mIoU", "fwIoU", "mACC", "pACC"]
  extra = [c for c in ("mIoU-seen", "mIoU-unseen", "hIoU") if any(c in r for r in rows)]
  header = ["dataset", "images"] + cols + extra
  lines = [[str(r.get("dataset", "")), str(r.get("num_images", ""))] +
           [("-" if r.get(c) is None or (isinstance(r.get(c), float) and math.isnan(r[c])) else f"{r[c]:.2f}")
            for c in cols + extra] for r in rows]
  widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])

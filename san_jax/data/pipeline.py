"""The input pipeline: per-host shards, seeded shuffling, augmentation, static batches, resumable position.

Built on grain's MapDataset over any random-access source (a built data set from `load_source`, a
`tfds.data_source` split, or the in-memory `shapes.ShapesSource`): every element is a pure function of its
position, so

* training is host-count invariant: one global stream of examples (epoch e is the permutation of all N
  source indices drawn from (seed, e)) is cut into global batches of B = batch_size * P examples, and host
  p of P takes rows [p * batch_size, (p + 1) * batch_size) of every global batch, the rows its devices hold
  in the global array. Every augmentation draw of an example (scale, crop, colour, flip) is seeded by
  (seed, epoch, source index), never by the host, so global batch s is the same examples with the same
  draws on 1, 2 or 4 hosts;
* evaluation: host p of P takes source indices p, p + P, p + 2P, ...: together the whole split, once;
* the position is a global batch counter: `get_state()` returns a small JSON-able dict, and `set_state()` on
  a fresh pipeline (same source, seed, global batch size, which the state records and checks; any number of
  hosts) makes the next batch the one the saved pipeline would have produced, so a run saved on 4 hosts
  resumes on 2 or 1.

Batches are dicts of numpy arrays with fixed shapes (see `train_transform` / `eval_transform` in augment.py):
training gives image uint8 [B, H, W, 3], sem_seg int32 [B, H, W], image_size int32 [B, 2], labels int32
[B, K], valid bool [B, K], masks uint8 [B, K, H, W] (unless with_masks=False) and num_dropped int32 [B];
evaluation gives image uint8 [B, H, W, 3] and sem_seg int32 [B, Hl, Wl] on the batch's common canvases (the
largest of its examples'), with each example's content sizes in image_size and orig_size int32 [B, 2]. Both add `index` int64 [B] (the source index; -1
in evaluation padding) and `example_valid` bool [B].
Evaluation reads each host's slice once, in order, and pads the last batch with invalid examples so every
host yields the same number of batches.

Decoding and augmentation run in `num_threads` threads (PIL and numpy release the GIL for most of it), or
in `num_workers` processes (grain mp_prefetch) where the GIL is the limit; `prefetch` batches are kept ready.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import grain
import numpy as np

from san_jax.data import augment

STATE_VERSION = 2  # 2: one global position whatever the host count (1 held a per-host grain position)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  mode: str = "train"  # "train": shuffled, repeated, augmented; "eval": one ordered pass
  batch_size: int = 8  # per host
  seed: int = 0
  process_index: int = 0
  process_count: int = 1
  num_epochs: Optional[int] = None  # train: None repeats forever
  shuffle: bool = True  # train only
  num_threads: int = 2
  prefetch: int = 2  # batches
  num_workers: int = 0  # >0: decode/augment in that many processes
  train_aug: augment.TrainAugConfig = augment.TrainAugConfig()
  eval_aug: augment.EvalAugConfig = augment.EvalAugConfig()

  def check(self) -> None:
    if self.mode not in ("train", "eval"):
      raise ValueError(f"mode must be 'train' or 'eval', got {self.mode!r}")
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
    if self.batch_size < 1:
      raise ValueError("batch_size must be >= 1")


# ----------------------------------------------------------------------------------------------------------
# Sources


def latest_version_dir(data_dir: str | Path, name: str, config: Optional[str] = None) -> Path:
  """data_dir/name[/config]/<highest version>, where `python -m san_jax.data.build` wrote the set."""
  base = Path(data_dir).expanduser() / name
  if config:
    base = base / config
  versions = [p for p in base.glob("*") if p.is_dir() and (p / "dataset_info.json").exists()]
  if not versions:
    raise FileNotFoundError(f"no built data set under {base}; build it with `python -m san_jax.data.build`")
  return max(versions, key=lambda p: tuple(int(x) for x in p.name.split(".")))


class BuiltSource:
  """A split of a built data set: random access like `tfds.data_source`, plus its vocabulary.

  `class_names`, `ignore_label` and `metadata` come from the builder's metadata, so a pipeline or an
  evaluator configures itself from the data (ADE20K-847 and Pascal Context-459 ignore 65535, not 255).
  Has the interface of `shapes.ShapesSource`.
  """

  def __init__(self, data_source, metadata: Mapping[str, Any], name: str = "", split: str = ""):
    self.data_source = data_source
    self.metadata = dict(metadata)
    self.name, self.split = name, split

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    return self.data_source[index]

  @property
  def class_names(self) -> Tuple[str, ...]:
    return tuple(self.metadata["class_names"])

  @property
  def ignore_label(self) -> int:
    return int(self.metadata["ignore_label"])

  def __repr__(self) -> str:
    return f"BuiltSource({self.name}/{self.split}, {len(self)} examples)"


def load_source(name: str, split: str, data_dir: str | Path, config: Optional[str] = None) -> BuiltSource:
  """A split of a data set built by `python -m san_jax.data.build`; needs no TensorFlow."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(latest_version_dir(data_dir, name, config))
  return BuiltSource(builder.as_data_source(split=split), builder.info.metadata or {}, name, split)


# ----------------------------------------------------------------------------------------------------------
# Per-element work (module-level classes so that worker processes can unpickle them)


def _as_label(label: np.ndarray) -> np.ndarray:
  return label[..., 0] if label.ndim == 3 else label


class _Load:
  """Source index -> {"image", "label", "index"} (index -1: an evaluation padding example)."""

  def __init__(self, source, ignore_label: int):
    self.source = source
    self.ignore_label = ignore_label

  def __call__(self, index: int) -> Dict[str, Any]:
    index = int(index)
    if index < 0:
      return {"image": np.zeros((1, 1, 3), np.uint8), "label": np.full((1, 1), self.ignore_label, np.int32),
              "index": np.int64(-1)}
    ex = self.source[index]
    return {"image": np.asarray(ex["image"]), "label": _as_label(np.asarray(ex["label"])),
            "index": np.int64(index)}


class _GlobalOrder:
  """Position in this host's stream -> (epoch, source index) of the global stream.

  Local position l is row j = l % b of this host's share of global batch s = l // b, i.e. global position
  g = s * B + p * b + j (B = b * P); g is element g % N of epoch g // N, whose order is the permutation of
  range(N) drawn from (seed, epoch) (the identity without shuffling)."""

  def __init__(self, num_examples: int, seed: int, shuffle: bool, local_batch: int, process_index: int,
               process_count: int):
    self.n, self.seed, self.shuffle = num_examples, seed, shuffle
    self.b, self.p, self.num_hosts = local_batch, process_index, process_count
    self._perm = (None, None)  # (epoch, permutation): consecutive positions share an epoch

  def __call__(self, local_position: int) -> Dict[str, Any]:
    step, row = divmod(int(local_position), self.b)
    g = step * self.b * self.num_hosts + self.p * self.b + row
    epoch, k = divmod(g, self.n)
    if not self.shuffle:
      return {"index": np.int64(k), "epoch": np.int64(epoch)}
    cached_epoch, perm = self._perm  # one read: grain may call this from several threads
    if cached_epoch != epoch:
      perm = np.random.default_rng(_derive_seed(self.seed, epoch, 0)).permutation(self.n)
      self._perm = (epoch, perm)
    return {"index": np.int64(perm[k]), "epoch": np.int64(epoch)}


class _LoadWithEpoch(_Load):
  """{"index", "epoch"} -> the loaded example, keeping its epoch for the augmentation's seed."""

  def __call__(self, element: Dict[str, Any]) -> Dict[str, Any]:
    out = super().__call__(int(element["index"]))
    out["epoch"] = element["epoch"]
    return out


class _TrainAugment(grain.transforms.Map):
  """The training chain without target masks (`_BatchTrain` writes those straight into the batch); the
  draws of an example come from (seed, epoch, source index) alone."""

  def __init__(self, cfg: augment.TrainAugConfig, seed: int):
    self.cfg = dataclasses.replace(cfg, with_masks=False)
    self.seed = seed

  def map(self, element: Dict[str, Any]) -> Dict[str, Any]:
    rng = np.random.default_rng(_derive_seed(self.seed, int(element["epoch"]), int(element["index"]), 1))
    out = augment.train_transform(element["image"], element["label"], rng, self.cfg)
    out["index"] = element["index"]
    out["example_valid"] = np.bool_(True)
    return out


class _EvalTransform(grain.transforms.Map):
  def __init__(self, cfg: augment.EvalAugConfig):
    self.cfg = cfg

  def map(self, element: Dict[str, Any]) -> Dict[str, Any]:
    out = augment.eval_transform(element["image"], element["label"], self.cfg)
    out["index"] = element["index"]
    out["example_valid"] = np.bool_(element["index"] >= 0)
    return out


class _BatchTrain:
  """Stacks training elements and builds the [B, K, H, W] masks in place (one pass over that memory,
  instead of per-example arrays copied again by the stack)."""

  def __init__(self, with_masks: bool):
    self.with_masks = with_masks

  def __call__(self, elements: Sequence[Dict[str, Any]]) -> Dict[str, np.ndarray]:
    batch = _stack(elements)
    if self.with_masks:
      sem, labels, valid = batch["sem_seg"], batch["labels"], batch["valid"]
      masks = np.zeros(labels.shape + sem.shape[1:], np.uint8)
      for b in range(len(elements)):
        n = int(valid[b].sum())  # valid rows come first
        np.equal(sem[b][None], labels[b, :n, None, None], out=masks[b, :n], casting="unsafe")
      batch["masks"] = masks
    return batch


class _BatchEval:
  """Stacks evaluation elements onto the batch's common canvas: each image (already padded to a multiple of
  size_divisibility, so the largest is one too) padded with image_pad_value, each original-size label with
  ignore_label; `image_size` / `orig_size` keep every element's own sizes. With a fixed image_canvas and
  label_canvas every element already has the batch's shape."""

  def __init__(self, cfg: augment.EvalAugConfig):
    self.fill = {"image": cfg.image_pad_value, "sem_seg": cfg.ignore_label}

  def __call__(self, elements: Sequence[Dict[str, Any]]) -> Dict[str, np.ndarray]:
    batch = _stack([{k: v for k, v in e.items() if k not in self.fill} for e in elements])
    for key, fill in self.fill.items():
      arrays = [np.asarray(e[key]) for e in elements]
      shape = tuple(max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim))
      out = np.full((len(arrays),) + shape, fill, arrays[0].dtype)
      for i, a in enumerate(arrays):
        out[(i,) + tuple(slice(0, n) for n in a.shape)] = a
      batch[key] = out
    return batch


def _stack(elements: Sequence[Dict[str, Any]]) -> Dict[str, np.ndarray]:
  shapes = {k: {np.shape(e[k]) for e in elements} for k in elements[0]}
  ragged = {k: s for k, s in shapes.items() if len(s) > 1}
  if ragged:
    raise ValueError(f"cannot batch elements of different shapes {ragged}")
  return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def host_indices(num_examples: int, process_index: int, process_count: int, *, even: bool) -> range:
  """Source indices of one host: a stride-P slice; `even` first trims to a multiple of P."""
  stop = num_examples - num_examples % process_count if even else num_examples
  return range(process_index, stop, process_count)


def _derive_seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class DataPipeline:
  """An iterator of batches with an exactly restorable position (see the module docstring)."""

  def __init__(self, source, config: PipelineConfig = PipelineConfig(), *, ignore_label: Optional[int] = None):
    """`ignore_label` (default: the source's `ignore_label`, when it has one) overrides the augmentation
    configs' value, so 16-bit sets (ignore 65535) need no extra setting."""
    config.check()
    if ignore_label is None:
      ignore_label = getattr(source, "ignore_label", None)
    if ignore_label is not None:
      config = dataclasses.replace(
          config, train_aug=dataclasses.replace(config.train_aug, ignore_label=int(ignore_label)),
          eval_aug=dataclasses.replace(config.eval_aug, ignore_label=int(ignore_label)))
    self.source = source
    self.config = config
    self.num_source_examples = len(source)
    self.ignore_label = config.train_aug.ignore_label if config.mode == "train" else config.eval_aug.ignore_label
    self._dataset = self._build()
    self._iter = None
    self._pending_state = None
    self._batches = 0

  # Construction -----------------------------------------------------------------------------------------

  def _build(self) -> grain.MapDataset:
    cfg = self.config
    train = cfg.mode == "train"
    if train:
      n, global_batch = self.num_source_examples, cfg.batch_size * cfg.process_count
      if n < global_batch:
        raise ValueError(f"{n} examples cannot fill a global batch of {global_batch} "
                         f"({cfg.batch_size} per host x {cfg.process_count} hosts)")
      # Global batches: the whole stream (all epochs, or forever) cut into B-sized batches, the rest dropped.
      steps = sys.maxsize // global_batch if cfg.num_epochs is None else n * cfg.num_epochs // global_batch
      ds = grain.MapDataset.range(steps * cfg.batch_size)
      ds = ds.map(_GlobalOrder(n, cfg.seed, cfg.shuffle, cfg.batch_size, cfg.process_index, cfg.process_count))
      ds = ds.map(_LoadWithEpoch(self.source, self.ignore_label))
      ds = ds.map(_TrainAugment(cfg.train_aug, cfg.seed))
      return ds.batch(cfg.batch_size, drop_remainder=True, batch_fn=_BatchTrain(cfg.train_aug.with_masks))
    # Evaluation: every host yields ceil(ceil(N / P) / B) batches; the shortfall is padding (index -1).
    indices = host_indices(self.num_source_examples, cfg.process_index, cfg.process_count, even=False)
    per_host = math.ceil(self.num_source_examples / cfg.process_count)
    total = math.ceil(per_host / cfg.batch_size) * cfg.batch_size
    padded = list(indices) + [-1] * (total - len(indices))
    ds = grain.MapDataset.source(padded).map(_Load(self.source, self.ignore_label))
    ds = ds.map(_EvalTransform(cfg.eval_aug))
    return ds.batch(cfg.batch_size, drop_remainder=False, batch_fn=_BatchEval(cfg.eval_aug))

  def _make_iterator(self):
    cfg = self.config
    read = grain.ReadOptions(num_threads=max(cfg.num_threads, 1), prefetch_buffer_size=max(cfg.prefetch, 1))
    ds = self._dataset
    if self._pending_state is not None:  # resume: start at the saved global batch
      ds = ds[int(self._pending_state["batches"]):]
      self._pending_state = None
    ids = ds.to_iter_dataset(read)
    if cfg.num_workers > 0:
      _mark_flags_parsed()
      ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                         per_worker_buffer_size=max(cfg.prefetch, 1)))
    return iter(ids)

  # Iteration --------------------------------------------------------------------------------------------

  def __len__(self) -> int:
    """Batches per pass (one epoch in training)."""
    if self.config.mode == "eval":
      return len(self._dataset)
    return self.num_source_examples // (self.config.batch_size * self.config.process_count)

  def __iter__(self) -> "DataPipeline":
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self._iter is None:
      self._iter = self._make_iterator()
    batch = next(self._iter)
    self._batches += 1
    # Multiprocess mode hands out views of grain's shared memory: copy those into arrays the caller owns.
    return {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}

  def close(self) -> None:
    if self._iter is not None and hasattr(self._iter, "close"):
      self._iter.close()
    self._iter = None

  def __enter__(self) -> "DataPipeline":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # Position ---------------------------------------------------------------------------------------------

  def _fingerprint(self) -> Dict[str, Any]:
    """What a saved position depends on: the same for every host and host count (global batch size)."""
    cfg = self.config
    return {"mode": cfg.mode, "seed": cfg.seed, "global_batch_size": cfg.batch_size * cfg.process_count,
            "num_source_examples": self.num_source_examples, "shuffle": cfg.shuffle,
            "num_epochs": cfg.num_epochs}

  def get_state(self) -> Dict[str, Any]:
    """The position after the last batch returned (global batches consumed): JSON-able, saved with
    checkpoints, identical on every host."""
    return {"version": STATE_VERSION, "batches": self._batches, "pipeline": self._fingerprint()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resumes from `get_state()`'s dict (also after a JSON round trip, and from a run on another number
    of hosts); seed, global batch size and source must match."""
    if self.config.mode != "train":
      raise ValueError("set_state: only training pipelines have a position to restore")
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data state version {state.get('version')} != {STATE_VERSION} (a checkpoint written "
                       f"before the host-count invariant input pipeline; its data order cannot be continued)")
    mine = self._fingerprint()
    theirs = dict(state["pipeline"])
    if theirs != mine:
      diff = {k: (theirs.get(k), mine.get(k)) for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k)}
      raise ValueError(f"data state was saved by a different pipeline (saved, current): {diff}")
    self.close()
    self._batches = int(state["batches"])
    self._pending_state = {"batches": self._batches}


def _mark_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app (tests, notebooks) none were parsed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_pipeline(source, *, mode: str = "train", batch_size: int = 8, seed: int = 0,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  ignore_label: Optional[int] = None, **kwargs) -> DataPipeline:
  """A DataPipeline; hosts default to JAX's process index/count, other kwargs are PipelineConfig fields."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  cfg = PipelineConfig(mode=mode, batch_size=batch_size, seed=seed, process_index=process_index,
                       process_count=process_count, **kwargs)
  return DataPipeline(source, cfg, ignore_label=ignore_label)

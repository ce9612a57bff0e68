"""The training loop: data -> sharded steps -> metrics, TensorBoard, checkpoints, resumption.

Resume order (DESIGN §3.7): the run's own latest checkpoint in WORKDIR/checkpoints (a corrupt latest
step is skipped with a warning), else `train.resume_from` (another run's full train state), else
`train.init_from` (parameters only: a converted official SAN or CLIP checkpoint), else the seeded random
initialisation. Frozen parameters are never checkpointed: they are rebuilt from the same source
(`init_from` or the seed), so a checkpoint holds the trainable parameters, the optimizer state, the step,
and the data iterator's position. A SIGTERM (preemption) saves at the next step boundary and exits
(`Preempted`; train.py exits with PREEMPTED_EXIT_STATUS).

Nothing is lost by mistake (san_jax/train/workdir.py): the config is validated before anything is
written (validate.py); process 0 holds WORKDIR/lock; a config whose identity (model, trainable set, data
set) differs from WORKDIR/config.json, or checkpoints none of which can be read (each retried), stop the
run unchanged unless `train.fresh`, which moves them to WORKDIR/set_aside/; unreadable steps newer than
the restored one are moved there too, so retention never deletes them; metrics.jsonl is cut back to the
restored step; a failed save stops the run within a step (checkpoint.CheckpointSaveError).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from san_jax import checkpoint
from san_jax.data import pipeline as pipeline_lib
from san_jax.models import san as san_lib
from san_jax.train import sharding, steps, validate
from san_jax.train import workdir as workdir_lib

log = logging.getLogger("san_jax.train")


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm became NaN/inf and train.on_nonfinite == "stop"."""


# train.py's exit status after a SIGTERM (preemption): the state was saved, the run is not finished.
# 128 + SIGTERM, what a shell reports for a process killed by SIGTERM, so schedulers treat it as such.
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):
  """Raised by `train` after a SIGTERM, once the step it stopped at is saved (train.py exits with
  PREEMPTED_EXIT_STATUS)."""


def make_source(data_cfg, split: str):
  """The data set named by the config: "shapes" (synthetic, in memory) or a built TFDS data set."""
  if data_cfg.train == "shapes":
    from san_jax.data import shapes
    n = int(data_cfg.get("num_examples", 512))
    return shapes.ShapesSource(n, seed=int(data_cfg.get("shapes_seed", 0)), split=split,
                               spec=shapes.spec_from_config(data_cfg))
  if not data_cfg.data_dir:
    raise ValueError(f"data.data_dir is empty: build {data_cfg.train!r} first (python -m san_jax.data.build "
                     f"{data_cfg.train} --manual_dir ... --data_dir DIR) and pass --config.data.data_dir=DIR")
  return pipeline_lib.load_source(data_cfg.train, split, data_cfg.data_dir)


def class_names(source, data_cfg):
  names = getattr(source, "class_names", None)
  if callable(names):
    names = names()
  if names:
    return tuple(names)
  from san_jax.data import vocabularies
  return vocabularies.get_vocabulary(data_cfg.train)


def make_pipeline(source, cfg, process_index: int, process_count: int):
  from san_jax.data import augment
  d, t = cfg.data, cfg.train
  # The data set knows its ignore label (255, or 65535 where 255 is a class: ADE20K-847, Pascal Context-459).
  ignore = int(getattr(source, "ignore_label", d.ignore_label))
  aug = augment.TrainAugConfig(
      min_size_train=tuple(d.min_size_train), max_size_train=d.max_size_train,
      crop_size=(d.crop_size, d.crop_size), single_category_max_area=d.single_category_max_area,
      color_aug_ssd=d.color_aug_ssd, flip=d.flip, ignore_label=ignore,
      max_targets=t.criterion.max_targets)
  if t.batch_size % process_count:
    raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the {process_count} hosts")
  return pipeline_lib.make_pipeline(source, mode="train", batch_size=t.batch_size // process_count, seed=t.seed,
                                    process_index=process_index, process_count=process_count,
                                    num_workers=d.num_workers, prefetch=d.prefetch, train_aug=aug,
                                    ignore_label=ignore)


STEP_KEYS = ("image", "image_size", "labels", "masks", "valid")


class MetricsWriter:
  """A JSON-lines file `path` (one object per logged step, appended) and, with `tensorboard_dir`, TensorBoard
  event files; writes nothing when not `enabled` (the hosts other than 0) or without a path. The training
  loop's WORKDIR/metrics.jsonl and the demo's CLIP pretraining metrics."""

  def __init__(self, path: Union[str, Path, None], enabled: bool = True, tensorboard_dir: Optional[Path] = None):
    self.path = Path(path) if path else None
    self.enabled = enabled and self.path is not None
    self.tb = None
    if not self.enabled or tensorboard_dir is None:
      return
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(tensorboard_dir))
    except ImportError:  # TensorBoard logging is optional
      log.warning("tensorboardX not installed: no TensorBoard event files")

  def write(self, row: Dict[str, float]):
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, row["step"])
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def format_eta(seconds: float) -> str:
  """Seconds -> "h:mm:ss" ("?" when not finite: no step rate measured yet)."""
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


class StepTimer:
  """Seconds per step over the steps since the last lap: `restart` keeps what is not a training step out of
  the rate (the first step's compilation, an evaluation)."""

  def __init__(self, step: int):
    self.restart(step)

  def restart(self, step: int) -> None:
    self._time, self._step = time.perf_counter(), step

  def lap(self, step: int) -> float:
    """Seconds per step since the last lap or restart (NaN when no step ran since); starts the next lap."""
    now = time.perf_counter()
    dt = (now - self._time) / (step - self._step) if step > self._step else float("nan")
    self._time, self._step = now, step
    return dt


def progress_line(prefix: str, done: int, total: int, fields: str, step_time: float,
                  batch_size: Optional[int] = None) -> str:
  """"{prefix}step 40/900  {fields}  2.10 steps/s  33.6 img/s  ETA 0:06:48": a logged step's console line
  (img/s only with `batch_size`; "rate ?" while no rate is measured)."""
  if math.isfinite(step_time):
    rate = f"{1 / step_time:.2f} steps/s" + (f"  {batch_size / step_time:.1f} img/s" if batch_size else "")
  else:
    rate = "rate ?"
  return f"{prefix}step {done}/{total}  {fields}  {rate}  ETA {format_eta(step_time * (total - done))}"


def load_init_params(path: str):
  """A params-only checkpoint (convert.san_checkpoint or convert.clip_checkpoint output, or a name resolved
  through `san_jax.pretrained`: `san_vit_b16`, a CLIP's "ViT-B-16/openai" or Hugging Face id) -> flat params
  for the SAN model; a CLIP checkpoint's `visual.*` / text leaves are mapped onto SAN's CLIP parts."""
  from san_jax import pretrained  # pylint: disable=g-import-not-at-top
  if path in pretrained.MODEL_NAMES:
    path = pretrained.resolve_name(path)
  elif pretrained.is_clip_name(path):
    path = pretrained.resolve_clip(path)
  flat, meta = checkpoint.restore_params(path)
  if any(p[0] == "clip_visual" for p in flat):
    return flat
  mapped = {}
  for p, v in flat.items():
    if p[0] == "visual":
      mapped[("clip_visual",) + p[1:]] = v
    elif p[0] in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection",
                  "logit_scale"):
      mapped[("ov_classifier",) + p] = v
  if not mapped:
    raise ValueError(f"{path}: neither a SAN nor a CLIP parameter checkpoint")
  return mapped


_load_init_params = load_init_params  # the name the tests and older callers use


def train(cfg, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) training; returns the last logged metrics."""
  workdir = Path(workdir)
  sharding.initialize_distributed(timeouts=cfg.get("distributed"))  # no-op when train.py did it
  run_config = json.loads(cfg.to_json_best_effort())
  sharding.check_processes_agree(run_config)  # every process, before any of them can fail alone below
  validate.check_train_config(cfg)  # the whole config, before anything is written
  is_main = jax.process_index() == 0
  t = cfg.train
  model_cfg = san_lib.config_from_dict(cfg.model.to_dict())
  mesh = sharding.make_mesh(cfg.mesh.shape.to_dict())
  rules = [tuple(r) for r in cfg.mesh.rules]
  sharding.check_batch_fits(mesh, rules, t.batch_size)
  workdir.mkdir(parents=True, exist_ok=True)
  lock = workdir_lib.WorkdirLock(workdir, enabled=is_main).acquire()
  atexit.register(lock.release)  # also when setup below fails; the finally of the loop releases it too
  try:
    _check_workdir_run(workdir, run_config, bool(t.get("fresh", False)), is_main)
  except workdir_lib.WorkdirError:
    lock.release()
    raise
  if is_main:
    workdir_lib.write_config(workdir, run_config)

  source = make_source(cfg.data, cfg.data.train_split)
  names = class_names(source, cfg.data)
  trainer = steps.Trainer(model_cfg, t, mesh, rules, num_classes=len(names))
  init_params = load_init_params(t.init_from) if t.init_from else None
  state, frozen = trainer.init(jax.random.key(t.seed), init_params)

  pipe = make_pipeline(source, cfg, jax.process_index(), jax.process_count())
  ckpts = checkpoint.TrainCheckpoints(workdir / "checkpoints", keep=t.keep_checkpoints)
  try:
    restored = _restore_own(ckpts, state, workdir, bool(t.get("fresh", False)), is_main)
    if restored is None and t.get("resume_from"):
      restored = _restore_other(t.resume_from, state)
  except workdir_lib.WorkdirError:
    ckpts.close()
    lock.release()
    raise
  if restored is not None:
    state, data_state = restored
    pipe.set_state(data_state)
    log.info("resumed from step %d", int(state["step"]))
  else:
    log.warning("starting from scratch (step 0): no checkpoint in %s%s; parameters from %s", ckpts.directory,
                f" nor in train.resume_from={t.resume_from}" if t.get("resume_from") else "",
                f"train.init_from={t.init_from} and the seed" if t.init_from else f"the seed {t.seed}")
  start = int(jax.device_get(state["step"]))
  if is_main:
    workdir_lib.truncate_metrics(workdir, start)  # the rows after `start` are about to be logged again

  from san_jax.text.classifier import ClassEmbeddingCache
  class_emb = ClassEmbeddingCache(trainer.model(state, frozen).ov_classifier, model_cfg.template_set)(names)
  class_emb = jax.device_put(class_emb, sharding.replicated(mesh))
  step_fn = None
  rng = jax.random.key(t.seed + 1)
  writer = MetricsWriter(workdir / "metrics.jsonl", is_main, tensorboard_dir=workdir / "tensorboard")
  periodic_eval = PeriodicEval(cfg, workdir)
  preempted = {"flag": False}
  previous = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
  last: Dict[str, Any] = {}
  timer = StepTimer(start)
  try:
    for step in range(start, t.steps):
      ckpts.poll()  # a failed background save stops the run here, not at the next save
      local = next(pipe)
      batch = sharding.global_batch({k: local[k] for k in STEP_KEYS}, mesh, rules)
      if step_fn is None:
        step_fn = trainer.compile_step({k: v.ndim for k, v in batch.items()})
      state, metrics = step_fn(state, frozen, batch, class_emb, rng)
      done = step + 1
      if done == start + 1:  # the first call compiled the step: keep compile time out of the rate
        jax.block_until_ready(metrics)
        timer.restart(done)
        if is_main:
          print(f"step {done}/{t.steps}: compiled and ran the first step", flush=True)
      if done % t.log_every == 0 or done == t.steps:
        m = jax.device_get(metrics)
        dt = timer.lap(done)
        if not bool(m.pop("finite")) or int(jax.device_get(state["nonfinite"])) > 0:
          _on_nonfinite(t.on_nonfinite, int(jax.device_get(state["last_nonfinite_step"])), m)
        rate_known = math.isfinite(dt)
        row = {"step": done, **{k: float(v) for k, v in m.items()}, "step_time_s": dt if rate_known else None,
               "images_per_s": t.batch_size / dt if rate_known else None}
        writer.write(row)
        last = row
        if is_main:
          print(progress_line("", done, t.steps, f"loss {row['loss']:.4f}  lr {row['lr']:.2e}", dt, t.batch_size),
                flush=True)
      stop = _agreed_stop(preempted["flag"], done, t)
      if done % t.checkpoint_every == 0 or done == t.steps or stop:
        if int(jax.device_get(state["nonfinite"])) > 0:
          _on_nonfinite(t.on_nonfinite, int(jax.device_get(state["last_nonfinite_step"])), {})
        ckpts.save(done, state, pipe.get_state(), run_config)
      if periodic_eval.due(done, done == t.steps):
        row = periodic_eval(trainer.model(state, frozen), done)
        writer.write({"step": done, **row})
        timer.restart(done)  # keep evaluation time out of the training rate
      if stop:
        log.warning("SIGTERM: saved step %d, exiting", done)
        preempted["saved"] = done
        break
  finally:
    try:
      ckpts.wait()
      ckpts.close()
    finally:
      writer.close()
      pipe.close()
      signal.signal(signal.SIGTERM, previous)
      lock.release()
  if "saved" in preempted:
    raise Preempted(f"SIGTERM: saved step {preempted['saved']} in {ckpts.directory}; run the same command "
                    "to resume")
  return last


def _check_workdir_run(workdir: Path, run_config: Dict[str, Any], fresh: bool, is_main: bool) -> None:
  """Refuses a run whose identity (model geometry, trainable set, data set) differs from the workdir's
  config.json, listing the differences; with `fresh`, sets the workdir's run aside instead."""
  try:
    previous = workdir_lib.read_config(workdir)
  except workdir_lib.WorkdirError:
    if not fresh:
      raise
    previous, diffs = None, ["config.json is unreadable"]
  else:
    diffs = workdir_lib.identity_differences(previous, run_config) if previous is not None else []
  if not diffs:
    return
  if not fresh:
    raise workdir_lib.WorkdirError(
        f"{workdir} holds another run: its config.json differs from this config in\n  " + "\n  ".join(diffs) +
        "\nNothing was changed. Use another --workdir (train.resume_from / train.init_from start a new run "
        "from this one's state or weights), or pass --config.train.fresh=True to move this run's files to "
        f"{workdir / workdir_lib.SET_ASIDE_DIR}/ and start from scratch here.")
  if is_main:
    workdir_lib.set_aside(workdir, [workdir / n for n in ("checkpoints", "config.json", "metrics.jsonl",
                                                           "tensorboard", "eval")],
                          "train.fresh=True and the workdir holds another run (" + "; ".join(diffs) + ")")
  _sync("san_jax_workdir_set_aside")


def _restore_own(ckpts: checkpoint.TrainCheckpoints, state, workdir: Path, fresh: bool, is_main: bool):
  """The newest readable step of the run's own checkpoints, or None when there are none.

  Checkpoints that exist but cannot be read are never deleted: when none can be read the run stops
  naming each step and why (unless `fresh`); unreadable steps newer than the one restored (or all, with
  `fresh`) are moved to WORKDIR/set_aside/, so that retention and the run's next saves cannot touch them.
  """
  restored, step, failures = ckpts.restore_newest(state)
  if not failures:
    return restored
  listing = "\n  ".join(f"step {s}: {why}" for s, why in sorted(failures.items(), reverse=True))
  if restored is None and not fresh:
    raise workdir_lib.WorkdirError(
        f"found checkpoints in {ckpts.directory} but could read none:\n  {listing}\nNothing was changed. If the "
        "error is transient, run again; if the config changed, use the run's own config or another --workdir; "
        "if the files are damaged for good, --config.train.fresh=True moves them to "
        f"{workdir / workdir_lib.SET_ASIDE_DIR}/ and starts from scratch.")
  if is_main:
    what = f"restored step {step}" if restored is not None else "train.fresh=True"
    paths = [Path(ckpts.directory) / str(s) for s in failures]
    if restored is None:  # a new run from scratch: the old run's metrics go with its checkpoints
      paths += [workdir / "metrics.jsonl", workdir / "tensorboard"]
    workdir_lib.set_aside(workdir, paths, f"{what}; unreadable checkpoint steps {sorted(failures)}")
  _sync("san_jax_unreadable_set_aside")
  ckpts.reload()
  return restored


def _restore_other(directory: str, state):
  """train.resume_from: another run's newest readable step; asked for explicitly, so finding none is an
  error naming each step and why (its files are only read)."""
  other = checkpoint.TrainCheckpoints(directory, keep=10**6)  # never saved to: retention cannot act
  try:
    restored, step, failures = other.restore_newest(state)
  finally:
    other.close()
  if restored is None:
    listing = "".join(f"\n  step {s}: {why}" for s, why in sorted(failures.items(), reverse=True))
    raise workdir_lib.WorkdirError(f"train.resume_from={directory}: " + (
        f"no step could be read:{listing}" if failures else "holds no checkpoint steps"))
  log.info("train.resume_from: step %d of %s%s", step, directory,
           f" (newer unreadable steps: {sorted(failures)})" if failures else "")
  return restored


def _sync(name: str) -> None:
  """All processes wait here (process 0 has just moved files the others will look at)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class PeriodicEval:
  """Evaluates the current parameters on `data.eval_datasets` every `train.eval_every` steps and at the
  end (the evaluation runner; one Segmenter reused, so nothing recompiles between evaluations)."""

  def __init__(self, cfg, workdir: Path):
    self.cfg = cfg
    self.every = int(cfg.train.get("eval_every", 0) or 0)
    self.datasets = list(cfg.data.get("eval_datasets", []) or [])
    self.out_dir = workdir / "eval"
    self.segmenter = None

  def due(self, step: int, last: bool) -> bool:
    return bool(self.datasets) and self.every > 0 and (step % self.every == 0 or last)

  def __call__(self, model, step: int) -> Dict[str, float]:
    from san_jax.evaluation import inference, runner
    if self.segmenter is None:
      self.segmenter = inference.Segmenter(model)
    else:
      self.segmenter.set_model(model)
    options = runner.EvalOptions.from_config(self.cfg, max_examples=self.cfg.eval.get("max_examples", None))
    row = {}
    for name in self.datasets:
      res = runner.evaluate(self.segmenter, name, options=options, data_dir=self.cfg.data.data_dir or None,
                            out_dir=str(self.out_dir / f"step_{step}"), extra={"step": step})
      for k in ("mIoU", "fwIoU", "mACC", "pACC", "mIoU-seen", "mIoU-unseen"):
        if isinstance(res.get(k), (int, float)):
          row[f"eval/{name}/{k}"] = float(res[k])
    return row


def _agreed_stop(flag: bool, step: int, t) -> bool:
  """Whether to save and stop after `step` for a SIGTERM. One process: its own flag. Several: SIGTERMs reach
  the hosts at different steps, and a host that saved alone would wait for the others in the checkpoint's
  collectives, so the hosts agree (any host's flag) at the steps where they already synchronise for the
  metrics (every train.log_every steps and the last one); a preemption is answered within log_every steps."""
  if jax.process_count() == 1:
    return flag
  if step % t.log_every and step != t.steps:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def _on_nonfinite(mode: str, step: int, metrics: Dict[str, Any]):
  msg = (f"non-finite loss or gradient at step {step} (0-based; that update was skipped, the state and "
         f"checkpoints hold the last finite step): " + ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items()))
  if mode == "stop":
    raise NonFiniteLossError(msg)
  log.warning(msg)

"""The whole training config checked before any file is written: one error listing every problem.

`check_train_config(cfg)` is called by `loop.train` before the workdir is touched (no directory, lock,
config.json or checkpoint is created for a config that cannot run). It checks every enumerated key
against its allowed values, the numbers that must be positive, the mesh against the device count, the
batch against the data-parallel mesh axes (data x fsdp) and the hosts, the model geometry (by building
its SANConfig), the data sets' names and, for built sets, that they exist under `data.data_dir`, and
that `init_from` / `resume_from` exist. Everything found is reported at once, so a user fixes a config
in one round instead of one error per 20-second start.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, List, Optional, Sequence

# Allowed values of the enumerated keys (the code paths that read them accept exactly these).
ON_NONFINITE = ("stop", "skip")  # loop._on_nonfinite
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # steps.Trainer: float32 = no mixed precision
OPTIMIZERS = ("adamw",)  # optim.make_optimizer
SCHEDULES = ("poly", "cosine")  # optim.learning_rate_schedule
DOWNSAMPLE_METHODS = ("max", "avg", "bilinear", "bicubic")  # rec_head.downsample_bias
SOS_TOKEN_FORMATS = ("cls_token",)  # san.SANConfig (the only one implemented)
EVALUATORS = ("sem_seg",)  # evaluation.runner (the only evaluator)
SYNTHETIC_DATASET = "shapes"  # in memory (data.shapes), no data_dir needed


class ConfigError(ValueError):
  """A training config that cannot run; the message lists every problem found."""


def known_datasets() -> tuple:
  """Names `data.train` / `data.eval_datasets` may take: the built sets (one per vocabulary; the data
  builders register exactly these, tests/test_validate.py checks it) and the synthetic "shapes"."""
  from san_jax.data import vocabularies
  return tuple(sorted(set(vocabularies.VOCABULARIES) | {SYNTHETIC_DATASET}))


def _is_remote(path: str) -> bool:
  return "://" in path  # gs://, s3://: existence is left to the reader


def check_train_config(cfg, device_count: Optional[int] = None, process_count: Optional[int] = None) -> None:
  """Raises ConfigError listing every problem of `cfg` (an ml_collections ConfigDict); None if it can run.

  `device_count` / `process_count` default to jax's (call after `jax.distributed.initialize`).
  """
  problems = train_config_problems(cfg, device_count, process_count)
  if problems:
    raise ConfigError(f"the config has {len(problems)} problem{'s' if len(problems) > 1 else ''} "
                      "(nothing was written):\n  " + "\n  ".join(problems))


def train_config_problems(cfg, device_count: Optional[int] = None,
                          process_count: Optional[int] = None) -> List[str]:
  """Every problem of a training config, as one line each ("key: found ..., expected ...")."""
  import jax
  if device_count is None:
    device_count = jax.device_count()
  if process_count is None:
    process_count = jax.process_count()
  problems: List[str] = []

  def get(dotted: str, default: Any = None):
    node = cfg
    for part in dotted.split("."):
      if node is None or part not in node:
        return default
      node = node[part]
    return node

  def one_of(dotted: str, allowed: Sequence[str]):
    value = get(dotted)
    if value not in allowed:
      problems.append(f"{dotted}={value!r}: expected one of {', '.join(map(repr, allowed))}")

  def positive_int(dotted: str, minimum: int = 1):
    value = get(dotted)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      problems.append(f"{dotted}={value!r}: expected an integer >= {minimum}")
      return None
    return value

  for section in ("model", "train", "data", "mesh"):
    if section not in cfg:
      problems.append(f"the config has no `{section}` section")
  if problems:
    return problems

  # ---- train --------------------------------------------------------------------------------------
  one_of("train.on_nonfinite", ON_NONFINITE)
  one_of("train.compute_dtype", COMPUTE_DTYPES)
  one_of("train.optimizer.name", OPTIMIZERS)
  one_of("train.schedule.name", SCHEDULES)
  if get("train.schedule.name") == "cosine":
    end = get("train.schedule.end_factor")
    if isinstance(end, bool) or not isinstance(end, (int, float)) or not 0.0 <= end <= 1.0:
      problems.append(f"train.schedule.end_factor={end!r}: expected a number in [0, 1] (schedule 'cosine' decays "
                      "to end_factor x lr)")
  positive_int("train.steps")
  batch = positive_int("train.batch_size")
  positive_int("train.log_every")
  positive_int("train.checkpoint_every")
  positive_int("train.keep_checkpoints")
  positive_int("train.eval_every", minimum=0) if get("train.eval_every") is not None else None
  deterministic = get("train.deterministic_reductions", False)
  if not isinstance(deterministic, bool):
    problems.append(f"train.deterministic_reductions={deterministic!r}: expected True or False")
  positive_int("train.criterion.num_points")
  positive_int("train.criterion.max_targets")
  ratio = get("train.criterion.importance_sample_ratio")
  if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
    problems.append(f"train.criterion.importance_sample_ratio={ratio!r}: expected a number in [0, 1]")
  for key in ("train.trainable_patterns", "train.optimizer.no_decay_patterns"):
    for pattern in get(key, ()) or ():
      try:
        re.compile(pattern)
      except (re.error, TypeError) as err:
        problems.append(f"{key}: {pattern!r} is not a regular expression ({err})")
  for key in ("train.init_from", "train.resume_from"):
    path = get(key) or ""
    if path and not _is_remote(path) and not os.path.isdir(os.path.expanduser(path)):
      problems.append(f"{key}={path!r}: no such directory")

  # ---- model --------------------------------------------------------------------------------------
  one_of("model.rec_downsample_method", DOWNSAMPLE_METHODS)
  one_of("model.sos_token_format", SOS_TOKEN_FORMATS)
  from san_jax.text import templates
  one_of("model.template_set", tuple(sorted(templates.TEMPLATE_SETS)))
  try:
    from san_jax.models import san as san_lib
    san_lib.config_from_dict(cfg.model.to_dict())
  except Exception as err:  # the geometry's own checks (unknown CLIP variant, bad fusion map, ...)
    problems.append(f"model: {type(err).__name__}: {err}")

  # ---- data ---------------------------------------------------------------------------------------
  known = known_datasets()
  data_dir = get("data.data_dir") or ""
  names = [("data.train", get("data.train"))]
  if (get("train.eval_every", 0) or 0) > 0:  # evaluated during training only then (loop.PeriodicEval)
    names += [(f"data.eval_datasets[{i}]", n) for i, n in enumerate(get("data.eval_datasets", []) or [])]
  for key, name in names:
    if name not in known:
      problems.append(f"{key}={name!r}: unknown data set; expected one of {', '.join(known)}")
    elif name != SYNTHETIC_DATASET:
      problems.extend(_built_dataset_problems(key, name, data_dir))

  # ---- eval ---------------------------------------------------------------------------------------
  for i, name in enumerate(get("eval.evaluators", []) or []):
    if name not in EVALUATORS:
      problems.append(f"eval.evaluators[{i}]={name!r}: expected one of {', '.join(map(repr, EVALUATORS))}")

  # ---- mesh ---------------------------------------------------------------------------------------
  from san_jax.train import sharding
  shape = get("mesh.shape")
  shape = shape.to_dict() if hasattr(shape, "to_dict") else dict(shape or {})
  sizes = {}
  for axis, size in shape.items():
    if axis not in sharding.MESH_AXES:
      problems.append(f"mesh.shape.{axis}: unknown mesh axis; expected {', '.join(sharding.MESH_AXES)}")
    elif isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      problems.append(f"mesh.shape.{axis}={size!r}: expected a positive integer or -1 (the remaining devices)")
    else:
      sizes[axis] = size
  sizes = {a: sizes.get(a, 1) for a in sharding.MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  known_prod = math.prod(s for s in sizes.values() if s != -1)
  resolved = None
  if len(free) > 1:
    problems.append(f"mesh.shape {sizes}: at most one axis may be -1")
  elif free:
    if device_count % known_prod:
      problems.append(f"mesh.shape {sizes}: the fixed axes ({known_prod} devices) do not divide the "
                      f"{device_count} devices")
    else:
      resolved = dict(sizes, **{free[0]: device_count // known_prod})
  elif known_prod != device_count:
    problems.append(f"mesh.shape {sizes} needs {known_prod} devices, there are {device_count}")
  else:
    resolved = sizes
  if batch is not None:
    if resolved is not None:
      dp = resolved["data"] * resolved["fsdp"]
      if batch % dp:
        problems.append(f"train.batch_size={batch} is not divisible by the data-parallel mesh size data x fsdp = "
                        f"{resolved['data']} x {resolved['fsdp']} = {dp} (mesh {resolved}, {device_count} devices)")
      elif deterministic is True and batch % device_count:
        problems.append(f"train.batch_size={batch} is not divisible by the {device_count} devices, which "
                        "train.deterministic_reductions=True splits it over (or set it False)")
    if batch % process_count:
      problems.append(f"train.batch_size={batch} is not divisible by the {process_count} processes (hosts)")
  return problems


def _built_dataset_problems(key: str, name: str, data_dir: str) -> List[str]:
  if not data_dir:
    return [f"{key}={name!r} is a built data set but data.data_dir is empty: build it (python -m "
            f"san_jax.data.build {name} --manual_dir RAW --data_dir DIR) and pass --config.data.data_dir=DIR"]
  if _is_remote(data_dir):
    return []
  from san_jax.data import pipeline
  try:
    pipeline.latest_version_dir(data_dir, name)
  except FileNotFoundError as err:
    return [f"{key}={name!r}: {err}"]
  return []

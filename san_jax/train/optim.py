"""SAN's optimizer: AdamW on the trainable parameters only, poly decay, global-norm clipping.

The one optimizer factory of the tree: the demo's CLIP pretraining (san_jax/demo/clip_pretrain.py) builds its
AdamW, decay mask and cosine schedule here too, from a `train`-shaped config of its own.

Official recipe (DESIGN §1): lr 1e-4, weight decay 1e-4 except LayerNorms and every parameter whose name
contains `pos_embed`, `positional_embedding` or `query_embed`; poly decay (power 0.9, no warmup) over the
run; gradients clipped to global norm 0.01 over all trainable parameters. Which parameters train is
declared by regex patterns over dotted parameter paths (configs/common.py: TRAINABLE_PATTERNS): the
optimizer and its state only ever see those.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from san_jax.models import params as params_lib


def path_of(key_path) -> tuple:
  """A jax tree key path (DictKey/GetAttrKey/SequenceKey...) -> plain tuple of names and ints; the
  `.value` step into an NNX Variable is dropped, so paths read as parameter names."""
  out = []
  for k in key_path:
    if type(k).__name__ == "GetAttrKey" and k.name == "value":
      continue
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
  return tuple(out)


def trainable_filter(patterns: Sequence[str]) -> Callable:
  """An NNX filter selecting the Params whose dotted path matches one of `patterns`."""
  compiled = [re.compile(p) for p in patterns]

  def keep(path, value) -> bool:
    name = params_lib.dotted(tuple(path))
    return isinstance(value, nnx.Param) and any(p.search(name) for p in compiled)
  return keep


def decay_mask(no_decay_patterns: Sequence[str]) -> Callable[[Any], Any]:
  """For optax's `mask`: True where weight decay applies (the complement of the no-decay patterns)."""
  compiled = [re.compile(p) for p in no_decay_patterns]

  def mask(params):
    def leaf(key_path, _):
      name = params_lib.dotted(path_of(key_path))
      return not any(p.search(name) for p in compiled)
    return jax.tree_util.tree_map_with_path(leaf, params)
  return mask


def schedule_values(train_cfg) -> Dict[str, np.ndarray]:
  """The numbers of the learning-rate schedule, float32 scalars: the train step takes them as an argument, so
  that runs that differ only in `train.steps`, the learning rate or the warm-up share one compiled step (a
  run extended on resume, or the test suite's many short runs, reuse the persistent compilation cache).
  "poly": lr, warmup (>= 0), decay (steps after the warm-up, >= 1), power;
  "cosine": lr, warmup (clamped to [1, total - 1], so that a run shorter than its warm-up still decays),
  total (max(steps, 2)), end (end_factor x lr).
  float32 counts are exact up to 2^24 steps."""
  opt, sched = train_cfg.optimizer, train_cfg.schedule
  if sched.name == "cosine":
    total = max(train_cfg.steps, 2)
    values = dict(lr=opt.lr, warmup=min(max(sched.warmup_steps, 1), total - 1), total=total,
                  end=sched.end_factor * opt.lr)
  elif sched.name == "poly":
    warmup = max(sched.warmup_steps, 0)
    values = dict(lr=opt.lr, warmup=warmup, decay=max(1, train_cfg.steps - warmup), power=sched.power)
  else:
    raise ValueError(f"unknown schedule {sched.name!r} (expected 'poly' or 'cosine')")
  return {k: np.float32(v) for k, v in values.items()}


def learning_rate_schedule(train_cfg, values: Optional[Mapping[str, Any]] = None) -> optax.Schedule:
  """The learning rate by step, `train_cfg.schedule.name`, with the numbers of `values` (`schedule_values`'
  dict, arrays that may be traced; default: the config's):
    "poly": SAN's: a linear warm-up from 0 over `warmup` steps (none when 0), then poly decay
      lr (1 - min(s - warmup, decay) / decay)^power to 0;
    "cosine": CLIP's (the demo's CLIP pretraining): a linear warm-up from 0 over `warmup` steps, then cosine
      decay to `end` at `total`: end + (lr - end)(1 + cos(pi min(s - warmup, total - warmup) /
      (total - warmup))) / 2.
  These are optax's `join_schedules` of `linear_schedule` and `polynomial_schedule` /
  `warmup_cosine_decay_schedule`, written with array arguments (optax's take Python numbers and branch on
  them); tests/test_train.py checks them against optax's."""
  name = train_cfg.schedule.name
  config_values = schedule_values(train_cfg)  # also refuses an unknown schedule name
  v = config_values if values is None else values

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warmup = v["warmup"]
    warming = v["lr"] * jnp.clip(count, 0.0, warmup) / jnp.maximum(warmup, 1.0)
    after = jnp.maximum(count - warmup, 0.0)
    if name == "poly":
      frac = 1.0 - jnp.minimum(after, v["decay"]) / v["decay"]
      decayed = v["lr"] * frac ** v["power"]
    else:
      span = v["total"] - warmup
      cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(after, span) / span))
      decayed = (v["lr"] - v["end"]) * cosine + v["end"]
    return jnp.where(count < warmup, warming, decayed)
  return schedule


def make_optimizer(train_cfg, values: Optional[Mapping[str, Any]] = None) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with the decay mask and `learning_rate_schedule(train_cfg, values)`. The
  state's structure does not depend on `values`: the train step builds its optimizer from the values it is
  passed and updates the state that one built from the config initialised."""
  opt = train_cfg.optimizer
  if opt.name != "adamw":
    raise ValueError(f"unknown optimizer {opt.name!r} (expected 'adamw')")
  chain = []
  if train_cfg.clip_grad_norm and train_cfg.clip_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(train_cfg.clip_grad_norm))
  chain.append(optax.adamw(learning_rate_schedule(train_cfg, values), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=decay_mask(opt.no_decay_patterns)))
  return optax.chain(*chain)

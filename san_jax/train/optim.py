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
from typing import Any, Callable, Sequence

import jax
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


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """The learning rate by step, `train_cfg.schedule.name`:
    "poly": SAN's: an optional linear warm-up over `warmup_steps`, then poly decay (`power`) to 0 at `steps`;
    "cosine": CLIP's (the demo's CLIP pretraining): a linear warm-up from 0 over `warmup_steps`, clamped to
      [1, steps - 1] so that a run shorter than its warm-up still decays, then cosine decay to
      `end_factor` x lr at max(steps, 2).
  """
  opt, sched = train_cfg.optimizer, train_cfg.schedule
  if sched.name == "cosine":
    total = max(train_cfg.steps, 2)
    warmup = min(max(sched.warmup_steps, 1), total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, opt.lr, warmup, total, end_value=sched.end_factor * opt.lr)
  if sched.name != "poly":
    raise ValueError(f"unknown schedule {sched.name!r} (expected 'poly' or 'cosine')")
  decay = optax.polynomial_schedule(init_value=opt.lr, end_value=0.0, power=sched.power,
                                    transition_steps=max(1, train_cfg.steps - sched.warmup_steps))
  if sched.warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, opt.lr, sched.warmup_steps)
  return optax.join_schedules([warmup, decay], [sched.warmup_steps])


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with the decay mask; the schedule is exposed via `learning_rate_schedule`."""
  opt = train_cfg.optimizer
  if opt.name != "adamw":
    raise ValueError(f"unknown optimizer {opt.name!r} (expected 'adamw')")
  chain = []
  if train_cfg.clip_grad_norm and train_cfg.clip_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(train_cfg.clip_grad_norm))
  chain.append(optax.adamw(learning_rate_schedule(train_cfg), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=decay_mask(opt.no_decay_patterns)))
  return optax.chain(*chain)

"""The sharded train state, its initialisation and the train step.

State = {"step", "params" (trainable NNX State), "opt_state", "nonfinite" (count of skipped steps),
"last_nonfinite_step"}; the frozen parameters (CLIP towers) live beside it, never donated, never in the
optimizer. Initialisation follows DESIGN §3.6: `jax.eval_shape(init)` -> shardings from the logical axis
names -> `jax.jit(init, out_shardings=...)`, so no host ever materialises the whole model unsharded.
The step is `jax.jit(step, in_shardings, out_shardings, donate_argnums=0)`.

A step whose loss or gradient norm is not finite leaves the state unchanged (params, optimizer) and
records itself in `nonfinite`/`last_nonfinite_step`; the loop then stops or goes on (config
`train.on_nonfinite`), and no checkpoint is ever written from a poisoned state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from san_jax.losses import criterion as criterion_lib
from san_jax.models import params as params_lib
from san_jax.models import san as san_lib
from san_jax.train import optim, sharding

PyTree = Any


def criterion_config(train_cfg, num_classes: int, batch_axes: Tuple[str, ...] = ()) -> criterion_lib.CriterionConfig:
  c = train_cfg.criterion
  return criterion_lib.CriterionConfig(
      num_classes=num_classes, eos_coef=c.no_object_weight, class_weight=c.class_weight,
      mask_weight=c.mask_weight, dice_weight=c.dice_weight, num_points=c.num_points,
      oversample_ratio=c.oversample_ratio, importance_sample_ratio=c.importance_sample_ratio,
      batch_axes=tuple(batch_axes))


@dataclasses.dataclass
class Trainer:
  """Everything compiled for one (model, optimizer, mesh) triple."""
  model_cfg: san_lib.SANConfig
  train_cfg: Any
  mesh: Mesh
  rules: Any
  num_classes: int

  def __post_init__(self):
    self.compute_dtype = None if self.train_cfg.compute_dtype == "float32" else jnp.dtype(self.train_cfg.compute_dtype)
    self.tx = optim.make_optimizer(self.train_cfg)
    self.schedule = optim.learning_rate_schedule(self.train_cfg)
    self.keep = optim.trainable_filter(self.train_cfg.trainable_patterns)
    spec = sharding.batch_sharding(self.mesh, self.rules, 1).spec[0]
    batch_axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    self.criterion = criterion_config(self.train_cfg, self.num_classes, batch_axes)
    abstract_model = nnx.eval_shape(lambda: self._new_model(jax.random.key(0)))
    self.graphdef, abstract_params, abstract_frozen = nnx.split(abstract_model, self.keep, ...)
    if not jax.tree.leaves(abstract_params):
      raise ValueError(f"train.trainable_patterns {list(self.train_cfg.trainable_patterns)} match no parameter")
    self.param_shardings = sharding.state_shardings(abstract_params, self.mesh, self.rules)
    self.frozen_shardings = sharding.state_shardings(abstract_frozen, self.mesh, self.rules)
    rep = sharding.replicated(self.mesh)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    opt_shardings = optax.tree_utils.tree_map_params(
        self.tx, lambda _, sh: sh, abstract_opt, self.param_shardings,
        transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, nnx.Variable))
    self.state_shardings = {"step": rep, "params": self.param_shardings, "opt_state": opt_shardings,
                            "nonfinite": rep, "last_nonfinite_step": rep}

  # ---- construction -----------------------------------------------------------------------------------
  def _new_model(self, rng) -> san_lib.SAN:
    return san_lib.SAN(self.model_cfg, rngs=nnx.Rngs(rng), dtype=self.compute_dtype)

  def _state_from_model(self, model) -> Tuple[Dict[str, Any], nnx.State]:
    _, params, frozen = nnx.split(model, self.keep, ...)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
             "nonfinite": jnp.zeros((), jnp.int32), "last_nonfinite_step": jnp.full((), -1, jnp.int32)}
    return state, frozen

  def init(self, rng: jax.Array, init_params: Optional[Mapping[Tuple, Any]] = None):
    """(state, frozen) created directly with their shardings; `init_params` ({path: array}, e.g. a
    converted official SAN or CLIP checkpoint; any subset of the model's leaves) overrides the random
    initialisation of the leaves it names."""
    def build(rng, init_params):
      model = self._new_model(rng)
      if init_params:
        params_lib.load_flat_params(model, init_params)
      return self._state_from_model(model)

    out_shardings = (self.state_shardings, self.frozen_shardings)
    with jax.set_mesh(self.mesh):
      return jax.jit(build, out_shardings=out_shardings)(rng, dict(init_params or {}))

  def abstract_state(self):
    """ShapeDtypeStructs with shardings of (state, frozen): the restore target for checkpoints."""
    shapes = jax.eval_shape(lambda r: self._state_from_model(self._new_model(r)), jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        (self.state_shardings, self.frozen_shardings))

  # ---- the step ---------------------------------------------------------------------------------------
  def loss_fn(self, params, frozen, batch, class_embeddings, rng):
    """batch: image uint8 [B, H, W, 3], image_size int [B, 2], labels [B, T], masks [B, T, H, W],
    valid bool [B, T] (the input pipeline's training batches)."""
    model = nnx.merge(self.graphdef, params, frozen)
    images = san_lib.normalize_on_device(batch["image"], batch["image_size"], self.model_cfg)
    if self.compute_dtype is not None:
      images = images.astype(self.compute_dtype)
    out = model(images, class_embeddings, train=True)
    out = {k: v.astype(jnp.float32) for k, v in out.items()}
    valid = batch["valid"]
    targets = {"labels": jnp.where(valid, batch["labels"], 0), "masks": batch["masks"], "valid": valid}
    losses, _ = criterion_lib.set_criterion(out, targets, self.criterion, rng=rng)
    return criterion_lib.total_loss(losses), losses

  def step_fn(self, state, frozen, batch, class_embeddings, rng):
    step_rng = jax.random.fold_in(rng, state["step"])
    (loss, losses), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
        state["params"], frozen, batch, class_embeddings, step_rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_old = lambda new, old: jnp.where(finite, new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": jax.tree.map(keep_old, params, state["params"]),
        "opt_state": jax.tree.map(keep_old, opt_state, state["opt_state"]),
        "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
        "last_nonfinite_step": jnp.where(finite, state["last_nonfinite_step"], state["step"]),
    }
    metrics = {"loss": loss, **losses, "grad_norm": grad_norm, "lr": self.schedule(state["step"]),
               "finite": finite}
    return new_state, metrics

  def compile_step(self, batch_ndims: Mapping[str, int]) -> Callable:
    """The jitted step with explicit shardings; state donated."""
    batch_sh = {k: sharding.batch_sharding(self.mesh, self.rules, n) for k, n in batch_ndims.items()}
    rep = sharding.replicated(self.mesh)
    jitted = jax.jit(self.step_fn,
                     in_shardings=(self.state_shardings, self.frozen_shardings, batch_sh, rep, rep),
                     out_shardings=(self.state_shardings, rep), donate_argnums=0)

    def run(*args):
      with jax.set_mesh(self.mesh):
        return jitted(*args)
    run.jitted = jitted  # for ahead-of-time lowering (cost analysis in benchmarks), under the mesh
    return run

  def model(self, state, frozen) -> san_lib.SAN:
    """The NNX model with the state's parameters (for evaluation)."""
    return nnx.merge(self.graphdef, state["params"], frozen)

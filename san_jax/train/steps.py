"""The sharded train state, its initialisation and the train step.

State = {"step", "params" (trainable NNX State), "opt_state", "nonfinite" (count of skipped steps),
"last_nonfinite_step"}; the frozen parameters (CLIP towers) live beside it, never donated, never in the
optimizer. Initialisation follows DESIGN §3.6: `jax.eval_shape(init)` -> shardings from the logical axis
names -> `jax.jit(init, out_shardings=...)`, so no host ever materialises the whole model unsharded.
The step is `jax.jit(step, in_shardings, out_shardings, donate_argnums=0)`.

Two ways to add the devices' contributions (config `train.deterministic_reductions`):
  * True (default): the step is one `shard_map` over every mesh axis. Each device computes the loss and
    gradient of its share of the batch (the criterion normalised by the global batch, `sum_axes`), the
    shares are added with `ops.reduce.ordered_sum_tree` (device order, the same bits on any process layout:
    1 x 8, 2 x 4 and 4 x 2 devices train the same trajectory, issue 11), and every device applies the
    update to its whole copy of the parameters, as DDP does. Parameters and optimizer state stay stored
    with their shardings (fsdp shards in checkpoints and between steps) but are gathered for the step, so
    fsdp saves no step memory in this mode; the batch must split over all devices.
  * False: one global program; XLA's all-reduces (or reduce-scatters under fsdp) add the gradients in the
    order the collective library picks, fsdp keeps parameters sharded through the step, the activations'
    logical axes (`layers.constrain`: batch, length, embed, heads, mlp) place them by the config's rules
    (so a `model` axis > 1 splits attention heads and MLP hidden units, not only the parameters), and the
    criterion's matching and top-k run per batch shard (`batch_axes`).

A step whose loss or gradient norm is not finite leaves the state unchanged (params, optimizer) and
records itself in `nonfinite`/`last_nonfinite_step`; the loop then stops or goes on (config
`train.on_nonfinite`), and no checkpoint is ever written from a poisoned state.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from san_jax.losses import criterion as criterion_lib
from san_jax.models import layers
from san_jax.models import params as params_lib
from san_jax.models import san as san_lib
from san_jax.ops import reduce as reduce_lib
from san_jax.train import optim, sharding

PyTree = Any


def criterion_config(train_cfg, num_classes: int, batch_axes: Tuple[str, ...] = (),
                     sum_axes: Tuple[str, ...] = ()) -> criterion_lib.CriterionConfig:
  c = train_cfg.criterion
  return criterion_lib.CriterionConfig(
      num_classes=num_classes, eos_coef=c.no_object_weight, class_weight=c.class_weight,
      mask_weight=c.mask_weight, dice_weight=c.dice_weight, num_points=c.num_points,
      oversample_ratio=c.oversample_ratio, importance_sample_ratio=c.importance_sample_ratio,
      batch_axes=tuple(batch_axes), sum_axes=tuple(sum_axes))


def device_batch_axes(mesh: Mesh, batch_axes: Tuple[str, ...]) -> Tuple[str, ...]:
  """The axes a deterministic step splits the batch over: the batch axes, then every other mesh axis of
  size > 1, so each device holds its own images (devices holding copies of the same images would each run
  the matching's host callback on them; see matcher._sharded_axes for why that is avoided)."""
  return tuple(batch_axes) + tuple(a for a in mesh.axis_names if a not in batch_axes and mesh.shape[a] > 1)


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
    self.tx = optim.make_optimizer(self.train_cfg)  # the state's structure; the step builds its own (`_apply`)
    self.schedule_values = optim.schedule_values(self.train_cfg)
    self.keep = optim.trainable_filter(self.train_cfg.trainable_patterns)
    spec = sharding.batch_sharding(self.mesh, self.rules, 1).spec[0]
    batch_axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    self.deterministic = bool(self.train_cfg.get("deterministic_reductions", False))
    if self.deterministic:
      self.split_axes = device_batch_axes(self.mesh, batch_axes)
      self.criterion = criterion_config(self.train_cfg, self.num_classes, (), self.split_axes)
    else:
      self.split_axes = ()
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
  def loss_fn(self, params, frozen, batch, class_embeddings, draws):
    """batch: image uint8 [B, H, W, 3], image_size int [B, 2], labels [B, T], masks [B, T, H, W],
    valid bool [B, T] (the input pipeline's training batches); draws: `criterion_lib.sample_draws`'s.
    In the deterministic step B is the device's share and the losses are its shares of the global ones."""
    model = nnx.merge(self.graphdef, params, frozen)
    images = san_lib.normalize_on_device(batch["image"], batch["image_size"], self.model_cfg)
    if self.compute_dtype is not None:
      images = images.astype(self.compute_dtype)
    out = model(images, class_embeddings, train=True)
    out = {k: v.astype(jnp.float32) for k, v in out.items()}
    valid = batch["valid"]
    targets = {"labels": jnp.where(valid, batch["labels"], 0), "masks": batch["masks"], "valid": valid}
    losses, _ = criterion_lib.set_criterion(out, targets, self.criterion, draws=draws)
    return criterion_lib.total_loss(losses), losses

  def draws(self, rng, step, labels) -> Dict[str, jax.Array]:
    """The step's point draws for the global batch (labels [B, T]): the same whatever the layout."""
    return criterion_lib.sample_draws(
        jax.random.fold_in(rng, step), self.criterion, len(self.model_cfg.side.deep_supervision_idxs),
        labels.shape[0], min(self.model_cfg.side.num_queries, labels.shape[1]))

  def _apply(self, state, loss, losses, grads, schedule):
    """The optimizer step from the (global) loss and gradients, with the learning-rate schedule's numbers
    `schedule` (`optim.schedule_values`, traced); a non-finite step changes nothing."""
    grad_norm = optax.tree.norm(grads)
    tx = optim.make_optimizer(self.train_cfg, schedule)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
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
    lr = optim.learning_rate_schedule(self.train_cfg, schedule)(state["step"])
    metrics = {"loss": loss, **losses, "grad_norm": grad_norm, "lr": lr,
               "finite": finite}
    return new_state, metrics

  def activation_sharding(self, names, shape) -> NamedSharding:
    """An activation's sharding from its logical axis names (`layers.constrain`), by the config's rules."""
    return NamedSharding(self.mesh, sharding.logical_to_mesh(names, shape, self.mesh, self.rules))

  def step_fn(self, state, frozen, batch, class_embeddings, rng, schedule):
    draws = self.draws(rng, state["step"], batch["labels"])
    if not self.deterministic or not self.split_axes:  # one device: nothing to add across devices
      # XLA partitions this program: the activations' logical axes place them by the config's rules. On
      # one device there is nothing to partition, so no rules apply and the CPU's custom calls (fused
      # attention, bf16 products; layers._xla_partitions) run in the step as they do in inference.
      placing = (layers.activation_sharding(self.activation_sharding) if self.mesh.devices.size > 1
                 else contextlib.nullcontext())
      with placing:
        (loss, losses), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
            state["params"], frozen, batch, class_embeddings, draws)
      return self._apply(state, loss, losses, grads, schedule)

    axes, ways = self.split_axes, self.mesh.devices.size
    if batch["labels"].shape[0] % ways:  # validate.py says so before a run starts; this is for direct callers
      raise sharding.TopologyError(
          f"train.deterministic_reductions=True splits the batch over all {ways} devices of the mesh "
          f"{dict(self.mesh.shape)}: a batch of {batch['labels'].shape[0]} is not divisible by {ways} "
          "(change the batch size, or set train.deterministic_reductions=False)")

    def local(state, frozen, batch, class_embeddings, draws, schedule):
      (_, shares), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
          state["params"], frozen, batch, class_embeddings, draws)
      names = sorted(shares)
      totals = reduce_lib.ordered_sum(jnp.stack([shares[n] for n in names]), axes)
      losses = {n: totals[i] for i, n in enumerate(names)}
      grads = reduce_lib.ordered_sum_tree(grads, axes)
      return self._apply(state, criterion_lib.total_loss(losses), losses, grads, schedule)

    split = P(axes)
    return jax.shard_map(local, mesh=self.mesh, in_specs=(P(), P(), split, P(), P(None, axes), P()),
                         out_specs=(P(), P()), check_vma=False)(state, frozen, batch, class_embeddings, draws,
                                                                schedule)

  def compile_step(self, batch_ndims: Mapping[str, int]) -> Callable:
    """`run(state, frozen, batch, class_embeddings, rng)`: the jitted step with explicit shardings, state
    donated, passed this run's learning-rate schedule numbers as its last argument (so they are not
    constants of the program). `run.jitted` is the jitted function itself, `run.args(*args)` the six
    arguments it takes (for ahead-of-time lowering, e.g. cost analysis in benchmarks, under the mesh)."""
    batch_sh = {k: sharding.batch_sharding(self.mesh, self.rules, n) for k, n in batch_ndims.items()}
    rep = sharding.replicated(self.mesh)
    jitted = jax.jit(self.step_fn,
                     in_shardings=(self.state_shardings, self.frozen_shardings, batch_sh, rep, rep, rep),
                     out_shardings=(self.state_shardings, rep), donate_argnums=0)
    schedule = jax.device_put(self.schedule_values, rep)

    def run(*args):
      with jax.set_mesh(self.mesh):
        return jitted(*args, schedule)
    run.jitted = jitted
    run.args = lambda *args: (*args, schedule)
    return run

  def model(self, state, frozen) -> san_lib.SAN:
    """The NNX model with the state's parameters (for evaluation)."""
    return nnx.merge(self.graphdef, state["params"], frozen)

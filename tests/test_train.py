"""Training: the optimizer touches only trainable parameters, sharded training equals single-device
training, a tiny model overfits one batch, and non-finite losses never poison the state."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from san_jax.models import params as params_lib
from san_jax.train import optim, sharding, steps
from tests.train_utils import model_config, tiny_batch, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trainer(cfg, devices=None, num_classes=3):
  mesh = sharding.make_mesh(cfg.mesh.shape.to_dict(), devices)
  return steps.Trainer(model_config(cfg), cfg.train, mesh, [tuple(r) for r in cfg.mesh.rules], num_classes)


def _flat(tree):
  return {optim.path_of(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def trained_a_few_steps():
  cfg = tiny_config(steps=200)
  tr = _trainer(cfg, devices=jax.devices()[:1])
  state, frozen = tr.init(jax.random.key(0))
  before_params = _flat(state["params"])
  before_frozen = _flat(frozen)
  batch = sharding.global_batch(tiny_batch(), tr.mesh, tr.rules)
  ce = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32))
  step = tr.compile_step({k: v.ndim for k, v in batch.items()})
  losses = []
  for _ in range(200):
    state, m = step(state, frozen, batch, ce, jax.random.key(1))
    losses.append(float(m["loss"]))
  # Then one step with poisoned class embeddings through the same compiled step: it must change nothing.
  after_training = _flat(state)
  state, m = step(state, frozen, batch, jnp.full_like(ce, jnp.nan), jax.random.key(1))
  nonfinite = dict(finite=bool(m["finite"]), count=int(state["nonfinite"]), at=int(state["last_nonfinite_step"]),
                   before=after_training, after=_flat(state))
  return dict(tr=tr, state=state, frozen=frozen, before_params=before_params, before_frozen=before_frozen,
              losses=losses, nonfinite=nonfinite)


@pytest.mark.slow
def test_tiny_model_overfits_one_batch(trained_a_few_steps):
  losses = trained_a_few_steps["losses"]
  assert np.all(np.isfinite(losses))
  assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])


@pytest.mark.slow
def test_frozen_parameters_bitwise_unchanged_and_not_in_optimizer(trained_a_few_steps):
  r = trained_a_few_steps
  after_frozen = _flat(r["frozen"])
  assert after_frozen.keys() == r["before_frozen"].keys()
  for k, v in r["before_frozen"].items():
    np.testing.assert_array_equal(after_frozen[k], v, err_msg=str(k))
  # trainable ones did move
  after = _flat(r["state"]["params"])
  assert any(not np.array_equal(after[k], v) for k, v in r["before_params"].items())
  # the optimizer state holds exactly the trainable leaves (mu, nu), none of the frozen ones
  trainable_shapes = sorted(v.shape for v in r["before_params"].values())
  opt_leaves = [np.shape(x) for x in jax.tree.leaves(r["state"]["opt_state"]) if np.ndim(x) > 0]
  assert sorted(opt_leaves) == sorted(trainable_shapes * 2)
  frozen_names = {params_lib.dotted(k) for k in r["before_frozen"]}
  assert any(n.startswith("clip_visual.transformer") for n in frozen_names)
  assert not any(n.startswith("side_adapter_network") for n in frozen_names)


def test_trainable_selection_matches_patterns():
  cfg = tiny_config()
  tr = _trainer(cfg, devices=jax.devices()[:1])
  abstract = tr.abstract_state()[0]["params"]
  names = {params_lib.dotted(optim.path_of(p)) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  assert "ov_classifier.bg_embed" in names and "clip_visual.positional_embedding" in names
  assert all(n.startswith("side_adapter_network") or n in ("ov_classifier.bg_embed", "clip_visual.positional_embedding")
             for n in names)


def test_weight_decay_mask_follows_the_official_exceptions():
  mask_fn = optim.decay_mask(tiny_config().train.optimizer.no_decay_patterns)
  tree = {"side_adapter_network": {"query_embed": 0, "vit_model": {"pos_embed": 0, "blocks": {0: {
      "norm1": {"scale": 0}, "attn": {"qkv": {"kernel": 0}}}}}}, "clip_visual": {"positional_embedding": 0}}
  m = mask_fn(tree)
  assert m["side_adapter_network"]["vit_model"]["blocks"][0]["attn"]["qkv"]["kernel"] is True
  assert m["side_adapter_network"]["vit_model"]["blocks"][0]["norm1"]["scale"] is False
  assert m["side_adapter_network"]["query_embed"] is False
  assert m["side_adapter_network"]["vit_model"]["pos_embed"] is False
  assert m["clip_visual"]["positional_embedding"] is False


def _optax_schedule(name, lr, steps, warmup, power=0.9, end_factor=0.02):
  """The schedules as optax builds them from Python numbers (the independent reference): SAN's poly decay
  after a linear warm-up, CLIP's warm-up + cosine with the warm-up clamped to [1, n - 1], n = max(steps, 2)."""
  import optax
  if name == "cosine":
    n = max(steps, 2)
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(max(warmup, 1), n - 1), n, end_value=end_factor * lr)
  decay = optax.polynomial_schedule(lr, 0.0, power, max(1, steps - warmup))
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


@pytest.mark.parametrize("name,steps,warmup", [("cosine", 100, 10), ("cosine", 3, 30), ("cosine", 1, 0),
                                               ("poly", 100, 0), ("poly", 100, 10), ("poly", 5, 8)],
                         ids=["cosine", "cosine-shorter-than-warmup", "cosine-one-step", "poly", "poly-warmup",
                              "poly-shorter-than-warmup"])
def test_learning_rate_schedules_are_optaxs_with_the_numbers_passed_at_run_time(name, steps, warmup):
  """optim's schedules (array arguments, so that the train step takes them at run time) against optax's own
  from Python numbers, at every step to past the end, evaluated eagerly and traced under jit with the
  numbers as arguments. Tolerance: float32 rounding (rtol 1e-5), as the formulas differ in operation order."""
  cfg = tiny_config(steps=steps)
  cfg.train.optimizer.lr = 2e-3
  cfg.train.schedule = dict(name=name, warmup_steps=warmup, power=0.9, end_factor=0.02)
  want = _optax_schedule(name, 2e-3, steps, warmup)
  counts = jnp.arange(max(steps, 2) + 3)
  eager = np.array([float(optim.learning_rate_schedule(cfg.train)(s)) for s in counts])
  traced = jax.jit(lambda v: jax.vmap(optim.learning_rate_schedule(cfg.train, v))(counts))(
      optim.schedule_values(cfg.train))
  ref = np.array([float(want(s)) for s in counts])
  np.testing.assert_allclose(eager, ref, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(np.asarray(traced), ref, rtol=1e-5, atol=1e-12)
  assert ref.max() > 0


@pytest.mark.slow
def test_runs_of_other_lengths_and_learning_rates_share_one_compiled_step():
  """`train.steps`, the learning rate and the warm-up are arguments of the step, not constants: the lowered
  programs of 4- and 500-step runs (another lr, a warm-up) are the same text, so the persistent compilation
  cache serves them one executable; the lr each logs is its own schedule's."""
  texts, lrs = [], []
  for n, lr, warmup in ((4, 1e-4, 0), (500, 3e-3, 7)):
    cfg = tiny_config(steps=n)
    cfg.train.optimizer.lr = lr
    cfg.train.schedule.warmup_steps = warmup
    tr = _trainer(cfg, devices=jax.devices()[:1])
    state, frozen = tr.init(jax.random.key(0))
    batch = sharding.global_batch(tiny_batch(), tr.mesh, tr.rules)
    ce = jnp.zeros((3, 32), jnp.float32)
    step = tr.compile_step({k: v.ndim for k, v in batch.items()})
    with jax.set_mesh(tr.mesh):
      texts.append(step.jitted.lower(*step.args(state, frozen, batch, ce, jax.random.key(1))).as_text())
    state, m = step(state, frozen, batch, ce, jax.random.key(1))
    state, m = step(state, frozen, batch, ce, jax.random.key(1))
    lrs.append(float(m["lr"]))
  assert texts[0] == texts[1]
  assert lrs[0] == pytest.approx(1e-4 * (1 - 1 / 4) ** 0.9, rel=1e-6)  # poly at step 1 of 4
  assert lrs[1] == pytest.approx(3e-3 / 7, rel=1e-6)  # warm-up step 1 of 7


def test_cosine_schedule_needs_an_end_factor():
  from san_jax.train import validate
  cfg = tiny_config()
  cfg.train.schedule = dict(name="cosine", warmup_steps=0)
  problems = validate.train_config_problems(cfg, device_count=1, process_count=1)
  assert problems == ["train.schedule.end_factor=None: expected a number in [0, 1] (schedule 'cosine' decays to "
                      "end_factor x lr)"]
  cfg.train.schedule.end_factor = 0.1
  assert validate.train_config_problems(cfg, device_count=1, process_count=1) == []


@pytest.mark.slow
def test_nonfinite_loss_leaves_state_unchanged(trained_a_few_steps):
  r = trained_a_few_steps["nonfinite"]
  assert not r["finite"]
  assert r["count"] == 1 and r["at"] == 200  # the 201st step (0-based step 200) was the poisoned one
  for k, v in r["before"].items():
    if k in (("step",), ("nonfinite",), ("last_nonfinite_step",)):
      continue
    np.testing.assert_array_equal(r["after"][k], v, err_msg=str(k))


SHARDED_SCRIPT = textwrap.dedent(r"""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from san_jax.train import sharding, steps, optim
    from tests.train_utils import model_config, tiny_batch, tiny_config
    assert len(jax.devices()) == 8, jax.devices()
    lowered = {}
    def run(shape, devices, deterministic=True, keep_text=False):
      # shape: (data, fsdp, model). Three steps of the tiny model from the layout's own initialisation.
      cfg = tiny_config(deterministic_reductions=deterministic)
      cfg.mesh.shape.data, cfg.mesh.shape.fsdp, cfg.mesh.shape.model = shape
      mesh = sharding.make_mesh(cfg.mesh.shape.to_dict(), devices)
      tr = steps.Trainer(model_config(cfg), cfg.train, mesh, [tuple(r) for r in cfg.mesh.rules], 3)
      state, frozen = tr.init(jax.random.key(0))
      batch = sharding.global_batch(tiny_batch(batch_size=8), mesh, tr.rules)
      ce = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32))
      step = tr.compile_step({k: v.ndim for k, v in batch.items()})
      if keep_text:
        with jax.set_mesh(mesh):
          lowered[(shape, deterministic)] = step.jitted.lower(*step.args(state, frozen, batch, ce, jax.random.key(1))).as_text()
      for _ in range(3):
        state, m = step(state, frozen, batch, ce, jax.random.key(1))
      return state, frozen
    flat = lambda t: {optim.path_of(p): v for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    one, _ = run((1, 1, 1), jax.devices()[:1])
    # The fsdp layout initialises its own sharded state (the same values: partitionable threefry).
    many, frozen = run((4, 2, 1), jax.devices(), keep_text=True)
    a, b = flat(one["params"]), flat(many["params"])
    err = max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)
    print("max param diff", err)
    assert err <= 1e-5, err
    # (That the deterministic step's fsdp layout adds in data=8's device order, so gives the same bits, is
    # test_multiprocess.py's chain: 4 processes with fsdp=2 against one with data=8, every loss term and
    # gradient norm of 16 steps.)
    # XLA's partitioned step (deterministic_reductions=False) on all three axes at once, from its own
    # initialisation: all-reduces over data and fsdp, and the activations' logical axes put attention heads
    # and MLP hidden units on the model axis (sharding constraints in the lowered step); training matches
    # within float noise.
    e = flat(run((2, 2, 2), jax.devices(), deterministic=False, keep_text=True)[0]["params"])
    err = max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(e[k])))) for k in a)
    print("max param diff, XLA's all-reduces, fsdp=2, model=2", err)
    assert err <= 1e-5, err
    constraints = lambda key: re.findall(r"sdy.sharding_constraint [^\n]*", lowered[key])
    on_model = [c for c in constraints(((2, 2, 2), False)) if '{"model"}' in c]
    batch_axes = r'\[\{"data", "fsdp"\}, \{\}, \{"model"\}'
    heads = [c for c in on_model if re.search(batch_axes + r', \{\}\]> : tensor<8x\d+x4x16x', c)]
    mlp = [c for c in on_model if re.search(batch_axes + r'\]> : tensor<8x\d+x256x', c)]
    print("constraints on model", len(on_model), "heads", len(heads), "mlp", len(mlp))
    assert heads and mlp, constraints(((2, 2, 2), False))[:20]
    # the deterministic step computes each device's examples whole: no activation constraint at all
    assert not constraints(((4, 2, 1), True)), constraints(((4, 2, 1), True))[:5]
    def sharded(tree):
      return [p for p, v in flat(tree).items() if "fsdp" in str(v.sharding.spec) and len(v.sharding.device_set) == 8]
    n_params, n_opt, n_frozen = len(sharded(many["params"])), len(sharded(many["opt_state"])), len(sharded(frozen))
    print("sharded leaves", n_params, n_opt, n_frozen)
    assert n_params > 10 and n_opt >= 2 * n_params and n_frozen > 10
    # a side-ViT qkv kernel [48, 144] with logical axes (embed, heads) is split over fsdp on its first axis
    qkv = flat(many["params"])[("side_adapter_network", "vit_model", "blocks", 0, "attn", "qkv", "kernel")]
    assert qkv.sharding.spec[0] == "fsdp", qkv.sharding.spec
    assert qkv.addressable_shards[0].data.shape == (24, 144)
    print("OK")
""")



@pytest.mark.slow
def test_sharded_training_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=REPO,
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-5000:]

"""SAN train step: ViT-B/16 geometry at 640x640, random weights, the official criterion (112x112 points).

  python -m benchmarks.train_step [--model b16] [--batch_sizes 1,2] [--dtype float32] [--runs 5] [--out FILE]

Per batch size: median seconds per step over `--runs` steps after the compiling one, images/s, compile
time, peak memory (XLA's buffer assignment of the compiled step and the process's peak RSS). The step is
the real one (`san_jax.train.steps.Trainer`): forward in training mode (both deep-supervision outputs),
Hungarian matching, importance-sampled losses, gradients of the trainable parameters only, clipping,
AdamW. san-jax only: the PyTorch side of the comparison, part by part (forward + backward) and in the same
run, is `python -m benchmarks.components`.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from absl import flags

from benchmarks.common import program_flops, san_config, time_calls, write_json
from san_jax import cli



def make_batch(batch_size: int, size: int, num_classes: int, max_targets: int, seed: int = 0):
  from san_jax.losses import criterion
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 255, size=(batch_size, size, size, 3), dtype=np.uint8)
  labels, masks = [], []
  for _ in range(batch_size):
    n = int(rng.integers(3, 8))
    sem = rng.integers(0, n, size=(size // 32, size // 32)).repeat(32, 0).repeat(32, 1)
    present = np.unique(sem)
    labels.append(rng.choice(num_classes, size=len(present), replace=False))
    masks.append(np.stack([(sem == c).astype(np.uint8) for c in present]))
  t = criterion.pad_targets(labels, masks, (size, size), max_targets)
  return {"image": images, "image_size": np.full((batch_size, 2), size, np.int32), **t}


@dataclasses.dataclass
class Prepared:
  """The real train step at one geometry, ready to lower and run: `jitted(*args)` under `jax.set_mesh(mesh)`
  (args = state, frozen, batch, class embeddings, rng; the state is donated)."""
  trainer: Any
  jitted: Any
  args: Tuple[Any, ...]
  mesh: Any
  batch_ndims: Dict[str, int]


def prepare(model_key: str, batch_size: int, dtype: str, size: int = 640, num_classes: int = 171,
            max_targets: int = 16, **model_overrides) -> Prepared:
  """The official recipe's train step (configs/common.py) on one device, random weights and batch;
  `model_overrides` replace SANConfig fields (remat, ...)."""
  import jax
  import jax.numpy as jnp

  from configs import common
  from san_jax.train import sharding, steps

  train_cfg = common.train()
  train_cfg.compute_dtype = dtype
  train_cfg.batch_size = batch_size
  train_cfg.criterion.max_targets = max_targets
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
  rules = [tuple(r) for r in common.mesh().rules]
  trainer = steps.Trainer(san_config(model_key, **model_overrides), train_cfg, mesh, rules, num_classes)
  state, frozen = trainer.init(jax.random.key(0))
  batch = sharding.global_batch(make_batch(batch_size, size, num_classes, max_targets), mesh, rules)
  text_dim = trainer.model(state, frozen).ov_classifier.bg_embed[...].shape[-1]
  class_emb = jnp.asarray(np.random.default_rng(1).normal(size=(num_classes, text_dim)).astype(np.float32))
  batch_ndims = {k: v.ndim for k, v in batch.items()}
  step = trainer.compile_step(batch_ndims)
  return Prepared(trainer, step.jitted, step.args(state, frozen, batch, class_emb, jax.random.key(2)), mesh,
                  batch_ndims)


def bench(model_key: str, batch_size: int, dtype: str, runs: int, size: int = 640, num_classes: int = 171):
  import jax

  p = prepare(model_key, batch_size, dtype, size, num_classes)
  state, *rest = p.args
  holder = {"state": state}
  t0 = time.perf_counter()
  with jax.set_mesh(p.mesh):
    compiled = p.jitted.lower(*p.args).compile()
    compile_s = time.perf_counter() - t0
    flops = program_flops(p.jitted, *p.args)  # XLA's count, the custom calls' included; not the matcher's

  def one():
    with jax.set_mesh(p.mesh):
      holder["state"], m = compiled(holder["state"], *rest)
    jax.block_until_ready(m)

  times = time_calls(one, runs, warmup=1)
  t = statistics.median(times)
  return {"model": model_key, "batch": batch_size, "dtype": dtype, "median_s": t, "min_s": min(times),
          "images_per_s": batch_size / t, "compile_s": compile_s, "gflop": flops / 1e9,
          "gflops_per_s": flops / t / 1e9,
          "rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "runs": runs}


def format_table(rows) -> str:
  lines = ["| model | batch | dtype | s/step (median) | images/s | compile s | GFLOP/s | RSS peak GB |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['median_s']:.2f} | {r['images_per_s']:.2f} | "
                 f"{r['compile_s']:.1f} | {r['gflops_per_s']:.0f} | {r['rss_peak_gb']:.2f} |")
  return "\n".join(lines)


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_enum("model", "b16", ["b16", "l14"], "the SAN geometry", flag_values=fv)
  cli.DEFINE_typed_list("batch_sizes", [1, 2], "batch sizes", fv, item=int)
  flags.DEFINE_string("dtype", "float32", "compute dtype", flag_values=fv)
  flags.DEFINE_integer("runs", 5, "timed calls", flag_values=fv)
  flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)


def _main(args: flags.FlagValues, positional: List[str]) -> None:
  del positional
  rows = [bench(args.model, b, args.dtype, args.runs) for b in args.batch_sizes]
  print(format_table(rows))
  result = {"rows": rows}
  write_json(result, args.out)


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="benchmarks.train_step")


if __name__ == "__main__":
  main()

"""Full SAN inference: one image at 640x640 with a 150-class vocabulary, random weights, jitted.

  python -m benchmarks.san_inference [--models b16,l14] [--dtypes float32,bfloat16] [--runs 5] [--out FILE]

Per (model, dtype): median seconds per image over `--runs` calls after warm-up (the whole forward:
CLIP, side adapter, recognition, and the semantic post-processing to per-class probabilities at the
input size; class text embeddings cached, as in real use), images/s, compile time, peak memory (XLA's
buffer assignment for the compiled program, and the process's peak RSS), and GFLOP/s from XLA's cost
analysis of the compiled program (every op, matmuls dominating) against the machine's float32 matmul
throughput (a jitted 2048x2048 matmul). san-jax only: the PyTorch side of the comparison, part by part and
in the same run, is `python -m benchmarks.components`.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from absl import flags

from benchmarks.common import matmul_peak, program_flops, san_config, time_calls, write_json
from san_jax import cli

MODELS = ("b16", "l14")  # the --models choices; benchmarks.common.san_config builds each


def prepare(model_key: str, dtype: str, size: int, classes: int, batch: int = 1, abstract: bool = False,
            **model_overrides):
  """(jitted forward, its arguments): SAN inference on a [batch, size, size, 3] batch, random weights, to
  per-class probabilities per image (semantic_inference of the last deep-supervision output, per image);
  `model_overrides` replace SANConfig fields. `abstract`: the arguments are ShapeDtypeStructs (nothing is
  initialised; for lowering only)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from san_jax.models import san

  cfg = san_config(model_key, **model_overrides)
  compute = None if dtype == "float32" else jnp.dtype(dtype)
  new_model = lambda: san.SAN(cfg, rngs=nnx.Rngs(0), dtype=compute)
  graphdef, state = nnx.split(nnx.eval_shape(new_model))
  if not abstract:  # one jitted initialisation: eagerly, every parameter's init op would compile on its own
    state = jax.jit(lambda: nnx.split(new_model())[1])()

  def forward(state, images, class_emb):
    out = nnx.merge(graphdef, state)(images, class_emb)
    per_image = lambda logits, preds: san.semantic_inference(logits, preds, (size, size), (size, size),
                                                              (size, size), layout="hwc")
    return jax.vmap(per_image)(out["mask_logits"][:, -1], out["mask_preds"][:, -1])

  if abstract:
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    class_emb = jax.ShapeDtypeStruct((classes, cfg.clip.text.output_dim), jnp.float32)
    return jax.jit(forward), (state, images, class_emb)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)).astype(np.float32))
  class_emb = jnp.asarray(rng.normal(size=(classes, cfg.clip.text.output_dim)).astype(np.float32))
  return jax.jit(forward), (state, images, class_emb)


def bench(model_key: str, dtype: str, size: int, classes: int, runs: int) -> Dict[str, float]:
  import jax

  forward, args = prepare(model_key, dtype, size, classes)
  t0 = time.perf_counter()
  compiled = forward.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  flops = program_flops(forward, *args)  # the fused attention's FLOPs included
  mem = compiled.memory_analysis()
  xla_bytes = (getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "argument_size_in_bytes", 0)
               + getattr(mem, "output_size_in_bytes", 0)) if mem is not None else 0
  times = time_calls(lambda: jax.block_until_ready(compiled(*args)), runs, warmup=1)
  t = statistics.median(times)
  return {"model": model_key, "dtype": dtype, "size": size, "classes": classes, "median_s": t,
          "min_s": min(times), "images_per_s": 1.0 / t, "compile_s": compile_s, "gflop": flops / 1e9,
          "gflops_per_s": flops / t / 1e9, "xla_peak_gb": xla_bytes / 2 ** 30,
          "rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
          "runs": runs}


def format_table(rows: List[Dict[str, float]], peak: Dict[str, float]) -> str:
  head = (f"| model | dtype | s/image (median) | images/s | compile s | GFLOP | GFLOP/s | % of f32 matmul peak "
          f"| XLA peak GB | RSS peak GB |\n|---|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    lines.append(f"| {r['model']} | {r['dtype']} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | {r['compile_s']:.1f} | "
                 f"{r['gflop']:.0f} | {r['gflops_per_s']:.0f} | {100 * r['gflops_per_s'] / peak['gflops']:.0f}% | "
                 f"{r['xla_peak_gb']:.2f} | {r['rss_peak_gb']:.2f} |")
  lines.append(f"\nfloat32 matmul peak ({peak['n']}^2, jit): {peak['gflops']:.0f} GFLOP/s; machine: "
               f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores")
  return "\n".join(lines)


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  cli.DEFINE_typed_list("models", ["b16"], "the SAN geometries", fv, choices=sorted(MODELS))
  cli.DEFINE_typed_list("dtypes", ["float32", "bfloat16"], "compute dtypes", fv)
  flags.DEFINE_integer("size", 640, "image side", flag_values=fv)
  flags.DEFINE_integer("classes", 150, "vocabulary size", flag_values=fv)
  flags.DEFINE_integer("runs", 5, "timed calls", flag_values=fv)
  flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)


def _main(args: flags.FlagValues, positional: List[str]) -> None:
  del positional
  peak = matmul_peak(runs=10)
  rows = [bench(m, d, args.size, args.classes, args.runs) for m in args.models for d in args.dtypes]
  print(format_table(rows, peak))
  result = {"rows": rows, "matmul_peak": peak}
  write_json(result, args.out)


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="benchmarks.san_inference")


if __name__ == "__main__":
  main()

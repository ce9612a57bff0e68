"""What every benchmark shares: timing, the machine's matmul throughput, writing results."""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence


def time_calls(fn: Callable[[], object], runs: int, warmup: int = 2) -> List[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def time_interleaved(fns: Sequence[Callable[[], object]], runs: int, warmup: int = 2) -> List[List[float]]:
  """Per-call times of several functions, alternating calls so background load hits them alike."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  times: List[List[float]] = [[] for _ in fns]
  for _ in range(runs):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
  return times


def matmul_peak(runs: int, n: int = 2048) -> Dict[str, float]:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  t = statistics.median(time_calls(lambda: mm(a, b).block_until_ready(), runs))
  return {"n": n, "median_ms": 1e3 * t, "gflops": 2 * n ** 3 / t / 1e9}


def write_json(result: dict, path: Optional[str]) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
      f.write("\n")


# Benchmark geometries: the two official SANs and configs/tiny.py (CPU smoke runs of the GPU check).
MODEL_KEYS = ("b16", "l14", "tiny")


def san_config(model_key: str, **overrides):
  """The SANConfig of a benchmark geometry (`MODEL_KEYS`), fields replaced by `overrides` (e.g. remat)."""
  import dataclasses

  from san_jax.models import san
  if model_key not in MODEL_KEYS:
    raise ValueError(f"unknown benchmark model {model_key!r}; expected one of {list(MODEL_KEYS)}")
  if model_key == "tiny":
    from configs import tiny
    cfg = san.config_from_dict(tiny.tiny_model().to_dict())
  else:
    cfg = san.san_config({"b16": "san_vit_b16", "l14": "san_vit_l14"}[model_key])
  return dataclasses.replace(cfg, **overrides)


def xla_flops(stage) -> float:
  """XLA's cost-analysis FLOP count of a jax `Lowered` or `Compiled` (0 when the backend gives none)."""
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def program_flops(jitted, *args) -> float:
  """The FLOPs of `jitted(*args)` counted on XLA's own ops: the CPU custom calls (the fused float32 attention,
  the bf16 GEMM) are opaque to XLA's cost analysis, which counts them as 0 (at the side ViT's geometry the
  attention is more than half of the FLOPs), so the program is traced again under `gemm.xla_only()` and its
  lowered module counted. Jax's tracing caches do not key on that switch: they are cleared before (so the
  count is not of a cached trace with the custom calls) and after (so later traces are not XLA-only);
  executables compiled earlier stay valid."""
  import jax

  from san_jax.ops import gemm
  jax.clear_caches()
  try:
    with gemm.xla_only():
      return xla_flops(jitted.lower(*args))
  finally:
    jax.clear_caches()

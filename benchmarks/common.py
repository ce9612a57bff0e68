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

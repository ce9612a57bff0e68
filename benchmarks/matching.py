"""Time of the Hungarian matching per train step, and how it splits over hosts.

  python -m benchmarks.matching [--batch 32] [--queries 100] [--targets 64] [--outputs 2]

The train step hands each host the cost matrices of its own images only (`matcher.assign` under
shard_map), so with H hosts a host solves batch / H images per deep-supervision output. This times the
host side of that callback (`matcher._assign_on_host`: scipy's linear_sum_assignment on the [Q, n_valid]
block of every image) for H = 1, 2, 4, 8 at SAN's geometry: global batch 32, 100 queries, targets padded
to 64 with 4..24 valid per image (COCO-Stuff images show about 5-20 classes), 2 deep-supervision outputs
(B/16 and L/14 supervise blocks 7 and 8). Median of `--repeats` runs.

On a CPU with the native library the step runs the same assignment as a custom call instead
(`gemm.linear_sum_assignment`, csrc/hungarian.cc, scipy's pairs); the second column times it on the same
matrices, jitted and called from Python (so dispatch included), alternating with the scipy calls.
"""

from __future__ import annotations

import statistics
import time
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from san_jax import cli
from san_jax.losses import matcher
from san_jax.ops import gemm


def host_time_s(images: int, queries: int, targets: int, outputs: int, repeats: int,
                seed: int = 0) -> Tuple[float, Optional[float]]:
  """(median s of scipy's host side, median s of the native custom call or None where unavailable)."""
  rng = np.random.default_rng(seed)
  cost = rng.normal(size=(outputs, images, queries, targets)).astype(np.float32)
  counts = np.broadcast_to(rng.integers(4, 25, size=images), (outputs, images)).astype(np.int32)
  runs = {"scipy": lambda: matcher._assign_on_host(cost, counts)}  # pylint: disable=protected-access
  if gemm.assignment_availability()[0]:
    native, args = jax.jit(gemm.linear_sum_assignment), (jnp.asarray(cost), jnp.asarray(counts))
    runs["native"] = lambda: jax.block_until_ready(native(*args))
  times = {name: [] for name in runs}
  for fn in runs.values():
    fn()  # warm-up: scipy's import, the compile
  for _ in range(repeats):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return statistics.median(times["scipy"]), statistics.median(times["native"]) if "native" in times else None


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_integer("batch", 32, "global batch", flag_values=fv)
  flags.DEFINE_integer("queries", 100, "queries per image", flag_values=fv)
  flags.DEFINE_integer("targets", 64, "targets per image after padding", flag_values=fv)
  flags.DEFINE_integer("outputs", 2, "deep-supervision outputs matched per step", flag_values=fv)
  flags.DEFINE_integer("repeats", 20, "timed repeats", flag_values=fv)


def _main(args: flags.FlagValues, positional: List[str]) -> int:
  del positional
  print(f"matching host time per step: batch {args.batch}, {args.queries} queries, {args.targets} padded "
        f"targets, {args.outputs} outputs")
  print(f"native: {gemm.assignment_availability()[1]}")
  print("hosts  images/host  scipy ms/step/host  native ms/step/host  scipy / native")
  for hosts in (1, 2, 4, 8):
    if args.batch % hosts:
      continue
    scipy_s, native_s = host_time_s(args.batch // hosts, args.queries, args.targets, args.outputs, args.repeats)
    native = f"{1e3 * native_s:19.2f}  {scipy_s / native_s:14.2f}" if native_s else f"{'-':>19}  {'-':>14}"
    print(f"{hosts:5d}  {args.batch // hosts:11d}  {1e3 * scipy_s:18.2f}  {native}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="benchmarks.matching")


if __name__ == "__main__":
  main()

"""All benchmarks, one table: `python -m benchmarks [--quick] [--out results.json]`.

Runs, on whatever machine this is (the table names it):
  * SAN inference, ViT-B/16 and ViT-L/14 geometry at 640x640, 150 classes, float32 and bfloat16;
  * the SAN train step at 640x640: ViT-B/16 at batch 1 and 2 in float32 and at batch 1 in bfloat16, ViT-L/14
    at batch 1 in float32 and bfloat16;
  * the CLIP ViT-B/16 image tower at 224 and 320 against the PyTorch reference (when torch is installed);
and measures the machine's float32 matmul throughput (a jitted 2048x2048 matmul) to read GFLOP/s against.
`--quick` runs only the float32 B/16 rows. Every number is a median of several runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Optional, Sequence

from benchmarks import clip_forward, common, san_inference, train_step


def machine() -> str:
  import jax
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}"


def main(argv: Optional[Sequence[str]] = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  peak = common.matmul_peak(runs=10)
  models = ["b16"] if args.quick else ["b16", "l14"]
  dtypes = ["float32"] if args.quick else ["float32", "bfloat16"]
  failures = []

  def attempt(name, fn, *a):
    """One row; a failing row is reported (and fails the command) without losing the others."""
    try:
      row = fn(*a)
      print(f"{name}: {json.dumps(row, default=str)}", flush=True)  # kept in the log if a later row dies
      return row
    except (Exception, SystemExit) as e:  # pylint: disable=broad-except
      print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
      failures.append(f"{name}: {e}")
      return None

  inference = [attempt(f"inference {m} {d}", san_inference.bench, m, d, 640, 150, args.runs)
               for m in models for d in dtypes]
  # Train steps take 10-60 s each on a CPU: at most 3 timed steps per row.
  step_rows = [("b16", 1, "float32")] if args.quick else [
      ("b16", 1, "float32"), ("b16", 2, "float32"), ("b16", 1, "bfloat16"), ("l14", 1, "float32"), ("l14", 1, "bfloat16")]
  steps = [attempt(f"train step {m} batch {b} {d}", train_step.bench, m, b, d, min(args.runs, 3))
           for m, b, d in step_rows]
  inference, steps = [r for r in inference if r], [r for r in steps if r]
  clip = None
  if not args.quick:
    try:
      import torch  # noqa: F401  (the PyTorch side of the comparison; a dev dependency)
      clip = attempt("CLIP forward", clip_forward.main, ["--runs", str(max(args.runs, 5))])
    except ImportError as e:
      print(f"(CLIP forward benchmark skipped: {e})")

  print(f"\nmachine: {machine()}; float32 matmul peak {peak['gflops']:.0f} GFLOP/s\n")
  lines = ["| benchmark | dtype | s per image/step | images/s | compile s | GFLOP/s (% of f32 peak) | peak memory GB | official PyTorch |",
           "|---|---|---|---|---|---|---|---|"]
  for r in inference:
    lines.append(f"| SAN {r['model']} inference 640 / 150 cls | {r['dtype']} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | "
                 f"{r['compile_s']:.1f} | {r['gflops_per_s']:.0f} ({100 * r['gflops_per_s'] / peak['gflops']:.0f}%) | "
                 f"{r['rss_peak_gb']:.1f} RSS, {r['xla_peak_gb']:.1f} XLA | {r['official_s']:.2f} s |")
  for r in steps:
    off = f"{r['official_s']:.1f} s" if r["official_s"] else "-"
    lines.append(f"| SAN {r['model']} train step 640, batch {r['batch']} | {r['dtype']} | {r['median_s']:.2f} | "
                 f"{r['images_per_s']:.2f} | {r['compile_s']:.1f} | {r['gflops_per_s']:.0f} "
                 f"({100 * r['gflops_per_s'] / peak['gflops']:.0f}%) | {r['rss_peak_gb']:.1f} RSS | {off} |")
  if clip:
    for r in clip.get("sizes", []):
      lines.append(f"| CLIP B/16 image tower {r.get('size')} | float32 | {r.get('jax_ms', 0) / 1e3:.3f} | - | "
                   f"{r.get('jax_compile_s', 0):.1f} | {r.get('jax_gflops', 0):.0f} | - | torch {r.get('torch_ms', 0) / 1e3:.3f} s |")
  print("\n".join(lines))
  result = {"machine": machine(), "matmul_peak": peak, "inference": inference, "train_step": steps, "clip": clip,
            "failures": failures}
  common.write_json(result, args.out)
  if failures:
    raise SystemExit("benchmark rows failed:\n  " + "\n  ".join(failures))
  return result


if __name__ == "__main__":
  main()

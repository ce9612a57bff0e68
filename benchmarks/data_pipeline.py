"""Input-pipeline throughput: batches/s on the synthetic shapes set at 640x640 with SAN's full training
augmentation (random short side 320..960, 640x640 crop, SSD colour, flip, padding, 64 target masks).

  python benchmarks/data_pipeline.py                       # ArrayRecord shapes set built into a temp dir
  python benchmarks/data_pipeline.py --source memory       # rendered on the fly (adds rendering cost)
  python benchmarks/data_pipeline.py --num_workers 2 --num_threads 1

Prints one JSON line with the settings, batches/s and images/s over --batches batches after --warmup
batches, and the CPU seconds spent per batch (this process and its threads; with --num_workers the workers'
time is not counted), which varies less than wall time on a shared machine. Host-side only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from san_jax.data import augment, pipeline, shapes  # noqa: E402  pylint: disable=g-import-not-at-top


def _source(args, tmp: str):
  spec = shapes.ShapesSpec(image_size=(args.size, args.size))
  if args.source == "memory":
    return shapes.ShapesSource(args.num_examples, spec=spec)
  from san_jax.data import build  # pylint: disable=g-import-not-at-top
  build.main(["shapes", "--data_dir", tmp, "--image_size", str(args.size), str(args.size), "--num_train",
              str(args.num_examples), "--num_val", "1"])
  return pipeline.load_source("shapes", "train", tmp,
                              config=f"custom_{args.size}x{args.size}_n{args.num_examples}_1_s0_all")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--source", choices=("tfds", "memory"), default="tfds")
  p.add_argument("--size", type=int, default=640, help="synthetic image side")
  p.add_argument("--num_examples", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--num_threads", type=int, default=os.cpu_count() or 2)
  p.add_argument("--num_workers", type=int, default=0)
  p.add_argument("--prefetch", type=int, default=2)
  p.add_argument("--max_targets", type=int, default=64)
  p.add_argument("--no_masks", action="store_true", help="skip the [K, H, W] target masks")
  args = p.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    src = _source(args, tmp)
    aug = augment.TrainAugConfig(max_targets=args.max_targets, with_masks=not args.no_masks)
    pipe = pipeline.make_pipeline(src, mode="train", batch_size=args.batch_size, seed=0, process_index=0,
                                  process_count=1, train_aug=aug, num_threads=args.num_threads,
                                  num_workers=args.num_workers, prefetch=args.prefetch)
    with pipe:
      for _ in range(args.warmup):
        next(pipe)
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(args.batches):
        batch = next(pipe)
      dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  result = dict(vars(args), batches_per_s=round(args.batches / dt, 3),
                images_per_s=round(args.batches * args.batch_size / dt, 2),
                cpu_s_per_batch=round(cpu / args.batches, 3), load_avg_1min=os.getloadavg()[0],
                cpu_count=os.cpu_count(),
                batch_shapes={k: list(v.shape) for k, v in batch.items()})
  print(json.dumps(result))


if __name__ == "__main__":
  main()

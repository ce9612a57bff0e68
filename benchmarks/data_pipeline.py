"""Input-pipeline throughput: batches/s on the synthetic shapes set at 640x640 with SAN's full training
augmentation (random short side 320..960, 640x640 crop, SSD colour, flip, padding, 64 target masks).

  python -m benchmarks.data_pipeline                       # ArrayRecord shapes set built into a temp dir
  python -m benchmarks.data_pipeline --source memory       # rendered on the fly (adds rendering cost)
  python -m benchmarks.data_pipeline --num_workers 2 --num_threads 1

Prints one JSON line with the settings, batches/s and images/s over --batches batches after --warmup
batches, and the CPU seconds spent per batch (this process and its threads; with --num_workers the workers'
time is not counted), which varies less than wall time on a shared machine. Host-side only.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import List, Optional, Sequence

from absl import flags

from san_jax import cli
from san_jax.data import augment, pipeline, shapes

FLAG_NAMES = ("source", "size", "num_examples", "batch_size", "batches", "warmup", "num_threads", "num_workers",
              "prefetch", "max_targets", "no_masks")


def _source(args, tmp: str):
  spec = shapes.ShapesSpec(image_size=(args.size, args.size))
  if args.source == "memory":
    return shapes.ShapesSource(args.num_examples, spec=spec)
  from san_jax.data import build  # pylint: disable=g-import-not-at-top
  build.main(["shapes", "--data_dir", tmp, "--image_size", f"{args.size},{args.size}", "--num_train",
              str(args.num_examples), "--num_val", "1"])
  return pipeline.load_source("shapes", "train", tmp,
                              config=f"custom_{args.size}x{args.size}_n{args.num_examples}_1_s0_all")


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_enum("source", "tfds", ["tfds", "memory"], "an ArrayRecord set built into a temp dir, or rendered "
                    "on the fly", flag_values=fv)
  flags.DEFINE_integer("size", 640, "synthetic image side", flag_values=fv)
  flags.DEFINE_integer("num_examples", 64, "images in the set", flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "images per batch", flag_values=fv)
  flags.DEFINE_integer("batches", 20, "timed batches", flag_values=fv)
  flags.DEFINE_integer("warmup", 3, "batches before timing", flag_values=fv)
  flags.DEFINE_integer("num_threads", os.cpu_count() or 2, "grain threads", flag_values=fv)
  flags.DEFINE_integer("num_workers", 0, "grain worker processes", flag_values=fv)
  flags.DEFINE_integer("prefetch", 2, "batches prefetched", flag_values=fv)
  flags.DEFINE_integer("max_targets", 64, "target masks per image after padding", flag_values=fv)
  flags.DEFINE_boolean("no_masks", False, "skip the [K, H, W] target masks", flag_values=fv)


def _main(args: flags.FlagValues, positional: List[str]) -> None:
  del positional

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
  result = dict({k: args[k].value for k in FLAG_NAMES}, batches_per_s=round(args.batches / dt, 3),
                images_per_s=round(args.batches * args.batch_size / dt, 2),
                cpu_s_per_batch=round(cpu / args.batches, 3), load_avg_1min=os.getloadavg()[0],
                cpu_count=os.cpu_count(),
                batch_shapes={k: list(v.shape) for k, v in batch.items()})
  print(json.dumps(result))


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="benchmarks.data_pipeline")


if __name__ == "__main__":
  main()

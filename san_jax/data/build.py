"""Builds a data set's ArrayRecord files with its TFDS builder.

  python -m san_jax.data.build coco_stuff_171 --manual_dir ~/datasets --data_dir ~/tensorflow_datasets
  python -m san_jax.data.build ade20k_150 --manual_dir ~/datasets/ADEChallengeData2016 --data_dir OUT
  python -m san_jax.data.build shapes --data_dir OUT [--config small | --image_size 96 96 --num_train 500]

--manual_dir may be a detectron2 `datasets/` root or the data set's own folder (san_jax/data/README.md lists
the layouts). A corrupt or inconsistent file stops the build with an error naming it; --skip_corrupt drops
such examples instead and reports them. Reading needs no TensorFlow:
  tfds.data_source("coco_stuff_171", split="val", data_dir=OUT)  (after `import san_jax.data.builders`)
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import tensorflow_datasets as tfds

from san_jax.data import builders


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m san_jax.data.build", description=__doc__.splitlines()[0])
  p.add_argument("name", choices=sorted(builders.BUILDERS))
  p.add_argument("--data_dir", required=True, help="where the built data set goes (TFDS data_dir)")
  p.add_argument("--manual_dir", help="the raw data (required for every set but shapes)")
  p.add_argument("--skip_corrupt", action="store_true", help="drop unreadable/inconsistent examples")
  g = p.add_argument_group("shapes only")
  g.add_argument("--config", help=f"a predefined shapes config: "
                 f"{[c.name for c in builders.Shapes.BUILDER_CONFIGS]}")
  g.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"))
  g.add_argument("--num_train", type=int)
  g.add_argument("--num_val", type=int)
  g.add_argument("--seed", type=int)
  g.add_argument("--train_classes", choices=("all", "seen"))
  return p.parse_args(argv)


def make_builder(args: argparse.Namespace) -> tfds.core.DatasetBuilder:
  kwargs = dict(data_dir=args.data_dir, file_format="array_record")
  if args.name == "shapes":
    return builders.Shapes(config=_shapes_config(args), **kwargs)
  if not args.manual_dir:
    raise SystemExit(f"{args.name} needs --manual_dir (see san_jax/data/README.md)")
  return builders.get_builder_class(args.name)(skip_corrupt=args.skip_corrupt, **kwargs)


def _shapes_config(args: argparse.Namespace):
  """A predefined config, or a custom one named after its settings when any is overridden."""
  base = {c.name: c for c in builders.Shapes.BUILDER_CONFIGS}[args.config or "default"]
  overrides = {k: getattr(args, k) for k in ("image_size", "num_train", "num_val", "seed", "train_classes")
               if getattr(args, k) is not None}
  if not overrides:
    return base.name
  fields = {k: getattr(base, k) for k in ("image_size", "num_train", "num_val", "seed", "max_objects",
                                          "train_classes")}
  fields.update(overrides)
  fields["image_size"] = tuple(fields["image_size"])
  h, w = fields["image_size"]
  name = (f"custom_{h}x{w}_n{fields['num_train']}_{fields['num_val']}_s{fields['seed']}_"
          f"{fields['train_classes']}")
  return builders.ShapesConfig(name=name, description="custom", **fields)


def main(argv: Optional[List[str]] = None) -> int:
  args = _parse(argv)
  builder = make_builder(args)
  download_config = tfds.download.DownloadConfig(manual_dir=args.manual_dir) if args.manual_dir else None
  builder.download_and_prepare(download_config=download_config)
  info = builder.info
  print(f"built {info.full_name} in {builder.data_dir}")
  for split, split_info in info.splits.items():
    print(f"  {split}: {split_info.num_examples} examples")
  for split, skipped in getattr(builder, "skipped", {}).items():
    if skipped:
      print(f"  {split}: skipped {len(skipped)} corrupt examples:")
      for path, reason in skipped:
        print(f"    {path}: {reason}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Builds a data set's ArrayRecord files with its TFDS builder.

  python -m san_jax.data.build coco_stuff_171 --manual_dir ~/datasets --data_dir ~/tensorflow_datasets
  python -m san_jax.data.build ade20k_150 --manual_dir ~/datasets/ADEChallengeData2016 --data_dir OUT
  python -m san_jax.data.build shapes --data_dir OUT [--config small | --image_size 96,96 --num_train 500]

--manual_dir may be a detectron2 `datasets/` root or the data set's own folder (san_jax/data/README.md lists
the layouts). A corrupt or inconsistent file stops the build with an error naming it; --skip_corrupt drops
such examples instead and reports them. Reading needs no TensorFlow:
  tfds.data_source("coco_stuff_171", split="val", data_dir=OUT)  (after `import san_jax.data.builders`)
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import tensorflow_datasets as tfds
from absl import app, flags

from san_jax import cli
from san_jax.data import builders

SHAPES_FIELDS = ("image_size", "num_train", "num_val", "seed", "train_classes")  # the flags only shapes takes


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_string("data_dir", None, "where the built data set goes (TFDS data_dir)", required=True,
                      flag_values=fv)
  flags.DEFINE_string("manual_dir", None, "the raw data (required for every set but shapes)", flag_values=fv)
  flags.DEFINE_boolean("skip_corrupt", False, "drop unreadable/inconsistent examples", flag_values=fv)
  flags.DEFINE_enum("config", None, [c.name for c in builders.Shapes.BUILDER_CONFIGS], "shapes only: a "
                    "predefined shapes config", flag_values=fv)
  cli.DEFINE_typed_list("image_size", None, "shapes only: image height and width, H,W", fv, item=int, length=2)
  flags.DEFINE_integer("num_train", None, "shapes only: training images", flag_values=fv)
  flags.DEFINE_integer("num_val", None, "shapes only: validation images", flag_values=fv)
  flags.DEFINE_integer("seed", None, "shapes only: the rendering seed", flag_values=fv)
  flags.DEFINE_enum("train_classes", None, ["all", "seen"], "shapes only: the classes of the training split",
                    flag_values=fv)


def make_builder(name: str, f: flags.FlagValues) -> tfds.core.DatasetBuilder:
  """The TFDS builder of data set `name` with the parsed flags `f` (UsageError: --manual_dir missing)."""
  kwargs = dict(data_dir=f.data_dir, file_format="array_record")
  if name == "shapes":
    return builders.Shapes(config=_shapes_config(f), **kwargs)
  if not f.manual_dir:
    raise app.UsageError(f"{name} needs --manual_dir (see san_jax/data/README.md)")
  return builders.get_builder_class(name)(skip_corrupt=f.skip_corrupt, **kwargs)


def _shapes_config(f: flags.FlagValues):
  """A predefined config, or a custom one named after its settings when any is overridden."""
  base = {c.name: c for c in builders.Shapes.BUILDER_CONFIGS}[f.config or "default"]
  overrides = {k: f[k].value for k in SHAPES_FIELDS if f[k].value is not None}
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


def _main(f: flags.FlagValues, args: List[str]) -> int:
  name = args[0]
  if name not in builders.BUILDERS:
    raise app.UsageError(f"unknown data set {name!r}; known: {', '.join(sorted(builders.BUILDERS))}")
  builder = make_builder(name, f)
  download_config = tfds.download.DownloadConfig(manual_dir=f.manual_dir) if f.manual_dir else None
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m san_jax.data.build NAME --data_dir OUT ...`; in-process: main([NAME, "--data_dir", OUT, ...])."""
  return cli.run(_define_flags, _main, argv, prog="san_jax.data.build", positional=["NAME"])


if __name__ == "__main__":
  main()

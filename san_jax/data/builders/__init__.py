"""TFDS builders, one per data set; importing this package registers them with TFDS.

  coco_stuff_171  ade20k_150  ade20k_847  pcontext_59  pcontext_459  voc_20  voc_21  shapes
Build one with `python -m san_jax.data.build NAME --manual_dir DIR --data_dir OUT` (san_jax/data/README.md).
"""

from san_jax.data.builders.ade20k import Ade20k150, Ade20k847
from san_jax.data.builders.coco_stuff import CocoStuff171
from san_jax.data.builders.common import CorruptExampleError, SemSegBuilder
from san_jax.data.builders.pcontext import PascalContext59, PascalContext459
from san_jax.data.builders.shapes import Shapes, ShapesConfig
from san_jax.data.builders.voc import Voc20, Voc21

BUILDERS = {cls.name: cls for cls in (CocoStuff171, Ade20k150, Ade20k847, PascalContext59, PascalContext459,
                                      Voc20, Voc21, Shapes)}


def get_builder_class(name: str):
  try:
    return BUILDERS[name]
  except KeyError:
    raise KeyError(f"unknown data set {name!r}; known: {sorted(BUILDERS)}") from None

"""Independent PyTorch references for the tests: open_clip, timm and transformers on CPU.

PyPI's torchvision is a CUDA build that cannot load beside the CPU torch wheel, and open_clip imports it
at package import (for its image transforms and a frozen BatchNorm, neither of which the tests use). We
install a minimal stand-in `torchvision` module before importing open_clip; the model code under test
(open_clip.transformer, open_clip.model) does not use torchvision at all.
"""

from __future__ import annotations

import sys
import types


def _install_torchvision_stub():
  if "torchvision" in sys.modules:
    return
  try:  # a working torchvision wins
    import torchvision  # noqa: F401
    return
  except Exception:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]

  class _Dummy:
    def __init__(self, *args, **kwargs):
      raise RuntimeError("torchvision stand-in: image transforms are not available in tests")

  import importlib.machinery

  def module(name):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers probes find_spec("torchvision")
    return mod

  tv = module("torchvision")
  tv.__version__ = "0.0.0+stub"
  transforms = module("torchvision.transforms")
  functional = module("torchvision.transforms.functional")
  ops = module("torchvision.ops")
  misc = module("torchvision.ops.misc")
  for name in ["Normalize", "Compose", "RandomResizedCrop", "ToTensor", "Resize", "CenterCrop", "ColorJitter",
               "Grayscale", "RandomHorizontalFlip", "RandomCrop", "Lambda"]:
    setattr(transforms, name, _Dummy)

  class InterpolationMode:
    BICUBIC = "bicubic"
    BILINEAR = "bilinear"
    NEAREST = "nearest"

  transforms.InterpolationMode = InterpolationMode
  transforms.functional = functional
  misc.FrozenBatchNorm2d = _Dummy
  ops.misc = misc
  tv.transforms = transforms
  tv.ops = ops
  sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                      "torchvision.transforms.functional": functional, "torchvision.ops": ops,
                      "torchvision.ops.misc": misc})


def open_clip():
  # transformers (imported by open_clip) must decide "no torchvision" before the stand-in exists, or it
  # would try to use it for image processing.
  import transformers  # noqa: F401
  from transformers.utils import import_utils
  import_utils.is_torchvision_available()
  _install_torchvision_stub()
  import open_clip as oc
  return oc


def timm():
  """timm (the side ViT's reference), with the torchvision stand-in extended by the names timm's data
  package imports at package import (datasets, transforms; none used by its model code)."""
  open_clip()
  tv = sys.modules["torchvision"]
  if getattr(tv, "__version__", "") == "0.0.0+stub" and "torchvision.datasets" not in sys.modules:
    import importlib.machinery

    class _Dummy:
      def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision stand-in: datasets and transforms are not available in tests")

    datasets = types.ModuleType("torchvision.datasets")
    datasets.__spec__ = importlib.machinery.ModuleSpec("torchvision.datasets", None)
    def stand_in(name):
      if name.startswith("__"):
        raise AttributeError(name)
      return _Dummy

    datasets.__getattr__ = stand_in
    tv.datasets = datasets
    sys.modules["torchvision.datasets"] = datasets
    transforms = sys.modules["torchvision.transforms"]
    for mode in ("BOX", "HAMMING", "LANCZOS"):
      setattr(transforms.InterpolationMode, mode, mode.lower())
    sys.modules["torchvision.transforms.functional"].InterpolationMode = transforms.InterpolationMode
    for name in ("torchvision.transforms", "torchvision.transforms.functional"):
      sys.modules[name].__getattr__ = stand_in
  import timm as tm
  return tm


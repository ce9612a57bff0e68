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

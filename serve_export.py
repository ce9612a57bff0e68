"""Serve a `python -m san_jax.export` artifact with nothing but jax and numpy (`load` imports no san_jax).

    python serve_export.py /srv/san image.png --out labels.png     # one image (PIL reads it, if installed)
    python serve_export.py /srv/san batch.npy --out labels.npy     # uint8 [B, H, W, 3]

(The command line itself is the repository's, absl through san_jax.cli, like every other entry point.)
In a server, keep the loaded function and call it per request:

    from serve_export import load
    run, meta = load("/srv/san")
    labels, probs = run(images)   # uint8 [B, H, W, 3] at meta["size"] -> int32 [B, H, W], float32 [B, C, H, W]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

ARTIFACT = "model.jaxexport"
META = "model.json"


def load(directory: str) -> Tuple[Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]], dict]:
  """(run, meta): run(images uint8 [B, H, W, 3]) -> (labels int32 [B, H, W], probs float32 [B, C, H, W])."""
  import jax
  from jax import export

  for name in (ARTIFACT, META):
    if not os.path.isfile(os.path.join(directory, name)):
      raise FileNotFoundError(f"{directory}: no {name} (write one with python -m san_jax.export)")
  with open(os.path.join(directory, META)) as f:
    meta = json.load(f)
  with open(os.path.join(directory, ARTIFACT), "rb") as f:
    exported = export.deserialize(bytearray(f.read()))
  h, w = meta["size"]
  call = jax.jit(exported.call)

  def run(images: np.ndarray):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    if images.dtype != np.uint8 or images.shape[1:] != (h, w, 3):
      raise ValueError(f"expected uint8 images [B, {h}, {w}, 3] (the exported size), got {images.dtype} "
                       f"{list(images.shape)}")
    labels, probs = call(images)
    return np.asarray(labels), np.asarray(probs)

  return run, meta


def _define_flags(fv, argv: List[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("out", None, "labels: .png (one image) or .npy", required=True, flag_values=fv)


def _main(f, args: List[str]) -> int:
  artifact, images_path = args  # the directory python -m san_jax.export wrote; an image file (needs PIL) or .npy
  run, meta = load(artifact)
  if images_path.endswith(".npy"):
    images = np.load(images_path)
  else:
    from PIL import Image
    images = np.asarray(Image.open(images_path).convert("RGB"))
  labels, _ = run(images)
  if f.out.endswith(".npy"):
    np.save(f.out, labels)
  else:
    from PIL import Image
    Image.fromarray(labels[0].astype(np.uint8 if len(meta["class_names"]) <= 256 else np.uint16)).save(f.out)
  present = np.bincount(labels.ravel(), minlength=len(meta["class_names"]))
  top = sorted(((c, meta["class_names"][i]) for i, c in enumerate(present) if c), reverse=True)[:5]
  print(f"{labels.shape[0]} image(s): " + ", ".join(f"{n} {100 * c / labels.size:.0f}%" for c, n in top))
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python serve_export.py ARTIFACT IMAGES --out LABELS`; in-process: main([ARTIFACT, IMAGES, "--out", ...])."""
  from san_jax import cli  # pylint: disable=g-import-not-at-top  (the command line only; load() needs no san_jax)
  return cli.run(_define_flags, _main, argv, prog="serve_export.py", positional=["ARTIFACT", "IMAGES"])


if __name__ == "__main__":
  main()

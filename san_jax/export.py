"""A serving artifact of the whole SAN inference for one vocabulary and one input size (jax.export).

    python -m san_jax.export --model san_vit_b16 --vocab "cat, dog, grass" --size 480,640 --out /srv/san
    python -m san_jax.export --model runs/demo/san --vocab "red circle, blue square" --size 128,128 --out /tmp/e

DIR/model.jaxexport is `jax.export.Exported.serialize()` (StableHLO with its calling convention) of

    images uint8 [B, H, W, 3] (RGB)  ->  labels int32 [B, H, W], probs float32 [B, C, H, W]

B is symbolic (any batch size); H x W is the exported size (resize or pad images to it first). Inside:
CLIP normalisation and zero padding to the model's size_divisibility, the CLIP feature extractor, the side
adapter, recognition with attention bias, and the official post-processing (`san.semantic_inference`:
masks upsampled to the padded size, cropped, combined with the class probabilities; label = argmax), the
same computation as `Segmenter.segment` at that size. The parameters and the vocabulary's class
embeddings are constants of the program, so nothing else is needed to serve it. DIR/model.json lists
the inputs, outputs, class names, the jax version that wrote it, the calling-convention version and the
platforms it was lowered for.

Serving needs only jax and numpy: `serve_export.load` at the repository root (no san_jax import) loads and
runs it. Readers: jax guarantees six months of backward compatibility for serialized artifacts (newer
releases read it); an older jax needs the artifact's calling convention within its
`jax.export.minimum/maximum_supported_calling_convention_version` (0.10.2: 9..10) and its StableHLO
version (serialized for a StableHLO about four weeks older than the writer's).
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
from absl import flags

from san_jax import cli

ARTIFACT = "model.jaxexport"
META = "model.json"


def inference_fn(pretrained_model, class_emb, size: Tuple[int, int]):
  """images uint8 [B, H, W, 3] -> (labels int32 [B, H, W], probs float32 [B, C, H, W]) with the model's
  parameters and the class embeddings closed over (constants of the exported program)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from san_jax.models import san as san_lib  # pylint: disable=g-import-not-at-top
  from san_jax.ops import resize  # pylint: disable=g-import-not-at-top
  model = pretrained_model.model
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  h, w = (int(s) for s in size)
  ph, pw = resize.padded_size((h, w), cfg.size_divisibility)

  def run(images):
    b = images.shape[0]
    canvas = jnp.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
    sizes = jnp.broadcast_to(jnp.asarray([h, w], jnp.int32), (b, 2))
    out = nnx.merge(graphdef, state)(san_lib.normalize_on_device(canvas, sizes, cfg), class_emb)
    probs = jax.vmap(lambda lg, pr: san_lib.semantic_inference(lg, pr, (ph, pw), (h, w), (h, w)))(
        out["mask_logits"][:, -1], out["mask_preds"][:, -1]).astype(jnp.float32)
    return jnp.argmax(probs, axis=1).astype(jnp.int32), probs

  return run


def export(pretrained_model, vocabulary: Sequence[str], size: Tuple[int, int], out_dir: str,
           platforms: Sequence[str] = ("cpu",)) -> dict:
  """Writes DIR/model.jaxexport and DIR/model.json; returns the JSON dict. out_dir must not exist."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  from san_jax.text.classifier import validate_vocabulary  # pylint: disable=g-import-not-at-top
  names = validate_vocabulary(vocabulary)
  h, w = (int(s) for s in size)
  if h < 1 or w < 1:
    raise ValueError(f"--size must be positive, got {h} x {w}")
  if os.path.exists(out_dir):
    raise FileExistsError(f"{out_dir} exists; choose a new directory (nothing was written)")
  emb = pretrained_model.segmenter().class_embeddings(names)
  fn = jax.jit(inference_fn(pretrained_model, emb, (h, w)))
  (b,) = jax_export.symbolic_shape("b")
  from san_jax.ops import gemm  # pylint: disable=g-import-not-at-top
  with gemm.xla_only():  # a serving artifact runs on plain jax: no custom call of this build
    exported = jax_export.export(fn, platforms=tuple(platforms))(jax.ShapeDtypeStruct((b, h, w, 3), np.uint8))
  meta = {
      "inputs": [{"name": "images", "dtype": "uint8", "shape": ["B", h, w, 3], "layout": "RGB, 0..255"}],
      "outputs": [{"name": "labels", "dtype": "int32", "shape": ["B", h, w], "meaning": "argmax class id"},
                  {"name": "probs", "dtype": "float32", "shape": ["B", len(names), h, w],
                   "meaning": "per-class semantic scores (SAN's sem_seg)"}],
      "class_names": list(names), "size": [h, w], "model": pretrained_model.describe(),
      "jax_version": jax.__version__, "calling_convention_version": exported.calling_convention_version,
      "platforms": list(exported.platforms),
  }
  os.makedirs(out_dir)
  with open(os.path.join(out_dir, ARTIFACT), "wb") as f:
    f.write(exported.serialize())
  with open(os.path.join(out_dir, META), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_string("model", None, "any source san_jax.pretrained loads: san_vit_b16 | san_vit_l14, a .pth, a "
                      "params checkpoint, a training run directory", required=True, flag_values=fv)
  flags.DEFINE_integer("step", None, "with a training run: the saved step", flag_values=fv)
  flags.DEFINE_string("vocab", None, 'class names, comma separated: "cat, dog, grass"', required=True,
                      flag_values=fv)
  cli.DEFINE_typed_list("size", None, "input height and width: H,W", fv, item=int, length=2)
  flags.mark_flag_as_required("size", flag_values=fv)
  flags.DEFINE_string("out", None, "output directory (must not exist)", required=True, flag_values=fv)
  flags.DEFINE_list("platforms", ["cpu"], "comma-separated lowering platforms (cpu, cuda, tpu)", flag_values=fv)


def _main(f: flags.FlagValues, args: List[str]) -> int:
  del args
  from san_jax import pretrained  # pylint: disable=g-import-not-at-top
  from san_jax.text.classifier import VocabularyError, parse_vocabulary  # pylint: disable=g-import-not-at-top
  if os.path.exists(f.out):
    print(f"san_jax.export: {f.out} exists; choose a new directory (nothing was written)", file=sys.stderr)
    return 2
  try:
    names = parse_vocabulary(f.vocab)
    p = pretrained.load(f.model, step=f.step)
    meta = export(p, names, tuple(f.size), f.out, [s for s in f.platforms if s])
  except (pretrained.PretrainedError, VocabularyError, ValueError) as e:
    print(f"san_jax.export: {e}", file=sys.stderr)
    return 2
  print(f"wrote {f.out}/{ARTIFACT} ({os.path.getsize(os.path.join(f.out, ARTIFACT)):,} bytes): "
        f"{len(meta['class_names'])} classes, input [B, {meta['size'][0]}, {meta['size'][1]}, 3] uint8, "
        f"platforms {meta['platforms']}, jax {meta['jax_version']}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="san_jax.export")


if __name__ == "__main__":
  main()

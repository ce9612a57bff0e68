"""Segment images with an open vocabulary.

  python predict.py --checkpoint /ckpt/san_vit_b16 --vocab "cat, dog, grass" --image photo.jpg --out out/
  python predict.py --checkpoint /ckpt/san_vit_b16 --vocab_file classes.txt --image photos/ --recursive --out out/
  python predict.py --model san_vit_b16 --vocab "cat, dog, grass" --image photo.jpg --out out/   # Hugging Face Hub
  python predict.py --workdir runs/demo/san --vocab "red circle, blue square" --image x.png --out out/  # a training run
  python predict.py --config configs/tiny.py --random_init --vocab "a, b" --image x.png --out /tmp/o   # smoke test

For every image, in OUT (mirroring the input folder's layout):
  NAME_label.png    class ids (uint8; uint16 when the vocabulary has more than 256 classes), the image's size
  NAME_overlay.png  the image tinted by class, with a legend of the classes present and their shares
  NAME.json         the vocabulary, and per class present its pixel count and fraction of the image

--aug_vocab coco_all | coco_stuff appends the COCO-Stuff-171 class names (all 171, or the 91 "stuff" ones),
minus those already in the user's vocabulary, as in SAN's demo: everything else in the scene then has a
class of its own rather than being forced into one of the user's. Those extra classes are predicted and
reported like the others (the outputs keep every name; the JSON marks which ones the user gave).

Images are resized like SAN's evaluation (short side --min_size, 640 by default; --min_size 0 keeps the
input size) and the prediction is returned at the original size. Text features are computed once per
vocabulary. Unreadable files are reported at the end and skipped; the exit status is non-zero only when no
image could be segmented.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from san_jax import cli

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")
SOURCES = ("checkpoint", "workdir", "model", "random_init")


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  flags.DEFINE_string("checkpoint", None, "a SAN parameters checkpoint directory or an official .pth", flag_values=fv)
  flags.DEFINE_string("workdir", None, "a training run directory (config.json + checkpoints/): its latest step, "
                      "or --step", flag_values=fv)
  flags.DEFINE_string("model", None, "any source san_jax.pretrained loads: san_vit_b16 | san_vit_l14 (official "
                      "weights from the Hugging Face Hub), a .pth, a params checkpoint, a run directory",
                      flag_values=fv)
  flags.DEFINE_boolean("random_init", None, "random weights (needs --config): smoke tests", flag_values=fv)
  flags.mark_flags_as_mutual_exclusive(SOURCES, required=True, flag_values=fv)
  config_flags.DEFINE_config_file("config", None, "a configs/*.py file (model geometry for --random_init; test "
                                  "resize)", flag_values=fv, lock_config=False, sys_argv=argv)
  flags.DEFINE_integer("seed", 0, "seed of --random_init", flag_values=fv)
  flags.DEFINE_integer("step", None, "with --workdir: the saved step (default: the latest)", flag_values=fv)
  flags.DEFINE_string("vocab", "", 'class names, comma separated: "cat, dog, grass"', flag_values=fv)
  flags.DEFINE_string("vocab_file", None, "class names, one per line ('#' comments)", flag_values=fv)
  from san_jax.data.vocabularies import AUG_VOCABS  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("aug_vocab", None, sorted(AUG_VOCABS), "append COCO-Stuff class names (all 171, or the 91 "
                    "stuff classes)", case_sensitive=False, flag_values=fv)
  flags.DEFINE_string("image", None, "an image file or a folder of images", required=True, flag_values=fv)
  flags.DEFINE_boolean("recursive", False, "also look into sub-folders", flag_values=fv)
  flags.DEFINE_string("out", None, "output directory", required=True, flag_values=fv)
  flags.DEFINE_integer("min_size", None, "short side of the test resize (default: the config's "
                       "data.eval_min_size, else 640; 0: no resize)", flag_values=fv)
  flags.DEFINE_integer("max_size", None, "long-side cap of the test resize (default 2560)", flag_values=fv)
  flags.DEFINE_boolean("tta", False, "multi-scale (0.5..1.75) + flip test-time augmentation", flag_values=fv)
  flags.DEFINE_boolean("sliding_window", False, "sliding-window inference", flag_values=fv)
  flags.DEFINE_integer("window", 640, "sliding-window side", flag_values=fv)
  flags.DEFINE_integer("stride", 426, "sliding-window stride", flag_values=fv)
  flags.DEFINE_float("alpha", 0.5, "overlay opacity", flag_values=fv)


def _check_flags(f: flags.FlagValues) -> None:
  if f.random_init and f.config is None:
    raise app.UsageError("--random_init needs --config (the model geometry)")
  if f.step is not None and not f.workdir:
    raise app.UsageError("--step applies to --workdir")
  if not f.vocab.strip() and not f.vocab_file:
    raise app.UsageError("give the classes with --vocab and/or --vocab_file")


def build_vocabulary(vocab: str, vocab_file: Optional[str], aug_vocab: Optional[str]) -> Tuple[Tuple[str, ...], int]:
  """(full vocabulary, number of user classes): `vocab` (comma separated), then `vocab_file`'s names, then
  the names `aug_vocab` adds (see san_jax.data.vocabularies.augmented)."""
  from san_jax.data import vocabularies
  from san_jax.text import classifier
  names: List[str] = []
  if vocab.strip():
    names += classifier.parse_vocabulary(vocab)
  if vocab_file:
    names += classifier.read_vocabulary_file(vocab_file)
  user = classifier.validate_vocabulary(names)
  return vocabularies.augmented(user, aug_vocab), len(user)


def find_images(root: str, recursive: bool) -> Tuple[Path, List[Path]]:
  """(base folder, image files sorted by path); a file is returned as itself whatever its extension."""
  p = Path(root)
  if p.is_file():
    return p.parent, [p]
  if not p.is_dir():
    raise FileNotFoundError(f"--image {root}: no such file or folder")
  pattern = "**/*" if recursive else "*"
  files = [f for f in p.glob(pattern) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
  return p, sorted(files)


def output_stems(base: Path, files: Sequence[Path]) -> List[str]:
  """Relative output names without extension; files that would collide ("a.jpg", "a.png") keep theirs."""
  stems = [str(f.relative_to(base).with_suffix("")) for f in files]
  seen = {}
  for s in stems:
    seen[s] = seen.get(s, 0) + 1
  return [s if seen[s] == 1 else str(f.relative_to(base)).replace(".", "_") for s, f in zip(stems, files)]


def label_png(labels: np.ndarray, num_classes: int):
  from PIL import Image
  if num_classes <= 256:
    return Image.fromarray(labels.astype(np.uint8)), "uint8"
  return Image.fromarray(labels.astype(np.uint16)), "uint16"


def areas(labels: np.ndarray, names: Sequence[str], num_user: int) -> List[dict]:
  from san_jax import viz
  total = labels.size
  return [{"id": i, "name": names[i], "pixels": c, "fraction": c / total, "user_class": i < num_user}
          for i, c in viz.present_classes(labels, len(names))]


def build_model(f: flags.FlagValues, cfg):
  """The SAN of --checkpoint / --workdir / --model / --random_init, through san_jax.pretrained (a --config's
  model geometry, when given, must be the weights')."""
  from san_jax import pretrained
  if f.random_init:  # numpy-drawn weights: a smoke test needs no real initialisation (see quick_random_params)
    return pretrained.random(cfg.model, seed=f.seed)
  source, kind = ((f.checkpoint, "params") if f.checkpoint else (f.workdir, "workdir") if f.workdir
                  else (f.model, None))
  return pretrained.load(source, step=f.step, kind=kind, config=cfg.model if cfg is not None else None)


def _main(f: flags.FlagValues, args: List[str]) -> int:
  del args
  _check_flags(f)
  from PIL import Image
  from san_jax import viz
  from san_jax.data.image_io import ImageReadError, read_rgb
  from san_jax.evaluation import inference
  from san_jax.text.classifier import VocabularyError

  try:
    names, num_user = build_vocabulary(f.vocab, f.vocab_file, f.aug_vocab)
    base, files = find_images(f.image, f.recursive)
  except (VocabularyError, FileNotFoundError, OSError) as e:
    print(f"predict.py: {e}", file=sys.stderr)
    return 2
  if not files:
    print(f"predict.py: no images in {f.image}" + ("" if f.recursive else " (sub-folders: --recursive)"),
          file=sys.stderr)
    return 1
  cfg = f.config
  from san_jax import pretrained
  try:
    loaded = build_model(f, cfg)
  except pretrained.PretrainedError as e:
    print(f"predict.py: {e}", file=sys.stderr)
    return 2
  if cfg is None and loaded.run_config is not None:
    cfg = loaded.run_config  # a training run's test resize (a run, or its convert.export_params checkpoint)
  min_size = f.min_size if f.min_size is not None else int(cfg.data.get("eval_min_size", 640)) if cfg else 640
  max_size = f.max_size if f.max_size is not None else int(cfg.data.get("eval_max_size", 2560)) if cfg else 2560
  tta = inference.TTAConfig.from_scales(inference.SAN_TTA_SCALES, min_size or 640, max_size) if f.tta else None
  sliding = inference.SlidingWindow(f.window, f.stride) if f.sliding_window else None

  print(f"vocabulary: {len(names)} classes ({num_user} given" +
        (f", {len(names) - num_user} from {f.aug_vocab})" if f.aug_vocab else ")"), flush=True)
  print(f"model: {loaded.describe()}", flush=True)
  segmenter = loaded.segmenter()
  segmenter.class_embeddings(names)  # text features once, up front
  colors = viz.palette(len(names))
  out_root = Path(f.out)
  failures: List[Tuple[str, str]] = []
  done = 0
  start = time.perf_counter()
  for k, (path, stem) in enumerate(zip(files, output_stems(base, files)), 1):
    t0 = time.perf_counter()
    try:
      image = read_rgb(path)
    except ImageReadError as e:
      failures.append((str(path), str(e)))
      print(f"[{k}/{len(files)}] SKIPPED: {e}", flush=True)
      continue
    labels, _ = segmenter.predict(image, names, resize_to=(min_size, max_size) if min_size else None,
                                  tta=tta, sliding=sliding)
    target = out_root / stem
    target.parent.mkdir(parents=True, exist_ok=True)
    png, dtype = label_png(labels, len(names))
    png.save(f"{target}_label.png")
    viz.overlay_with_legend(image, labels, names, colors=colors, alpha=f.alpha).save(f"{target}_overlay.png")
    info = {"image": str(path), "height": int(labels.shape[0]), "width": int(labels.shape[1]),
            "label_png": f"{Path(stem).name}_label.png", "label_dtype": dtype, "vocabulary": list(names),
            "num_user_classes": num_user, "aug_vocab": f.aug_vocab, "classes": areas(labels, names, num_user)}
    Path(f"{target}.json").write_text(json.dumps(info, indent=1))
    done += 1
    top = ", ".join(f"{c['name']} {100 * c['fraction']:.0f}%" for c in info["classes"][:3])
    elapsed = time.perf_counter() - start
    eta = elapsed / k * (len(files) - k)
    print(f"[{k}/{len(files)}] {path}: {top}  ({time.perf_counter() - t0:.1f} s, ETA {eta:.0f} s)", flush=True)
  print(f"\n{done} of {len(files)} images segmented into {out_root}")
  if failures:
    print(f"{len(failures)} could not be read:")
    for _, err in failures:
      print(f"  {err}")
  return 0 if done else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="predict.py")


if __name__ == "__main__":
  main()

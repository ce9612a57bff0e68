"""Segment images with an open vocabulary.

  python predict.py --checkpoint /ckpt/san_vit_b16 --vocab "cat, dog, grass" --image photo.jpg --out out/
  python predict.py --checkpoint /ckpt/san_vit_b16 --vocab-file classes.txt --image photos/ --recursive --out out/
  python predict.py --model san_vit_b16 --vocab "cat, dog, grass" --image photo.jpg --out out/   # Hugging Face Hub
  python predict.py --workdir runs/demo/san --vocab "red circle, blue square" --image x.png --out out/  # a training run
  python predict.py --config configs/tiny.py --random-init --vocab "a, b" --image x.png --out /tmp/o   # smoke test

For every image, in OUT (mirroring the input folder's layout):
  NAME_label.png    class ids (uint8; uint16 when the vocabulary has more than 256 classes), the image's size
  NAME_overlay.png  the image tinted by class, with a legend of the classes present and their shares
  NAME.json         the vocabulary, and per class present its pixel count and fraction of the image

--aug-vocab coco_all | coco_stuff appends the COCO-Stuff-171 class names (all 171, or the 91 "stuff" ones),
minus those already in the user's vocabulary, as in SAN's demo: everything else in the scene then has a
class of its own rather than being forced into one of the user's. Those extra classes are predicted and
reported like the others (the outputs keep every name; the JSON marks which ones the user gave).

Images are resized like SAN's evaluation (short side --min-size, 640 by default; --min-size 0 keeps the
input size) and the prediction is returned at the original size. Text features are computed once per
vocabulary. Unreadable files are reported at the end and skipped; the exit status is non-zero only when no
image could be segmented.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="predict.py", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="a SAN parameters checkpoint directory or an official .pth")
  src.add_argument("--workdir", help="a training run directory (config.json + checkpoints/): its latest step, "
                   "or --step")
  src.add_argument("--model", help="any source san_jax.pretrained loads: san_vit_b16 | san_vit_l14 (official "
                   "weights from the Hugging Face Hub), a .pth, a params checkpoint, a run directory")
  src.add_argument("--random-init", action="store_true", help="random weights (needs --config): smoke tests")
  ap.add_argument("--config", help="a configs/*.py file (model geometry for --random-init; test resize)")
  ap.add_argument("--seed", type=int, default=0, help="seed of --random-init")
  ap.add_argument("--step", type=int, default=None, help="with --workdir: the saved step (default: the latest)")
  ap.add_argument("--vocab", default="", help='class names, comma separated: "cat, dog, grass"')
  ap.add_argument("--vocab-file", help="class names, one per line ('#' comments)")
  from san_jax.data.vocabularies import AUG_VOCABS
  ap.add_argument("--aug-vocab", choices=sorted(AUG_VOCABS), type=str.lower,
                  help="append COCO-Stuff class names (all 171, or the 91 stuff classes)")
  ap.add_argument("--image", required=True, help="an image file or a folder of images")
  ap.add_argument("--recursive", action="store_true", help="also look into sub-folders")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--min-size", type=int, default=None, help="short side of the test resize (default: the "
                  "config's data.eval_min_size, else 640; 0: no resize)")
  ap.add_argument("--max-size", type=int, default=None, help="long-side cap of the test resize (default 2560)")
  ap.add_argument("--tta", action="store_true", help="multi-scale (0.5..1.75) + flip test-time augmentation")
  ap.add_argument("--sliding-window", action="store_true", help="sliding-window inference")
  ap.add_argument("--window", type=int, default=640)
  ap.add_argument("--stride", type=int, default=426)
  ap.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
  args = ap.parse_args(list(argv))
  if args.random_init and not args.config:
    ap.error("--random-init needs --config (the model geometry)")
  if args.step is not None and not args.workdir:
    ap.error("--step applies to --workdir")
  if not args.vocab.strip() and not args.vocab_file:
    ap.error("give the classes with --vocab and/or --vocab-file")
  return args


def load_config(spec: str):
  """configs/x.py or configs/x.py:ARG -> get_config(ARG), as ml_collections' config_flags loads it."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  module_spec = importlib.util.spec_from_file_location(f"_predict_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def build_vocabulary(args) -> Tuple[Tuple[str, ...], int]:
  """(full vocabulary, number of user classes): --vocab, then --vocab-file, then --aug-vocab's names."""
  from san_jax.data import vocabularies
  from san_jax.text import classifier
  names: List[str] = []
  if args.vocab.strip():
    names += classifier.parse_vocabulary(args.vocab)
  if args.vocab_file:
    names += classifier.read_vocabulary_file(args.vocab_file)
  user = classifier.validate_vocabulary(names)
  return vocabularies.augmented(user, args.aug_vocab), len(user)


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


def build_model(args, cfg):
  """The SAN of --checkpoint / --workdir / --model / --random-init, through san_jax.pretrained (a --config's
  model geometry, when given, must be the weights')."""
  from san_jax import pretrained
  if args.random_init:  # numpy-drawn weights: a smoke test needs no real initialisation (see quick_random_params)
    return pretrained.random(cfg.model, seed=args.seed)
  source, kind = ((args.checkpoint, "params") if args.checkpoint else (args.workdir, "workdir") if args.workdir
                  else (args.model, None))
  return pretrained.load(source, step=args.step, kind=kind, config=cfg.model if cfg is not None else None)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from PIL import Image
  from san_jax import viz
  from san_jax.data.image_io import ImageReadError, read_rgb
  from san_jax.evaluation import inference
  from san_jax.text.classifier import VocabularyError

  try:
    names, num_user = build_vocabulary(args)
    base, files = find_images(args.image, args.recursive)
  except (VocabularyError, FileNotFoundError, OSError) as e:
    print(f"predict.py: {e}", file=sys.stderr)
    return 2
  if not files:
    print(f"predict.py: no images in {args.image}" + ("" if args.recursive else " (sub-folders: --recursive)"),
          file=sys.stderr)
    return 1
  cfg = load_config(args.config) if args.config else None
  from san_jax import pretrained
  try:
    loaded = build_model(args, cfg)
  except pretrained.PretrainedError as e:
    print(f"predict.py: {e}", file=sys.stderr)
    return 2
  if cfg is None and loaded.run_config is not None:
    cfg = loaded.run_config  # a training run's test resize (a run, or its convert.export_params checkpoint)
  min_size = args.min_size if args.min_size is not None else int(cfg.data.get("eval_min_size", 640)) if cfg else 640
  max_size = args.max_size if args.max_size is not None else int(cfg.data.get("eval_max_size", 2560)) if cfg else 2560
  tta = inference.TTAConfig.from_scales(inference.SAN_TTA_SCALES, min_size or 640, max_size) if args.tta else None
  sliding = inference.SlidingWindow(args.window, args.stride) if args.sliding_window else None

  print(f"vocabulary: {len(names)} classes ({num_user} given" +
        (f", {len(names) - num_user} from {args.aug_vocab})" if args.aug_vocab else ")"), flush=True)
  print(f"model: {loaded.describe()}", flush=True)
  segmenter = loaded.segmenter()
  segmenter.class_embeddings(names)  # text features once, up front
  colors = viz.palette(len(names))
  out_root = Path(args.out)
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
    viz.overlay_with_legend(image, labels, names, colors=colors, alpha=args.alpha).save(f"{target}_overlay.png")
    info = {"image": str(path), "height": int(labels.shape[0]), "width": int(labels.shape[1]),
            "label_png": f"{Path(stem).name}_label.png", "label_dtype": dtype, "vocabulary": list(names),
            "num_user_classes": num_user, "aug_vocab": args.aug_vocab, "classes": areas(labels, names, num_user)}
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


if __name__ == "__main__":
  sys.exit(main())

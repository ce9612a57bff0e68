"""Open-vocabulary segmentation from scratch on a CPU: the san-jax first-hour demo.

  python demo.py                                  # configs/demo_shapes.py, writes runs/demo
  python demo.py --workdir /tmp/d --config.clip_pretrain.steps=3 --config.train.steps=3   # a smoke run

Three stages on the synthetic shapes set (classes are colour-shape combinations such as "red triangle"):
  1. a tiny CLIP learns image-text alignment contrastively from captions of all 48 classes (the web-scale
     pretraining SAN assumes; san_jax.demo.clip_pretrain);
  2. SAN trains its side network, with that CLIP frozen, on scenes of the 36 *seen* classes only
     (the ordinary training loop, `train.init_from` = the CLIP of stage 1);
  3. SAN is evaluated on the validation scenes prompted with all 48 class names, and the mIoU of the seen
     and of the 12 unseen classes (held-out combinations of known words) is printed beside the chance level.

Writes into WORKDIR: clip/ (the CLIP checkpoint), san/ (the SAN run: checkpoints, metrics.jsonl, config),
eval_shapes.json, segmentations.png (image | ground truth | prediction with a legend), curves.png and
summary.json. A finished stage is not run again: rerunning resumes where a stopped run left off (a killed
SAN run resumes from its last checkpoint); --fresh starts over.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo_shapes.py", "the demo config", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "output directory")
_FRESH = flags.DEFINE_boolean("fresh", False, "delete WORKDIR first and run every stage again")

CLIP_DONE = "clip_summary.json"  # written after the CLIP checkpoint: its presence means stage 1 is complete


def say(msg: str) -> None:
  print(msg, flush=True)


def read_jsonl(path: Path) -> List[Dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- stages ----------------------------------------------------------------------------------------------
def pretrain_clip(cfg, workdir: Path) -> Dict:
  from san_jax.demo import clip_pretrain
  done = workdir / CLIP_DONE
  # What the CLIP stage depends on: reused only when none of it changed.
  recipe = {"clip_pretrain": cfg.clip_pretrain.to_dict(), "clip": cfg.model.clip.to_dict(),
            "feature_last_layer_idx": cfg.model.feature_last_layer_idx,
            "clip_resolution": cfg.model.clip_resolution}
  recipe = json.loads(json.dumps(recipe))  # tuples -> lists, as read back from the file
  if done.exists() and (workdir / "clip").exists():
    summary = json.loads(done.read_text())
    if summary.get("recipe") == recipe:
      say(f"[1/3] CLIP: reusing {workdir / 'clip'} (zero-shot accuracy on held-out renders "
          f"{clip_pretrain.format_report(summary)}); --fresh to retrain")
      return summary
    say(f"[1/3] CLIP: {workdir / 'clip'} was trained with other settings: training it again")
  if (workdir / "san").exists():  # a SAN trained on another CLIP: stage 2 starts over
    shutil.rmtree(workdir / "san")
  say("[1/3] contrastive pretraining of a tiny CLIP on captioned shapes (all 48 classes)")
  metrics = workdir / "clip_metrics.jsonl"
  metrics.unlink(missing_ok=True)
  summary = clip_pretrain.pretrain(cfg, str(workdir / "clip"), log=say, metrics_path=str(metrics))
  summary["recipe"] = recipe
  done.write_text(json.dumps(summary, indent=1))
  return summary


def train_san(cfg, workdir: Path) -> None:
  from san_jax.train import loop
  say(f"[2/3] SAN: training the side network on the {len(cfg.data.shapes_classes)} seen classes "
      f"({cfg.train.steps} steps of {cfg.train.batch_size} images), CLIP frozen")
  cfg.train.init_from = str(workdir / "clip")
  loop.train(cfg, str(workdir / "san"))


def chance_level(source, num_classes: int, subsets: Dict[str, Sequence[int]], draws: int, seed: int = 0) -> Dict:
  """The mIoU of a guesser that knows every object's exact mask and names each object with a class drawn
  uniformly from the whole vocabulary: what a model that cannot recognise anything scores here (mean of
  `draws` guesses, and their maximum)."""
  from san_jax.data import shapes
  from san_jax.evaluation import sem_seg
  rng = np.random.default_rng(seed)
  labels = [np.asarray(source[i]["label"]) for i in range(len(source))]
  names = [str(i) for i in range(num_classes)]
  runs = []
  for _ in range(draws):
    ev = sem_seg.SemSegEvaluator(names, shapes.IGNORE_LABEL, subsets=subsets)
    for gt in labels:
      guess = rng.integers(num_classes, size=256)
      pred = np.where(gt == shapes.IGNORE_LABEL, 0, guess[np.minimum(gt, 255)])
      ev.process(pred, gt)
    runs.append(ev.evaluate())
  out = {}
  for key in ["mIoU"] + [f"mIoU-{name}" for name in subsets]:
    vals = [r[key] for r in runs]
    out[key], out[key + "_max"] = float(np.mean(vals)), float(np.max(vals))
  return out


def evaluate(cfg, workdir: Path):
  """(results, chance, segmenter, val source) on the validation scenes of all 48 classes; mIoU in percent,
  as detectron2 reports it."""
  from san_jax import pretrained  # the same restore as `python eval.py --workdir`
  from san_jax.data import shapes
  from san_jax.evaluation import runner
  say(f"[3/3] evaluating on {cfg.data.shapes_num_val} validation scenes, prompted with all "
      f"{len(shapes.class_names())} class names")
  loaded = pretrained.load(str(workdir / "san"), kind="workdir", config=cfg.model)
  seg, step = loaded.segmenter(), loaded.step
  options = runner.EvalOptions.from_config(cfg)
  source = runner.make_source("shapes", options)  # the demo's scenes (its shapes_* keys), all 48 classes
  res = runner.evaluate(seg, "shapes", options=options, source=source, out_dir=str(workdir),
                        extra={"step": step, "workdir": str(workdir / "san")}, log=say)
  subsets = runner.class_subsets(source, "shapes", shapes.class_names())
  chance = chance_level(source, len(shapes.class_names()), subsets, int(cfg.demo.chance_draws))
  return res, chance, seg, source


# ---- pictures --------------------------------------------------------------------------------------------
def segmentation_grid(seg, source, n: int, path: Path, upscale: int) -> None:
  """Image | ground truth | prediction (all 48 names in the vocabulary) for the first n validation scenes;
  unseen class names are marked with '*' in the legends. Background pixels are left untinted in the truth,
  and in the prediction where SAN assigns no class (total class score < 0.5)."""
  from san_jax import viz
  from san_jax.data import shapes
  names = shapes.class_names()
  unseen = set(shapes.unseen_classes())
  shown = [f"{n_}*" if n_ in unseen else n_ for n_ in names]
  rows = []
  for i in range(min(n, len(source))):
    ex = source[i]
    probs, labels = seg.segment(ex["image"], names)
    # Background is no class of the vocabulary (and is ignored by the metric); show it where SAN's class
    # scores (sum over masks of class probability x mask probability) add up to less than one half.
    labels = np.where(probs.sum(0) < 0.5, shapes.IGNORE_LABEL, labels)
    big = lambda a: np.repeat(np.repeat(a, upscale, 0), upscale, 1)
    rows.append((big(ex["image"]), big(ex["label"]), big(labels.astype(np.uint8))))
  grid = viz.comparison_grid(rows, shown, ignore=shapes.IGNORE_LABEL, alpha=0.7,
                             titles=("image", "ground truth", "prediction (48 names)"))
  grid.save(path)


def curves(workdir: Path, res: Dict, chance: Dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  clip_rows = read_jsonl(workdir / "clip_metrics.jsonl")
  san_rows = [r for r in read_jsonl(workdir / "san" / "metrics.jsonl") if "loss" in r]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  ax = axes[0]
  if clip_rows:
    ax.plot([r["step"] for r in clip_rows], [r["loss"] for r in clip_rows], label="loss (region + patch captions)")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in clip_rows], [r["batch_acc"] for r in clip_rows], color="tab:orange",
             label="batch caption accuracy")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("accuracy")
    ax2.legend(loc="center right")
  ax.set(title="1. CLIP pretraining", xlabel="step", ylabel="loss")
  ax.legend(loc="upper right")
  ax = axes[1]
  if san_rows:
    steps = [r["step"] for r in san_rows]
    ax.plot(steps, [r["loss"] for r in san_rows], label="total")
    for key, label in (("loss_ce", "class (CE)"), ("loss_mask", "mask (BCE)"), ("loss_dice", "mask (dice)")):
      if key in san_rows[0]:
        ax.plot(steps, [r[key] for r in san_rows], label=label, lw=1)
    ax.set_yscale("log")
  ax.set(title="2. SAN training (seen classes)", xlabel="step", ylabel="loss")
  ax.legend()
  ax = axes[2]
  keys = [("mIoU-seen", "seen classes"), ("mIoU-unseen", "unseen classes"), ("mIoU", "all")]
  vals = [res.get(k) or 0.0 for k, _ in keys]
  bars = ax.bar([lbl for _, lbl in keys], vals, color=["tab:blue", "tab:green", "tab:gray"])
  for b, v in zip(bars, vals):
    ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.1f}", ha="center")
  ax.axhline(chance["mIoU-unseen"], color="red", ls="--", label="chance (unseen)")
  ax.set(title="3. validation mIoU (48-name vocabulary)", ylabel="mIoU (%)", ylim=(0, 100))
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  cfg = _CONFIG.value
  workdir = Path(_WORKDIR.value)
  if _FRESH.value and workdir.exists():
    shutil.rmtree(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  clip_summary = pretrain_clip(cfg, workdir)
  t1 = time.perf_counter()
  train_san(cfg, workdir)
  t2 = time.perf_counter()
  res, chance, seg, source = evaluate(cfg, workdir)
  segmentation_grid(seg, source, int(cfg.demo.grid_examples), workdir / "segmentations.png",
                    int(cfg.demo.grid_upscale))
  curves(workdir, res, chance, workdir / "curves.png")
  t3 = time.perf_counter()
  summary = {"mIoU_seen": res.get("mIoU-seen"), "mIoU_unseen": res.get("mIoU-unseen"), "mIoU": res.get("mIoU"),
             "hIoU": res.get("hIoU"), "chance_mIoU_unseen": chance["mIoU-unseen"], "chance": chance,
             "clip_zero_shot": clip_summary,
             "time_s": {"clip": t1 - t0, "san": t2 - t1, "eval_and_pictures": t3 - t2, "total": t3 - t0}}
  # Strict JSON: NaN (no ground-truth pixel of a subset, in a short run) becomes null.
  summary = json.loads(json.dumps(summary), parse_constant=lambda c: None)
  (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
  from san_jax.data import shapes
  n_seen, n_unseen, n_all = len(shapes.seen_classes()), len(shapes.unseen_classes()), len(shapes.class_names())
  fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"
  say("")
  say(f"mIoU, seen classes ({n_seen}, trained on):        {fmt(res.get('mIoU-seen'))}")
  say(f"mIoU, unseen classes ({n_unseen}, never a target):  {fmt(res.get('mIoU-unseen'))}   "
      f"(chance: {fmt(summary['chance_mIoU_unseen'])}, a guesser with perfect masks and a random name of {n_all})")
  say(f"pictures: {workdir / 'segmentations.png'}, {workdir / 'curves.png'}; numbers: {workdir / 'summary.json'}")
  say(f"time: CLIP {t1 - t0:.0f}s, SAN {t2 - t1:.0f}s, evaluation and pictures {t3 - t2:.0f}s")


if __name__ == "__main__":
  from san_jax import cli  # pylint: disable=g-import-not-at-top
  cli.app_run(main, prog="demo.py", log_info=True)

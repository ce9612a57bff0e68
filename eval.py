"""Evaluate SAN on semantic segmentation data sets (mIoU, fwIoU, mACC, pACC as detectron2 reports them).

  python eval.py --checkpoint /ckpt/san_vit_b16 --data_dir ~/tfds \
      --datasets coco_stuff_171,ade20k_150,ade20k_847,pcontext_59,pcontext_459,voc_20 --out results/
  python eval.py --workdir runs/tiny                       # a training run: its config and latest checkpoint
  python eval.py --model san_vit_b16 --data_dir ~/tfds --datasets ade20k_150   # official weights by name
  python eval.py --config configs/tiny.py --checkpoint /tmp/p --datasets shapes --config.eval.tta=True

Each data set is prompted with its own vocabulary. Evaluation options (batch size, test resize, TTA,
sliding windows) come from the config's `eval`/`data` sections (--config, or the run's config.json with
--workdir; defaults: SAN's test settings) and the flags below. Prints progress with an ETA, a table of
the results, and writes OUT/eval_<dataset>.json with the per-class IoU and accuracy. On several hosts run
the same command on each (with --coordinator_address/--num_processes/--process_id where JAX does not
detect the cluster; `python -m san_jax.launch --processes N -- eval.py ...` on one machine): every host
evaluates its slice of the split, the confusion matrices are summed over hosts, and process 0 alone
writes the results, which are those of one process.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

from san_jax import cli


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  config_flags.DEFINE_config_file("config", None, "a configs/*.py file (evaluation options)", flag_values=fv,
                                  lock_config=False, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "a training run directory (config.json + checkpoints)", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "a SAN parameters checkpoint directory or an official .pth",
                      flag_values=fv)
  flags.DEFINE_string("model", None, "any model source san_jax.pretrained loads: san_vit_b16 | san_vit_l14 "
                      "(Hugging Face Hub), a .pth, a params checkpoint, a run directory", flag_values=fv)
  flags.DEFINE_integer("step", None, "with --workdir: evaluate this saved step (default: the latest)",
                       flag_values=fv)
  flags.DEFINE_list("datasets", None, "comma-separated data set names (default: the config's "
                    "data.eval_datasets, else coco_stuff_171)", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "where the built data sets are (default: config data.data_dir)",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "output directory for eval_<dataset>.json (default: WORKDIR/eval or "
                      "./eval_results)", flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "images per batch and host (default: config eval.batch_size)",
                       flag_values=fv)
  flags.DEFINE_integer("max_examples", None, "evaluate only the first N images", flag_values=fv)
  flags.DEFINE_boolean("tta", None, "multi-scale + flip test-time augmentation", flag_values=fv)
  flags.DEFINE_boolean("sliding_window", None, "sliding-window inference", flag_values=fv)
  from san_jax import launch  # pylint: disable=g-import-not-at-top
  launch.add_distributed_flags(fv)


def _run_config(f: flags.FlagValues) -> Optional[ConfigDict]:
  cfg = f.config
  if cfg is None and f.workdir:
    path = Path(f.workdir) / "config.json"
    if not path.exists():
      raise FileNotFoundError(f"{path} not found: is {f.workdir} a training run directory?")
    cfg = ConfigDict(json.loads(path.read_text()))
  return cfg


def _main(f: flags.FlagValues, args: List[str]) -> int:
  del args
  sources = [k for k in ("workdir", "checkpoint", "model") if f[k].value]
  if len(sources) != 1:
    print("eval.py: give exactly one of --workdir, --checkpoint and --model", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING)

  from san_jax import launch, pretrained
  from san_jax.evaluation import runner
  from san_jax.train import sharding
  cfg = _run_config(f)
  try:  # before anything touches the devices
    launch.initialize_from_flags(f, cfg)
    sharding.check_processes_agree(cfg.to_dict() if cfg is not None else {}, "evaluation config")
  except sharding.TopologyError as err:
    print(f"eval.py: {err}", file=sys.stderr)
    return 2
  overrides = dict(batch_size=f.batch_size, max_examples=f.max_examples, tta=f.tta, sliding_window=f.sliding_window)
  options = (runner.EvalOptions.from_config(cfg, **overrides) if cfg is not None
             else runner.EvalOptions(**{k: v for k, v in overrides.items() if v is not None}))
  datasets = f.datasets or (list(cfg.data.get("eval_datasets", [])) if cfg is not None else []) \
      or ["coco_stuff_171"]
  unknown = [d for d in datasets if d not in runner.DATASETS]
  if unknown:
    print(f"eval.py: unknown data sets {unknown}; known: {', '.join(runner.DATASETS)}", file=sys.stderr)
    return 2
  data_dir = f.data_dir or (cfg.data.get("data_dir", "") if cfg is not None else "") or None
  out = f.out or (os.path.join(f.workdir, "eval") if f.workdir else "eval_results")

  kind = {"workdir": "workdir", "checkpoint": "params", "model": None}[sources[0]]
  try:  # --config's model geometry (when given) must be the weights'
    loaded = pretrained.load(f[sources[0]].value, step=f.step, kind=kind,
                             config=f.config.get("model") if f.config is not None else None)
  except pretrained.PretrainedError as e:
    print(f"eval.py: {e}", file=sys.stderr)
    return 2
  extra = {sources[0]: loaded.origin, **({"step": loaded.step} if loaded.step is not None else {})}
  import jax
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)  # one report for the whole run
  seg = loaded.segmenter(canvas_multiple=options.canvas_multiple or None, output_multiple=options.output_multiple)
  rows = []
  for name in datasets:
    res = runner.evaluate(seg, name, options=options, data_dir=data_dir, out_dir=out, extra=extra,
                          log=lambda s: say(s, flush=True))
    rows.append(res)
    say(f"{name}: mIoU {res['mIoU']:.2f}  ({res['num_images']} images, {res['time_s']:.1f} s)", flush=True)
  say()
  say(runner.format_table(rows))
  say(f"\nresults in {os.path.abspath(out)}/eval_<dataset>.json")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="eval.py")


if __name__ == "__main__":
  main()

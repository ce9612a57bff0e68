"""A training run's model as a parameters checkpoint: what predict.py --checkpoint, eval.py and a later
train.init_from read, without the optimizer state or the run directory.

    python -m convert.export_params runs/demo/san /tmp/demo_san            # the latest step
    python -m convert.export_params runs/tiny /tmp/tiny_200 --step 200

The run's trainable parameters of that step and its frozen ones (rebuilt from `train.init_from` or the
seed, as training built them; see san_jax.pretrained) are written together with their config:
{"san_config": ..., "source": {"workdir", "step"}, "run_config": the run's config}. OUT must not exist.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional, Sequence

from absl import flags

from san_jax import cli


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_integer("step", None, "the saved step (default: the latest readable one)", flag_values=fv)


def _main(f: flags.FlagValues, args: List[str]) -> int:
  workdir, out = args  # a training run directory (config.json + checkpoints/); the checkpoint to write
  if os.path.exists(out):
    print(f"export_params: {out} exists; choose a new directory (nothing was written)", file=sys.stderr)
    return 2
  from san_jax import checkpoint, pretrained
  from san_jax.models import params as params_lib
  from san_jax.models import san as san_lib
  try:
    p = pretrained.load(workdir, step=f.step, kind="workdir")
  except pretrained.PretrainedError as e:
    print(f"export_params: {e}", file=sys.stderr)
    return 2
  flat = params_lib.flat_params(p.model)
  meta = {"san_config": san_lib.config_to_dict(p.config), "source": {"workdir": p.origin, "step": p.step},
          "run_config": json.loads(p.run_config.to_json_best_effort())}
  path = checkpoint.save_params(out, flat, meta)
  print(f"wrote {path}: {len(flat)} arrays ({params_lib.count(flat):,} values) of {p.describe()}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m convert.export_params WORKDIR OUT [--step N]`; in-process: main([WORKDIR, OUT])."""
  return cli.run(_define_flags, _main, argv, prog="export_params", positional=["WORKDIR", "OUT"])


if __name__ == "__main__":
  main()

"""A training run's model as a parameters checkpoint: what predict.py --checkpoint, eval.py and a later
train.init_from read, without the optimizer state or the run directory.

    python -m convert.export_params runs/demo/san /tmp/demo_san            # the latest step
    python -m convert.export_params runs/tiny /tmp/tiny_200 --step 200

The run's trainable parameters of that step and its frozen ones (rebuilt from `train.init_from` or the
seed, as training built them; see san_jax.pretrained) are written together with their config:
{"san_config": ..., "source": {"workdir", "step"}, "run_config": the run's config}. OUT must not exist.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m convert.export_params", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdir", help="a training run directory (config.json + checkpoints/)")
  ap.add_argument("out", help="the parameters checkpoint directory to write (must not exist)")
  ap.add_argument("--step", type=int, default=None, help="the saved step (default: the latest readable one)")
  args = ap.parse_args(argv)
  if os.path.exists(args.out):
    print(f"export_params: {args.out} exists; choose a new directory (nothing was written)", file=sys.stderr)
    return 2
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore step at INFO
  from san_jax import checkpoint, pretrained
  from san_jax.models import params as params_lib
  from san_jax.models import san as san_lib
  try:
    p = pretrained.load(args.workdir, step=args.step, kind="workdir")
  except pretrained.PretrainedError as e:
    print(f"export_params: {e}", file=sys.stderr)
    return 2
  flat = params_lib.flat_params(p.model)
  meta = {"san_config": san_lib.config_to_dict(p.config), "source": {"workdir": p.origin, "step": p.step},
          "run_config": json.loads(p.run_config.to_json_best_effort())}
  path = checkpoint.save_params(args.out, flat, meta)
  print(f"wrote {path}: {len(flat)} arrays ({params_lib.count(flat):,} values) of {p.describe()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

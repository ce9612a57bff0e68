"""Train SAN.

  python train.py --config configs/tiny.py --workdir runs/tiny
  python train.py --config configs/san_vit_b16_coco.py --workdir gs://bucket/san_b16 \
      --config.data.data_dir=gs://bucket/tfds --config.train.init_from=/path/to/converted_clip

Resumes automatically from WORKDIR. Writes WORKDIR/metrics.jsonl, TensorBoard events under
WORKDIR/tensorboard and checkpoints under WORKDIR/checkpoints. On a TPU pod run the same command on every
host (`gcloud compute tpus tpu-vm ssh NAME --worker=all --command "..."`).

Exit status: 0 when train.steps are done; 143 (loop.PREEMPTED_EXIT_STATUS) after a SIGTERM, once the
step it stopped at is saved (run the same command to resume); 1 with one error message for a config that
cannot run, a workdir that is locked or holds another run or only unreadable checkpoints, or a failed save.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  from san_jax import checkpoint
  from san_jax.train import loop, validate
  from san_jax.train import workdir as workdir_lib
  try:
    loop.train(_CONFIG.value, _WORKDIR.value)
  except loop.Preempted as err:
    print(f"train.py: {err}", file=sys.stderr, flush=True)
    sys.exit(loop.PREEMPTED_EXIT_STATUS)
  except (validate.ConfigError, workdir_lib.WorkdirError, checkpoint.CheckpointSaveError) as err:
    sys.exit(f"train.py: {err}")  # one message, exit status 1: what is wrong is named, no traceback


if __name__ == "__main__":
  app.run(main)

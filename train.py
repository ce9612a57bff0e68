"""Train SAN.

  python train.py --config configs/tiny.py --workdir runs/tiny
  python train.py --config configs/san_vit_b16_coco.py --workdir /mnt/bucket/san_b16 \
      --config.data.data_dir=gs://bucket/tfds --config.train.init_from=/path/to/converted_clip

Resumes automatically from WORKDIR. Writes WORKDIR/metrics.jsonl, TensorBoard events under
WORKDIR/tensorboard and checkpoints under WORKDIR/checkpoints. Several processes: the same command on
every host, with --coordinator_address/--num_processes/--process_id, or none of them where JAX detects
the cluster (TPU pod: `gcloud compute tpus tpu-vm ssh NAME --worker=all --command "..."`; SLURM: `srun`);
on one machine `python -m san_jax.launch --processes N -- train.py ...` rehearses it.

Exit status: 0 when train.steps are done; 143 (loop.PREEMPTED_EXIT_STATUS) after a SIGTERM, once the
step it stopped at is saved (run the same command to resume); 1 with one error message for a config that
cannot run, processes that cannot work together, a workdir that is locked or holds another run or only
unreadable checkpoints, or a failed save.
"""

import logging
import os
import sys
from typing import List, Optional, Sequence

from absl import flags
from ml_collections import config_flags

from san_jax import cli, launch


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True, flag_values=fv,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)", flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
  launch.add_distributed_flags(fv)


def _main(f: flags.FlagValues, args: List[str]) -> int:
  del args
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  from san_jax import checkpoint
  from san_jax.train import loop, sharding, validate
  from san_jax.train import workdir as workdir_lib
  if "://" in f.workdir:  # Path("gs://b/x") would quietly make a local directory "gs:/b/x"
    sys.exit(f"train.py: --workdir={f.workdir} is a URL; the workdir must be a file system path that every "
             "host sees (NFS, or the bucket mounted, e.g. with gcsfuse)")
  try:
    launch.initialize_from_flags(f, f.config)
    loop.train(f.config, f.workdir)
  except loop.Preempted as err:
    print(f"train.py: {err}", file=sys.stderr, flush=True)
    sys.exit(loop.PREEMPTED_EXIT_STATUS)
  except (sharding.TopologyError, validate.ConfigError, workdir_lib.WorkdirError,
          checkpoint.CheckpointSaveError) as err:
    # One message, exit status 1: what is wrong is named, no traceback. The message stays the last line:
    # orbax's and tensorstore's background threads can print teardown errors at any moment after a failed
    # restore, so stdout and stderr point at /dev/null *before* the message goes to a copy of the real
    # stderr (a CI run caught an asyncio traceback after it when the redirect came right after the print);
    # then os._exit, with nothing left to flush: the loop has closed its files and released the workdir lock.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    real_stderr = os.dup(2)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    message = memoryview(f"train.py: {err}\n".encode())
    while message:
      message = message[os.write(real_stderr, message):]
    os._exit(1)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="train.py", log_info=True)


if __name__ == "__main__":
  main()

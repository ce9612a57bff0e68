"""Shared test fixtures: where the golden cases live, and JAX set-up."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAN_JAX_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"


def _share_compilations() -> None:
  """One persistent XLA compilation cache for the whole session, this process and every train.py, eval.py,
  predict.py it starts (they inherit the environment): most tests start processes that compile the same
  tiny-config programs, and compiling, not running, is most of their time (a 4-step tiny train.py: 50 s ->
  28 s here with the cache warm). JAX keys an entry by the program, the devices and the flags, so a hit is
  the very executable a fresh compile would give; steps with host callbacks (scipy's matching, where the
  native assignment is not built) are never cached by JAX and still compile each time. Set before anything imports jax (it reads these at import); a cache
  the caller set up (JAX_COMPILATION_CACHE_DIR) is used as it is and kept."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  path = tempfile.mkdtemp(prefix="san-jax-tests-xla-cache-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


_share_compilations()


# The files that take minutes, longest first (CI of ee46bb6 on the 2-core Zen 3, from its slowest-tests list:
# test_multiprocess at least 18 min of worker time, test_train at least 11, the next few 2-5 each). xdist gives
# each of the two workers whole files in the collection order (pytest.ini), so these start first and the many
# short files fill in at the end. xdist's own order, by number of tests, had started them last: the run ended
# with one worker alone on test_train.py.
LONGEST_FILES = ("test_multiprocess.py", "test_train.py", "test_run_safety.py", "test_demo.py", "test_train_loop.py",
                 "test_f32_attention.py", "test_san_model.py", "test_benchmarks.py", "test_pretrained.py",
                 "test_clip_pretrain.py")


def pytest_collection_modifyitems(config, items):
  """LONGEST_FILES first, in that order; every other file after them in pytest's order (a stable sort keeps
  each file's tests in their own order)."""
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def case_dir(name: str) -> Path:
  path = REFERENCE / name
  if not (path / "case.json").exists():
    pytest.skip(f"golden case {path} not found (shared/ must sit beside the repository)")
  return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A 2-step training run of configs/tiny.py (checkpoints at steps 1 and 2), made in process once per test
  session for the tests that load, predict from or export a training run."""
  from configs import tiny
  from san_jax.train import loop
  cfg = tiny.get_config()
  cfg.train.steps, cfg.train.checkpoint_every, cfg.train.log_every = 2, 1, 1
  cfg.train.eval_every, cfg.train.keep_checkpoints = 0, 5
  cfg.data.num_examples = 8
  workdir = tmp_path_factory.mktemp("tiny_run")
  loop.train(cfg, str(workdir))
  return workdir

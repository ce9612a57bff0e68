"""Shared test fixtures: where the golden cases live, and JAX set-up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAN_JAX_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"


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

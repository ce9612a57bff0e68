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

"""The matcher's native assignment (csrc/hungarian.cc through `gemm.linear_sum_assignment`) against scipy's
`linear_sum_assignment`, the independent reference: the same pairs, ties included; the matcher's program
holds no host callback where it applies (so JAX's persistent cache keeps the train step), and without the
library the scipy callback still gives the same pairs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from san_jax.losses import matcher
from san_jax.ops import gemm

REPO = Path(__file__).resolve().parents[1]
ON, WHY = gemm.assignment_availability()
needs_native = pytest.mark.skipif(not ON, reason=f"native assignment unavailable: {WHY}")
CALLBACK_TARGET = "python_cpu_callback"  # jax's host-callback custom calls: xla[_ffi]_python_cpu_callback


def scipy_pairs(cost: np.ndarray, counts: np.ndarray):
  """What the matcher promises, computed with scipy: per matrix, scipy's pairs on the first counts[i]
  columns (non-finite costs replaced in float32 as np.nan_to_num does), zero padded to min(Q, T)."""
  q, t = cost.shape[-2:]
  k = min(q, t)
  flat, n = cost.reshape(-1, q, t), counts.reshape(-1)
  rows, cols = np.zeros((len(flat), k), np.int32), np.zeros((len(flat), k), np.int32)
  for i in range(len(flat)):
    block = np.nan_to_num(flat[i, :, :min(int(n[i]), t)], nan=0.0, posinf=1e30, neginf=-1e30)
    r, c = linear_sum_assignment(block)
    rows[i, :len(r)], cols[i, :len(c)] = r, c
  return rows.reshape(cost.shape[:-2] + (k,)), cols.reshape(cost.shape[:-2] + (k,))


def costs(kind: str, shape, rng) -> np.ndarray:
  if kind == "normal":
    return rng.normal(size=shape).astype(np.float32)
  if kind == "matcher":  # the matcher's scale: class probabilities x 2, BCE and dice x 5, summed
    return (-2 * rng.random(shape) + 5 * rng.exponential(0.7, shape) + 5 * rng.random(shape)).astype(np.float32)
  if kind == "ties":  # small integers: most choices are ties, where the algorithms' rules decide
    return rng.integers(0, 3, shape).astype(np.float32)
  if kind == "constant":
    return np.full(shape, 0.25, np.float32)
  if kind == "nonfinite":
    c = rng.normal(size=shape).astype(np.float32)
    for value, share in ((np.nan, 0.1), (np.inf, 0.05), (-np.inf, 0.05)):
      c[rng.random(shape) < share] = value
    return c
  raise ValueError(kind)


KINDS = ("normal", "matcher", "ties", "constant", "nonfinite")
SHAPES = ((100, 20), (100, 100), (100, 130), (1, 1), (1, 7), (7, 1), (37, 64))


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_native_pairs_are_scipys(kind):
  rng = np.random.default_rng(KINDS.index(kind))
  for q, t in SHAPES:
    cost = costs(kind, (2, 3, q, t), rng)
    counts = np.array([[0, 1, t // 2], [t, t + 5, max(t - 1, 0)]], np.int32)  # t + 5: clamped to t
    rows, cols = jax.jit(gemm.linear_sum_assignment)(jnp.asarray(cost), jnp.asarray(counts))
    want_rows, want_cols = scipy_pairs(cost, counts)
    np.testing.assert_array_equal(np.asarray(rows), want_rows, err_msg=f"{kind} {q}x{t}")
    np.testing.assert_array_equal(np.asarray(cols), want_cols, err_msg=f"{kind} {q}x{t}")


@needs_native
def test_native_pairs_are_scipys_on_many_random_ties():
  """Ties are where two correct solvers part ways: 400 small integer matrices of random shapes."""
  rng = np.random.default_rng(7)
  for _ in range(400):
    q, t = (int(x) for x in rng.integers(1, 40, 2))
    cost = rng.integers(0, int(rng.integers(1, 4)), (q, t)).astype(np.float32)
    n = np.array(int(rng.integers(0, t + 1)), np.int32)
    rows, cols = gemm.linear_sum_assignment(jnp.asarray(cost), jnp.asarray(n))
    want_rows, want_cols = scipy_pairs(cost, n)
    np.testing.assert_array_equal(np.asarray(rows), want_rows)
    np.testing.assert_array_equal(np.asarray(cols), want_cols)


def _lowered_targets(monkeypatch, native: str) -> str:
  monkeypatch.setenv(gemm.ENV_VAR, native)
  jax.clear_caches()  # the path is chosen while tracing: no trace of the other setting may be reused
  cost = jnp.zeros((2, 10, 4), jnp.float32)
  return jax.jit(matcher.assign).lower(cost, jnp.array([4, 2], jnp.int32)).as_text()


@needs_native
def test_the_matcher_runs_the_native_call_without_a_host_callback(monkeypatch):
  text = _lowered_targets(monkeypatch, "1")
  assert "san_linear_sum_assignment" in text and CALLBACK_TARGET not in text


def test_without_the_library_the_matcher_falls_back_to_scipys_callback_with_the_same_pairs(monkeypatch):
  text = _lowered_targets(monkeypatch, "0")
  assert CALLBACK_TARGET in text and "san_linear_sum_assignment" not in text
  rng = np.random.default_rng(3)
  cost = costs("ties", (4, 30, 12), rng)
  counts = np.array([0, 5, 12, 11], np.int32)
  out = jax.jit(matcher.assign)(jnp.asarray(cost), jnp.asarray(counts))  # SAN_JAX_NATIVE=0: the callback
  jax.clear_caches()
  want_rows, want_cols = scipy_pairs(cost, counts)
  valid = np.asarray(out["valid"])
  np.testing.assert_array_equal(np.asarray(out["pred_idx"]) * valid, want_rows)
  np.testing.assert_array_equal(np.asarray(out["tgt_idx"]) * valid, want_cols)


_CACHED_MATCHING = textwrap.dedent("""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from san_jax.losses import matcher
  hits = []
  jax.monitoring.register_event_listener(
      lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
  rng = np.random.default_rng(0)
  step = jax.jit(lambda *a: matcher.hungarian_match(*a)["tgt_idx"])
  out = step(jnp.asarray(rng.normal(size=(2, 10, 4)), jnp.float32), jnp.asarray(rng.normal(size=(2, 10, 8, 8)), jnp.float32),
             jnp.array([[0, 1, 2], [3, 1, 0]]), jnp.asarray(rng.random((2, 3, 16, 16)) > 0.5, jnp.float32),
             jnp.array([[True, True, False], [True, True, True]]), jnp.asarray(rng.random((2, 12, 2)), jnp.float32))
  print(json.dumps({"hits": len(hits), "out": np.asarray(out).tolist()}))
""")


@needs_native
def test_a_program_with_the_matching_is_kept_by_the_persistent_compilation_cache(tmp_path):
  """The reason for the native call: a second process finds the first one's executable (JAX skips writing
  any program with a host callback, so before, every train.py compiled its train step afresh)."""
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
         gemm.ENV_VAR: "1"}
  runs = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, "-c", _CACHED_MATCHING], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert runs[0]["hits"] == 0 and runs[1]["hits"] >= 1, runs
  assert runs[0]["out"] == runs[1]["out"]


@needs_native
def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match=r"cost \(2, 5, 3\) and counts \(3,\)"):
    gemm.linear_sum_assignment(jnp.zeros((2, 5, 3)), jnp.zeros((3,), jnp.int32))
  out = jax.ShapeDtypeStruct((2, 4), jnp.int32)
  with pytest.raises(Exception, match=r"san_linear_sum_assignment: rows and cols must end in min\(Q, T\): "
                                      r"cost \[2, 5, 3\], counts \[2\], rows \[2, 4\], cols \[2, 4\]"):
    jax.block_until_ready(jax.ffi.ffi_call("san_linear_sum_assignment", (out, out))(
        jnp.zeros((2, 5, 3)), jnp.zeros((2,), jnp.int32)))


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_the_solver_stays_in_bounds_under_address_sanitizer(tmp_path):
  """tests/native/hungarian_asan.cc with csrc/hungarian.cc, built with -fsanitize=address,undefined: edge
  shapes in exactly sized buffers (one row, one column, no valid column, counts past T, ties, non-finite
  costs), and the pairs are scipy's."""
  exe = tmp_path / "asan"
  build = subprocess.run(["g++", "-O1", "-g", "-std=c++17", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                          f"-I{REPO / 'csrc'}", str(REPO / "tests/native/hungarian_asan.cc"),
                          str(REPO / "csrc/hungarian.cc"), "-o", str(exe)], capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stderr[-3000:]
  rng = np.random.default_rng(11)
  cases = []
  for kind in KINDS:
    for q, t in SHAPES + ((2, 1), (1, 2), (64, 3)):
      cost = costs(kind, (3, q, t), rng)
      cases.append((cost, np.array([0, t, t + 3], np.int32)))
  cases.append((np.zeros((0, 4, 4), np.float32), np.zeros((0,), np.int32)))  # an empty batch
  with open(tmp_path / "in.bin", "wb") as f:
    for cost, counts in cases:
      f.write(np.array(cost.shape, np.int64).tobytes() + counts.tobytes() + cost.tobytes())
  run = subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
  got, at = np.fromfile(tmp_path / "out.bin", np.int32), 0
  for cost, counts in cases:
    want_rows, want_cols = scipy_pairs(cost, counts)
    for want in (want_rows, want_cols):
      np.testing.assert_array_equal(got[at:at + want.size].reshape(want.shape), want)
      at += want.size
  assert at == got.size

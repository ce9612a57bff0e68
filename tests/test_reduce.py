"""ops/reduce.py: sums over devices added in mesh-position order, the same bits whatever the layout.

On 8 fake CPU devices (a subprocess: the device count is fixed at JAX's start), mesh (4, 2) summed over
(data, fsdp): every leaf equals numpy's left fold d_0 + d_1 + ... + d_7 bit for bit (float32 with values
spread over many magnitudes, so the order shows: the reversed fold differs, checked), bfloat16 and int32
leaves, sizes that 8 does not divide, and a scalar.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from san_jax.ops import reduce as R

mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
rng = np.random.default_rng(0)
spread = lambda shape: (rng.normal(size=shape) * 10.0 ** rng.uniform(-4, 4, size=shape)).astype(np.float32)
leaves = {"a": spread((8, 37)), "b": spread((8, 3, 5)), "s": spread((8,)),
          "h": spread((8, 11)).astype(jnp.bfloat16), "i": rng.integers(-99, 99, size=(8, 2, 3)).astype(np.int32)}

def fold(x, order):
  total = x[order[0]].copy()
  for d in order[1:]:
    total = (total + x[d]).astype(x.dtype)
  return total

def local(t):
  mine = {k: v[0] for k, v in t.items()}
  return R.ordered_sum_tree(mine, ("data", "fsdp")), R.ordered_sum(mine["a"], ("data", "fsdp"))

f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(("data", "fsdp")), out_specs=P(), check_vma=False))
tree, small = f(leaves)
forward, backward = list(range(8)), list(range(7, -1, -1))
for k, v in leaves.items():
  got = np.asarray(tree[k])
  assert got.dtype == v.dtype and got.shape == v.shape[1:], (k, got.dtype, got.shape)
  assert np.array_equal(got, fold(v, forward)), (k, np.max(np.abs(got.astype(np.float64) - fold(v, forward))))
assert np.array_equal(np.asarray(small), fold(leaves["a"], forward))
assert not np.array_equal(fold(leaves["a"], forward), fold(leaves["a"], backward))  # the order is visible
# Only data movement: no all-reduce (whose order the collective library picks) in the compiled program.
hlo = f.lower(leaves).compile().as_text()
assert "all-to-all" in hlo and "all-gather" in hlo and "all-reduce" not in hlo
print("OK")
"""


def test_ordered_sums_are_the_device_order_fold_bit_for_bit():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
  res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]

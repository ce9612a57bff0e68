"""glibc malloc settings that keep XLA:CPU's buffers out of fresh page faults.

XLA:CPU allocates every output and temporary buffer of a call with malloc and frees it afterwards. With
glibc's defaults a buffer above the mmap threshold (at most 32 MB) is a fresh mmap each call, and a large
one from an XLA worker thread's arena is too, so every page of it faults on first touch, every call:
measured on a 2-core AMD EPYC (2026-12-03), `x + 1` on a [6, 1700, 1700] float32 array (the side ViT's
attention logits) took 20-29 ms with 16,934 page faults per call, and 3.5 ms with none after `tune()`.
Whole SAN parts gain alike (issue 15's note has the same-run table).

`tune()` makes every thread share the main arena (M_ARENA_MAX=1, M_ARENA_TEST=1), serves large blocks from
it instead of mmap (M_MMAP_MAX=0), and keeps freed memory for reuse (M_TRIM_THRESHOLD 2 GiB, M_TOP_PAD
256 MiB): the next call's buffers are pages already mapped. The price: the process's resident memory stays
at its peak instead of shrinking after it (`python -m benchmarks.memory` measures the peak; compare
with `SAN_JAX_MALLOC_TUNING=0`).
It runs when san_jax is imported, before XLA starts its threads (arena settings apply to threads whose
first allocation comes later); `SAN_JAX_MALLOC_TUNING=0` leaves glibc's defaults. Elsewhere than Linux
glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV_VAR = "SAN_JAX_MALLOC_TUNING"
# mallopt parameter numbers from glibc's malloc.h
_SETTINGS = (("M_ARENA_MAX", -8, 1), ("M_ARENA_TEST", -7, 1), ("M_TRIM_THRESHOLD", -1, 2 ** 31 - 1),
             ("M_MMAP_MAX", -4, 0), ("M_TOP_PAD", -2, 1 << 28))
applied = False


def tune() -> bool:
  """Applies the settings once; True if they are in effect."""
  global applied
  if applied or os.environ.get(ENV_VAR, "1") == "0" or platform.system() != "Linux":
    return applied
  if platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  applied = all(libc.mallopt(number, value) == 1 for _, number, value in _SETTINGS)
  return applied

"""Torch-exact resizing: `F.interpolate(..., align_corners=False)` and `adaptive_max_pool2d`.

Every resize in san-jax goes through this module. `jax.image.resize` differs from torch in two ways that
matter for parity (it antialiases when downsampling and uses the Keys cubic with A=-0.5), so the
interpolation weights are built here, on the host, exactly as torch's CPU kernels compute them, and applied
as two small matmuls (separable along height and width), or, for an integer upscale, as the same taps on
shifted copies of the input (`upsample_phases`). Shapes are static, so the weight matrices are
compile-time constants.

Layout: the resized axes are given explicitly (`axes=(h_axis, w_axis)`), so NHWC and NCHW both work.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # torch's bicubic coefficient


# ---- sizes -------------------------------------------------------------------------------------------------
def round_up(x: int, multiple: int) -> int:
  """The smallest multiple of `multiple` >= x (x itself when multiple <= 1)."""
  return -(-int(x) // multiple) * multiple if multiple > 1 else int(x)


def padded_size(hw: Sequence[int], divisibility: int) -> Tuple[int, int]:
  """(H, W) rounded up to multiples of `divisibility`: detectron2's ImageList.from_tensors padding."""
  return round_up(hw[0], divisibility), round_up(hw[1], divisibility)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """torch `F.interpolate(mode="nearest")` source indices: floor(dst * (in/out)) in float32."""
  scale = np.float32(np.float32(in_size) / np.float32(out_size))
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def _source_scale(in_size: int, out_size: int, scale_factor: Optional[float]) -> np.float32:
  """torch's `area_pixel_compute_scale` for align_corners=False, in float32."""
  if scale_factor is not None and scale_factor > 0:
    return np.float32(1.0 / scale_factor)  # 1/scale in double, then cast once
  return np.float32(np.float32(in_size) / np.float32(out_size))


def _source_coords(in_size: int, out_size: int, scale_factor: Optional[float]) -> np.ndarray:
  """Source coordinate of every output index: s*(dst+0.5)-0.5, rounded once to float32.

  torch evaluates this with a fused multiply-add on CPU, i.e. one rounding: computing in float64 and
  casting gives the same float32.
  """
  s = np.float64(_source_scale(in_size, out_size, scale_factor))
  dst = np.arange(out_size, dtype=np.float64)
  return (s * (dst + 0.5) - 0.5).astype(np.float32)


def _fma32(a, b, c):
  """float32 fused multiply-add (one rounding), as the compiled torch kernel contracts a*b+c."""
  return (a.astype(np.float64) * np.float64(b) + np.float64(c)).astype(np.float32)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """The 4 tap weights of torch's `get_cubic_upsample_coefficients`, bit-exact on x86 CPU.

  The rounding sequence (which steps the compiler fused into an FMA) was matched against torch's weights
  over several sizes; plain float32 arithmetic differs from torch by up to ~1e-6 relative.
  """
  a = np.float32(_CUBIC_A)
  one = np.float32(1.0)

  def near(x):  # |x| <= 1: ((A+2)x - (A+3)) x x + 1, no contraction
    r = ((a + np.float32(2)) * x).astype(np.float32) - (a + np.float32(3))
    return (((r * x).astype(np.float32) * x).astype(np.float32) + one).astype(np.float32)

  def far(x):  # 1 < |x| < 2: ((A x - 5A) x + 8A) x - 4A, the first two steps fused
    r = _fma32(x, a, np.float32(-5) * a)
    r = _fma32(r, x, np.float32(8) * a)
    return ((r * x).astype(np.float32) - np.float32(4) * a).astype(np.float32)

  t = t.astype(np.float32)
  return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1)


@functools.lru_cache(maxsize=256)
def interpolation_matrix(in_size: int, out_size: int, method: str,
                         scale_factor: Optional[float] = None) -> np.ndarray:
  """Dense [out_size, in_size] float32 matrix M with out = M @ in along one axis, as torch computes it."""
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f"resize sizes must be positive, got in={in_size}, out={out_size}")
  src = _source_coords(in_size, out_size, scale_factor)
  mat = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  if method == "bilinear":
    src = np.maximum(src, np.float32(0.0))  # torch clamps negative source coordinates for linear modes
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = (src - i0.astype(np.float32)).astype(np.float32)
    l0 = (np.float32(1.0) - l1).astype(np.float32)
    np.add.at(mat, (rows, i0), l0)
    np.add.at(mat, (rows, i1), l1)
  elif method == "bicubic":
    i0 = np.floor(src).astype(np.int64)
    t = (src - i0.astype(np.float32)).astype(np.float32)
    w = _cubic_weights(t)
    for k in range(4):  # taps at i0-1 .. i0+2, edge-replicated
      idx = np.clip(i0 - 1 + k, 0, in_size - 1)
      np.add.at(mat, (rows, idx), w[:, k])
  elif method == "nearest":
    s = _source_scale(in_size, out_size, scale_factor)
    idx = np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * s).astype(np.int64), in_size - 1)
    mat[rows, idx] = 1.0
  else:
    raise ValueError(f"unknown resize method {method!r}; expected 'bilinear', 'bicubic' or 'nearest'")
  return mat


def output_size_for_scale(size: int, scale_factor: float) -> int:
  """Output length torch gives for `scale_factor`: floor(size * scale) in double precision."""
  return int(math.floor(float(size) * float(scale_factor)))


_LETTERS = "abcdefghijklmnpqrstuvwxyz"  # "o" is kept for the output axis


# Below this input size a dense row costs fewer than 64 multiply-adds per output and the matmul is as cheap
# as the taps; keeping it there also keeps every small in-model resize (the side ViT's fusion of CLIP
# features, positional embeddings) computing exactly what it did before the taps existed.
PHASES_MIN_INPUT = 64


def upsample_phases(mat: np.ndarray) -> Optional[Tuple[int, Tuple[Tuple[Tuple[int, float], ...], ...]]]:
  """When `mat` [k * n, n] (an integer upscale, k >= 2, n >= PHASES_MIN_INPUT) is the same few taps in every period of k output
  rows -- output k j + r = sum_t w_rt x[clip(j + d_rt, 0, n - 1)] -- returns (k, per phase r the taps
  ((d, w), ...)); else None. Checked against the whole matrix on the host, edge rows included.

  Why: a dense [k n, n] matmul spends n multiply-adds per output where bilinear needs 2 (SAN's 4x mask
  upsampling to 640x640 for 100 queries: 16 of the post-processing's ~29 GFLOP), while the taps are shifted
  copies of the input that XLA fuses into one elementwise pass."""
  out_size, n = mat.shape
  k = out_size // n if n else 0
  if k < 2 or out_size != k * n or n < PHASES_MIN_INPUT:
    return None
  j = n // 2
  phases = []
  for r in range(k):
    row = mat[k * j + r]
    cols = np.flatnonzero(row)
    if cols.size == 0 or cols.size > 4:
      return None
    phases.append(tuple((int(c - j), float(row[c])) for c in cols))
  implied = np.zeros_like(mat)
  js = np.arange(n)
  for r, taps in enumerate(phases):
    for d, w in taps:
      np.add.at(implied, (k * js + r, np.clip(js + d, 0, n - 1)), np.float32(w))
  if not np.allclose(implied, mat, rtol=0, atol=1e-7):
    return None
  return k, tuple(phases)


def _apply_phases(x: jax.Array, k: int, phases, axis: int) -> jax.Array:
  """`upsample_phases`' taps applied along `axis`: edge-replicated shifts of x, k phases interleaved."""
  n = x.shape[axis]
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  x = x.astype(dtype)
  lo = max(0, -min(d for taps in phases for d, _ in taps))
  hi = max(0, max(d for taps in phases for d, _ in taps))
  pad = [(0, 0)] * x.ndim
  pad[axis] = (lo, hi)
  xp = jnp.pad(x, pad, mode="edge")
  outs = []
  for taps in phases:
    acc = None
    for d, w in taps:
      term = jnp.asarray(w, dtype) * jax.lax.slice_in_dim(xp, lo + d, lo + d + n, axis=axis)
      acc = term if acc is None else acc + term
    outs.append(acc)
  y = jnp.stack(outs, axis=axis + 1)  # [..., n, k, ...]
  return y.reshape(x.shape[:axis] + (n * k,) + x.shape[axis + 1:])


def _apply_along(x: jax.Array, mat: np.ndarray, axis: int) -> jax.Array:
  """out = mat @ x along `axis`, contracted in place (no transposes of the big array); an integer upscale
  whose taps repeat (`upsample_phases`) as shifted copies instead of a matmul."""
  phased = upsample_phases(mat)
  if phased is not None:
    return _apply_phases(x, *phased, axis)
  mat = jnp.asarray(mat, dtype=x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
  dims = _LETTERS[:x.ndim]
  out_dims = dims[:axis] + "o" + dims[axis + 1:]
  # HIGHEST: float32 matmuls on TPU/GPU would otherwise run in bfloat16 passes and break parity.
  return jnp.einsum(f"{dims},o{dims[axis]}->{out_dims}", x, mat, precision=jax.lax.Precision.HIGHEST)


def interpolate(x: jax.Array, size: Optional[Sequence[int]] = None, *,
                scale_factor: Optional[float | Tuple[float, float]] = None,
                method: str = "bilinear", axes: Tuple[int, int] = (1, 2)) -> jax.Array:
  """`torch.nn.functional.interpolate(mode=method, align_corners=False)` over two axes of `x`.

  Exactly one of `size` (out_h, out_w) and `scale_factor` must be given; with a scale factor the output is
  floor(in * scale) and the source scale is 1/scale (not in/out), as in torch.
  """
  if (size is None) == (scale_factor is None):
    raise ValueError("interpolate: give exactly one of size and scale_factor")
  axes = tuple(a % x.ndim for a in axes)
  in_hw = (x.shape[axes[0]], x.shape[axes[1]])
  if scale_factor is not None:
    sf = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
    out_hw = tuple(output_size_for_scale(n, s) for n, s in zip(in_hw, sf))
    factors: Tuple[Optional[float], ...] = tuple(float(s) for s in sf)
  else:
    out_hw = tuple(int(s) for s in size)
    factors = (None, None)
  if min(out_hw) <= 0:
    raise ValueError(f"interpolate: output size {out_hw} from input {in_hw} is empty")
  # Width first, then height: torch's CPU kernels nest the width interpolation inside the height one.
  for axis, n_in, n_out, f in reversed(list(zip(axes, in_hw, out_hw, factors))):
    if n_in == n_out and f in (None, 1.0):
      continue  # identity in every mode (source coordinate == destination)
    x = _apply_along(x, interpolation_matrix(n_in, n_out, method, f), axis)
  return x


def crop_resize_matrix(in_size: int, out_size: int, in_canvas: int, out_canvas: int,
                       flip: bool = False) -> np.ndarray:
  """[out_canvas, in_canvas] float32: rows [0, out_size) hold torch's bilinear weights from the first
  `in_size` inputs to `out_size` outputs (identity when equal, as torch skips that axis); zero elsewhere.

  "Crop to the content, then resize" as one matrix, so a program compiled for a canvas serves every content
  size (the sizes become data). `flip` mirrors the output rows, which un-mirrors a horizontally flipped
  input (detectron2's TTA flips the final output back)."""
  if not (0 < in_size <= in_canvas and 0 < out_size <= out_canvas):
    raise ValueError(f"sizes {in_size}->{out_size} do not fit canvases {in_canvas}->{out_canvas}")
  m = np.zeros((out_canvas, in_canvas), np.float32)
  if in_size == out_size:
    m[np.arange(out_size), np.arange(out_size)] = 1.0
  else:
    m[:out_size, :in_size] = interpolation_matrix(in_size, out_size, "bilinear")
  if flip:
    m[:out_size] = m[:out_size][::-1]
  return m


def apply_crop_resize(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """[..., H, W] -> [..., Ho, Wo] with `crop_resize_matrix` rows [Ho, H] and cols [Wo, W] (arrays: they may
  differ per image); width first, as torch's kernels."""
  x = jnp.einsum("...hw,ow->...ho", x, cols.astype(x.dtype), precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("...hw,oh->...ow", x, rows.astype(x.dtype), precision=jax.lax.Precision.HIGHEST)


def adaptive_windows(in_size: int, out_size: int):
  """torch's adaptive pooling windows [lo, hi) of output cells 0..out_size-1 (overlapping where the sizes
  do not divide)."""
  return [((i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)) for i in range(out_size)]


def _adaptive_max_along(x: jax.Array, out_size: int, axis: int) -> jax.Array:
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  if in_size % out_size == 0:  # equal, non-overlapping windows: a reshape
    k = in_size // out_size
    shape = x.shape[:axis] + (out_size, k) + x.shape[axis + 1:]
    return jnp.max(x.reshape(shape), axis=axis + 1)
  pieces = [jax.lax.slice_in_dim(x, lo, hi, axis=axis).max(axis=axis, keepdims=True)
            for lo, hi in adaptive_windows(in_size, out_size)]
  return jnp.concatenate(pieces, axis=axis)


def adaptive_max_pool2d(x: jax.Array, output_size: Sequence[int], axes: Tuple[int, int] = (-2, -1)) -> jax.Array:
  """`F.adaptive_max_pool2d`: windows [floor(i*in/out), ceil((i+1)*in/out)), separable over the two axes."""
  axes = tuple(a % x.ndim for a in axes)
  x = _adaptive_max_along(x, int(output_size[0]), axes[0])
  return _adaptive_max_along(x, int(output_size[1]), axes[1])

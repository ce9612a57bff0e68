"""The torch-exact resize against torch.nn.functional.interpolate / adaptive_max_pool2d."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from san_jax.ops import resize

CASES = [  # (in_hw, size or None, scale or None)
    ((20, 22), (40, 44), None), ((40, 40), (20, 20), None), ((13, 17), (29, 7), None),
    ((14, 14), (10, 11), None), ((7, 9), (7, 9), None), ((33, 45), (5, 3), None),
    ((320, 352), None, 0.5), ((320, 352), None, 0.7), ((97, 131), None, 0.7), ((61, 83), None, 0.5),
    ((11, 13), None, 1.7),
    ((16, 12), (64, 48), None), ((5, 7), None, 3.0), ((160, 40), (640, 160), None),  # integer upscales,
    ((64, 96), None, 2.0), ((70, 65), (280, 130), None),  # the last three with n >= PHASES_MIN_INPUT taps
]


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("in_hw,size,scale", CASES)
def test_interpolate_matches_torch(method, in_hw, size, scale):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3) + in_hw).astype(np.float32) * 5
  ref = F.interpolate(torch.from_numpy(x), size=size, scale_factor=scale, mode=method,
                      align_corners=False).numpy()
  got = np.asarray(resize.interpolate(jnp.asarray(x), size=size, scale_factor=scale, method=method, axes=(2, 3)))
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
  # NHWC gives the same numbers
  got_nhwc = resize.interpolate(jnp.asarray(x.transpose(0, 2, 3, 1)), size=size, scale_factor=scale,
                                method=method, axes=(1, 2))
  np.testing.assert_allclose(np.asarray(got_nhwc).transpose(0, 3, 1, 2), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_scale_factor_uses_inverse_scale_not_size_ratio():
  # 97*0.7 = 67.9 -> 67 rows; torch's source scale is 1/0.7, not 97/67: the two give different numbers.
  x = np.random.default_rng(1).normal(size=(1, 1, 97, 5)).astype(np.float32)
  by_scale = np.asarray(resize.interpolate(jnp.asarray(x), scale_factor=(0.7, 1.0), axes=(2, 3)))
  by_size = np.asarray(resize.interpolate(jnp.asarray(x), size=(67, 5), axes=(2, 3)))
  assert by_scale.shape == by_size.shape == (1, 1, 67, 5)
  assert np.abs(by_scale - by_size).max() > 1e-3


@pytest.mark.parametrize("in_hw,out_hw", [((40, 40), (20, 20)), ((20, 22), (10, 11)), ((23, 37), (10, 11)),
                                          ((7, 5), (3, 4)), ((9, 9), (9, 9))])
def test_adaptive_max_pool_matches_torch(in_hw, out_hw):
  x = np.random.default_rng(2).normal(size=(2, 3, 4) + in_hw).astype(np.float32)
  ref = F.adaptive_max_pool2d(torch.from_numpy(x).reshape(6, 4, *in_hw), out_hw).numpy().reshape(2, 3, 4, *out_hw)
  got = np.asarray(resize.adaptive_max_pool2d(jnp.asarray(x), out_hw))
  np.testing.assert_array_equal(got, ref)


def test_bad_arguments_raise():
  x = jnp.zeros((1, 4, 4, 1))
  with pytest.raises(ValueError, match="exactly one"):
    resize.interpolate(x)
  with pytest.raises(ValueError, match="unknown resize method"):
    resize.interpolate(x, size=(2, 2), method="area")
  with pytest.raises(ValueError, match="empty"):
    resize.interpolate(x, scale_factor=0.1)


def test_integer_upscales_are_taps_on_shifted_copies_not_a_matmul():
  """SAN's 4x mask upsampling (160 -> 640): two taps per phase, no dot in the program; sizes whose taps
  do not repeat keep the matmul (the torch comparisons above cover both)."""
  k, phases = resize.upsample_phases(resize.interpolation_matrix(160, 640, "bilinear"))
  assert k == 4 and [len(t) for t in phases] == [2, 2, 2, 2]
  assert resize.upsample_phases(resize.interpolation_matrix(40, 20, "bilinear")) is None
  assert resize.upsample_phases(resize.interpolation_matrix(20, 40, "bilinear")) is None  # small: the matmul
  assert resize.upsample_phases(resize.interpolation_matrix(11, 18, "bilinear", 1.7)) is None
  import jax
  x = jnp.zeros((3, 160, 160), jnp.float32)
  hlo = jax.jit(lambda x: resize.interpolate(x, size=(640, 640), axes=(1, 2))).lower(x).as_text()
  assert "dot_general" not in hlo

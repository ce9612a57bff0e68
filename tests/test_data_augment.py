"""Augmentation ops against hand-computed values and torch, and the whole chain's invariants.

The chain property (image and label stay aligned, shapes are static, nothing becomes NaN, targets match
the label map) is checked on images whose colour encodes their label, with hypothesis when it is installed
and on a fixed set of seeded random cases always.
"""

from __future__ import annotations

import numpy as np
import pytest

from san_jax.data import augment as A
from san_jax.ops import resize


class ScriptedRng:
  """Stands in for np.random.Generator, returning scripted values, to pin down each random choice."""

  def __init__(self, integers=(), uniforms=()):
    self._integers, self._uniforms = list(integers), list(uniforms)

  def integers(self, low, high=None):
    v = self._integers.pop(0)
    lo, hi = (0, low) if high is None else (low, high)
    assert lo <= v < hi, (v, lo, hi)
    return v

  def uniform(self, low=0.0, high=1.0):
    v = self._uniforms.pop(0)
    assert low <= v <= high
    return v


# ----------------------------------------------------------------------------------------------------------
# Resizing


def test_min_size_train_is_sans():
  assert A.MIN_SIZE_TRAIN == (320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960)


@pytest.mark.parametrize("hw,short,max_size,want", [
    ((480, 640), 320, 2560, (320, 427)),  # 640 * 320/480 = 426.67 -> 427
    ((640, 480), 640, 2560, (853, 640)),  # 853.33 -> 853
    ((500, 500), 960, 2560, (960, 960)),
    ((100, 1000), 640, 2560, (256, 2560)),  # 640 x 6400 capped by 2560: scale 0.4
    ((427, 640), 640, 2560, (640, 959)),  # 959.25 -> 959
    ((333, 500), 320, 2560, (320, 480)),  # 480.48 -> 480
])
def test_shortest_edge_shape(hw, short, max_size, want):
  assert A.shortest_edge_shape(*hw, short, max_size) == want


def test_sample_short_edge():
  assert A.sample_short_edge(ScriptedRng(integers=[3]), A.MIN_SIZE_TRAIN) == 512
  assert A.sample_short_edge(np.random.default_rng(0), (320, 330), "range") in range(320, 331)


def test_resize_label_is_torch_nearest():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  for (h, w), (nh, nw) in [((37, 53), (64, 91)), ((640, 427), (320, 213)), ((13, 7), (13, 29)),
                           ((480, 640), (960, 1280)), ((97, 101), (33, 34))]:
    lab = rng.integers(0, 200, (h, w)).astype(np.uint8)
    ref = torch.nn.functional.interpolate(torch.from_numpy(lab.astype(np.float64))[None, None], (nh, nw),
                                          mode="nearest")[0, 0].numpy()
    np.testing.assert_array_equal(A.resize_label(lab, (nh, nw)), ref.astype(np.uint8))


def test_resize_image_is_pil_bilinear():
  from PIL import Image
  img = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  want = np.asarray(Image.fromarray(img).resize((17, 13), Image.BILINEAR))
  np.testing.assert_array_equal(A.resize_image(img, (13, 17)), want)
  const = np.full((30, 40, 3), 77, np.uint8)
  assert (A.resize_image(const, (61, 83)) == 77).all()


# ----------------------------------------------------------------------------------------------------------
# Cropping


def test_plain_random_crop_box():
  lab = np.zeros((700, 900), np.uint8)
  assert A.random_crop_box(ScriptedRng(integers=[5, 7]), lab, (640, 640)) == (5, 7, 640, 640)
  small = np.zeros((400, 900), np.uint8)  # the crop shrinks to the image's height
  assert A.random_crop_box(ScriptedRng(integers=[0, 100]), small, (640, 640)) == (0, 100, 400, 640)


def test_category_area_constraint_retries():
  lab = np.zeros((40, 40), np.uint8)
  lab[:10, :10] = 1  # class 1 only in the top-left corner
  lab[30:, 30:] = 255
  # Draws 1, 2: single-category crops (rejected); draw 3 straddles the corner: 2 classes, max share < 0.9.
  rng = ScriptedRng(integers=[20, 20, 15, 0, 0, 0])
  assert A.random_crop_box(rng, lab, (20, 20), single_category_max_area=0.9) == (0, 0, 20, 20)
  # None qualifies within the tries: the last draw is kept.
  rng = ScriptedRng(integers=[20, 20] * 9 + [15, 15])
  assert A.random_crop_box(rng, lab, (20, 20), single_category_max_area=0.9, max_tries=10) == (15, 15, 20, 20)


def test_category_area_constraint_ignores_the_ignore_label():
  lab = np.full((20, 20), 255, np.uint8)
  lab[:, :2] = 3  # one class plus lots of ignore: still a single category, so the crop is redrawn
  rng = ScriptedRng(integers=[0, 0, 0, 0])
  A.random_crop_box(rng, lab, (10, 10), single_category_max_area=0.5, max_tries=2)
  assert not rng._integers  # both tries used


# ----------------------------------------------------------------------------------------------------------
# Colour


@pytest.mark.parametrize("rgb,hsv", [
    ((255, 0, 0), (0, 255, 255)), ((0, 255, 0), (60, 255, 255)), ((0, 0, 255), (120, 255, 255)),
    ((128, 128, 128), (0, 0, 128)), ((255, 255, 0), (30, 255, 255)), ((0, 0, 0), (0, 0, 0)),
    ((200, 100, 50), (10, 191, 200)),  # h = (100-50)*30/150 = 10, s = 150*255/200 = 191.25
])
def test_hsv_hand_values(rgb, hsv):
  px = np.array([[rgb]], np.uint8)
  assert tuple(A.rgb_to_hsv(px)[0, 0]) == hsv
  back = A.hsv_to_rgb(np.array([[hsv]], np.uint8))[0, 0].astype(int)
  assert np.abs(back - rgb).max() <= 1


def test_hsv_round_trip_is_close():
  img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  back = A.hsv_to_rgb(A.rgb_to_hsv(img)).astype(int)
  # 8-bit HSV quantises hue to 2 degrees: a few levels of error at most, as in OpenCV.
  assert np.abs(back - img).max() <= 8


def test_color_aug_brightness_only():
  img = np.array([[[10, 250, 100]]], np.uint8)
  # brightness applied (+20.7), then the contrast-first branch with every step skipped.
  rng = ScriptedRng(integers=[1, 1, 0, 0, 0], uniforms=[20.7])
  assert A.color_aug_ssd(img, rng).tolist() == [[[30, 255, 120]]]  # truncated, clipped


def test_color_aug_contrast_then_hue():
  img = np.array([[[200, 100, 50]]], np.uint8)
  # no brightness; contrast-first branch: contrast x0.5, no saturation, hue +10 (from 10 to 20).
  rng = ScriptedRng(integers=[0, 1, 1, 0, 1, 10], uniforms=[0.5])
  out = A.color_aug_ssd(img, rng)
  half = np.array([[[100, 50, 25]]], np.uint8)
  want_hsv = A.rgb_to_hsv(half)
  want_hsv[..., 0] += 10
  np.testing.assert_array_equal(out, A.hsv_to_rgb(want_hsv))


def test_color_aug_saturation_zero_gives_grey():
  img = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  # no brightness; saturation-first branch: saturation x0 (pretend range), no hue, no contrast
  rng = ScriptedRng(integers=[0, 0, 1, 0, 0], uniforms=[0.0])
  out = A.color_aug_ssd(img, rng, saturation_range=(0.0, 0.0))
  assert (out == out[..., :1]).all()  # every channel equal: grey
  np.testing.assert_array_equal(out[..., 0], img.max(-1))  # V is kept


# ----------------------------------------------------------------------------------------------------------
# Padding and targets


def test_pad_to():
  img = np.ones((2, 3, 3), np.uint8)
  lab = np.zeros((2, 3), np.int32)
  pi, pl = A.pad_to(img, lab, (4, 5), image_value=128, ignore_label=255)
  assert pi.shape == (4, 5, 3) and pl.shape == (4, 5)
  assert (pi[:2, :3] == 1).all() and (pi[2:] == 128).all() and (pi[:, 3:] == 128).all()
  assert (pl[:2, :3] == 0).all() and (pl[2:] == 255).all() and (pl[:, 3:] == 255).all()
  with pytest.raises(ValueError):
    A.pad_to(img, lab, (1, 5))
  assert resize.padded_size((640, 853), 32) == (640, 864)


def test_semantic_to_targets():
  lab = np.array([[0, 0, 255], [3, 3, 1]])
  t = A.semantic_to_targets(lab, 4)
  assert t["labels"].tolist() == [0, 1, 3, -1]
  assert t["valid"].tolist() == [True, True, True, False]
  assert t["masks"].dtype == np.uint8 and t["masks"].shape == (4, 2, 3)
  assert t["masks"][0].tolist() == [[1, 1, 0], [0, 0, 0]]
  assert t["masks"][1].tolist() == [[0, 0, 0], [0, 0, 1]]
  assert t["masks"][2].tolist() == [[0, 0, 0], [1, 1, 0]]
  assert not t["masks"][3].any()
  assert t["num_dropped"] == 0


def test_semantic_to_targets_overflow_keeps_largest():
  lab = np.array([[0, 0, 255], [3, 3, 1]])
  t = A.semantic_to_targets(lab, 2)
  assert t["labels"].tolist() == [0, 3] and t["num_dropped"] == 1
  empty = A.semantic_to_targets(np.full((2, 2), 255), 3, with_masks=False)
  assert empty["labels"].tolist() == [-1, -1, -1] and not empty["valid"].any() and "masks" not in empty


def test_semantic_to_targets_16bit_ignore():
  lab = np.array([[300, 65535], [0, 300]], np.uint16)
  t = A.semantic_to_targets(lab, 3, ignore_label=65535)
  assert t["labels"].tolist() == [0, 300, -1]


def test_eval_transform():
  img = np.random.default_rng(0).integers(0, 256, (300, 450, 3), dtype=np.uint8)
  lab = np.random.default_rng(1).integers(0, 10, (300, 450)).astype(np.uint8)
  out = A.eval_transform(img, lab)
  assert out["image_size"].tolist() == [640, 960] and out["image"].shape == (640, 960, 3)
  np.testing.assert_array_equal(out["sem_seg"], lab)
  assert out["orig_size"].tolist() == [300, 450]
  cfg = A.EvalAugConfig(image_canvas=(1024, 1024), label_canvas=(512, 512))
  out = A.eval_transform(img, lab, cfg)
  assert out["image"].shape == (1024, 1024, 3) and (out["image"][640:] == 0).all()
  assert out["sem_seg"].shape == (512, 512) and (out["sem_seg"][300:] == 255).all()


# ----------------------------------------------------------------------------------------------------------
# The whole training chain

PALETTE = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20], [20, 230, 230],
                    [230, 20, 230]], np.uint8)


def coded_example(h: int, w: int, seed: int):
  """Blocks of classes 0..5 (and some ignore) with the image colour a function of the label."""
  rng = np.random.default_rng(seed)
  bh, bw = max(h // rng.integers(1, 5), 1), max(w // rng.integers(1, 5), 1)
  blocks = rng.integers(0, 7, (-(-h // bh), -(-w // bw)))
  lab = np.kron(blocks, np.ones((bh, bw), np.int64))[:h, :w]
  lab = np.where(lab == 6, 255, lab).astype(np.uint8)
  img = np.where((lab == 255)[..., None], 128, PALETTE[np.minimum(lab, 5)]).astype(np.uint8)
  return img, lab


def interior(lab: np.ndarray, r: int = 2) -> np.ndarray:
  """Pixels whose (2r+1)^2 neighbourhood has a single label: away from every edge a resize can blur.

  The border counts as an edge: beyond a crop's border the source may hold another class.
  """
  h, w = lab.shape
  pad = np.pad(lab.astype(np.int64), r, constant_values=-1)
  same = np.ones((h, w), bool)
  for dy in range(2 * r + 1):
    for dx in range(2 * r + 1):
      same &= pad[dy:dy + h, dx:dx + w] == lab
  return same


def check_chain(h: int, w: int, crop: int, sizes, seed: int, color: bool, max_area: float) -> None:
  img, lab = coded_example(h, w, seed)
  cfg = A.TrainAugConfig(min_size_train=tuple(sizes), max_size_train=4 * crop, crop_size=(crop, crop),
                         single_category_max_area=max_area, color_aug_ssd=color, max_targets=8)
  out = A.train_transform(img, lab, np.random.default_rng(seed), cfg)
  # Static shapes and types.
  assert out["image"].shape == (crop, crop, 3) and out["image"].dtype == np.uint8
  assert out["sem_seg"].shape == (crop, crop) and out["sem_seg"].dtype == np.int32
  assert out["masks"].shape == (8, crop, crop) and out["labels"].shape == (8,) and out["valid"].shape == (8,)
  for v in out.values():
    assert not np.isnan(np.asarray(v, np.float64)).any()
  sem, image = out["sem_seg"], out["image"]
  ch, cw = out["image_size"]
  assert 0 < ch <= crop and 0 < cw <= crop
  # Padding: ignore label and 128 outside the content.
  assert (sem[ch:] == 255).all() and (sem[:, cw:] == 255).all()
  assert (image[ch:] == 128).all() and (image[:, cw:] == 128).all()
  # Alignment: away from label edges, the pixel colour is its label's colour (or one global recolouring
  # of it when colour augmentation is on). "Away" scales with the upsampling: bilinear blends source
  # neighbours and torch's nearest picks the top-left source pixel, up to one source pixel apart.
  short = A.sample_short_edge(np.random.default_rng(seed), sizes)  # the chain's first draw
  scale = A.shortest_edge_shape(h, w, short, cfg.max_size_train)[0] / h
  inside = interior(sem, int(np.ceil(max(scale, 1.0))) + 1) & (sem != 255)
  inside[ch:] = False
  inside[:, cw:] = False
  for c in np.unique(sem[inside]):
    px = image[inside & (sem == c)].astype(int)
    if color:
      assert np.abs(px - px[0]).max() <= 1, f"class {c} pixels differ: misaligned"
    else:
      assert np.abs(px - PALETTE[c]).max() <= 1, f"class {c} pixels are not its colour: misaligned"
  # Targets are exactly the label map's classes and masks.
  present = np.unique(sem[sem != 255])
  n = min(len(present), 8)
  assert out["valid"].sum() == n and (out["labels"][n:] == -1).all()
  for k in range(n):
    np.testing.assert_array_equal(out["masks"][k], sem == out["labels"][k])
  if len(present) <= 8:
    np.testing.assert_array_equal(out["labels"][:n], present)
    np.testing.assert_array_equal(out["masks"].sum(0), sem != 255)


def _random_cases(n: int):
  rng = np.random.default_rng(1234)
  for i in range(n):
    crop = int(rng.integers(8, 64))
    sizes = sorted(set(int(s) for s in rng.integers(4, 3 * crop, rng.integers(1, 4))))
    yield (int(rng.integers(4, 160)), int(rng.integers(4, 160)), crop, sizes, i, bool(i % 2),
           float(rng.choice([1.0, 0.75])))


@pytest.mark.parametrize("case", list(_random_cases(24)))
def test_chain_invariants_seeded(case):
  check_chain(*case)


def test_chain_invariants_hypothesis():
  hypothesis = pytest.importorskip("hypothesis")
  st = hypothesis.strategies

  @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
  @hypothesis.given(h=st.integers(4, 160), w=st.integers(4, 160), crop=st.integers(8, 64),
                    sizes=st.lists(st.integers(4, 192), min_size=1, max_size=3, unique=True),
                    seed=st.integers(0, 2**31 - 1), color=st.booleans(), max_area=st.sampled_from([1.0, 0.75]))
  def prop(h, w, crop, sizes, seed, color, max_area):
    check_chain(h, w, crop, sorted(sizes), seed, color, max_area)

  prop()


def test_train_transform_flip_mirrors_both():
  img, lab = coded_example(64, 64, 3)
  cfg = A.TrainAugConfig(min_size_train=(64,), crop_size=(64, 64), color_aug_ssd=False, max_targets=8)
  # rng draws: short-edge choice, crop y0, x0, then the flip coin (uniform < 0.5: flip)
  out = A.train_transform(img, lab, ScriptedRng(integers=[0, 0, 0], uniforms=[0.3]), cfg)
  np.testing.assert_array_equal(out["sem_seg"], lab[:, ::-1])
  np.testing.assert_array_equal(out["image"], img[:, ::-1])
  out = A.train_transform(img, lab, ScriptedRng(integers=[0, 0, 0], uniforms=[0.7]), cfg)
  np.testing.assert_array_equal(out["sem_seg"], lab)


def test_train_transform_rejects_mismatched_sizes():
  with pytest.raises(ValueError):
    A.train_transform(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8), np.random.default_rng(0))

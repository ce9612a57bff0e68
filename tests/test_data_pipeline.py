"""The input pipeline: host sharding, determinism, exact resume, static shapes, sources.

Runs on the in-memory shapes source with tiny images, so every test takes well under a second except the
multiprocess one (worker start-up).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from san_jax.data import augment, pipeline, shapes

SPEC = shapes.ShapesSpec(image_size=(24, 32))
AUG = augment.TrainAugConfig(min_size_train=(16, 24, 32), max_size_train=64, crop_size=(24, 24), max_targets=6)


def source(n: int, seed: int = 0) -> shapes.ShapesSource:
  return shapes.ShapesSource(n, seed=seed, spec=SPEC)


def train_pipe(src, **kw) -> pipeline.DataPipeline:
  args = dict(mode="train", batch_size=2, seed=7, process_index=0, process_count=1, train_aug=AUG,
              num_threads=2, prefetch=2)
  args.update(kw)
  return pipeline.make_pipeline(src, **args)


def take(pipe, n: int):
  return [next(pipe) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_shapes_are_static():
  pipe = train_pipe(source(10), batch_size=3)
  for b in take(pipe, 5):
    assert b["image"].shape == (3, 24, 24, 3) and b["image"].dtype == np.uint8
    assert b["sem_seg"].shape == (3, 24, 24) and b["sem_seg"].dtype == np.int32
    assert b["masks"].shape == (3, 6, 24, 24) and b["masks"].dtype == np.uint8
    assert b["labels"].shape == (3, 6) and b["labels"].dtype == np.int32
    assert b["valid"].shape == (3, 6) and b["valid"].dtype == bool
    assert b["image_size"].shape == (3, 2) and b["index"].shape == (3,) and b["example_valid"].all()


def test_batch_targets_match_the_label_maps():
  for b in take(train_pipe(source(6), batch_size=3), 2):
    for sem, labels, valid, masks in zip(b["sem_seg"], b["labels"], b["valid"], b["masks"]):
      present = np.unique(sem[sem != 255])
      assert valid.sum() == len(present) > 0
      np.testing.assert_array_equal(labels[valid], present)
      assert (labels[~valid] == -1).all() and not masks[~valid].any()
      for k in np.flatnonzero(valid):
        np.testing.assert_array_equal(masks[k], sem == labels[k])
  no_masks = next(train_pipe(source(6), train_aug=dataclasses.replace(AUG, with_masks=False)))
  assert "masks" not in no_masks and no_masks["labels"].shape == (2, 6)


def test_two_hosts_read_disjoint_slices_covering_the_split():
  n = 12
  seen = []
  for p in range(2):
    pipe = train_pipe(source(n), process_index=p, process_count=2, num_epochs=1, batch_size=2)
    assert len(pipe) == 3
    idx = np.concatenate([b["index"] for b in take(pipe, len(pipe))])
    with pytest.raises(StopIteration):
      next(pipe)
    assert len(set(idx.tolist())) == len(idx) == 6
    seen.append(set(idx.tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(n))


def test_training_hosts_get_equal_shares():
  # 13 examples on 2 hosts: one is left out so both hosts run the same number of steps.
  lens = [len(train_pipe(source(13), process_index=p, process_count=2, batch_size=2)) for p in range(2)]
  assert lens == [3, 3]


def test_eval_hosts_cover_every_example_once_with_padding():
  n = 11
  seen = []
  counts = []
  for p in range(3):
    pipe = pipeline.make_pipeline(source(n), mode="eval", batch_size=2, process_index=p, process_count=3,
                                  eval_aug=augment.EvalAugConfig(min_size_test=24, max_size_test=64,
                                                                 image_canvas=(32, 64), label_canvas=(24, 32)))
    batches = list(pipe)
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (2, 32, 64, 3) and b["sem_seg"].shape == (2, 24, 32)
      assert ((b["index"] >= 0) == b["example_valid"]).all()
    idx = np.concatenate([b["index"] for b in batches])
    seen.append([i for i in idx.tolist() if i >= 0])
  assert counts == [2, 2, 2]  # ceil(ceil(11 / 3) / 2): hosts stay in step
  assert sorted(sum(seen, [])) == list(range(n))
  assert all(not set(a) & set(b) for i, a in enumerate(seen) for b in seen[i + 1:])


def test_eval_labels_are_the_originals():
  src = source(3)
  pipe = pipeline.make_pipeline(src, mode="eval", batch_size=1, process_index=0, process_count=1,
                                eval_aug=augment.EvalAugConfig(min_size_test=48, max_size_test=128))
  for i, b in enumerate(pipe):
    np.testing.assert_array_equal(b["sem_seg"][0], src[i]["label"])
    assert b["image_size"][0].tolist() == [48, 64] and b["image"].shape == (1, 64, 64, 3)


class _Sizes:
  """Three examples of different sizes (portrait, landscape, small), labels 0..2 inside."""
  shapes = [(40, 24), (24, 48), (16, 16)]

  def __len__(self):
    return len(self.shapes)

  def __getitem__(self, i):
    h, w = self.shapes[i]
    rng = np.random.default_rng(i)
    return {"image": rng.integers(0, 256, (h, w, 3), np.uint8), "label": rng.integers(0, 3, (h, w), np.int32)}


def test_eval_batches_share_the_largest_canvas_and_keep_each_example():
  aug = augment.EvalAugConfig(min_size_test=24, max_size_test=64, size_divisibility=16, ignore_label=255)
  make = lambda b: list(pipeline.make_pipeline(_Sizes(), mode="eval", batch_size=b, process_index=0,
                                               process_count=1, eval_aug=aug))
  singles, (batch, padded) = make(1), make(2)
  # each example alone: its own canvas (a multiple of 16); together: the largest of them, padded
  assert [s["image"].shape[1:3] for s in singles] == [(48, 32), (32, 48), (32, 32)]
  assert batch["image"].shape == (2, 48, 48, 3) and batch["sem_seg"].shape == (2, 40, 48)
  for i, single in enumerate(singles[:2]):
    h, w = single["image"].shape[1:3]
    np.testing.assert_array_equal(batch["image"][i, :h, :w], single["image"][0])
    assert not batch["image"][i, h:].any() and not batch["image"][i, :, w:].any()
    oh, ow = single["orig_size"][0]
    np.testing.assert_array_equal(batch["sem_seg"][i, :oh, :ow], single["sem_seg"][0])
    assert (batch["sem_seg"][i, oh:] == 255).all() and (batch["sem_seg"][i, :, ow:] == 255).all()
    for key in ("image_size", "orig_size", "index"):
      np.testing.assert_array_equal(batch[key][i], single[key][0])
  assert padded["example_valid"].tolist() == [True, False] and padded["index"].tolist() == [2, -1]


def test_same_seed_same_batches_other_seed_other_batches():
  a = take(train_pipe(source(10)), 6)
  b = take(train_pipe(source(10)), 6)
  assert_batches_equal(a, b)
  c = take(train_pipe(source(10), seed=8), 6)
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_epochs_are_reshuffled_and_hosts_augment_differently():
  pipe = train_pipe(source(8), batch_size=4)
  e1, e2 = [np.concatenate([b["index"] for b in take(pipe, 2)]) for _ in range(2)]
  assert sorted(e1.tolist()) == sorted(e2.tolist()) == list(range(8))
  assert e1.tolist() != e2.tolist()
  # Same position on two hosts: different crops/colours even for look-alike inputs.
  h0 = take(train_pipe(source(8), process_index=0, process_count=2), 1)[0]
  h1 = take(train_pipe(source(8), process_index=1, process_count=2), 1)[0]
  assert not np.array_equal(h0["image_size"], h1["image_size"]) or not np.array_equal(h0["image"], h1["image"])


@pytest.mark.parametrize("consumed", [0, 1, 3, 7])  # 7 crosses the end of an epoch (5 batches of 2)
def test_restore_gives_the_uninterrupted_next_batches(consumed):
  src = source(10)
  pipe = train_pipe(src)
  take(pipe, consumed)
  state = json.loads(json.dumps(pipe.get_state()))  # as a checkpoint would store it
  expected = take(pipe, 3)
  resumed = train_pipe(src)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)
  assert resumed.get_state()["batches"] == consumed + 3


def test_restore_into_a_running_pipeline_and_state_before_start():
  src = source(10)
  fresh = train_pipe(src)
  state0 = fresh.get_state()
  first = take(fresh, 2)
  fresh.set_state(state0)  # rewinds a running pipeline too
  assert_batches_equal(take(fresh, 2), first)


def test_restore_refuses_another_pipeline():
  state = train_pipe(source(10)).get_state()
  with pytest.raises(ValueError, match="seed"):
    train_pipe(source(10), seed=1).set_state(state)
  with pytest.raises(ValueError, match="global_batch_size"):
    train_pipe(source(10), batch_size=3).set_state(state)
  # Another host count with the same global batch (2 x 1 instead of 1 x 2) is the same position: accepted.
  train_pipe(source(10), batch_size=1, process_index=1, process_count=2).set_state(state)


def test_multiprocess_workers_match_threads_and_resume():
  src = source(8)
  want = take(train_pipe(src), 4)
  with train_pipe(src, num_workers=2) as pipe:
    got = take(pipe, 2)
    state = json.loads(json.dumps(pipe.get_state()))
    got += take(pipe, 2)
  assert_batches_equal(got, want)
  with train_pipe(src, num_workers=2) as resumed:
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 2), want[2:])


def test_sixteen_bit_labels_with_their_ignore_value():
  class Src:  # an ADE20K-847-like source: uint16 ids, 65535 unlabeled
    ignore_label = 65535  # the pipeline picks it up, as from a BuiltSource

    def __len__(self):
      return 4

    def __getitem__(self, i):
      lab = np.full((20, 20), 65535, np.uint16)
      lab[:10] = 300 + i
      lab[10:, :5] = 846
      return {"image": np.zeros((20, 20, 3), np.uint8), "label": lab, "file_name": b"x"}

  pipe = train_pipe(Src(), train_aug=augment.TrainAugConfig(
      min_size_train=(20,), crop_size=(24, 24), max_targets=4, color_aug_ssd=False))
  b = next(pipe)
  assert pipe.ignore_label == 65535
  assert (b["sem_seg"][:, 20:] == 65535).all()  # padding
  for labels, valid in zip(b["labels"], b["valid"]):
    assert sorted(labels[valid].tolist())[-1] == 846 and 65535 not in labels.tolist()


def test_tfds_built_source_gives_the_same_batches(tmp_path):
  from san_jax.data import build
  assert build.main(["shapes", "--data_dir", str(tmp_path), "--image_size", "24,32", "--num_train", "6",
                     "--num_val", "2", "--seed", "3"]) == 0
  src = pipeline.load_source("shapes", "train", tmp_path, config="custom_24x32_n6_2_s3_all")
  assert src.class_names == shapes.class_names() and src.ignore_label == 255 and len(src) == 6
  from_disk = take(train_pipe(src), 4)
  in_memory = take(train_pipe(shapes.ShapesSource(6, seed=3, spec=SPEC)), 4)
  assert_batches_equal(from_disk, in_memory)


def test_shapes_vocabulary_split():
  names = shapes.class_names()
  unseen, seen = shapes.unseen_classes(), shapes.seen_classes()
  assert len(names) == len(set(names)) == len(shapes.COLORS) * len(shapes.SHAPES) == 48
  assert len(unseen) == 12 and set(unseen) | set(seen) == set(names) and not set(unseen) & set(seen)
  assert unseen == shapes.unseen_classes()  # deterministic
  for word in list(shapes.COLORS) + list(shapes.SHAPES):  # every word still seen in training
    assert any(word in n.split() for n in seen)
    assert sum(word in n.split() for n in unseen) >= 1
  assert shapes.captions()[names.index("red triangle")] == "a red triangle"
  # Restricting a split to the seen classes keeps unseen ones out of its labels.
  ids = shapes.class_ids(seen)
  src = shapes.ShapesSource(20, spec=shapes.ShapesSpec(image_size=(32, 32), classes=ids))
  present = set(np.unique(np.concatenate([src[i]["label"].ravel() for i in range(20)])).tolist())
  assert present - {255} <= set(ids)


def test_shapes_are_deterministic_and_aligned():
  a, b = shapes.render(5, seed=1), shapes.render(5, seed=1)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(shapes.render(5, seed=2)["image"], a["image"])
  ex = shapes.render(0, spec=shapes.ShapesSpec(image_size=(40, 56)))
  assert ex["image"].shape == (40, 56, 3) and ex["label"].shape == (40, 56)
  # Labelled pixels carry their class's colour (within the jitter and noise); background is unlabeled.
  lab, img = ex["label"], ex["image"].astype(int)
  names = shapes.all_classes()
  for c in set(np.unique(lab).tolist()) - {255}:
    mean = img[lab == c].mean(0)
    assert np.abs(mean - shapes.COLORS[names[c][0]]).max() < 45


def _global_batches(src, hosts: int, global_batch: int, steps: int, state=None):
  """The global batches of `steps` steps as `hosts` hosts feed them (host p's rows p*b..(p+1)*b-1)."""
  pipes = [train_pipe(src, batch_size=global_batch // hosts, process_index=p, process_count=hosts)
           for p in range(hosts)]
  if state is not None:
    for pipe in pipes:
      pipe.set_state(state)
  per_host = [take(pipe, steps) for pipe in pipes]
  merged = [{k: np.concatenate([per_host[p][s][k] for p in range(hosts)]) for k in per_host[0][s]}
            for s in range(steps)]
  return merged, pipes[0].get_state()


def test_global_batches_do_not_depend_on_the_number_of_hosts():
  # 10 examples, global batch 4: step 2 straddles the end of epoch 0, steps 3-5 are epoch 1's reshuffle.
  src = source(10)
  one, _ = _global_batches(src, 1, 4, 6)
  for hosts in (2, 4):
    many, _ = _global_batches(src, hosts, 4, 6)
    assert_batches_equal(many, one)
  # An example's draws depend on (seed, epoch, index) only: the same example in another epoch is cropped,
  # coloured or flipped differently (the scale list and flip give it few choices, so compare the pixels).
  idx = np.concatenate([b["index"] for b in one])
  first = {i: p for p, i in enumerate(idx[:10].tolist())}
  images = np.concatenate([b["image"] for b in one])
  assert sorted(first) == list(range(10)) and sorted(idx[10:20].tolist()) == list(range(10))
  assert any(not np.array_equal(images[first[i]], images[10 + p]) for p, i in enumerate(idx[10:20].tolist()))


def test_a_position_saved_on_four_hosts_resumes_on_two_and_one():
  src = source(10)
  want, _ = _global_batches(src, 1, 4, 7)
  _, state4 = _global_batches(src, 4, 4, 3)
  state4 = json.loads(json.dumps(state4))
  assert state4["batches"] == 3
  for hosts in (2, 1):
    got, _ = _global_batches(src, hosts, 4, 4, state=state4)
    assert_batches_equal(got, want[3:])

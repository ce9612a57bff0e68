"""The demo's CLIP pretraining: its losses against PyTorch, the region path against CLIP's own image
embedding, the patch bookkeeping against torch's adaptive max pooling, and a checkpoint SAN can start from."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from configs import demo_shapes
from san_jax.data import shapes
from san_jax.models import clip as clip_lib
from san_jax.models import san as san_lib
from san_jax.demo import clip_pretrain as cp
from san_jax.train import loop


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _torch_clip_loss(img, txt, labels, scale):
  """Symmetric InfoNCE with soft targets spread over same-label pairs (plain CLIP when labels are distinct)."""
  logits = scale * torch.from_numpy(img) @ torch.from_numpy(txt).T
  same = torch.from_numpy((labels[:, None] == labels[None, :]).astype(np.float32))
  i2t = F.cross_entropy(logits, same / same.sum(1, keepdim=True))
  t2i = F.cross_entropy(logits.T, same.T / same.T.sum(1, keepdim=True))
  return float(0.5 * (i2t + t2i))


@pytest.mark.parametrize("labels", [np.arange(6), np.array([0, 3, 3, 1, 0, 0])], ids=["distinct", "repeated"])
def test_contrastive_loss_matches_torch(labels):
  rng = np.random.default_rng(0)
  img = _unit(rng.normal(size=(6, 16))).astype(np.float32)
  txt = _unit(rng.normal(size=(6, 16))).astype(np.float32)
  loss, aux = cp.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(labels), jnp.log(jnp.float32(20.0)))
  assert float(loss) == pytest.approx(_torch_clip_loss(img, txt, labels, 20.0), rel=1e-5)
  if len(set(labels.tolist())) == len(labels):  # plain CLIP: torch's integer-target cross entropy
    logits = 20.0 * torch.from_numpy(img) @ torch.from_numpy(txt).T
    t = torch.arange(6)
    plain = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t))
    assert float(loss) == pytest.approx(float(plain), rel=1e-5)


def test_padding_pairs_take_no_part():
  rng = np.random.default_rng(1)
  img = _unit(rng.normal(size=(5, 8))).astype(np.float32)
  txt = _unit(rng.normal(size=(5, 8))).astype(np.float32)
  labels = np.array([0, 1, 2, 7, 7])
  valid = jnp.asarray([True, True, True, False, False])
  padded, _ = cp.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(labels), jnp.log(jnp.float32(10.0)),
                                  valid)
  assert float(padded) == pytest.approx(_torch_clip_loss(img[:3], txt[:3], labels[:3], 10.0), rel=1e-5)


def test_dense_loss_matches_torch():
  rng = np.random.default_rng(2)
  patches = _unit(rng.normal(size=(2, 9, 8))).astype(np.float32)
  text = _unit(rng.normal(size=(4, 8))).astype(np.float32)
  labels = np.array([[0, 1, -1, 3, 3, -1, -1, 2, 0], [-1] * 8 + [1]], np.int32)
  loss, acc = cp.dense_loss(jnp.asarray(patches), jnp.asarray(text), jnp.asarray(labels), jnp.log(jnp.float32(5.0)))
  keep = labels.reshape(-1) >= 0
  logits = 5.0 * torch.from_numpy(patches.reshape(-1, 8)[keep]) @ torch.from_numpy(text).T
  ref = F.cross_entropy(logits, torch.from_numpy(labels.reshape(-1)[keep]).long())
  assert float(loss) == pytest.approx(float(ref), rel=1e-5)
  assert float(acc) == pytest.approx(float((logits.argmax(1).numpy() == labels.reshape(-1)[keep]).mean()), abs=1e-6)


def _demo_clip():
  cfg = demo_shapes.get_config()
  clip_cfg = san_lib.config_from_dict(cfg.model.to_dict()).clip
  return cfg, clip_lib.CLIP(clip_cfg, rngs=nnx.Rngs(3))


def test_whole_image_region_is_clips_image_embedding():
  """A region that covers every patch: the class-token copy sees what the class token sees, so the region
  embedding is CLIP's own image embedding (SAN's recognition path with a mask of ones)."""
  cfg, model = _demo_clip()
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  regions = jnp.ones((2, 3, 8, 8), bool)
  emb = cp.region_embeddings(model, images, regions, cfg.model.feature_last_layer_idx)
  ref = model.encode_image(images, normalize=True)
  np.testing.assert_allclose(np.asarray(emb), np.broadcast_to(np.asarray(ref)[:, None], emb.shape), atol=2e-5)
  # A region of a few patches is a different view of the image.
  part = regions.at[:, :, 4:].set(False)
  assert np.abs(np.asarray(cp.region_embeddings(model, images, part, 3)) - np.asarray(emb)).max() > 1e-3


def test_region_coverage_is_torchs_adaptive_max_pool():
  """A patch belongs to a region when any pixel of it does: SAN's max-pooled attention bias (torch's
  adaptive_max_pool2d windows, which overlap when the sizes do not divide)."""
  label = shapes.render(3, spec=shapes.ShapesSpec(image_size=(50, 70), max_objects=4))["label"]
  ids = [int(c) for c in np.unique(label) if c != shapes.IGNORE_LABEL]
  for grid in [(8, 8), (7, 9), (5, 5)]:
    got = cp.region_coverage(label, ids, grid)
    masks = torch.from_numpy(np.stack([(label == c) for c in ids]).astype(np.float32))
    ref = F.adaptive_max_pool2d(masks[None], grid)[0].numpy() > 0
    np.testing.assert_array_equal(got, ref)


def test_patch_labels_take_the_majority_class_of_each_patch():
  rng = np.random.default_rng(4)
  label = rng.choice(np.array([0, 5, shapes.IGNORE_LABEL]), size=(16, 24), p=[0.5, 0.3, 0.2]).astype(np.uint8)
  label[:4, :6] = 5  # a patch covered by one class alone
  got = cp.patch_labels(label, (4, 4), min_cover=0.5)
  for i in range(4):
    for j in range(4):
      block = label[4 * i:4 * i + 4, 6 * j:6 * j + 6].reshape(-1)
      counts = {c: int((block == c).sum()) for c in (0, 5)}
      best = max(counts, key=counts.get)
      want = best if counts[best] / block.size >= 0.5 else -1
      assert got[i, j] == want, (i, j, counts)
  assert got[0, 0] == 5
  with pytest.raises(ValueError, match="not a multiple"):
    cp.patch_labels(label, (5, 4), 0.5)


def test_caption_tokens_refuse_captions_that_do_not_fit():
  tokens = cp.caption_tokens(["red circle", "blue star"], "vild", 16)
  assert tokens.shape == (14, 2, 16)
  with pytest.raises(ValueError, match="text_length"):
    cp.caption_tokens(["a very long class name with many many words in it"], "vild", 12)


def test_weight_decay_spares_gains_biases_embeddings_and_the_logit_scale():
  """The pretraining's no-decay patterns, through san_jax.train.optim's mask, on the demo CLIP's real tree:
  decayed are exactly the weight matrices (2-D or more) that are not embeddings."""
  from san_jax.train import optim
  _, model = _demo_clip()
  params = nnx.state(model, nnx.Param)
  mask = optim.decay_mask(cp.NO_DECAY_PATTERNS)(params)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  decayed = dict((optim.path_of(k), m) for k, m in jax.tree_util.tree_leaves_with_path(mask))
  assert len(decayed) == len(leaves)
  for k, v in leaves:
    path = optim.path_of(k)
    want = np.ndim(v) >= 2 and "embedding" not in str(path[-1])
    assert decayed[path] is want, path
  assert decayed[("logit_scale",)] is False and decayed[("text_projection",)] is True


def test_the_clip_sees_what_sans_clip_branch_sees():
  """clip_images against SAN's host preprocessing (numpy mean/std) and, at clip_resolution 0.5, torch's
  bilinear resize."""
  images = np.random.default_rng(5).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  full = san_lib.SANConfig(clip_resolution=1.0)
  want, _ = san_lib.preprocess(list(images), full, pad_to=(16, 16))
  # XLA may divide by the std as a multiply by its reciprocal: 1 ulp apart from numpy's division (measured
  # 1.2e-7 relative).
  np.testing.assert_allclose(np.asarray(cp.clip_images(jnp.asarray(images), full)), want, rtol=5e-7, atol=0)
  half = cp.clip_images(jnp.asarray(images), san_lib.SANConfig(clip_resolution=0.5))
  ref = F.interpolate(torch.from_numpy(want).permute(0, 3, 1, 2), scale_factor=0.5, mode="bilinear",
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(half), ref, atol=1e-5)


def test_class_embeddings_are_the_template_mean_of_the_caption_embeddings():
  """Pretrainer.class_embeddings (the text tower's, as SAN's classifier, on the trainer's compact token
  table) against a numpy mean of each caption's own embedding by the same CLIP with its whole vocabulary."""
  cfg = demo_shapes.get_config()
  san_cfg = san_lib.config_from_dict(cfg.model.to_dict())
  bank = cp.caption_tokens(["red circle", "blue star", "green square"], "vild", 16)
  trainer = cp.Pretrainer(san_cfg, cp.PretrainConfig(steps=2), bank)
  assert trainer.params["token_embedding"]["embedding"].shape == (len(np.unique(bank)), 64)
  model = clip_lib.CLIP(san_cfg.clip, rngs=nnx.Rngs(0))  # the trainer's seed: the same initial CLIP
  per_caption = np.stack([np.asarray(model.encode_text(jnp.asarray(t), normalize=True)) for t in bank])
  want = _unit(per_caption.mean(0))
  np.testing.assert_allclose(np.asarray(trainer.class_embeddings()), want, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(trainer.class_embeddings(bank[:, :2])), np.asarray(trainer.class_embeddings())[:2])
  unknown = int(np.setdiff1d(np.arange(1000, 2000), bank)[0])
  with pytest.raises(ValueError, match=rf"token ids \[{unknown}\] are not in the pretraining captions' vocabulary "
                                       rf"\({len(np.unique(bank))} ids\)"):
    trainer.class_embeddings(np.array([[[49406, unknown, 49407]]]))


def test_training_only_the_captions_token_rows_is_training_the_whole_table():
  """Three steps with the compact token table against the same steps with CLIP's whole 49,408-row table (a
  trainer whose vocabulary is every id): the rows no caption uses stay their initial values exactly, the
  rest agree within float32 rounding (the global gradient norm sums the same squares in another order)."""
  cfg = demo_shapes.get_config()
  san_cfg = san_lib.config_from_dict(cfg.model.to_dict())
  pc = cp.PretrainConfig(steps=3, batch_size=4, num_images=8, mode="regions", max_regions=3, dense_weight=1.0,
                         image_size=64, min_radius=0.15, max_radius=0.3, rotate=False)
  bank = cp.caption_tokens(shapes.class_names(), "vild", 16)
  compact = cp.Pretrainer(san_cfg, pc, bank)
  whole = cp.Pretrainer(san_cfg, pc, np.arange(san_cfg.clip.text.vocab_size))
  whole.bank = whole.compact_tokens(bank)  # every id is its own row: the captions as they are
  assert whole.params["token_embedding"]["embedding"].shape == (49408, 64)
  pool = cp.ExamplePool(pc, 48, cp.clip_grid(pc, san_cfg.clip, 1.0), background=False)
  rng = np.random.default_rng(0)
  for step in range(3):
    batch = [jnp.asarray(x) for x in pool.sample(rng, pc.batch_size)]
    m_c = compact.step(*batch, jax.random.key(step))
    m_w = whole.step(*batch, jax.random.key(step))
    np.testing.assert_allclose(float(m_c["loss"]), float(m_w["loss"]), rtol=1e-6)
  got, want = compact.flat_params(), whole.flat_params()
  assert set(got) == set(want)
  table = ("token_embedding", "embedding")
  unused = np.setdiff1d(np.arange(49408), np.unique(bank))
  init = np.asarray(clip_lib.CLIP(san_cfg.clip, rngs=nnx.Rngs(pc.seed)).token_embedding.embedding[...])
  np.testing.assert_array_equal(got[table][unused], init[unused])
  np.testing.assert_array_equal(want[table][unused], init[unused])
  assert not np.array_equal(got[table][np.unique(bank)], init[np.unique(bank)])  # the used rows did train
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=str(k))


def test_pretrained_checkpoint_initialises_san(tmp_path):
  """A few steps write a CLIP checkpoint whose leaves fill every CLIP parameter of the demo's SAN."""
  cfg = demo_shapes.get_config()
  cfg.clip_pretrain.steps = 2
  cfg.clip_pretrain.batch_size = 8
  cfg.clip_pretrain.num_images = 32
  cfg.clip_pretrain.num_eval = 48
  cfg.clip_pretrain.log_every = 1
  summary = cp.pretrain(cfg, str(tmp_path / "clip"), log=lambda s: None, metrics_path=str(tmp_path / "m.jsonl"))
  assert summary["steps"] == 2 and np.isfinite(summary["final"]["loss"])
  for key in ("regions_acc", "regions_acc_seen", "regions_acc_unseen", "single_acc"):
    assert 0.0 <= summary[key] <= 1.0
  flat = loop._load_init_params(str(tmp_path / "clip"))  # pylint: disable=protected-access
  from san_jax.models import params as params_lib
  from san_jax import pretrained
  model = pretrained.random_model(cfg.model)
  san_flat = params_lib.flat_params(model)
  clip_paths = {p for p in san_flat if p[0] == "clip_visual" or (p[0] == "ov_classifier" and p[1] != "bg_embed")}
  assert clip_paths and clip_paths <= set(flat), sorted(clip_paths - set(flat))[:5]
  for p, v in flat.items():
    assert san_flat[p].shape == v.shape, p
  assert float(np.exp(flat[("ov_classifier", "logit_scale")])) <= 100.0 + 1e-3
  # The batches depend on the seed alone (not on how far the background renderer got): a second run
  # trains to the same parameters.
  cp.pretrain(cfg, str(tmp_path / "again"), log=lambda s: None)
  again = loop._load_init_params(str(tmp_path / "again"))  # pylint: disable=protected-access
  for p, v in flat.items():
    np.testing.assert_array_equal(np.asarray(again[p]), np.asarray(v), err_msg=str(p))

"""san_jax.pretrained.load from each source: an official .pth (golden case), a converted parameters
checkpoint, a training run, and a model name through a Hugging Face Hub cache the test builds (offline;
connecting anywhere fails the test). Plus the errors for the wrong kind and for another geometry."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from san_jax import checkpoint, pretrained
from san_jax.models import params as params_lib
from san_jax.models import san as san_lib
from tests.conftest import REFERENCE, case_dir


def _flat(model):
  return {p: np.asarray(v) for p, v in params_lib.flat_params(model).items()}


def test_official_pth_of_the_golden_case_gives_the_official_semantic_maps():
  """The reference is the official PyTorch SAN's output stored in the case (outputs.npz), for the case's
  batch of two images (padded together to 320 x 352). Tolerance: DESIGN §4's 2e-4 x max|ref| (float32
  reordering noise of a whole forward pass; measured here: about 1e-5 against a tolerance of 1e-3)."""
  case = case_dir("tiny_b16")
  p = pretrained.load(str(case / "model.pth"))
  assert p.kind == "pth" and p.config.side.width == 48 and p.meta.get("num_classes") == 6
  meta = json.loads((case / "case.json").read_text())
  inputs, outputs = np.load(case / "inputs.npz"), np.load(case / "outputs.npz")
  images = [inputs[f"image_{i}_uint8_hwc"] for i in range(2)]
  batch, sizes = san_lib.preprocess(images, p.config)
  emb = p.segmenter().class_embeddings(meta["vocabulary"])
  out = jax.jit(lambda x, e: p.model(x, e))(batch, emb)
  for i in range(2):
    probs = np.asarray(san_lib.semantic_inference(out["mask_logits"][i, -1], out["mask_preds"][i, -1], batch.shape[1:3],
                                                  tuple(sizes[i]), tuple(int(v) for v in inputs[f"image_{i}_output_size_hw"])))
    ref = outputs[f"sem_seg_{i}"]
    assert probs.shape == ref.shape
    assert np.abs(probs - ref).max() <= 2e-4 * np.abs(ref).max()
    assert (probs.argmax(0) == outputs[f"sem_seg_argmax_{i}"]).mean() >= 0.999


def test_converted_params_checkpoint_round_trips_and_checks_geometry(tmp_path):
  flat, san_config = pretrained.quick_random_params(tiny.get_config().model, seed=3)
  path = checkpoint.save_params(tmp_path / "p", flat, {"san_config": san_config})
  p = pretrained.load(path, kind="params")
  got = _flat(p.model)
  assert set(got) == set(flat) and all(np.array_equal(got[k], flat[k]) for k in flat)
  other = tiny.get_config().model
  other.side.width, other.side.num_queries = 96, 12
  with pytest.raises(pretrained.PretrainedError, match=r"side\.width: config 96, checkpoint 48") as e:
    pretrained.load(path, config=other)
  assert "side.num_queries: config 12, checkpoint 8" in str(e.value)
  with pytest.raises(pretrained.PretrainedError, match="a parameters checkpoint, not a training run"):
    pretrained.load(path, kind="workdir")
  clip = checkpoint.save_params(tmp_path / "clip", {("logit_scale",): np.zeros(())}, {"clip_config": {}})
  with pytest.raises(pretrained.PretrainedError, match="CLIP checkpoint"):
    pretrained.load(clip)


@pytest.mark.slow
def test_training_run_gives_the_trainers_own_model(tiny_run):
  """The reference is the training code's own route to the model (steps.Trainer.init with the run's seed,
  TrainCheckpoints.restore of the step, Trainer.model): identical parameters, bit for bit."""
  from san_jax.train import sharding, steps
  cfg = pretrained.run_config(str(tiny_run))
  mesh = sharding.make_mesh(cfg.mesh.shape.to_dict(), jax.devices()[:1])
  tr = steps.Trainer(san_lib.config_from_dict(cfg.model.to_dict()), cfg.train, mesh,
                     [tuple(r) for r in cfg.mesh.rules], num_classes=1)
  state, frozen = tr.init(jax.random.key(cfg.train.seed))
  ck = checkpoint.TrainCheckpoints(Path(tiny_run) / "checkpoints")
  for step in (1, None):  # a given step, then the latest (2)
    restored, _ = ck.restore(step or 2, state)
    want = _flat(tr.model(restored, frozen))
    p = pretrained.load(str(tiny_run), step=step)
    assert p.kind == "workdir" and p.step == (step or 2)
    got = _flat(p.model)
    assert set(got) == set(want)
    assert all(np.array_equal(got[k], want[k]) for k in want), [k for k in want if not np.array_equal(got[k], want[k])][:3]
  ck.close()
  with pytest.raises(pretrained.PretrainedError, match="no step 7; saved steps: \\[1, 2\\]"):
    pretrained.load(str(tiny_run), step=7)
  with pytest.raises(pretrained.PretrainedError, match="train-state checkpoints.*--workdir"):
    pretrained.load(str(Path(tiny_run) / "checkpoints" / "2"))
  with pytest.raises(pretrained.PretrainedError, match="a training run directory, not a parameters checkpoint"):
    pretrained.load(str(tiny_run), kind="params")


@pytest.mark.slow
def test_a_damaged_latest_step_falls_back_to_the_one_before_and_is_kept(tiny_run, tmp_path, caplog):
  import shutil
  run = tmp_path / "run"
  shutil.copytree(tiny_run, run)
  for root, _, files in os.walk(run / "checkpoints" / "2" / "state"):  # damage every data file of step 2
    for f in files:
      if f.startswith("d") or "ocdbt" in root:
        Path(root, f).write_bytes(b"garbage")
  want = _flat(pretrained.load(str(tiny_run), step=1).model)
  p = pretrained.load(str(run))
  assert p.step == 1 and all(np.array_equal(v, want[k]) for k, v in _flat(p.model).items())
  assert any("step 2" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
  assert (run / "checkpoints" / "2").is_dir()  # never deleted
  with pytest.raises(pretrained.PretrainedError, match="step 2 is unreadable"):
    pretrained.load(str(run), step=2)


@pytest.mark.slow
def test_a_run_whose_frozen_weights_are_missing_names_init_from(tiny_run, tmp_path):
  import json
  import shutil
  run = tmp_path / "run"
  shutil.copytree(tiny_run, run)
  cfg = json.loads((run / "config.json").read_text())
  cfg["train"]["init_from"] = "runs/no_such/clip"  # relative: read from the current directory
  (run / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(pretrained.PretrainedError, match=r"train.init_from='runs/no_such/clip': no checkpoint "
                                                       r"directory at .*runs/no_such/clip \(a relative path"):
    pretrained.load(str(run))


def test_geometry_inferred_from_keys_is_the_official_one_for_both_real_checkpoints():
  """The official configs are the reference; the key layout comes from the manifests of the real files."""
  from convert import san_checkpoint as sc
  for fname, name in (("san_vit_b_16.json", "san_vit_b16"), ("san_vit_large_14.json", "san_vit_l14")):
    path = REFERENCE / "manifests" / fname
    if not path.exists():
      pytest.skip(f"{path} not found")
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s, _ in json.loads(path.read_text())["state_dict"]}
    assert pretrained.geometry_differences(san_lib.san_config(name), sc.config_from_weights(sd, sc.default_config_for(sd))) == {}


def _small_b16_geometry():
  """A small SAN that shares everything the keys cannot tell with the official B/16 (head counts, the CLIP
  layers feeding side blocks 0..3, deep supervision after blocks 7 and 8, CLIP resolution)."""
  b16 = san_lib.san_config("san_vit_b16")
  clip = dataclasses.replace(b16.clip, vision=dataclasses.replace(b16.clip.vision, image_size=64, width=96, layers=10,
                                                                   output_dim=32),
                             text=dataclasses.replace(b16.clip.text, width=32, layers=1, output_dim=32))
  side = dataclasses.replace(b16.side, image_size=128, width=48, num_queries=5, clip_width=96, attn_bias_embed=16,
                             attn_bias_mlp=16)
  return dataclasses.replace(b16, clip=clip, side=side)


def _hub_cache(root: Path, filename: str, payload: bytes, repo_id: str = "Mendel192/san",
               revision: str = "0123456789abcdef0123456789abcdef01234567"):
  """The layout huggingface_hub writes: blobs/<sha256>, snapshots/<rev>/<file> -> ../../blobs/<sha256>,
  refs/main = <rev>."""
  repo = root / f"models--{repo_id.replace('/', '--')}"
  sha = hashlib.sha256(payload).hexdigest()
  (repo / "blobs").mkdir(parents=True, exist_ok=True)
  (repo / "blobs" / sha).write_bytes(payload)
  (repo / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
  os.symlink(f"../../blobs/{sha}", repo / "snapshots" / revision / filename)
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / "main").write_text(revision)


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"a test tried to connect to {args[1:] or kwargs}")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_model_name_through_a_test_made_hub_cache_offline(tmp_path, monkeypatch, no_network):
  import torch
  from convert import san_checkpoint as sc
  cfg = _small_b16_geometry()
  flat, _ = pretrained.quick_random_params(san_lib.config_to_dict(cfg), seed=5)
  sd = sc.flat_to_official(flat, cfg, num_classes=171)
  pth = tmp_path / "src.pth"
  torch.save({"model": {k: torch.from_numpy(np.require(v, requirements="C")) for k, v in sd.items()}}, pth)
  _hub_cache(tmp_path / "hub", "san_vit_b_16.pth", pth.read_bytes())
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

  p = pretrained.load("san_vit_b16")
  assert p.kind == "name" and pretrained.geometry_differences(cfg, p.config) == {}  # geometry from the keys
  got = _flat(p.model)
  assert set(got) == set(flat) and all(np.array_equal(got[k], flat[k]) for k in flat)
  converted = Path(p.meta["converted"])
  assert converted.is_dir() and converted.parent.parent == tmp_path / "hub" / "san_jax"
  # converted once: a second load reads the cached conversion, never the .pth
  monkeypatch.setattr(sc, "load_torch_state_dict", lambda *_: pytest.fail("converted again"))
  again = _flat(pretrained.load("san_vit_b16").model)
  assert all(np.array_equal(again[k], flat[k]) for k in flat)
  # the other name is not in the cache: one error naming the file and where it goes
  with pytest.raises(pretrained.PretrainedError) as e:
    pretrained.load("san_vit_l14")
  msg = str(e.value)
  assert "san_vit_large_14.pth" in msg and str(tmp_path / "hub" / "models--Mendel192--san") in msg
  assert "Mendel192/san" in msg


def test_init_from_accepts_a_model_name(tmp_path, monkeypatch, no_network):
  """train.init_from = san_vit_b16 resolves through the same cache (the loop's params-only init)."""
  from san_jax.train import loop
  flat, san_config = pretrained.quick_random_params(san_lib.config_to_dict(_small_b16_geometry()), seed=1)
  monkeypatch.setattr(pretrained, "resolve_name", lambda name: checkpoint.save_params(
      tmp_path / name, flat, {"san_config": san_config}))
  got = loop.load_init_params("san_vit_b16")
  assert set(got) == set(flat) and all(np.array_equal(got[k], flat[k]) for k in flat)


def test_init_from_a_clip_by_hugging_face_id_or_open_clip_name_through_the_hub_cache(tmp_path, monkeypatch, no_network):
  """train.init_from = "org/name" (a Hugging Face CLIPModel: config.json + model.safetensors in the Hub
  cache the test builds, written by the HF exporter) sets SAN's CLIP image and text towers."""
  from flax import nnx
  from convert import clip_checkpoint as cc
  from san_jax.models import clip as clip_lib
  from san_jax.train import loop
  ccfg = san_lib.config_from_dict(tiny.get_config().model.to_dict()).clip
  flat = _flat(clip_lib.CLIP(ccfg, rngs=nnx.Rngs(4)))
  cc.save_torch_state_dict(cc.nnx_to_hf(flat, ccfg), tmp_path / "model.safetensors")
  _hub_cache(tmp_path / "hub", "model.safetensors", (tmp_path / "model.safetensors").read_bytes(), "someorg/tiny-clip")
  _hub_cache(tmp_path / "hub", "config.json", json.dumps(cc.hf_config_dict(ccfg)).encode(), "someorg/tiny-clip")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  got = loop.load_init_params("someorg/tiny-clip")
  np.testing.assert_array_equal(got[("clip_visual", "conv1", "kernel")], flat[("visual", "conv1", "kernel")])
  np.testing.assert_array_equal(got[("ov_classifier", "token_embedding", "embedding")],
                                flat[("token_embedding", "embedding")])
  assert len(got) == len(flat)
  with pytest.raises(pretrained.PretrainedError, match="nor is there a local checkpoint"):
    loop.load_init_params("someorg/not-there")
  # by open_clip name: the open_clip state dict in the repository open_clip downloads "ViT-B-16/openai" from
  # (open_clip files carry no config: heads follow OpenAI's width // 64, so this CLIP has 64-wide heads)
  ocfg = dataclasses.replace(ccfg, vision=dataclasses.replace(ccfg.vision, width=128, heads=2, layers=1),
                             text=dataclasses.replace(ccfg.text, width=64, heads=1, layers=1, output_dim=32))
  oflat = _flat(clip_lib.CLIP(ocfg, rngs=nnx.Rngs(5)))
  repo, filename = pretrained.CLIP_NAMES["ViT-B-16/openai"]
  cc.save_torch_state_dict(cc.nnx_to_open_clip(oflat, ocfg), tmp_path / filename)
  _hub_cache(tmp_path / "hub", filename, (tmp_path / filename).read_bytes(), repo)
  got = loop.load_init_params("ViT-B-16/openai")
  np.testing.assert_array_equal(got[("clip_visual", "conv1", "kernel")], oflat[("visual", "conv1", "kernel")])
  assert len(got) == len(oflat)

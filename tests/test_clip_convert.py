"""CLIP checkpoint conversion: round trips, file containers, orbax params checkpoints, strict errors."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from flax import nnx

from convert import clip_checkpoint as cc
from convert.mapping import ConversionError
from san_jax import checkpoint
from san_jax.models import clip
from tests import torch_refs

oc = torch_refs.open_clip()
import transformers  # noqa: E402  (after the torchvision stand-in decision, see torch_refs)

TINY_OPEN_CLIP = dict(embed_dim=24, quick_gelu=True,
                      vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=2, head_width=64),
                      text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=1, layers=1))
TINY_HF = dict(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                vocab_size=100, max_position_embeddings=16, hidden_act="quick_gelu",
                                eos_token_id=99, bos_token_id=98, pad_token_id=1),
               vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=3,
                                  image_size=32, patch_size=8, hidden_act="quick_gelu"),
               projection_dim=24)


def _randomise_(model: torch.nn.Module) -> torch.nn.Module:
  """Distinct values everywhere (no zero biases, no unit LayerNorms), so a swapped entry cannot pass."""
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g))
  return model


def numpy_sd(model: torch.nn.Module):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def assert_same_state_dict(got, want):
  assert list(got) == list(want) or set(got) == set(want), set(got) ^ set(want)
  for k in want:
    a, b = np.asarray(got[k]), np.asarray(want[k])
    assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, a.dtype, b.shape, b.dtype)
    assert a.tobytes() == b.tobytes(), f"{k} differs"


@pytest.fixture(scope="module")
def open_clip_model():
  return _randomise_(oc.CLIP(**TINY_OPEN_CLIP)).eval()


@pytest.fixture(scope="module")
def hf_model():
  return _randomise_(transformers.CLIPModel(transformers.CLIPConfig(**TINY_HF))).eval()


# ---- round trips ---------------------------------------------------------------------------------------
def test_open_clip_round_trip(open_clip_model):
  sd = numpy_sd(open_clip_model)
  flat, cfg = cc.open_clip_to_nnx(sd)
  assert cfg == clip.clip_config_from_open_clip(TINY_OPEN_CLIP)
  assert set(flat) == set(cc.model_shapes(cfg))
  assert_same_state_dict(cc.nnx_to_open_clip(flat, cfg), sd)


def test_hf_round_trip(hf_model):
  sd = numpy_sd(hf_model)
  flat, cfg = cc.hf_to_nnx(sd, hf_config=hf_model.config.to_dict())
  assert (cfg.vision.heads, cfg.text.heads, cfg.vision.width, cfg.text.width) == (3, 2, 48, 32)
  assert_same_state_dict(cc.nnx_to_hf(flat, cfg), sd)
  # Older files carry the position_ids buffers: accounted for, and reproduced on request.
  legacy = cc.nnx_to_hf(flat, cfg, position_ids=True)
  flat2, _ = cc.hf_to_nnx(legacy, hf_config=hf_model.config.to_dict())
  assert_same_state_dict(cc.nnx_to_hf(flat2, cfg, position_ids=True), legacy)
  legacy["text_model.embeddings.position_ids"] = legacy["text_model.embeddings.position_ids"][:, ::-1].copy()
  with pytest.raises(ConversionError, match="text_model.embeddings.position_ids"):
    cc.hf_to_nnx(legacy, hf_config=hf_model.config.to_dict())


def test_open_clip_and_hf_tables_agree(open_clip_model):
  """open_clip -> NNX -> HF loads strictly into transformers' CLIPModel and comes back unchanged."""
  flat, cfg = cc.open_clip_to_nnx(numpy_sd(open_clip_model))
  hf = transformers.CLIPModel(transformers.CLIPConfig(**{k: v for k, v in cc.hf_config_dict(cfg).items()
                                                          if k not in ("architectures", "model_type")}))
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in cc.nnx_to_hf(flat, cfg).items()}, strict=True)
  flat2, cfg2 = cc.hf_to_nnx(numpy_sd(hf), hf_config=hf.config.to_dict())
  assert cfg2 == cfg
  assert all(np.array_equal(flat2[p], flat[p]) for p in flat)


# ---- files and the command line -------------------------------------------------------------------------
def test_cli_open_clip_file_round_trip(open_clip_model, tmp_path):
  sd = open_clip_model.state_dict()
  src = tmp_path / "clip.pt"
  # A training checkpoint: nested under "state_dict", saved from DistributedDataParallel.
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, src)
  assert cc.main([str(src), str(tmp_path / "ckpt")]) == 0
  flat, cfg_dict = checkpoint.restore_params(tmp_path / "ckpt")
  assert cc.config_from_dict(cfg_dict) == clip.clip_config_from_open_clip(TINY_OPEN_CLIP)
  assert os.path.isfile(tmp_path / "ckpt" / "config.json")
  assert cc.main([str(tmp_path / "ckpt"), str(tmp_path / "back.pth"), "--to_torch"]) == 0
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  assert_same_state_dict({k: v.numpy() for k, v in back.items()}, {k: v.numpy() for k, v in sd.items()})


def test_cli_hf_round_trip(hf_model, tmp_path):
  hf_model.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors
  assert cc.main([str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--format", "hf"]) == 0
  assert cc.main([str(tmp_path / "ckpt"), str(tmp_path / "back.safetensors"), "--to_hf"]) == 0
  sd, info = cc.read_checkpoint(str(tmp_path / "back.safetensors"))
  assert info["container"] == "safetensors"
  assert_same_state_dict(sd, numpy_sd(hf_model))
  # A directory output is an HF model directory.
  assert cc.main([str(tmp_path / "ckpt"), str(tmp_path / "hf_back"), "--to_hf"]) == 0
  again = transformers.CLIPModel.from_pretrained(tmp_path / "hf_back")
  assert_same_state_dict(numpy_sd(again), numpy_sd(hf_model))


def _openai_archive(model_cfg: dict, path, input_resolution: int):
  """An OpenAI-style TorchScript archive: the scripted model plus OpenAI's three scalar buffers."""
  model = _randomise_(oc.CLIP(**model_cfg)).eval()
  del model.context_length, model.vocab_size  # plain ints on open_clip's CLIP; buffers in OpenAI's archives
  text = model_cfg["text_cfg"]
  model.register_buffer("input_resolution", torch.tensor(input_resolution))
  model.register_buffer("context_length", torch.tensor(text["context_length"]))
  model.register_buffer("vocab_size", torch.tensor(text["vocab_size"]))
  torch.jit.script(model).save(str(path))
  return model


def test_openai_torchscript_archive(tmp_path):
  model = _openai_archive(TINY_OPEN_CLIP, tmp_path / "ViT-tiny.pt", 32)
  sd, info = cc.read_checkpoint(str(tmp_path / "ViT-tiny.pt"))
  assert info["container"] == "torchscript"
  assert {"input_resolution", "context_length", "vocab_size"} <= set(sd)
  flat, cfg, fmt = cc.load_clip_checkpoint(str(tmp_path / "ViT-tiny.pt"))
  assert fmt == "open_clip" and cfg == clip.clip_config_from_open_clip(TINY_OPEN_CLIP)
  params = {k: v for k, v in numpy_sd(model).items() if k not in cc.OPENAI_METADATA_KEYS}
  assert_same_state_dict(cc.nnx_to_open_clip(flat, cfg), params)

  _openai_archive(TINY_OPEN_CLIP, tmp_path / "bad.pt", 48)
  with pytest.raises(ConversionError, match=r"input_resolution=48 but the weights imply 32"):
    cc.load_clip_checkpoint(str(tmp_path / "bad.pt"))


# ---- orbax params checkpoints --------------------------------------------------------------------------
def test_save_restore_params(tmp_path):
  flat = {("visual", "transformer", "resblocks", 0, "attn", "q_proj", "kernel"): np.arange(6, dtype=np.float32).reshape(2, 3),
          ("visual", "transformer", "resblocks", 11, "ln_1", "scale"): np.ones(3, np.float32),
          ("logit_scale",): np.asarray(4.6, np.float32),
          ("token_embedding", "embedding"): np.arange(4, dtype=np.float16),
          ("counts",): np.arange(5, dtype=np.int32)}
  config = {"vision": {"width": 3}, "quick_gelu": True, "chunk": None}
  checkpoint.save_params(tmp_path / "p", flat, config)
  got, cfg = checkpoint.restore_params(tmp_path / "p")
  assert cfg == config and set(got) == set(flat)
  for k in flat:
    assert got[k].dtype == flat[k].dtype and got[k].tobytes() == flat[k].tobytes(), k
  with pytest.raises(Exception, match="exist"):  # never silently overwritten
    checkpoint.save_params(tmp_path / "p", flat, config)
  checkpoint.save_params(tmp_path / "p", {("a",): np.zeros(2, np.float32)}, None, force=True)
  assert set(checkpoint.restore_params(tmp_path / "p")[0]) == {("a",)}
  with pytest.raises(ValueError, match="digit"):
    checkpoint.save_params(tmp_path / "q", {("layers", "0"): np.zeros(1)})


def test_save_restore_nnx_state(tmp_path):
  """An nnx.State goes in as is; list indices come back as ints, so the paths match the module's."""
  blocks = clip.Transformer(8, 2, 2, 4.0, True, rngs=nnx.Rngs(0))
  state = nnx.state(blocks, nnx.Param)
  checkpoint.save_params(tmp_path / "s", state)
  flat, cfg = checkpoint.restore_params(tmp_path / "s")
  assert cfg == {}
  want = checkpoint.flatten(state)
  assert ("resblocks", 1, "attn", "q_proj", "kernel") in flat
  assert set(flat) == set(want) and all(np.array_equal(flat[p], np.asarray(want[p])) for p in want)


# ---- errors --------------------------------------------------------------------------------------------
def _error(fn, *args, **kwargs) -> str:
  with pytest.raises(ConversionError) as info:
    fn(*args, **kwargs)
  return str(info.value)


def test_errors_name_missing_extra_and_misshaped_keys(open_clip_model, hf_model):
  sd = numpy_sd(open_clip_model)
  gone = "visual.transformer.resblocks.1.ln_2.bias"
  msg = _error(cc.open_clip_to_nnx, {k: v for k, v in sd.items() if k != gone})
  assert re.search(r"missing keys \(1\): " + re.escape(gone), msg)

  msg = _error(cc.open_clip_to_nnx, {**sd, "visual.extra.weight": np.zeros(3, np.float32)})
  assert re.search(r"unexpected keys \(1\): visual\.extra\.weight", msg)

  bad = "visual.transformer.resblocks.0.attn.out_proj.weight"
  msg = _error(cc.open_clip_to_nnx, {**sd, bad: np.zeros((128, 64), np.float32)})
  assert "wrong shapes" in msg and bad in msg and "(128, 128)" in msg

  hsd = numpy_sd(hf_model)
  gone = "text_model.encoder.layers.1.self_attn.k_proj.bias"
  extra = "vision_model.encoder.layers.0.self_attn.qkv.weight"
  msg = _error(cc.hf_to_nnx, {**{k: v for k, v in hsd.items() if k != gone}, extra: np.zeros(1, np.float32)},
               hf_config=hf_model.config.to_dict())
  assert gone in msg and extra in msg

  msg = _error(cc.convert_state_dict, sd, "hf")  # the wrong format forced: its keys are named
  assert "vision_model.embeddings.patch_embedding.weight" in msg


def test_errors_name_wrong_architectures():
  resnet = oc.CLIP(embed_dim=16, vision_cfg=dict(layers=[1, 1, 1, 1], width=8, image_size=32),
                   text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=1, layers=1))
  msg = _error(cc.convert_state_dict, numpy_sd(resnet))
  assert "wrong architecture" in msg and "ResNet CLIP" in msg and "visual.attnpool." in msg

  siglip = transformers.SiglipModel(transformers.SiglipConfig(
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=50, max_position_embeddings=8),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=32, patch_size=8)))
  msg = _error(cc.convert_state_dict, numpy_sd(siglip))
  assert "wrong architecture" in msg and "SigLIP" in msg and "logit_bias" in msg

  msg = _error(cc.convert_state_dict, {"backbone.conv.weight": np.zeros(1, np.float32)})
  assert "wrong architecture" in msg and "backbone.conv.weight" in msg

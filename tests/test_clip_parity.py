"""Parity of the NNX CLIP with open_clip's CLIP and transformers' CLIPModel (random weights, float32).

The weights reach JAX through the converters under test (convert/clip_checkpoint.py). Checked: every tap
(after ln_pre and after each block), the image embedding and the text embedding, at the real ViT-B/16
geometry (224x224, and 320x480, where the positional embedding is resized bicubically) and at a small
custom geometry with a non-64 head width and an input the patch conv does not divide; and one block with
a per-head additive attention bias against torch's nn.MultiheadAttention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from convert import clip_checkpoint as cc
from convert.mapping import torch_to_nnx
from san_jax.models import clip
from san_jax.models.params import load_flat_params, param_shapes
from tests import torch_refs

oc = torch_refs.open_clip()
import transformers  # noqa: E402  (after the torchvision stand-in decision, see torch_refs)

TOL = 1e-4
BLOCK_TOL = 1e-5

# A small geometry exercising what B/16 does not: 3 heads of width 32 (HF config), mlp ratio 2,
# an 8x8 pretraining grid, a 12-token context.
SMALL_OPEN_CLIP = dict(embed_dim=40, quick_gelu=True,
                       vision_cfg=dict(image_size=64, patch_size=8, width=128, layers=3, head_width=64, mlp_ratio=2.0),
                       text_cfg=dict(context_length=12, vocab_size=300, width=128, heads=2, layers=2))
SMALL_HF_TEXT = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=3, vocab_size=300,
                     max_position_embeddings=12, hidden_act="quick_gelu", eos_token_id=299, bos_token_id=298,
                     pad_token_id=1)
SMALL_HF_VISION = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=3,
                       image_size=64, patch_size=8, hidden_act="quick_gelu")


# ---- helpers ---------------------------------------------------------------------------------------------
def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Random inits leave LayerNorms at (1, 0) and biases at 0: move them so every parameter matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name.endswith("bias"):
        p.copy_(0.05 * noise)
      elif p.ndim == 1 and ("ln" in name or "norm" in name):
        p.copy_(1.0 + 0.2 * noise)
  return model.eval()


def numpy_sd(model: torch.nn.Module):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def build_jax(cfg: clip.CLIPConfig, flat):
  """CLIP(cfg) holding `flat`, built without a random init, split for jit."""
  model = nnx.eval_shape(lambda: clip.CLIP(cfg, rngs=nnx.Rngs(0)))
  assert set(param_shapes(model)) == set(flat)
  load_flat_params(model, flat)
  return nnx.split(model)


# The graphdef is a static argument: models of the same config share the compiled function.
@functools.partial(jax.jit, static_argnums=0)
def _jax_image(graphdef, state, images):
  return nnx.merge(graphdef, state).visual(images)


@functools.partial(jax.jit, static_argnums=0)
def _jax_text(graphdef, state, tokens):
  return nnx.merge(graphdef, state).encode_text(tokens)


def jax_image(split, images_nchw: torch.Tensor):
  emb, taps = _jax_image(*split, jnp.asarray(images_nchw.permute(0, 2, 3, 1).numpy()))
  return np.asarray(emb), [np.asarray(taps[i]) for i in sorted(taps)]


def jax_text(split, tokens: torch.Tensor):
  return np.asarray(_jax_text(*split, jnp.asarray(tokens.numpy(), jnp.int32)))


def resize_pos_embed_torch(pos: torch.Tensor, grid_hw) -> torch.Tensor:
  """SAN's resize: the class row kept, the grid part F.interpolate(bicubic, align_corners=False) to grid_hw."""
  g = int(round((pos.shape[0] - 1) ** 0.5))
  grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=tuple(grid_hw), mode="bicubic", align_corners=False)
  return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(grid_hw[0] * grid_hw[1], -1)], dim=0)


@torch.no_grad()
def open_clip_image_ref(model, images: torch.Tensor):
  """open_clip's image tower run step by step, with the positional embedding resized as SAN does."""
  v = model.visual
  x = v.conv1(images)
  b, w, gh, gw = x.shape
  x = x.reshape(b, w, gh * gw).permute(0, 2, 1)
  x = torch.cat([v.class_embedding.expand(b, 1, w), x], dim=1)
  x = v.ln_pre(x + resize_pos_embed_torch(v.positional_embedding, (gh, gw)))
  taps = [x]
  for blk in v.transformer.resblocks:
    x = blk(x)
    taps.append(x)
  emb = v.ln_post(x[:, 0]) @ v.proj
  return emb.numpy(), [t.numpy() for t in taps]


@torch.no_grad()
def hf_image_ref(model, images: torch.Tensor):
  """HF's vision tower; its interpolate_pos_encoding is SAN's resize (size=grid, bicubic, align_corners=False)."""
  out = model.vision_model(pixel_values=images, interpolate_pos_encoding=True, output_hidden_states=True)
  emb = model.visual_projection(out.pooler_output)
  return emb.numpy(), [h.numpy() for h in out.hidden_states]


def random_tokens(batch: int, context: int, vocab: int, seed: int) -> torch.Tensor:
  """SOT, random ids, EOT (the largest id) at varying positions, zero padding: as the tokenizer makes them."""
  g = torch.Generator().manual_seed(seed)
  tokens = torch.zeros(batch, context, dtype=torch.long)
  for i in range(batch):
    n = 3 + (i * 5) % (context - 3)
    tokens[i, 0] = vocab - 2
    tokens[i, 1:n] = torch.randint(1, vocab - 2, (n - 1,), generator=g)
    tokens[i, n] = vocab - 1
  return tokens


def assert_close(got, want, tol, what):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  err = float(np.max(np.abs(got - want)))
  assert err <= tol, f"{what}: max abs err {err:.3g} > {tol} (max |ref| {float(np.max(np.abs(want))):.3g})"


def check_image(split, ref_fn, model, images, what):
  emb, taps = jax_image(split, images)
  ref_emb, ref_taps = ref_fn(model, images)
  assert len(taps) == len(ref_taps)
  for i, (a, b) in enumerate(zip(taps, ref_taps)):
    assert_close(a, b, TOL, f"{what} tap {i}")
  assert_close(emb, ref_emb, TOL, f"{what} image embedding")


# ---- models ----------------------------------------------------------------------------------------------
def hf_model(text_cfg: dict, vision_cfg: dict, projection_dim: int, seed: int):
  torch.manual_seed(seed)
  cfg = transformers.CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=projection_dim)
  return perturb_(transformers.CLIPModel(cfg), seed), cfg.to_dict()


@pytest.fixture(scope="module")
def b16_open_clip():
  torch.manual_seed(0)
  model = perturb_(oc.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True), 1)
  flat, cfg = cc.open_clip_to_nnx(numpy_sd(model))
  assert cfg == clip.clip_config("ViT-B/16")
  return model, build_jax(cfg, flat)


@pytest.fixture(scope="module")
def b16_hf():
  # transformers' defaults are ViT-B/32: set B/16's vision geometry explicitly.
  vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16, hidden_act="quick_gelu")
  text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
              hidden_act="quick_gelu")
  model, hf_config = hf_model(text, vision, 512, 2)
  flat, cfg = cc.hf_to_nnx(numpy_sd(model), hf_config=hf_config)
  assert cfg == clip.clip_config("ViT-B/16")
  return model, build_jax(cfg, flat)


# ---- ViT-B/16 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(224, 224), (320, 480)])
def test_b16_image_open_clip(b16_open_clip, size):
  model, split = b16_open_clip
  images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
  check_image(split, open_clip_image_ref, model, images, f"open_clip B/16 {size}")
  if size == (224, 224):  # the step-by-step reference is open_clip's own forward where no resize happens
    with torch.no_grad():
      assert_close(open_clip_image_ref(model, images)[0], model.encode_image(images).numpy(), 1e-6,
                   "step-by-step reference vs encode_image")


@pytest.mark.parametrize("size", [(224, 224), (320, 480)])
def test_b16_image_hf(b16_hf, size):
  model, split = b16_hf
  images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4))
  check_image(split, hf_image_ref, model, images, f"HF B/16 {size}")


def test_b16_text(b16_open_clip, b16_hf):
  tokens = random_tokens(2, 77, 49408, 5)
  for (model, split), ref, what in [(b16_open_clip, lambda m: m.encode_text(tokens), "open_clip"),
                                    (b16_hf, lambda m: m.get_text_features(input_ids=tokens).pooler_output, "HF")]:
    with torch.no_grad():
      want = ref(model).numpy()
    assert_close(jax_text(split, tokens), want, TOL, f"{what} B/16 text embedding")


# ---- a small custom geometry ----------------------------------------------------------------------------
def test_small_geometry_open_clip():
  torch.manual_seed(6)
  model = perturb_(oc.CLIP(**SMALL_OPEN_CLIP), 6)
  flat, cfg = cc.open_clip_to_nnx(numpy_sd(model))
  assert cfg == clip.clip_config_from_open_clip(SMALL_OPEN_CLIP)
  split = build_jax(cfg, flat)
  for size in [(64, 64), (52, 84)]:  # 52x84: a 6x10 grid, the patch conv drops the remainder
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(7))
    check_image(split, open_clip_image_ref, model, images, f"open_clip small {size}")
  tokens = random_tokens(3, 12, 300, 8)
  with torch.no_grad():
    assert_close(jax_text(split, tokens), model.encode_text(tokens).numpy(), TOL, "open_clip small text embedding")


def test_small_geometry_hf():
  model, hf_config = hf_model(SMALL_HF_TEXT, SMALL_HF_VISION, 40, 9)
  flat, cfg = cc.hf_to_nnx(numpy_sd(model), hf_config=hf_config)
  assert (cfg.vision.heads, cfg.text.heads, cfg.vision.mlp_ratio) == (3, 3, 2.0)
  split = build_jax(cfg, flat)
  for size in [(64, 64), (52, 84)]:
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(10))
    check_image(split, hf_image_ref, model, images, f"HF small {size}")
  tokens = random_tokens(3, 12, 300, 11)
  with torch.no_grad():
    want = model.get_text_features(input_ids=tokens).pooler_output.numpy()
  assert_close(jax_text(split, tokens), want, TOL, "HF small text embedding")


# ---- attention bias ------------------------------------------------------------------------------------
def test_block_with_attention_bias():
  """SAN's recognition blocks: a per-head float mask ([B*heads, L, L] in torch, [B, heads, L, L] here)."""
  width, heads, b, length = 256, 4, 2, 70
  torch.manual_seed(12)
  block = perturb_(oc.transformer.ResidualAttentionBlock(width, heads, act_layer=oc.transformer.QuickGELU), 12)
  ours = clip.ResidualAttentionBlock(width, heads, 4.0, True, rngs=nnx.Rngs(0))
  sd = {f"blk.{k}": v for k, v in numpy_sd(block).items()}
  flat = torch_to_nnx(sd, cc.open_clip_block_table("blk", ()), param_shapes(ours))
  load_flat_params(ours, flat)

  g = torch.Generator().manual_seed(13)
  x = torch.randn(b, length, width, generator=g)
  bias = torch.randn(b, heads, length, length, generator=g) * 3.0
  bias[..., :20] = -100.0  # SAN's blocked columns, with each row's own diagonal open
  bias[..., torch.arange(20), torch.arange(20)] = 0.0
  with torch.no_grad():
    want = block(x, attn_mask=bias.reshape(b * heads, length, length)).numpy()
  got = ours(jnp.asarray(x.numpy()), jnp.asarray(bias.numpy()))
  assert_close(got, want, BLOCK_TOL, "block with attention bias")

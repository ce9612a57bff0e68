"""Official SAN checkpoints (`{"model": state_dict}`, PyTorch) <-> san-jax parameters (orbax).

    python -m convert.san_checkpoint san_vit_b_16.pth OUT_DIR [--config san_vit_b16]
    python -m convert.san_checkpoint OUT_DIR back.pth --to_torch

The geometry is inferred from the state dict where the keys determine it (widths, depths, patch sizes,
query count, grid sizes, the split point `feature_last_layer_idx`, attention-bias heads and MLP sizes, the
side blocks that receive CLIP features); what weights cannot tell (attention head counts, which CLIP
layer feeds each fusion, deep-supervision indices, CLIP resolution) comes from `--config` (a named
official config, default chosen by the CLIP width) and must agree with the weights.

Besides parameters the official state dict holds two buffers that carry no learnable state; both are
checked, never silently dropped: `ov_classifier.attn_mask` must be the causal text mask and
`criterion.empty_weight` must be [1, ..., 1, no_object_weight].
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import flags

from convert import mapping as m
from san_jax import cli
from san_jax.models import clip as clip_lib
from san_jax.models.san import SANConfig, config_from_dict, config_to_dict, san_config
from san_jax.models.side_adapter import SideAdapterConfig, parse_fusion_map

SIDE = "side_adapter_network."
VISUAL = "clip_visual_extractor."
REC = "clip_rec_head."
TEXT = "ov_classifier."
BUFFERS = ("ov_classifier.attn_mask", "criterion.empty_weight")


# ---- tables ------------------------------------------------------------------------------------------
def side_adapter_table(cfg: SideAdapterConfig, prefix: str = SIDE, root: Tuple = ("side_adapter_network",)):
  t = [m.same(f"{prefix}query_embed", root + ("query_embed",)),
       m.same(f"{prefix}query_pos_embed", root + ("query_pos_embed",)),
       m.same(f"{prefix}vit_model.pos_embed", root + ("vit_model", "pos_embed"))]
  t += m.conv(f"{prefix}vit_model.patch_embed.proj", root + ("vit_model", "patch_embed", "proj"))
  for i in range(cfg.depth):
    k, p = f"{prefix}vit_model.blocks.{i}", root + ("vit_model", "blocks", i)
    t += m.layer_norm(f"{k}.norm1", p + ("norm1",)) + m.layer_norm(f"{k}.norm2", p + ("norm2",))
    t += m.linear(f"{k}.attn.qkv", p + ("attn", "qkv")) + m.linear(f"{k}.attn.proj", p + ("attn", "proj"))
    t += m.linear(f"{k}.mlp.fc1", p + ("mlp", "fc1")) + m.linear(f"{k}.mlp.fc2", p + ("mlp", "fc2"))
  for _, j in cfg.fusion_map:
    k, p = f"{prefix}fusion_layers.layer_{j}.input_proj", root + ("fusion_layers", f"layer_{j}", "input_proj")
    t += m.layer_norm(f"{k}.0", p + (0,)) + m.conv1x1_as_linear(f"{k}.1", p + (1,))
  dec, pdec = f"{prefix}mask_decoder", root + ("mask_decoder",)
  for i in range(cfg.attn_bias_mlp_layers):
    t += m.linear(f"{dec}.query_mlp.layers.{i}", pdec + ("query_mlp", "layers", i))
    t += m.conv1x1_as_linear(f"{dec}.pix_mlp.layers.{i}", pdec + ("pix_mlp", "layers", i))
    t += m.conv1x1_as_linear(f"{dec}.attn_mlp.layers.{i}", pdec + ("attn_mlp", "layers", i))
  if cfg.rescale_attn_bias:
    t += m.linear(f"{dec}.bias_scaling", pdec + ("bias_scaling",))
  return t


def clip_visual_table(vision: clip_lib.VisionConfig, split: int, root: Tuple = ("clip_visual",)):
  """The official split of the image tower: blocks [0, split) in the extractor, the rest in the rec head."""
  t = [m.same(f"{VISUAL}class_embedding", root + ("class_embedding",)),
       m.same(f"{VISUAL}positional_embedding", root + ("positional_embedding",)),
       m.conv_kernel(f"{VISUAL}conv1.weight", root + ("conv1", "kernel"))]
  t += m.layer_norm(f"{VISUAL}ln_pre", root + ("ln_pre",))
  for i in range(vision.layers):
    key = f"{VISUAL}resblocks.{i}" if i < split else f"{REC}resblocks.{i - split}"
    t += m.clip_resblock(key, root + ("transformer", "resblocks", i))
  t += m.layer_norm(f"{REC}ln_post", root + ("ln_post",)) + [m.same(f"{REC}proj", root + ("proj",))]
  return t


def text_tower_table(text: clip_lib.TextConfig, prefix: str = TEXT, root: Tuple = ("ov_classifier",)):
  t = [m.same(f"{prefix}token_embedding.weight", root + ("token_embedding", "embedding")),
       m.same(f"{prefix}positional_embedding", root + ("positional_embedding",)),
       m.same(f"{prefix}text_projection", root + ("text_projection",))]
  t += m.layer_norm(f"{prefix}ln_final", root + ("ln_final",))
  for i in range(text.layers):
    t += m.clip_resblock(f"{prefix}transformer.resblocks.{i}", root + ("transformer", "resblocks", i))
  return t


def san_table(cfg: SANConfig) -> List[m.Entry]:
  return (clip_visual_table(cfg.clip.vision, cfg.feature_last_layer_idx) + side_adapter_table(cfg.side)
          + text_tower_table(cfg.clip.text)
          + [m.same(f"{TEXT}logit_scale", ("ov_classifier", "logit_scale")),
             m.same(f"{TEXT}bg_embed", ("ov_classifier", "bg_embed"))])


# ---- configs -----------------------------------------------------------------------------------------
_TIMM_NAME = re.compile(r"vit_w(\d+)n(\d+)d(\d+)_patch(\d+)")
_OFFICIAL_CLIP_NAMES = {"ViT-B/16": "ViT-B/16", "ViT-B-16": "ViT-B/16", "ViT-L-14-336": "ViT-L/14-336",
                        "ViT-L/14-336": "ViT-L/14-336", "ViT-L/14": "ViT-L/14", "ViT-L-14": "ViT-L/14",
                        "ViT-B/32": "ViT-B/32", "ViT-B-32": "ViT-B/32"}


def config_from_official(san_cfg: Mapping[str, Any], clip_model_config: Optional[Mapping] = None,
                         timm_kwargs: Optional[Mapping] = None) -> SANConfig:
  """SANConfig from the official detectron2 cfg (MODEL.SAN, MODEL.SIDE_ADAPTER), an open_clip model config
  for custom CLIPs, and the side ViT's timm kwargs (else parsed from VIT_NAME 'vit_w<W>n<H>d<D>_patch<P>')."""
  model = san_cfg["MODEL"] if "MODEL" in san_cfg else san_cfg
  s, sa = model["SAN"], model["SIDE_ADAPTER"]
  if clip_model_config is not None:
    clip_cfg = clip_lib.clip_config_from_open_clip(dict(clip_model_config), quick_gelu=True)
  else:
    name = s["CLIP_MODEL_NAME"]
    if name not in _OFFICIAL_CLIP_NAMES:
      raise ValueError(f"CLIP_MODEL_NAME {name!r} is not a known variant; pass its open_clip model config")
    clip_cfg = clip_lib.clip_config(_OFFICIAL_CLIP_NAMES[name])
  if timm_kwargs is not None:
    width, heads, depth, patch = (int(timm_kwargs[k]) for k in ("embed_dim", "num_heads", "depth", "patch_size"))
    mlp_ratio = float(timm_kwargs.get("mlp_ratio", 4.0))
  else:
    match = _TIMM_NAME.search(sa["VIT_NAME"])
    if not match:
      raise ValueError(f"cannot read the side ViT geometry from VIT_NAME {sa['VIT_NAME']!r}; pass its timm kwargs")
    width, heads, depth, patch = (int(g) for g in match.groups())
    mlp_ratio = 4.0
  ab = sa["ATTN_BIAS"]
  side = SideAdapterConfig(
      image_size=int(sa["IMAGE_SIZE"]), patch_size=patch, width=width, depth=depth, heads=heads,
      mlp_ratio=mlp_ratio, num_queries=int(sa["NUM_QUERIES"]), clip_width=clip_cfg.vision.width,
      fusion_map=parse_fusion_map(sa["FUSION_MAP"]), deep_supervision_idxs=tuple(int(i) for i in sa["DEEP_SUPERVISION_IDXS"]),
      attn_bias_heads=int(ab["NUM_HEADS"]), attn_bias_layers=int(ab["NUM_LAYERS"]),
      attn_bias_embed=int(ab["EMBED_CHANNELS"]), attn_bias_mlp=int(ab["MLP_CHANNELS"]),
      attn_bias_mlp_layers=int(ab["MLP_NUM_LAYERS"]), rescale_attn_bias=bool(ab["RESCALE_ATTN_BIAS"]))
  if sa.get("FUSION_TYPE", "add") != "add":
    raise NotImplementedError(f"FUSION_TYPE {sa['FUSION_TYPE']!r}: only 'add' exists in the official code")
  if s.get("REC_CROSS_ATTN", False):
    raise NotImplementedError("REC_CROSS_ATTN=True is not implemented (no official model uses it)")
  return SANConfig(clip=clip_cfg, side=side, clip_resolution=float(s["CLIP_RESOLUTION"]),
                   feature_last_layer_idx=int(s["FEATURE_LAST_LAYER_IDX"]),
                   size_divisibility=int(s.get("SIZE_DIVISIBILITY", 32)),
                   rec_downsample_method=str(s.get("REC_DOWNSAMPLE_METHOD", "max")),
                   sos_token_format=str(s.get("SOS_TOKEN_FORMAT", "cls_token")),
                   template_set=str(s.get("CLIP_TEMPLATE_SET", "vild")))


def _count(sd: Mapping[str, Any], pattern: str) -> int:
  rx = re.compile(pattern)
  return len({mt.group(1) for k in sd for mt in [rx.match(k)] if mt})


def check_config_against_weights(sd: Mapping[str, np.ndarray], cfg: SANConfig) -> None:
  """Everything the state dict determines must agree with `cfg`; raises listing every disagreement."""
  problems = []

  def expect(what, found, want):
    if found != want:
      problems.append(f"{what}: checkpoint has {found}, config says {want}")

  if f"{SIDE}query_embed" in sd:
    _, q, w = sd[f"{SIDE}query_embed"].shape
    expect("side width", w, cfg.side.width)
    expect("num_queries", q, cfg.side.num_queries)
    expect("side depth", _count(sd, rf"{re.escape(SIDE)}vit_model\.blocks\.(\d+)\."), cfg.side.depth)
    pw = sd[f"{SIDE}vit_model.patch_embed.proj.weight"].shape
    expect("side patch size", pw[-1], cfg.side.patch_size)
    expect("side pos_embed grid", int(round(math.sqrt(sd[f"{SIDE}vit_model.pos_embed"].shape[1]))), cfg.side.grid_size)
    fused = sorted(int(j) for j in {re.match(rf"{re.escape(SIDE)}fusion_layers\.layer_(\d+)\.", k).group(1)
                                    for k in sd if k.startswith(f"{SIDE}fusion_layers.")})
    expect("side blocks receiving CLIP features", fused, sorted(j for _, j in cfg.side.fusion_map))
    expect("attention-bias MLP layers", _count(sd, rf"{re.escape(SIDE)}mask_decoder\.query_mlp\.layers\.(\d+)\."),
           cfg.side.attn_bias_mlp_layers)
    last = cfg.side.attn_bias_mlp_layers - 1
    emb = sd.get(f"{SIDE}mask_decoder.query_mlp.layers.{last}.weight")
    if emb is not None:
      expect("attention-bias embed channels", emb.shape[0], cfg.side.attn_bias_embed)
      attn_out = sd[f"{SIDE}mask_decoder.attn_mlp.layers.{last}.weight"].shape[0]
      expect("attention-bias heads x layers x embed", attn_out,
             cfg.side.attn_bias_heads * cfg.side.attn_bias_layers * cfg.side.attn_bias_embed)
    expect("bias_scaling present", f"{SIDE}mask_decoder.bias_scaling.weight" in sd, cfg.side.rescale_attn_bias)
  if f"{VISUAL}conv1.weight" in sd:
    v = cfg.clip.vision
    w, _, p, _ = sd[f"{VISUAL}conv1.weight"].shape
    expect("CLIP width", w, v.width)
    expect("CLIP patch size", p, v.patch_size)
    expect("CLIP positional grid", int(round(math.sqrt(sd[f"{VISUAL}positional_embedding"].shape[0] - 1))), v.grid_size)
    k = _count(sd, rf"{re.escape(VISUAL)}resblocks\.(\d+)\.")
    expect("feature_last_layer_idx (extractor blocks)", k, cfg.feature_last_layer_idx)
    expect("CLIP layers (extractor + rec head)", k + _count(sd, rf"{re.escape(REC)}resblocks\.(\d+)\."), v.layers)
    expect("CLIP embed dim", sd[f"{REC}proj"].shape[1], v.output_dim)
    expect("side adapter's CLIP width", w, cfg.side.clip_width)
  if f"{TEXT}token_embedding.weight" in sd:
    t = cfg.clip.text
    vocab, tw = sd[f"{TEXT}token_embedding.weight"].shape
    expect("text vocab size", vocab, t.vocab_size)
    expect("text width", tw, t.width)
    expect("text layers", _count(sd, rf"{re.escape(TEXT)}transformer\.resblocks\.(\d+)\."), t.layers)
    expect("context length", sd[f"{TEXT}positional_embedding"].shape[0], t.context_length)
  if problems:
    raise m.ConversionError("checkpoint geometry does not match the config:\n  " + "\n  ".join(problems))


def check_buffers(sd: Mapping[str, np.ndarray], cfg: SANConfig) -> Dict[str, Any]:
  """Validates the two non-parameter buffers; returns what they tell (the class count, no-object weight)."""
  info: Dict[str, Any] = {}
  mask = sd.get("ov_classifier.attn_mask")
  if mask is not None:
    want = clip_lib.causal_mask(cfg.clip.text.context_length)
    if mask.shape != want.shape or not np.array_equal(np.isinf(mask), np.isinf(want)) or np.any(mask[~np.isinf(mask)]):
      raise m.ConversionError(f"ov_classifier.attn_mask is not the causal text mask of length "
                              f"{cfg.clip.text.context_length} (shape {mask.shape})")
  ew = sd.get("criterion.empty_weight")
  if ew is not None:
    ew = np.asarray(ew)
    if ew.ndim != 1 or not np.all(ew[:-1] == 1.0):
      raise m.ConversionError(f"criterion.empty_weight should be [1, ..., 1, no_object_weight], got {ew}")
    info.update(num_classes=int(ew.shape[0] - 1), no_object_weight=float(ew[-1]))
  return info


# ---- loading and saving ------------------------------------------------------------------------------
def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  import pickle
  import torch  # conversion-only dependency

  if not Path(path).is_file():
    raise m.ConversionError(f"{path}: no such file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as err:  # weights_only refuses code objects: never executed
    raise m.ConversionError(f"{path}: refused to load: it holds objects other than tensors and plain "
                            f"containers ({str(err).splitlines()[0][:200]})") from None
  except Exception as err:  # text, a truncated zip, ...: torch raises IndexError, EOFError, RuntimeError
    raise m.ConversionError(f"{path}: not a PyTorch checkpoint (torch.load failed: {type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'}); expected an official "
                            "SAN .pth ({'model': state_dict})") from None
  if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
    obj = obj["model"]
  if not isinstance(obj, dict):
    raise m.ConversionError(f"{path}: expected {{'model': state_dict}} or a state dict, got {type(obj).__name__}")
  return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in obj.items()}


def check_is_san(sd: Mapping[str, Any], path: str) -> None:
  """Refuses a state dict that is not (part of) an official SAN: no `side_adapter_network.*` tensor."""
  if any(k.startswith(SIDE) for k in sd):
    return
  prefixes: Dict[str, int] = {}
  for k in sd:
    head = k.split(".")[0]
    prefixes[head] = prefixes.get(head, 0) + 1
  found = ", ".join(f"{p}.* ({n})" for p, n in sorted(prefixes.items(), key=lambda x: -x[1])[:8]) or "nothing"
  hint = " (a CLIP checkpoint? use python -m convert.clip_checkpoint)" if any(
      k.startswith(("visual.", "transformer.", "token_embedding")) for k in sd) else ""
  raise m.ConversionError(f"{path}: not a SAN checkpoint: no {SIDE}* tensors; it holds {len(sd)} entries: "
                          f"{found}{hint}")


def table_for(sd_keys, cfg: SANConfig) -> List[m.Entry]:
  """The whole-SAN table, or only the side adapter's when the checkpoint holds nothing else."""
  if any(k.startswith((VISUAL, REC, TEXT)) for k in sd_keys):
    return san_table(cfg)
  return side_adapter_table(cfg.side)


def official_to_flat(sd: Mapping[str, np.ndarray], cfg: SANConfig, target_shapes: Mapping) -> Dict:
  check_config_against_weights(sd, cfg)
  check_buffers(sd, cfg)
  return m.torch_to_nnx(sd, table_for(sd.keys(), cfg), target_shapes, what="SAN checkpoint", ignore=BUFFERS)


def flat_to_official(flat: Mapping, cfg: SANConfig, num_classes: Optional[int] = None,
                     no_object_weight: float = 0.1) -> Dict[str, np.ndarray]:
  """Our parameters -> the official state dict, buffers included (criterion.empty_weight needs the class
  count, which the weights do not hold; it is left out when `num_classes` is None)."""
  whole = any(p[0] == "clip_visual" for p in flat)
  table = san_table(cfg) if whole else side_adapter_table(cfg.side)
  sd = m.nnx_to_torch(flat, table, what="SAN parameters")
  if whole:
    sd["ov_classifier.attn_mask"] = clip_lib.causal_mask(cfg.clip.text.context_length)
    if num_classes is not None:
      sd["criterion.empty_weight"] = np.array([1.0] * num_classes + [no_object_weight], np.float32)
  return sd


def default_config_for(sd: Mapping[str, np.ndarray]) -> SANConfig:
  """The official config whose CLIP width matches the checkpoint (B/16: 768, L/14-336: 1024)."""
  key = f"{VISUAL}conv1.weight"
  width = sd[key].shape[0] if key in sd else sd[f"{SIDE}fusion_layers.layer_0.input_proj.0.weight"].shape[0]
  return {768: san_config("san_vit_b16"), 1024: san_config("san_vit_l14")}.get(width) or _no_default(width)


def config_from_weights(sd: Mapping[str, np.ndarray], base: SANConfig) -> SANConfig:
  """`base` with every field that the whole-SAN state dict determines taken from the weights: CLIP and side
  widths, depths, patch and grid sizes, MLP ratios, output dims, vocabulary and context sizes, query count,
  the split point, attention-bias sizes and the side blocks receiving CLIP features. What weights cannot
  tell (head counts, which CLIP layer feeds each fused block, deep-supervision indices, CLIP resolution)
  stays `base`'s; `check_config_against_weights` then verifies the result, and an inconsistent remainder
  (e.g. a fusion reading a CLIP layer past the split) raises naming it."""
  need = [f"{VISUAL}conv1.weight", f"{REC}proj", f"{TEXT}token_embedding.weight", f"{SIDE}query_embed"]
  missing = [k for k in need if k not in sd]
  if missing:
    raise m.ConversionError(f"not a whole-SAN state dict: no {missing}")
  v, t, sa = base.clip.vision, base.clip.text, base.side
  width, _, patch, _ = sd[f"{VISUAL}conv1.weight"].shape
  grid = int(round(math.sqrt(sd[f"{VISUAL}positional_embedding"].shape[0] - 1)))
  k = _count(sd, rf"{re.escape(VISUAL)}resblocks\.(\d+)\.")
  vision = dataclasses.replace(
      v, image_size=grid * patch, patch_size=int(patch), width=int(width),
      layers=k + _count(sd, rf"{re.escape(REC)}resblocks\.(\d+)\."), output_dim=int(sd[f"{REC}proj"].shape[1]),
      mlp_ratio=sd[f"{VISUAL}resblocks.0.mlp.c_fc.weight"].shape[0] / width)
  vocab, tw = sd[f"{TEXT}token_embedding.weight"].shape
  text = dataclasses.replace(
      t, vocab_size=int(vocab), width=int(tw), context_length=int(sd[f"{TEXT}positional_embedding"].shape[0]),
      layers=_count(sd, rf"{re.escape(TEXT)}transformer\.resblocks\.(\d+)\."),
      output_dim=int(sd[f"{TEXT}text_projection"].shape[1]),
      mlp_ratio=sd[f"{TEXT}transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / tw)
  _, queries, sw = sd[f"{SIDE}query_embed"].shape
  sp = sd[f"{SIDE}vit_model.patch_embed.proj.weight"].shape[-1]
  fused = sorted(int(re.match(rf"{re.escape(SIDE)}fusion_layers\.layer_(\d+)\.", key).group(1))
                 for key in sd if key.startswith(f"{SIDE}fusion_layers.") and key.endswith("input_proj.0.weight"))
  base_blocks = [j for _, j in sa.fusion_map]
  if len(fused) != len(base_blocks):
    raise m.ConversionError(f"the weights fuse CLIP features into side blocks {fused}, the config "
                            f"{len(base_blocks)} blocks {base_blocks}: which CLIP layer feeds which block cannot "
                            f"be read from the weights; pass a config")
  mlp_layers = _count(sd, rf"{re.escape(SIDE)}mask_decoder\.query_mlp\.layers\.(\d+)\.")
  embed = sd[f"{SIDE}mask_decoder.query_mlp.layers.{mlp_layers - 1}.weight"].shape[0]
  hidden = sd[f"{SIDE}mask_decoder.query_mlp.layers.0.weight"].shape[0] if mlp_layers > 1 else sa.attn_bias_mlp
  attn_out = sd[f"{SIDE}mask_decoder.attn_mlp.layers.{mlp_layers - 1}.weight"].shape[0]
  side = dataclasses.replace(
      sa, image_size=int(round(math.sqrt(sd[f"{SIDE}vit_model.pos_embed"].shape[1]))) * sp, patch_size=int(sp),
      width=int(sw), depth=_count(sd, rf"{re.escape(SIDE)}vit_model\.blocks\.(\d+)\."), num_queries=int(queries),
      mlp_ratio=sd[f"{SIDE}vit_model.blocks.0.mlp.fc1.weight"].shape[0] / sw, clip_width=int(width),
      fusion_map=tuple((i, j) for (i, _), j in zip(sa.fusion_map, fused)),
      attn_bias_heads=int(attn_out // (sa.attn_bias_layers * embed)), attn_bias_embed=int(embed),
      attn_bias_mlp=int(hidden), attn_bias_mlp_layers=mlp_layers,
      rescale_attn_bias=f"{SIDE}mask_decoder.bias_scaling.weight" in sd)
  cfg = dataclasses.replace(base, clip=dataclasses.replace(base.clip, vision=vision, text=text), side=side,
                            feature_last_layer_idx=k)
  try:
    cfg.validate()
  except ValueError as e:
    raise m.ConversionError(f"the geometry read from the weights does not fit the config's remaining "
                            f"settings: {e}") from e
  check_config_against_weights(sd, cfg)
  return cfg


def _no_default(width):
  raise m.ConversionError(f"no official SAN config has CLIP width {width}; pass --config")


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_boolean("to_torch", False, "SRC is a san-jax checkpoint dir, DST a .pth", flag_values=fv)
  flags.DEFINE_string("config", None, "san_vit_b16 | san_vit_l14 | a config.json (default: by width)",
                      flag_values=fv)
  flags.DEFINE_integer("num_classes", None, "for criterion.empty_weight with --to_torch", flag_values=fv)


def _main(f: flags.FlagValues, args: List[str]) -> int:
  src, dst = args

  from flax import nnx
  from san_jax import checkpoint
  from san_jax.models import params as params_lib
  from san_jax.models.san import SAN

  if f.to_torch:
    import torch
    flat, meta = checkpoint.restore_params(src)
    cfg = config_from_dict(meta["san_config"])
    n = f.num_classes if f.num_classes is not None else meta.get("num_classes")
    sd = flat_to_official(flat, cfg, n, meta.get("no_object_weight", 0.1))
    torch.save({"model": {k: torch.from_numpy(np.require(v, requirements="C")) for k, v in sd.items()}}, dst)
    print(f"wrote {dst}: {len(sd)} tensors")
    return 0
  sd = load_torch_state_dict(src)
  check_is_san(sd, src)
  if f.config is None:
    cfg = default_config_for(sd)
  elif f.config.endswith(".json"):
    cfg = config_from_dict(json.loads(Path(f.config).read_text()))
  else:
    cfg = san_config(f.config)
  model = nnx.eval_shape(lambda: SAN(cfg, rngs=nnx.Rngs(0)))
  flat = official_to_flat(sd, cfg, params_lib.param_shapes(model))
  info = check_buffers(sd, cfg)
  checkpoint.save_params(dst, flat, {"san_config": config_to_dict(cfg), **info})
  print(f"wrote {dst}: {len(flat)} arrays from {len(sd)} tensors ({sum(v.size for v in flat.values()):,} values)")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m convert.san_checkpoint SRC DST [--config NAME] [--to_torch]`; in-process: main([SRC, DST, ...])
  (a ConversionError propagates; the command line prints it as one line, exit status 1)."""
  return cli.run(_define_flags, _main, argv, prog="convert.san_checkpoint", positional=["SRC", "DST"])


if __name__ == "__main__":
  try:
    main()
  except m.ConversionError as err:  # one message naming the file and the problem, no traceback
    sys.exit(f"convert.san_checkpoint: error: {err}")

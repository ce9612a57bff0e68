"""CLIP weights: open_clip / OpenAI and Hugging Face checkpoints <-> san_jax.models.clip parameters.

Two source layouts, both ViT CLIPs with a causal text transformer:
  * open_clip / OpenAI: a plain state dict (.pt/.pth/.bin, possibly nested under "state_dict" or "model")
    or OpenAI's TorchScript archive (whose state dict also carries the scalar buffers `input_resolution`,
    `context_length`, `vocab_size`, and when scripted from open_clip the `attn_mask` buffer: each is
    checked against the geometry and then dropped);
  * Hugging Face `CLIPModel` (model.safetensors or pytorch_model.bin, optionally a directory with its
    config.json); older files carry `position_ids` buffers, checked to be aranges and dropped.
The geometry (CLIPConfig) is inferred from the tensor shapes; attention heads follow OpenAI's rule
(width // 64) unless a Hugging Face config.json says otherwise.

Run:
  python -m convert.clip_checkpoint ViT-B-16.pt out/clip_b16             # -> orbax dir + config.json
  python -m convert.clip_checkpoint hf_clip_dir/ out/clip_b16 --format hf
  python -m convert.clip_checkpoint out/clip_b16 back.pth --to_torch     # open_clip state dict
  python -m convert.clip_checkpoint out/clip_b16 back.safetensors --to_hf
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zipfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import flags

from convert.mapping import (ConversionError, clip_resblock, Entry, KeyPath, conv_kernel, fused_qkv_bias, fused_qkv_kernel, layer_norm,
                             linear, linear_kernel, nnx_to_torch, same, torch_to_nnx)
from san_jax import cli
from san_jax.models import clip as clip_lib
from san_jax.models.clip import CLIP_LN_EPS, CLIPConfig, TextConfig, VisionConfig

StateDict = Dict[str, np.ndarray]

FORMATS = ("open_clip", "hf")
HEAD_WIDTH = 64  # OpenAI's CLIPs use 64-wide attention heads in both towers
# Scalar buffers of OpenAI's TorchScript archives (and `attn_mask` when scripted from open_clip): not
# parameters, but each is checked against the inferred geometry before it is dropped.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
HF_POSITION_IDS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


# config <-> dict: the model module's own (re-exported for the CLI and callers).
config_to_dict = clip_lib.config_to_dict
config_from_dict = clip_lib.config_from_dict


# ---- reading checkpoint files ---------------------------------------------------------------------------
def _to_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every bfloat16 exactly
    t = t.float()
  return t.numpy()


def _is_torchscript(path: str) -> bool:
  """TorchScript archives are zips holding compiled code (`constants.pkl`, `code/`); torch.save zips don't."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _unwrap(obj, path: str) -> Mapping:
  """The state dict inside a checkpoint object: nested under "state_dict"/"model", maybe "module."-prefixed."""
  while isinstance(obj, Mapping):
    inner = [k for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)]
    if not inner:
      break
    obj = obj[inner[0]]
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
  import torch
  bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
  if bad:
    raise ConversionError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:20]))}")
  if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return obj


def _resolve_dir(path: str) -> Tuple[str, Optional[str]]:
  """A Hugging Face / open_clip model directory -> (weights file, config.json or None)."""
  for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
               "open_clip_pytorch_model.bin"):
    if os.path.isfile(os.path.join(path, name)):
      cfg = os.path.join(path, "config.json")
      return os.path.join(path, name), (cfg if os.path.isfile(cfg) else None)
  raise ConversionError(f"{path}: no model.safetensors / pytorch_model.bin / open_clip_*.{{safetensors,bin}} "
                        "in this directory")


def read_checkpoint(path: str | os.PathLike) -> Tuple[StateDict, dict]:
  """Loads any supported file as a numpy state dict. Returns (state dict, info) where info has
  `container` ("safetensors" | "torchscript" | "pickle") and `hf_config` (a config.json dict or None)."""
  import torch
  path, hf_config = os.fspath(path), None
  if os.path.isdir(path):
    path, cfg_path = _resolve_dir(path)
    if cfg_path:
      with open(cfg_path) as f:
        hf_config = json.load(f)
  if not os.path.isfile(path):
    raise FileNotFoundError(path)
  if path.endswith(".safetensors"):
    from safetensors.torch import load_file
    sd, container = load_file(path, device="cpu"), "safetensors"
  elif _is_torchscript(path):
    sd, container = torch.jit.load(path, map_location="cpu").state_dict(), "torchscript"
  else:
    sd, container = _unwrap(torch.load(path, map_location="cpu", weights_only=True), path), "pickle"
  return {k: _to_numpy(v) for k, v in sd.items()}, {"container": container, "hf_config": hf_config}


# ---- architecture and format --------------------------------------------------------------------------
def _has_prefix(sd: Mapping, prefix: str) -> bool:
  return any(k.startswith(prefix) for k in sd)


def check_architecture(sd: Mapping[str, np.ndarray]) -> None:
  """Raises ConversionError for checkpoints of models this converter does not handle, naming why."""
  problems = []
  telltales = [
      (("logit_bias",), "a SigLIP model (sigmoid loss: `logit_bias`)"),
      (("vision_model.head.",), "a SigLIP vision tower (attention-pooling `vision_model.head.*`)"),
      (("visual.trunk.",), "an open_clip timm-trunk image tower (`visual.trunk.*`, e.g. SigLIP/ConvNeXt)"),
      (("visual.attnpool.", "visual.layer1."), "a ResNet CLIP (`visual.attnpool.*`, `visual.layer1.*`)"),
      (("visual.attn_pool.",), "an attention-pooled ViT (`visual.attn_pool.*`, e.g. CoCa)"),
      (("text.",), "an open_clip model with a Hugging Face text tower (`text.*`)"),
      (("text_decoder.",), "a CoCa model (`text_decoder.*`)"),
  ]
  for prefixes, what in telltales:
    hits = sorted(k for k in sd if any(k == p or k.startswith(p) for p in prefixes))
    if hits:
      problems.append(f"{what}: {', '.join(hits[:6])}" + (" ..." if len(hits) > 6 else ""))
  if problems:
    raise ConversionError("wrong architecture: this converter handles ViT CLIPs (open_clip/OpenAI or Hugging "
                          "Face CLIPModel) only; the checkpoint is\n  " + "\n  ".join(problems))


def detect_format(sd: Mapping[str, np.ndarray]) -> str:
  """"open_clip" (OpenAI naming) or "hf" (Hugging Face CLIPModel); ConversionError otherwise."""
  check_architecture(sd)
  if "visual.conv1.weight" in sd or "visual.class_embedding" in sd:
    return "open_clip"
  if _has_prefix(sd, "vision_model.") and _has_prefix(sd, "text_model."):
    return "hf"
  sample = ", ".join(sorted(sd)[:10])
  raise ConversionError("wrong architecture: neither an open_clip/OpenAI CLIP (`visual.conv1.weight`) nor a "
                        f"Hugging Face CLIPModel (`vision_model.*`, `text_model.*`); first keys: {sample}")


# ---- geometry inference ---------------------------------------------------------------------------------
def _require(sd: Mapping, keys: Sequence[str], what: str) -> None:
  missing = [k for k in keys if k not in sd]
  if missing:
    raise ConversionError(f"{what}: cannot infer the geometry, missing keys: {', '.join(missing)}")


def _count_layers(sd: Mapping, prefix: str) -> int:
  """1 + the largest block index under `prefix` (a gap shows up later as missing keys)."""
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  idx = [int(m.group(1)) for k in sd for m in [pat.match(k)] if m]
  return max(idx) + 1 if idx else 0


def _grid(n_positions: int, key: str) -> int:
  g = math.isqrt(n_positions - 1)
  if g * g != n_positions - 1:
    raise ConversionError(f"{key}: {n_positions} rows is not 1 + a square grid")
  return g


def _heads(width: int, what: str, head_width: int = HEAD_WIDTH) -> int:
  if width % head_width:
    raise ConversionError(f"{what}: width {width} is not a multiple of the head width {head_width}")
  return width // head_width


def _mlp_ratio(width: int, hidden: int, what: str) -> float:
  ratio = hidden / width
  if int(width * ratio) != hidden:  # the model sizes its MLP as int(width * mlp_ratio)
    raise ConversionError(f"{what}: MLP width {hidden} is not representable as int({width} * ratio)")
  return ratio


def infer_open_clip_config(sd: Mapping[str, np.ndarray], *, quick_gelu: bool = True,
                           head_width: int = HEAD_WIDTH) -> CLIPConfig:
  """The CLIPConfig of an open_clip/OpenAI ViT CLIP state dict, from its shapes.

  Activation and head width are not visible in the shapes: OpenAI's weights use QuickGELU and 64-wide heads.
  """
  v, t = "visual.transformer.resblocks.", "transformer.resblocks."
  _require(sd, ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", f"{v}0.mlp.c_fc.weight",
                "token_embedding.weight", "positional_embedding", "text_projection", f"{t}0.mlp.c_fc.weight"],
           "open_clip checkpoint")
  width, _, patch, _ = sd["visual.conv1.weight"].shape
  grid = _grid(sd["visual.positional_embedding"].shape[0], "visual.positional_embedding")
  vocab, t_width = sd["token_embedding.weight"].shape
  vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=width, layers=_count_layers(sd, v),
                        heads=_heads(width, "image tower", head_width),
                        mlp_ratio=_mlp_ratio(width, sd[f"{v}0.mlp.c_fc.weight"].shape[0], "image tower"),
                        output_dim=sd["visual.proj"].shape[1])
  text = TextConfig(context_length=sd["positional_embedding"].shape[0], vocab_size=vocab, width=t_width,
                    heads=_heads(t_width, "text tower", head_width), layers=_count_layers(sd, t),
                    mlp_ratio=_mlp_ratio(t_width, sd[f"{t}0.mlp.c_fc.weight"].shape[0], "text tower"),
                    output_dim=sd["text_projection"].shape[1])
  return CLIPConfig(vision=vision, text=text, quick_gelu=quick_gelu)


_HF_ACTS = {"quick_gelu": True, "gelu": False}


def _hf_tower_settings(hf_config: Optional[Mapping], tower: str) -> Tuple[Optional[int], Optional[bool]]:
  """(heads, quick_gelu) of one tower from a Hugging Face config.json, checking what this model can't vary."""
  if not hf_config:
    return None, None
  sub = hf_config.get(f"{tower}_config") or {}
  eps = sub.get("layer_norm_eps", CLIP_LN_EPS)
  if abs(eps - CLIP_LN_EPS) > 1e-12:
    raise ConversionError(f"Hugging Face {tower}_config.layer_norm_eps={eps}; this CLIP uses {CLIP_LN_EPS}")
  act = sub.get("hidden_act", "quick_gelu")
  if act not in _HF_ACTS:
    raise ConversionError(f"Hugging Face {tower}_config.hidden_act={act!r}; supported: {sorted(_HF_ACTS)}")
  heads = sub.get("num_attention_heads")
  return (int(heads) if heads is not None else None), _HF_ACTS[act]


def infer_hf_config(sd: Mapping[str, np.ndarray], hf_config: Optional[Mapping] = None) -> CLIPConfig:
  """The CLIPConfig of a Hugging Face CLIPModel state dict; heads/activation from `hf_config` if given."""
  v, t = "vision_model.encoder.layers.", "text_model.encoder.layers."
  _require(sd, ["vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_embedding.weight",
                "visual_projection.weight", f"{v}0.mlp.fc1.weight", "text_model.embeddings.token_embedding.weight",
                "text_model.embeddings.position_embedding.weight", "text_projection.weight", f"{t}0.mlp.fc1.weight"],
           "Hugging Face CLIP checkpoint")
  v_heads, v_qg = _hf_tower_settings(hf_config, "vision")
  t_heads, t_qg = _hf_tower_settings(hf_config, "text")
  if v_qg is not None and v_qg != t_qg:
    raise ConversionError("Hugging Face config: the towers use different activations; this CLIP shares one")
  width, _, patch, _ = sd["vision_model.embeddings.patch_embedding.weight"].shape
  grid = _grid(sd["vision_model.embeddings.position_embedding.weight"].shape[0],
               "vision_model.embeddings.position_embedding.weight")
  vocab, t_width = sd["text_model.embeddings.token_embedding.weight"].shape
  vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=width, layers=_count_layers(sd, v),
                        heads=v_heads or _heads(width, "image tower"),
                        mlp_ratio=_mlp_ratio(width, sd[f"{v}0.mlp.fc1.weight"].shape[0], "image tower"),
                        output_dim=sd["visual_projection.weight"].shape[0])
  text = TextConfig(context_length=sd["text_model.embeddings.position_embedding.weight"].shape[0],
                    vocab_size=vocab, width=t_width, heads=t_heads or _heads(t_width, "text tower"),
                    layers=_count_layers(sd, t),
                    mlp_ratio=_mlp_ratio(t_width, sd[f"{t}0.mlp.fc1.weight"].shape[0], "text tower"),
                    output_dim=sd["text_projection.weight"].shape[0])
  return CLIPConfig(vision=vision, text=text, quick_gelu=True if v_qg is None else v_qg)


def model_shapes(cfg: CLIPConfig) -> Dict[KeyPath, Tuple[int, ...]]:
  """Every parameter leaf of CLIP(cfg) and its shape, without allocating the parameters."""
  from flax import nnx
  from san_jax.models.clip import CLIP
  from san_jax.models.params import param_shapes
  return param_shapes(nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0))))


# ---- tables ---------------------------------------------------------------------------------------------
# One open_clip ResidualAttentionBlock `prefix.*` <-> our block at `path` (shared with the SAN converter).
open_clip_block_table = clip_resblock


def open_clip_table(cfg: CLIPConfig) -> List[Entry]:
  """open_clip / OpenAI state-dict keys <-> CLIP parameter paths (names match except the fused in_proj)."""
  vis = ("visual",)
  table = [conv_kernel("visual.conv1.weight", vis + ("conv1", "kernel")),
           same("visual.class_embedding", vis + ("class_embedding",)),
           same("visual.positional_embedding", vis + ("positional_embedding",)),
           *layer_norm("visual.ln_pre", vis + ("ln_pre",)),
           *layer_norm("visual.ln_post", vis + ("ln_post",)),
           same("visual.proj", vis + ("proj",)),  # open_clip applies it as x @ proj: already [in, out]
           same("token_embedding.weight", ("token_embedding", "embedding")),
           same("positional_embedding", ("positional_embedding",)),
           *layer_norm("ln_final", ("ln_final",)),
           same("text_projection", ("text_projection",)),
           same("logit_scale", ("logit_scale",))]
  for i in range(cfg.vision.layers):
    table += open_clip_block_table(f"visual.transformer.resblocks.{i}", vis + ("transformer", "resblocks", i))
  for i in range(cfg.text.layers):
    table += open_clip_block_table(f"transformer.resblocks.{i}", ("transformer", "resblocks", i))
  return table


def _hf_block(prefix: str, path: KeyPath) -> List[Entry]:
  attn = path + ("attn",)
  return [*layer_norm(f"{prefix}.layer_norm1", path + ("ln_1",)),
          *[e for n in ("q_proj", "k_proj", "v_proj", "out_proj") for e in linear(f"{prefix}.self_attn.{n}", attn + (n,))],
          *layer_norm(f"{prefix}.layer_norm2", path + ("ln_2",)),
          *linear(f"{prefix}.mlp.fc1", path + ("mlp", "c_fc")),
          *linear(f"{prefix}.mlp.fc2", path + ("mlp", "c_proj"))]


def hf_table(cfg: CLIPConfig) -> List[Entry]:
  """Hugging Face CLIPModel keys <-> CLIP parameter paths."""
  vis, emb = ("visual",), "vision_model.embeddings"
  table = [conv_kernel(f"{emb}.patch_embedding.weight", vis + ("conv1", "kernel")),
           same(f"{emb}.class_embedding", vis + ("class_embedding",)),
           same(f"{emb}.position_embedding.weight", vis + ("positional_embedding",)),
           *layer_norm("vision_model.pre_layrnorm", vis + ("ln_pre",)),  # sic: HF's spelling
           *layer_norm("vision_model.post_layernorm", vis + ("ln_post",)),
           linear_kernel("visual_projection.weight", vis + ("proj",)),  # a bias-free Linear: [out, in]
           same("text_model.embeddings.token_embedding.weight", ("token_embedding", "embedding")),
           same("text_model.embeddings.position_embedding.weight", ("positional_embedding",)),
           *layer_norm("text_model.final_layer_norm", ("ln_final",)),
           linear_kernel("text_projection.weight", ("text_projection",)),
           same("logit_scale", ("logit_scale",))]
  for i in range(cfg.vision.layers):
    table += _hf_block(f"vision_model.encoder.layers.{i}", vis + ("transformer", "resblocks", i))
  for i in range(cfg.text.layers):
    table += _hf_block(f"text_model.encoder.layers.{i}", ("transformer", "resblocks", i))
  return table


# ---- the non-parameter entries --------------------------------------------------------------------------
def _check_openai_metadata(sd: Mapping[str, np.ndarray], cfg: CLIPConfig) -> List[str]:
  """Checks the known non-parameter keys of OpenAI/TorchScript state dicts; returns those present."""
  expected = {"input_resolution": cfg.vision.image_size, "context_length": cfg.text.context_length,
              "vocab_size": cfg.text.vocab_size}
  present, wrong = [], []
  for key, want in expected.items():
    if key in sd:
      present.append(key)
      got = np.asarray(sd[key])
      if got.size != 1 or int(got.reshape(())) != want:
        wrong.append(f"{key}={got.tolist()} but the weights imply {want}")
  if "attn_mask" in sd:
    present.append("attn_mask")
    if not np.array_equal(np.asarray(sd["attn_mask"], np.float32), clip_lib.causal_mask(cfg.text.context_length)):
      wrong.append(f"attn_mask is not the causal mask of context length {cfg.text.context_length}")
  if wrong:
    raise ConversionError("open_clip checkpoint metadata disagrees with its weights: " + "; ".join(wrong))
  return present


def _check_position_ids(sd: Mapping[str, np.ndarray], cfg: CLIPConfig) -> List[str]:
  """Older HF files store the arange `position_ids` buffers: checked, then dropped."""
  lengths = {HF_POSITION_IDS[0]: cfg.vision.grid_size ** 2 + 1, HF_POSITION_IDS[1]: cfg.text.context_length}
  present, wrong = [], []
  for key, n in lengths.items():
    if key in sd:
      present.append(key)
      if not np.array_equal(np.asarray(sd[key]).reshape(-1), np.arange(n)):
        wrong.append(f"{key} is not arange({n}) (shape {tuple(np.shape(sd[key]))})")
  if wrong:
    raise ConversionError("Hugging Face checkpoint buffers disagree with its weights: " + "; ".join(wrong))
  return present


# ---- conversions ---------------------------------------------------------------------------------------
def open_clip_to_nnx(sd: Mapping[str, np.ndarray], cfg: Optional[CLIPConfig] = None,
                     **infer_kwargs) -> Tuple[Dict[KeyPath, np.ndarray], CLIPConfig]:
  """open_clip/OpenAI state dict (numpy) -> (flat CLIP params, config). `cfg` defaults to the inferred one."""
  check_architecture(sd)
  cfg = cfg or infer_open_clip_config(sd, **infer_kwargs)
  ignore = _check_openai_metadata(sd, cfg)
  flat = torch_to_nnx(sd, open_clip_table(cfg), model_shapes(cfg), what="open_clip CLIP checkpoint", ignore=ignore)
  return flat, cfg


def nnx_to_open_clip(flat: Mapping[KeyPath, np.ndarray], cfg: CLIPConfig) -> StateDict:
  """Flat CLIP params -> open_clip state dict (numpy), loadable by open_clip's CLIP.load_state_dict."""
  return nnx_to_torch(flat, open_clip_table(cfg), what="CLIP parameters")


def hf_to_nnx(sd: Mapping[str, np.ndarray], cfg: Optional[CLIPConfig] = None,
              hf_config: Optional[Mapping] = None) -> Tuple[Dict[KeyPath, np.ndarray], CLIPConfig]:
  """Hugging Face CLIPModel state dict (numpy) -> (flat CLIP params, config)."""
  check_architecture(sd)
  cfg = cfg or infer_hf_config(sd, hf_config)
  ignore = _check_position_ids(sd, cfg)
  flat = torch_to_nnx(sd, hf_table(cfg), model_shapes(cfg), what="Hugging Face CLIP checkpoint", ignore=ignore)
  return flat, cfg


def nnx_to_hf(flat: Mapping[KeyPath, np.ndarray], cfg: CLIPConfig, *, position_ids: bool = False) -> StateDict:
  """Flat CLIP params -> Hugging Face CLIPModel state dict; `position_ids` adds the (legacy) buffers."""
  sd = nnx_to_torch(flat, hf_table(cfg), what="CLIP parameters")
  if position_ids:
    sd[HF_POSITION_IDS[0]] = np.arange(cfg.vision.grid_size ** 2 + 1, dtype=np.int64)[None]
    sd[HF_POSITION_IDS[1]] = np.arange(cfg.text.context_length, dtype=np.int64)[None]
  return sd


def hf_config_dict(cfg: CLIPConfig) -> dict:
  """A Hugging Face CLIPConfig (config.json) for `cfg`, so transformers' CLIPModel can load nnx_to_hf output."""
  act = "quick_gelu" if cfg.quick_gelu else "gelu"

  def tower(c):
    return {"hidden_size": c.width, "intermediate_size": int(c.width * c.mlp_ratio),
            "num_hidden_layers": c.layers, "num_attention_heads": c.heads, "hidden_act": act,
            "layer_norm_eps": CLIP_LN_EPS, "projection_dim": c.output_dim}

  t = cfg.text
  # EOT = the largest id: HF pools at the first eos_token_id (or the argmax when it is the legacy 2).
  text = {**tower(t), "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length,
          "eos_token_id": t.vocab_size - 1, "bos_token_id": max(t.vocab_size - 2, 0), "pad_token_id": 1}
  vision = {**tower(cfg.vision), "image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size,
            "num_channels": 3}
  return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
          "text_config": text, "vision_config": vision}


def convert_state_dict(sd: Mapping[str, np.ndarray], fmt: str = "auto", *, hf_config: Optional[Mapping] = None,
                       quick_gelu: Optional[bool] = None) -> Tuple[Dict[KeyPath, np.ndarray], CLIPConfig, str]:
  """Any supported state dict -> (flat params, config, format used)."""
  if fmt == "auto":
    fmt = detect_format(sd)
  if fmt == "open_clip":
    flat, cfg = open_clip_to_nnx(sd, quick_gelu=True if quick_gelu is None else quick_gelu)
  elif fmt == "hf":
    flat, cfg = hf_to_nnx(sd, hf_config=hf_config)
    if quick_gelu is not None:
      cfg = dataclasses.replace(cfg, quick_gelu=quick_gelu)
  else:
    raise ValueError(f"unknown format {fmt!r}; one of auto, {', '.join(FORMATS)}")
  return flat, cfg, fmt


def load_clip_checkpoint(path: str | os.PathLike, fmt: str = "auto", *, quick_gelu: Optional[bool] = None
                         ) -> Tuple[Dict[KeyPath, np.ndarray], CLIPConfig, str]:
  """Reads and converts a checkpoint file (or HF directory): (flat params, config, format)."""
  sd, info = read_checkpoint(path)
  return convert_state_dict(sd, fmt, hf_config=info["hf_config"], quick_gelu=quick_gelu)


# ---- writing ---------------------------------------------------------------------------------------------
def save_torch_state_dict(sd: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """.safetensors (no torch needed) or a torch.save pickle of tensors (.pth/.pt/.bin)."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # np.require, not np.ascontiguousarray: the latter turns 0-d arrays (logit_scale) into shape (1,).
  arrays = {k: np.require(v, requirements="C") for k, v in sd.items()}
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file(arrays, path)
  else:
    import torch
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, path)


def _write_json(obj, path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_enum("format", "auto", ("auto",) + FORMATS, "the input's layout", flag_values=fv)
  flags.DEFINE_boolean("to_torch", False, "orbax params -> open_clip state dict", flag_values=fv)
  flags.DEFINE_boolean("to_hf", False, "orbax params -> Hugging Face CLIPModel weights", flag_values=fv)
  flags.mark_bool_flags_as_mutual_exclusive(["to_torch", "to_hf"], flag_values=fv)
  flags.DEFINE_boolean("exact_gelu", False, "the weights use erf GELU, not OpenAI's QuickGELU", flag_values=fv)
  flags.DEFINE_boolean("force", False, "overwrite an existing output", flag_values=fv)


def _main(f: flags.FlagValues, args: List[str]) -> int:
  # INPUT: a checkpoint file / HF directory; with --to_torch/--to_hf an orbax params dir.
  # OUTPUT: an orbax output dir; with --to_torch a .pth, with --to_hf a .safetensors or a dir.
  source, out = args
  from san_jax import checkpoint

  if f.to_torch or f.to_hf:
    flat, cfg_dict = checkpoint.restore_params(source)
    cfg = config_from_dict(cfg_dict)
    if not f.force and os.path.exists(out) and not os.path.isdir(out):
      raise SystemExit(f"{out} exists (use --force)")
    if f.to_torch:
      save_torch_state_dict(nnx_to_open_clip(flat, cfg), out)
    else:
      if not out.endswith(".safetensors"):  # a directory in HF's layout: from_pretrained(out) works
        os.makedirs(out, exist_ok=True)
        _write_json(hf_config_dict(cfg), os.path.join(out, "config.json"))
        out = os.path.join(out, "model.safetensors")
      save_torch_state_dict(nnx_to_hf(flat, cfg), out)
    print(f"wrote {out}")
    return 0

  flat, cfg, fmt = load_clip_checkpoint(source, f.format, quick_gelu=False if f.exact_gelu else None)
  cfg_dict = config_to_dict(cfg)
  directory = checkpoint.save_params(out, flat, cfg_dict, force=f.force)
  _write_json(cfg_dict, os.path.join(directory, "config.json"))
  n = sum(int(np.prod(v.shape)) for v in flat.values())
  print(f"{fmt} CLIP ({n:,} parameters): vision {cfg.vision}, text {cfg.text}, quick_gelu={cfg.quick_gelu}")
  print(f"wrote {directory}")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m convert.clip_checkpoint INPUT OUTPUT [--format hf] [--to_torch | --to_hf]`; in-process:
  main([INPUT, OUTPUT, ...])."""
  return cli.run(_define_flags, _main, argv, prog="convert.clip_checkpoint", positional=["INPUT", "OUTPUT"])


if __name__ == "__main__":
  main()

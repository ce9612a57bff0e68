"""The one way to get a ready SAN: `load(source)` from any of the places a SAN's weights live.

    from san_jax import pretrained
    p = pretrained.load("san_vit_b16")                 # the official B/16 weights, through the Hugging Face Hub
    p = pretrained.load("/ckpt/san_vit_b_16.pth")      # an official checkpoint ({"model": state_dict})
    p = pretrained.load("/ckpt/san_b16")               # a converted parameters checkpoint (orbax)
    p = pretrained.load("runs/tiny", step=200)         # a training run: its latest (or a given) step
    labels, _ = p.segmenter().predict(image, ["cat", "grass"])

Sources, told apart by what is on disk (`detect`):
  * name      `san_vit_b16` / `san_vit_l14`: `huggingface_hub.hf_hub_download("Mendel192/san", FILE)`, converted
              once; the converted checkpoint is cached beside the Hub cache (HF_HUB_CACHE/san_jax/...), keyed
              by the file's blob hash, so a new upload of the file is converted again. Offline
              (HF_HUB_OFFLINE=1, or no network) the cache is used, or one error says which file to download
              and where to put it.
  * pth       an official `.pth`: converted in memory by `convert.san_checkpoint` (which needs torch). The
              geometry comes from a golden case's `case.json` beside the file, else the `config` argument,
              else it is inferred from the keys (`convert.san_checkpoint.config_from_weights`).
  * params    a parameters checkpoint (`checkpoint.save_params` with config {"san_config": ...}).
  * workdir   a training run (config.json + checkpoints/): the trainable parameters of a train-state
              step, and the frozen ones rebuilt the way training built them (`train.init_from`, else the
              run's seed). No optimizer, no mesh: the optimizer state on disk is never read.

`train.init_from` also takes these names, and CLIP towers by open_clip name ("ViT-B-16/openai") or Hugging
Face id ("openai/clip-vit-base-patch16"), resolved the same way (`resolve_name`, `resolve_clip`).

A checkpoint of one kind given where another was asked for (`kind=`), a CLIP checkpoint given for a SAN,
or a config whose geometry differs from the weights' raises `PretrainedError` naming what was found and
the differing keys, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

HUB_REPO = "Mendel192/san"
MODEL_NAMES: Dict[str, str] = {"san_vit_b16": "san_vit_b_16.pth", "san_vit_l14": "san_vit_large_14.pth"}
KINDS = ("name", "pth", "params", "workdir")
PTH_SUFFIXES = (".pth", ".pt", ".bin")
# SANConfig fields that do not change the weights (how attention is chunked on CPU, which kernel runs it).
_NOT_GEOMETRY = ("attention_query_chunk", "attention_impl")


class PretrainedError(ValueError):
  """A source that cannot give a SAN: wrong kind, geometry mismatch, missing file."""


@dataclasses.dataclass
class Pretrained:
  """A ready SAN (float32 parameters on the default device) and where it came from.

  model: the `san_jax.models.san.SAN`; config: its SANConfig; kind/origin: the source (see module doc);
  step: the training step for a workdir; run_config: the training run's ConfigDict (a workdir, or a
  parameters checkpoint written by convert.export_params);
  meta: the checkpoint's own config dict (num_classes etc.)."""
  model: Any
  config: Any
  kind: str
  origin: str
  step: Optional[int] = None
  run_config: Any = None
  meta: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def segmenter(self, **kwargs):
    """An `evaluation.inference.Segmenter` of this model (it holds the per-vocabulary embedding cache)."""
    from san_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
    return inference.Segmenter(self.model, **kwargs)

  def describe(self) -> str:
    return f"{self.kind} {self.origin}" + (f" (step {self.step})" if self.step is not None else "")


# ---- telling sources apart ------------------------------------------------------------------------------
def _is_orbax_composite(path: Path, *items: str) -> bool:
  return path.is_dir() and all((path / i).is_dir() for i in items)


def _train_steps(path: Path):
  return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()
                and _is_orbax_composite(p, "state")) if path.is_dir() else []


def detect(source: str) -> str:
  """The kind of `source` (one of KINDS); PretrainedError naming what it is when it is none of them."""
  if source in MODEL_NAMES:
    return "name"
  path = Path(source)
  if path.is_file():
    if path.suffix.lower() in PTH_SUFFIXES:
      return "pth"
    raise PretrainedError(f"{source}: a file that is not a PyTorch checkpoint (expected {'/'.join(PTH_SUFFIXES)})")
  if not path.exists():
    raise PretrainedError(f"{source}: no such file or directory, and not a model name "
                          f"(known: {', '.join(MODEL_NAMES)})")
  if (path / "checkpoints").is_dir() or ((path / "config.json").is_file() and not (path / "params").exists()):
    return "workdir"
  if _is_orbax_composite(path, "params"):
    return "params"
  if _is_orbax_composite(path, "state"):
    raise PretrainedError(f"{source} is one step of a training run's train-state checkpoints, not a "
                          f"parameters checkpoint: give the run directory {path.parent.parent} (and step "
                          f"{path.name}), e.g. --workdir {path.parent.parent} --step {path.name}")
  if _train_steps(path):
    raise PretrainedError(f"{source} holds a training run's train-state checkpoints (steps "
                          f"{_train_steps(path)}), not a parameters checkpoint: give the run directory "
                          f"{path.parent} (--workdir {path.parent})")
  raise PretrainedError(f"{source}: neither a parameters checkpoint (no params/ item), a training run "
                        f"(no checkpoints/ or config.json) nor an official .pth")


_KIND_WORDS = {"name": "a model name", "pth": "an official .pth checkpoint", "params": "a parameters checkpoint",
               "workdir": "a training run directory"}
_KIND_FLAGS = {"params": "--checkpoint", "pth": "--checkpoint", "workdir": "--workdir", "name": "--model"}


# ---- geometry checks -------------------------------------------------------------------------------------
def _flat_dict(d: Mapping, prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat_dict(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = json.loads(json.dumps(v))  # tuples -> lists, as configs hold them
  return out


def geometry_differences(expected, found) -> Dict[str, Tuple[Any, Any]]:
  """{dotted key: (expected, found)} of the SANConfig fields that differ (both SANConfigs)."""
  from san_jax.models import san as san_lib  # pylint: disable=g-import-not-at-top
  a, b = _flat_dict(san_lib.config_to_dict(expected)), _flat_dict(san_lib.config_to_dict(found))
  keys = sorted(set(a) | set(b))
  return {k: (a.get(k), b.get(k)) for k in keys
          if a.get(k) != b.get(k) and k.rsplit(".", 1)[-1] not in _NOT_GEOMETRY}


def check_geometry(expected, found, what: str) -> None:
  diff = geometry_differences(expected, found)
  if diff:
    lines = "\n  ".join(f"{k}: config {a}, checkpoint {b}" for k, a, b in ((k, *v) for k, v in diff.items()))
    raise PretrainedError(f"{what}: the config's model geometry differs from the checkpoint's in "
                          f"{len(diff)} keys:\n  {lines}")


def as_san_config(config):
  """A SANConfig from a SANConfig, a config name, a `model` ConfigDict/dict, or a whole run config."""
  from san_jax.models import san as san_lib  # pylint: disable=g-import-not-at-top
  if config is None or isinstance(config, san_lib.SANConfig):
    return config
  if isinstance(config, str):
    return san_lib.san_config(config)
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  if "model" in d and isinstance(d["model"], Mapping):
    d = dict(d["model"])
  return san_lib.config_from_dict(d)


# ---- building -----------------------------------------------------------------------------------------------
def model_from_params(flat: Mapping, san_config) -> Any:
  """A SAN from {path: array} and its config (SANConfig or dict). Every model leaf must be present with its
  shape, else PretrainedError naming the missing and misshaped keys. Built from `nnx.eval_shape`, so no
  random initialisation is paid for."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from san_jax.models import params as params_lib  # pylint: disable=g-import-not-at-top
  from san_jax.models import san as san_lib  # pylint: disable=g-import-not-at-top
  cfg = as_san_config(san_config)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: san_lib.SAN(cfg, rngs=nnx.Rngs(0))))
  leaves = [(tuple(path), var) for path, var in nnx.to_flat_state(state)]
  missing = sorted(params_lib.dotted(p) for p, _ in leaves if p not in flat)
  bad = sorted(f"{params_lib.dotted(p)}: checkpoint {tuple(np.shape(flat[p]))}, model {tuple(v.get_value().shape)}"
               for p, v in leaves if p in flat and tuple(np.shape(flat[p])) != tuple(v.get_value().shape))
  if missing or bad:
    raise PretrainedError(f"the parameters do not fit the SAN config: {len(missing)} missing {missing[:5]}, "
                          f"{len(bad)} misshaped {bad[:5]}")
  for path, var in leaves:
    var.set_value(jnp.asarray(flat[path], dtype=var.get_value().dtype))
  return nnx.merge(graphdef, state)


def _from_params_dir(path: str, config=None) -> Pretrained:
  from san_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from san_jax.models import san as san_lib  # pylint: disable=g-import-not-at-top
  flat, meta = checkpoint.restore_params(path)
  if "san_config" not in meta:
    what = "a CLIP checkpoint (clip_config)" if "clip_config" in meta else f"config keys {sorted(meta)}"
    raise PretrainedError(f"{path}: a parameters checkpoint without 'san_config' ({what}), not a SAN; SAN "
                          "checkpoints come from convert.san_checkpoint, convert.export_params or training")
  cfg = san_lib.config_from_dict(meta["san_config"])
  if config is not None:
    check_geometry(as_san_config(config), cfg, path)
  run_cfg = None
  if isinstance(meta.get("run_config"), Mapping):  # convert.export_params keeps the run's config
    from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
    run_cfg = ConfigDict(meta["run_config"])
  return Pretrained(model_from_params(flat, cfg), cfg, "params", os.path.abspath(path), run_config=run_cfg, meta=meta)


def _pth_config(path: Path, sd, config, base=None):
  from convert import san_checkpoint as sc  # pylint: disable=g-import-not-at-top
  case = path.parent / "case.json"
  if case.is_file():  # a golden case (DESIGN §4): its official cfg, CLIP config and side-ViT kwargs
    meta = json.loads(case.read_text())
    timm = meta.get("side_adapter_timm_vit")
    timm = timm.get("kwargs") if isinstance(timm, Mapping) else None
    cfg = sc.config_from_official(meta["san_cfg"], meta.get("clip_model_config"), timm)
    if config is not None:
      check_geometry(as_san_config(config), cfg, str(path))
    return cfg
  if config is not None:
    return as_san_config(config)
  return sc.config_from_weights(sd, as_san_config(base) if base is not None else sc.default_config_for(sd))


def convert_pth(path: str, config=None, base=None) -> Tuple[Dict, Any, Dict]:
  """(flat params, SANConfig, buffer info) of an official .pth. The geometry: a golden case's case.json
  beside it, else `config`, else inferred from the keys on top of `base` (a named config; default: the
  official one of the checkpoint's CLIP width)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from convert import mapping  # pylint: disable=g-import-not-at-top
  from convert import san_checkpoint as sc  # pylint: disable=g-import-not-at-top
  from san_jax.models import params as params_lib  # pylint: disable=g-import-not-at-top
  from san_jax.models import san as san_lib  # pylint: disable=g-import-not-at-top
  try:
    sd = sc.load_torch_state_dict(path)
  except ImportError as e:
    raise PretrainedError(f"{path}: reading an official .pth needs torch (requirements-dev.txt), or convert it "
                          f"once elsewhere with python -m convert.san_checkpoint ({e})") from e
  if any(k.startswith(("visual.", "text_projection", "token_embedding")) for k in sd):
    raise PretrainedError(f"{path}: a CLIP checkpoint (open_clip keys), not a SAN; as a SAN's CLIP it goes in "
                          "train.init_from after python -m convert.clip_checkpoint")
  try:
    cfg = _pth_config(Path(path), sd, config, base)
    model = nnx.eval_shape(lambda: san_lib.SAN(cfg, rngs=nnx.Rngs(0)))
    flat = sc.official_to_flat(sd, cfg, params_lib.param_shapes(model))
  except mapping.ConversionError as e:
    raise PretrainedError(f"{path}: {e}") from e
  return flat, cfg, sc.check_buffers(sd, cfg)


def _from_pth(path: str, config=None) -> Pretrained:
  flat, cfg, info = convert_pth(path, config)
  return Pretrained(model_from_params(flat, cfg), cfg, "pth", os.path.abspath(path), meta=info)


# ---- the Hugging Face Hub -----------------------------------------------------------------------------------
def hub_cache_dir() -> str:
  """HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub (read now, not at import)."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
  return os.path.join(home, "hub")


def _offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_download(repo_id: str, filename: str) -> str:
  """The local path of `filename` from Hub repo `repo_id`: the cache, else a download (never offline)."""
  cache = hub_cache_dir()
  try:
    from huggingface_hub import hf_hub_download  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise PretrainedError("loading weights by name needs huggingface_hub (requirements.txt)") from e
  try:
    return hf_hub_download(repo_id, filename, cache_dir=cache, local_files_only=_offline())
  except Exception as e:  # offline, no network, unknown repo: all mean the file is not here
    folder = os.path.join(cache, f"models--{repo_id.replace('/', '--')}")
    raise PretrainedError(
        f"{filename} of the Hugging Face repository {repo_id} is not in the Hub cache {cache} and could not "
        f"be downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download "
        f"https://huggingface.co/{repo_id}/resolve/main/{filename} and either pass its path as the model, or "
        f"put it at {folder}/snapshots/main/{filename} and write 'main' into {folder}/refs/main") from e


def converted_dir(pth_path: str, repo_id: str = HUB_REPO) -> str:
  """Where the converted checkpoint of a Hub file is cached: beside the Hub cache, keyed by the file's
  blob (its content hash in the cache), so a new revision is converted again."""
  blob = os.path.basename(os.path.realpath(pth_path))
  return os.path.join(hub_cache_dir(), "san_jax", repo_id.replace("/", "--"), Path(pth_path).stem + "-" + blob[:16])


def resolve_name(name: str) -> str:
  """A model name -> the path of its converted parameters checkpoint (downloading and converting once)."""
  from san_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from san_jax.models import san as san_lib  # pylint: disable=g-import-not-at-top
  if name not in MODEL_NAMES:
    raise PretrainedError(f"unknown model name {name!r}; known: {', '.join(MODEL_NAMES)}")
  pth = hub_download(HUB_REPO, MODEL_NAMES[name])
  out = converted_dir(pth)
  if not os.path.isdir(out):
    flat, cfg, info = convert_pth(pth, base=name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    checkpoint.save_params(out, flat, {"san_config": san_lib.config_to_dict(cfg), "source": f"{HUB_REPO}/"
                                       f"{MODEL_NAMES[name]}", **info})
  return out


def _from_name(name: str, config=None) -> Pretrained:
  p = _from_params_dir(resolve_name(name), config)
  return dataclasses.replace(p, kind="name", origin=name, meta={**p.meta, "converted": p.origin})


# CLIP towers by open_clip name (the Hub repositories open_clip itself downloads them from) or by a Hugging
# Face CLIPModel id ("openai/clip-vit-base-patch16": config.json + model.safetensors).
CLIP_NAMES: Dict[str, Tuple[str, str]] = {
    "ViT-B-16/openai": ("timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors"),
    "ViT-L-14-336/openai": ("timm/vit_large_patch14_clip_336.openai", "open_clip_model.safetensors"),
}


def is_clip_name(source: str) -> bool:
  """An open_clip name of CLIP_NAMES, or a Hugging Face id "org/name" that is not a local path."""
  return source in CLIP_NAMES or (source.count("/") == 1 and not os.path.exists(source)
                                  and not source.startswith((".", "/")) and source not in MODEL_NAMES)


def resolve_clip(name: str) -> str:
  """A CLIP name -> the path of its converted parameters checkpoint (what convert.clip_checkpoint writes),
  downloading and converting once; cached beside the Hub cache like SAN names."""
  from san_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from san_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  try:
    if name in CLIP_NAMES:
      repo, filename = CLIP_NAMES[name]
      weights, config_path = hub_download(repo, filename), None
    else:
      repo = name
      weights, config_path = hub_download(repo, "model.safetensors"), hub_download(repo, "config.json")
  except PretrainedError as e:
    local = "" if name in CLIP_NAMES else f" (nor is there a local checkpoint {os.path.abspath(name)})"
    raise PretrainedError(f"CLIP {name!r}{local}: {e}") from e
  out = converted_dir(weights, repo)
  if not os.path.isdir(out):
    from convert import clip_checkpoint as cc  # pylint: disable=g-import-not-at-top
    sd, _ = cc.read_checkpoint(weights)
    hf_config = json.loads(Path(config_path).read_text()) if config_path else None
    flat, cfg, _ = cc.convert_state_dict(sd, "hf" if config_path else "auto", hf_config=hf_config)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    checkpoint.save_params(out, flat, clip_lib.config_to_dict(cfg))
  return out


# ---- training runs ------------------------------------------------------------------------------------------
def run_config(workdir: str):
  """The run's ConfigDict (WORKDIR/config.json, which training writes before its first step)."""
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise PretrainedError(f"{path} not found: is {workdir} a training run directory?")
  return ConfigDict(json.loads(path.read_text()))


def frozen_init_params(cfg) -> Optional[Dict]:
  """The flat parameters training loaded from `train.init_from` (None when the run started from its seed)."""
  if not cfg.train.get("init_from"):
    return None
  from san_jax.train import loop  # pylint: disable=g-import-not-at-top
  try:
    return loop.load_init_params(cfg.train.init_from)
  except FileNotFoundError as e:
    raise PretrainedError(
        f"the run's frozen weights, train.init_from={cfg.train.init_from!r}: {e} (a relative path is read from "
        f"the current directory, as training read it: run from the directory the training ran in)") from None


def seeded_params(model_cfg, seed: int) -> Dict:
  """{path: np.ndarray} of the SAN's own random initialisation with `jax.random.key(seed)`, the values
  `steps.Trainer.init` draws (same key, same module construction; jitted, so no op-by-op compilation)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from san_jax.models import params as params_lib  # pylint: disable=g-import-not-at-top
  from san_jax.models import san as san_lib  # pylint: disable=g-import-not-at-top
  build = jax.jit(lambda key: params_lib.flat_params(san_lib.SAN(model_cfg, rngs=nnx.Rngs(key))))
  return {p: np.asarray(v) for p, v in build(jax.random.key(seed)).items()}


def _from_workdir(workdir: str, step: Optional[int] = None, config=None) -> Pretrained:
  from san_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from san_jax.models import san as san_lib  # pylint: disable=g-import-not-at-top
  cfg = run_config(workdir)
  model_cfg = san_lib.config_from_dict(cfg.model.to_dict())
  if config is not None:
    check_geometry(as_san_config(config), model_cfg, f"{workdir}/config.json")
  ckdir = Path(workdir) / "checkpoints"
  steps = _train_steps(ckdir)
  if not steps:
    raise PretrainedError(f"no train-state checkpoint under {ckdir} (has the run saved a step yet?)")
  if step is not None and int(step) not in steps:
    raise PretrainedError(f"{ckdir}: no step {step}; saved steps: {steps}")
  trainable = None
  for s in ([int(step)] if step is not None else reversed(steps)):
    try:
      trainable = checkpoint.restore_train_params(ckdir, s)
      step = s
      break
    except Exception as e:  # a damaged latest step: the one before it, as training's resume does
      if len(steps) == 1 or s == steps[0] or step is not None:
        raise PretrainedError(f"{ckdir}: step {s} is unreadable ({type(e).__name__}: {e})") from e
      import logging  # pylint: disable=g-import-not-at-top
      logging.getLogger("san_jax.pretrained").warning("step %d in %s is unreadable (%s); trying the one before",
                                                      s, ckdir, type(e).__name__)
  flat = seeded_params(model_cfg, int(cfg.train.seed))
  for source in (frozen_init_params(cfg) or {}), trainable:
    flat.update({p: np.asarray(v) for p, v in source.items() if p in flat})
  unknown = sorted(".".join(map(str, p)) for p in trainable if p not in flat)
  if unknown:
    raise PretrainedError(f"{ckdir}/{step}: trainable parameters {unknown[:5]} are not in the run's model "
                          "(config.json describes another geometry)")
  return Pretrained(model_from_params(flat, model_cfg), model_cfg, "workdir", os.path.abspath(workdir),
                    step=int(step), run_config=cfg)


# ---- the one function ---------------------------------------------------------------------------------------
def load(source: str, *, step: Optional[int] = None, config=None, kind: Optional[str] = None) -> Pretrained:
  """A ready SAN from `source` (a model name, an official .pth, a parameters checkpoint or a training run).

  step: the training step (workdir only; default the latest readable one). config: the model geometry the
  caller expects (SANConfig, name, or a config's `model` section); a source of another geometry raises
  naming the differing keys; for a .pth without case.json it is the geometry. kind: the kind the caller
  asked for ("params" accepts params and pth, "workdir" only a run); another kind raises naming both.
  """
  source = os.fspath(source)
  found = detect(source)
  if kind is not None:
    allowed = {"params": ("params", "pth"), "pth": ("params", "pth")}.get(kind, (kind,))
    if found not in allowed:
      raise PretrainedError(f"{source} is {_KIND_WORDS[found]}, not {_KIND_WORDS[kind]}: pass it with "
                            f"{_KIND_FLAGS[found]}")
  if step is not None and found != "workdir":
    raise PretrainedError(f"step={step} applies to a training run; {source} is {_KIND_WORDS[found]}")
  if found == "name":
    return _from_name(source, config)
  if found == "pth":
    return _from_pth(source, config)
  if found == "params":
    return _from_params_dir(source, config)
  return _from_workdir(source, step, config)


def random_model(model_config, seed: int = 0):
  """A SAN with the model's own random initialisation, from a config's `model` section."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from san_jax.models import san as san_lib  # pylint: disable=g-import-not-at-top
  d = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  return san_lib.SAN(san_lib.config_from_dict(d), rngs=nnx.Rngs(seed))


def quick_random_params(model_config, seed: int = 0) -> Tuple[Dict, Dict]:
  """(flat params, san_config dict) drawn with numpy: LayerNorm scales 1, biases 0, kernels N(0, 1/fan_in),
  embeddings N(0, 0.02), CLIP's logit scale. For smoke tests: on CPU this skips the seconds of op-by-op
  compilation that the model's own initialisers cost; it is *not* the model's initialisation."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from san_jax.models import params as params_lib  # pylint: disable=g-import-not-at-top
  from san_jax.models import san as san_lib  # pylint: disable=g-import-not-at-top
  d = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  cfg = san_lib.config_from_dict(d)
  shapes = params_lib.param_shapes(nnx.eval_shape(lambda: san_lib.SAN(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in sorted(shapes.items(), key=lambda kv: params_lib.dotted(kv[0])):
    name = path[-1]
    if name == "scale":
      flat[path] = np.ones(shape, np.float32)
    elif name == "bias":
      flat[path] = np.zeros(shape, np.float32)
    elif name == "logit_scale":
      flat[path] = np.full(shape, np.log(1 / 0.07), np.float32)
    elif name == "kernel":
      fan_in = int(np.prod(shape[:-1])) or 1
      flat[path] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    else:
      flat[path] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
  return flat, san_lib.config_to_dict(cfg)


def random(model_config, seed: int = 0) -> Pretrained:
  """Numpy-drawn weights of a config's geometry (`quick_random_params`): smoke tests."""
  flat, san_config = quick_random_params(model_config, seed=seed)
  return Pretrained(model_from_params(flat, san_config), as_san_config(san_config), "random", f"seed {seed}")

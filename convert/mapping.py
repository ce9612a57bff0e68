"""The conversion engine: a table of entries between PyTorch state-dict keys and NNX parameter paths.

Each converter (CLIP, SAN) builds its table for one geometry; this module applies it in either direction
with strict accounting: every source key consumed, every target leaf filled, every shape checked. Errors
list everything that is wrong at once (missing, unexpected and mis-shaped keys), never the first only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from san_jax.checkpoint import KeyPath  # an NNX flat-state path, e.g. ("visual", "transformer", 0, "ln_1", "scale")

Arrays = List[np.ndarray]


class ConversionError(ValueError):
  """A checkpoint does not match the model: the message lists every problem found."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """torch keys <-> NNX paths. `to_nnx` maps the torch arrays (in key order) to the NNX arrays (in path
  order); `to_torch` is its inverse."""
  torch_keys: Tuple[str, ...]
  nnx_paths: Tuple[KeyPath, ...]
  to_nnx: Callable[[Arrays], Arrays]
  to_torch: Callable[[Arrays], Arrays]


# ---- the transforms every table uses ----------------------------------------------------------------
def _same(xs):
  return list(xs)


def _t(xs):
  return [np.ascontiguousarray(x.T) for x in xs]


def _oihw_to_hwio(xs):
  return [np.ascontiguousarray(x.transpose(2, 3, 1, 0)) for x in xs]


def _hwio_to_oihw(xs):
  return [np.ascontiguousarray(x.transpose(3, 2, 0, 1)) for x in xs]


def _split3(xs):
  return list(np.split(xs[0], 3, axis=0))


def _cat3(xs):
  return [np.concatenate(xs, axis=0)]


def _split3_t(xs):
  return [np.ascontiguousarray(w.T) for w in np.split(xs[0], 3, axis=0)]


def _cat3_t(xs):
  return [np.concatenate([w.T for w in xs], axis=0)]


def same(key: str, path: KeyPath) -> Entry:
  """A tensor stored identically (embeddings, LayerNorm weight -> scale, biases)."""
  return Entry((key,), (path,), _same, _same)


def linear_kernel(key: str, path: KeyPath) -> Entry:
  """torch Linear weight [out, in] <-> Dense kernel [in, out]."""
  return Entry((key,), (path,), _t, _t)


def conv_kernel(key: str, path: KeyPath) -> Entry:
  """torch Conv2d weight OIHW <-> NNX Conv kernel HWIO."""
  return Entry((key,), (path,), _oihw_to_hwio, _hwio_to_oihw)


def fused_qkv_kernel(key: str, paths: Sequence[KeyPath]) -> Entry:
  """torch's fused in_proj_weight [3D, D] <-> q/k/v Dense kernels [D, D]."""
  return Entry((key,), tuple(paths), _split3_t, _cat3_t)


def fused_qkv_bias(key: str, paths: Sequence[KeyPath]) -> Entry:
  return Entry((key,), tuple(paths), _split3, _cat3)


def linear(prefix: str, path: KeyPath, bias: bool = True) -> List[Entry]:
  out = [linear_kernel(f"{prefix}.weight", path + ("kernel",))]
  if bias:
    out.append(same(f"{prefix}.bias", path + ("bias",)))
  return out


def conv(prefix: str, path: KeyPath, bias: bool = True) -> List[Entry]:
  out = [conv_kernel(f"{prefix}.weight", path + ("kernel",))]
  if bias:
    out.append(same(f"{prefix}.bias", path + ("bias",)))
  return out


def layer_norm(prefix: str, path: KeyPath) -> List[Entry]:
  return [same(f"{prefix}.weight", path + ("scale",)), same(f"{prefix}.bias", path + ("bias",))]


# ---- applying a table --------------------------------------------------------------------------------
def path_str(path: KeyPath) -> str:
  return ".".join(str(p) for p in path)


def _raise_if(problems: Dict[str, List[str]], what: str):
  lines = [f"{name} ({len(items)}): " + ", ".join(items[:50]) + (" ..." if len(items) > 50 else "")
           for name, items in problems.items() if items]
  if lines:
    raise ConversionError(f"{what}:\n  " + "\n  ".join(lines))


def torch_to_nnx(state_dict: Mapping[str, np.ndarray], table: Sequence[Entry],
                 target_shapes: Mapping[KeyPath, Tuple[int, ...]], *, what: str = "checkpoint",
                 ignore: Sequence[str] = ()) -> Dict[KeyPath, np.ndarray]:
  """Converts a torch state dict (numpy arrays) with `table`; `target_shapes` are the model's leaves.

  `ignore` names source keys that are known, checked elsewhere and carry nothing to convert.
  """
  expected = {k for e in table for k in e.torch_keys}
  missing = sorted(k for k in expected if k not in state_dict)
  unexpected = sorted(k for k in state_dict if k not in expected and k not in ignore)
  out: Dict[KeyPath, np.ndarray] = {}
  misshaped: List[str] = []
  for e in table:
    if any(k not in state_dict for k in e.torch_keys):
      continue
    arrays = e.to_nnx([np.asarray(state_dict[k]) for k in e.torch_keys])
    for path, arr in zip(e.nnx_paths, arrays):
      want = target_shapes.get(path)
      if want is None:
        misshaped.append(f"{path_str(path)} (no such model leaf, from {', '.join(e.torch_keys)})")
      elif tuple(arr.shape) != tuple(want):
        misshaped.append(f"{', '.join(e.torch_keys)}: model {path_str(path)} expects {tuple(want)}, "
                         f"converted shape {tuple(arr.shape)}")
      else:
        out[path] = arr
  covered = {p for e in table for p in e.nnx_paths}
  unfilled = sorted(path_str(p) for p in target_shapes if p not in covered)
  _raise_if({"missing keys": missing, "unexpected keys": unexpected, "wrong shapes": misshaped,
             "model leaves no entry fills": unfilled}, f"{what} does not match the model")
  return out


def nnx_to_torch(flat: Mapping[KeyPath, np.ndarray], table: Sequence[Entry], *,
                 what: str = "parameters") -> Dict[str, np.ndarray]:
  """The inverse: NNX leaves -> torch state dict (numpy). Every leaf must be used by the table."""
  used = {p for e in table for p in e.nnx_paths}
  missing = sorted(path_str(p) for p in used if p not in flat)
  unexpected = sorted(path_str(p) for p in flat if p not in used)
  _raise_if({"missing leaves": missing, "leaves no entry uses": unexpected}, f"{what} do not match the table")
  out: Dict[str, np.ndarray] = {}
  for e in table:
    for key, arr in zip(e.torch_keys, e.to_torch([np.asarray(flat[p]) for p in e.nnx_paths])):
      out[key] = arr
  return out


def conv1x1_as_linear(prefix: str, path: KeyPath, bias: bool = True) -> List[Entry]:
  """A torch 1x1 Conv2d [out, in, 1, 1] held as a Dense kernel [in, out] (same math on NHWC maps)."""
  to_nnx = lambda xs: [np.ascontiguousarray(xs[0].reshape(xs[0].shape[:2]).T)]
  to_torch = lambda xs: [np.ascontiguousarray(xs[0].T)[:, :, None, None]]
  out = [Entry((f"{prefix}.weight",), (path + ("kernel",),), to_nnx, to_torch)]
  if bias:
    out.append(same(f"{prefix}.bias", path + ("bias",)))
  return out


def clip_resblock(prefix: str, path: KeyPath) -> List[Entry]:
  """An open_clip ResidualAttentionBlock (nn.MultiheadAttention with fused in_proj) <-> ours."""
  attn = path + ("attn",)
  qkv = [attn + (n, "kernel") for n in ("q_proj", "k_proj", "v_proj")]
  qkv_b = [attn + (n, "bias") for n in ("q_proj", "k_proj", "v_proj")]
  return (layer_norm(f"{prefix}.ln_1", path + ("ln_1",))
          + [fused_qkv_kernel(f"{prefix}.attn.in_proj_weight", qkv),
             fused_qkv_bias(f"{prefix}.attn.in_proj_bias", qkv_b)]
          + linear(f"{prefix}.attn.out_proj", attn + ("out_proj",))
          + layer_norm(f"{prefix}.ln_2", path + ("ln_2",))
          + linear(f"{prefix}.mlp.c_fc", path + ("mlp", "c_fc"))
          + linear(f"{prefix}.mlp.c_proj", path + ("mlp", "c_proj")))

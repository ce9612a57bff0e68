"""Parity of san-jax against a golden case made by the official PyTorch SAN.

    python -m convert.check_parity CASE_DIR [--dtype float32|bfloat16] [--json OUT]

Builds the model from CASE_DIR/case.json (official cfg, CLIP model config, side-ViT kwargs), converts
CASE_DIR/model.pth, runs it on inputs.npz and compares every array of outputs.npz: one line per array
(name, shape, max abs error, tolerance, ok), then `parity: N/M arrays ok, max abs err X`. Exit 0 only
when all M arrays are produced and within tolerance (DESIGN §4): float arrays
max|a-b| <= max(2e-4*max|ref|, 10*floor), where floor is the official code's own 1-vs-2-thread deviation of
that array in CASE_DIR/noise_floor.json (`two_threads` for forward arrays, `two_threads_training` for
`loss/` and `grad/`) when the case has one; argmax maps >= 99.9% equal, integer assignments identical.
Arrays are dispatched by name pattern, so a case with any geometry, vocabulary or subset of the model
works; an array whose name no rule knows is reported as not ok.

Training arrays (whole-model cases): `match_<tag>_img<i>_{cost,pred_idx,tgt_idx}`, `loss/<term>`,
`loss/total` and `grad/<official key>` come from one jitted value-and-grad pass of SAN + the set criterion
on the case's targets (`gt_<i>_labels`, `gt_<i>_masks`), replaying the recorded point draws
(`points_matcher_<tag>_img<i>`, `points_criterion_<tag>_{oversample,random}`); <tag> is `final` for the
last deep-supervision output and `aux<j>` for output j. The mask losses (and so the gradients) are taken at
the recorded importance-sampled points `points_criterion_<tag>` when the case has them: the selection is a
top-k, and one near-tie swapped at the k-th place by float noise moves a gradient far more than its
tolerance (the official code's own 2-thread run selects differently from its 1-thread run). Our own
selection from the replayed draws is checked separately, as sets, in extra `input:` lines: >= 99.9% of the
points of every row in common. Gradients are d(loss/total)/d(param), mapped back to the official layout
through the conversion table.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import flags

from san_jax import cli

REL_TOL = 2e-4
FLOOR_FACTOR = 10.0  # tolerance = max(REL_TOL * max|ref|, FLOOR_FACTOR * the official code's own noise)
ARGMAX_AGREEMENT = 0.999
TRAINING_PREFIXES = ("loss/", "grad/")


class CaseError(ValueError):
  """A golden case directory that cannot be read: names the file and what is wrong with it."""


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
  if not path.exists():
    raise CaseError(f"{path}: missing (a golden case needs case.json, model.pth, inputs.npz, outputs.npz)")
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, zlib.error: all mean a damaged file
    raise CaseError(f"{path}: damaged or not an .npz archive ({type(e).__name__}: {e})") from None


def _load_json(path: Path, required: bool) -> Optional[Dict[str, Any]]:
  if not path.exists():
    if required:
      raise CaseError(f"{path.parent}: no {path.name} (not a golden case directory)")
    return None
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise CaseError(f"{path}: damaged, not JSON ({e})") from None


class Case:
  def __init__(self, case_dir: str):
    self.dir = Path(case_dir)
    if not self.dir.is_dir():
      raise CaseError(f"{self.dir}: no such directory")
    self.meta = _load_json(self.dir / "case.json", required=True)
    self.noise_floor = _load_json(self.dir / "noise_floor.json", required=False) or {}
    self.inputs = _load_npz(self.dir / "inputs.npz")
    self.outputs = _load_npz(self.dir / "outputs.npz")

  def floor(self, name: str) -> Optional[float]:
    """The official code's own 1-vs-2-thread max abs deviation of array `name`, when recorded."""
    table = self.noise_floor.get("two_threads_training" if name.startswith(TRAINING_PREFIXES) else "two_threads")
    entry = (table or {}).get(name)
    return float(entry["max_abs"]) if isinstance(entry, dict) and "max_abs" in entry else None


class Runner:
  """Computes arrays lazily by name; results of whole passes are cached."""

  def __init__(self, case: Case, dtype: str = "float32"):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from convert import san_checkpoint as sc
    from san_jax.models import params as params_lib
    from san_jax.models.san import SAN
    from san_jax.models.side_adapter import SideAdapterNetwork

    self.case, self.jnp, self.jax = case, jnp, jax
    meta = case.meta
    self.cfg = sc.config_from_official(meta["san_cfg"], meta.get("clip_model_config"),
                                       (meta.get("side_adapter_timm_vit") or {}).get("kwargs"))
    sd = sc.load_torch_state_dict(str(case.dir / "model.pth"))
    self.whole = any(k.startswith(("clip_visual_extractor.", "clip_rec_head.", "ov_classifier.")) for k in sd)
    compute = None if dtype == "float32" else jnp.dtype(dtype)
    if self.whole:
      self.model = SAN(self.cfg, rngs=nnx.Rngs(0), dtype=compute)
      flat = sc.official_to_flat(sd, self.cfg, params_lib.param_shapes(self.model))
    else:
      self.model = SideAdapterNetwork(self.cfg.side, rngs=nnx.Rngs(0), dtype=compute)
      shapes = {("side_adapter_network",) + p: s for p, s in params_lib.param_shapes(self.model).items()}
      flat = {p[1:]: v for p, v in sc.official_to_flat(sd, self.cfg, shapes).items()}
    params_lib.load_flat_params(self.model, flat)
    self._cache: Dict[str, Any] = {}

  # ---- inputs ----------------------------------------------------------------------------------------
  def images(self) -> Tuple[List[np.ndarray], List[Tuple[int, int]]]:
    inp = self.case.inputs
    if "image_uint8_hwc" in inp:
      return [inp["image_uint8_hwc"]], [tuple(inp["image_uint8_hwc"].shape[:2])]
    n = len([k for k in inp if re.fullmatch(r"image_\d+_uint8_hwc", k)])
    imgs = [inp[f"image_{i}_uint8_hwc"] for i in range(n)]
    return imgs, [tuple(int(v) for v in inp.get(f"image_{i}_size_hw", img.shape[:2])) for i, img in enumerate(imgs)]

  def batch(self) -> np.ndarray:
    if "batch" not in self._cache:
      from san_jax.models.san import preprocess
      imgs, _ = self.images()
      self._cache["batch"], _ = preprocess(imgs, self.cfg)
    return self._cache["batch"]

  def clip_maps_from_inputs(self) -> Dict[int, Any]:
    maps = {}
    for k, v in self.case.inputs.items():
      mt = re.fullmatch(r"clip_feat_(\d+)", k)
      if mt:
        maps[int(mt.group(1))] = self.jnp.asarray(v.astype(np.float32).transpose(0, 2, 3, 1))
    return maps

  # ---- passes ----------------------------------------------------------------------------------------
  def text(self) -> Dict[str, np.ndarray]:
    if "text" not in self._cache:
      tokens = self.tokens()
      def text_pass(t):
        head = self.model.ov_classifier
        per_template = head.text_embeddings(t)
        class_emb = head.class_embeddings(t)
        return {"text_embed_per_template": per_template, "class_embeddings": class_emb, **head.classifier(class_emb)}
      out = self.jax.jit(text_pass)(self.jnp.asarray(tokens))
      self._cache["text"] = {k: np.asarray(v, np.float32) for k, v in out.items()}
    return self._cache["text"]

  def tokens(self) -> np.ndarray:
    from san_jax.text import classifier
    from san_jax.text import templates as templates_lib
    templates = self.case.meta.get("templates") or templates_lib.get_templates(self.cfg.template_set)
    return classifier.prompt_tokens(self.case.meta["vocabulary"], templates)

  def run(self, train: bool) -> Dict[str, Any]:
    key = f"run_train={train}"
    if key not in self._cache:
      batch = self.jnp.asarray(self.batch())
      if self.whole:
        cls = self.jnp.asarray(self.text()["class_embeddings"])
        fn = self.jax.jit(lambda x, c: self.model(x, c, train=train, return_intermediates=True))
        out = fn(batch, cls)
      else:
        idxs = self.cfg.side.deep_supervision_idxs if train else self.cfg.side.deep_supervision_idxs[-1:]
        fn = self.jax.jit(lambda x, f: self.model(x, f, deep_supervision_idxs=idxs))
        outs = fn(batch, self.clip_maps_from_inputs())
        out = {"mask_preds": self.jnp.stack([m for m, _ in outs], 1), "attn_bias": self.jnp.stack([a for _, a in outs], 1)}
      self._cache[key] = self.jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32) if hasattr(a, "dtype") else a, out)
    return self._cache[key]

  def semseg(self, i: int) -> np.ndarray:
    key = f"semseg{i}"
    if key not in self._cache:
      from san_jax.models.san import semantic_inference
      out = self.run(train=False)
      _, sizes = self.images()
      inp = self.case.inputs
      out_hw = tuple(int(v) for v in inp.get(f"image_{i}_output_size_hw", sizes[i]))
      fn = self.jax.jit(semantic_inference, static_argnums=(2, 3, 4))
      self._cache[key] = np.asarray(fn(out["mask_logits"][i, -1], out["mask_preds"][i, -1],
                                       tuple(self.batch().shape[1:3]), tuple(sizes[i]), out_hw))
    return self._cache[key]

  # ---- training: matcher, losses, gradients --------------------------------------------------------------
  def num_outputs(self) -> int:
    return len(self.cfg.side.deep_supervision_idxs)

  def criterion_config(self):
    n_cls = self.text()["classifier_weight"].shape[0] - 1
    return criterion_config_from_official(self.case.meta["san_cfg"], n_cls)

  def targets(self) -> Dict[str, np.ndarray]:
    """The case's per-image targets, padded to the batch size (SAN.prepare_targets) and a common count."""
    if "targets" not in self._cache:
      from san_jax.losses import criterion
      inp = self.case.inputs
      n = len(self.images()[0])
      missing = [k for i in range(n) for k in (f"gt_{i}_labels", f"gt_{i}_masks") if k not in inp]
      if missing:
        raise KeyError(f"training arrays need the targets {missing} in inputs.npz")
      self._cache["targets"] = criterion.pad_targets([inp[f"gt_{i}_labels"] for i in range(n)],
                                                     [inp[f"gt_{i}_masks"] for i in range(n)],
                                                     tuple(self.batch().shape[1:3]))
    return self._cache["targets"]

  def match_slots(self) -> np.ndarray:
    """valid [B, K]: slot k of image b holds a match when k < min(Q, n_b) (independent of the assignment)."""
    valid = self.targets()["valid"]
    k = min(self.cfg.side.num_queries, valid.shape[1])
    return np.arange(k)[None, :] < np.minimum(valid.sum(1), self.cfg.side.num_queries)[:, None]

  def draws(self) -> Dict[str, np.ndarray]:
    """The recorded point draws, in the criterion's layout: per output, matcher points per image and the
    importance sampler's draws per match slot (the recorded rows are the matched masks in batch order);
    plus "points", the recorded selection the losses are taken at, when every output has one."""
    inp, n_img, slots = self.case.inputs, len(self.images()[0]), self.match_slots()
    matcher, over, rand, points = [], [], [], []
    for s in range(self.num_outputs()):
      tag = output_tag(s, self.num_outputs())
      names = [f"points_matcher_{tag}_img{b}" for b in range(n_img)]
      names += [f"points_criterion_{tag}_oversample", f"points_criterion_{tag}_random"]
      missing = [k for k in names if k not in inp]
      if missing:
        raise KeyError(f"training arrays need the recorded point draws {missing} in inputs.npz")
      matcher.append(np.concatenate([inp[k].reshape((1,) + inp[k].shape[-2:]) for k in names[:n_img]]))
      over.append(scatter_slots(inp[names[-2]], slots, names[-2]))
      rand.append(scatter_slots(inp[names[-1]], slots, names[-1]))
      if f"points_criterion_{tag}" in inp:
        points.append(scatter_slots(inp[f"points_criterion_{tag}"], slots, f"points_criterion_{tag}"))
    draws = {"matcher": np.stack(matcher), "oversample": np.stack(over), "random": np.stack(rand)}
    if len(points) == self.num_outputs():
      draws["points"] = np.stack(points)
    return draws

  def grad_keys(self) -> List[str]:
    return sorted(k[len("grad/"):] for k in self.case.outputs if k.startswith("grad/"))

  def training(self) -> Dict[str, Any]:
    """One jitted value-and-grad pass: losses, matches, sampled points and the requested gradients."""
    if "training" in self._cache:
      return self._cache["training"]
    if not self.whole:
      raise KeyError("training arrays need the whole SAN (this case holds only part of the model)")
    from flax import nnx
    from convert import san_checkpoint as sc
    from san_jax.losses import criterion

    jax, jnp = self.jax, self.jnp
    crit_cfg = self.criterion_config()
    by_key = {key: (e, j) for e in sc.san_table(self.cfg) for j, key in enumerate(e.torch_keys)}
    unknown = [k for k in self.grad_keys() if k not in by_key]
    if unknown:
      raise KeyError(f"no parameter maps to the official keys {unknown}")
    wanted = {p for k in self.grad_keys() for p in by_key[k][0].nnx_paths}
    graphdef, diff, rest = nnx.split(self.model, lambda path, _: tuple(path) in wanted, ...)

    def loss_fn(diff, rest, images, class_embeddings, targets, draws):
      model = nnx.merge(graphdef, diff, rest)  # the classifier (bg_embed, logit_scale) runs inside the forward
      outputs = model(images, class_embeddings, train=True)
      losses, aux = criterion.set_criterion(outputs, targets, crit_cfg, draws=draws)
      return criterion.total_loss(losses), (losses, aux)

    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (total, (losses, aux)), grads = fn(diff, rest, jnp.asarray(self.batch()),
                                       jnp.asarray(self.text()["class_embeddings"]), self.targets(), self.draws())
    flat_grads = {tuple(p): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
                  for p, v in nnx.to_flat_state(grads)}
    official = {}
    for key in self.grad_keys():
      entry, j = by_key[key]
      official[key] = entry.to_torch([flat_grads[p] for p in entry.nnx_paths])[j]
    to_np = lambda t: jax.tree_util.tree_map(np.asarray, t)
    self._cache["training"] = {"total": np.asarray(total), "losses": to_np(losses), "matches": to_np(aux["matches"]),
                               "point_coords": to_np(aux["point_coords"]), "grads": official}
    return self._cache["training"]

  def training_array(self, name: str) -> np.ndarray:
    if name == "loss/total":
      return self.training()["total"].reshape(1)
    if name.startswith("loss/"):
      losses = self.training()["losses"]
      if name[5:] not in losses:
        raise KeyError(f"the criterion gives {sorted(losses)}")
      return losses[name[5:]].reshape(1)
    if name.startswith("grad/"):
      return self.training()["grads"][name[5:]]
    mt = re.fullmatch(r"match_(final|aux\d+)_img(\d+)_(cost|pred_idx|tgt_idx)", name)
    if not mt:
      raise KeyError(name)
    slot = tag_slot(mt.group(1), self.num_outputs())
    b = int(mt.group(2))
    match = self.training()["matches"][slot]
    if mt.group(3) == "cost":
      return match["cost"][b][:, :int(self.targets()["valid"][b].sum())]
    return match[mt.group(3)][b][match["valid"][b]].astype(np.int64)

  def selected_points(self, tag: str) -> np.ndarray:
    """Our importance-sampled points of the matched masks, in the recorded [N_matched, P, 2] order."""
    slot = tag_slot(tag, self.num_outputs())
    return self.training()["point_coords"][slot][self.match_slots()]

  # ---- arrays by name ----------------------------------------------------------------------------------
  def _ds_slot(self, train: bool, ds: Optional[int]) -> Tuple[Dict[str, Any], int]:
    out = self.run(train)
    if ds is None:
      return out, -1
    idxs = list(self.cfg.side.deep_supervision_idxs)
    if ds not in idxs:
      raise KeyError(f"deep-supervision index {ds} not in the config's {idxs}")
    return out, idxs.index(ds)

  def _bias(self, out, slot, key="attn_bias"):
    b = out[key][:, slot]  # [B, layers, heads, Q, h, w] -> torch.cat of the layer chunks along heads
    return b.reshape((b.shape[0], b.shape[1] * b.shape[2]) + b.shape[3:])

  def compute(self, name: str) -> np.ndarray:
    if name.startswith(("loss/", "grad/", "match_")):
      return self.training_array(name)
    mt = re.fullmatch(r"(eval|train_ds(\d+))_(.+)", name)
    if mt:
      train = mt.group(1) != "eval"
      out, slot = self._ds_slot(train, int(mt.group(2)) if train else None)
      what = mt.group(3)
      if what == "mask_preds":
        return out["mask_preds"][:, slot]
      if what == "attn_bias":
        return self._bias(out, slot)
      if what == "attn_bias_moments":
        return bias_moments(self._bias(out, slot))
      if what == "attn_bias_qsubset":
        return self._bias(out, slot)[:, :, self.case.outputs["attn_bias_query_subset"]]
      if what == "rec_attn_bias_downsampled":
        return self._bias(out, slot, "attn_bias_downsampled")
      if what == "mask_embs":
        return out["mask_embs"][:, slot]
      if what == "mask_logits":
        return out["mask_logits"][:, slot]
      raise KeyError(name)
    mt = re.fullmatch(r"clip_feat_(\d+)(_cls_token)?", name)
    if mt:
      out = self.run(train=False)
      tokens = out["clip_taps"][int(mt.group(1))]
      if mt.group(2):
        return tokens[None, :, 0]
      p = self.cfg.clip.vision.patch_size
      h, w = out["clip_input"].shape[1] // p, out["clip_input"].shape[2] // p
      return tokens[:, 1:].reshape(tokens.shape[0], h, w, -1).transpose(0, 3, 1, 2)
    if name == "clip_input":
      return self.run(train=False)["clip_input"].transpose(0, 3, 1, 2)
    if name in ("classifier_normed", "classifier_weight", "text_embed_per_template"):
      return self.text()[name]
    if name == "logit_scale_exp":
      return np.exp(np.asarray(self.model.ov_classifier.logit_scale[...], np.float32)).reshape(1)
    mt = re.fullmatch(r"sem_seg_(argmax_)?(\d+)", name)
    if mt:
      s = self.semseg(int(mt.group(2)))
      return s.argmax(0) if mt.group(1) else s
    raise KeyError(name)


def bias_moments(bias: np.ndarray) -> np.ndarray:
  """float64 [..., 4]: sum, row-weighted sum, column-weighted sum, sum of squares over the last two axes."""
  b = bias.astype(np.float64)
  ys = np.arange(b.shape[-2], dtype=np.float64)[:, None]
  xs = np.arange(b.shape[-1], dtype=np.float64)[None, :]
  return np.stack([b.sum((-2, -1)), (b * ys).sum((-2, -1)), (b * xs).sum((-2, -1)), (b * b).sum((-2, -1))], -1)


def output_tag(slot: int, num_outputs: int) -> str:
  """Golden-case name of a deep-supervision output: 'final' for the last, 'aux<slot>' for the others."""
  return "final" if slot == num_outputs - 1 else f"aux{slot}"


def tag_slot(tag: str, num_outputs: int) -> int:
  slot = num_outputs - 1 if tag == "final" else int(tag[3:])
  if not 0 <= slot < num_outputs or output_tag(slot, num_outputs) != tag:
    raise KeyError(f"{tag!r} names no deep-supervision output of {num_outputs}")
  return slot


def scatter_slots(rows: np.ndarray, slots: np.ndarray, what: str) -> np.ndarray:
  """Recorded per-match rows [N_matched, ...] (matched masks in batch order) -> per slot [B, K, ...]."""
  if rows.shape[0] != slots.sum():
    raise KeyError(f"{what} has {rows.shape[0]} rows but the targets give {int(slots.sum())} matches")
  out = np.zeros(slots.shape + rows.shape[1:], np.float32)
  out[slots] = rows
  return out


def criterion_config_from_official(san_cfg: Dict[str, Any], num_classes: int):
  """CriterionConfig from the official cfg's MODEL.SAN (Mask2Former defaults where a key is absent)."""
  from san_jax.losses.criterion import CriterionConfig

  s = (san_cfg["MODEL"] if "MODEL" in san_cfg else san_cfg)["SAN"]
  if "NUM_CLASSES" in s and int(s["NUM_CLASSES"]) != num_classes:
    raise ValueError(f"MODEL.SAN.NUM_CLASSES={s['NUM_CLASSES']} but the classifier has {num_classes} classes")
  return CriterionConfig(num_classes=num_classes, eos_coef=float(s.get("NO_OBJECT_WEIGHT", 0.1)),
                         class_weight=float(s.get("CLASS_WEIGHT", 2.0)), mask_weight=float(s.get("MASK_WEIGHT", 5.0)),
                         dice_weight=float(s.get("DICE_WEIGHT", 5.0)), num_points=int(s.get("TRAIN_NUM_POINTS", 112 * 112)),
                         oversample_ratio=float(s.get("OVERSAMPLE_RATIO", 3.0)),
                         importance_sample_ratio=float(s.get("IMPORTANCE_SAMPLE_RATIO", 0.75)))


METADATA = {"attn_bias_query_subset"}  # index lists that select stored subsets: not model outputs


def compare(name: str, ref: np.ndarray, got: Optional[np.ndarray], floor: Optional[float] = None) -> Dict[str, Any]:
  """One row: float arrays within max(REL_TOL * max|ref|, FLOOR_FACTOR * floor); `floor` is the official
  code's own noise on that array (None: not recorded, the relative bound alone)."""
  row = {"name": name, "shape": list(ref.shape)}
  if got is None:
    return {**row, "ok": False, "err": None, "tol": None}
  got = np.asarray(got)
  if tuple(got.shape) != tuple(ref.shape):
    return {**row, "ok": False, "err": None, "tol": None, "note": f"shape {tuple(got.shape)}"}
  if "argmax" in name:
    agree = float(np.mean(got.astype(np.int64) == ref.astype(np.int64)))
    return {**row, "ok": agree >= ARGMAX_AGREEMENT, "err": 1.0 - agree, "tol": 1.0 - ARGMAX_AGREEMENT,
            "note": f"agreement {agree:.6f}"}
  if not np.issubdtype(ref.dtype, np.floating):
    same = bool(np.array_equal(got.astype(ref.dtype), ref))
    return {**row, "ok": same, "err": 0.0 if same else 1.0, "tol": 0.0}
  err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
  rel_tol = REL_TOL * float(np.max(np.abs(ref))) if ref.size else 0.0
  tol = max(rel_tol, FLOOR_FACTOR * floor) if floor is not None else rel_tol
  row = {**row, "ok": err <= tol, "err": err, "tol": tol}
  if floor is not None and tol > rel_tol:
    row["note"] = f"noise-floor bound ({FLOOR_FACTOR:g} x {floor:.3e}; relative bound {rel_tol:.3e})"
  return row


def _point_keys(p: np.ndarray) -> np.ndarray:
  """Points [..., P, 2] float32 -> one int64 per point (the exact bit pattern of the (x, y) pair)."""
  return np.ascontiguousarray(p, np.float32).view(np.int64)[..., 0]


def common_points(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """Per row of [..., P, 2]: the fraction of the reference's points that `got` also holds (multiset
  intersection of exact coordinates; order is ignored, so one swapped point costs 1/P, not a shift)."""
  g, r = _point_keys(got), _point_keys(ref)
  g, r = g.reshape(-1, g.shape[-1]), r.reshape(-1, r.shape[-1])
  out = np.empty(len(r))
  for i, (a, b) in enumerate(zip(g, r)):
    va, ca = np.unique(a, return_counts=True)
    vb, cb = np.unique(b, return_counts=True)
    _, ia, ib = np.intersect1d(va, vb, assume_unique=True, return_indices=True)
    out[i] = np.minimum(ca[ia], cb[ib]).sum() / max(len(b), 1)
  return out.reshape(ref.shape[:-2])


def selected_points_rows(case: Case, runner: Runner) -> List[Dict[str, Any]]:
  """Our importance-sampled points vs the recorded `points_criterion_<tag>` (same draws replayed).

  The selection is a top-k of -|logit| over the oversampled points, in descending order: float noise in
  the logits reorders near-ties (harmless: only the summation order changes) and can swap a near-tie at
  the k-th place (one point for another). So each row is compared as a set: >= 99.9% of the recorded points
  of every row must be among ours (`common_points`); the note gives the worst row, the mean over rows and
  the fraction identical in place. The losses and gradients themselves are taken at the recorded points.
  """
  rows = []
  for name in sorted(case.inputs):
    mt = re.fullmatch(r"points_criterion_(final|aux\d+)", name)
    if not mt or not any(k.startswith(("loss/", "grad/", "match_")) for k in case.outputs):
      continue
    ref = case.inputs[name]
    row = {"name": f"input:{name}", "shape": list(ref.shape)}
    try:
      got = runner.selected_points(mt.group(1))
    except KeyError as e:
      rows.append({**row, "ok": False, "err": None, "tol": None, "note": f"not computed ({e})"})
      continue
    if got.shape != ref.shape:
      rows.append({**row, "ok": False, "err": None, "tol": None, "note": f"shape {got.shape}"})
      continue
    in_place = float(np.mean(np.all(got == ref, axis=-1))) if ref.size else 1.0
    common = common_points(got, ref) if ref.size else np.ones(1)
    worst = float(common.min())
    rows.append({**row, "ok": worst >= ARGMAX_AGREEMENT, "err": 1.0 - worst, "tol": 1.0 - ARGMAX_AGREEMENT,
                 "note": f"points in common: worst row {worst:.6f}, mean {float(common.mean()):.6f}; "
                         f"same order {in_place:.6f}"})
  return rows


def check(case_dir: str, dtype: str = "float32", out=sys.stdout) -> Tuple[List[Dict[str, Any]], bool]:
  case = Case(case_dir)
  runner = Runner(case, dtype)
  rows = []
  extra = []
  # Inputs that our own preprocessing reproduces: checked too, reported as extra lines.
  if "text_tokens" in case.inputs and runner.whole:
    extra.append(compare("input:text_tokens", case.inputs["text_tokens"], runner.tokens()))
  if "images_normalized_padded" in case.inputs:
    extra.append(compare("input:images_normalized_padded", case.inputs["images_normalized_padded"],
                         runner.batch().transpose(0, 3, 1, 2)))
  if "image_normalized_checksum" in case.inputs:
    x = runner.batch().astype(np.float64)
    extra.append(compare("input:image_normalized_checksum", case.inputs["image_normalized_checksum"],
                         np.array([x.sum(), (x * x).sum()])))
  for name in sorted(case.outputs):
    ref = case.outputs[name]
    if name in METADATA:
      rows.append({"name": name, "shape": list(ref.shape), "ok": True, "err": 0.0, "tol": 0.0, "note": "metadata"})
      continue
    try:
      got = runner.compute(name)
    except KeyError as e:
      rows.append({**compare(name, ref, None), "note": f"unknown array ({e})"})
      continue
    rows.append(compare(name, ref, got, case.floor(name)))
  extra += selected_points_rows(case, runner)
  for r in extra + rows:
    err = "-" if r["err"] is None else f"{r['err']:.3e}"
    tol = "-" if r["tol"] is None else f"{r['tol']:.3e}"
    note = f"  {r['note']}" if r.get("note") else ""
    print(f"{r['name']:<48} {str(tuple(r['shape'])):<22} err {err:>10}  tol {tol:>10}  "
          f"{'ok' if r['ok'] else 'FAIL'}{note}", file=out)
  n_ok = sum(r["ok"] for r in rows)
  errs = [r["err"] for r in rows if r["err"] is not None and "argmax" not in r["name"] and r.get("note") != "metadata"]
  print(f"parity: {n_ok}/{len(rows)} arrays ok, max abs err {max(errs) if errs else 0.0:.3e}", file=out)
  return extra + rows, n_ok == len(rows) and all(r["ok"] for r in extra)


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (parameters stay float32); "
                    "bfloat16 is for measuring, not passing", flag_values=fv)
  flags.DEFINE_string("json", None, "write the rows as JSON here", flag_values=fv)


def _main(f: flags.FlagValues, args: List[str]) -> int:
  try:
    rows, ok = check(args[0], f.dtype)
  except CaseError as e:
    print(f"check_parity: {e}", file=sys.stderr)
    return 2
  if f.json:
    Path(f.json).write_text(json.dumps(rows, indent=1))
  return 0 if ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m convert.check_parity CASE_DIR [--dtype bfloat16] [--json OUT]`; in-process: main([CASE_DIR])."""
  return cli.run(_define_flags, _main, argv, prog="check_parity", positional=["CASE_DIR"])


if __name__ == "__main__":
  main()

"""SAN's parts against their PyTorch references, side by side in one run, float32 and bfloat16.

  python -m benchmarks.components [--only clip_tower,side_vit,...] [--dtypes float32,bfloat16] [--runs 5]

Every row times the san-jax code and the PyTorch code that the official SAN runs for the same part, on the
same random weights and inputs (ViT-B/16 geometry, a 640x640 image, batch 1), and checks that both compute
the same thing (max |difference| of the outputs, printed). bfloat16 is san-jax's `dtype=bfloat16` modules
(float32 parameters, bfloat16 compute, float32 softmax) against `torch.autocast("cpu", torch.bfloat16)`.
Rows (inference unless marked train):
  matmul_2048      one 2048x2048 matmul (the product every san-jax Linear runs, `ops.gemm.dot_general`: the
                   AVX512-BF16 custom call in bfloat16 where it is available, XLA's dot otherwise; vs torch's @)
  clip_tower       CLIP B/16 image tower at 320x320 (SAN's CLIP input) vs open_clip's visual
  side_vit         the side ViT's 8 blocks on 100 query + 1600 patch tokens vs timm VisionTransformer blocks
                   of the same geometry (width 240, 6 heads; timm's attention is torch's fused
                   scaled_dot_product_attention, san-jax's the fused custom call where it applies)
  rec_blocks       the recognition blocks 9-11 with the attention bias of 100 queries vs open_clip's blocks
                   with the official (Q+1+L)^2 `attn_mask` per head, ln_post, proj, normalise
  postprocess      semantic post-processing: 100 masks 160x160 -> 640x640, 150 classes, label argmax, vs the
                   same torch ops (F.interpolate, sigmoid, softmax, einsum, argmax)
  side_vit_train   forward + backward of the side ViT blocks (gradients of every block parameter)
  clip_train       forward + backward of the frozen CLIP blocks 0-8 w.r.t. their input (the path of the
                   positional embedding's gradient); san-jax as it trains: blocks rematerialised
  rec_train        forward + backward of the recognition blocks w.r.t. the attention bias and the tokens
Timing: calls alternate between the two frameworks (background load falls on both alike); the median of
`--runs` timed calls after two warm-up calls. torch/jax > 1 means san-jax is faster.
Ceilings: each row also gives XLA's FLOP count of san-jax's program and the largest PyTorch / san-jax ratio
those FLOPs allow here, were every one of them run at the rate of the run's fastest 2048^2 matmul
(`add_ceilings`); the lines under the table sum the rows of the B/16 inference and of the train step. A
target ratio above a ceiling cannot be reached without doing fewer FLOPs.
"""

from __future__ import annotations

import os
import platform
import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from absl import flags

from benchmarks.common import program_flops, time_interleaved, write_json
from san_jax import cli

ROWS = ("matmul_2048", "clip_tower", "side_vit", "rec_blocks", "postprocess", "side_vit_train", "clip_train", "rec_train")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8")
Q, CLIP_GRID, SIDE_GRID, START = 100, (20, 20), (40, 40), 9  # B/16 at 640x640: CLIP at 320, side at 640


def machine_info() -> Dict[str, object]:
  """CPU model and the flags that decide the matmul kernels, core count and both frameworks' threads."""
  import jax
  import torch
  from san_jax.ops import gemm
  model, flags, ident = platform.processor() or platform.machine(), set(), {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key = line.split(":", 1)[0].strip()
        if key == "model name":
          model = line.split(":", 1)[1].strip()
        elif key in ("cpu family", "model", "cpu MHz") and key not in ident:
          ident[key] = line.split(":", 1)[1].strip()
        elif key == "flags":
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  # A model name as bare as "AMD EPYC" hides the generation, which decides AVX-512 throughput (family 25 is
  # Zen 3/4, 26 Zen 5: Zen 4 runs a 512-bit VDPBF16PS as two 256-bit halves).
  if ident.get("cpu family"):
    model += f" (family {ident['cpu family']} model {ident.get('model', '?')}, {float(ident.get('cpu MHz', 0)):.0f} MHz)"
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"cpu": model, "cpu_flags": [f for f in CPU_FLAGS if f in flags], "cores": cores,
          "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "jax": jax.__version__,
          # XLA:CPU runs its intra-op work on one thread per core the process may use; XLA_FLAGS can change it
          "xla_threads": cores, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "jax_device": str(jax.devices()[0]), "bf16_gemm": gemm.availability()[1],
          "f32_attention": gemm.f32_attention_availability()[1], "torch_matmul_gflops": torch_matmul_rates()}


def torch_matmul_rates(n: int = 512, runs: int = 3) -> Dict[str, float]:
  """torch's n^3 matmul rate in float32 and under bf16 autocast (GFLOP/s, best of `runs`): whether autocast
  is a best mode on this CPU at all (with AMX or AVX512-BF16 oneDNN runs bf16 natively; without, e.g. on a
  Zen 3 without AVX-512, it measured ~0.3 GFLOP/s against ~150 in float32, so bf16 rows take hours there)."""
  import time
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  rates = {}
  for name in ("float32", "bfloat16"):
    best = float("inf")
    for _ in range(runs + 1):
      t = time.perf_counter()
      if name == "bfloat16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
          a @ b
      else:
        a @ b
      best = min(best, time.perf_counter() - t)
    rates[name] = 2 * n ** 3 / best / 1e9
  return rates


# torch's bf16 autocast is one of its best modes where its bf16 matmul runs at least this fraction of its float32
# rate. The two cases are far apart: oneDNN with AVX512-BF16 or AMX runs bf16 1.3-6x faster than float32
# (a Zen 4: 384 vs 190 GFLOP/s at 2048^3; the issue's AMX Xeon: 1,819 vs 311), without bf16 instructions it
# emulates them at ~1% of float32 (a Zen 3: 1.3 vs 178 GFLOP/s at 512^3), where bf16 rows would take hours.
BF16_BEST_MODE_MIN_RATIO = 0.5


def best_dtypes(rates: Dict[str, float]) -> Tuple[List[str], str]:
  """(dtypes to compare, why) from `torch_matmul_rates()`: float32 always; bfloat16 where torch's autocast is
  a best mode on this CPU (BF16_BEST_MODE_MIN_RATIO), since each framework is compared in its best modes."""
  f32, bf16 = rates.get("float32", 0.0), rates.get("bfloat16", 0.0)
  if f32 > 0 and bf16 >= BF16_BEST_MODE_MIN_RATIO * f32:
    return ["float32", "bfloat16"], ""
  return ["float32"], (f"bfloat16 rows left out: torch's bf16 autocast matmul runs at {bf16:.1f} GFLOP/s on this CPU "
                       f"against {f32:.1f} in float32 (no native bf16 here), so float32 is its best mode; "
                       "--dtypes float32,bfloat16 runs them anyway")


# ---- models with the same weights -------------------------------------------------------------------
class Parts:
  """open_clip ViT-B/16 and a timm side ViT (random weights), and san-jax modules holding the same weights."""

  def __init__(self, seed: int = 0):
    import torch
    from convert import clip_checkpoint as cc
    from tests.torch_refs import open_clip, timm

    torch.manual_seed(seed)
    self.clip_ref = open_clip().create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval()
    self.clip_flat, self.clip_cfg = cc.open_clip_to_nnx({k: v.numpy() for k, v in self.clip_ref.state_dict().items()})
    self.side_ref = timm().models.vision_transformer.VisionTransformer(
        img_size=640, patch_size=16, embed_dim=240, depth=8, num_heads=6, mlp_ratio=4.0, class_token=False,
        global_pool="", num_classes=0, final_norm=False).eval()
    for p in list(self.clip_ref.parameters()):
      p.requires_grad_(False)
    self._jax = {}

  def clip(self, dtype):
    """The NNX CLIP with open_clip's weights, computing in `dtype` (None = float32)."""
    from flax import nnx
    from san_jax.models import clip
    from san_jax.models.params import load_flat_params
    key = ("clip", dtype)
    if key not in self._jax:
      m = nnx.eval_shape(lambda: clip.CLIP(self.clip_cfg, rngs=nnx.Rngs(0), dtype=dtype))
      load_flat_params(m, self.clip_flat)
      m.visual.transformer.remat = "full"  # as SAN trains it (no effect without a backward)
      self._jax[key] = m
    return self._jax[key]

  def side_blocks(self, dtype):
    """The san-jax side ViT blocks with timm's block weights."""
    from flax import nnx
    from san_jax.models import side_adapter
    from san_jax.models.params import load_flat_params
    key = ("side", dtype)
    if key not in self._jax:
      cfg = side_adapter.SideAdapterConfig()
      blocks = nnx.List([side_adapter.Block(cfg, rngs=nnx.Rngs(i), dtype=dtype) for i in range(cfg.depth)])
      flat = {}
      for i, blk in enumerate(self.side_ref.blocks):
        sd = {k: v.detach().numpy() for k, v in blk.state_dict().items()}
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
          a, b = name.split(".")
          flat[(i, a, b, "kernel")] = sd[f"{name}.weight"].T
          flat[(i, a, b, "bias")] = sd[f"{name}.bias"]
        for name in ("norm1", "norm2"):
          flat[(i, name, "scale")] = sd[f"{name}.weight"]
          flat[(i, name, "bias")] = sd[f"{name}.bias"]
      load_flat_params(blocks, flat)
      self._jax[key] = blocks
    return self._jax[key]


# ---- the torch side of each row --------------------------------------------------------------------
def torch_rec(visual, tokens, bias):
  """The official recognition: [SOS x Q, CLS, patches] through CLIP blocks START.. with the per-head
  (Q+1+L)^2 attention mask built from the max-pooled bias, then ln_post, proj, L2 normalisation."""
  import torch
  import torch.nn.functional as F
  b, heads = tokens.shape[0], bias.shape[1]
  small = F.adaptive_max_pool2d(bias.flatten(0, 2), CLIP_GRID).reshape(b, heads, Q, -1)
  n = tokens.shape[1]
  t = Q + n
  mask = tokens.new_zeros((b, heads, t, t))
  mask[:, :, :Q, :Q] = -100.0
  mask[:, :, :Q, :Q].diagonal(dim1=-2, dim2=-1).zero_()
  mask[:, :, :Q, Q] = -100.0
  mask[:, :, :Q, Q + 1:] = small
  mask[:, :, Q:, :Q] = -100.0
  mask = mask.reshape(b * heads, t, t)
  x = torch.cat([tokens[:, :1].expand(b, Q, tokens.shape[-1]), tokens], dim=1)
  for blk in visual.transformer.resblocks[START:]:
    x = blk(x, attn_mask=mask.to(x.dtype))
  return F.normalize(visual.ln_post(x[:, :Q]) @ visual.proj, dim=-1)


def torch_postprocess(mask_logits, mask_preds, out_hw):
  import torch
  import torch.nn.functional as F
  m = F.interpolate(mask_preds[None], size=out_hw, mode="bilinear", align_corners=False)[0]
  m = F.interpolate(m[None], size=out_hw, mode="bilinear", align_corners=False)[0].sigmoid()
  p = F.softmax(mask_logits, dim=-1)[..., :-1]
  sem = torch.einsum("qc,qhw->chw", p, m)
  return sem, sem.argmax(0)


# ---- one row ----------------------------------------------------------------------------------------
def bench_row(parts: Parts, row: str, dtype: str, runs: int) -> Dict[str, object]:
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx
  from san_jax.models import rec_head
  from san_jax.models import san as san_lib

  bf16 = dtype == "bfloat16"
  jdt = jnp.bfloat16 if bf16 else None
  rng = np.random.default_rng(0)
  autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else None
  d = parts.clip_cfg.vision.width
  cast = (lambda x: x.astype(jnp.bfloat16)) if bf16 else (lambda x: x)

  if row == "matmul_2048":
    a, b = (rng.standard_normal((2048, 2048), dtype=np.float32) for _ in range(2))
    from san_jax.ops import gemm
    jfn = jax.jit(lambda a, b: gemm.dot_general(cast(a), cast(b), (((1,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32))
    jargs, targs = (jnp.asarray(a), jnp.asarray(b)), (torch.from_numpy(a), torch.from_numpy(b))
    tfn = lambda a, b: (a @ b).float()
  elif row == "clip_tower":
    from benchmarks.clip_forward import torch_image_forward
    visual = parts.clip(jdt).visual
    img = rng.standard_normal((1, 320, 320, 3), dtype=np.float32)
    gd, st = nnx.split(visual)
    jfn = jax.jit(lambda st, x: nnx.merge(gd, st)(cast(x), tap_layers=())[0].astype(jnp.float32))
    jargs, targs = (st, jnp.asarray(img)), (torch.from_numpy(img).permute(0, 3, 1, 2).contiguous(),)
    tfn = lambda x: torch_image_forward(parts.clip_ref.visual, x)
  elif row in ("side_vit", "side_vit_train"):
    blocks = parts.side_blocks(jdt)
    x = rng.standard_normal((1, Q + SIDE_GRID[0] * SIDE_GRID[1], 240), dtype=np.float32)
    r = rng.standard_normal(x.shape, dtype=np.float32)
    gd, st = nnx.split(blocks)

    def jforward(st, x):
      h = cast(x)
      for blk in nnx.merge(gd, st):
        h = blk(h)
      return h.astype(jnp.float32)

    def tforward(x):
      for blk in parts.side_ref.blocks:
        x = blk(x)
      return x.float()

    if row == "side_vit":
      jfn, tfn = jax.jit(jforward), tforward
      jargs, targs = (st, jnp.asarray(x)), (torch.from_numpy(x),)
    else:
      jr = jnp.asarray(r)
      jfn = jax.jit(jax.grad(lambda st, x: jnp.sum(jforward(st, x) * jr)))
      jargs = (st, jnp.asarray(x))
      tr = torch.from_numpy(r)

      def tfn(x):
        for p in parts.side_ref.parameters():
          p.grad = None
        with autocast() if autocast else torch.enable_grad():
          loss = (tforward(x) * tr).sum()
        loss.backward()
        return parts.side_ref.blocks[0].attn.qkv.weight.grad

      targs = (torch.from_numpy(x),)
  elif row == "clip_train":
    visual = parts.clip(jdt).visual
    x = rng.standard_normal((1, 1 + CLIP_GRID[0] * CLIP_GRID[1], d), dtype=np.float32)
    r = rng.standard_normal(x.shape, dtype=np.float32)
    jr, tr = jnp.asarray(r), torch.from_numpy(r)
    gd, st = nnx.split(visual)
    jfn = jax.jit(jax.grad(lambda x, st: jnp.sum(nnx.merge(gd, st).run_blocks(cast(x), 0, START).astype(jnp.float32) * jr)))
    jargs = (jnp.asarray(x), st)

    def tfn(x):
      x = x.clone().requires_grad_(True)
      with autocast() if autocast else torch.enable_grad():
        h = x
        for blk in parts.clip_ref.visual.transformer.resblocks[:START]:
          h = blk(h)
        loss = (h.float() * tr).sum()
      loss.backward()
      return x.grad

    targs = (torch.from_numpy(x),)
  elif row in ("rec_blocks", "rec_train"):
    visual = parts.clip(jdt).visual
    heads = parts.clip_cfg.vision.heads
    tokens = rng.standard_normal((1, 1 + CLIP_GRID[0] * CLIP_GRID[1], d), dtype=np.float32)
    bias = rng.standard_normal((1, 1, 1, heads, Q) + SIDE_GRID, dtype=np.float32)
    gd, st = nnx.split(visual)

    def jforward(st, tokens, bias):
      emb, _ = rec_head.recognize(nnx.merge(gd, st), cast(tokens), CLIP_GRID, cast(bias), START)
      return emb[:, 0].astype(jnp.float32)

    tbias = torch.from_numpy(bias[:, 0, 0])  # [B, heads, Q, h, w]
    if row == "rec_blocks":
      jfn = jax.jit(jforward)
      tfn = lambda t, b: torch_rec(parts.clip_ref.visual, t, b).float()
    else:
      r = rng.standard_normal((1, Q, parts.clip_cfg.embed_dim), dtype=np.float32)
      jr, tr = jnp.asarray(r), torch.from_numpy(r)
      jfn = jax.jit(jax.grad(lambda t, b, st: jnp.sum(jforward(st, t, b) * jr), argnums=(0, 1)))

      def tfn(t, b):
        t, b = t.clone().requires_grad_(True), b.clone().requires_grad_(True)
        with autocast() if autocast else torch.enable_grad():
          loss = (torch_rec(parts.clip_ref.visual, t, b).float() * tr).sum()
        loss.backward()
        return b.grad

    jargs = (st, jnp.asarray(tokens), jnp.asarray(bias)) if row == "rec_blocks" else (
        jnp.asarray(tokens), jnp.asarray(bias), st)
    targs = (torch.from_numpy(tokens), tbias)
  elif row == "postprocess":
    logits = rng.standard_normal((Q, 151), dtype=np.float32)
    preds = rng.standard_normal((Q, 160, 160), dtype=np.float32)
    hw = (640, 640)

    def jpost(lg, pr):
      probs = san_lib.semantic_inference(cast(lg), cast(pr), hw, hw, hw)
      return probs.astype(jnp.float32), san_lib.class_argmax(probs)

    jfn, tfn = jax.jit(jpost), lambda lg, pr: torch_postprocess(lg, pr, hw)
    jargs, targs = (jnp.asarray(logits), jnp.asarray(preds)), (torch.from_numpy(logits), torch.from_numpy(preds))
  else:
    raise ValueError(f"unknown row {row!r}; known: {', '.join(ROWS)}")

  compiled = jfn.lower(*jargs).compile()
  run_jax = lambda: jax.block_until_ready(compiled(*jargs))
  train = row.endswith("_train")

  def run_torch():
    if train:
      return tfn(*targs)
    with torch.no_grad():
      if autocast:
        with autocast():
          return tfn(*targs)
      return tfn(*targs)

  jt, tt = time_interleaved([run_jax, run_torch], runs)
  j_out, t_out = run_jax(), run_torch()
  # the compared output: the forward's (first) output, the gradient of the bias (rec_train), the gradient of
  # block 0's qkv kernel (side_vit_train, torch's weight is [out, in]), the input's gradient (clip_train)
  if row == "rec_train":
    j_arr, t_arr = np.asarray(j_out[1], np.float32)[:, 0, 0], t_out
  elif row == "side_vit_train":
    j_arr = {tuple(p): v for p, v in nnx.to_flat_state(j_out)}[(0, "attn", "qkv", "kernel")]
    t_arr = t_out.T
  else:
    j_arr = j_out[0] if isinstance(j_out, (tuple, list)) else j_out
    t_arr = t_out[0] if isinstance(t_out, (tuple, list)) else t_out
  j_arr = np.asarray(j_arr.get_value() if hasattr(j_arr, "get_value") else j_arr, np.float32)
  t_arr = t_arr.detach().float().numpy()
  diff = float(np.max(np.abs(j_arr - t_arr))) if j_arr.shape == t_arr.shape else float("nan")
  scale = float(np.max(np.abs(t_arr))) if t_arr.size else 0.0
  js, ts = statistics.median(jt), statistics.median(tt)
  return {"row": row, "dtype": dtype, "jax_s": js, "torch_s": ts, "torch_over_jax": ts / js,
          "max_abs_diff": diff, "ref_max_abs": scale, "runs": runs,
          "gflop": program_flops(jfn, *jargs) / 1e9}  # counted after timing: it clears jax's caches


# The rows that make up SAN's B/16 inference and its train step (their sums, and their ceilings, follow the table).
GROUPS = {"inference": ("clip_tower", "side_vit", "rec_blocks", "postprocess"),
          "train step": ("side_vit_train", "clip_train", "rec_train")}


def add_ceilings(rows: List[Dict[str, object]], peak_gflops: Dict[str, float]) -> None:
  """Each timed row gets "ceiling": PyTorch's seconds over the seconds san-jax's FLOPs (`program_flops`) take at
  `peak_gflops[dtype]` (the faster framework's 2048^2 matmul, this run). That is the largest PyTorch / san-jax
  ratio any implementation of this program could reach here: it assumes every FLOP runs at the big matmul's
  rate (smaller products run slower) and nothing else takes time (norms, softmax, copies)."""
  for r in rows:
    peak = peak_gflops.get(r["dtype"])
    if "error" not in r and peak and r.get("gflop"):
      r["ceiling"] = r["torch_s"] / (r["gflop"] / peak)


def peaks_from_rows(rows: Sequence[Dict[str, object]]) -> Dict[str, float]:
  """{dtype: GFLOP/s} of the matmul_2048 rows: the faster of the two frameworks."""
  return {r["dtype"]: 2 * 2048 ** 3 / min(r["jax_s"], r["torch_s"]) / 1e9
          for r in rows if r["row"] == "matmul_2048" and "error" not in r}


def group_lines(rows: Sequence[Dict[str, object]], peak_gflops: Dict[str, float]) -> List[str]:
  """One line per GROUPS entry and dtype whose rows all ran: the summed seconds, their ratio and the summed
  ceiling (PyTorch's total over the total time of san-jax's FLOPs at the peak)."""
  lines = []
  for name, members in GROUPS.items():
    for dtype in ("float32", "bfloat16"):
      got = [r for r in rows if r["row"] in members and r["dtype"] == dtype and "error" not in r]
      if len(got) != len(members) or dtype not in peak_gflops:
        continue
      js, ts, gflop = (sum(r[k] for r in got) for k in ("jax_s", "torch_s", "gflop"))
      at_peak = gflop / peak_gflops[dtype]
      lines.append(f"B/16 {name} parts ({' + '.join(members)}), {dtype}: PyTorch {ts:.3f} s, san-jax {js:.3f} s, "
                   f"PyTorch / san-jax {ts / js:.2f}; san-jax's {gflop:.1f} GFLOP take {at_peak:.3f} s at the "
                   f"{peak_gflops[dtype]:.0f} GFLOP/s matmul peak: {ts / at_peak:.2f}x is the ceiling.")
  return lines


def format_table(info: Dict[str, object], rows: Sequence[Dict[str, object]]) -> str:
  head = (f"CPU: {info['cpu']}, {info['cores']} cores, flags {' '.join(info['cpu_flags']) or '(none of interest)'}; "
          f"torch {info['torch']} with {info['torch_threads']} threads; jax {info['jax']} on {info['jax_device']}, "
          f"XLA {info['xla_threads']} threads" + (f", XLA_FLAGS={info['xla_flags']}" if info["xla_flags"] else "")
          + f"; san-jax bf16 products: {info.get('bf16_gemm', '-')}; float32 attention: {info.get('f32_attention', '-')}"
          + "".join(f"; torch 512^3 matmul {k} {v:.1f} GFLOP/s" for k, v in info.get("torch_matmul_gflops", {}).items())
          + f". Medians of {rows[0]['runs'] if rows else '-'} alternating calls, same run."
          + (f" {info['dtypes_note']}." if info.get("dtypes_note") else ""))
  peaks = info.get("peak_gflops", {})
  lines = [head, "", "| part | dtype | san-jax s | PyTorch s | PyTorch / san-jax | GFLOP | ceiling | "
           "max abs diff (of max abs) |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['row']} | {r['dtype']} | failed: {r['error']} | | | | | |")
      continue
    ceiling = f"{r['ceiling']:.2f}" if "ceiling" in r else "-"
    gflop = f"{r['gflop']:.2f}" if r.get("gflop") else "-"
    lines.append(f"| {r['row']} | {r['dtype']} | {r['jax_s']:.4f} | {r['torch_s']:.4f} | {r['torch_over_jax']:.2f} | "
                 f"{gflop} | {ceiling} | {r['max_abs_diff']:.1e} ({r['ref_max_abs']:.1e}) |")
  if peaks:
    lines += ["", "GFLOP: XLA's count of san-jax's program (custom calls counted as the XLA ops they replace). "
              "ceiling: PyTorch s / (GFLOP / peak), peak = the faster 2048^2 matmul of this run ("
              + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in peaks.items())
              + "): the largest ratio any implementation of these FLOPs could reach on this machine."]
    lines += group_lines(rows, peaks)
  return "\n".join(lines)


def run(only: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None, runs: int = 5,
        torch_threads: Optional[int] = None) -> Tuple[Dict[str, object], List[Dict[str, object]]]:
  """(machine info, rows). dtypes None: this CPU's best modes (`best_dtypes`; the info says what was left
  out and why)."""
  import torch
  bad = [r for r in (only or ()) if r not in ROWS]
  if bad:
    raise ValueError(f"unknown rows {bad}; known: {', '.join(ROWS)}")
  if torch_threads:
    torch.set_num_threads(torch_threads)
  info = machine_info()
  if dtypes is None:
    dtypes, info["dtypes_note"] = best_dtypes(info["torch_matmul_gflops"])
    if info["dtypes_note"]:
      print(info["dtypes_note"], flush=True)
  parts = Parts()
  rows = []
  for name in only or ROWS:
    for dtype in dtypes:
      try:
        rows.append(bench_row(parts, name, dtype, runs))
      except Exception as e:  # pylint: disable=broad-except  (reported in the table and the exit status)
        rows.append({"row": name, "dtype": dtype, "error": f"{type(e).__name__}: {e}"})
      print(rows[-1], flush=True)
  if "matmul_2048" in (only or ROWS):
    peaks = peaks_from_rows(rows)
  else:  # no matmul row: jax's float32 2048^2 matmul, measured by itself
    from benchmarks.common import matmul_peak
    peaks = {"float32": matmul_peak(runs)["gflops"]}
  info["peak_gflops"] = peaks
  add_ceilings(rows, peaks)
  return info, rows


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  cli.DEFINE_typed_list("only", None, "these parts only", fv, choices=ROWS)
  cli.DEFINE_typed_list("dtypes", None, "compute dtypes (default: this CPU's best modes, see best_dtypes)", fv,
                        choices=["float32", "bfloat16"])
  flags.DEFINE_integer("runs", 5, "timed calls per row", flag_values=fv)
  flags.DEFINE_integer("torch_threads", None, "default: torch's own choice", flag_values=fv)
  flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)


def _main(args: flags.FlagValues, positional: List[str]) -> None:
  del positional
  info, rows = run(args.only, args.dtypes, args.runs, args.torch_threads)
  print(format_table(info, rows))
  result = {"machine": info, "rows": rows}
  write_json(result, args.out)
  failed = [f"{r['row']} {r['dtype']}" for r in rows if "error" in r]
  if failed:
    raise SystemExit(f"rows failed: {failed}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="benchmarks.components")


if __name__ == "__main__":
  main()

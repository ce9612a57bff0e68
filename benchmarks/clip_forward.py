"""CLIP ViT-B/16 image tower forward: JAX (jit, float32) vs the PyTorch reference (open_clip), same run.

  python -m benchmarks.clip_forward [--sizes 224,320] [--runs 10] [--out results.json]

Both run the same random weights (converted with convert/clip_checkpoint.py) on a batch of 1 square
image. Where the input is not the pretraining size, both resize the positional embedding bicubically on
every call, as SAN does. Reported per size: median wall time of `--runs` timed calls after warm-up (JAX
and torch calls alternate, so background load falls on both alike), the
JAX compile time, and the GFLOP/s achieved, counting 2*MACs of the convolution and every matmul
(attention's QK^T and AV included; norms, softmax and activations not). For scale, the machine's float32
matmul throughput is measured with a jitted 2048x2048 jnp matmul.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from absl import flags

from benchmarks.common import matmul_peak, time_calls, time_interleaved  # noqa: F401 (re-exported)
from san_jax import cli

MODEL = "ViT-B/16"


def vit_image_flops(cfg, height: int, width: int) -> int:
  """2*MACs of the image tower at one input size (batch 1)."""
  v = cfg.vision
  gh, gw = height // v.patch_size, width // v.patch_size
  n, d, hidden = 1 + gh * gw, v.width, int(v.width * v.mlp_ratio)
  patch = 2 * gh * gw * (3 * v.patch_size ** 2) * d
  block = (2 * n * d * 3 * d  # q, k, v projections
           + 2 * 2 * n * n * d  # QK^T and AV over all heads
           + 2 * n * d * d  # out projection
           + 2 * 2 * n * d * hidden)  # MLP
  return patch + v.layers * block + 2 * d * v.output_dim


def torch_matmul(runs: int, n: int = 2048) -> Dict[str, float]:
  """The same product in torch (its BLAS), to read the torch column against."""
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  t = statistics.median(time_calls(lambda: a @ b, runs))
  return {"n": n, "median_ms": 1e3 * t, "gflops": 2 * n ** 3 / t / 1e9}


def build_models(seed: int = 0):
  """open_clip's ViT-B/16 with random weights, and the NNX CLIP holding the same weights."""
  import torch
  from flax import nnx

  from convert import clip_checkpoint as cc
  from san_jax.models import clip
  from san_jax.models.params import load_flat_params
  from tests.torch_refs import open_clip

  torch.manual_seed(seed)
  ref = open_clip().create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval()
  flat, cfg = cc.open_clip_to_nnx({k: v.numpy() for k, v in ref.state_dict().items()})
  model = nnx.eval_shape(lambda: clip.CLIP(cfg, rngs=nnx.Rngs(0)))
  load_flat_params(model, flat)
  return ref, model, cfg


def torch_image_forward(visual, images):
  """open_clip's image tower with SAN's positional-embedding resize (an identity at 224)."""
  import torch
  import torch.nn.functional as F
  x = visual.conv1(images)
  b, w, gh, gw = x.shape
  x = x.reshape(b, w, gh * gw).permute(0, 2, 1)
  pos = visual.positional_embedding
  g = int(round((pos.shape[0] - 1) ** 0.5))
  if (gh, gw) != (g, g):
    grid = F.interpolate(pos[1:].reshape(1, g, g, w).permute(0, 3, 1, 2), size=(gh, gw), mode="bicubic",
                         align_corners=False)
    pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, w)])
  x = torch.cat([visual.class_embedding.expand(b, 1, w), x], dim=1) + pos
  x = visual.transformer(visual.ln_pre(x))
  return visual.ln_post(x[:, 0]) @ visual.proj


def bench_size(ref, model, cfg, size: int, runs: int) -> Dict[str, float]:
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  graphdef, state = nnx.split(model)

  def fwd(state, images):
    emb, _ = nnx.merge(graphdef, state).visual(images, tap_layers=())
    return emb

  images = np.random.default_rng(size).standard_normal((1, size, size, 3), dtype=np.float32)
  x = jnp.asarray(images)
  t0 = time.perf_counter()
  compiled = jax.jit(fwd).lower(state, x).compile()
  compile_s = time.perf_counter() - t0
  timg = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    jax_ts, torch_ts = time_interleaved([lambda: compiled(state, x).block_until_ready(),
                                         lambda: torch_image_forward(ref.visual, timg)], runs)
    jax_t, torch_t = statistics.median(jax_ts), statistics.median(torch_ts)
    err = float(np.max(np.abs(np.asarray(compiled(state, x)) - torch_image_forward(ref.visual, timg).numpy())))
  flops = vit_image_flops(cfg, size, size)
  return {"size": size, "tokens": 1 + (size // cfg.vision.patch_size) ** 2, "gflop": flops / 1e9,
          "jax_ms": 1e3 * jax_t, "jax_compile_s": compile_s, "jax_gflops": flops / jax_t / 1e9,
          "torch_ms": 1e3 * torch_t, "torch_gflops": flops / torch_t / 1e9, "max_abs_diff": err}


def format_table(result: dict) -> str:
  rows = [f"CLIP {MODEL} image tower, batch 1, float32 ({result['machine']['cpus']} CPUs, "
          f"jax {result['versions']['jax']} on {result['machine']['jax_device']}, torch {result['versions']['torch']} "
          f"with {result['machine']['torch_threads']} threads)",
          f"{'size':>5} {'tokens':>6} {'GFLOP':>6} | {'JAX ms':>8} {'compile s':>9} {'GFLOP/s':>8} | "
          f"{'torch ms':>8} {'GFLOP/s':>8} | {'JAX/torch':>9} {'max|diff|':>9}"]
  for r in result["sizes"]:
    rows.append(f"{r['size']:>5} {r['tokens']:>6} {r['gflop']:>6.1f} | {r['jax_ms']:>8.1f} {r['jax_compile_s']:>9.2f} "
                f"{r['jax_gflops']:>8.1f} | {r['torch_ms']:>8.1f} {r['torch_gflops']:>8.1f} | "
                f"{r['jax_ms'] / r['torch_ms']:>9.2f} {r['max_abs_diff']:>9.1e}")
  p = result["matmul_peak"]
  rows.append(f"float32 matmul peak ({p['n']}x{p['n']} jnp.matmul, median of {result['runs']}): "
              f"{p['gflops']:.1f} GFLOP/s ({p['median_ms']:.1f} ms); torch's same matmul: "
              f"{result['torch_matmul']['gflops']:.1f} GFLOP/s")
  return "\n".join(rows)


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  cli.DEFINE_typed_list("sizes", [224, 320], "image sides", fv, item=int)
  flags.DEFINE_integer("runs", 10, "timed calls per measurement (at least 5)", lower_bound=5, flag_values=fv)
  flags.DEFINE_integer("torch_threads", 2, "torch threads", flag_values=fv)
  flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)


def _main(args: flags.FlagValues, positional: List[str]) -> None:
  del positional

  import jax
  import torch
  torch.set_num_threads(args.torch_threads)
  ref, model, cfg = build_models()
  result = {
      "benchmark": "clip_forward", "model": MODEL, "batch": 1, "dtype": "float32", "runs": args.runs,
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax_device": str(jax.devices()[0]),
                  "torch_threads": torch.get_num_threads()},
      "versions": {"jax": jax.__version__, "torch": torch.__version__},
      "matmul_peak": matmul_peak(args.runs),
      "torch_matmul": torch_matmul(args.runs),
      "sizes": [bench_size(ref, model, cfg, s, args.runs) for s in args.sizes],
  }
  print(format_table(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="benchmarks.clip_forward")


if __name__ == "__main__":
  main()

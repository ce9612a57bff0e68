"""The GPU check: SAN inference and train step in bfloat16 at batch 8 and 32, with MFU and peak memory.

  bash benchmarks/gpu_check.sh          # the whole check, meant to fit in 5 minutes (see that script)
  python -m benchmarks.gpu [--models b16,l14] [--batch_sizes 8,32] [--runs 10] [--attention auto]
                           [--remat none] [--budget_s 200] [--out FILE]
  python -m benchmarks.gpu --smoke      # configs/tiny.py, batch 1, 1 step: runs anywhere (tests use it)

Rows, per model and batch size (640x640, random weights): `inference` (the whole jitted forward of
benchmarks.san_inference, 150 classes, to per-class probabilities per image) and `train` (the real train
step of benchmarks.train_step: forward with both deep-supervision outputs, Hungarian matching on the host,
importance-sampled losses, gradients, clipping, AdamW; 171 classes, state donated). Per row: median
seconds per call over --runs calls after --warmup, images/s, compile seconds; FLOPs per call from XLA's
cost analysis of the compiled program (`jitted.lower(...).compile().cost_analysis()["flops"]`); MFU =
FLOPs / median time / the chip's dense bfloat16 peak (`PEAK_BF16_TFLOPS`, "?" for a chip not in it);
XLA's buffer assignment of the executable and the device's peak bytes in use (`memory_stats()`; the
high-water mark of the whole process so far, so rows run from small to large; none on CPU).

cuDNN's fused attention (what "auto" runs on a GPU in bfloat16, see san_jax.models.layers.attention_impl)
is a custom call whose FLOPs XLA's cost analysis does not count. So when the program holds one, the
attention FLOPs it hides are added back: the same step with the exact attention, lowered only (not
compiled), minus this program's own lowered count (both pre-optimisation counts of the same code,
differing only in attention). `flops_hidden_in_cudnn` says how many that was.

Remat "none" is the default here: nothing is recomputed, so the FLOPs are the model's and MFU is not
inflated by recomputation. B/16 batch 32 at 640x640 should then fit an 80 GB+ GPU (an estimate, not a
measurement: the CPU float32 step holds 2.04 GB of XLA temporaries per image without remat, README's memory
table; bfloat16 about halves that); pass --remat full for a smaller GPU or for L/14. A row that fails (out of memory, ...) is recorded with its error and the
others still run; the command then exits non-zero. The JSON (and the Markdown table beside it, .md) is
written after every row, to --out, else to $OUT/gpu_check.json when $OUT is set.
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from benchmarks.common import MODEL_KEYS, time_calls, write_json, xla_flops

# Dense (no structured sparsity) bfloat16 Tensor Core peaks in TFLOP/s from NVIDIA's datasheets (which
# print the sparse figure, twice these): H100 SXM 1,979 / PCIe 1,513 / NVL 1,671; H200 SXM 1,979 (the
# H100 SXM's die and clocks) / NVL 1,671; A100 (SXM and PCIe) 624; L40S 733; L4 242; A10 250. Patterns
# are matched in order against `jax.devices()[0].device_kind` (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H200").
PEAK_BF16_TFLOPS = (
    (r"H100.*PCIe", 756.0), (r"H100.*NVL", 835.0), (r"H100", 989.0),
    (r"H200.*NVL", 835.0), (r"H200", 989.0),
    (r"A100", 312.0), (r"L40S", 362.0), (r"\bL4\b", 121.0), (r"\bA10\b", 125.0),
)
# The smoke run also lowers the exact-attention twin (its hidden FLOPs must come out 0 where no cuDNN runs).
SMOKE = dict(models=("tiny",), batch_sizes=(1,), runs=1, warmup=0, size=128, check_twin=True)


def peak_tflops(device_kind: str) -> Optional[float]:
  """The chip's dense bfloat16 peak (TFLOP/s), None when `device_kind` is not in PEAK_BF16_TFLOPS."""
  for pattern, tflops in PEAK_BF16_TFLOPS:
    if re.search(pattern, device_kind):
      return tflops
  return None


def mfu(flops: float, seconds: float, peak: Optional[float]):
  """Model FLOPs utilisation in [0, 1], or "?" when the chip's peak is unknown."""
  return "?" if peak is None else flops / seconds / (peak * 1e12)


def _log(msg: str, t0: float) -> None:
  print(f"[gpu_check {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _abstract(args):
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      args)


def _overrides(model_key: str, attention: str, remat: str) -> Dict[str, Any]:
  """SANConfig overrides: remat, and the attention implementation of the image tower and the side ViT."""
  from benchmarks.common import san_config
  cfg = san_config(model_key)
  return dict(remat=remat, clip=dataclasses.replace(cfg.clip, attention_impl=attention),
              side=dataclasses.replace(cfg.side, attention_impl=attention))


@dataclasses.dataclass
class Built:
  """One row's program: `jitted(*args)` inside `mesh()`; `twin()` is the same program with the exact
  attention, to lower for the FLOPs cuDNN's custom calls hide."""
  jitted: Any
  args: Tuple[Any, ...]
  mesh: Callable[[], Any]
  twin: Callable[[], Any]
  classes: int


def build(mode: str, model_key: str, batch: int, dtype: str, size: int, attention: str, remat: str) -> Built:
  """`mode` "inference": benchmarks.san_inference's forward (150 classes); "train": benchmarks.train_step's
  step (171 classes)."""
  import contextlib

  import jax

  from benchmarks import san_inference, train_step
  from benchmarks.common import san_config
  from san_jax.train import steps

  overrides = _overrides(model_key, attention, remat)
  exact = _overrides(model_key, "exact", remat)
  if mode == "inference":
    jitted, args = san_inference.prepare(model_key, dtype, size, 150, batch, **overrides)
    return Built(jitted, args, contextlib.nullcontext,
                 lambda: san_inference.prepare(model_key, dtype, size, 150, batch, abstract=True, **exact)[0], 150)
  if mode != "train":
    raise ValueError(f"mode {mode!r}: expected inference or train")
  p = train_step.prepare(model_key, batch, dtype, size, 171, **overrides)
  # A Trainer builds its model abstractly (eval_shape): the twin initialises nothing.
  twin = lambda: steps.Trainer(san_config(model_key, **exact), p.trainer.train_cfg, p.mesh, p.trainer.rules,
                               p.trainer.num_classes).compile_step(p.batch_ndims).jitted
  return Built(p.jitted, p.args, lambda: jax.set_mesh(p.mesh), twin, 171)


def hidden_attention_flops(built: Built, lowered) -> float:
  """FLOPs XLA's cost analysis does not see in cuDNN's custom calls: the exact-attention twin's lowered
  count minus `lowered`'s (call before the donated state is consumed: the twin is lowered on its shapes).
  The twin is built outside the mesh context, as the program was (models are built mesh-free)."""
  twin = built.twin()
  with built.mesh():
    return max(0.0, xla_flops(twin.lower(*_abstract(built.args))) - xla_flops(lowered))


def uses_cudnn(compiled) -> bool:
  return "cudnn" in compiled.as_text().lower()


def bench_row(mode: str, model_key: str, batch: int, *, dtype: str, size: int, runs: int, warmup: int,
              attention: str, remat: str, peak: Optional[float], t0: float, check_twin: bool = False) -> Dict[str, Any]:
  """One row: build, compile, count FLOPs, time `runs` calls after `warmup` (module doc). `check_twin`:
  lower the exact-attention twin even without cuDNN in the program."""
  import jax

  from benchmarks import memory

  b = build(mode, model_key, batch, dtype, size, attention, remat)
  args = b.args
  _log(f"{mode} {model_key} batch {batch}: built; compiling", t0)
  tc = time.perf_counter()
  with b.mesh():
    lowered = b.jitted.lower(*args)
    compiled = lowered.compile()
  compile_s = time.perf_counter() - tc
  flops_compiled = xla_flops(compiled)
  cudnn = uses_cudnn(compiled)
  hidden = hidden_attention_flops(b, lowered) if cudnn or check_twin else 0.0
  flops = flops_compiled + hidden
  _log(f"{mode} {model_key} batch {batch}: compiled in {compile_s:.1f}s; timing", t0)

  if mode == "inference":
    call = lambda: jax.block_until_ready(compiled(*args))
  else:
    holder = {"state": args[0]}

    def call():
      with b.mesh():
        holder["state"], metrics = compiled(holder["state"], *args[1:])
      jax.block_until_ready(metrics)
  times = time_calls(call, runs, warmup=warmup)
  t = statistics.median(times)
  stats = jax.devices()[0].memory_stats() or {}
  peak_bytes = stats.get("peak_bytes_in_use")
  return {"mode": mode, "model": model_key, "batch": batch, "size": size, "classes": b.classes, "dtype": dtype,
          "attention": "cudnn" if cudnn else attention if attention != "auto" else "exact",
          "remat": remat, "median_s": t, "min_s": min(times), "images_per_s": batch / t, "compile_s": compile_s,
          "flops": flops, "flops_compiled": flops_compiled, "flops_hidden_in_cudnn": hidden,
          "tflops_per_s": flops / t / 1e12, "mfu": mfu(flops, t, peak),
          "xla_gb": memory.xla_memory(compiled)["xla_total_gb"],
          "device_peak_gb_so_far": None if peak_bytes is None else peak_bytes / 2 ** 30, "runs": runs}


def format_table(result: Dict[str, Any]) -> str:
  d = result["device"]
  fmt_mfu = lambda m: "?" if m == "?" else f"{100 * m:.1f}%"
  fmt_gb = lambda g: "-" if g is None else f"{g:.1f}"
  lines = [f"{d['device_kind']} ({d['platform']}), jax {d['jax']}, flax {d['flax']}; bf16 dense peak "
           f"{'unknown (MFU ?)' if d['peak_bf16_tflops'] is None else str(d['peak_bf16_tflops']) + ' TFLOP/s'}",
           "",
           "| model | mode | batch | attention | remat | s/call (median) | images/s | TFLOP/call | TFLOP/s | MFU "
           "| compile s | XLA GB | device peak GB (so far) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    if "error" in r:
      lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | failed: {r['error']} |")
      continue
    lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['attention']} | {r['remat']} | "
                 f"{r['median_s']:.4f} | {r['images_per_s']:.1f} | {r['flops'] / 1e12:.3f} | "
                 f"{r['tflops_per_s']:.1f} | {fmt_mfu(r['mfu'])} | {r['compile_s']:.1f} | {r['xla_gb']:.2f} | "
                 f"{fmt_gb(r['device_peak_gb_so_far'])} |")
  return "\n".join(lines)


def _write(result: Dict[str, Any], out: Optional[str]) -> None:
  if out:
    write_json(result, out)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
      f.write(format_table(result) + "\n")


def run(models: Sequence[str] = ("b16",), batch_sizes: Sequence[int] = (8, 32), runs: int = 10, warmup: int = 2,
        size: int = 640, dtype: str = "bfloat16", attention: str = "auto", remat: str = "none",
        budget_s: Optional[float] = None, out: Optional[str] = None, check_twin: bool = False) -> Dict[str, Any]:
  """Every row (inference rows first, then train; batch sizes ascending); the result dict (module doc).
  Rows not started within `budget_s` seconds are recorded as skipped."""
  import flax
  import jax

  from san_jax.models import layers

  t0 = time.perf_counter()
  bad = [m for m in models if m not in MODEL_KEYS]
  if bad:
    raise ValueError(f"--models {bad}: expected some of {list(MODEL_KEYS)}")
  layers.check_attention_impl(attention)
  layers.check_remat(remat)
  dev = jax.devices()[0]
  peak = peak_tflops(dev.device_kind)
  result: Dict[str, Any] = {
      "device": {"device_kind": dev.device_kind, "platform": dev.platform, "devices": jax.device_count(),
                 "jax": jax.__version__, "flax": flax.__version__, "peak_bf16_tflops": peak},
      "settings": {"models": list(models), "batch_sizes": list(batch_sizes), "runs": runs, "warmup": warmup,
                   "size": size, "dtype": dtype, "attention": attention, "remat": remat, "budget_s": budget_s,
                   "check_twin": check_twin},
      "rows": []}
  if peak is None:
    _log(f"device kind {dev.device_kind!r} is not in PEAK_BF16_TFLOPS: MFU is printed as '?'", t0)
  for model_key in models:
    for mode in ("inference", "train"):
      for batch in sorted(batch_sizes):
        row: Dict[str, Any]
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
          row = {"mode": mode, "model": model_key, "batch": batch, "error": f"skipped: past the {budget_s:.0f} s budget"}
        else:
          try:
            row = bench_row(mode, model_key, batch, dtype=dtype, size=size, runs=runs, warmup=warmup,
                            attention=attention, remat=remat, peak=peak, t0=t0, check_twin=check_twin)
          except Exception as e:  # pylint: disable=broad-except  (recorded; the command then fails)
            traceback.print_exc()
            row = {"mode": mode, "model": model_key, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        _log(f"{mode} {model_key} batch {batch}: {row.get('error') or 'done'}", t0)
        result["rows"].append(row)
        _write(result, out)
  result["total_s"] = time.perf_counter() - t0
  _write(result, out)
  return result


def _define_flags(fv, argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from san_jax import cli  # pylint: disable=g-import-not-at-top
  del argv
  cli.DEFINE_typed_list("models", ["b16"], "benchmark geometries", fv, choices=list(MODEL_KEYS))
  cli.DEFINE_typed_list("batch_sizes", [8, 32], "batch sizes", fv, item=int)
  flags.DEFINE_integer("runs", 10, "timed calls per row (the median is reported)", flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "untimed calls per row after compiling", flag_values=fv)
  flags.DEFINE_integer("size", 640, "image side (multiple of 32)", flag_values=fv)
  flags.DEFINE_string("dtype", "bfloat16", "compute dtype", flag_values=fv)
  flags.DEFINE_enum("attention", "auto", ["auto", "exact", "xla", "cudnn"],
                    "attention implementation (layers.attention_impl)", flag_values=fv)
  flags.DEFINE_enum("remat", "none", ["none", "full"], "SANConfig.remat for the train rows", flag_values=fv)
  flags.DEFINE_float("budget_s", None, "skip the rows not started within this many seconds", flag_values=fv)
  flags.DEFINE_bool("smoke", False, "configs/tiny.py, 128x128, batch 1, 1 call: a CPU smoke run", flag_values=fv)
  flags.DEFINE_string("out", None, "JSON path (default: $OUT/gpu_check.json when $OUT is set)", flag_values=fv)


def _main(f, positional) -> int:
  del positional
  out = f.out or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
  kw = dict(models=f.models, batch_sizes=[int(b) for b in f.batch_sizes], runs=f.runs, warmup=f.warmup,
            size=f.size, dtype=f.dtype, attention=f.attention, remat=f.remat, budget_s=f.budget_s)
  if f.smoke:
    kw.update(SMOKE)
  result = run(out=out, **kw)
  print(format_table(result))
  print(f"\ntotal {result['total_s']:.0f} s" + (f"; JSON: {out}" if out else "; no JSON written (no --out, no $OUT)"))
  failed = [r for r in result["rows"] if "error" in r]
  if failed:
    print(f"{len(failed)} of {len(result['rows'])} rows failed or were skipped", file=sys.stderr)
    return 1
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  from san_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.run(_define_flags, _main, argv, prog="benchmarks.gpu")


if __name__ == "__main__":
  main()

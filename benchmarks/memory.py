"""Peak memory of SAN training on the CPU: the process's peak RSS and XLA's buffer assignment.

  python -m benchmarks.memory [--cases b16_train,l14_train,l14_parity] [--remat none|full] [--runs 1]
                              [--compile_only] [--out FILE]

Cases (random weights; each runs in its own fresh process, so every peak RSS is that case's alone):
  * `b16_train`, `l14_train`: the real train step (`san_jax.train.steps.Trainer`) at batch 1, 640x640,
    171 classes, float32: forward with both deep-supervision outputs, matching, the importance-sampled
    losses on 112x112 points, gradients of all trainable leaves, clipping, AdamW; state donated.
  * `l14_parity`: what `python -m convert.check_parity` does on a full-size ViT-L/14-336 case (two images,
    640x640 and 544x672, 100 queries, training arrays included), reproduced without the official
    checkpoint: the text pass over 14 templates x 171 classes, the eval forward and the training forward
    with intermediates (kept on the host, as the checker caches them), then one jitted value_and_grad of
    the loss on recorded-style point draws (12544 points) w.r.t. the checker's handful of parameters
    (CLIP positional_embedding, side pos_embed, query_embed, query_pos_embed, bg_embed, a fusion
    projection, an attention-MLP layer, bias_scaling). While the model is built, two transient host
    copies of the parameters stand in for the checker's torch state dict and its converted numpy tree.

Per case: peak RSS after building and compiling (`compile`) and after running (`peak`), both from
getrusage (the high-water mark of the process, compiler included), and XLA's memory analysis of the
largest compiled executable (arguments, outputs, aliased (donated) bytes, temporaries); `--compile_only`
stops before running (XLA's numbers and the compiler's peak only). Memory does not
depend on machine load, so these numbers are comparable across runs; the seconds printed are not.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from absl import flags

from benchmarks.common import write_json
from san_jax import cli
from san_jax.models.layers import REMAT_MODES

CASES = ("b16_train", "l14_train", "l14_parity")
GB = 2 ** 30


def rss_peak_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


def log(phase: str) -> None:
  """Progress on stderr (the parent keeps only stdout's JSON line)."""
  print(f"[{time.strftime('%H:%M:%S')}] {phase}: peak RSS so far {rss_peak_gb():.2f} GB", file=sys.stderr, flush=True)


def xla_memory(compiled) -> Dict[str, float]:
  """XLA's buffer assignment of one compiled executable, in GB."""
  m = compiled.memory_analysis()
  arg, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                           m.temp_size_in_bytes)
  return {"xla_argument_gb": arg / GB, "xla_output_gb": out / GB, "xla_alias_gb": alias / GB,
          "xla_temp_gb": temp / GB, "xla_total_gb": (arg + out - alias + temp) / GB}


def train_case(model_key: str, runs: int, remat: Optional[str] = None) -> Dict[str, float]:
  import jax
  import jax.numpy as jnp

  from benchmarks.train_step import make_batch
  from configs import common
  from san_jax.models import san
  from san_jax.train import sharding, steps

  num_classes = 171
  cfg = common.base(common.model_b16() if model_key == "b16" else common.model_l14())
  if remat is not None:
    cfg.model.remat = remat
  cfg.train.compute_dtype = "float32"
  cfg.train.batch_size = 1
  cfg.train.criterion.max_targets = 16
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
  rules = [tuple(r) for r in cfg.mesh.rules]
  trainer = steps.Trainer(san.config_from_dict(cfg.model.to_dict()), cfg.train, mesh, rules, num_classes)
  state, frozen = trainer.init(jax.random.key(0))
  batch = sharding.global_batch(make_batch(1, 640, num_classes, 16), mesh, rules)
  text_dim = trainer.model(state, frozen).ov_classifier.bg_embed[...].shape[-1]
  class_emb = jnp.asarray(np.random.default_rng(1).normal(size=(num_classes, text_dim)).astype(np.float32))
  rss_built = rss_peak_gb()
  step = trainer.compile_step({k: v.ndim for k, v in batch.items()})
  rng = jax.random.key(2)
  with jax.set_mesh(mesh):
    args = step.args(state, frozen, batch, class_emb, rng)
    compiled = step.jitted.lower(*args).compile()
  row = {"rss_built_gb": rss_built, "rss_compile_gb": rss_peak_gb(), **xla_memory(compiled)}
  if not runs:
    return {**row, "rss_peak_gb": rss_peak_gb(), "step_s": float("nan")}
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      state, metrics = compiled(state, *args[1:])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  if not np.isfinite(float(metrics["loss"])):
    raise RuntimeError(f"{model_key} train step gave a non-finite loss")
  return {**row, "rss_peak_gb": rss_peak_gb(), "step_s": float(np.median(times))}


# The parameters whose gradients the L/14 golden case records (nnx paths; the checker maps them from the
# official keys grad/<key> of the case).
PARITY_GRAD_PATHS = (
    ("clip_visual", "positional_embedding"),
    ("ov_classifier", "bg_embed"),
    ("side_adapter_network", "fusion_layers", "layer_0", "input_proj", 1, "kernel"),
    ("side_adapter_network", "mask_decoder", "attn_mlp", "layers", 2, "kernel"),
    ("side_adapter_network", "mask_decoder", "bias_scaling", "kernel"),
    ("side_adapter_network", "mask_decoder", "bias_scaling", "bias"),
    ("side_adapter_network", "query_embed"),
    ("side_adapter_network", "query_pos_embed"),
    ("side_adapter_network", "vit_model", "pos_embed"),
)


def parity_targets(sizes, padded_hw, rng, n_per_image=(6, 9)):
  """Instance masks made of 32x32 blocks, one per class present, as the golden cases' targets."""
  from san_jax.losses import criterion
  labels, masks = [], []
  for (h, w), n in zip(sizes, n_per_image):
    sem = rng.integers(0, n, size=(-(-h // 32), -(-w // 32))).repeat(32, 0).repeat(32, 1)[:h, :w]
    present = np.unique(sem)
    labels.append(rng.choice(171, size=len(present), replace=False))
    masks.append(np.stack([(sem == c).astype(np.uint8) for c in present]))
  return criterion.pad_targets(labels, masks, padded_hw)


def parity_case(runs: int, num_classes: int = 171) -> Dict[str, float]:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from san_jax.losses import criterion
  from san_jax.models import san
  from san_jax.text import classifier
  from san_jax.text import templates as templates_lib

  cfg = san.san_config("san_vit_l14")
  model = san.SAN(cfg, rngs=nnx.Rngs(0))
  # The checker's transient copies: the torch state dict and the converted numpy tree (freed after load).
  copies = [[np.array(v) for v in jax.tree.leaves(nnx.state(model))] for _ in range(2)]
  del copies
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (640, 640, 3), dtype=np.uint8), rng.integers(0, 256, (544, 672, 3), dtype=np.uint8)]
  batch, sizes = san.preprocess(images, cfg)
  cache = {}  # what the checker keeps: every pass's outputs on the host

  # The text pass (classifier of the case's vocabulary).
  vocab = [f"class number {i}" for i in range(num_classes)]
  tokens = classifier.prompt_tokens(vocab, templates_lib.get_templates(cfg.template_set))
  head = model.ov_classifier
  text = jax.jit(lambda t: {"per_template": head.text_embeddings(t), "class_embeddings": head.class_embeddings(t)})
  compiled = text.lower(jnp.asarray(tokens)).compile()
  biggest = {"pass": "text", **xla_memory(compiled)}
  cache["text"] = jax.tree.map(np.asarray, compiled(jnp.asarray(tokens)))
  log("text pass")
  class_emb = jnp.asarray(cache["text"]["class_embeddings"])

  for train in (False, True):
    fwd = jax.jit(lambda x, c, train=train: model(x, c, train=train, return_intermediates=True))
    compiled = fwd.lower(jnp.asarray(batch), class_emb).compile()
    mem = {"pass": "train forward" if train else "eval forward", **xla_memory(compiled)}
    if mem["xla_total_gb"] > biggest["xla_total_gb"]:
      biggest = mem
    if runs:
      cache[f"run_train={train}"] = jax.tree.map(np.asarray, compiled(jnp.asarray(batch), class_emb))
    log(mem["pass"])

  crit_cfg = criterion.CriterionConfig(num_classes=num_classes)
  targets = parity_targets(sizes, batch.shape[1:3], rng)
  n_out = len(cfg.side.deep_supervision_idxs)
  k = min(cfg.side.num_queries, targets["labels"].shape[1])
  draws = {name: rng.random(shape, dtype=np.float32)
           for name, shape in criterion.draw_shapes(crit_cfg, n_out, len(images), k).items()}
  wanted = set(PARITY_GRAD_PATHS)
  graphdef, diff, rest = nnx.split(model, lambda path, _: tuple(path) in wanted, ...)
  found = {tuple(p) for p, _ in nnx.to_flat_state(diff)}
  if found != wanted:
    raise KeyError(f"gradient parameters not in the model: {sorted(wanted - found)}")

  def loss_fn(diff, rest, images, class_embeddings, targets, draws):
    m = nnx.merge(graphdef, diff, rest)
    outputs = m(images, class_embeddings, train=True)
    losses, aux = criterion.set_criterion(outputs, targets, crit_cfg, draws=draws)
    return criterion.total_loss(losses), (losses, aux)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  args = (diff, rest, jnp.asarray(batch), class_emb, targets, draws)
  compiled = grad_fn.lower(*args).compile()
  mem = {"pass": "value_and_grad", **xla_memory(compiled)}
  log("value_and_grad compiled")
  if mem["xla_total_gb"] > biggest["xla_total_gb"]:
    biggest = mem
  row = {"rss_compile_gb": rss_peak_gb(), **biggest}
  if not runs:
    return {**row, "rss_peak_gb": rss_peak_gb(), "step_s": float("nan")}
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    (total, _), grads = compiled(*args)
    cache["training"] = jax.tree.map(np.asarray, (total, grads))
    times.append(time.perf_counter() - t0)
  if not np.isfinite(cache["training"][0]):
    raise RuntimeError("l14_parity: non-finite loss")
  return {**row, "rss_peak_gb": rss_peak_gb(), "step_s": float(np.median(times))}


def run_case(name: str, runs: int, remat: Optional[str] = None) -> Dict[str, float]:
  if name == "b16_train":
    return train_case("b16", runs, remat)
  if name == "l14_train":
    return train_case("l14", runs, remat)
  if name == "l14_parity":
    return parity_case(runs)
  raise ValueError(f"unknown memory case {name!r}; known: {', '.join(CASES)}")


def format_table(rows: Sequence[Dict]) -> str:
  lines = ["| case | peak RSS GB | RSS after compile GB | XLA args + out - donated + temp GB (temp) | s (contended) |",
           "|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['case']} | failed: {r['error']} | | | |")
      continue
    peak = "not run" if np.isnan(r["step_s"]) else f"{r['rss_peak_gb']:.2f}"
    lines.append(f"| {r['case']} | {peak} | {r['rss_compile_gb']:.2f} | "
                 f"{r['xla_total_gb']:.2f} ({r['xla_temp_gb']:.2f}) | {r['step_s']:.1f} |")
  return "\n".join(lines)


def measure(cases: Sequence[str], runs: int, remat: Optional[str] = None) -> List[Dict]:
  """Each case in a fresh interpreter, so one case's peak RSS does not include another's."""
  rows = []
  for name in cases:
    if name not in CASES:
      raise ValueError(f"unknown memory case {name!r}; known: {', '.join(CASES)}")
  for name in cases:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", name, "--runs", str(runs)]
                          + ([] if remat is None else ["--remat", remat]), capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
      tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
      why = f"exit status {proc.returncode} (killed: out of memory?)" if proc.returncode < 0 else tail
      rows.append({"case": name, "error": why})
    else:
      rows.append({"case": name, **json.loads(lines[-1])})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  cli.DEFINE_typed_list("cases", list(CASES), "the cases to measure", fv, choices=CASES)
  flags.DEFINE_integer("runs", 1, "executions per case after compiling (timing only)", flag_values=fv)
  flags.DEFINE_boolean("compile_only", False, "build and compile, do not run (XLA's numbers)", flag_values=fv)
  flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)
  flags.DEFINE_enum("remat", None, list(REMAT_MODES), "the train cases' SANConfig.remat (default: the "
                    "config's)", flag_values=fv)
  flags.DEFINE_enum("child", None, list(CASES), "internal: measure this one case in this process (the parent "
                    "runs each case in a child process of its own)", flag_values=fv)


def _main(args: flags.FlagValues, positional: List[str]) -> None:
  del positional
  if args.child:
    print(json.dumps(run_case(args.child, args.runs, args.remat)), flush=True)
    return
  rows = measure(args.cases, 0 if args.compile_only else args.runs, args.remat)
  print(format_table(rows))
  result = {"rows": rows}
  write_json(result, args.out)
  failed = [r["case"] for r in rows if "error" in r]
  if failed:
    raise SystemExit(f"memory cases failed: {failed}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="benchmarks.memory")


if __name__ == "__main__":
  main()

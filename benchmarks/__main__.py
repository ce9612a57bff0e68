"""All benchmarks: `python -m benchmarks [--quick] [--only PART,...] [--runs 5] [--with_san] [--out FILE]`.

Prints one Markdown table, ready to paste: every row is a part of SAN timed against the PyTorch code the
official SAN runs for it, in this same run, in float32 and in bfloat16 (`torch.autocast("cpu",
torch.bfloat16)` against san-jax's bfloat16 compute), with the CPU model and flags, both frameworks'
thread counts, medians and the ratio (benchmarks/components.py lists the parts). Nothing is compared with
numbers from another run or another machine.

By default the dtypes are the CPU's best modes (`components.best_dtypes`): bfloat16 rows only where torch's
bf16 autocast is not an emulation (measured in the same run: on a CPU without AVX512-BF16 or AMX it runs at
~1% of float32, and its rows would take hours); `--dtypes` chooses them. `--quick`: float32 only, 3 timed
calls per row. `--with_san` adds a second table of the whole SAN (inference
640x640 / 150 classes, train step batch 1; ViT-B/16, and ViT-L/14 unless --quick): san-jax only, as the
official SAN is not installed here; its peak memory is `python -m benchmarks.memory`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from absl import flags

from benchmarks import common, components
from san_jax import cli


def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_boolean("quick", False, "float32 only, 3 timed calls per row", flag_values=fv)
  cli.DEFINE_typed_list("only", None, "these parts only", fv, choices=components.ROWS)
  cli.DEFINE_typed_list("dtypes", None, "compute dtypes (default: this CPU's best modes; float32 with --quick)", fv,
                        choices=["float32", "bfloat16"])
  flags.DEFINE_integer("runs", None, "timed calls per row (default 5, 3 with --quick)", flag_values=fv)
  flags.DEFINE_integer("torch_threads", None, "default: torch's own choice", flag_values=fv)
  flags.DEFINE_boolean("with_san", False, "also the whole SAN, san-jax only (slow)", flag_values=fv)
  flags.DEFINE_string("out", None, "write the results as JSON here", flag_values=fv)


def _main(args: flags.FlagValues, positional: List[str]) -> None:
  del positional
  runs = args.runs or (3 if args.quick else 5)
  info, rows = components.run(args.only, args.dtypes or (["float32"] if args.quick else None), runs,
                              args.torch_threads)
  dtypes = [d for d in ("float32", "bfloat16") if any(r["dtype"] == d for r in rows)]  # --with_san's too
  failures = [f"{r['row']} {r['dtype']}: {r['error']}" for r in rows if "error" in r]
  result = {"machine": info, "components": rows}
  san_table = None
  if args.with_san:
    from benchmarks import san_inference, train_step
    models = ["b16"] if args.quick else ["b16", "l14"]
    san_rows, step_rows = [], []
    for m in models:
      for d in dtypes:
        try:
          san_rows.append(san_inference.bench(m, d, 640, 150, runs))
          step_rows.append(train_step.bench(m, 1, d, min(runs, 3)))
        except Exception as e:  # pylint: disable=broad-except  (reported, and fails the command)
          failures.append(f"SAN {m} {d}: {type(e).__name__}: {e}")
    peak = common.matmul_peak(runs=5)
    san_table = (san_inference.format_table(san_rows, peak) + "\n\n" + train_step.format_table(step_rows))
    result.update(san_inference=san_rows, train_step=step_rows)
  print("\n" + components.format_table(info, rows))
  if san_table:
    print("\nWhole SAN, san-jax only (no PyTorch counterpart in this run):\n\n" + san_table)
  common.write_json(result, args.out)
  if failures:
    raise SystemExit("benchmark rows failed:\n  " + "\n  ".join(failures))


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run(_define_flags, _main, argv, prog="benchmarks")


if __name__ == "__main__":
  main()

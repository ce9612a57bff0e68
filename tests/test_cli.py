"""One CLI style (issue 12): every entry point is an absl app (san_jax.cli), its --help exits 0 and lists its
own flags, a bad command line is one line and exit status 2, importing a tool registers no flags, and no file
parses a command line with argparse."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from absl import app, flags

from san_jax import cli

REPO = Path(__file__).resolve().parents[1]

# Every entry point and the flags its documentation (README, module docstrings) promises.
ENTRY_POINTS: Dict[Tuple[str, ...], List[str]] = {
    ("train.py",): ["config", "workdir", "coordinator_address", "num_processes", "process_id"],
    ("eval.py",): ["config", "workdir", "checkpoint", "model", "step", "datasets", "data_dir", "out", "batch_size",
                   "max_examples", "tta", "sliding_window", "coordinator_address", "num_processes", "process_id"],
    ("demo.py",): ["config", "workdir", "fresh"],
    ("predict.py",): ["checkpoint", "workdir", "model", "random_init", "config", "step", "vocab", "vocab_file",
                      "aug_vocab", "image", "recursive", "out", "min_size", "max_size", "tta", "sliding_window"],
    ("app.py",): ["model", "host", "port", "min_size", "max_size"],
    ("serve_export.py",): ["out"],
    ("-m", "convert.check_parity"): ["dtype", "json"],
    ("-m", "convert.clip_checkpoint"): ["format", "to_torch", "to_hf", "exact_gelu", "force"],
    ("-m", "convert.san_checkpoint"): ["to_torch", "config", "num_classes"],
    ("-m", "convert.export_params"): ["step"],
    ("-m", "san_jax.export"): ["model", "step", "vocab", "size", "out", "platforms"],
    ("-m", "san_jax.launch"): ["processes", "devices", "port", "grace_s"],
    ("-m", "san_jax.data.build"): ["data_dir", "manual_dir", "skip_corrupt", "config", "image_size", "num_train",
                                   "num_val", "seed", "train_classes"],
    ("-m", "benchmarks"): ["quick", "only", "runs", "torch_threads", "with_san", "out"],
    ("-m", "benchmarks.components"): ["only", "dtypes", "runs", "torch_threads", "out"],
    ("-m", "benchmarks.clip_forward"): ["sizes", "runs", "torch_threads", "out"],
    ("-m", "benchmarks.matching"): ["batch", "queries", "targets", "outputs", "repeats"],
    ("-m", "benchmarks.memory"): ["cases", "runs", "compile_only", "out"],
    ("-m", "benchmarks.san_inference"): ["models", "dtypes", "size", "classes", "runs", "out"],
    ("-m", "benchmarks.train_step"): ["model", "batch_sizes", "dtype", "runs", "out"],
    ("-m", "benchmarks.gpu"): ["models", "batch_sizes", "runs", "warmup", "attention", "remat", "smoke", "out"],
    ("-m", "benchmarks.data_pipeline"): ["source", "size", "num_examples", "batch_size", "batches", "num_workers"],
}
UNKNOWN = "--no_such_flag_anywhere=1"
REFUSERS = [("predict.py",), ("train.py",), ("-m", "convert.export_params"), ("-m", "san_jax.launch")]
TOOL_MODULES = ["train", "eval", "predict", "app", "serve_export", "convert.check_parity", "convert.clip_checkpoint",
                "convert.san_checkpoint", "convert.export_params", "san_jax.export", "san_jax.launch",
                "san_jax.data.build", "benchmarks", "benchmarks.components", "benchmarks.clip_forward",
                "benchmarks.matching", "benchmarks.memory", "benchmarks.san_inference", "benchmarks.train_step",
                "benchmarks.gpu", "benchmarks.data_pipeline"]
TOOL_FLAGS = sorted({n for p, ns in ENTRY_POINTS.items() if p != ("demo.py",) for n in ns})  # demo's: at import
IMPORT_ALL = (f"import importlib\nfrom absl import flags\nfor m in {TOOL_MODULES!r}:\n  importlib.import_module(m)\n"
              f"print(sorted(set({TOOL_FLAGS!r}) & set(flags.FLAGS)))\n")


def _run(program: Tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, *program, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.fixture(scope="module")
def runs() -> Dict[Tuple[Tuple[str, ...], str], subprocess.CompletedProcess]:
  """Every entry point's --help, a few unknown-flag runs and the import check, in parallel: each subprocess
  imports jax, some torch and flax (1-10 s each); one after the other they take minutes on a loaded machine."""
  jobs = [(p, "--help") for p in ENTRY_POINTS] + [(p, UNKNOWN) for p in REFUSERS] + [(("-c", IMPORT_ALL), "")]
  with ThreadPoolExecutor(max_workers=8) as pool:
    results = list(pool.map(lambda job: _run(job[0], *filter(None, [job[1]])), jobs))
  return dict(zip(jobs, results))


@pytest.mark.parametrize("program", list(ENTRY_POINTS), ids=" ".join)
def test_help_exits_0_and_lists_the_tools_own_flags(runs, program):
  res = runs[(program, "--help")]
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
  assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
  for name in ENTRY_POINTS[program]:
    assert re.search(rf"^\s+--(\[no\])?{name}:", res.stdout, re.M), f"{' '.join(program)} --help lacks --{name}"
  # --help is the tool's own flags: absl's (--verbosity, --logtostderr, ...) are only under --helpfull
  assert not re.search(r"^\s+--verbosity:", res.stdout, re.M), res.stdout[-2000:]


@pytest.mark.parametrize("program", REFUSERS, ids=" ".join)
def test_an_unknown_flag_is_one_line_and_status_2(runs, program):
  res = runs[(program, UNKNOWN)]
  assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
  assert res.stderr.strip().count("\n") == 0, res.stderr  # one line, no usage dump, no traceback
  assert "Unknown command line flag 'no_such_flag_anywhere'" in res.stderr, res.stderr


def test_importing_the_tools_registers_none_of_their_flags(runs):
  """Flags are defined only when a tool runs, so tools and libraries share one process without absl's
  DuplicateFlagError (predict.py and eval.py both have --model, --checkpoint, --workdir, --config ...)."""
  res = runs[(("-c", IMPORT_ALL), "")]
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout[-2000:]


def test_no_file_parses_a_command_line_with_argparse():
  pattern = re.compile(r"^\s*(import argparse|from argparse import)", re.M)
  offenders = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
               if not any(part.startswith(".") for part in p.relative_to(REPO).parts)
               and pattern.search(p.read_text(errors="replace"))]
  assert not offenders, f"use absl flags through san_jax.cli, not argparse: {offenders}"


# ---- san_jax.cli in-process (what tests and tools calling another tool's main([...]) get) --------------------
def _define(fv: flags.FlagValues, argv: List[str]) -> None:
  del argv
  flags.DEFINE_string("model", None, "m", required=True, flag_values=fv)
  cli.DEFINE_typed_list("size", [8, 8], "h,w", fv, item=int, length=2)
  cli.DEFINE_typed_list("dtypes", ["float32"], "d", fv, choices=["float32", "bfloat16"])


def _echo(f: flags.FlagValues, args: List[str]) -> int:
  if args and args[0] == "bad":
    raise app.UsageError("bad is not a good argument")
  print(f"model={f.model} size={f.size} dtypes={f.dtypes} args={args}")
  return 7


def test_in_process_runs_parse_privately_and_report_usage_errors_as_one_line(capsys):
  assert cli.run(_define, _echo, ["--model", "a", "X"], prog="tool", positional=["IN"]) == 7
  assert cli.run(_define, _echo, ["--model=b", "--size", "3,4", "--dtypes", "bfloat16,float32", "Y"], prog="tool",
                 positional=["IN"]) == 7  # the same flag names again in one process: a fresh FlagValues each run
  out = capsys.readouterr().out.splitlines()
  assert out == ["model=a size=[8, 8] dtypes=['float32'] args=['X']",
                 "model=b size=[3, 4] dtypes=['bfloat16', 'float32'] args=['Y']"]
  assert "model" not in flags.FLAGS
  cases = [(["X"], "--model must have a value other than None"),
           (["--model", "a"], "expected 1 positional argument (IN), found 0"),
           (["--model", "a", "X", "Z"], "expected 1 positional argument (IN), found 2"),
           (["--model", "a", "--size", "1,2,3", "X"], "expected 2 comma-separated values, found 3"),
           (["--model", "a", "--size", "1,x", "X"], "expected comma-separated int values, found '1,x'"),
           (["--model", "a", "--dtypes", "float16", "X"], "['float16'] not among ['float32', 'bfloat16']"),
           (["--model", "a", "--bogus", "X"], "Unknown command line flag 'bogus'"),
           (["--model", "a", "bad"], "bad is not a good argument")]
  for argv, message in cases:
    assert cli.run(_define, _echo, argv, prog="tool", positional=["IN"]) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("tool: ") and message in err and err.count("\n") == 1, (argv, err)

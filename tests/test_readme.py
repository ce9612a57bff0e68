"""The README's commands stay true: every `python ...` command it shows names a script or module that exists
and only flags that program accepts (read from its --help), and the two commands of "Two commands" are the
ones CI and the demo test run. What each command does is tested where its program is (demo, train, eval,
predict, converters, parity, benchmarks)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _bash_blocks(text: str) -> List[str]:
  return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _python_commands(line: str) -> List[List[str]]:
  words = shlex.split(line.replace("$", "X"))
  out, segment = [], []
  for w in words + ["&&"]:
    if " " in w and "python" in w:  # a quoted command, e.g. the TPU pod's --command "..."
      out += _python_commands(w)
    elif w in ("&&", ";", "|"):
      for i, x in enumerate(segment):
        if x in ("python", ".venv/bin/python"):
          out.append(segment[i + 1:])
          break
      segment = []
    else:
      segment.append(w)
  return out


def _split_launcher(args: List[str]) -> List[List[str]]:
  """`-m san_jax.launch ... -- SCRIPT ARGS`: the launcher's own flags and the script's, checked separately."""
  if args[:2] == ["-m", "san_jax.launch"] and "--" in args:
    i = args.index("--")
    return [args[:i], args[i + 1:]]
  return [args]


def readme_commands() -> List[List[str]]:
  """Every python command of the README's bash blocks (continuations joined; commands inside quotes, such
  as the TPU pod's `--command "..."`, included), as argument lists starting at the program."""
  commands = []
  for block in _bash_blocks(README.read_text()):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #")[0].strip()
      if line and not line.startswith("#"):
        commands += [part for c in _python_commands(line) for part in _split_launcher(c)]
  return commands


def program_of(args: List[str]) -> Tuple[str, ...]:
  if args[0] == "-m":
    return ("-m", args[1])
  return (args[0],)


@lru_cache(maxsize=None)
def help_text(program: Tuple[str, ...]) -> str:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, *program, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  return out.stdout + out.stderr


def test_readme_has_commands_for_every_entry_point():
  programs = {program_of(c) for c in readme_commands()}
  for p in [("demo.py",), ("train.py",), ("eval.py",), ("predict.py",), ("-m", "convert.san_checkpoint"),
            ("-m", "convert.clip_checkpoint"), ("-m", "convert.check_parity"), ("-m", "benchmarks"),
            ("-m", "san_jax.data.build"), ("-m", "pytest"), ("app.py",), ("serve_export.py",),
            ("-m", "convert.export_params"), ("-m", "san_jax.export")]:
    assert p in programs, f"the README shows no command for {' '.join(p)}"


def test_the_two_commands_are_what_ci_and_the_demo_test_run():
  block = _bash_blocks(README.read_text().split("## Two commands", 1)[1])[0]
  lines = [l for l in block.splitlines() if l.strip() and not l.startswith("#")]
  assert lines == ["bash scripts/setup.sh && .venv/bin/python demo.py",
                   "bash scripts/setup.sh --dev && .venv/bin/python -m pytest -q tests"]
  assert lines[1] in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("args", [c for c in readme_commands() if c[:2] != ["-m", "pytest"]],
                         ids=lambda c: " ".join(c)[:70])
def test_readme_command_uses_existing_program_and_flags(args):
  program = program_of(args)
  if program[0] == "-m":
    module = program[1].replace(".", "/")
    assert (REPO / f"{module}.py").exists() or (REPO / module / "__main__.py").exists(), program
  else:
    assert (REPO / program[0]).exists(), program
  text = help_text(program)
  assert "Traceback" not in text, text[-2000:]
  for arg in args[len(program):]:
    if not arg.startswith("--"):
      continue
    flag = re.split(r"[=.]", arg[2:], maxsplit=1)[0]  # --config.train.steps=3 -> config
    assert re.search(rf"--(\[no\])?{re.escape(flag)}\b", text), f"{' '.join(program)} has no flag --{flag}"

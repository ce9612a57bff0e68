"""One command-line style for every entry point: absl flags, run by `absl.app.run`.

Every tool (train.py, eval.py, predict.py, app.py, serve_export.py, convert/*, benchmarks/*,
san_jax.launch / export / data.build) is written the same way:

    def _define_flags(fv: flags.FlagValues, argv: List[str]) -> None:
      flags.DEFINE_string("vocab", "", "class names, comma separated", flag_values=fv)
      ...

    def _main(f: flags.FlagValues, args: List[str]) -> int:    # f.vocab, ...; args: the positional arguments
      ...

    def main(argv: Optional[Sequence[str]] = None) -> int:
      return cli.run(_define_flags, _main, argv, prog="predict.py")

    if __name__ == "__main__":
      main()

The flags are defined only when the tool runs, never at import, so a module that is also a library
(san_jax.launch, convert.*, benchmarks.*) registers nothing when imported, and two tools' flags of the
same name (--model, --out, ...) never collide in one process (absl raises DuplicateFlagError otherwise).

`main()` (no argument, the process's command line) defines the flags on absl's global FLAGS and hands over
to `absl.app.run`: --help lists the tool's own flags (those defined in its `_define_flags`, which absl
counts as the main module's), --helpfull every flag, --flagfile works. `main([...])` runs the tool
in-process (tests, another tool) on a private FlagValues and returns the exit status. Both ways a bad
command line (unknown flag, bad value, missing required flag, wrong number of positional arguments, an
`app.UsageError` raised by the tool) is one line `PROG: message` on stderr and exit status 2, as argparse
and the shell use for usage errors, before any work is done.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence

from absl import app, flags
from absl import logging as absl_logging

# The DEFINE_* helpers below define flags on behalf of the tool that calls them: absl attributes those
# flags to the caller (so its --help lists them), not to this module.
flags.disclaim_key_flags()

DefineFlags = Callable[[flags.FlagValues, List[str]], None]
Main = Callable[[flags.FlagValues, List[str]], Optional[int]]

USAGE_ERROR = 2


def _one_line(message) -> str:
  return "; ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())


def _usage_error(prog: str, message) -> int:
  print(f"{prog}: {_one_line(message)} (--help lists the flags)", file=sys.stderr, flush=True)
  return USAGE_ERROR


def _call(main: Main, f: flags.FlagValues, args: List[str], prog: str, positional: Optional[Sequence[str]]) -> int:
  if positional is not None and len(args) != len(positional):
    return _usage_error(prog, f"expected {len(positional)} positional argument{'s' * (len(positional) != 1)} "
                              f"({' '.join(positional) or 'none'}), found {len(args)}: {args}")
  try:
    status = main(f, args)
  except app.UsageError as err:  # raised by the tool: one line too (app.run would print the whole usage)
    return _usage_error(prog, err)
  return 0 if status is None else status


def run(define_flags: DefineFlags, main: Main, argv: Optional[Sequence[str]] = None, *, prog: str,
        positional: Optional[Sequence[str]] = (), log_info: bool = False) -> int:
  """Defines the flags, parses the command line and calls `main(flag_values, positional_args)`.

  Args:
    define_flags: `(fv, argv)` defines the tool's flags on `fv`; `argv` is the whole command line (program
      name first), which `config_flags.DEFINE_config_file(..., sys_argv=argv)` reads its `--config.a.b=v`
      overrides from.
    main: `(f, args) -> exit status` (None: 0); reads the flags as `f.name`.
    argv: None: the process's own command line (`sys.argv`) through `absl.app.run`, which exits with main's
      status; a list (without the program name): run in-process on a private FlagValues, return the status.
    prog: the name in error messages ("predict.py", "convert.san_checkpoint").
    positional: the names of the positional arguments, checked by count (usage error otherwise); None: any
      number, checked by `main`.
    log_info: keep absl's INFO log level (train.py's progress log). Default: WARNING unless --verbosity is
      given, the level these tools had before absl.app ran them (orbax and tfds log every step at INFO).

  Returns:
    The exit status (in-process only: with argv None this function does not return).
  """
  if argv is not None:
    fv = flags.FlagValues()
    full = [prog, *argv]
    define_flags(fv, full)
    try:
      args = fv(full)[1:]
    except flags.Error as err:
      return _usage_error(prog, err)
    if not log_info:
      absl_logging.set_verbosity(absl_logging.WARNING)
    return _call(main, fv, args, prog, positional)
  define_flags(flags.FLAGS, list(sys.argv))
  app_run(lambda full: _call(main, flags.FLAGS, full[1:], prog, positional), prog=prog, log_info=log_info)
  raise AssertionError("absl.app.run returned")  # it always exits


def app_run(main: Callable[[List[str]], Optional[int]], *, prog: str, log_info: bool = False) -> None:
  """`absl.app.run(main)` on the global FLAGS, with this module's conventions: --help/--helpfull exit 0 (absl
  exits 1), a flag error or an `app.UsageError` from main is one line and exit status 2 (absl: two lines for a
  flag error, the whole usage for a UsageError, exit 1), and the log level of `run`'s `log_info`. `run` uses
  it; so does demo.py, whose flags are defined at import. Does not return."""

  def parse(full: List[str]) -> List[str]:
    try:
      rest = flags.FLAGS(full)
    except flags.Error as err:
      sys.exit(_usage_error(prog, err))
    except SystemExit as stop:  # absl's --help/--helpfull print the help, then exit 1: asking for it is no error
      sys.exit(0 if stop.code == 1 else stop.code)
    if not log_info and flags.FLAGS["verbosity"].using_default_value:
      flags.FLAGS.verbosity = absl_logging.WARNING  # app.run leaves a value that was set alone
    return rest

  def guarded(full: List[str]) -> Optional[int]:
    try:
      return main(full)
    except app.UsageError as err:  # (`run`'s main has caught its own; demo.py's main has not)
      return _usage_error(prog, err)

  app.run(guarded, flags_parser=parse)


class _ListParser(flags.ListParser):
  """A comma-separated list whose items are converted by `item` and checked against `choices`/`length`."""

  def __init__(self, item: type, choices: Optional[Sequence] = None, length: Optional[int] = None):
    super().__init__()
    self.item, self.choices, self.length = item, None if choices is None else list(choices), length

  def parse(self, argument) -> list:
    items = super().parse(argument)
    try:
      values = [self.item(x) for x in items]
    except (TypeError, ValueError):
      raise ValueError(f"expected comma-separated {self.item.__name__} values, found {argument!r}") from None
    if self.length is not None and len(values) != self.length:
      raise ValueError(f"expected {self.length} comma-separated values, found {len(values)} in {argument!r}")
    bad = [v for v in values if self.choices is not None and v not in self.choices]
    if bad:
      raise ValueError(f"{bad} not among {self.choices}")
    return values

  def flag_type(self) -> str:
    return f"comma-separated list of {self.item.__name__}"


def DEFINE_typed_list(  # pylint: disable=invalid-name
    name: str, default: Optional[Sequence], help: str,  # pylint: disable=redefined-builtin
    flag_values: flags.FlagValues, *, item: type = str, choices: Optional[Sequence] = None,
    length: Optional[int] = None):
  """A comma-separated list flag (`--size 480,640`, `--only clip_tower,side_vit`) of `item` values (str,
  int, float), optionally restricted to `choices` and to exactly `length` items: absl's DEFINE_list holds
  strings and checks nothing. Returns the FlagHolder."""
  if choices is not None:
    help = f"{help} (any of: {', '.join(map(str, choices))})"
  return flags.DEFINE(_ListParser(item, choices, length), name, default, help, flag_values=flag_values,
                      serializer=flags.CsvListSerializer(","))

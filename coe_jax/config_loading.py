"""Loading config files by path, as `--config=configs/NAME.py` does.

Also the command-line side of it, shared by every entry point that `app.run`s
(`coe_jax.main`, `coe_jax.flops`, `coe_jax.plan`, `coe_jax.ablate`, the
benchmarks) through `run_command`: a missing config file, an override of a key
the config does not have, or any other `CoEError` ends in one `error:` line,
not in a traceback.
"""

import importlib.util
import os
import re
import sys
from typing import Any, Callable

import ml_collections
from absl import app, flags

from coe_jax import config_base
from coe_jax.errors import CoEError


def load_config(path: str) -> ml_collections.ConfigDict:
  """Runs the config file at `path` and returns its `get_config()`, validated.

  Config files are Python and run as code, as in every ml_collections
  project: only load files you trust.
  """
  if not os.path.isfile(path):
    raise CoEError(f"config={path!r}: no such file")
  spec = importlib.util.spec_from_file_location(f"coe_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config_base.validate(config)
  return config


def run_command(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` for a command line: its flags parsed by `parse_flags`, and a
  `CoEError` out of `main` reported in one `error: ...` line, with exit status 1.

  Every entry point that `app.run`s runs through this, so all of them report
  bad input alike (`tests/test_cli_errors.py`).
  """

  def reporting(argv: list[str]) -> Any:
    try:
      return main(argv)
    except CoEError as e:
      sys.exit(f"error: {e}")

  app.run(reporting, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.KEY` reported in one line.

  For `app.run` (`run_command` passes it). absl turns bad flag values
  into one-line errors itself, but ml_collections raises a bare KeyError or
  AttributeError, with a traceback, for an override of a key the config does
  not have.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    sys.exit(f"error: {_unknown_key(argv, e)}")


def _unknown_key(argv: list[str], error: Exception) -> str:
  """Names the override that failed; ml_collections names only the missing part."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]  # AttributeError(KeyError("'name'\nDid you mean ...?"))
  lines = str(error.args[0] if error.args else error).splitlines() or [""]
  missing = lines[0].strip("'\"")
  overrides = [
      arg.lstrip("-").split("=", 1)[0] for arg in argv[1:] if re.match(r"--?config\.", arg)
  ]
  key = next((o for o in overrides if missing in o.split(".")[1:]), f"config.{missing}")
  hint = " ".join(line.strip() for line in lines[1:])
  return f"--{key}: the config has no such key" + (f" ({hint})" if hint else "")


def flag_config(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
  """The config of a `DEFINE_config_file` flag, with its overrides, validated.

  config_flags defers a load failure (a missing file) to the config's first
  use, and then raises it with a traceback and a multi-line message.

  Raises:
    CoEError: if its file could not be loaded, or a key has a bad value.
  """
  config = holder.value
  try:
    config.keys()
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    raise CoEError(f"{holder.name}={flags.FLAGS[holder.name].config_filename!r}: cannot load it "
                   f"({reason})") from None
  config_base.validate(config)
  return config

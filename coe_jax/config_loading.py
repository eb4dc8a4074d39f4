"""Loading config files by path, as `--config=configs/NAME.py` does."""

import importlib.util
import os

import ml_collections

from coe_jax.errors import CoEError


def load_config(path: str) -> ml_collections.ConfigDict:
  """Runs the config file at `path` and returns its `get_config()`.

  Config files are Python and run as code, as in every ml_collections
  project: only load files you trust.
  """
  if not os.path.isfile(path):
    raise CoEError(f"config={path!r}: no such file")
  spec = importlib.util.spec_from_file_location(f"coe_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()

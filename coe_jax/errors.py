"""User-facing errors: one line that names the bad key, value or file.

Command-line entry points catch `CoEError` and print its message alone (no
traceback), then exit non-zero. Library callers get an ordinary exception.
"""

from typing import Any


class CoEError(ValueError):
  """A problem with the user's input (config, data, files), stated in one line."""


def require(condition: bool, key: str, value: Any, expectation: str) -> None:
  """Raises `CoEError("key=value: expectation")` unless `condition` holds.

  The value's repr is kept on one line (a ConfigDict's spans several).
  """
  if not condition:
    shown = repr(value)
    if "\n" in shown:
      shown = " ".join(shown.split())
    raise CoEError(f"{key}={shown}: {expectation}")

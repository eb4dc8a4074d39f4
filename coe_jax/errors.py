"""User-facing errors: one line that names the bad key, value or file.

Command-line entry points catch `CoEError` and print its message alone (no
traceback), then exit non-zero. Library callers get an ordinary exception.
"""

from typing import Any


class CoEError(ValueError):
  """A problem with the user's input (config, data, files), stated in one line."""


def require(condition: bool, key: str, value: Any, expectation: str) -> None:
  """Raises `CoEError("key=value: expectation")` unless `condition` holds."""
  if not condition:
    raise CoEError(f"{key}={value!r}: {expectation}")

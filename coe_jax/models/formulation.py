"""Switches between formulations of one op that compute the same function.

Some ops run fastest in different forms on different targets: XLA's CPU
backend, accelerators, and LiteRT's XNNPACK kernels after export (depthwise
convolutions, PWLU). A `Switch` holds the choice in a context variable, so an
exporter picks the form of everything traced inside a `with` block without an
argument threaded through every module. Parameters are the same in every form,
so checkpoints do not depend on the choice.

The choice is read while tracing, and it is not part of `jax.jit`'s cache key:
a jitted function already traced for some shapes keeps the formulation it was
traced with. Trace a fresh function inside the block (as the exporter does).
"""

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax


class Switch:
  """The formulation of one op: `with switch("name"): ...` forces it while tracing."""

  def __init__(self, op: str, choices: Sequence[str], default: str):
    """`op` names the op in errors; `default` is used outside any `with` block."""
    assert default in choices, (default, choices)
    self.op, self.choices = op, tuple(choices)
    self._choice = contextvars.ContextVar(f"{op}_formulation", default=default)

  @contextlib.contextmanager
  def __call__(self, choice: str) -> Iterator[None]:
    """Uses `choice` for this op while the block runs."""
    if choice not in self.choices:
      raise ValueError(f"{self.op} formulation {choice!r}: expected one of {self.choices}")
    token = self._choice.set(choice)
    try:
      yield
    finally:
      self._choice.reset(token)

  @property
  def current(self) -> str:
    """The formulation in force."""
    return self._choice.get()

  def cpu_form_in_force(self, form: str) -> bool:
    """Whether `form`, the CPU's formulation, applies: chosen, or "auto" on a CPU backend."""
    choice = self.current
    return choice == form or (choice == "auto" and jax.default_backend() == "cpu")

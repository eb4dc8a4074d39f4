"""Where a run's metrics go: `metrics.jsonl` and TensorBoard, written by the chief.

TensorBoard summaries go through clu's writers, which import TensorFlow.
TensorFlow has no wheel for aarch64 (the GH200 and GB200 GPU nodes), and
training needs it for nothing else, so without it a run still trains: it
says so in one line and writes `metrics.jsonl` (and the console) alone.
"""

import functools
import json
import os
from typing import Any, Mapping, Optional

from absl import logging
from etils import epath

from coe_jax import run_dir
from coe_jax.errors import CoEError


@functools.cache
def tensorflow_missing() -> Optional[str]:
  """Why TensorFlow cannot be imported (its error), or None when it can."""
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return str(e)
  return None


def _logged_step(line: str) -> float:
  """The step of a `metrics.jsonl` line; infinity for a line that is not one (cut short)."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return float("inf")


class JsonlWriter:
  """Appends scalars to `metrics.jsonl`, one JSON object per step: easy to load anywhere.

  Object stores (gs://) cannot append: there the writer keeps the lines and
  rewrites the whole file at each write (a few hundred lines a run), atomically.
  """

  def __init__(self, path: str, start_step: int = 0):
    """Appends to `path`, first dropping its lines past `start_step`.

    A run resumed from step S trains the steps after S again, and logs them
    again: their old lines (and a line cut short by a kill) are dropped, so
    the file holds each step once, as an uninterrupted run's does.
    """
    self._path = path
    self._remote = run_dir.is_remote(path)
    self._lines = []
    if epath.Path(path).exists():
      lines = epath.Path(path).read_text().splitlines()
      self._lines = [line for line in lines if _logged_step(line) <= start_step]
      run_dir.write_text_atomically(path, "".join(line + "\n" for line in self._lines))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
    if self._remote:
      self._lines.append(line)
      run_dir.write_text_atomically(self._path, "".join(x + "\n" for x in self._lines))
    else:
      with open(self._path, "a", encoding="utf-8") as f:
        f.write(line + "\n")

  def flush(self) -> None:
    pass


class Writers:
  """Scalars to every writer of a run (none on a process that is not the chief)."""

  def __init__(self, writers: list[Any]):
    self._writers = writers

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def flush(self) -> None:
    for writer in self._writers:
      writer.flush()


def open_writers(workdir: str, start_step: int, *, chief: bool) -> Writers:
  """The chief's writers: TensorBoard (where TensorFlow is installed) and `metrics.jsonl`;
  the other processes write nothing."""
  if not chief:
    return Writers([])
  writers = []
  if tensorflow_missing() is None:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    writers.append(metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir)))
  else:
    logging.warning(
        "no TensorBoard summaries: they need TensorFlow (%s); metrics go to the "
        "console and %s", tensorflow_missing(), run_dir.METRICS)
  writers.append(JsonlWriter(os.path.join(workdir, run_dir.METRICS), start_step))
  return Writers(writers)


def profiler(workdir: str, num_steps: int, first_step: int) -> Any:
  """clu's profiling hook (`train.profile_steps`), which needs TensorFlow."""
  if tensorflow_missing() is not None:
    raise CoEError(f"train.profile_steps={num_steps}: profiling goes through clu, which needs "
                   f"TensorFlow ({tensorflow_missing()}); set it to 0 on this machine")
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  return periodic_actions.Profile(num_profile_steps=num_steps,
                                  logdir=workdir,
                                  first_profile=first_step)

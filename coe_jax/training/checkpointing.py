"""Checkpoints of a training run, through orbax.

They live in `WORKDIR/checkpoints/<step>/{state,meta}` (`coe_jax.run_dir`).

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a killed save never becomes the latest checkpoint. A latest
checkpoint that cannot be read (truncated or missing files) is reported in one
line and the previous one is used; a training run moves the unreadable one to
`unreadable_checkpoints/`, so that it can save that step again, and deletes
nothing. When no checkpoint can be read the run stops with an error rather
than start afresh. On several processes (a pod) all of them resume the same
step and set the same checkpoints aside: process 0's listing names the steps
to try, and a step counts as readable only where every process read it.
Checkpoints are read through orbax only (no pickle). The workdir may be
remote (gs://...): it is used as given, never resolved against the local disk.
"""

import json
import logging as std_logging
import sys
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from coe_jax import config_base, run_dir
from coe_jax.errors import CoEError, require

# Config keys that fix the structure and shapes of the saved state: a checkpoint
# written with other values cannot be restored into this run. The optimizer
# fixes the layout of the optimizer state.
SHAPE_KEYS = ("num_experts", "delegator", "expert", "data.image_size", "data.channels",
              "train.optimizer")
# Longest reason quoted for an unreadable checkpoint; tensorstore's run to kilobytes.
_MAX_REASON_CHARS = 300


def _lookup(config: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


def _plain(value: Any) -> Any:
  """JSON-comparable form of a config value (tuples become lists)."""
  return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))


def shape_fingerprint(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
  """The config values that fix the saved state's structure, saved with every checkpoint."""
  fingerprint = {key: _plain(_lookup(config, key)) for key in SHAPE_KEYS}
  fingerprint["num_classes"] = num_classes
  # The state holds EMA parameters only when the EMA is on; its decay may change.
  fingerprint["ema (train.ema_decay > 0)"] = config.train.ema_decay > 0
  return fingerprint


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], directory: str) -> None:
  """Fails in one line naming the first key where a checkpoint and the config differ.

  The saved networks are read in today's layout, as a run's config.json is
  (`config_base.upgrade_network`): a checkpoint saved before a network key
  existed (`kind`) matches a config that has the key's default.
  """
  saved = dict(saved)
  for name in config_base.NETWORKS:
    if isinstance(saved.get(name), dict):
      saved[name] = config_base.upgrade_network(saved[name])
  for key in current:
    if saved.get(key) != current[key]:
      raise CoEError(f"{key}={current[key]!r}: the checkpoints in {directory} were written with "
                     f"{key}={saved.get(key)!r}; use another workdir or the same config")


class Checkpointer:
  """Periodic asynchronous saves and robust restores of one run's train state."""

  def __init__(self, workdir: str, *, keep: int, fingerprint: dict[str, Any]):
    # Not `epath.Path.resolve`: it turns gs://bucket/run into <cwd>/gs:/bucket/run.
    self.directory = str(epath.Path(run_dir.absolute(workdir)) / run_dir.CHECKPOINTS)
    self.fingerprint = fingerprint
    self.manager = ocp.CheckpointManager(self.directory,
                                         options=ocp.CheckpointManagerOptions(
                                             max_to_keep=keep,
                                             create=True,
                                             enable_async_checkpointing=True),
                                         item_names=("state", "meta"))
    self._handler = ocp.CompositeCheckpointHandler()

  def save(self, step: int, state: Any, *, force: bool = False) -> None:
    self.manager.save(step,
                      args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(self.fingerprint)),
                      force=force)

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host has been told of a preemption."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def latest_step(self) -> Optional[int]:
    """The newest checkpoint's step (its save may still be finishing), or None."""
    return self.manager.latest_step()

  def close(self) -> None:
    self.manager.close()
    self._handler.close()

  def restore_latest(self,
                     abstract_state: Any,
                     *,
                     set_aside_unreadable: bool = False) -> Optional[tuple[int, Any]]:
    """(step, state) of the newest readable checkpoint, or None if there is none.

    Newer checkpoints that cannot be read are skipped, each reported in one
    line. With several processes, every one restores the same step: process
    0's listing names each step to try, and a step counts as readable only
    if every process read it, so that no host resumes another step than the
    rest (or starts afresh beside them) when their views of the storage
    differ.

    Args:
      abstract_state: shapes, dtypes and shardings (from `jax.eval_shape` plus
        the state's shardings), so arrays land where the train step expects them.
      set_aside_unreadable: move the skipped checkpoints to `run_dir.UNREADABLE_CHECKPOINTS`
        (training does, so it can save those steps again; readers leave them).

    Raises:
      CoEError: if the checkpoints were written with another config, or if
        there are checkpoints and none can be read.
    """
    _ignore_abandoned_reads()
    step, state, unreadable = self._newest_readable(abstract_state)
    if step is None:
      if unreadable:
        newest, reason = unreadable[0]
        raise CoEError(f"checkpoints={self.directory!r}: none of the {len(unreadable)} "
                       f"checkpoints can be read, the newest ({newest}) because: {reason}; "
                       "move the folder away to start afresh")
      return None
    moved = self._set_aside([s for s, _ in unreadable]) if set_aside_unreadable else {}
    for bad, reason in unreadable:
      where = f"moved to {moved[bad]}" if bad in moved else "left in place"
      logging.warning("checkpoint %s/%d cannot be read (%s); resuming from step %d instead; "
                      "%s", self.directory, bad, reason, step, where)
    return step, state

  def _newest_readable(self, abstract_state: Any) -> tuple[Optional[int], Any, list]:
    """(step, state, [(unreadable step, reason)] newest first); (None, None, ...) for none.

    The same step and list on every process.
    """
    listed = sorted(self.manager.all_steps(), reverse=True)
    unreadable = []
    while True:
      below = unreadable[-1][0] if unreadable else float("inf")
      step = _from_process_0(next((s for s in listed if s < below), _NONE))
      if step == _NONE:
        return None, None, unreadable
      outcome, detail = self._read(step, abstract_state)
      outcomes = _from_every_process(outcome)
      if all(o == _READ for o in outcomes):
        return step, detail, unreadable
      if _MISMATCH in outcomes:
        if outcome == _MISMATCH:
          raise detail
        raise CoEError(f"checkpoints={self.directory!r}: process {outcomes.index(_MISMATCH)} "
                       f"found checkpoint {step} written with another config; use another "
                       "workdir or the same config")
      if outcome == _READ:
        failed = [str(i) for i, o in enumerate(outcomes) if o != _READ]
        detail = f"process {', '.join(failed)} cannot read it"
      unreadable.append((step, detail))

  def _read(self, step: int, abstract_state: Any) -> tuple[int, Any]:
    """(_READ, state), (_UNREADABLE, reason) or (_MISMATCH, CoEError) for checkpoint `step`.

    Through orbax's handler rather than the manager: the manager's restore
    ends in a barrier that only the processes whose read succeeded reach, so
    one process failing where another did not would leave them waiting on
    each other.
    """
    where = epath.Path(self.manager.directory) / str(step)
    try:
      meta = self._handler.restore(where, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped alike.
      return _UNREADABLE, _reason(e)
    try:
      check_fingerprint(meta, self.fingerprint, self.directory)
    except CoEError as e:
      return _MISMATCH, e
    try:
      restored = self._handler.restore(
          where, ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # noqa: BLE001
      return _UNREADABLE, _reason(e)
    return _READ, restored["state"]

  def restore_exactly(self, abstract_state: Any, step: Optional[int] = None) -> tuple[int, Any]:
    """(step, state) of checkpoint `step` (the newest when None), with no fall-back.

    For readers (predictors, exporters, evaluation): a model must not be
    silently an older one than asked for.

    Raises:
      CoEError: no such checkpoint, or it cannot be read; the message lists the
        saved steps, so a user can ask for an older one on purpose.
    """
    _ignore_abandoned_reads()
    steps = sorted(self.manager.all_steps())
    if not steps:
      raise CoEError(f"checkpoints={self.directory!r}: no checkpoint to read")
    wanted = steps[-1] if step is None else step
    which = "the newest checkpoint" if step is None else "checkpoint"
    require(
        wanted in steps, "step", step, f"no such checkpoint in {self.directory}; saved steps: "
        f"{', '.join(map(str, steps))}")
    try:
      meta = self.manager.restore(wanted,
                                  args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      check_fingerprint(meta, self.fingerprint, self.directory)
      restored = self.manager.restore(
          wanted, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except CoEError:
      raise
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported alike.
      older = [s for s in steps if s < wanted]
      hint = (f"; ask for an older one on purpose (step={older[-1]}; saved steps: "
              f"{', '.join(map(str, steps))})" if older else "")
      raise CoEError(f"step={wanted}: {which} in {self.directory} cannot be read "
                     f"({_reason(e)}){hint}") from None
    return wanted, restored["state"]

  def _set_aside(self, steps: list[int]) -> dict[int, str]:
    """Moves these checkpoints to `run_dir.UNREADABLE_CHECKPOINTS`; every process calls it
    with the same steps (`restore_latest` agrees on them).

    Returns step -> new path.
    """
    if not steps:
      return {}
    target_dir = epath.Path(self.directory).parent / run_dir.UNREADABLE_CHECKPOINTS

    def target(step: int, copy: int) -> epath.Path:
      return target_dir / (str(step) if copy == 1 else f"{step}.{copy}")

    copies = np.ones(len(steps), np.int32)
    if jax.process_index() == 0:
      for i, step in enumerate(steps):
        while target(step, copies[i]).exists():  # The same step can turn out unreadable twice.
          copies[i] += 1
    # Process 0 alone moves them; the others report the names it chose.
    copies = [int(c) for c in _from_process_0(copies)]
    moved = {step: str(target(step, copy)) for step, copy in zip(steps, copies)}
    if jax.process_index() == 0:
      target_dir.mkdir(parents=True, exist_ok=True)
      for step, path in moved.items():
        (epath.Path(self.directory) / str(step)).rename(path)
    if jax.process_count() > 1:  # No process lists or saves these steps before they moved.
      multihost_utils.sync_global_devices("coe_jax: unreadable checkpoints set aside")
    self.manager.reload()  # Forget the moved steps, so that they can be saved again.
    return moved


# What a process found when it read a checkpoint, as `_read` returns it.
_READ, _UNREADABLE, _MISMATCH = 0, 1, 2
# No step to try: the step `_from_process_0` broadcasts when process 0 has none left.
_NONE = -1


def _from_process_0(value: Any) -> Any:
  """Process 0's `value` (an int or an int array), on every process."""
  if jax.process_count() == 1:
    return value
  result = np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))
  return int(result) if result.ndim == 0 else result


def _from_every_process(value: int) -> list[int]:
  """Every process's `value`, by process index."""
  if jax.process_count() == 1:
    return [value]
  return [int(v) for v in multihost_utils.process_allgather(np.int32(value))]


def _ignore_abandoned_reads() -> None:
  """Silences the stray tracebacks of failed restores' abandoned reads, from now on.

  When one array of a checkpoint cannot be read, orbax gives up and closes its
  event loop while tensorstore finishes the other reads. Those report through
  two channels, both after the restore may have returned, hence filters that
  stay: "RuntimeError: Event loop is closed" through `sys.unraisablehook`
  (about a hundred for one skipped checkpoint), and, when a failed read's task
  is garbage-collected, asyncio's "Task (or Future) exception was never
  retrieved" log record. Other reports pass on.
  """
  asyncio_logger = std_logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadFilter) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedReadFilter())
  previous = sys.unraisablehook
  if getattr(previous, "ignores_abandoned_reads", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.ignores_abandoned_reads = True
  sys.unraisablehook = hook


class _AbandonedReadFilter(std_logging.Filter):
  """Drops asyncio's reports of orbax reads whose failure nobody awaited."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = str(record.msg)
    if not (record.exc_info and message.startswith(
        ("Task exception was never retrieved", "Future exception was never retrieved"))):
      return True
    # tensorstore's own read futures fail in C++: no orbax frame, but their
    # errors carry the read's tensorstore spec.
    if message.startswith("Future") and "tensorstore_spec" in str(record.exc_info[1]):
      return False
    tb = record.exc_info[2]
    while tb is not None:
      if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("orbax."):
        return False
      tb = tb.tb_next
    return True


def _reason(error: Exception) -> str:
  """The gist of why a checkpoint cannot be read, short and on one line."""
  text = f"{type(error).__name__}: {_first_line(error).split(' [tensorstore_spec', 1)[0]}"
  return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS - 3] + "..."


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__

"""Checkpoints of a training run, through orbax.

A run's workdir holds:

    config.json      the config the run was started with
    run.json         facts about the data (class names)
    checkpoints/<step>/{state,meta}   orbax checkpoints, the last few kept
    results.json     the final evaluation, with the calibrated threshold

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a killed save never becomes the latest checkpoint. A latest
checkpoint that cannot be read is reported in one line and the previous one is
used; nothing is deleted. Checkpoints are read through orbax only (no pickle).
"""

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from absl import logging

from coe_jax.errors import CoEError

# Config keys that fix the shapes of the saved state: a checkpoint written with
# other values cannot be restored into this run.
SHAPE_KEYS = ("num_experts", "delegator", "expert", "data.image_size", "data.channels")


def _lookup(config: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


def _plain(value: Any) -> Any:
  """JSON-comparable form of a config value (tuples become lists)."""
  return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value))


def shape_fingerprint(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
  fingerprint = {key: _plain(_lookup(config, key)) for key in SHAPE_KEYS}
  fingerprint["num_classes"] = num_classes
  return fingerprint


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], directory: str) -> None:
  """Fails in one line naming the first key where a checkpoint and the config differ."""
  for key in current:
    if saved.get(key) != current[key]:
      raise CoEError(f"{key}={current[key]!r}: the checkpoints in {directory} were written with "
                     f"{key}={saved.get(key)!r}; use another workdir or the same config")


class Checkpointer:
  """Periodic asynchronous saves and robust restores of one run's train state."""

  def __init__(self, workdir: str, *, keep: int, fingerprint: dict[str, Any]):
    self.directory = str(epath.Path(workdir).resolve() / "checkpoints")
    self.fingerprint = fingerprint
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True),
        item_names=("state", "meta"))

  def save(self, step: int, state: Any, *, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.fingerprint)), force=force)

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host has been told of a preemption."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any]]:
    """(step, state) of the newest readable checkpoint, or None if there is none.

    `abstract_state` carries shapes, dtypes and shardings (from
    `jax.eval_shape` plus the state's shardings), so arrays land where the
    train step expects them.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped alike.
        logging.warning("checkpoint %s/%d is unreadable (%s); trying the previous one",
                        self.directory, step, _first_line(e))
        continue
      check_fingerprint(meta, self.fingerprint, self.directory)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # noqa: BLE001
        logging.warning("checkpoint %s/%d is unreadable (%s); trying the previous one",
                        self.directory, step, _first_line(e))
        continue
      return step, restored["state"]
    return None


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def write_json(path: str, payload: Any) -> None:
  """Writes JSON atomically: a reader sees the old file or the new one, never half.

  Paths may be local or remote (gs://...), through etils.epath.
  """
  path = epath.Path(path)
  tmp = path.parent / f"{path.name}.tmp"
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)


def read_json(path: str) -> Any:
  return json.loads(epath.Path(path).read_text())


def load_for_inference(workdir: str):
  """(config, eval variables, meta) of a run, for the predictor and the exporter.

  `meta` has `class_names`, `num_classes`, `threshold` (the calibrated tau
  from results.json; before the run has been evaluated, `eval.threshold` or,
  if unset, infinity: no early exit) and `expected_exit_rate` (the test exit
  rate at that tau, which sizes serving-mode expert buffers; 0 before).
  """
  from coe_jax import optim, train_step  # pylint: disable=g-import-not-at-top
  from coe_jax.models.coe import CoE  # pylint: disable=g-import-not-at-top

  config_path = os.path.join(workdir, "config.json")
  if not epath.Path(config_path).is_file():
    raise CoEError(f"workdir={workdir!r}: no config.json; is this the workdir of a training run?")
  config = ml_collections.ConfigDict(read_json(config_path))
  run_path = os.path.join(workdir, "run.json")
  if not epath.Path(run_path).is_file():
    raise CoEError(f"workdir={workdir!r}: no run.json; the run has not started training")
  run = read_json(run_path)
  model = CoE(config, run["num_classes"])
  optimizer = optim.make_optimizer(config)
  abstract = jax.eval_shape(
      lambda: train_step.create_train_state(model, optimizer, config, jax.random.key(0)))
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints,
                              fingerprint=shape_fingerprint(config, run["num_classes"]))
  try:
    restored = checkpointer.restore_latest(abstract)
  finally:
    checkpointer.close()
  if restored is None:
    raise CoEError(f"workdir={workdir!r}: no readable checkpoint in {checkpointer.directory}")
  _, state = restored
  results_path = os.path.join(workdir, "results.json")
  if epath.Path(results_path).is_file():
    results = read_json(results_path)
    threshold, exit_rate = results["threshold"], results["early_exit_rate"]
  else:
    threshold = config.eval.threshold if config.eval.threshold is not None else float("inf")
    exit_rate = 0.0
  meta = {"class_names": run["class_names"], "num_classes": run["num_classes"],
          "threshold": threshold, "expected_exit_rate": exit_rate}
  return config, state.eval_variables(), meta

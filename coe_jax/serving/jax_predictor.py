"""Predicting with a trained CoE from images as a user holds them.

    p = Predictor.load("runs/demo")
    out = p(images)             # uint8 [B, H, W] or [B, H, W, C], any size
    out["logits"], out["early_exit"], out["expert"]
    class_logits, selection_logits = p.delegator(images)
    expert_logits = p.expert(2, images)

Axis letters: B batch (a caller's images), H/W their height and width, C channels,
S the model's image size, K classes, N experts (docs/method.md, section 2).

Images go through the evaluation preprocessing of the run's data set
(`coe_jax.data.preprocess_images`), then the jitted router
(`coe_jax.routing.route_and_predict`), one group, on the default device. Each
function compiles once per batch shape; the threshold is traced, so changing
it does not recompile. Results are numpy arrays.

The threshold tau: a sample exits early when the delegator's max class
probability is >= tau. Any tau >= 0 is accepted: 0 makes every sample exit,
and a tau above 1 (e.g. `float("inf")`) switches early exit off; calibration
may store a tau just above 1 for "no sample exits". Negative, NaN or
non-numeric values raise `CoEError`.
"""

import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from coe_jax import config_base, routing, run_dir
from coe_jax.answers import ANSWER_KEYS
from coe_jax.data import eval_crop_fraction
from coe_jax.errors import CoEError, require
from coe_jax.models.coe import CoE
from coe_jax.serving.predictor_base import PredictorBase, check_threshold
from coe_jax.training import checkpointing, optim, train_step


def load_for_inference(
    workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any], dict[str, Any]]:
  """(config, eval variables, meta) of a run, for the predictor and the exporter.

  `meta` has `class_names`, `num_classes`, `threshold` (the calibrated tau
  from results.json; before the run has been evaluated, `eval.threshold` or,
  if unset, infinity: no early exit) and `expected_exit_rate` (the hold-out's
  exit rate at that tau, which sizes serving-mode expert buffers; 0 before).
  """
  config_path = os.path.join(workdir, run_dir.CONFIG)
  if not epath.Path(config_path).is_file():
    raise CoEError(f"workdir={workdir!r}: no config.json; is this the workdir of a training run?")
  config = ml_collections.ConfigDict(config_base.upgrade(run_dir.read_json(config_path)))
  config_base.validate(config)
  run_path = os.path.join(workdir, run_dir.RUN)
  if not epath.Path(run_path).is_file():
    raise CoEError(f"workdir={workdir!r}: no run.json; the run has not started training")
  run = run_dir.read_json(run_path)
  model = CoE(config, run["num_classes"])
  optimizer = optim.make_optimizer(config)
  abstract = jax.eval_shape(
      lambda: train_step.create_train_state(model, optimizer, config, jax.random.key(0)))
  # Onto this process's first device, whatever devices the run was saved from:
  # a checkpoint written by a pod or a multi-device mesh loads on a laptop.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  fingerprint = checkpointing.shape_fingerprint(config, run["num_classes"])
  checkpointer = checkpointing.Checkpointer(workdir,
                                            keep=config.train.keep_checkpoints,
                                            fingerprint=fingerprint)
  try:
    restored = checkpointer.restore_latest(abstract)
  finally:
    checkpointer.close()
  if restored is None:
    raise CoEError(f"workdir={workdir!r}: no readable checkpoint in {checkpointer.directory}")
  _, state = restored
  results_path = os.path.join(workdir, run_dir.RESULTS)
  if epath.Path(results_path).is_file():
    results = run_dir.read_json(results_path)
    threshold, exit_rate = results["threshold"], results["expected_exit_rate"]
  else:
    threshold = config.eval.threshold if config.eval.threshold is not None else float("inf")
    exit_rate = 0.0
  meta = {
      "class_names": run["class_names"],
      "num_classes": run["num_classes"],
      "threshold": threshold,
      "expected_exit_rate": exit_rate
  }
  return config, state.eval_variables(), meta


class Predictor(PredictorBase):
  """A trained CoE with its preprocessing, class names and calibrated threshold."""

  def __init__(self,
               model: CoE,
               variables: dict[str, Any],
               *,
               image_size: int,
               channels: int,
               class_names: Sequence[str],
               threshold: float,
               routing_spec: routing.RoutingSpec = routing.RoutingSpec(),
               crop_fraction: float = 1.0):
    """Builds a predictor from a model and its variables.

    Args:
      model: the CoE.
      variables: its (evaluation) variables.
      image_size: S, the model's input size (`config.data.image_size`).
      channels: the model's input channels (`config.data.channels`).
      class_names: K names, in label order.
      threshold: the default tau (the calibrated one).
      routing_spec: how to route (`RoutingSpec.from_config(config, expected_exit_rate)`).
      crop_fraction: the evaluation centre crop (`coe_jax.data.eval_crop_fraction`).
    """
    require(
        len(class_names) == model.num_classes, "class_names", len(class_names),
        f"expected {model.num_classes} names, one per class")
    self.model = model
    self.variables = variables
    self.image_size = image_size
    self.channels = channels
    self.crop_fraction = crop_fraction
    self.class_names = list(class_names)
    self.threshold = check_threshold(threshold)
    self.num_experts = model.num_experts
    self.routing_spec = routing_spec
    self._delegator = jax.jit(model.delegator)
    self._expert = jax.jit(model.expert)

  @classmethod
  def load(cls, workdir: str) -> "Predictor":
    """The predictor of a training run's latest checkpoint and calibrated threshold."""
    config, variables, meta = load_for_inference(workdir)
    model = CoE(config, len(meta["class_names"]))
    return cls(model,
               variables,
               image_size=config.data.image_size,
               channels=config.data.channels,
               class_names=meta["class_names"],
               threshold=meta["threshold"],
               routing_spec=routing.RoutingSpec.from_config(config, meta["expected_exit_rate"]),
               crop_fraction=eval_crop_fraction(config))

  def route(self, pixels: np.ndarray, threshold: Optional[float] = None) -> dict[str, np.ndarray]:
    """`__call__` on images already at model input, uint8 [B, S, S, C]."""
    out = routing.route_and_predict(self.model,
                                    self.variables,
                                    pixels,
                                    self.tau(threshold),
                                    spec=self.routing_spec)
    return {key: np.asarray(out[key]) for key in ANSWER_KEYS}

  def delegator(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
    """The delegator alone: (class_logits [B, K], selection_logits [B, N])."""
    class_logits, selection_logits = self._delegator(self.variables, self.preprocess(images))
    return np.asarray(class_logits), np.asarray(selection_logits)

  def expert(self, j: int, images: Any) -> np.ndarray:
    """Expert j alone on every image: logits [B, K]."""
    return np.asarray(self._expert(self.variables, self.check_expert(j), self.preprocess(images)))

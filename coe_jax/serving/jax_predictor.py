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

The threshold tau: a sample exits early by `coe_jax.answers.exits` (the
delegator's max class probability >= tau). Any tau >= 0 is accepted: 0 makes
every sample exit, and a tau above 1 (e.g. `float("inf")`) switches early
exit off; calibration may store a tau just above 1 for "no sample exits".
Negative, NaN or non-numeric values raise `CoEError`.
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np

from coe_jax import routing
from coe_jax.answers import ANSWER_KEYS
from coe_jax.data import eval_crop_fraction
from coe_jax.errors import require
from coe_jax.models.coe import CoE
from coe_jax.serving.predictor_base import PredictorBase, check_threshold
from coe_jax.training import saved_run


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
  def load(cls, workdir: str, step: Optional[int] = None) -> "Predictor":
    """The predictor of a training run's newest checkpoint (or `step`'s) and calibrated
    threshold; refuses in one line when that checkpoint cannot be read."""
    config, variables, meta = saved_run.load_for_inference(workdir, step)
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

"""The call both predictors share: user images in, CoE's answers out. Imports no JAX.

`coe_jax.serving.jax_predictor.Predictor` (JAX) and
`coe_jax.serving.litert_predictor.LiteRTPredictor`
(LiteRT, which must not import JAX or TensorFlow) subclass `PredictorBase`:
each defines `route`, on images already at model input, and the attributes
below; the preprocessing and the argument checks live here once.

Axis letters: B batch (a caller's images), H/W their height and width, C channels,
S the model's image size, K classes (docs/method.md, section 2).
"""

import math
import numbers
from typing import Any, Optional

import numpy as np

from coe_jax.data.images import preprocess_user_batch
from coe_jax.errors import require


def check_threshold(threshold: Any) -> float:
  """tau as a float: any number >= 0 (above 1 turns early exit off); else `CoEError`."""
  is_number = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
  require(is_number and not math.isnan(threshold) and threshold >= 0, "threshold", threshold,
          "expected a number >= 0 (a probability in [0, 1]; above 1 turns early exit off)")
  return float(threshold)


class PredictorBase:
  """Preprocessing and checks of a predictor; subclasses set the attributes and `route`."""
  image_size: int  # S
  channels: int  # C
  crop_fraction: float  # the evaluation centre crop
  threshold: float  # the calibrated tau
  num_experts: int

  def preprocess(self, images: Any) -> np.ndarray:
    """User images ([B, H, W] or [B, H, W, C], any size) to model input uint8 [B, S, S, C]."""
    return preprocess_user_batch(images, self.image_size, self.channels, self.crop_fraction)

  def tau(self, threshold: Optional[float]) -> float:
    """The threshold to answer at: `threshold`, checked, or the calibrated one for None."""
    return self.threshold if threshold is None else check_threshold(threshold)

  def check_expert(self, j: Any) -> int:
    """j as an expert index, else a one-line `CoEError`."""
    valid = isinstance(j, numbers.Integral) and not isinstance(j, bool)
    require(valid and 0 <= j < self.num_experts, "j", j,
            f"expected an expert index in [0, {self.num_experts - 1}]")
    return int(j)

  def route(self, pixels: np.ndarray, threshold: Optional[float] = None) -> dict[str, np.ndarray]:
    """`__call__` on images already at model input, uint8 [B, S, S, C]."""
    raise NotImplementedError

  def __call__(self, images: Any, threshold: Optional[float] = None) -> dict[str, np.ndarray]:
    """CoE's answers.

    Args:
      images: [B, H, W] or [B, H, W, C] (C = 1, 3 or 4), uint8 0-255 (or
        integers 0-255, floats 0-1), any size.
      threshold: tau; None uses the calibrated one.

    Returns:
      `coe_jax.answers`' keys: logits float32 [B, K]; early_exit bool [B];
      expert int [B], `NO_EXPERT` (-1) where the delegator answered.
    """
    return self.route(self.preprocess(images), threshold)

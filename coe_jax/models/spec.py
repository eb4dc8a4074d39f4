"""Network specifications: a validated, frozen view of a network config.

A config's `delegator` or `expert` entry (see `coe_jax.config_base.network`) is
turned into a `NetworkSpec` once, with width and depth multipliers applied, so
the Flax modules and the FLOPs counter read the same numbers. Bad values fail
here, by `config_base.validate_network`, with a one-line `CoEError` naming the key.
"""

import dataclasses
import math
from typing import Any, Mapping

from coe_jax import config_base


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to a multiple of `divisor`, losing at most 10%.

  The rounding used by MobileNet-style networks, so widths map well to
  hardware vector lanes.
  """
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


@dataclasses.dataclass(frozen=True)
class StageSpec:
  features: int
  depth: int
  kernel: int
  expansion: float
  stride: int
  se_ratio: float
  activation: str
  condconv_kernels: int  # 0: plain convolutions in this stage.
  fused: bool = False  # Fused-MBConv: one dense k x k convolution instead of 1x1 + depthwise.


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
  stem_features: int
  stem_kernel: int
  stem_stride: int
  stages: tuple[StageSpec, ...]
  head_features: int
  classifier_features: int
  activation: str
  dropout_rate: float
  pwlu_intervals: int
  pwlu_per_channel: bool

  @classmethod
  def from_config(cls, config: Mapping[str, Any], name: str) -> "NetworkSpec":
    """Validates `config` (the entry called `name`, e.g. "expert") and applies multipliers."""
    config_base.validate_network(config, name)
    width = config["width_multiplier"]
    depth_multiplier = config["depth_multiplier"]
    activation = config["activation"]
    condconv_kernels = config["condconv_kernels"]
    stages = []
    for index, stage in enumerate(config["stages"]):
      stage_activation = stage.get("activation") or activation
      stages.append(
          StageSpec(
              features=make_divisible(stage["features"] * width),
              depth=int(math.ceil(stage["depth"] * depth_multiplier)),
              kernel=stage["kernel"],
              expansion=float(stage["expansion"]),
              stride=stage["stride"],
              se_ratio=float(stage["se_ratio"]),
              activation=stage_activation,
              condconv_kernels=condconv_kernels if index >= config["condconv_from_stage"] else 0,
              fused=bool(stage.get("fused", False)),
          ))
    return cls(
        stem_features=make_divisible(config["stem_features"] * width),
        stem_kernel=config["stem_kernel"],
        stem_stride=config["stem_stride"],
        stages=tuple(stages),
        # Like MobileNetV3, the head widens with the multiplier but never narrows.
        head_features=make_divisible(config["head_features"] * max(width, 1.0)),
        classifier_features=config["classifier_features"],
        activation=activation,
        dropout_rate=float(config["dropout_rate"]),
        pwlu_intervals=config["pwlu_intervals"],
        pwlu_per_channel=bool(config["pwlu_per_channel"]),
    )

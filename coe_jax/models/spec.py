"""Network specifications: a validated, frozen view of a network config.

A config's `delegator` or `expert` entry (see `coe_jax.config_base.network`) is
turned into a `NetworkSpec` once, with width and depth multipliers applied, so
the Flax modules and the FLOPs counter read the same numbers. Bad values fail
here with a one-line `CoEError` naming the key.
"""

import dataclasses
import math
from typing import Any, Mapping

from coe_jax.errors import require

ACTIVATIONS = ("relu", "hard_swish", "swish", "pwlu")
# The keys every entry of a network's `stages` needs (`activation` and `fused` are optional).
STAGE_FIELDS = ("features", "depth", "kernel", "expansion", "stride", "se_ratio")


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
    width = config["width_multiplier"]
    depth_multiplier = config["depth_multiplier"]
    require(width > 0, f"{name}.width_multiplier", width, "expected a positive number")
    require(depth_multiplier > 0, f"{name}.depth_multiplier", depth_multiplier,
            "expected a positive number")
    activation = config["activation"]
    _check_activation(f"{name}.activation", activation)
    for key in ("stem_features", "stem_kernel", "stem_stride", "head_features", "pwlu_intervals"):
      require(config[key] >= 1, f"{name}.{key}", config[key], "expected a positive integer")
    require(config["stem_kernel"] % 2 == 1, f"{name}.stem_kernel", config["stem_kernel"],
            "expected an odd kernel size")
    require(config["classifier_features"] >= 0, f"{name}.classifier_features",
            config["classifier_features"], "expected 0 (none) or a positive width")
    require(0 <= config["dropout_rate"] < 1, f"{name}.dropout_rate", config["dropout_rate"],
            "expected a rate in [0, 1)")
    condconv_kernels = config["condconv_kernels"]
    require(condconv_kernels >= 0, f"{name}.condconv_kernels", condconv_kernels,
            "expected 0 (off) or a positive number of kernels")
    require(isinstance(config["stages"], (list, tuple)) and len(config["stages"]) >= 1,
            f"{name}.stages", config["stages"], "expected a list of at least one stage")

    stages = []
    for index, stage in enumerate(config["stages"]):
      key = f"{name}.stages[{index}]"
      require(isinstance(stage, Mapping) and all(field in stage for field in STAGE_FIELDS), key,
              stage, f"expected a stage with {', '.join(STAGE_FIELDS)} "
              "(coe_jax.config_base.stage builds one)")
      for field in ("features", "depth", "kernel", "stride"):
        require(stage[field] >= 1, f"{key}.{field}", stage[field], "expected a positive integer")
      require(stage["kernel"] % 2 == 1, f"{key}.kernel", stage["kernel"],
              "expected an odd kernel size")
      require(stage["expansion"] >= 1, f"{key}.expansion", stage["expansion"],
              "expected an expansion ratio >= 1")
      require(0 <= stage["se_ratio"] <= 1, f"{key}.se_ratio", stage["se_ratio"],
              "expected a ratio in [0, 1]")
      stage_activation = stage.get("activation") or activation
      _check_activation(f"{key}.activation", stage_activation)
      stages.append(StageSpec(
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


def _check_activation(key: str, activation: str) -> None:
  require(activation in ACTIVATIONS, key, activation, f"expected one of {', '.join(ACTIVATIONS)}")

"""Network specifications: a validated, frozen view of a network config.

A config's `delegator` or `expert` entry (see `coe_jax.config_base.network`) is
turned into a spec once, by its kind (`coe_jax.models.kinds`): for an MBConv
network a `NetworkSpec`, with width and depth multipliers applied, so the Flax
modules and the FLOPs counter (`mbconv_macs`) read the same numbers. Bad
values fail here, by `config_base.validate_network`, with a one-line
`CoEError` naming the key.
"""

import dataclasses
import math
from typing import Any, ClassVar, Mapping

from coe_jax import config_base
from coe_jax.models import kinds


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
  kind: ClassVar[str] = config_base.MBCONV  # Not a field: the kind of every NetworkSpec.

  @classmethod
  def from_config(cls, config: Mapping[str, Any], name: str) -> Any:
    """Validates `config` (the entry called `name`, e.g. "expert") and returns the spec
    its kind builds: a `NetworkSpec` (`from_mbconv_config`) for an MBConv network."""
    config_base.validate_network(config, name)
    return kinds.get(config["kind"]).spec(config, name)

  @classmethod
  def from_mbconv_config(cls, config: Mapping[str, Any], name: str) -> "NetworkSpec":
    """An MBConv network's validated entry with its multipliers applied (the "mbconv"
    kind's spec builder)."""
    del name  # Validated by `from_config`.
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


def conv_macs(size: int,
              kernel: int,
              in_features: int,
              out_features: int,
              groups: int = 1,
              condconv_kernels: int = 0) -> int:
  """Multiply-adds of one convolution producing a size x size map."""
  weights = kernel * kernel * (in_features // groups) * out_features
  macs = size * size * weights
  if condconv_kernels:
    macs += condconv_kernels * weights  # Mixing the per-example kernel.
  return macs


def mbconv_macs(spec: NetworkSpec, image_size: int, in_channels: int, num_outputs: int) -> int:
  """Multiply-adds of one MBConv network's forward pass of one image (the "mbconv"
  kind's count; `coe_jax.flops` says what is counted).

  Args:
    spec: the network.
    image_size: input resolution (square).
    in_channels: image channels.
    num_outputs: total width of the output heads (classes, plus experts for the delegator).
  """
  size = math.ceil(image_size / spec.stem_stride)
  macs = conv_macs(size, spec.stem_kernel, in_channels, spec.stem_features)
  features = spec.stem_features
  for stage in spec.stages:
    for block in range(stage.depth):
      stride = stage.stride if block == 0 else 1
      hidden = make_divisible(features * stage.expansion) if stage.expansion > 1 else features
      k = stage.condconv_kernels
      if k:
        macs += features * k  # Routing: pooled input -> R (here k) kernel weights, once per block.
      projected = not stage.fused or hidden != features
      if stage.fused:
        width = hidden if projected else stage.features
        size = math.ceil(size / stride)
        macs += conv_macs(size, stage.kernel, features, width, condconv_kernels=k)
      else:
        if hidden != features:
          macs += conv_macs(size, 1, features, hidden, condconv_kernels=k)
        width = hidden
        size = math.ceil(size / stride)
        macs += conv_macs(size, stage.kernel, hidden, hidden, groups=hidden, condconv_kernels=k)
      if stage.se_ratio > 0:
        squeeze = max(1, int(features * stage.se_ratio))
        macs += 2 * width * squeeze
      if projected:
        macs += conv_macs(size, 1, hidden, stage.features, condconv_kernels=k)
      features = stage.features
  macs += conv_macs(size, 1, features, spec.head_features)
  features = spec.head_features
  if spec.classifier_features:
    macs += features * spec.classifier_features
    features = spec.classifier_features
  return macs + features * num_outputs

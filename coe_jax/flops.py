"""Analytic FLOPs of the delegator and the experts, in multiply-adds.

FLOPs here means multiply-adds, as in the mobile-network literature
(MobileNetV3, EfficientNet, the CoE paper). Each network kind brings its
count (`coe_jax.models.kinds`). An MBConv network's
(`coe_jax.models.spec.mbconv_macs`) walks the same `NetworkSpec` the Flax
modules are built from, layer by layer:

- convolutions: H' * W' * k * k * (C / groups) * F, with H' x W' the output
  map, k the kernel size, C the input and F the output channels;
- dense layers (squeeze-excitation, classifier, heads): C * F;
- CondConv adds its routing layer and the per-example kernel mixture
  (R multiply-adds per kernel weight, R = `condconv_kernels`);
- BatchNorm (folded into the convolutions at serving time), activations,
  pooling and residual additions are not counted.

    python -m coe_jax.flops --config=configs/imagenet_coe_194m.py
    {"delegator_flops": ..., "expert_flops": ..., "max_flops": ...}
"""

import dataclasses
import json
import math
from typing import Any, Optional

import ml_collections
from absl import flags
from ml_collections import config_flags

from coe_jax.config_loading import flag_config, run_command
from coe_jax.errors import CoEError
from coe_jax.models import kinds
from coe_jax.models.spec import NetworkSpec
from coe_jax.stages import GENERALIST, WGM, Stage, StagePlan


def network_macs(spec: Any, image_size: int, in_channels: int, num_outputs: int) -> int:
  """Multiply-adds of one forward pass of one image, by the spec's network kind's count
  (`coe_jax.models.kinds`; `coe_jax.models.spec.mbconv_macs` for an MBConv network).

  Args:
    spec: the network (`NetworkSpec.from_config`).
    image_size: input resolution (square).
    in_channels: image channels.
    num_outputs: total width of the output heads (classes, plus experts for the delegator).
  """
  return kinds.of(spec).macs(spec, image_size, in_channels, num_outputs)


def count(config: ml_collections.ConfigDict, num_classes: int | None = None) -> dict[str, int]:
  """FLOPs (multiply-adds) per image of the delegator, one expert, and both.

  `num_classes` defaults to `config.data.num_classes`, set by each config for
  its data set (the heads are a small share of the total).
  """
  num_classes = num_classes or config.data.num_classes
  if not num_classes:
    raise CoEError("data.num_classes=None: set it to count the classifier heads' FLOPs")
  size, channels = config.data.image_size, config.data.channels
  delegator = network_macs(NetworkSpec.from_config(config.delegator, "delegator"), size, channels,
                           num_classes + config.num_experts)
  expert = network_macs(NetworkSpec.from_config(config.expert, "expert"), size, channels,
                        num_classes)
  return {"delegator_flops": delegator, "expert_flops": expert, "max_flops": delegator + expert}


def train_step_flops(config: ml_collections.ConfigDict,
                     num_classes: int,
                     stage: str = "coadapt") -> float:
  """Model FLOPs of one train step over the global batch, at 2 FLOPs a multiply-add.

  Training a network costs 3 forward passes (forward, and the two products of
  the backward pass). The delegator trains in every stage; frozen experts run
  forward only (`Stage.expert_passes`). Under routed dispatch an image trains
  one expert (the drawn images add m N / B), and the scored share of the
  batch runs forward through every expert. Recomputation (remat) and the
  transport solvers are not model FLOPs.
  """
  macs = count(config, num_classes)
  named = Stage.named(stage, config)
  experts = config.num_experts
  if config.train.expert_dispatch == "routed":
    # Each image trains its own expert (and m drawn images each expert), or the
    # generalist alone; every expert scores the scored share, forward only.
    trained = {
        WGM: 1 + config.wgm.off_portion_samples * experts / config.train.batch_size,
        GENERALIST: 1
    }.get(named.expert_weights, experts if named.trains_experts else 0)
    scored = experts * config.lgm.score_fraction if named.trains_selection else 0
    expert_passes = 3 * trained + scored
  else:
    expert_passes = named.expert_passes * experts
  per_image = 3 * macs["delegator_flops"] + expert_passes * macs["expert_flops"]
  return 2 * per_image * config.train.batch_size


def run_train_flops(config: ml_collections.ConfigDict, num_classes: int) -> float:
  """Multiply-adds of a whole run's training: each stage's steps at its step's
  model FLOPs (`train_step_flops`, halved: FLOPs count 2 a multiply-add)."""
  return sum((span.end - span.start) * train_step_flops(config, num_classes, span.stage.name) / 2
             for span in StagePlan.from_config(config).spans)


# Width multipliers `scaled_to_flops` chooses from. A family sized by width
# alone keeps each network's shape (its depths and kernels), and its FLOPs
# never fall as the width grows, so a family in FLOPs order is a family in
# width order. Channels round to multiples of 8, so FLOPs move in steps.
WIDTH_MULTIPLIERS = tuple(round(0.05 + 0.01 * i, 2) for i in range(396))  # 0.05 .. 4.00
# CondConv's kernels per convolution in `condconv_network`: the CondConv paper's
# smallest setting that clearly beats the plain network.
CONDCONV_KERNELS = 4


@dataclasses.dataclass(frozen=True)
class Sizing:
  """A width multiplier (on top of a network's own) and the FLOPs it gives."""
  width_multiplier: float
  flops: int
  target: float

  def apply(self, network: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `network` at this width."""
    scaled = network.copy_and_resolve_references()
    scaled.width_multiplier = network.width_multiplier * self.width_multiplier
    return scaled


def _sized(network: ml_collections.ConfigDict, width: float, target: float, image_size: int,
           channels: int, num_outputs: int) -> Sizing:
  """`network` at `width` with its FLOPs."""
  sizing = Sizing(width, 0, float(target))
  return dataclasses.replace(sizing,
                             flops=network_macs(
                                 NetworkSpec.from_config(sizing.apply(network), "network"),
                                 image_size, channels, num_outputs))


def bracketing_widths(network: ml_collections.ConfigDict, target: float, image_size: int,
                      channels: int, num_outputs: int) -> tuple[Sizing, Sizing]:
  """The widths of `network` next to `target` FLOPs: (the widest at or below it,
  the narrowest at or above it); one Sizing twice where a width hits it exactly.

  The depth stays the network's own. FLOPs never fall as the width grows, so a
  bisection finds them in a few counts. Channels round to multiples of 8, so
  the two can lie far apart on a small network (0.29M and 0.60M around the
  digits CoE's 0.42M): `benchmarks.inference` times both and interpolates. At
  the ends of `WIDTH_MULTIPLIERS` both are the end's width.
  """
  if not target > 0:
    raise CoEError(f"target FLOPs={target!r}: expected a positive number")
  sized = lambda width: _sized(network, width, target, image_size, channels, num_outputs)
  low, high = 0, len(WIDTH_MULTIPLIERS) - 1  # The first width reaching `target` is in [low, high].
  while low < high:
    middle = (low + high) // 2
    if sized(WIDTH_MULTIPLIERS[middle]).flops >= target:
      high = middle
    else:
      low = middle + 1
  above = sized(WIDTH_MULTIPLIERS[low])
  if above.flops <= target or low == 0:  # Exact, or beyond an end.
    return above, above
  return sized(WIDTH_MULTIPLIERS[low - 1]), above


def scaled_to_flops(network: ml_collections.ConfigDict, target: float, image_size: int,
                    channels: int, num_outputs: int) -> Sizing:
  """The width multiplier of `network` whose FLOPs come closest to `target`, in ratio.

  One of `bracketing_widths`, or the unchanged width, which wins a tie.
  """
  candidates = [*bracketing_widths(network, target, image_size, channels, num_outputs)]
  unchanged = _sized(network, 1.0, target, image_size, channels, num_outputs)
  return min(candidates + [unchanged],
             key=lambda s: (round(abs(math.log(s.flops / target)), 9), s.width_multiplier != 1.0))


def condconv_network(network: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`network` with CondConv (`CONDCONV_KERNELS` kernels) in its later half of stages,
  unless it already has CondConv."""
  network = network.copy_and_resolve_references()
  if not network.condconv_kernels:
    network.condconv_kernels = CONDCONV_KERNELS
    network.condconv_from_stage = len(network.stages) // 2
  return network


# Dense peak FLOP/s per device, (bfloat16, float32), from the vendors' data
# sheets; matched against `jax.Device.device_kind`, most specific first. A
# float32 matmul runs in one bfloat16 pass on TPUs and in TF32 on these GPUs
# at JAX's default precision, hence their float32 figures.
PEAK_FLOPS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("TPU v4", (275e12, 275e12)),
    ("TPU v5 lite", (197e12, 197e12)),  # v5e
    ("TPU v5e", (197e12, 197e12)),
    ("TPU v5", (459e12, 459e12)),  # v5p
    ("TPU v6 lite", (918e12, 918e12)),  # v6e (Trillium)
    ("TPU v6e", (918e12, 918e12)),
    ("A100", (312e12, 156e12)),
    ("H100 PCIe", (756e12, 378e12)),
    ("H100", (989e12, 495e12)),  # SXM
    ("H200", (989e12, 495e12)),
)


def peak_flops_per_device(device_kind: str, compute_dtype: str) -> Optional[float]:
  """The table's peak FLOP/s of a device kind at `compute_dtype`; None when unknown (CPUs)."""
  for kind, (bfloat16, float32) in PEAK_FLOPS:
    if kind.lower() in device_kind.lower():
      return bfloat16 if compute_dtype == "bfloat16" else float32
  return None


def main(argv):
  del argv
  print(json.dumps(count(flag_config(_CONFIG))))


if __name__ == "__main__":
  # Defined here, not at import, so other entry points can import this module.
  _CONFIG = config_flags.DEFINE_config_file("config",
                                            None,
                                            "Path to a config file.",
                                            lock_config=True)
  flags.mark_flags_as_required(["config"])
  run_command(main)

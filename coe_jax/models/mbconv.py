"""MBConv blocks (MobileNetV2/V3, EfficientNet) with optional CondConv and PWLU.

Axis letters: B batch, H/W height and width (H'/W' after the block's stride),
C input channels (channels last), k spatial kernel size, R CondConv kernels
(docs/method.md, section 2).

A block is 1x1 expand -> depthwise k x k -> squeeze-excitation -> 1x1 project,
BatchNorm after each convolution, an activation after the first two, and a
residual connection when input and output shapes match. A fused block
(EfficientNetV2's Fused-MBConv) computes the first two as one dense k x k
convolution: more multiply-adds, but dense convolutions run far nearer a
CPU's or an accelerator's peak than depthwise ones, so early stages with few
channels train faster fused. With CondConv, the
block computes its routing weights once from its input and shares them with
all three convolutions (CondConv paper, section 3).
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from coe_jax.models.condconv import CondConv, CondConvRouting
from coe_jax.models.conv import Conv
from coe_jax.models.depthwise import DepthwiseConv
from coe_jax.models.formulation import Switch
from coe_jax.models.pwlu import PWLU
from coe_jax.models.spec import make_divisible

# TensorFlow's mobile-network defaults: these BatchNorm settings train well at
# the small per-expert batch sizes CoE sees. Statistics and parameters stay
# float32 whatever the compute dtype (flax computes the moments in float32).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-3)

# "fused": x * relu6(x + 3) / 6, which LiteRT's converter turns into one
# HARD_SWISH op; XNNPACK runs that in float32 but not in int8, where each one
# splits the graph into another XNNPACK partition around a builtin kernel.
# "products": (x / 6) * relu6(x + 3), an order the converter does not fuse: a
# MUL, an ADD with RELU6 fused, and a MUL, which XNNPACK runs in int8 too.
# The int8 export uses "products"; everything else (training, float32 export) "fused".
hard_swish_formulation = Switch("hard_swish", ("fused", "products"), "fused")


def hard_swish(x: jax.Array) -> jax.Array:
  """x * relu6(x + 3) / 6, in the formulation `hard_swish_formulation` selects."""
  if hard_swish_formulation.current == "products":
    return (x * (1 / 6)) * jnp.minimum(jnp.maximum(x + 3, 0), 6)
  return nn.hard_swish(x)


class Activation(nn.Module):
  """relu | hard_swish | swish | pwlu (a learnable PWLU per use)."""
  kind: str
  pwlu_intervals: int = 16
  pwlu_per_channel: bool = False
  statistics_axis: Optional[str] = None  # Mesh axis PWLU's statistics reduce over.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.kind == "pwlu":
      return PWLU(num_intervals=self.pwlu_intervals,
                  per_channel=self.pwlu_per_channel,
                  axis_name=self.statistics_axis)(x, train)
    return {"relu": nn.relu, "hard_swish": hard_swish, "swish": nn.swish}[self.kind](x)


class SqueezeExcite(nn.Module):
  """Channel gating from globally pooled features."""
  squeeze_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x, axis=(1, 2))  # [B, C]
    s = nn.relu(nn.Dense(self.squeeze_features, dtype=self.dtype, name="reduce")(s))
    s = nn.sigmoid(nn.Dense(x.shape[-1], dtype=self.dtype, name="expand")(s))  # [B, C]
    return x * s[:, None, None, :]


class MBConv(nn.Module):
  """One inverted-residual block."""
  features: int
  kernel_size: int
  strides: int
  expansion: float
  se_ratio: float
  activation: str
  condconv_kernels: int = 0
  fused: bool = False
  pwlu_intervals: int = 16
  pwlu_per_channel: bool = False
  dtype: Any = jnp.float32
  batch_norm_axis: Optional[str] = None  # Mesh axis BatchNorm reduces over (in shard_map).

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_features = x.shape[-1]  # x: [B, H, W, C]
    norm = functools.partial(BatchNorm,
                             use_running_average=not train,
                             dtype=self.dtype,
                             axis_name=self.batch_norm_axis)
    hidden = make_divisible(in_features * self.expansion) if self.expansion > 1 else in_features
    conv = self._conv_factory(x)
    act = functools.partial(Activation, self.activation, self.pwlu_intervals, self.pwlu_per_channel,
                            self.batch_norm_axis)

    y = x
    if self.fused:
      # With expansion 1 the dense convolution maps straight to `features`
      # (activated, as in EfficientNetV2) and there is no projection.
      width = hidden if hidden != in_features else self.features
      y = conv(width, self.kernel_size, strides=self.strides, name="fused")(y)
      y = act(name="fused_act")(norm(name="fused_bn")(y), train)  # [B, H', W', width]
    else:
      if hidden != in_features:
        y = conv(hidden, 1, name="expand")(y)  # [B, H, W, hidden]
        y = act(name="expand_act")(norm(name="expand_bn")(y), train)
      y = conv(hidden, self.kernel_size, strides=self.strides, depthwise=True, name="depthwise")(y)
      y = act(name="depthwise_act")(norm(name="depthwise_bn")(y), train)  # [B, H', W', hidden]
    if self.se_ratio > 0:
      y = SqueezeExcite(max(1, int(in_features * self.se_ratio)), dtype=self.dtype, name="se")(y)
    if not self.fused or hidden != in_features:
      y = conv(self.features, 1, name="project")(y)  # [B, H', W', features]
      y = norm(name="project_bn")(y)
    if self.strides == 1 and in_features == self.features:
      y = y + x
    return y

  def _conv_factory(self, x: jax.Array) -> Callable[..., Callable[[jax.Array], jax.Array]]:
    """Returns `conv(features, kernel, strides=1, depthwise=False, name=...)` -> layer."""
    if self.condconv_kernels:
      routing = CondConvRouting(self.condconv_kernels, dtype=self.dtype,
                                name="routing")(x)  # [B, R]

      def condconv(features, kernel, strides=1, depthwise=False, name=None):
        layer = CondConv(features=features,
                         kernel_size=kernel,
                         num_kernels=self.condconv_kernels,
                         strides=strides,
                         depthwise=depthwise,
                         dtype=self.dtype,
                         name=name)
        return lambda y: layer(y, routing)

      return condconv

    def conv(features, kernel, strides=1, depthwise=False, name=None):
      if depthwise:
        return DepthwiseConv(kernel, strides, dtype=self.dtype, name=name)
      return Conv(features, kernel, strides=strides, dtype=self.dtype, name=name)

    return conv

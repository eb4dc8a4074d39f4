"""Depthwise convolution, computed as a sum of shifted products on CPUs.

Axis letters: B batch, H/W height and width (H'/W' after the stride), C channels,
k spatial kernel size (docs/method.md, section 2).

XLA's CPU backend runs depthwise convolutions (`feature_group_count = C`)
far below the machine's speed, the backward pass especially. Written as k*k
shifted elementwise products, the same convolution trains several times
faster on CPUs (figures in benchmarks/README.md). Accelerators and exporters get the plain
convolution, which their libraries implement well. Parameters are those of
`nn.Conv` (`kernel` [k, k, 1, C]), so both forms share checkpoints.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from coe_jax.models.formulation import Switch

# "auto": taps on CPUs, the grouped convolution elsewhere. Exporters force
# "conv" so the exported graph holds one depthwise op.
formulation = Switch("depthwise", ("auto", "conv", "taps"), "auto")


def depthwise_taps(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
  """'SAME' depthwise convolution of x [B, H, W, C] with kernel [k, k, 1, C]."""
  b, h, w, c = x.shape
  k = kernel.shape[0]
  (top, bottom), (left, right) = jax.lax.padtype_to_pads((h, w), (k, k), (strides, strides), "SAME")
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))  # [B, H+k-1, W+k-1, C]
  out_h, out_w = -(-h // strides), -(-w // strides)
  y = jnp.zeros((b, out_h, out_w, c), x.dtype)
  for i in range(k):
    for j in range(k):
      window = jax.lax.slice(padded, (0, i, j, 0),
                             (b, i + (out_h - 1) * strides + 1, j + (out_w - 1) * strides + 1, c),
                             (1, strides, strides, 1))  # [B, H', W', C]
      y = y + window * kernel[i, j, 0]
  return y


class DepthwiseConv(nn.Module):
  """A 'SAME' depthwise k x k convolution without bias, like `nn.Conv(feature_group_count=C)`."""
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, 1, channels))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if formulation.cpu_form_in_force("taps"):
      return depthwise_taps(x, kernel, self.strides)
    return jax.lax.conv_general_dilated(x,
                                        kernel, (self.strides, self.strides),
                                        "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=channels)

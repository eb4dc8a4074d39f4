"""Dense convolutions, computed as matrix products on CPUs.

Axis letters: B batch, H/W height and width (H'/W' after the stride), C input
channels, F output channels, k spatial kernel size (docs/method.md, section 2).

XLA's CPU backend runs convolutions, and their weight gradients above all,
slower than its matrix products (`benchmarks/train_step.py` times a whole
step both ways). So on CPUs a 1x1 convolution is [B H W, C] x [C, F], and a
k x k one (stems, Fused-MBConv blocks) gathers its k*k shifted windows first
([B, H', W', k k C], im2col): k*k times the input's memory, a price the
backward pass repays. Accelerators and exporters
get the plain convolution, which their libraries implement well. Parameters
are those of `nn.Conv` (`kernel` [k, k, C, F], same initialiser), so both
forms share checkpoints and initialise alike.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from coe_jax.models.formulation import Switch

# "auto": matrix products on CPUs, the convolution elsewhere. Exporters force
# "conv" so the exported graph holds CONV_2D ops.
formulation = Switch("conv", ("auto", "conv", "matmul"), "auto")


def conv_as_matmul(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
  """'SAME' convolution of x [B, H, W, C] with kernel [k, k, C, F], as one matrix product."""
  b, h, w, c = x.shape
  k, features = kernel.shape[0], kernel.shape[-1]
  if k == 1:
    return _matmul_2d(x[:, ::strides, ::strides], kernel[0, 0])  # [B, H', W', F]
  (top, bottom), (left, right) = jax.lax.padtype_to_pads((h, w), (k, k), (strides, strides), "SAME")
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))  # [B, H+k-1, W+k-1, C]
  out_h, out_w = -(-h // strides), -(-w // strides)
  windows = [
      jax.lax.slice(padded, (0, i, j, 0),
                    (b, i + (out_h - 1) * strides + 1, j + (out_w - 1) * strides + 1, c),
                    (1, strides, strides, 1)) for i in range(k) for j in range(k)
  ]  # k*k x [B, H', W', C]
  patches = jnp.concatenate(windows, axis=-1)  # [B, H', W', k k C], in the kernel's (i, j, c) order
  return _matmul_2d(patches, kernel.reshape(k * k * c, features))  # [B, H', W', F]


def _matmul_2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [B, H, W, C] @ kernel [C, F] as one [B H W, C] x [C, F] product.

  Flattened first: XLA's CPU backend computes the kernel's gradient, a
  product contracting B, H and W, several times faster over one contracting
  dimension than over three (figures in benchmarks/README.md).
  """
  b, h, w, c = x.shape
  return (x.reshape(b * h * w, c) @ kernel).reshape(b, h, w, kernel.shape[-1])


class Conv(nn.Module):
  """A 'SAME' k x k convolution without bias, like `nn.Conv(features, (k, k), use_bias=False)`."""
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if formulation.cpu_form_in_force("matmul"):
      return conv_as_matmul(x, kernel, self.strides)
    return jax.lax.conv_general_dilated(x,
                                        kernel, (self.strides, self.strides),
                                        "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

"""CondConv (Yang et al., NeurIPS 2019): convolutions with per-example kernels.

Each example b is convolved with its own kernel `kernel(x_b) = sum_r alpha_br kernel_r`,
a mixture of R learned kernels. The routing `alpha = sigmoid(router(GlobalAvgPool(x)))`
is computed once per block (`CondConvRouting`) and shared by that block's
convolutions (`CondConv`), so the routing is an argument of the convolution.

Axis letters: B batch, H/W input height/width, H'/W' output height/width,
C input channels, F output channels, R CondConv kernels, k spatial kernel size
(docs/method.md, section 2).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from coe_jax.errors import require


class CondConvRouting(nn.Module):
  """Routing weights `alpha = sigmoid(router(GlobalAvgPool(x)))` in (0, 1).

  `router` is a dense layer with a bias, as in common CondConv implementations.

  Attributes:
    num_kernels: R, the number of kernels each CondConv mixes.
    dtype: the computation dtype (parameters stay float32); None: the input's.
  """
  num_kernels: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps x [B, H, W, C] to alpha [B, R]."""
    require(x.ndim == 4, "CondConvRouting input shape", x.shape, "must be [B, H, W, C]")
    pooled = jnp.mean(x, axis=(1, 2))  # [B, C]
    return nn.sigmoid(nn.Dense(self.num_kernels, dtype=self.dtype, name="router")(pooled))  # [B, R]


class CondConv(nn.Module):
  """A 2-D convolution, 'SAME' padding, whose kernel is mixed per example.

  Formulation "per_tap", chosen with `benchmarks/condconv_formulations.py` on
  CPU: mix the kernels per example, then sum the k*k kernel taps, each a strided
  slice of the padded input contracted with that tap's per-example weights (a
  batched matmul over C for a regular conv, an elementwise product for a
  depthwise one). It won for both kinds of convolution, so there is one code
  path. Images/s, batch 64, R=4, 2 shared CPU cores (noisy), forward /
  forward+backward, per_tap vs the best of the three convolution-based
  formulations (batch folded into feature groups, vmap of per-example convs,
  all R kernels stacked on the output axis and their outputs mixed):
    1x1 14x14 112->672    2095 / 640   vs   431 / 37
    1x1 7x7 960->160      1383 / 451   vs  1492 / 199
    dw 3x3 14x14 672      1146 / 288   vs   263 / -
    dw 5x5 7x7 960        3053 / 288   vs   540 / -
  With R=8 per_tap is fastest in every cell. For depthwise training the
  convolution-based formulations are unusable on XLA:CPU: the batch-folded ones
  need O((B*C)^2) memory for the kernel gradient (133 GB at batch 64), the
  stacked one takes 17 s per step at batch 4. The taps are plain slices,
  products and batched matmuls, which every backend runs well.

  Attributes:
    features: F, output channels; must equal C when `depthwise`.
    kernel_size: k, the spatial size of the square kernel.
    num_kernels: R, the number of mixed kernels.
    strides: spatial stride, the same on both axes.
    depthwise: one filter per input channel (feature_group_count = C).
    use_bias: add a bias, mixed by the routing like the kernel.
    dtype: the computation dtype (parameters stay float32); None: promote the
      input's and the parameters' dtypes, like flax layers.
  """
  features: int
  kernel_size: int
  num_kernels: int
  strides: int = 1
  depthwise: bool = False
  use_bias: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, routing: jax.Array) -> jax.Array:
    """Convolves x [B, H, W, C] with kernels mixed by routing [B, R].

    Returns:
      [B, H', W', F] with H' = ceil(H / strides), W' = ceil(W / strides).
    """
    require(x.ndim == 4, "CondConv input shape", x.shape, "must be [B, H, W, C]")
    batch, height, width, channels = x.shape
    require(routing.shape == (batch, self.num_kernels), "CondConv routing shape", routing.shape,
            f"must be [B, num_kernels] = {(batch, self.num_kernels)}")
    if self.depthwise:
      require(self.features == channels, "CondConv.features", self.features,
              f"must equal the input channels ({channels}) for a depthwise conv")
    k, s = self.kernel_size, self.strides
    # batch_axis keeps R out of the fan-in, so each kernel_r is initialised like
    # nn.Conv's kernel.
    kernel = self.param("kernel", nn.initializers.lecun_normal(batch_axis=0),
                        (self.num_kernels, k, k, 1 if self.depthwise else channels,
                         self.features))  # [R, k, k, C/groups, F]
    bias = (self.param("bias", nn.initializers.zeros_init(),
                       (self.num_kernels, self.features)) if self.use_bias else None)  # [R, F]
    x, kernel, routing, bias = promote_dtype(x, kernel, routing, bias, dtype=self.dtype)

    mixed = jnp.einsum("be,eklio->bklio", routing, kernel)  # [B, k, k, C/groups, F]
    (top, bottom), (left, right) = jax.lax.padtype_to_pads((height, width), (k, k), (s, s), "SAME")
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_height, out_width = -(-height // s), -(-width // s)
    # The k*k taps are unrolled at trace time; tap (i, j) of output (h, w)
    # reads padded input (h*s + i, w*s + j), i.e. a strided slice.
    y = 0
    for i in range(k):
      for j in range(k):
        tap = padded[:, i:i + (out_height - 1) * s + 1:s,
                     j:j + (out_width - 1) * s + 1:s]  # [B, H', W', C]
        if self.depthwise:
          y = y + tap * mixed[:, None, None, i, j, 0]  # [B, H', W', C]
        else:
          y = y + jnp.einsum("bhwc,bcf->bhwf", tap, mixed[:, i, j])  # [B, H', W', F]
    if bias is not None:
      y = y + (routing @ bias)[:, None, None, :]
    return y

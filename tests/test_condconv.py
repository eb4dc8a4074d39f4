"""Tests of CondConv and its routing against plain convolutions.

Axis letters: B batch, H/W spatial, C input channels, F output channels,
E CondConv kernels, K spatial kernel size.
Everything runs under jit: one compile per call is much faster than running
flax's many small ops eagerly.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax.errors import CoEError
from coe_jax.models.condconv import CondConv, CondConvRouting

BATCH, SIZE, CHANNELS, FEATURES, KERNELS = 3, 7, 6, 5, 4

# (depthwise, kernel_size, strides): regular 1x1 and 3x3, depthwise 3x3 and
# 5x5; strides 2 on an odd map has asymmetric 'SAME' padding.
CASES = [(False, 1, 1), (False, 1, 2), (False, 3, 2), (True, 3, 1), (True, 3, 2), (True, 5, 2)]


def _layer(depthwise: bool, kernel_size: int, strides: int, use_bias: bool = False):
  features = CHANNELS if depthwise else FEATURES
  return CondConv(features, kernel_size, KERNELS, strides, depthwise=depthwise, use_bias=use_bias)


def _inputs(seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(keys[0], (BATCH, SIZE, SIZE, CHANNELS))  # [B, H, W, C]
  alpha = jax.random.uniform(keys[1], (BATCH, KERNELS))  # [B, E]
  return x, alpha


def _conv(x: jax.Array, kernel: jax.Array, strides: int, depthwise: bool) -> jax.Array:
  """The plain convolution: x [B, H, W, C], kernel [K, K, C/groups, F]."""
  return jax.lax.conv_general_dilated(x,
                                      kernel, (strides, strides),
                                      "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1] if depthwise else 1,
                                      precision=jax.lax.Precision.HIGHEST)


def _setup(depthwise: bool, kernel_size: int, strides: int):
  """The layer, its params (with a random bias), x and random routing."""
  layer = _layer(depthwise, kernel_size, strides, use_bias=True)
  x, alpha = _inputs()
  params = dict(jax.jit(layer.init)(jax.random.key(1), x, alpha)["params"])
  params["bias"] = jax.random.normal(jax.random.key(2), params["bias"].shape)  # [E, F]
  return layer, params, x, alpha


def _per_kernel_outputs(params, x, strides: int, depthwise: bool) -> jax.Array:
  """W_e * x + bias_e for every kernel, by plain convolutions: [E, B, H', W', F]."""
  outputs = jnp.stack([_conv(x, w, strides, depthwise) for w in params["kernel"]])
  return outputs + params["bias"][:, None, None, None, :]


def _mixture(params, x, alpha, strides: int, depthwise: bool) -> jax.Array:
  """sum_e alpha_be (W_e * x_b + bias_e): [B, H', W', F]."""
  return jnp.einsum("ebhwf,be->bhwf",
                    _per_kernel_outputs(params, x, strides, depthwise),
                    alpha,
                    precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("depthwise,kernel_size,strides", CASES)
def test_layer_matches_plain_convolutions(depthwise, kernel_size, strides):
  layer, params, x, alpha = _setup(depthwise, kernel_size, strides)
  assert params["kernel"].shape == (KERNELS, kernel_size, kernel_size, 1 if depthwise else CHANNELS,
                                    layer.features)
  apply = jax.jit(lambda params, x, alpha: layer.apply({"params": params}, x, alpha))
  outputs = jax.jit(_per_kernel_outputs, static_argnums=(2, 3))(params, x, strides,
                                                                depthwise)  # [E, B, H', W', F]
  out = -(-SIZE // strides)
  assert outputs.shape[1:] == (BATCH, out, out, layer.features)

  # One-hot routing: each example is convolved with exactly its chosen kernel.
  chosen = jnp.asarray([2, 0, 3])  # [B]
  y = apply(params, x, jax.nn.one_hot(chosen, KERNELS))
  np.testing.assert_allclose(y, outputs[chosen, jnp.arange(BATCH)], rtol=1e-5, atol=1e-5)

  # Random routing: the mixture of the kernels' convolutions, by linearity.
  expected = jnp.einsum("ebhwf,be->bhwf", outputs, alpha, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(apply(params, x, alpha), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depthwise,kernel_size,strides", [(False, 3, 2), (True, 5, 2)])
def test_gradients_match_the_mixture(depthwise, kernel_size, strides):
  layer, params, x, alpha = _setup(depthwise, kernel_size, strides)
  apply = lambda params, x, alpha: layer.apply({"params": params}, x, alpha)
  mixture = lambda params, x, alpha: _mixture(params, x, alpha, strides, depthwise)
  loss = lambda f: lambda *args: jnp.sum(jnp.sin(f(*args)))
  grads = jax.jit(jax.grad(loss(apply), argnums=(0, 1, 2)))(params, x, alpha)
  expected = jax.jit(jax.grad(loss(mixture), argnums=(0, 1, 2)))(params, x, alpha)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads, expected)


def test_one_hot_routing_matches_flax_conv():
  depthwise, kernel_size, strides = True, 3, 2
  layer = _layer(depthwise, kernel_size, strides)
  x, _ = _inputs()
  variables = jax.jit(layer.init)(jax.random.key(1), x, jnp.ones((BATCH, KERNELS)))
  conv = nn.Conv(layer.features, (kernel_size, kernel_size),
                 strides=strides,
                 padding="SAME",
                 use_bias=False,
                 feature_group_count=CHANNELS)
  params = {"params": {"kernel": variables["params"]["kernel"][1]}}
  routing = jax.nn.one_hot(jnp.full((BATCH,), 1), KERNELS)
  np.testing.assert_allclose(jax.jit(layer.apply)(variables, x, routing),
                             jax.jit(conv.apply)(params, x),
                             rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("depthwise", [False, True])
def test_each_kernel_is_initialised_like_a_plain_conv(depthwise):
  channels, kernel_size = 64, 3
  features = channels if depthwise else 32
  x = jnp.zeros((1, 4, 4, channels))
  layer = CondConv(features, kernel_size, KERNELS, depthwise=depthwise)
  kernels = jax.jit(layer.init)(jax.random.key(0), x, jnp.ones((1, KERNELS)))["params"]["kernel"]
  conv = nn.Conv(features, (kernel_size, kernel_size),
                 feature_group_count=channels if depthwise else 1)
  plain = jax.jit(conv.init)(jax.random.key(0), x)["params"]["kernel"]
  assert kernels.shape[1:] == plain.shape
  # lecun_normal: std 1/sqrt(fan_in), fan_in = K*K*C/groups and not E times that.
  np.testing.assert_allclose(np.std(kernels, axis=(1, 2, 3, 4)), np.std(plain), rtol=0.15)
  assert not np.allclose(kernels[0], kernels[1])  # drawn independently


def test_routing_shape_range_and_formula():
  x, _ = _inputs()
  routing = CondConvRouting(KERNELS)
  variables = jax.jit(routing.init)(jax.random.key(0), x)
  alpha = jax.jit(routing.apply)(variables, 10.0 * x)
  assert alpha.shape == (BATCH, KERNELS)
  assert np.all((alpha > 0) & (alpha < 1))
  dense = variables["params"]["router"]
  expected = jax.nn.sigmoid(jnp.mean(10.0 * x, axis=(1, 2)) @ dense["kernel"] + dense["bias"])
  np.testing.assert_allclose(alpha, expected, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_reported():
  x, alpha = _inputs()
  with pytest.raises(CoEError, match="features"):
    CondConv(CHANNELS + 1, 3, KERNELS, depthwise=True).init(jax.random.key(0), x, alpha)
  with pytest.raises(CoEError, match="routing"):
    CondConv(FEATURES, 1, KERNELS + 1).init(jax.random.key(0), x, alpha)


@pytest.mark.parametrize("depthwise", [False, True])
def test_bfloat16_computes_in_bfloat16_with_float32_parameters(depthwise):
  layer, params, x, alpha = _setup(depthwise, 3, 1)
  fast = CondConv(layer.features,
                  3,
                  KERNELS,
                  1,
                  depthwise=depthwise,
                  use_bias=True,
                  dtype=jnp.bfloat16)
  y = jax.jit(fast.apply)({"params": params}, x, alpha)
  assert y.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(fast.init(jax.random.key(1), x, alpha))
         } == {jnp.dtype(jnp.float32)}
  expected = _mixture(params, x, alpha, 1, depthwise)
  scale = float(jnp.abs(expected).max())
  np.testing.assert_allclose(y.astype(jnp.float32), expected, atol=0.03 * scale)
  routing = CondConvRouting(KERNELS, dtype=jnp.bfloat16)
  assert routing.apply(routing.init(jax.random.key(0), x), x).dtype == jnp.bfloat16

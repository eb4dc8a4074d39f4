"""The CPU depthwise formulation equals XLA's grouped convolution, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax.models import depthwise


@pytest.mark.parametrize("shape,kernel,strides", [((2, 9, 9, 5), 3, 1), ((2, 9, 8, 4), 3, 2),
                                                  ((1, 7, 7, 3), 5, 2), ((2, 6, 6, 2), 5, 1),
                                                  ((2, 8, 8, 3), 3, 2), ((1, 6, 7, 2), 5, 2),
                                                  ((1, 4, 4, 2), 5, 3)])
def test_taps_equal_grouped_convolution(shape, kernel, strides):
  x = jax.random.normal(jax.random.key(0), shape)
  layer = depthwise.DepthwiseConv(kernel, strides)
  variables = layer.init(jax.random.key(1), x)
  reference = nn.Conv(shape[-1], (kernel, kernel),
                      strides=strides,
                      padding="SAME",
                      use_bias=False,
                      feature_group_count=shape[-1])
  loss = lambda apply, v, x: jnp.sum(jnp.sin(apply(v, x)))
  with depthwise.formulation("taps"):
    y = layer.apply(variables, x)
    grads = jax.grad(lambda v, x: loss(layer.apply, v, x), argnums=(0, 1))(variables, x)
  y_ref = reference.apply(variables, x)  # Same parameter tree as nn.Conv.
  grads_ref = jax.grad(lambda v, x: loss(reference.apply, v, x), argnums=(0, 1))(variables, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
  with depthwise.formulation("conv"):
    np.testing.assert_allclose(layer.apply(variables, x), y_ref, rtol=1e-5, atol=1e-5)


def test_unknown_formulation_is_refused():
  with pytest.raises(ValueError, match="'fft'"):
    with depthwise.formulation("fft"):
      pass

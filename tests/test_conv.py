"""The CPU formulation of dense convolutions (matrix products) equals XLA's convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax.models import conv


@pytest.mark.parametrize("shape,features,kernel,strides", [((2, 8, 8, 5), 7, 1, 1),
                                                           ((2, 9, 9, 3), 4, 3, 1),
                                                           ((2, 9, 8, 3), 6, 3, 2),
                                                           ((1, 8, 8, 2), 3, 3, 2),
                                                           ((1, 7, 7, 2), 3, 5, 2)])
def test_matmul_equals_convolution(shape, features, kernel, strides):
  x = jax.random.normal(jax.random.key(0), shape)
  layer = conv.Conv(features, kernel, strides)
  reference = nn.Conv(features, (kernel, kernel), strides=strides, padding="SAME", use_bias=False)
  variables = layer.init(jax.random.key(1), x)
  # The same parameters from the same key: checkpoints and initialisation carry over.
  reference_variables = reference.init(jax.random.key(1), x)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(reference_variables)):
    np.testing.assert_array_equal(a, b)
  loss = lambda apply, v, x: jnp.sum(jnp.sin(apply(v, x)))
  with conv.formulation("matmul"):
    y = layer.apply(variables, x)
    grads = jax.grad(lambda v, x: loss(layer.apply, v, x), argnums=(0, 1))(variables, x)
  y_ref = reference.apply(variables, x)
  grads_ref = jax.grad(lambda v, x: loss(reference.apply, v, x), argnums=(0, 1))(variables, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
  with conv.formulation("conv"):
    np.testing.assert_allclose(layer.apply(variables, x), y_ref, rtol=1e-5, atol=1e-5)

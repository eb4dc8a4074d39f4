"""A formulation switch holds its choice inside the block only, and refuses unknown choices;
hard-swish's two formulations compute the same function."""

import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax.models.formulation import Switch
from coe_jax.models.mbconv import hard_swish, hard_swish_formulation


def test_choice_holds_inside_the_block_and_is_restored_after_it_even_on_error():
  switch = Switch("op", ("a", "b", "c"), "a")
  with switch("b"):
    assert switch.current == "b"
    with switch("c"):
      assert switch.current == "c"
    assert switch.current == "b"
  assert switch.current == "a"
  with pytest.raises(RuntimeError):
    with switch("c"):
      raise RuntimeError("inside")
  assert switch.current == "a"


def test_unknown_choice_is_refused_naming_it_and_the_op():
  switch = Switch("op", ("a", "b"), "a")
  with pytest.raises(ValueError, match=r"op formulation 'z': expected one of \('a', 'b'\)"):
    with switch("z"):
      pass
  assert switch.current == "a"


def test_hard_swish_products_equal_the_fused_form():
  x = jnp.linspace(-5, 5, 101)  # Both kinks (-3, 3) and either side of them.
  fused = hard_swish(x)
  with hard_swish_formulation("products"):
    products = hard_swish(x)
  np.testing.assert_allclose(products, fused, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(fused, x * np.clip(x + 3, 0, 6) / 6, rtol=1e-6, atol=1e-6)

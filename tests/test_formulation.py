"""A formulation switch holds its choice inside the block only, and refuses unknown choices."""

import pytest

from coe_jax.models.formulation import Switch


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

"""The early-exit rule and its cost, the one owner every router and runtime applies."""

import ast
import os

import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax import answers
from tests.tiny import REPO


@pytest.mark.parametrize("array", [np.asarray, jnp.asarray])
def test_exits_where_the_confidence_reaches_tau(array):
  confidence = array([0.2, 0.5, 0.9, 1.0])
  np.testing.assert_array_equal(answers.exits(confidence, 0.5), [False, True, True, True])
  np.testing.assert_array_equal(answers.exits(confidence, 0.0), [True] * 4)  # Every sample.
  np.testing.assert_array_equal(answers.exits(confidence, 1.0), [False, False, False, True])
  np.testing.assert_array_equal(answers.exits(confidence, 1.5), [False] * 4)  # None exits.
  np.testing.assert_array_equal(answers.exits(confidence, float("inf")), [False] * 4)
  assert answers.exits(0.7, 0.7) is True


@pytest.mark.parametrize("array", [np.asarray, jnp.asarray])
def test_mean_flops_pays_an_expert_for_every_sample_that_does_not_exit(array):
  assert answers.mean_flops(10.0, 100.0, 0.0) == 110.0
  assert answers.mean_flops(10.0, 100.0, 1.0) == 10.0
  np.testing.assert_allclose(answers.mean_flops(10.0, 100.0, array([0.0, 0.25, 1.0])),
                             [110.0, 85.0, 10.0])


def test_answers_imports_nothing():
  """The LiteRT runtime shares it and must not import JAX."""
  with open(os.path.join(REPO, "coe_jax", "answers.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]

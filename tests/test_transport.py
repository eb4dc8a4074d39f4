"""Balanced transportation: balance, optimality against an exact solver, jit/vmap."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from coe_jax.objective.transport import balanced_assignment

SOLVER = dict(epsilon=0.05, max_iterations=200, threshold=1e-3)
# Sinkhorn stopped after one iteration: the rounding and polish alone must still
# reach the optimum.
STARVED = dict(epsilon=5.0, max_iterations=1, threshold=1e-3)
# One jitted solver for the single-problem tests, so they share compilations.
solve = jax.jit(functools.partial(balanced_assignment, **SOLVER))
solve_starved = jax.jit(functools.partial(balanced_assignment, **STARVED))


def exact_optimum(scores: np.ndarray) -> float:
  """The best total score over all partitions with loads floor or ceil of B/N.

  Each choice of the B mod N experts that take ceil(B/N) samples is an
  assignment problem on the replicated matrix (expert j's column repeated by
  its capacity), which `linear_sum_assignment` solves exactly.
  """
  batch, experts = scores.shape
  floor_load, extra = divmod(batch, experts)
  best = -np.inf
  for ceil_experts in itertools.combinations(range(experts), extra):
    columns = [j for j in range(experts) for _ in range(floor_load + (j in ceil_experts))]
    replicated = scores[:, columns]
    rows, cols = linear_sum_assignment(replicated, maximize=True)
    best = max(best, replicated[rows, cols].sum())
  return best


def random_log_probs(key: jax.Array, shape: tuple[int, int], scale: float) -> jax.Array:
  # Per-expert offsets make some experts popular, so balance actually binds.
  k1, k2 = jax.random.split(key)
  popularity = jax.random.normal(k2, (1, shape[-1]))  # [1, N]
  logits = scale * (jax.random.normal(k1, shape) + 2 * popularity)  # [B, N]
  return jax.nn.log_softmax(logits, axis=-1)


def assert_balanced(assignment: np.ndarray, experts: int) -> None:
  batch = assignment.shape[0]
  loads = np.bincount(assignment, minlength=experts)
  assert loads.sum() == batch
  assert set(loads.tolist()) <= {batch // experts, -(-batch // experts)}, loads


@pytest.mark.parametrize("batch,experts,solver", [(37, 4, "default"), (256, 4, "default"),
                                                  (50, 8, "default"), (3, 4, "default"),
                                                  (50, 8, "starved")])
def test_balanced_and_optimal(batch, experts, solver):
  """Loads differ by at most one; total within 1% of the exact optimum.

  The gap is measured against the improvement an optimal partition makes over
  a uniformly random one, `(opt - ours) / (opt - sum_i mean_j s_ij)`. Unlike a
  ratio to |opt|, this does not depend on adding a constant to a sample's row
  (which leaves the problem unchanged), and it cannot be met by any
  assignment that ignores the scores.
  """
  run = solve if solver == "default" else solve_starved
  for seed, scale in enumerate((0.3, 1.0, 3.0)):
    scores = random_log_probs(jax.random.key(seed), (batch, experts), scale)
    assignment, info = run(scores)
    scores, assignment = np.asarray(scores, np.float64), np.asarray(assignment)
    assert_balanced(assignment, experts)
    np.testing.assert_array_equal(info["loads"], np.bincount(assignment, minlength=experts))
    ours = scores[np.arange(batch), assignment].sum()
    optimum = exact_optimum(scores)
    baseline = scores.mean(axis=1).sum()
    assert optimum - ours <= 0.01 * (optimum - baseline), (optimum, ours, baseline)


def test_vmap_matches_single_problems():
  scores = jnp.stack([random_log_probs(jax.random.key(s), (37, 4), 1.0) for s in range(3)])
  assignments, info = jax.jit(jax.vmap(functools.partial(balanced_assignment, **SOLVER)))(scores)
  assert info["sinkhorn_iterations"].shape == (3,)
  for s, a in zip(scores, assignments):
    np.testing.assert_array_equal(a, solve(s)[0])


def test_one_popular_expert_is_still_balanced():
  # Everyone prefers expert 0, some samples much more than others.
  scores = jnp.zeros((37, 4)).at[:, 0].set(jnp.linspace(1.0, 5.0, 37))
  assignment, info = solve(scores)
  assert_balanced(np.asarray(assignment), 4)
  np.testing.assert_array_equal(info["loads"], [10, 9, 9, 9])  # the spare slot is worth most at 0
  np.testing.assert_array_equal(assignment[-10:], np.zeros(10))  # the keenest samples get it


def test_follows_scores_when_balance_allows():
  preferred = jnp.arange(37) % 4
  assignment, _ = solve(jax.nn.log_softmax(4.0 * jax.nn.one_hot(preferred, 4)))
  np.testing.assert_array_equal(assignment, preferred)


def test_info_is_arrays():
  assignment, info = solve(random_log_probs(jax.random.key(0), (37, 4), 1.0))
  assert assignment.dtype == jnp.int32 and assignment.shape == (37,)
  assert info["sinkhorn_iterations"].dtype == jnp.int32
  assert info["sinkhorn_converged"].dtype == jnp.bool_
  assert 0 < int(info["sinkhorn_iterations"]) <= SOLVER["max_iterations"]
  assert info["loads"].shape == (4,)


def test_gradient_is_stopped():
  scores = random_log_probs(jax.random.key(1), (37, 4), 1.0)

  def picked_total(s):
    return jnp.sum(jax.nn.one_hot(solve(s)[0], 4) * s)

  grad = jax.grad(picked_total)(scores)
  # Only the explicit use of the scores carries gradient, not the solver.
  np.testing.assert_array_equal(grad, jax.nn.one_hot(solve(scores)[0], 4))


def test_single_expert_and_non_finite_scores():
  assignment, _ = balanced_assignment(jnp.ones((5, 1)), **SOLVER)
  np.testing.assert_array_equal(assignment, np.zeros(5))
  scores = jnp.zeros((37, 4)).at[0, 0].set(jnp.nan).at[1, 2].set(-jnp.inf)
  assert_balanced(np.asarray(solve(scores)[0]), 4)

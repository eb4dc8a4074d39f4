"""WGM weights, LGM targets and VCM sample weights on constructed inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax import config_base
from coe_jax.errors import CoEError
from coe_jax.objective import lgm, vcm, wgm

SOLVER = dict(epsilon=0.05, max_iterations=200, threshold=1e-3)
B, N, K = 16, 4, 5

# Jitted once per module so tests share compilations (eager calls recompile
# the solver's loops every time).
expert_loss_weights = jax.jit(
    lambda g, alpha: wgm.expert_loss_weights(g, off_portion_weight=alpha, **SOLVER))
selection_targets = jax.jit(functools.partial(lgm.selection_targets, **SOLVER),
                            static_argnames="rule")
sample_weights = jax.jit(vcm.selection_sample_weights, static_argnames="enabled")


def expert_logits_favouring(best: jax.Array, labels: jax.Array) -> jax.Array:
  """[N, B, K] logits where expert best[i] is surest of the true class on sample i.

  Every expert puts some mass on the true class, the best expert most, and
  the margins differ across experts so that every rule has a unique answer.
  """
  confidence = 1.0 + jnp.arange(N)[:, None] * 0.1  # [N, 1]
  confidence = confidence + 3.0 * (jnp.arange(N)[:, None] == best[None, :])  # [N, B]
  return confidence[..., None] * jax.nn.one_hot(labels, K)[None]  # [N, B, K]


def test_wgm_weights_follow_a_balanced_portion():
  preferred = jnp.arange(B) % N
  selection_logits = 3.0 * jax.nn.one_hot(preferred, N)  # [B, N]
  weights, assignment, info = expert_loss_weights(selection_logits, 0.2)
  np.testing.assert_array_equal(assignment, preferred)
  np.testing.assert_allclose(weights, np.where(jax.nn.one_hot(preferred, N), 1.0, 0.2))
  np.testing.assert_array_equal(info["loads"], [B // N] * N)


def test_wgm_balances_a_lopsided_delegator():
  selection_logits = jnp.zeros((B, N)).at[:, 0].set(jnp.linspace(0.0, 1.0, B))
  weights, assignment, _ = expert_loss_weights(selection_logits, 0.0)
  np.testing.assert_array_equal(np.bincount(assignment, minlength=N), [B // N] * N)
  np.testing.assert_array_equal(jnp.sum(weights, axis=1), np.ones(B))  # one portion each
  np.testing.assert_array_equal(assignment[-B // N:], np.zeros(B // N))  # keenest on 0 get 0


def test_wgm_weights_carry_no_gradient():
  selection_logits = jax.random.normal(jax.random.key(0), (B, N))
  costs = jax.random.uniform(jax.random.key(1), (B, N))

  def weighted_cost(g):
    weights, _, _ = expert_loss_weights(g, 0.3)
    return jnp.sum(weights * costs)

  np.testing.assert_array_equal(jax.grad(weighted_cost)(selection_logits), np.zeros((B, N)))


@pytest.mark.parametrize("rule", config_base.LGM_RULES)
def test_lgm_picks_the_best_expert(rule):
  best = jnp.arange(B) % N  # balanced, so the balanced rule agrees with argmax
  labels = jnp.arange(B) % K
  targets, _ = selection_targets(expert_logits_favouring(best, labels),
                                 labels,
                                 rule=rule,
                                 temperature=0.5)
  assert targets.shape == (B, N)
  np.testing.assert_allclose(jnp.sum(targets, axis=1), np.ones(B), rtol=1e-6)
  np.testing.assert_array_equal(jnp.argmax(targets, axis=1), best)
  if rule != "soft":
    np.testing.assert_array_equal(targets, jax.nn.one_hot(best, N))


def test_lgm_balanced_rule_starves_no_expert():
  labels = jnp.arange(B) % K
  expert_logits = expert_logits_favouring(jnp.zeros(B, jnp.int32), labels)  # expert 0 best
  argmax_targets, _ = selection_targets(expert_logits, labels, rule="argmax", temperature=1.0)
  balanced_targets, info = selection_targets(expert_logits,
                                             labels,
                                             rule="balanced",
                                             temperature=1.0)
  np.testing.assert_array_equal(jnp.sum(argmax_targets, axis=0), [B, 0, 0, 0])
  np.testing.assert_array_equal(jnp.sum(balanced_targets, axis=0), [B // N] * N)
  assert "sinkhorn_iterations" in info


def test_lgm_soft_rule_temperature():
  labels = jnp.arange(B) % K
  expert_logits = np.random.default_rng(2).normal(size=(N, B, K)).astype(np.float32)
  log_probs = expert_logits - np.log(np.sum(np.exp(expert_logits), axis=-1, keepdims=True))
  scores = log_probs[:, np.arange(B), labels].T  # [B, N]
  expected = np.exp(scores / 2.0) / np.sum(np.exp(scores / 2.0), axis=1, keepdims=True)
  soft = functools.partial(selection_targets, expert_logits, labels, rule="soft")
  np.testing.assert_allclose(soft(temperature=2.0)[0], expected, rtol=1e-5)
  np.testing.assert_allclose(soft(temperature=1e3)[0], np.full((B, N), 1 / N), atol=1e-3)


def test_lgm_targets_carry_no_gradient():
  # The soft rule is the one through which a gradient could flow at all.
  labels = jnp.arange(B) % K
  expert_logits = jax.random.normal(jax.random.key(3), (N, B, K))
  grad = jax.grad(lambda z: jnp.sum(
      selection_targets(z, labels, rule="soft", temperature=1.0)[0] * jnp.arange(N)))(expert_logits)
  np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_lgm_unknown_rule():
  with pytest.raises(CoEError,
                     match=r"^lgm.rule='best': expected one of argmax, balanced, "
                     r"soft \(or random: LGM off, for ablations\)$"):
    lgm.selection_targets(jnp.zeros((N, B, K)), jnp.zeros(B, jnp.int32), rule="best")


def test_vcm_zero_where_experts_agree_and_more_where_they_disagree():
  labels = np.arange(B) % K
  # Samples 0-3 agree exactly; on 4-15 the experts disagree, more on later
  # samples: expert j's true-class logit is spread_i * j.
  spread = np.where(np.arange(B) < 4, 0.0, np.arange(B) / B)  # [B]
  expert_logits = (spread[None, :, None] * np.arange(N)[:, None, None] *
                   np.eye(K)[labels][None]).astype(np.float32)  # [N, B, K]
  weights = np.asarray(sample_weights(expert_logits, labels, enabled=True))
  np.testing.assert_array_equal(weights[:4], np.zeros(4))
  assert np.all(weights[4:] > 0) and np.all(np.diff(weights[4:]) > 0)
  # v_i / mean(v), with v the variance over experts of p_j(y_i).
  p_true = np.exp(expert_logits) / np.sum(np.exp(expert_logits), axis=-1, keepdims=True)
  variance = np.var(p_true[:, np.arange(B), labels], axis=0)  # [B]
  np.testing.assert_allclose(weights, variance / variance.mean(), rtol=1e-4, atol=1e-6)


def test_vcm_all_agree_gives_zeros_not_nan_and_disabled_gives_ones():
  labels = jnp.arange(B) % K
  expert_logits = jnp.broadcast_to(jax.random.normal(jax.random.key(5), (1, B, K)), (N, B, K))
  np.testing.assert_array_equal(sample_weights(expert_logits, labels, enabled=True), np.zeros(B))
  grad = jax.jit(
      jax.grad(lambda z: jnp.sum(sample_weights(z, labels, enabled=True))))(expert_logits)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(sample_weights(expert_logits, labels, enabled=False), np.ones(B))

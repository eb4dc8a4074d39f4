"""VCM, the variance calculation module: where the choice of expert matters.

Axis letters: B batch, N experts, K classes (docs/method.md, section 2).

From the paper: VCM is named in v1 of the paper (dropped in v2); the public
text does not define it.

This project's reading of the name: `v_i = Var_j[softmax(z_j[i])[y_i]]`, the
variance over experts of their probability of the true class, measures how
much the experts disagree on sample i. The sample's weight in the selection
loss is `v_i / mean(v)`, so the delegator learns routing where the choice of
expert changes the outcome, and not where all experts are equally right or
equally wrong. `vcm.enabled=False` gives every sample weight 1.
"""

import jax
import jax.numpy as jnp


def expert_disagreement(expert_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """v_i, the variance over experts of the true-class probability.

  Computed as the mean squared difference over expert pairs, halved, which
  equals the population variance but is exactly zero when the experts agree
  exactly (the textbook form subtracts a rounded mean).

  Args:
    expert_logits: [N, B, K]. The gradient is stopped.
    labels: [B] int class labels.

  Returns:
    v: [B], non-negative.
  """
  probs = jax.nn.softmax(jax.lax.stop_gradient(expert_logits), axis=-1)  # [N, B, K]
  true_class = jnp.broadcast_to(labels[None, :, None], probs.shape[:2] + (1,))  # [N, B, 1]
  p_true = jnp.take_along_axis(probs, true_class, axis=-1)[..., 0]  # [N, B]
  pairwise = p_true[:, None, :] - p_true[None, :, :]  # [N, N, B]
  return 0.5 * jnp.mean(jnp.square(pairwise), axis=(0, 1))  # [B]


def selection_sample_weights(expert_logits: jax.Array, labels: jax.Array, *,
                             enabled: bool) -> jax.Array:
  """Per-sample weights of the selection loss, mean 1 (or all 0, or all 1).

  Args:
    expert_logits: [N, B, K]. The gradient is stopped.
    labels: [B] int class labels.
    enabled: False gives all ones (static).

  Returns:
    weights: [B]. `v / mean(v)`; all zeros when the experts agree exactly on
    every sample, since then no routing choice matters.
  """
  if not enabled:
    return jnp.ones(labels.shape, expert_logits.dtype)  # [B]
  v = expert_disagreement(expert_logits, labels)  # [B]
  mean = jnp.mean(v)  # []
  # The inner `where` keeps the untaken branch finite, so no NaN reaches
  # gradients or metrics when mean is 0.
  return jnp.where(mean > 0, v / jnp.where(mean > 0, mean, 1.0), 0.0)  # [B]

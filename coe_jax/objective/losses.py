"""The loss terms of CoE training (docs/method.md, section 4), each a scalar.

Axis letters: B batch, N experts, K classes (docs/method.md, section 2).

From the paper: experts are trained with re-weighted losses (WGM), the
delegator with an expert-selection loss whose label comes from LGM, and the
delegator's rough prediction is a classifier.

This project's reading: the expert loss is the WGM-weighted cross-entropy,
normalised per expert and summed over experts; the selection loss is
cross-entropy against LGM's target distribution, weighted per sample by VCM;
the delegator's loss is label-smoothed cross-entropy, optionally plus
distillation towards the expert the delegator selects.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import optax


def weighted_expert_loss(expert_logits: jax.Array,
                         labels: jax.Array,
                         weights: jax.Array,
                         normaliser: Optional[jax.Array] = None) -> jax.Array:
  """`L_E = sum_j sum_i w_ij CE(z_j[i], y_i) / sum_i w_ij`.

  Args:
    expert_logits: [N, B, K].
    labels: [B] int class labels.
    weights: [B, N] non-negative, e.g. from WGM. Treated as constants.
    normaliser: [N], the denominators `sum_i w_ij` when these B samples are
      part of a larger batch (a micro-batch); this batch's own when None.

  Returns:
    Scalar loss. An expert whose weights are all zero contributes 0.
  """
  weights = weights.T  # [N, B]
  normaliser = jnp.sum(weights, axis=1) if normaliser is None else normaliser  # [N]
  return buffered_expert_loss(expert_logits, jnp.broadcast_to(labels, weights.shape), weights,
                              normaliser)


def buffered_expert_loss(expert_logits: jax.Array, labels: jax.Array, weights: jax.Array,
                         normaliser: jax.Array) -> jax.Array:
  """`L_E = sum_j sum_p w_jp CE(z_jp, y_jp) / Z_j` over each expert's own buffer.

  Args:
    expert_logits: [N, P], each expert's logits on its P images: the whole
      batch, or its routed buffer (`coe_jax.objective.dispatch`).
    labels: [N, P] int class labels of those images.
    weights: [N, P] non-negative constants.
    normaliser: [N], Z_j, constant.

  Returns:
    Scalar loss. An expert whose Z_j is 0 contributes 0.
  """
  per_sample = optax.softmax_cross_entropy_with_integer_labels(expert_logits, labels)  # [N, P]
  weights = jax.lax.stop_gradient(weights)  # [N, P]
  total = jax.lax.stop_gradient(normaliser)  # [N]
  per_expert = jnp.sum(weights * per_sample, axis=1) / jnp.where(total > 0, total, 1.0)  # [N]
  return jnp.sum(per_expert)


def selection_loss(selection_logits: jax.Array, targets: jax.Array,
                   sample_weights: jax.Array) -> jax.Array:
  """`L_sel = mean_i v_i CE(g_i, t_i)`, cross-entropy against soft targets.

  Args:
    selection_logits: the delegator's selection logits g [B, N].
    targets: [B, N] probability distribution over experts, e.g. from LGM.
    sample_weights: [B], e.g. from VCM (mean 1).

  Returns:
    Scalar loss. Targets and weights are constants: this loss trains the
    delegator only.
  """
  targets = jax.lax.stop_gradient(targets)  # [B, N]
  sample_weights = jax.lax.stop_gradient(sample_weights)  # [B]
  per_sample = optax.softmax_cross_entropy(selection_logits, targets)  # [B]
  return jnp.mean(sample_weights * per_sample)


def delegator_loss(class_logits: jax.Array,
                   labels: jax.Array,
                   *,
                   label_smoothing: float,
                   distill_logits: Optional[jax.Array] = None,
                   distill_weight: float = 0.0,
                   distill_temperature: float = 1.0) -> jax.Array:
  """The delegator's rough-prediction loss, `L_D`.

  `mean_i CE(z_D[i], smooth(y_i))`, plus, when `distill_logits` is given,
  `distill_weight * temp^2 * mean_i KL(softmax(z_T[i]/temp) || softmax(z_D[i]/temp))`
  with temp = `distill_temperature` (Hinton et al.'s scaling, so the gradient
  size does not depend on temp).

  Args:
    class_logits: the delegator's class logits z_D [B, K].
    labels: [B] int class labels.
    label_smoothing: in [0, 1).
    distill_logits: teacher logits z_T [B, K], e.g. the selected expert's;
      treated as constants.
    distill_weight: weight of the distillation term.
    distill_temperature: temp > 0.

  Returns:
    Scalar loss.
  """
  classes = class_logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, classes, dtype=class_logits.dtype),
                                label_smoothing)  # [B, K]
  loss = jnp.mean(optax.softmax_cross_entropy(class_logits, targets))
  if distill_logits is not None:
    teacher = jax.lax.stop_gradient(distill_logits)  # [B, K]
    teacher = jax.nn.log_softmax(teacher / distill_temperature)  # [B, K]
    student = jax.nn.log_softmax(class_logits / distill_temperature)  # [B, K]
    kl = optax.losses.kl_divergence_with_log_targets(student, teacher)  # [B]
    loss = loss + distill_weight * distill_temperature**2 * jnp.mean(kl)
  return loss

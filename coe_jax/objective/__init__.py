"""The CoE training objective of each stage, and its schedule.

Its parts, one module each: `transport` (the balanced transportation problem),
`wgm`, `lgm` and `vcm` (the paper's three modules) and `losses` (the terms).

Axis letters: B batch, M micro-batches (`train.microbatches`), N experts, K classes
(docs/method.md, section 2).

From the paper: experts are trained on WGM-re-weighted losses over portions
given by a balanced transportation of the delegator's selection; the
delegator learns expert selection from LGM's labels and makes a rough
prediction; VCM is named (v1) but not defined.

This project's reading (docs/method.md, section 4): `L = L_E + lambda_sel * L_sel +
lambda_D * L_D` (`total_loss`), in stages run in order (`warmup`, `coadapt`,
`delegator`), each a fraction of `train.num_steps`. What each stage trains is
owned by `coe_jax.stages.Stage`; the functions here read its fields.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections

from coe_jax import stages
from coe_jax.objective import lgm, losses, vcm, wgm
from coe_jax.stages import Stage


def _solver_kwargs(config: ml_collections.ConfigDict,
                   replicate: Callable[[jax.Array], jax.Array]) -> dict[str, Any]:
  return dict(epsilon=config.wgm.sinkhorn_epsilon,
              max_iterations=config.wgm.sinkhorn_max_iterations,
              threshold=config.wgm.sinkhorn_threshold,
              replicate=replicate)


class ExpertTargets(NamedTuple):
  """What the experts' loss needs of the whole batch, fixed before any gradient.

  weights: [B, N], expert j's weight on sample i (WGM's in `coadapt`, 1 in `warmup`).
  normaliser: [N], each expert's total weight over the whole batch, so that
    the loss of a micro-batch is its exact share of the whole batch's.
  """
  weights: jax.Array
  normaliser: jax.Array


class DelegatorTargets(NamedTuple):
  """What the delegator's losses need of the whole batch, fixed before any gradient.

  selection: [B, N], LGM's target distribution over experts.
  sample_weights: [B], VCM's weights of the selection loss.
  teacher: [B, K] the selected expert's logits to distil from, or None.
  """
  selection: jax.Array
  sample_weights: jax.Array
  teacher: Optional[jax.Array]


def expert_targets(
    stage: Stage,
    config: ml_collections.ConfigDict,
    *,
    batch: int,
    num_experts: int,
    selection_logits: Optional[jax.Array] = None,
    replicate: Callable[[jax.Array], jax.Array] = lambda x: x
) -> tuple[Optional[ExpertTargets], dict[str, jax.Array]]:
  """The experts' loss weights of a stage (`stage.expert_weights`): None when frozen.

  WGM solves the balanced transport of `selection_logits` [B, N]; the other
  weightings do not read them. The info holds WGM's `portion` [B] and solver
  figures.
  """
  if stage.expert_weights == stages.FROZEN:
    return None, {}
  if stage.expert_weights in (stages.ALL_SAMPLES, stages.GENERALIST):
    weights, info = jnp.ones((batch, num_experts), jnp.float32), {}  # [B, N]
    if stage.expert_weights == stages.GENERALIST:
      weights = weights * (jnp.arange(num_experts) == 0)  # [B, N]: expert 0's column
  else:
    weights, portion, info = wgm.expert_loss_weights(
        selection_logits.astype(jnp.float32),
        off_portion_weight=config.wgm.off_portion_weight,
        groups=config.wgm.groups,
        **_solver_kwargs(config, replicate))  # [B, N], [B]
    info = {**info, "portion": portion}
  return ExpertTargets(weights, jnp.sum(weights, axis=0)), info  # [B, N], [N]


def delegator_targets(
    scoring_logits: jax.Array,
    selection_logits: jax.Array,
    labels: jax.Array,
    config: ml_collections.ConfigDict,
    rng: Optional[jax.Array] = None,
    replicate: Callable[[jax.Array], jax.Array] = lambda x: x
) -> tuple[DelegatorTargets, dict[str, jax.Array]]:
  """LGM's targets, VCM's weights and the distillation teacher of the whole batch.

  Args:
    scoring_logits: every expert on every sample, without dropout [N, B, K].
    selection_logits: the delegator's g [B, N]; its argmax picks the teacher.
    labels: [B].
    config, rng, replicate: as for `coe_objective`.

  Returns:
    The targets, and LGM's solver info (`balanced` rule only).
  """
  scoring_logits = jax.lax.stop_gradient(scoring_logits.astype(jnp.float32))  # [N, B, K]
  targets, info = lgm.selection_targets(scoring_logits,
                                        labels,
                                        rule=config.lgm.rule,
                                        temperature=config.lgm.temperature,
                                        rng=rng,
                                        **_solver_kwargs(config, replicate))  # [B, N]
  sample_weights = vcm.selection_sample_weights(scoring_logits, labels,
                                                enabled=config.vcm.enabled)  # [B]
  teacher = None
  if config.loss.distill_weight > 0:
    selected = jnp.argmax(selection_logits, axis=-1)  # [B]
    teacher = scoring_logits[selected, jnp.arange(labels.shape[0])]  # [B, K]
  return DelegatorTargets(targets, sample_weights, teacher), info


def spread_targets(targets: DelegatorTargets, scored: jax.Array, batch: int) -> DelegatorTargets:
  """The targets of the scored images [S] as targets of the whole batch [B].

  Images that were not scored (`lgm.score_fraction` < 1) get no selection
  loss (weight 0); the scored ones' weights are scaled by B / S, so that the
  selection loss, a mean over the batch, is their mean. The identity when
  every image was scored.
  """
  if scored.shape[0] == batch:
    return targets
  scale = batch / scored.shape[0]
  num_experts = targets.selection.shape[1]
  selection = jnp.zeros((batch, num_experts),
                        targets.selection.dtype).at[scored].set(targets.selection)  # [B, N]
  weights = jnp.zeros(
      (batch,), targets.sample_weights.dtype).at[scored].set(scale * targets.sample_weights)  # [B]
  return DelegatorTargets(selection, weights, None)  # No teacher: validated.


def expert_loss(expert_logits: jax.Array, labels: jax.Array, targets: ExpertTargets) -> jax.Array:
  """`L_E` of these samples: their share of the whole batch's loss.

  `expert_logits` are [N, B/M, K]: one micro-batch, or the whole batch when M = 1.
  """
  return losses.weighted_expert_loss(expert_logits.astype(jnp.float32),
                                     labels,
                                     targets.weights,
                                     normaliser=targets.normaliser)


def delegator_side_loss(class_logits: jax.Array,
                        selection_logits: jax.Array,
                        labels: jax.Array,
                        targets: Optional[DelegatorTargets],
                        config: ml_collections.ConfigDict,
                        share: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`lambda_sel L_sel + lambda_D L_D` of these samples, and the two terms.

  `share` is these samples' fraction of the whole batch (both terms are
  means over it); `targets` is None in a stage that does not train the
  selection (`Stage.trains_selection`): no selection loss, no distillation.
  """
  class_logits = class_logits.astype(jnp.float32)  # [B/M, K]
  if targets is None:
    delegator_loss = share * losses.delegator_loss(
        class_logits, labels, label_smoothing=config.loss.label_smoothing)
    zero = jnp.zeros((), jnp.float32)
    return total_loss(zero, zero, delegator_loss, config), zero, delegator_loss
  selection_loss = share * losses.selection_loss(selection_logits.astype(jnp.float32),
                                                 targets.selection, targets.sample_weights)
  delegator_loss = share * losses.delegator_loss(
      class_logits,
      labels,
      label_smoothing=config.loss.label_smoothing,
      distill_logits=targets.teacher,
      distill_weight=config.loss.distill_weight,
      distill_temperature=config.loss.distill_temperature)
  zero = jnp.zeros((), jnp.float32)
  return total_loss(zero, selection_loss, delegator_loss, config), selection_loss, delegator_loss


def total_loss(expert_loss: jax.Array, selection_loss: jax.Array, delegator_loss: jax.Array,
               config: ml_collections.ConfigDict) -> jax.Array:
  """`L = L_E + lambda_sel L_sel + lambda_D L_D`: the one place the terms are weighted."""
  return (expert_loss + config.loss.selection_weight * selection_loss +
          config.loss.delegator_weight * delegator_loss)


def batch_metrics(stage: Stage,
                  scoring_logits: Optional[jax.Array],
                  selection_logits: Optional[jax.Array],
                  class_logits: jax.Array,
                  labels: jax.Array,
                  targets: Optional[DelegatorTargets],
                  lgm_info: dict[str, jax.Array],
                  wgm_info: dict[str, jax.Array],
                  scored: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """The batch's routing and accuracy metrics (`coe_objective` lists them).

  `class_logits` [B, K], `selection_logits` [B, N], `labels` [B] and WGM's
  portion are the whole batch's; `scoring_logits` [N, S, K] and `targets`
  are those of the scored images `scored` [S] (every image when None), over
  which the experts' metrics are taken.
  """
  zero, one = jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)
  metrics = dict(load_gap=zero,
                 selection_load_gap=zero,
                 selection_agreement=zero,
                 own_portion_accuracy=zero,
                 off_portion_accuracy=zero,
                 routed_accuracy=zero,
                 sinkhorn_iterations=zero,
                 sinkhorn_converged=one,
                 lgm_sinkhorn_iterations=zero,
                 lgm_sinkhorn_converged=one,
                 delegator_accuracy=jnp.mean(jnp.argmax(class_logits, axis=-1) == labels))
  if targets is None:  # No selection trained in this stage.
    return metrics
  if scored is not None:
    labels, selection_logits = labels[scored], selection_logits[scored]  # [S], [S, N]
    wgm_info = {**wgm_info, "portion": wgm_info["portion"][scored]} if wgm_info else wgm_info
  num_experts, batch = scoring_logits.shape[:2]
  expert_correct = (jnp.argmax(scoring_logits, axis=-1) == labels[None, :])  # [N, S]
  expert_correct = expert_correct.astype(jnp.float32)  # [N, S]
  selected = jnp.argmax(selection_logits, axis=-1)  # [S]
  selection_counts = jnp.bincount(selected, length=num_experts)  # [N]
  metrics.update(selection_load_gap=jnp.max(selection_counts) - jnp.min(selection_counts),
                 selection_agreement=jnp.mean(selected == jnp.argmax(targets.selection, axis=-1)),
                 routed_accuracy=jnp.mean(expert_correct[selected, jnp.arange(batch)]))
  if lgm_info:
    metrics.update(lgm_sinkhorn_iterations=lgm_info["sinkhorn_iterations"],
                   lgm_sinkhorn_converged=lgm_info["sinkhorn_converged"])
  if stage.uses_wgm:
    own = jax.nn.one_hot(wgm_info["portion"], num_experts, dtype=jnp.float32).T  # [N, B]
    off_pairs = max(batch * (num_experts - 1), 1)
    metrics.update(load_gap=jnp.max(wgm_info["loads"]) - jnp.min(wgm_info["loads"]),
                   own_portion_accuracy=jnp.sum(own * expert_correct) / batch,
                   off_portion_accuracy=jnp.sum((1 - own) * expert_correct) / off_pairs,
                   sinkhorn_iterations=wgm_info["sinkhorn_iterations"],
                   sinkhorn_converged=wgm_info["sinkhorn_converged"])
  return metrics


def coe_objective(
    class_logits: jax.Array,
    selection_logits: jax.Array,
    expert_logits: jax.Array,
    labels: jax.Array,
    config: ml_collections.ConfigDict,
    stage: str | Stage,
    rng: Optional[jax.Array] = None,
    *,
    scoring_logits: Optional[jax.Array] = None,
    replicate: Callable[[jax.Array], jax.Array] = lambda x: x
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The total loss of one stage over one batch, and metrics.

  The terms come from `expert_targets`, `delegator_targets`, `expert_loss`
  and `delegator_side_loss`, which the micro-batched train step also calls
  one part at a time.

  Args:
    class_logits: the delegator's class logits z_D [B, K].
    selection_logits: the delegator's selection logits g [B, N].
    expert_logits: every expert on every sample, z [N, B, K].
    labels: [B] int class labels.
    config: the run's config (read at trace time; `config_base.validate` it first).
    stage: a `Stage`, or its name (`warmup`, `coadapt` or `delegator`); static.
    rng: a key for the draws of `lgm.rule='random'` (needed by that rule only).
    scoring_logits: the experts' logits [N, B, K] that LGM, VCM, distillation
      and the accuracy metrics read; `expert_logits` when None. The trainer
      passes those of the same pass without dropout, so that the selection
      targets do not hinge on each expert's own dropout mask; `L_E` always
      trains on `expert_logits`.
    replicate: how the transport problems' [B, N] scores are put on every
      device (`transport.balanced_assignment`); the identity off a mesh.

  Returns:
    The scalar loss and a dict of float32 scalars, the same keys in every
    stage so they can be logged and averaged alike; terms a stage does not
    compute are 0 (Sinkhorn convergence 1):
    - `loss`, `expert_loss`, `selection_loss`, `delegator_loss`: the total
      and its terms, unweighted.
    - `load_gap`: max - min WGM portion size, in samples (0 or 1 by design).
    - `selection_load_gap`: the same for the delegator's argmax selection.
    - `selection_agreement`: fraction of samples where argmax g is the
      argmax of the LGM target.
    - `own_portion_accuracy`, `off_portion_accuracy`: expert accuracy on
      (sample, expert) pairs inside, and outside, the expert's WGM portion.
    - `routed_accuracy`: accuracy of the expert at argmax g (CoE without
      early exit).
    - `delegator_accuracy`: accuracy of z_D.
    - `sinkhorn_iterations`, `sinkhorn_converged`: WGM's solver;
      `lgm_sinkhorn_iterations`, `lgm_sinkhorn_converged`: LGM's (`balanced`).
  """
  if isinstance(stage, str):
    stage = Stage.named(stage, config)
  num_experts, batch = expert_logits.shape[:2]
  if scoring_logits is None:
    scoring_logits = expert_logits
  # Nothing reads the scores for their gradient; in the delegator stage the
  # experts are frozen, and nothing below, distillation included, may train them.
  scoring_logits = jax.lax.stop_gradient(scoring_logits)  # [N, B, K]
  experts, wgm_info = expert_targets(stage,
                                     config,
                                     batch=batch,
                                     num_experts=num_experts,
                                     selection_logits=selection_logits,
                                     replicate=replicate)
  delegator, lgm_info = None, {}
  if stage.trains_selection:
    delegator, lgm_info = delegator_targets(scoring_logits, selection_logits, labels, config, rng,
                                            replicate)
  _, selection_loss, delegator_loss = delegator_side_loss(class_logits, selection_logits, labels,
                                                          delegator, config)
  loss_of_experts = jnp.zeros((), jnp.float32)
  if experts is not None:
    loss_of_experts = expert_loss(expert_logits, labels, experts)
  total = total_loss(loss_of_experts, selection_loss, delegator_loss, config)
  metrics = batch_metrics(stage, scoring_logits.astype(jnp.float32), selection_logits, class_logits,
                          labels, delegator, lgm_info, wgm_info)
  metrics.update(loss=total,
                 expert_loss=loss_of_experts,
                 selection_loss=selection_loss,
                 delegator_loss=delegator_loss)
  return total, {key: jnp.asarray(value, jnp.float32) for key, value in metrics.items()}

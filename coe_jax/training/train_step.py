"""The train state and the jitted train step.

Axis letters: B batch, M micro-batches (`train.microbatches`), N experts, K classes,
H/W/C image height, width and channels (docs/method.md, section 2).

One step runs the delegator and all N stacked experts on the batch, computes
the CoE objective of the current stage (`coe_jax.objective`), and applies one
optax update. A step whose loss or gradients are not finite leaves the state
unchanged and says so in its metrics (`finite` = 0), so the trainer can stop
on the last good state or skip the step.
"""

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from coe_jax import objective
from coe_jax.models.coe import CoE
from coe_jax.models.stacked import DELEGATOR, EXPERTS, under_experts
from coe_jax.parallel import expert_parallel
from coe_jax.parallel.mesh import DATA_AXIS, EXPERT_AXIS
from coe_jax.training import optim

Batch = dict[str, jax.Array]
# Arrays on every device.
REPLICATED = PartitionSpec()
# Micro-batches [M, B / M, ...], each split over every device.
MICRO_ALL = PartitionSpec(None, (DATA_AXIS, EXPERT_AXIS))
Metrics = dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Optional[Any]  # None when train.ema_decay is 0.

  def eval_variables(self) -> dict[str, Any]:
    """The variables to evaluate with: EMA parameters where trained with them."""
    params = self.ema_params if self.ema_params is not None else self.params
    return {"params": params, "batch_stats": self.batch_stats}


def create_train_state(model: CoE, optimizer: optax.GradientTransformation,
                       config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
  variables = model.init(rng)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32),
                    params=params,
                    batch_stats=variables["batch_stats"],
                    opt_state=optimizer.init(params),
                    ema_params=params if config.train.ema_decay > 0 else None)


def ema_weight(decay: float, step: jax.Array) -> jax.Array:
  """The weight of the old average at update `step` (1-based) of a debiased EMA.

  A plain EMA started from the random initialisation keeps `decay**t` of it
  after t updates (37% after 10,000 updates at decay 0.9999). The debiased
  EMA is `sum_s decay**(t-s) p_s / sum_s decay**(t-s)` over the updates so
  far, which this weight, `decay (1 - decay**(t-1)) / (1 - decay**t)`, keeps
  exactly when applied as `ema = w ema + (1 - w) params`: the first update
  copies the parameters, and w approaches `decay` as t grows.
  """
  t = step.astype(jnp.float32)
  return decay * -jnp.expm1((t - 1) * jnp.log(decay)) / -jnp.expm1(t * jnp.log(decay))


def split_micro(x: jax.Array, microbatches: int) -> jax.Array:
  """[B, ...] -> [M, B / M, ...]; micro-batch m holds samples m, m + M, m + 2M, ...

  Strided, so that each device's share of the batch holds an equal share of
  every micro-batch and no sample moves between devices.
  """
  return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)


def join_micro(x: jax.Array, batch_axis: int = 0) -> jax.Array:
  """The inverse of `split_micro` for outputs stacked over micro-batches.

  `x` is [M, ...] with each micro-batch's batch axis at `batch_axis` of the
  rest ([M, B/M, ...] or, at batch_axis 1, [M, N, B/M, ...]); the result has
  the whole batch there ([B, ...] or [N, B, ...]).
  """
  x = jnp.moveaxis(x, 0, batch_axis + 1)  # [..., B/M, M, ...]
  shape = x.shape
  return x.reshape(*shape[:batch_axis], shape[batch_axis] * shape[batch_axis + 1],
                   *shape[batch_axis + 2:])


def _hold_experts(new: Any, old: Any) -> Any:
  """`new` with every leaf under the stacked experts taken from `old`."""
  return jax.tree_util.tree_map_with_path(lambda path, n, o: o
                                          if under_experts(path) else n, new, old)


def copy_expert_zero(state: TrainState) -> TrainState:
  """`state` with every expert's slice of every tree (parameters, BatchNorm
  statistics, optimizer state, EMA) replaced by expert 0's."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.broadcast_to(x[:1], x.shape) if under_experts(path) else x, state)


def make_train_step(
    model: CoE,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    stage: str,
    mesh: Optional[Mesh] = None
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
  """The (not yet jitted) step function of one stage: (state, batch, rng) -> (state, metrics).

  In the `delegator` stage the experts are frozen: they run in inference mode,
  and neither their parameters, their BatchNorm statistics, their optimizer
  state nor their EMA change.

  Under `mesh` (`data` x `expert`), each device runs only its own experts on
  its share of the batch (`expert_parallel`); the delegator's work is split
  over all devices; the balanced transport problems are solved on the
  gathered [B, N] matrices, the same on every device, with no collectives in
  their loops. The step then trains as on one device, up to float order.
  """
  freeze_experts = stage == "delegator"

  def constrain(x: jax.Array, spec: PartitionSpec) -> jax.Array:
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  ema_decay = config.train.ema_decay
  expert_loop = config.expert_loop
  schedule = optim.learning_rate_schedule(config)

  microbatches = config.train.microbatches
  batch_norm_scope = config.train.batch_norm_scope
  replicate = lambda x: constrain(x, REPLICATED)

  def one_pass(state: TrainState, images: jax.Array, labels: jax.Array, rngs: tuple):
    """Gradients of the whole batch's objective in one forward and backward pass."""
    delegator_rng, experts_rng, selection_rng = rngs

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      (class_logits, selection_logits), delegator_stats = expert_parallel.train_delegator(
          model, variables, images, delegator_rng, mesh=mesh,
          batch_norm_scope=batch_norm_scope)  # [B, K], [B, N]
      if freeze_experts:
        expert_logits = jax.lax.stop_gradient(
            expert_parallel.run_experts(model,
                                        variables,
                                        images,
                                        shared_input=True,
                                        expert_loop=expert_loop,
                                        mesh=mesh))  # [N, B, K]
        scoring_logits, expert_stats = expert_logits, state.batch_stats[EXPERTS]
      else:
        # Scored without dropout: LGM, VCM and distillation should not hinge
        # on each expert's own dropout mask.
        expert_logits, scoring_logits, expert_stats = expert_parallel.train_experts(
            model,
            variables,
            images,
            experts_rng,
            expert_loop=expert_loop,
            mesh=mesh,
            batch_norm_scope=batch_norm_scope)  # [N, B, K], [N, B, K]
      loss, metrics = objective.coe_objective(class_logits,
                                              selection_logits,
                                              expert_logits,
                                              labels,
                                              config,
                                              stage,
                                              selection_rng,
                                              scoring_logits=scoring_logits,
                                              replicate=replicate)
      return loss, (metrics, {DELEGATOR: delegator_stats, EXPERTS: expert_stats})

    # Frozen experts get zero gradients (their logits are stop_gradient-ed).
    return jax.grad(loss_fn, has_aux=True)(state.params)

  def micro_batched(state: TrainState, images: jax.Array, labels: jax.Array, rngs: tuple):
    """The same objective's gradients, accumulated over M micro-batches.

    Every target of the objective is computed over the whole batch before any
    gradient: WGM's transport from the delegator's selection logits (one
    forward pass of the delegator, no gradient), then the experts' passes
    with gradient, whose scores give LGM's and VCM's targets, then the
    delegator's passes with gradient. The gradients separate this way
    because WGM's weights and LGM's targets are constants of the loss. Only
    BatchNorm sees the micro-batch: its statistics are each micro-batch's,
    and the running averages are updated with their mean.
    """
    delegator_rng, experts_rng, selection_rng = rngs
    batch, num_experts = labels.shape[0], model.num_experts
    images = constrain(split_micro(images, microbatches), MICRO_ALL)  # [M, B/M, H, W, C]
    whole_labels, labels = labels, split_micro(labels, microbatches)  # [B], [M, B/M]
    # The examples' positions in the whole batch draw their dropout masks, so
    # the masks are those of the one-pass step, whatever M.
    index = constrain(split_micro(jnp.arange(batch), microbatches), MICRO_ALL)  # [M, B/M]
    zeros = jax.tree.map(jnp.zeros_like, state.params)

    def delegator_pass(params, images, index):
      return expert_parallel.train_delegator(model, {
          "params": params,
          "batch_stats": state.batch_stats
      },
                                             images,
                                             delegator_rng,
                                             mesh=mesh,
                                             batch_norm_scope=batch_norm_scope,
                                             example_index=index)

    selection_logits = None  # [B, N]; read only where the selection trains.
    if objective.trains_selection(config, stage):
      selection_logits = join_micro(
          jax.lax.map(lambda xs: delegator_pass(state.params, *xs)[0][1], (images, index)))
    expert_targets, wgm_info = objective.expert_targets(stage,
                                                        config,
                                                        batch=batch,
                                                        num_experts=num_experts,
                                                        selection_logits=selection_logits,
                                                        replicate=replicate)

    if freeze_experts:
      scoring_logits = jax.lax.map(lambda x: expert_parallel.run_experts(model, {
          "params": state.params,
          "batch_stats": state.batch_stats
      },
                                                                         x,
                                                                         shared_input=True,
                                                                         expert_loop=expert_loop,
                                                                         mesh=mesh),
                                   images)  # [M, N, B/M, K]
      grads, expert_loss, expert_stats = zeros, jnp.zeros(()), state.batch_stats[EXPERTS]
    else:
      weights = split_micro(expert_targets.weights, microbatches)  # [M, B/M, N]

      def expert_step(grads, xs):
        images, labels, index, weights = xs

        def loss_fn(params):
          logits, scoring, stats = expert_parallel.train_experts(
              model, {
                  "params": params,
                  "batch_stats": state.batch_stats
              },
              images,
              experts_rng,
              expert_loop=expert_loop,
              mesh=mesh,
              batch_norm_scope=batch_norm_scope,
              example_index=index)  # [N, B/M, K] x 2
          targets = expert_targets._replace(weights=weights)
          return objective.expert_loss(logits, labels, targets), (scoring, stats)

        (loss, (scoring, stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return jax.tree.map(jnp.add, grads, g), (loss, scoring, stats)

      grads, (expert_loss, scoring_logits,
              expert_stats) = jax.lax.scan(expert_step, zeros, (images, labels, index, weights))
      expert_loss = jnp.sum(expert_loss)
      expert_stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), expert_stats)
    scoring_logits = join_micro(scoring_logits, batch_axis=1)  # [N, B, K]

    delegator_targets, lgm_info = None, {}
    if objective.trains_selection(config, stage):
      delegator_targets, lgm_info = objective.delegator_targets(scoring_logits, selection_logits,
                                                                whole_labels, config, selection_rng,
                                                                replicate)

    def delegator_step(grads, xs):
      images, labels, index, targets = xs

      def loss_fn(params):
        (class_logits, selection_logits), stats = delegator_pass(params, images, index)
        total, selection_loss, delegator_loss = objective.delegator_side_loss(class_logits,
                                                                              selection_logits,
                                                                              labels,
                                                                              targets,
                                                                              config,
                                                                              share=1 /
                                                                              microbatches)
        return total, (selection_loss, delegator_loss, class_logits, stats)

      (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      return jax.tree.map(jnp.add, grads, g), aux

    micro_targets = jax.tree.map(lambda x: split_micro(x, microbatches), delegator_targets)
    grads, (selection_loss, delegator_loss, class_logits,
            delegator_stats) = jax.lax.scan(delegator_step, grads,
                                            (images, labels, index, micro_targets))
    selection_loss, delegator_loss = jnp.sum(selection_loss), jnp.sum(delegator_loss)
    metrics = objective.batch_metrics(stage, scoring_logits.astype(jnp.float32), selection_logits,
                                      join_micro(class_logits), whole_labels, delegator_targets,
                                      lgm_info, wgm_info)
    total = (expert_loss + config.loss.selection_weight * selection_loss +
             config.loss.delegator_weight * delegator_loss)
    metrics.update(loss=total,
                   expert_loss=expert_loss,
                   selection_loss=selection_loss,
                   delegator_loss=delegator_loss)
    metrics = {key: jnp.asarray(value, jnp.float32) for key, value in metrics.items()}
    delegator_stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), delegator_stats)
    return grads, (metrics, {DELEGATOR: delegator_stats, EXPERTS: expert_stats})

  def step_fn(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(rng, state.step)
    rngs = tuple(jax.random.split(rng, 3))  # delegator, experts, selection
    images, labels = batch["image"], batch["label"]  # [B, H, W, C], [B]
    pass_fn = one_pass if microbatches == 1 else micro_batched
    grads, (metrics, batch_stats) = pass_fn(state, images, labels, rngs)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      w = ema_weight(ema_decay, state.step + 1)
      ema_params = jax.tree.map(lambda e, p: w * e + (1 - w) * p, ema_params, params)
    if freeze_experts:
      # Zero gradients still move weights (decay), momenta and averages: hold them.
      params, opt_state, ema_params = _hold_experts(
          (params, opt_state, ema_params), (state.params, state.opt_state, state.ema_params))

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new_state = TrainState(step=state.step + 1,
                           params=params,
                           batch_stats=batch_stats,
                           opt_state=opt_state,
                           ema_params=ema_params)
    # Keep the last good state when anything is not finite; the step still counts.
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                        state.replace(step=state.step + 1))
    metrics = {
        **metrics, "grad_norm": grad_norm,
        "finite": finite.astype(jnp.float32),
        "learning_rate": schedule(state.step)
    }
    return kept, metrics

  return step_fn

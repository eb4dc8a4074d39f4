"""The train state and the jitted train step.

Axis letters: B batch, M micro-batches (`train.microbatches`), N experts, K classes,
H/W/C image height, width and channels (docs/method.md, section 2).

One step runs the delegator and the stacked experts on the batch, computes
the gradients of the CoE objective of the current stage (`coe_jax.objective`;
what the stage trains is its `coe_jax.stages.Stage`) over M micro-batches,
M = 1 being the whole batch in one pass, and applies one optax update. With
`train.expert_dispatch=all` every expert trains on every image; with
`routed` each expert trains on its own buffer of WGM's portion
(`coe_jax.objective.dispatch`), the generalist warm-up runs expert 0 alone,
and every expert scores a share of the batch for LGM and VCM, forward only
(docs/method.md, section 4). A step
whose loss or gradients are not finite leaves the state unchanged and says so
in its metrics (`finite` = 0), so the trainer can stop on the last good state
or skip the step.
"""

import dataclasses
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, PartitionSpec

from coe_jax import objective, stages
from coe_jax.errors import require
from coe_jax.models.coe import CoE
from coe_jax.models.stacked import DELEGATOR, EXPERTS, under_experts
from coe_jax.objective import dispatch, losses
from coe_jax.parallel import expert_parallel
from coe_jax.parallel.mesh import DATA_AXIS, EXPERT_AXIS, constrain
from coe_jax.stages import Stage
from coe_jax.training import optim

Batch = dict[str, jax.Array]
# Arrays on every device.
REPLICATED = PartitionSpec()
# Micro-batches [M, B / M, ...], each split over every device.
MICRO_ALL = PartitionSpec(None, (DATA_AXIS, EXPERT_AXIS))
# Routed buffers' slots [M, N, P / M]: experts over the expert axis, slots over the data axis.
MICRO_SLOTS = PartitionSpec(None, EXPERT_AXIS, DATA_AXIS)
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


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What one stage's step is built from, fixed at trace time."""
  model: CoE
  config: ml_collections.ConfigDict
  stage: Stage
  mesh: Optional[Mesh]

  @property
  def microbatches(self) -> int:
    return self.config.train.microbatches

  @property
  def routed(self) -> bool:
    """Whether each expert trains on its own images only: routed dispatch, in a stage
    whose experts do not all train on every image (WGM's portions, the generalist)."""
    return (self.config.train.expert_dispatch == "routed" and
            self.stage.expert_weights in (stages.WGM, stages.GENERALIST))

  @property
  def scores_subset(self) -> bool:
    """Whether LGM and VCM score a share of the batch (`lgm.score_fraction`) with a
    forward pass of every expert, rather than read the experts' training pass."""
    return self.config.train.expert_dispatch == "routed" and self.stage.trains_selection

  def replicate(self, x: jax.Array) -> jax.Array:
    return constrain(x, self.mesh, REPLICATED)

  def delegator(self, params: Any, batch_stats: Any, images: jax.Array, index: jax.Array,
                rng: jax.Array):
    """The delegator in training mode on one micro-batch: ((z_D, g), new statistics)."""
    return expert_parallel.train_delegator(self.model, {
        "params": params,
        "batch_stats": batch_stats
    },
                                           images,
                                           rng,
                                           mesh=self.mesh,
                                           batch_norm_scope=self.config.train.batch_norm_scope,
                                           example_index=index)

  def experts(self, params: Any, batch_stats: Any, images: jax.Array, index: jax.Array,
              rng: jax.Array):
    """Every expert in training mode on one micro-batch: (z, z without dropout, statistics)."""
    return expert_parallel.train_experts(self.model, {
        "params": params,
        "batch_stats": batch_stats
    },
                                         images,
                                         rng,
                                         expert_loop=self.config.expert_loop,
                                         mesh=self.mesh,
                                         batch_norm_scope=self.config.train.batch_norm_scope,
                                         example_index=index)

  def frozen_experts(self, params: Any, batch_stats: Any, images: jax.Array) -> jax.Array:
    """Every expert in inference mode on one micro-batch: z [N, B/M, K]."""
    return expert_parallel.run_experts(self.model, {
        "params": params,
        "batch_stats": batch_stats
    },
                                       images,
                                       shared_input=True,
                                       expert_loop=self.config.expert_loop,
                                       mesh=self.mesh)


def _add(tree: Any, other: Any) -> Any:
  return jax.tree.map(jnp.add, tree, other)


def _mean_over_micro(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def expert_gradients(spec: StepSpec, state: TrainState, micro: tuple, weights: jax.Array,
                     targets: objective.ExpertTargets, rng: jax.Array):
  """`L_E`'s gradients accumulated over the micro-batches, its value, the scores
  without dropout [M, N, B/M, K] and the experts' new statistics.

  `micro` = (images, labels, index), each [M, B/M, ...]; `weights` [M, B/M, N].
  """

  def one(grads, xs):
    images, labels, index, weights = xs

    def loss_fn(params):
      logits, scoring, stats = spec.experts(params, state.batch_stats, images, index,
                                            rng)  # [N, B/M, K] x 2
      return objective.expert_loss(logits, labels,
                                   targets._replace(weights=weights)), (scoring, stats)

    (loss, (scoring, stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _add(grads, g), (loss, scoring, stats)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, (loss, scoring, stats) = jax.lax.scan(one, zeros, (*micro, weights))
  return grads, jnp.sum(loss), scoring, _mean_over_micro(stats)


def routed_expert_gradients(spec: StepSpec, state: TrainState, images: jax.Array, labels: jax.Array,
                            plan: dispatch.Dispatch, rng: jax.Array):
  """`L_E`'s gradients when each expert trains on its own buffer, accumulated over
  the micro-batches; its value and the experts' new statistics.

  `images` [B, H, W, C] and `labels` [B] are the whole batch; `plan` gives
  each expert's P slots, which split into M strided micro-batches of P / M.
  """
  m = spec.microbatches
  split = lambda x: constrain(split_micro(x.T, m).swapaxes(1, 2), spec.mesh, MICRO_SLOTS)
  slots, weights = split(plan.slots), split(plan.weights)  # [M, N, P/M] each

  def one(grads, xs):
    slots, weights = xs  # [N, P/M]

    def loss_fn(params):
      logits, stats = expert_parallel.train_routed_experts(
          spec.model, {
              "params": params,
              "batch_stats": state.batch_stats
          },
          images,
          slots,
          rng,
          expert_loop=spec.config.expert_loop,
          mesh=spec.mesh,
          batch_norm_scope=spec.config.train.batch_norm_scope)  # [N, P/M, K]
      return losses.buffered_expert_loss(logits, labels[slots], weights, plan.normaliser), stats

    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _add(grads, g), (loss, stats)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, (loss, stats) = jax.lax.scan(one, zeros, (slots, weights))
  return grads, jnp.sum(loss), _mean_over_micro(stats)


def generalist_gradients(spec: StepSpec, state: TrainState, micro: tuple, rng: jax.Array):
  """Expert 0's gradients alone (the generalist warm-up, routed): its loss is the
  mean cross-entropy over the whole batch, accumulated over the micro-batches;
  the other experts neither run nor change (their statistics are kept)."""
  share = 1 / spec.microbatches

  def one(grads, xs):
    images, labels, index = xs

    def loss_fn(params):
      logits, stats = expert_parallel.train_generalist(spec.model, {
          "params": params,
          "batch_stats": state.batch_stats
      },
                                                       images,
                                                       rng,
                                                       mesh=spec.mesh,
                                                       example_index=index)  # [1, B/M, K]
      return share * losses.buffered_expert_loss(logits, labels[None], jnp.ones_like(
          logits[..., 0]), jnp.full((1,), labels.shape[0], jnp.float32)), stats

    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _add(grads, g), (loss, stats)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, (loss, stats) = jax.lax.scan(one, zeros, micro)
  old = state.batch_stats[EXPERTS]
  stats = jax.tree.map(lambda new, old: jnp.concatenate([new, old[1:]]), _mean_over_micro(stats),
                       old)
  return grads, jnp.sum(loss), stats


def scoring_logits_of(spec: StepSpec, state: TrainState, images: jax.Array,
                      index: jax.Array) -> jax.Array:
  """Every expert's logits on `images` [S, H, W, C] (forward only, no dropout, no
  gradient), in M micro-batches: [N, S, K]. In training mode (BatchNorm on these
  images' statistics, then discarded) when the experts train, as the scores of
  the "all" step come from its training pass; frozen experts run in inference mode."""
  m = spec.microbatches
  images = constrain(split_micro(images, m), spec.mesh, MICRO_ALL)  # [M, S/M, H, W, C]
  index = constrain(split_micro(index, m), spec.mesh, MICRO_ALL)  # [M, S/M]
  if spec.stage.trains_experts:
    run = lambda xs: spec.experts(state.params, state.batch_stats, *xs, jax.random.key(0))[1]
  else:
    run = lambda xs: spec.frozen_experts(state.params, state.batch_stats, xs[0])
  logits = jax.lax.map(run, (images, index))  # [M, N, S/M, K]
  return jax.lax.stop_gradient(join_micro(logits, batch_axis=1))  # [N, S, K]


def delegator_gradients(spec: StepSpec, state: TrainState, grads: Any, micro: tuple,
                        targets: Optional[objective.DelegatorTargets], rng: jax.Array):
  """`grads` plus the gradients of `lambda_sel L_sel + lambda_D L_D` accumulated over
  the micro-batches; the two terms, z_D [M, B/M, K] and the delegator's new statistics."""
  share = 1 / spec.microbatches

  def one(grads, xs):
    images, labels, index, targets = xs

    def loss_fn(params):
      (class_logits, selection_logits), stats = spec.delegator(params, state.batch_stats, images,
                                                               index, rng)
      total, selection_loss, delegator_loss = objective.delegator_side_loss(class_logits,
                                                                            selection_logits,
                                                                            labels,
                                                                            targets,
                                                                            spec.config,
                                                                            share=share)
      return total, (selection_loss, delegator_loss, class_logits, stats)

    (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _add(grads, g), aux

  micro_targets = jax.tree.map(lambda x: split_micro(x, spec.microbatches), targets)
  grads, (selection_loss, delegator_loss, class_logits,
          stats) = jax.lax.scan(one, grads, (*micro, micro_targets))
  return grads, jnp.sum(selection_loss), jnp.sum(delegator_loss), class_logits, _mean_over_micro(
      stats)


def objective_gradients(spec: StepSpec, state: TrainState, images: jax.Array, labels: jax.Array,
                        rngs: tuple[jax.Array, jax.Array, jax.Array]):
  """The gradients of the stage's objective over the whole batch, its metrics and
  the new BatchNorm statistics, accumulated over M micro-batches (M = 1: one pass).

  Every target of the objective is computed over the whole batch before any
  gradient: WGM's transport from the delegator's selection logits (a forward
  pass of the delegator, no gradient), then the experts' passes with
  gradient, whose scores give LGM's and VCM's targets, then the delegator's
  passes with gradient. The gradients separate this way because WGM's
  weights and LGM's targets are constants of the loss. Only BatchNorm sees
  the micro-batch: its statistics are each micro-batch's, and the running
  averages are updated with their mean.
  """
  delegator_rng, experts_rng, selection_rng = rngs
  stage, config, m = spec.stage, spec.config, spec.microbatches
  batch, num_experts = labels.shape[0], spec.model.num_experts
  whole = images  # [B, H, W, C]: routed buffers gather from it
  images = constrain(split_micro(images, m), spec.mesh, MICRO_ALL)  # [M, B/M, H, W, C]
  # The examples' positions in the whole batch draw their dropout masks, so
  # the masks are those of the one-pass step, whatever M.
  positions = jnp.arange(batch)  # [B]
  index = constrain(split_micro(positions, m), spec.mesh, MICRO_ALL)  # [M, B/M]
  micro = (images, split_micro(labels, m), index)

  selection_logits = None  # [B, N]; read only where the selection trains.
  if stage.trains_selection:
    selection_logits = join_micro(
        jax.lax.map(
            lambda xs: spec.delegator(state.params, state.batch_stats, *xs, delegator_rng)[0][1],
            (images, index)))
  expert_targets, wgm_info = objective.expert_targets(stage,
                                                      config,
                                                      batch=batch,
                                                      num_experts=num_experts,
                                                      selection_logits=selection_logits,
                                                      replicate=spec.replicate)
  scoring_logits = None  # [N, S, K]: the experts' scores of the scored images
  if spec.routed and stage.uses_wgm:
    plan = dispatch.routed(wgm_info["portion"],
                           num_experts,
                           groups=config.wgm.groups,
                           off_portion_weight=config.wgm.off_portion_weight,
                           off_portion_samples=config.wgm.off_portion_samples,
                           rng=jax.random.fold_in(experts_rng, 1))
    grads, expert_loss, expert_stats = routed_expert_gradients(spec, state, whole, labels, plan,
                                                               experts_rng)
  elif spec.routed:  # The generalist alone.
    grads, expert_loss, expert_stats = generalist_gradients(spec, state, micro, experts_rng)
  elif stage.trains_experts:
    weights = split_micro(expert_targets.weights, m)  # [M, B/M, N]
    grads, expert_loss, scoring_logits, expert_stats = expert_gradients(
        spec, state, micro, weights, expert_targets, experts_rng)
    scoring_logits = join_micro(scoring_logits, batch_axis=1)  # [N, B, K]
  else:  # Frozen: zero gradients (the step then holds every expert variable).
    grads = jax.tree.map(jnp.zeros_like, state.params)
    expert_loss, expert_stats = jnp.zeros(()), state.batch_stats[EXPERTS]
  scored = positions  # [S]: the images LGM and VCM score
  if spec.scores_subset:
    scored = dispatch.scored_images(batch, config.lgm.score_fraction)
    scoring_logits = scoring_logits_of(spec, state, whole[scored], scored)
  elif scoring_logits is None and stage.trains_selection:  # Frozen experts score every image.
    scoring_logits = jax.lax.stop_gradient(
        join_micro(jax.lax.map(lambda x: spec.frozen_experts(state.params, state.batch_stats, x),
                               images),
                   batch_axis=1))  # [N, B, K]

  delegator_targets, scored_targets, lgm_info = None, None, {}
  if stage.trains_selection:
    scored_targets, lgm_info = objective.delegator_targets(scoring_logits, selection_logits[scored],
                                                           labels[scored], config, selection_rng,
                                                           spec.replicate)
    delegator_targets = objective.spread_targets(scored_targets, scored, batch)
  grads, selection_loss, delegator_loss, class_logits, delegator_stats = delegator_gradients(
      spec, state, grads, micro, delegator_targets, delegator_rng)

  metrics = objective.batch_metrics(stage,
                                    scoring_logits,
                                    selection_logits,
                                    join_micro(class_logits),
                                    labels,
                                    scored_targets,
                                    lgm_info,
                                    wgm_info,
                                    scored=scored)
  metrics.update(loss=objective.total_loss(expert_loss, selection_loss, delegator_loss, config),
                 expert_loss=expert_loss,
                 selection_loss=selection_loss,
                 delegator_loss=delegator_loss)
  metrics = {key: jnp.asarray(value, jnp.float32) for key, value in metrics.items()}
  return grads, metrics, {DELEGATOR: delegator_stats, EXPERTS: expert_stats}


def apply_gradients(spec: StepSpec, optimizer: optax.GradientTransformation, state: TrainState,
                    grads: Any, batch_stats: Any, loss: jax.Array) -> tuple[TrainState, Metrics]:
  """One optax update (and EMA) from `grads`; frozen experts keep every variable.

  A step whose loss or gradients are not finite keeps the old state (its
  step still counts) and reports `finite` = 0.
  """
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    w = ema_weight(spec.config.train.ema_decay, state.step + 1)
    ema_params = jax.tree.map(lambda e, p: w * e + (1 - w) * p, ema_params, params)
  if not spec.stage.trains_experts:
    # Zero gradients still move weights (decay), momenta and averages: hold them.
    params, opt_state, ema_params = _hold_experts((params, opt_state, ema_params),
                                                  (state.params, state.opt_state, state.ema_params))
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = TrainState(step=state.step + 1,
                         params=params,
                         batch_stats=batch_stats,
                         opt_state=opt_state,
                         ema_params=ema_params)
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                      state.replace(step=state.step + 1))
  return kept, {"grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}


def make_train_step(
    model: CoE,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    stage: str,
    mesh: Optional[Mesh] = None
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
  """The (not yet jitted) step function of one stage: (state, batch, rng) -> (state, metrics).

  Where the stage does not train the experts (`delegator`), they run in
  inference mode, and neither their parameters, their BatchNorm statistics,
  their optimizer state nor their EMA change.

  Under `mesh` (`data` x `expert`), each device runs only its own experts on
  its share of the batch (`expert_parallel`); the delegator's work is split
  over all devices; the balanced transport problems are solved on the
  gathered [B, N] matrices, the same on every device, with no collectives in
  their loops. The step then trains as on one device, up to float order.
  """
  require(
      config.wgm.groups != -1, "wgm.groups", -1,
      "one group per data shard is resolved with the mesh: pass the config through "
      "coe_jax.parallel.mesh.with_routing_groups(config, devices) first (the Trainer does)")
  spec = StepSpec(model, config, Stage.named(stage, config), mesh)
  schedule = optim.learning_rate_schedule(config)

  def step_fn(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(rng, state.step)
    rngs = tuple(jax.random.split(rng, 3))  # delegator, experts, selection
    grads, metrics, batch_stats = objective_gradients(spec, state, batch["image"], batch["label"],
                                                      rngs)  # [B, H, W, C], [B]
    state, update_metrics = apply_gradients(spec, optimizer, state, grads, batch_stats,
                                            metrics["loss"])
    return state, {**metrics, **update_metrics, "learning_rate": schedule(state.step - 1)}

  return step_fn

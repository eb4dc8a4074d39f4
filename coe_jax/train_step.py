"""The train state and the jitted train step.

Axis letters: B batch, N experts, K classes.

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

from coe_jax import objective, optim
from coe_jax.models.coe import CoE

Batch = dict[str, jax.Array]
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
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"], opt_state=optimizer.init(params),
                    ema_params=params if config.train.ema_decay > 0 else None)


def _zeros_for_experts(tree: dict[str, Any]) -> dict[str, Any]:
  return {**tree, "experts": jax.tree.map(jnp.zeros_like, tree["experts"])}


def make_train_step(model: CoE, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, stage: str
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
  """The (not yet jitted) step function of one stage: (state, batch, rng) -> (state, metrics).

  In the `delegator` stage the experts are frozen: they run in inference mode,
  and neither their parameters nor their BatchNorm statistics change.
  """
  freeze_experts = stage == "delegator"
  ema_decay = config.train.ema_decay
  expert_loop = config.routing.expert_loop
  schedule = optim.learning_rate_schedule(config)

  def step_fn(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(rng, state.step)
    delegator_rng, experts_rng, selection_rng = jax.random.split(rng, 3)
    images, labels = batch["image"], batch["label"]  # [B, H, W, Ch], [B]

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      (class_logits, selection_logits), delegator_stats = model.delegator(
          variables, images, train=True, rng=delegator_rng)  # [B, K], [B, N]
      if freeze_experts:
        expert_logits = jax.lax.stop_gradient(model.experts(
            variables, images, shared_input=True, loop=expert_loop))  # [N, B, K]
        expert_stats = state.batch_stats["experts"]
      else:
        expert_logits, expert_stats = model.experts(
            variables, images, shared_input=True, train=True, rng=experts_rng, loop=expert_loop)
      loss, metrics = objective.coe_objective(class_logits, selection_logits, expert_logits,
                                              labels, config, stage, selection_rng)
      return loss, (metrics, {"delegator": delegator_stats, "experts": expert_stats})

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    if freeze_experts:
      grads = _zeros_for_experts(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    if freeze_experts:
      updates = _zeros_for_experts(updates)  # No weight decay or momentum drift either.
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema_params, params)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state, ema_params=ema_params)
    # Keep the last good state when anything is not finite; the step still counts.
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                        state.replace(step=state.step + 1))
    metrics = {**metrics, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
               "learning_rate": schedule(state.step)}
    return kept, metrics

  return step_fn

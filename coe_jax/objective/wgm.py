"""WGM, the weight generation module: which samples each expert focuses on.

Axis letters: B batch, N experts (docs/method.md, section 2).

From the paper: WGM partitions the training data into portions, one per
expert, from the delegator's selection by solving a balanced transportation
problem, and makes each expert focus on its portion by re-weighting the
experts' losses.

This project's reading (the paper gives neither the scores nor the weights):
the transportation benefit is `log_softmax(g)`, the delegator's
log-probability of selecting each expert, with the gradient stopped; the
partition is the balanced assignment of `coe_jax.objective.transport`; expert j weighs
sample i by 1 inside its portion and by `alpha` (`wgm.off_portion_weight`)
elsewhere, so that experts still see, less strongly, the samples they are not
responsible for.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from coe_jax.objective import transport


def expert_loss_weights(selection_logits: jax.Array,
                        *,
                        off_portion_weight: float,
                        groups: int = 1,
                        replicate: Callable[[jax.Array], jax.Array] = lambda x: x,
                        **solver_kwargs: Any) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
  """Per-sample, per-expert loss weights from the delegator's selection.

  Args:
    selection_logits: the delegator's selection logits g [B, N]. No gradient
      flows from the outputs back to them.
    off_portion_weight: alpha, an expert's weight on samples outside its
      portion, in [0, 1].
    groups: G; the batch splits into G consecutive groups of Q = B / G
      samples, each partitioned on its own, so that every expert gets Q / N
      samples of every group (routed dispatch's static buffers; a mesh's data
      shard holds whole groups).
    replicate: as for `transport.balanced_assignment`.
    **solver_kwargs: `epsilon`, `max_iterations` and `threshold` of
      `transport.balanced_assignment`.

  Returns:
    weights: [B, N], 1 where sample i is in expert j's portion, else alpha.
    assignment: [B] int32, the expert whose portion holds each sample.
    info: the solver's info over all groups (the most Sinkhorn iterations,
      whether every group converged, the loads summed over the groups).
  """
  batch, num_experts = selection_logits.shape
  log_selection = jax.nn.log_softmax(jax.lax.stop_gradient(selection_logits), axis=-1)  # [B, N]
  log_selection = replicate(log_selection).reshape(groups, batch // groups, num_experts)
  solve = lambda scores: transport.balanced_assignment(scores, **solver_kwargs)
  assignment, info = jax.vmap(solve)(log_selection)  # [G, Q], info leaves [G, ...]
  assignment = assignment.reshape(batch)  # [B]
  info = dict(sinkhorn_iterations=jnp.max(info["sinkhorn_iterations"]),
              sinkhorn_converged=jnp.all(info["sinkhorn_converged"]),
              improving_cycles=jnp.sum(info["improving_cycles"]),
              loads=jnp.sum(info["loads"], axis=0))  # [N]
  own = jax.nn.one_hot(assignment, num_experts, dtype=jnp.bool_)  # [B, N]
  weights = jnp.where(own, 1.0, off_portion_weight).astype(log_selection.dtype)  # [B, N]
  return weights, assignment, info

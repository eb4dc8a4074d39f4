"""Balanced transportation: split a batch into equal portions, one per expert.

Axis letters: B batch, N experts; N+1 counts the experts and the slack node of
`_move_graph` (docs/method.md, section 2).

From the paper: WGM partitions the training data into portions "by solving a
balanced transportation problem" over the delegator's selection. The paper does
not say how the problem is solved or how a fractional plan becomes a partition.

This project's reading: solve the entropic relaxation

  max_pi  sum_ij pi_ij s_ij   s.t.  pi 1_N = 1_B,  pi^T 1_B = (B/N) 1_N,  pi >= 0

with ott-jax's Sinkhorn (cost `-s`), round the soft plan greedily to a hard
partition whose loads are floor(B/N) or ceil(B/N), then polish that partition
to the exact optimum of the integer problem by cancelling improving cycles.
The same routine serves LGM's `balanced` rule, with the experts' scores in
place of the delegator's.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

# Sinkhorn checks its marginal error (and may stop) every this many iterations.
_INNER_ITERATIONS = 10


def _sinkhorn_plan(scores: jax.Array, *, epsilon: float, max_iterations: int,
                   threshold: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Entropic soft plan of the balanced problem.

  Returns:
    Dual-adjusted scores [B, N] (epsilon times the log of the plan, up to a
    per-row constant) and Sinkhorn's iteration count and convergence.
  """
  batch, experts = scores.shape
  # Subtracting each row's maximum leaves the problem unchanged (every row
  # sends the same mass) and keeps the costs non-negative and small.
  cost = jnp.max(scores, axis=1, keepdims=True) - scores  # [B, N]
  geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
  problem = linear_problem.LinearProblem(geom,
                                         a=jnp.full((batch,), 1.0 / batch, scores.dtype),
                                         b=jnp.full((experts,), 1.0 / experts, scores.dtype))
  solver = sinkhorn.Sinkhorn(
      threshold=threshold,
      max_iterations=max_iterations,
      inner_iterations=min(_INNER_ITERATIONS, max_iterations),
      # Inputs are gradient-stopped, so no differentiation rule is needed.
      implicit_diff=None)
  out = solver(problem)
  info = dict(
      sinkhorn_iterations=jnp.asarray(out.n_iters, jnp.int32),
      sinkhorn_converged=jnp.asarray(out.converged, jnp.bool_),
  )
  # log pi_ij = (f_i + g_j - cost_ij) / epsilon; f_i is constant within a row
  # and so irrelevant to which expert a sample prefers.
  adjusted = out.g[None, :] - cost  # [B, N]
  return adjusted, info


def _round_balanced(adjusted: jax.Array) -> jax.Array:
  """Rounds dual-adjusted scores to a partition with loads floor or ceil of B/N.

  The B mod N spare slots go to the experts that are most often a first
  choice, which fixes every expert's capacity. Then, in rounds, every
  unplaced sample proposes to its favourite expert that still has room, and
  each expert accepts as many proposers as it has room for, those with most
  at stake first (largest margin over their best alternative with room).
  A round either places every proposer or fills an expert, so N rounds place
  every sample; a round is a sort over the batch, with no per-sample loop.

  Args:
    adjusted: dual-adjusted scores [B, N] (the log of the soft plan up to a
      per-row constant and a factor epsilon).

  Returns:
    The expert of each sample [B] int32.
  """
  batch, experts = adjusted.shape
  floor_load, spare = divmod(batch, experts)
  # Preference ranks (N-1 = first choice) decide proposals as integers, so
  # -inf or NaN scores cannot send a sample to a full expert.
  ranks = jnp.argsort(jnp.argsort(adjusted, axis=1), axis=1)  # [B, N]
  demand = jnp.bincount(jnp.argmax(ranks, axis=1), length=experts)  # [N]
  by_demand = jnp.argsort(-demand)  # [N]
  capacity = floor_load + (jnp.argsort(by_demand) < spare)  # [N]

  def propose(_, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    assignment, room = state  # [B] (-1 = unplaced), [N]
    has_room = room > 0  # [N]
    choice = jnp.argmax(jnp.where(has_room, ranks, -1), axis=1)  # [B]
    # A placed sample proposes to the dummy expert N, which has no room.
    choice = jnp.where(assignment < 0, choice, experts)  # [B]
    open_scores = jnp.where(has_room, adjusted, -jnp.inf)  # [B, N]
    top2 = jax.lax.top_k(open_scores, 2)[0]  # [B, 2]
    stake = top2[:, 0] - top2[:, 1]  # [B]
    order = jnp.lexsort((-stake, choice))  # [B] by expert, then stake descending
    counts = jnp.bincount(choice, length=experts + 1)  # [N+1]
    first = jnp.cumsum(counts) - counts  # [N+1] where each expert's proposers start
    sorted_choice = choice[order]  # [B]
    place_in_queue = jnp.arange(batch) - first[sorted_choice]  # [B]
    room_of = jnp.append(room, 0)  # [N+1]
    accepted = jnp.zeros((batch,), jnp.bool_).at[order].set(place_in_queue
                                                            < room_of[sorted_choice])  # [B]
    assignment = jnp.where(accepted, choice, assignment)  # [B]
    taken = jnp.bincount(jnp.where(accepted, choice, experts), length=experts + 1)  # [N+1]
    return assignment, room - taken[:experts]

  start = (jnp.full((batch,), -1, jnp.int32), capacity.astype(jnp.int32))
  assignment, _ = jax.lax.fori_loop(0, experts, propose, start)  # [B]
  return assignment


def _move_graph(scores: jax.Array, assignment: jax.Array,
                floor_load: int) -> tuple[jax.Array, jax.Array]:
  """The improvement graph of a balanced partition.

  Nodes are the N experts plus one slack node (index N). Edge u -> v
  between experts moves u's best-suited sample to v and gains
  `max_{i in u} scores[i, v] - scores[i, u]`. Edges u -> slack (u at floor) and
  slack -> v (v at ceil), gain 0, let a path from a ceil expert to a floor expert
  close into a cycle: it hands the spare slot over. Applying a cycle keeps
  every load at floor or ceil.

  Returns:
    Gains [N+1, N+1] (-inf where there is no edge) and, for expert pairs, the
    sample each edge moves [N, N].
  """
  experts = scores.shape[1]
  own = jnp.take_along_axis(scores, assignment[:, None], axis=1)  # [B, 1]
  member = jax.nn.one_hot(assignment, experts, dtype=jnp.bool_)  # [B, N]
  gain = jnp.where(member[:, :, None], (scores - own)[:, None, :], -jnp.inf)  # [B, N, N]
  mover = jnp.argmax(gain, axis=0)  # [N, N]
  expert_gain = jnp.max(gain, axis=0)  # [N, N]
  expert_gain = jnp.where(jnp.eye(experts, dtype=jnp.bool_), -jnp.inf, expert_gain)  # [N, N]
  loads = jnp.sum(member, axis=0)  # [N]
  to_slack = jnp.where(loads == floor_load, 0.0, -jnp.inf)  # [N]
  from_slack = jnp.where(loads > floor_load, 0.0, -jnp.inf)  # [N]
  gains = jnp.block([[expert_gain, to_slack[:, None]],
                     [from_slack[None, :], jnp.full((1, 1), -jnp.inf)]])  # [N+1, N+1]
  return gains.astype(scores.dtype), mover


def _improving_cycle(gains: jax.Array, tolerance: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Finds a cycle of positive total gain with Bellman-Ford, if there is one.

  Longest-path relaxation from a virtual source joined to every node; a node
  still improving after N+1 rounds lies downstream of a positive cycle,
  and walking its predecessors N+1 times lands on that cycle.

  Returns:
    The cycle's edges [N+1, N+1] bool, and whether it is a closed cycle with gain
    above `tolerance` ([] bool).
  """
  nodes = gains.shape[0]

  # Loops rather than Python unrolling keep the program small: unrolled, the
  # vmapped while loop around this took minutes to compile at N=8.

  def relax(_, state: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
    best, pred, _ = state
    candidate = best[:, None] + gains  # [N+1, N+1] (from, to)
    improved = jnp.max(candidate, axis=0) > best + tolerance  # [N+1]
    return (jnp.where(improved, jnp.max(candidate, axis=0),
                      best), jnp.where(improved, jnp.argmax(candidate, axis=0), pred), improved)

  start = (jnp.zeros((nodes,), gains.dtype), jnp.arange(nodes), jnp.zeros((nodes,), jnp.bool_))
  _, pred, improved = jax.lax.fori_loop(0, nodes, relax, start)  # [N+1] each
  node = jax.lax.fori_loop(0, nodes, lambda _, n: pred[n], jnp.argmax(improved))  # []

  def trace(_, state: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
    head, edges, closed = state
    tail = pred[head]
    edge = (jnp.arange(nodes)[:, None] == tail) & (jnp.arange(nodes)[None, :] == head)  # [N+1, N+1]
    return tail, edges | (edge & ~closed), closed | (tail == node)

  start = (node, jnp.zeros((nodes, nodes), jnp.bool_), jnp.zeros((), jnp.bool_))
  _, edges, closed = jax.lax.fori_loop(0, nodes, trace, start)  # [N+1, N+1]
  total = jnp.sum(jnp.where(edges, gains, 0.0))  # []
  return edges, jnp.any(improved) & closed & (total > tolerance)


def _polish(scores: jax.Array, assignment: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cancels positive cycles until none is left: the exact optimum.

  A balanced partition is optimal exactly when its improvement graph (see
  `_move_graph`) has no positive cycle, the min-cost-flow optimality
  condition with the N experts as the only transshipment nodes. Each cycle
  moves at most N samples and raises the objective by more than a tolerance
  (1e-5 of the score range), so the result is optimal up to cycles worth
  less than that. Starting from the Sinkhorn rounding, few cycles remain;
  the loop is capped at B cycles.

  Returns:
    The improved assignment [B] and the number of cycles cancelled [].
  """
  batch, experts = scores.shape
  floor_load = batch // experts
  span = jnp.max(scores) - jnp.min(scores)  # []
  # Gains below float resolution of the score range are rounding noise; they
  # would otherwise let the loop cycle between equal-valued partitions.
  tolerance = 1e-5 * jnp.where(jnp.isfinite(span), span, 0.0) + 1e-30  # []

  State = tuple[jax.Array, jax.Array, jax.Array]  # assignment [B], cycles [], found []

  def step(state: State) -> State:
    assignment, count, _ = state
    gains, mover = _move_graph(scores, assignment, floor_load)
    edges, found = _improving_cycle(gains, tolerance)
    moves = edges[:experts, :experts] & found  # [N, N]
    # Out-of-range indices are dropped: only the cycle's own samples move.
    destination = jnp.broadcast_to(jnp.arange(experts, dtype=jnp.int32), moves.shape)  # [N, N]
    moved = jnp.where(moves, mover, batch)  # [N, N]
    assignment = assignment.at[moved].set(destination, mode="drop")  # [B]
    return assignment, count + found.astype(jnp.int32), found

  def keep_going(state: State) -> jax.Array:
    _, count, found = state
    return found & (count < batch)

  assignment, count, _ = jax.lax.while_loop(keep_going, step, (assignment, jnp.zeros(
      (), jnp.int32), jnp.ones((), jnp.bool_)))
  return assignment, count


def balanced_assignment(
    scores: jax.Array,
    *,
    epsilon: float,
    max_iterations: int,
    threshold: float,
    replicate: Callable[[jax.Array], jax.Array] = lambda x: x) -> tuple[jax.Array, dict[str, Any]]:
  """Assigns each sample one expert, maximising total score with balanced loads.

  Maximises `sum_i scores[i, assignment[i]]` subject to every expert's load
  being floor(B/N) or ceil(B/N); B need not be divisible by N, and which
  experts take the ceil(B/N) loads is part of the optimisation.

  Three steps, all jittable with static shapes and vmappable:
  1. Entropic Sinkhorn (ott-jax) on cost `-scores` with uniform marginals 1/B
     over samples and 1/N over experts. Its expert dual potential `g_j` acts
     as a price that balances demand: `scores + g` is, up to a per-row
     constant and a factor epsilon, the log of the soft plan.
  2. Rounding of `scores + g` (`_round_balanced`): N rounds in which
     unplaced samples propose to their favourite expert with room and
     experts accept the proposers with most at stake. Balance holds by
     construction, even when Sinkhorn stopped early. The rounds are sorts
     over the batch rather than a per-sample scan, so the sequential depth
     is O(N), not O(B), which matters on accelerators at large batches (on
     CPU a per-sample scan is a little faster; both take a negligible share
     of the step, benchmarks/README.md).
  3. Polishing (`_polish`): cancel positive-gain cycles of sample moves
     between experts until none is left: the optimum, up to a tolerance of
     1e-5 of the score range per cycle. After
     steps 1-2 only a handful remain (typically 0-4 at B=256, N=4); the loop
     is capped at B cycles, and the result stays balanced if the cap is hit.

  Args:
    scores: [B, N] benefit of giving sample i to expert j, e.g. log-probabilities.
      The gradient is stopped.
    epsilon: entropic regularisation, absolute, in units of the scores.
      Smaller is closer to the exact problem but needs more iterations.
    max_iterations: Sinkhorn iteration limit.
    threshold: Sinkhorn stops when the L1 error of the plan's expert marginal
      (total mass 1) falls below this.
    replicate: puts the [B, N] scores on every device first (the trainer
      passes a sharding constraint): then each device solves the whole small
      problem alone, with no collectives inside the solver's loops.

  Returns:
    assignment: [B] int32 expert of each sample.
    info: `sinkhorn_iterations` (int32 []), `sinkhorn_converged` (bool []),
      `improving_cycles` (int32 [], cycles the polish cancelled) and `loads`
      (int32 [N], samples per expert).
  """
  # The partition is a discrete target; no gradient flows through it. Low
  # precision scores would blur the polish's improvement test.
  dtype = jnp.promote_types(scores.dtype, jnp.float32)
  scores = replicate(jax.lax.stop_gradient(scores).astype(dtype))  # [B, N]
  batch, experts = scores.shape
  if experts == 1:
    assignment = jnp.zeros((batch,), jnp.int32)  # [B]
    info = dict(sinkhorn_iterations=jnp.zeros((), jnp.int32),
                sinkhorn_converged=jnp.ones((), jnp.bool_),
                improving_cycles=jnp.zeros((), jnp.int32))
  else:
    adjusted, info = _sinkhorn_plan(scores,
                                    epsilon=epsilon,
                                    max_iterations=max_iterations,
                                    threshold=threshold)
    assignment, info["improving_cycles"] = _polish(scores, _round_balanced(adjusted))  # [B]
  info["loads"] = jnp.bincount(assignment, length=experts).astype(jnp.int32)  # [N]
  return assignment, info

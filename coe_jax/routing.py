"""CoE inference: early exit, expert routing, dispatch and combine.

Axis letters (docs/method.md, section 2):
  B   batch: the caller's images.
  G   groups: the batch is cut into G equal groups (one per device's share of
      the batch) and every group is routed on its own.
  Q   samples per group; B is padded up to G * Q and the padding masked, as are
      the rows the caller marks invalid (`valid`: its own padding).
  N   experts.
  P   capacity: slots in each expert's buffer, per group.
  K   classes.
  H, W, C  image height, width and channels.

Per sample, the answer is (docs/method.md, section 3): the delegator's class
logits when their max softmax reaches the threshold tau (an early exit), else
the logits of the expert with the largest selection logit. Batched, with
static shapes, per group:

  1. The delegator runs on every sample: exit mask and ranked preferences.
  2. `assign` gives each sample that did not exit an (expert, slot) pair in
     its group's buffers. In serving mode a sample whose expert is full falls
     back to its next-best expert with room, else to the delegator's answer.
     The least confident samples are served first: the delegator's answer,
     their last resort, is the least likely to be right for them.
  3. `dispatch` gathers the images into the buffers by index.
  4. The buffers [G, N, P, ...] are transposed to [N, G * P, ...], so the
     expert axis can be sharded on the mesh's `expert` axis, and all experts
     run at once (vmapped or unrolled over N). Under a mesh, each device runs
     its own experts on its own buffers (`expert_parallel.run_experts`).
  5. `combine` gathers each sample's logits back into batch order. Empty slots
     are never read, and BatchNorm runs in inference mode, so each slot is
     computed on its own. Padding takes no slot either, so it cannot change a
     real sample's answer: a full buffer would push real samples to their
     next-best expert or to the delegator.

Capacity P per group: Q in `exact` mode (no sample can overflow), and
ceil(capacity_factor * Q * (1 - expected_exit_rate) / N) in `serving` mode.

The entry point is `route_and_predict`, jitted. Sweeping tau needs no router:
evaluation records every expert's answer once (`coe_jax.evaluation`).
"""

import dataclasses
import functools
import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec

from coe_jax import config_base
from coe_jax.answers import NO_EXPERT, exits
from coe_jax.errors import require
from coe_jax.models.coe import CoE
from coe_jax.models.stacked import Variables
from coe_jax.parallel import expert_parallel
from coe_jax.parallel import mesh as mesh_lib
from coe_jax.parallel.mesh import DATA_AXIS, EXPERT_AXIS


def confidence(class_logits: jax.Array) -> jax.Array:
  """The delegator's max class probability: [..., K] -> [...]."""
  return jnp.max(jax.nn.softmax(class_logits, axis=-1), axis=-1)


def exit_mask(class_logits: jax.Array, threshold: jax.Array | float) -> jax.Array:
  """True where the delegator answers alone, by `coe_jax.answers.exits`: [..., K] -> [...]."""
  return exits(confidence(class_logits), threshold)


def expert_preferences(selection_logits: jax.Array) -> jax.Array:
  """Experts ranked best first: [..., N] -> int32 [..., N].

  Ties go to the lower expert index, as in `jnp.argmax`, so the first column
  is `expert_choice`.
  """
  return jnp.argsort(-selection_logits, axis=-1, stable=True).astype(jnp.int32)


def expert_choice(selection_logits: jax.Array) -> jax.Array:
  """The selected expert: [..., N] -> int32 [...]."""
  return jnp.argmax(selection_logits, axis=-1).astype(jnp.int32)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
  """How the router places the samples that do not exit; checked once, when built.

  Frozen and hashable: `route_and_predict` takes it whole as one static
  argument, and equal specs share a compilation. `from_config` builds it from
  `config.routing`; a bad value fails there, in one line naming its key
  (the rules are `config_base`'s).
  """
  mode: str = "exact"  # exact (P = Q) | serving (P from capacity_factor)
  capacity_factor: float = 1.25  # serving mode's slack over a balanced load
  expected_exit_rate: float = 0.0  # serving mode's planned early-exit rate rho
  expert_loop: str = "vmap"  # how each device runs its experts (`CoE.run_stacked`)

  def __post_init__(self) -> None:
    config_base.check_value("routing.mode", self.mode)
    config_base.check_value("routing.capacity_factor", self.capacity_factor)
    require(
        _is_number(self.expected_exit_rate) and 0 <= self.expected_exit_rate <= 1,
        "expected_exit_rate", self.expected_exit_rate, "expected a rate in [0, 1]")
    config_base.check_value("expert_loop", self.expert_loop)

  @classmethod
  def from_config(cls,
                  config: ml_collections.ConfigDict,
                  expected_exit_rate: float = 0.0) -> "RoutingSpec":
    """The spec of `config.routing` and `config.expert_loop`; `expected_exit_rate` is the
    hold-out's at the calibrated tau (`results.json`), 0 before calibration."""
    routing = config.routing
    return cls(mode=routing.mode,
               capacity_factor=routing.capacity_factor,
               expected_exit_rate=expected_exit_rate,
               expert_loop=config.expert_loop)

  def capacity(self, group_size: int, num_experts: int) -> int:
    """Slots per expert buffer and group (P), between 1 and the group size Q."""
    if self.mode == "exact":
      return group_size
    slots = self.capacity_factor * group_size * (1 - self.expected_exit_rate) / num_experts
    # The small tolerance keeps float noise (e.g. 2.0000000000000004) from adding a
    # slot. At least one slot, even where every sample is expected to exit.
    return min(group_size, max(1, math.ceil(slots - 1e-9)))


def assign(preferences: jax.Array, active: jax.Array, capacity: int,
           priority: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Places one group's active samples into expert buffers of `capacity` slots.

  Samples are served best choice first: every sample's first choice is
  granted in order of priority (highest first, ties in sample order) while
  its buffer has room; the samples left over then try their second choice, and
  so on. A sample no expert can take keeps `NO_EXPERT` (the delegator answers
  it).

  Args:
    preferences: int [Q, N], each sample's experts ranked best first.
    active: bool [Q], the samples an expert should answer (not exited, not padding).
    capacity: P, the slots in each expert's buffer.
    priority: float [Q], who is served first.

  Returns:
    expert: int32 [Q], the buffer each sample went to, or `NO_EXPERT`.
    slot: int32 [Q], its slot in that buffer (0 where `expert` is `NO_EXPERT`).
  """
  order = jnp.argsort(-priority, stable=True)  # [Q], the serving order
  expert, slot = _assign_in_order(preferences[order], active[order], capacity)  # [Q], [Q]
  # Back from serving order to sample order.
  return (jnp.zeros_like(expert).at[order].set(expert), jnp.zeros_like(slot).at[order].set(slot))


def _assign_in_order(preferences: jax.Array, active: jax.Array,
                     capacity: int) -> tuple[jax.Array, jax.Array]:
  """`assign` with the samples served in their order: [Q, N], [Q] -> [Q], [Q]."""
  num_samples, num_experts = preferences.shape
  # With a slot for every sample in every buffer, first choices always fit.
  num_rounds = 1 if capacity >= num_samples else num_experts
  expert = jnp.full((num_samples,), NO_EXPERT, jnp.int32)  # [Q]
  slot = jnp.zeros((num_samples,), jnp.int32)  # [Q]
  load = jnp.zeros((num_experts,), jnp.int32)  # [N] slots already taken
  for rank in range(num_rounds):
    waiting = active & (expert == NO_EXPERT)  # [Q]
    candidate = preferences[:, rank]  # [Q]
    requests = jax.nn.one_hot(candidate, num_experts, dtype=jnp.int32) * waiting[:, None]  # [Q, N]
    # The slot each request would get: after the slots taken in earlier rounds,
    # in serving order among this round's requests for the same expert.
    position = jnp.sum((jnp.cumsum(requests, axis=0) - 1 + load) * requests, axis=1)  # [Q]
    granted = waiting & (position < capacity)  # [Q]
    expert = jnp.where(granted, candidate, expert)  # [Q]
    slot = jnp.where(granted, position, slot)  # [Q]
    load = jnp.minimum(load + jnp.sum(requests, axis=0), capacity)  # [N]
  return expert, slot


def dispatch(images: jax.Array, expert: jax.Array, slot: jax.Array, num_experts: int,
             capacity: int) -> jax.Array:
  """Gathers one group's samples into per-expert buffers: [Q, ...] -> [N, P, ...].

  Empty slots hold zeros.
  """
  num_samples = images.shape[0]
  num_slots = num_experts * capacity
  # Each sample's flat slot; samples no expert runs point past the end and are dropped.
  target = jnp.where(expert == NO_EXPERT, num_slots, expert * capacity + slot)  # [Q]
  # The sample in each slot; an empty slot points past the end and reads the fill value.
  source = jnp.full((num_slots,),
                    num_samples, jnp.int32).at[target].set(jnp.arange(num_samples, dtype=jnp.int32),
                                                           mode="drop")  # [N * P]
  buffers = jnp.take(images, source, axis=0, mode="fill", fill_value=0)  # [N * P, H, W, C]
  return buffers.reshape(num_experts, capacity, *images.shape[1:])  # [N, P, H, W, C]


def combine(expert_logits: jax.Array, fallback_logits: jax.Array, expert: jax.Array,
            slot: jax.Array) -> jax.Array:
  """Each sample's answer in sample order: its expert's slot, else the fallback.

  Args:
    expert_logits: [N, P, K], the experts' outputs on their buffers.
    fallback_logits: [Q, K], the delegator's class logits.
    expert: int [Q], from `assign`.
    slot: int [Q], from `assign`.

  Returns:
    [Q, K]. Only slots that hold a sample are read.
  """
  num_experts, capacity, num_classes = expert_logits.shape
  flat = expert_logits.reshape(num_experts * capacity, num_classes)  # [N * P, K]
  answered = expert != NO_EXPERT  # [Q]
  index = jnp.where(answered, expert * capacity + slot, 0)  # [Q]
  return jnp.where(answered[:, None], jnp.take(flat, index, axis=0), fallback_logits)  # [Q, K]


def _check_mesh(mesh: Mesh, num_experts: int, num_groups: int) -> None:
  """The mesh must split the experts and the groups evenly."""
  for axis in (DATA_AXIS, EXPERT_AXIS):
    require(axis in mesh.axis_names, "mesh.axis_names", mesh.axis_names,
            f"expected a {axis!r} axis")
  require(num_experts % mesh.shape[EXPERT_AXIS] == 0, "num_experts", num_experts,
          f"expected a multiple of the mesh's expert axis ({mesh.shape[EXPERT_AXIS]})")
  require(num_groups % mesh.shape[DATA_AXIS] == 0, "num_groups", num_groups,
          f"expected a multiple of the mesh's data axis ({mesh.shape[DATA_AXIS]})")


def _route(model: CoE, variables: Variables, images: jax.Array, threshold: jax.Array,
           valid: Optional[jax.Array], *, spec: RoutingSpec, num_groups: int,
           mesh: Optional[Mesh]) -> dict[str, Any]:
  """The traced body of `route_and_predict`."""
  require(
      isinstance(num_groups, int) and num_groups >= 1, "num_groups", num_groups,
      "expected a positive integer")
  require(images.ndim == 4, "images.shape", images.shape, "expected [B, H, W, C]")
  num_images, num_experts = images.shape[0], model.num_experts
  valid = jnp.ones(num_images, bool) if valid is None else jnp.asarray(valid).astype(bool)
  require(valid.shape == (num_images,), "valid.shape", valid.shape,
          f"expected ({num_images},), one flag per image")
  if mesh is not None:
    _check_mesh(mesh, num_experts, num_groups)
  group_size = -(-num_images // num_groups)  # Q
  slots = spec.capacity(group_size, num_experts)  # P
  padded = num_groups * group_size
  images = jnp.pad(images, [(0, padded - num_images)] + [(0, 0)] * 3)  # [G * Q, H, W, C]
  images = mesh_lib.constrain(images, mesh, PartitionSpec(DATA_AXIS))
  to_groups = lambda x: x.reshape(num_groups, group_size, *x.shape[1:])
  valid = to_groups(jnp.pad(valid, (0, padded - num_images)))  # [G, Q], False on all padding

  class_logits, selection_logits = model.delegator(variables, images)  # [G * Q, K], [G * Q, N]
  class_logits, selection_logits = to_groups(class_logits), to_groups(selection_logits)
  early_exit = exit_mask(class_logits, threshold) & valid  # [G, Q]
  preferences = expert_preferences(selection_logits)  # [G, Q, N]
  # In exact mode everyone fits and the order does not matter.
  expert, slot = jax.vmap(assign,
                          in_axes=(0, 0, None, 0))(preferences, valid & ~early_exit, slots,
                                                   -confidence(class_logits))  # [G, Q], [G, Q]

  group_dispatch = functools.partial(dispatch, num_experts=num_experts, capacity=slots)
  buffers = jax.vmap(group_dispatch)(to_groups(images), expert, slot)  # [G, N, P, H, W, C]
  buffers = buffers.swapaxes(0, 1).reshape(num_experts, num_groups * slots,
                                           *images.shape[1:])  # [N, G * P, H, W, C]
  expert_logits = expert_parallel.run_experts(model,
                                              variables,
                                              buffers,
                                              shared_input=False,
                                              expert_loop=spec.expert_loop,
                                              mesh=mesh)  # [N, G * P, K]
  expert_logits = expert_logits.reshape(num_experts, num_groups, slots, -1)  # [N, G, P, K]
  expert_logits = mesh_lib.constrain(expert_logits.swapaxes(0, 1), mesh,
                                     PartitionSpec(DATA_AXIS))  # [G, N, P, K]
  logits = jax.vmap(combine)(expert_logits, class_logits, expert, slot)  # [G, Q, K]

  answered = expert != NO_EXPERT  # [G, Q]
  from_batch = lambda x: x.reshape(padded, *x.shape[2:])[:num_images]  # [G, Q, ...] -> [B, ...]
  metrics = dict(
      exit_rate=jnp.sum(early_exit) / jnp.maximum(jnp.sum(valid), 1),
      expert_load=jnp.sum(jax.nn.one_hot(expert, num_experts, dtype=jnp.int32), axis=(0, 1)),
      overflow_to_expert=jnp.sum(answered & (expert != preferences[..., 0])),
      overflow_to_delegator=jnp.sum(valid & ~early_exit & ~answered),
  )
  return dict(logits=from_batch(logits),
              early_exit=from_batch(early_exit),
              expert=from_batch(expert),
              class_logits=from_batch(class_logits),
              selection_logits=from_batch(selection_logits),
              metrics=metrics)


@functools.partial(jax.jit, static_argnames=("model", "spec", "num_groups", "mesh"))
def route_and_predict(model: CoE,
                      variables: Variables,
                      images: jax.Array,
                      threshold: jax.Array | float,
                      *,
                      valid: Optional[jax.Array] = None,
                      spec: RoutingSpec = RoutingSpec(),
                      num_groups: int = 1,
                      mesh: Optional[Mesh] = None) -> dict[str, Any]:
  """CoE's answer on a batch, routed with static shapes; jitted.

  `threshold` is traced, so sweeping it reuses one compilation; any real value
  works (above 1: no early exit). Everything after it is static.

  Args:
    model: the CoE.
    variables: its variables (under a mesh, the experts' leaves may be
      sharded on `EXPERT_AXIS`).
    images: [B, H, W, C], values 0-255 (under a mesh, sharded on `DATA_AXIS`).
    threshold: tau, a scalar.
    valid: bool [B], False on rows that are only padding (an evaluation
      batch's tail); None: every row is an image. Invalid rows take no slot,
      count in no metric and get the delegator's logits with `early_exit`
      False and `expert` -1, so their content cannot change another row's
      answer.
    spec: the routing settings (mode, capacity, how the experts run).
    num_groups: G; each group routes its own samples. Under a mesh, a multiple
      of the `DATA_AXIS` size, so each device routes its own share.
    mesh: when given (with `DATA_AXIS` and `EXPERT_AXIS` axes), the groups are
      routed on their `DATA_AXIS` devices, the buffers are split over
      `EXPERT_AXIS` x `DATA_AXIS` (XLA moves the samples between devices), and
      each device runs its own experts on its own buffers.

  Returns:
    logits: [B, K], the answers.
    early_exit: bool [B].
    expert: int32 [B], the expert that answered; -1 where the delegator did
      (an early exit, or in serving mode an overflow with no expert free).
    class_logits, selection_logits: the delegator's outputs, [B, K] and [B, N].
    metrics: exit_rate (fraction of the valid rows), expert_load (int [N], samples each
      expert answered), overflow_to_expert (samples answered by an expert other
      than their first choice), overflow_to_delegator (samples that should
      have gone to an expert but found every buffer full).
  """
  return _route(model,
                variables,
                images,
                jnp.asarray(threshold, jnp.float32),
                valid,
                spec=spec,
                num_groups=num_groups,
                mesh=mesh)

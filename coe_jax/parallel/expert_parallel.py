"""The stacked experts on a `data` x `expert` mesh: each device runs only its own.

Axis letters: N experts, D and E the sizes of the mesh's data and expert axes,
B batch, K classes, H/W/C image height, width and channels; G routing groups
and P capacity in the router's buffers (docs/method.md, section 2).

Device (d, e) holds experts [e N/E, (e+1) N/E) and the d-th share of the
batch, and runs just those experts on just that share, inside `shard_map`.
Nothing here is left to XLA's partitioner, which, given stacked expert
kernels sharded on the expert axis, runs every expert on every device and
moves kernel slices around (and, on jax 0.10.2, miscompiles vmapped 1x1
convolutions sharded that way). The outputs come back as global arrays
[N, B, ...] split over (expert, data), for the objective or the router to
read with ordinary jax.numpy.
"""

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from coe_jax.models import stacked
from coe_jax.models.coe import CoE
from coe_jax.models.stacked import DELEGATOR, EXPERTS, Variables
from coe_jax.parallel.mesh import ALL_DEVICES, DATA_AXIS, EXPERT_AXIS, constrain


def run_experts(model: CoE, variables: Variables, images: jax.Array, *, shared_input: bool,
                expert_loop: str, mesh: Optional[Mesh]) -> jax.Array:
  """Every expert in inference mode: logits [N, B, K].

  `images` are [B, H, W, C] seen by every expert when `shared_input`, else
  per-expert buffers [N, B, H, W, C] (from the router, B = G * P slots).
  Under a mesh, both axes of the output are split: [N / E, B / D, K] on each
  device.
  """
  if mesh is None:
    return model.experts(variables, images, shared_input=shared_input, loop=expert_loop)
  split = PartitionSpec(EXPERT_AXIS, DATA_AXIS)

  def run_local(experts: Variables, images: jax.Array) -> jax.Array:
    # experts: leaves [N / E, ...]; images: [B / D, H, W, C] or [N / E, B / D, H, W, C].
    return model.run_stacked(experts, images, shared_input=shared_input,
                             loop=expert_loop)  # [N / E, B / D, K]

  image_spec = PartitionSpec(DATA_AXIS) if shared_input else split
  return jax.shard_map(run_local,
                       mesh=mesh,
                       in_specs=(PartitionSpec(EXPERT_AXIS), image_spec),
                       out_specs=split)(stacked.part(variables, EXPERTS), images)


def train_delegator(model: CoE,
                    variables: Variables,
                    images: jax.Array,
                    rng: jax.Array,
                    *,
                    mesh: Optional[Mesh],
                    batch_norm_scope: str,
                    example_index: Optional[jax.Array] = None):
  """The delegator in training mode: ((class logits [B, K], selection logits [B, N]), stats).

  `example_index` [B] gives each image's position in the global batch
  (0..B-1 when None), from which its dropout mask is drawn: the masks do not
  depend on the mesh.

  With `batch_norm_scope="global"` its work is split over every device by
  the partitioner, and BatchNorm's statistics are the whole batch's. With
  "replica", each device runs it on its own B / (D E) samples inside
  `shard_map`, BatchNorm reduces over those alone (no all-reduce per layer),
  and the running averages are then averaged over the devices, so every
  device keeps the same ones.
  """
  if example_index is None:
    example_index = jnp.arange(images.shape[0])  # [B]
  if mesh is None or batch_norm_scope == "global":
    images, example_index = constrain((images, example_index), mesh, ALL_DEVICES)
    return model.delegator(variables, images, train=True, rng=rng, example_index=example_index)
  axes = (DATA_AXIS, EXPERT_AXIS)
  # Only the delegator's variables enter the shard_map, under their key, as
  # `model.delegator` reads them.
  own = {collection: {DELEGATOR: tree[DELEGATOR]} for collection, tree in variables.items()}

  def run_local(own: Variables, images: jax.Array, example_index: jax.Array):
    # images: [B / (D E), H, W, C]; example_index: [B / (D E)]; own: on every device.
    outputs, stats = model.delegator(own, images, train=True, rng=rng, example_index=example_index)
    return outputs, jax.lax.pmean(stats, axes)

  return jax.shard_map(run_local,
                       mesh=mesh,
                       in_specs=(PartitionSpec(), ALL_DEVICES, ALL_DEVICES),
                       out_specs=((ALL_DEVICES, ALL_DEVICES), PartitionSpec()))(own, images,
                                                                                example_index)


def train_experts(model: CoE,
                  variables: Variables,
                  images: jax.Array,
                  rng: jax.Array,
                  *,
                  expert_loop: str,
                  mesh: Optional[Mesh],
                  batch_norm_scope: str = "global",
                  example_index: Optional[jax.Array] = None):
  """Every expert in training mode on the whole batch, each device on its share.

  Returns (logits [N, B, K], deterministic logits [N, B, K] (the same pass without
  dropout), new batch_stats [N, ...]). Under a mesh, BatchNorm reduces over the data
  axis with `batch_norm_scope="global"`, so the statistics are those of the global
  batch, as on one device; with "replica" each data shard's statistics are its own B / D
  samples', and the running averages are averaged over the data axis. Dropout masks come
  from each expert's key and `example_index` [B], the images' positions in the global
  batch (0..B-1 when None), so they do not depend on the mesh. Gradients flow back
  through `shard_map`: each device's expert gradients are summed over the data axis, and
  no device computes another's experts.
  """
  experts = stacked.part(variables, EXPERTS)
  rngs = jax.random.split(rng, model.num_experts)  # [N] dropout keys
  if example_index is None:
    example_index = jnp.arange(images.shape[0])  # [B]
  if mesh is None:
    return model.run_stacked(experts,
                             images,
                             shared_input=True,
                             train=True,
                             rngs=rngs,
                             loop=expert_loop,
                             example_index=example_index)
  split = PartitionSpec(EXPERT_AXIS, DATA_AXIS)
  per_replica = batch_norm_scope == "replica"
  net = model.expert_net.clone(batch_norm_axis=None if per_replica else DATA_AXIS)

  def run_local(experts: Variables, images: jax.Array, rngs: jax.Array, example_index: jax.Array):
    # experts: leaves [N / E, ...]; images: [B / D, H, W, C]; rngs: [N / E];
    # example_index: [B / D].
    logits, deterministic, stats = model.run_stacked(
        experts,
        images,
        shared_input=True,
        train=True,
        rngs=rngs,
        loop=expert_loop,
        net=net,
        example_index=example_index)  # [N / E, B / D, K] x 2, stats
    if per_replica:
      stats = jax.lax.pmean(stats, DATA_AXIS)
    return logits, deterministic, stats

  return jax.shard_map(run_local,
                       mesh=mesh,
                       in_specs=(PartitionSpec(EXPERT_AXIS), PartitionSpec(DATA_AXIS),
                                 PartitionSpec(EXPERT_AXIS), PartitionSpec(DATA_AXIS)),
                       out_specs=(split, split, PartitionSpec(EXPERT_AXIS)))(experts, images, rngs,
                                                                             example_index)


def train_routed_experts(model: CoE,
                         variables: Variables,
                         images: jax.Array,
                         slots: jax.Array,
                         rng: jax.Array,
                         *,
                         expert_loop: str,
                         mesh: Optional[Mesh],
                         batch_norm_scope: str = "global"):
  """Each expert in training mode on its own buffer of the batch (routed dispatch).

  `images` [B, H, W, C] is the batch (under a mesh, split over the data axis),
  `slots` [N, P] the batch indices of each expert's P images
  (`coe_jax.objective.dispatch`), ordered so that a data shard's share of the
  slots names only images of its own share of the batch. Returns (logits
  [N, P, K], new batch_stats [N, ...]); each expert's BatchNorm statistics
  are those of its own buffer (over the data axis with
  `batch_norm_scope="global"`), the images it serves at test time. Dropout
  masks come from each expert's key and the images' batch indices, as in
  `train_experts`.

  Under a mesh, device (d, e) gathers its experts' images from the share of
  the batch it already holds (the expert axis replicates the data shard):
  no image crosses devices, and the device computes only its N / E experts
  on their P / D slots.
  """
  experts = stacked.part(variables, EXPERTS)
  rngs = jax.random.split(rng, model.num_experts)  # [N] dropout keys

  def run(experts, images, slots, rngs, net=None, offset=0):
    logits, _, stats = model.run_stacked(experts,
                                         images[slots - offset],
                                         shared_input=False,
                                         train=True,
                                         rngs=rngs,
                                         loop=expert_loop,
                                         net=net,
                                         example_index=slots)  # [N', P', K]
    return logits, stats

  if mesh is None:
    return run(experts, images, slots, rngs)
  split = PartitionSpec(EXPERT_AXIS, DATA_AXIS)
  per_replica = batch_norm_scope == "replica"
  net = model.expert_net.clone(batch_norm_axis=None if per_replica else DATA_AXIS)

  def run_local(experts: Variables, images: jax.Array, slots: jax.Array, rngs: jax.Array):
    # experts: leaves [N / E, ...]; images: [B / D, H, W, C]; slots: [N / E, P / D]
    # (global batch indices, all within this data shard); rngs: [N / E].
    offset = jax.lax.axis_index(DATA_AXIS) * images.shape[0]
    logits, stats = run(experts, images, slots, rngs, net=net, offset=offset)
    if per_replica:
      stats = jax.lax.pmean(stats, DATA_AXIS)
    return logits, stats

  return jax.shard_map(run_local,
                       mesh=mesh,
                       in_specs=(PartitionSpec(EXPERT_AXIS), PartitionSpec(DATA_AXIS), split,
                                 PartitionSpec(EXPERT_AXIS)),
                       out_specs=(split, PartitionSpec(EXPERT_AXIS)))(experts, images, slots, rngs)


def train_generalist(model: CoE,
                     variables: Variables,
                     images: jax.Array,
                     rng: jax.Array,
                     *,
                     mesh: Optional[Mesh],
                     example_index: Optional[jax.Array] = None):
  """Expert 0 alone in training mode on the whole batch: (logits [1, B, K], stats [1, ...]).

  The generalist warm-up under routed dispatch: the other N - 1 experts do
  not run. Under a mesh expert 0's variables are gathered to every device
  and the batch is split over all of them, so the whole mesh trains the one
  network (BatchNorm over the whole batch, as the delegator's).
  """
  first = jax.tree.map(lambda x: x[:1], stacked.part(variables, EXPERTS))  # leaves [1, ...]
  if example_index is None:
    example_index = jnp.arange(images.shape[0])  # [B]
  images, example_index = constrain((images, example_index), mesh, ALL_DEVICES)
  rngs = jax.random.split(rng, model.num_experts)[:1]  # expert 0's key, as in train_experts
  logits, _, stats = model.run_stacked(first,
                                       images,
                                       shared_input=True,
                                       train=True,
                                       rngs=rngs,
                                       loop="unroll",
                                       example_index=example_index)  # [1, B, K]
  return logits, stats

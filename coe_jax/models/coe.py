"""The CoE model: one delegator and N experts whose variables are stacked.

Axis letters: B batch, N experts, N' the stacked experts one call runs (all N,
or N/E on a mesh whose expert axis has size E), K classes, H/W/C image height,
width and channels; G routing groups and P capacity in the router's buffers
(docs/method.md, section 2).

The variables' layout, and the helpers that read it, are `coe_jax.models.stacked`'s.
The experts share an architecture but start from distinct random keys.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from coe_jax import config_base
from coe_jax.errors import require
from coe_jax.models import stacked
from coe_jax.models.networks import Delegator, Expert
from coe_jax.models.spec import NetworkSpec
from coe_jax.models.stacked import DELEGATOR, EXPERTS, Variables


class CoE:
  """The delegator and the N stacked experts of one config."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    config_base.check(config, "num_experts", "train.compute_dtype", "train.remat")
    for name in config_base.NETWORKS:
      require(name in config, name, None, "missing from the config (config_base.network builds it)")
    require(num_classes >= 2, "num_classes", num_classes, "expected at least 2 classes")
    num_experts = config.num_experts
    dtype = jnp.dtype(config.train.compute_dtype)
    self.num_experts = num_experts
    self.num_classes = num_classes
    self.image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    self.delegator_spec = NetworkSpec.from_config(config.delegator, "delegator")
    self.expert_spec = NetworkSpec.from_config(config.expert, "expert")
    remat = config.train.remat
    self.delegator_net = Delegator(self.delegator_spec,
                                   num_classes,
                                   num_experts,
                                   dtype=dtype,
                                   remat=remat)
    self.expert_net = Expert(self.expert_spec, num_classes, dtype=dtype, remat=remat)

  def init(self, rng: jax.Array) -> Variables:
    """Fresh variables: the delegator's, and N experts' from N distinct keys."""
    delegator_rng, experts_rng = jax.random.split(rng)
    images = jnp.zeros((1, *self.image_shape), jnp.uint8)
    delegator = self.delegator_net.init(delegator_rng, images)
    init_expert = lambda key: self.expert_net.init(key, images)
    experts = jax.vmap(init_expert)(jax.random.split(experts_rng, self.num_experts))
    return {
        collection: {
            DELEGATOR: delegator[collection],
            EXPERTS: experts[collection]
        } for collection in delegator
    }

  def delegator(self,
                variables: Variables,
                images: jax.Array,
                *,
                train: bool = False,
                rng: Optional[jax.Array] = None,
                example_index: Optional[jax.Array] = None):
    """(class_logits [B, K], selection_logits [B, N]); with train, also new batch_stats.

    `example_index` [B]: the images' positions in the global batch, which draw
    their dropout masks (0..B-1 when None).
    """
    own = stacked.part(variables, DELEGATOR)
    if not train:
      return self.delegator_net.apply(own, images)
    outputs, updates = self.delegator_net.apply(own,
                                                images,
                                                train=True,
                                                example_index=example_index,
                                                mutable=["batch_stats"],
                                                rngs={"dropout": rng})
    return outputs, updates["batch_stats"]

  def experts(self,
              variables: Variables,
              images: jax.Array,
              *,
              shared_input: bool,
              train: bool = False,
              rng: Optional[jax.Array] = None,
              loop: str = "vmap"):
    """Runs all N experts: `run_stacked` on the experts' variables, one dropout key each."""
    rngs = jax.random.split(rng if rng is not None else jax.random.key(0), self.num_experts)
    return self.run_stacked(stacked.part(variables, EXPERTS),
                            images,
                            shared_input=shared_input,
                            train=train,
                            rngs=rngs,
                            loop=loop)

  def run_stacked(self,
                  experts: Variables,
                  images: jax.Array,
                  *,
                  shared_input: bool,
                  train: bool = False,
                  rngs: Optional[jax.Array] = None,
                  loop: str = "vmap",
                  net: Optional[Expert] = None,
                  example_index: Optional[jax.Array] = None):
    """Runs N' stacked experts (all N, or a device's share of them under a mesh).

    Returns logits [N', B, K]; with `train`, (logits, deterministic logits, new
    batch_stats), where the deterministic logits are those of the same pass
    without dropout ([N', B, K]).

    Args:
      experts: `{collection: tree}` whose leaves have a leading axis of N' experts.
      images: [B, H, W, C] seen by every expert when `shared_input`, else
        per-expert buffers [N', B, H, W, C] (from the router, B = G * P slots,
        or a device's share of them).
      train: BatchNorm in training mode, dropout on; returns updated statistics.
      rngs: [N'] dropout keys, one per expert (train only).
      loop: "unroll" runs the experts one after another, each its own copy in
        the program; "scan" one after another through one copy, so the
        program does not grow with N'; "vmap" as one batched network (also one
        copy). "auto" is "unroll" on CPUs, where XLA trains the unrolled
        experts fastest (benchmarks/README.md), and "scan" on accelerators.
      net: the expert network to apply; `expert_net` when None (the trainer
        passes one whose BatchNorm reduces over a mesh axis).
      example_index: [B] the images' positions in the global batch, which draw
        their dropout masks (train only; 0..B-1 when None); [N', B] with
        per-expert buffers, each buffer's own images' positions.
    """
    config_base.check_value("expert_loop", loop)
    loop = stacked.resolve_loop(loop, jax.default_backend())
    net = net if net is not None else self.expert_net
    if rngs is None:
      rngs = jax.random.split(jax.random.key(0), jax.tree.leaves(experts)[0].shape[0])

    def run_one(expert_variables, expert_images, expert_rng, expert_index):
      if not train:
        return net.apply(expert_variables, expert_images)
      (logits, deterministic), updates = net.apply(expert_variables,
                                                   expert_images,
                                                   train=True,
                                                   with_deterministic=True,
                                                   example_index=expert_index,
                                                   mutable=["batch_stats"],
                                                   rngs={"dropout": expert_rng})
      return logits, deterministic, updates["batch_stats"]

    # Scanned / vmapped over when per expert; the same for every expert when shared.
    per_expert_images = None if shared_input else images
    per_expert_index = None if shared_input or example_index is None else example_index
    pick = lambda x, shared: shared if shared_input or x is None else x
    if loop == "vmap":
      return jax.vmap(lambda v, x, r, i: run_one(v, pick(x, images), r, pick(i, example_index)))(
          experts, per_expert_images, rngs, per_expert_index)
    if loop == "scan":
      return jax.lax.scan(
          lambda _, xs:
          (None, run_one(xs[0], pick(xs[1], images), xs[2], pick(xs[3], example_index))), None,
          (experts, per_expert_images, rngs, per_expert_index))[1]
    outputs = [
        run_one(stacked.expert(experts, j), images if shared_input else images[j], rngs[j],
                example_index if per_expert_index is None else per_expert_index[j])
        for j in range(rngs.shape[0])
    ]
    # Stacked on a leading expert axis: logits [N', B, K] (and the rest, in train mode).
    return jax.tree.map(lambda *x: jnp.stack(x), *outputs)

  def expert(self, variables: Variables, index: int, images: jax.Array) -> jax.Array:
    """Expert `index` alone on images [B, H, W, C]: logits [B, K] (inference mode)."""
    own = stacked.expert(stacked.part(variables, EXPERTS), index)
    return self.expert_net.apply(own, images)

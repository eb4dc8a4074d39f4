"""The CoE model: one delegator and N experts whose variables are stacked.

Axis letters: B batch, N experts, C capacity (samples per expert buffer),
K classes, H/W/Ch image height, width and channels.

Variables are one dict with Flax's collections at the top:

    {"params":      {"delegator": ..., "experts": ...},
     "batch_stats": {"delegator": ..., "experts": ...}}

Every leaf under "experts" has a leading expert axis of size N, so the experts
shard along a mesh's `expert` axis and run as one vmapped network. The
experts share an architecture but start from distinct random keys.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from coe_jax.errors import require
from coe_jax.models.networks import Delegator, Expert
from coe_jax.models.spec import NetworkSpec

Variables = dict[str, Any]
EXPERT_LOOPS = ("vmap", "unroll")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def under_experts(path: tuple[Any, ...]) -> bool:
  """Whether a pytree path (from `jax.tree_util.tree_map_with_path`) runs through
  the stacked experts: variables, their gradients, optimizer state and EMA."""
  return any(getattr(key, "key", None) == "experts" for key in path)


def _select(variables: Variables, part: str) -> Variables:
  """The delegator's or the stacked experts' own variables."""
  return {collection: tree[part] for collection, tree in variables.items()}


class CoE:
  """The delegator and the N stacked experts of one config."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    num_experts = config.num_experts
    require(isinstance(num_experts, int) and num_experts >= 1, "num_experts", num_experts,
            "expected a positive integer")
    require(num_classes >= 2, "num_classes", num_classes, "expected at least 2 classes")
    dtype_name = config.train.compute_dtype
    require(dtype_name in COMPUTE_DTYPES, "train.compute_dtype", dtype_name,
            f"expected one of {', '.join(COMPUTE_DTYPES)}")
    dtype = COMPUTE_DTYPES[dtype_name]
    self.num_experts = num_experts
    self.num_classes = num_classes
    self.image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    self.delegator_spec = NetworkSpec.from_config(config.delegator, "delegator")
    self.expert_spec = NetworkSpec.from_config(config.expert, "expert")
    self.delegator_net = Delegator(self.delegator_spec, num_classes, num_experts, dtype=dtype)
    self.expert_net = Expert(self.expert_spec, num_classes, dtype=dtype)

  def init(self, rng: jax.Array) -> Variables:
    """Fresh variables: the delegator's, and N experts' from N distinct keys."""
    delegator_rng, experts_rng = jax.random.split(rng)
    images = jnp.zeros((1, *self.image_shape), jnp.uint8)
    delegator = self.delegator_net.init(delegator_rng, images)
    init_expert = lambda key: self.expert_net.init(key, images)
    experts = jax.vmap(init_expert)(jax.random.split(experts_rng, self.num_experts))
    return {collection: {"delegator": delegator[collection], "experts": experts[collection]}
            for collection in delegator}

  def delegator(self, variables: Variables, images: jax.Array, *, train: bool = False,
                rng: Optional[jax.Array] = None):
    """(class_logits [B, K], selection_logits [B, N]); with train, also new batch_stats."""
    own = _select(variables, "delegator")
    if not train:
      return self.delegator_net.apply(own, images)
    outputs, updates = self.delegator_net.apply(own, images, train=True, mutable=["batch_stats"],
                                                rngs={"dropout": rng})
    return outputs, updates["batch_stats"]

  def experts(self, variables: Variables, images: jax.Array, *, shared_input: bool,
              train: bool = False, rng: Optional[jax.Array] = None, loop: str = "vmap"):
    """Runs all N experts.

    Returns logits [N, B, K]; with `train`, (logits, deterministic logits, new
    batch_stats), where the deterministic logits are those of the same pass
    without dropout ([N, B, K]).

    Args:
      variables: the CoE variables (only the experts' part is read).
      images: [B, H, W, Ch] seen by every expert when `shared_input`, else
        per-expert buffers [N, C, H, W, Ch].
      train: BatchNorm in training mode, dropout on; returns updated statistics.
      rng: dropout key, split per expert.
      loop: "vmap" runs the experts as one batched network; "unroll" runs them
        one after another (the faster choice depends on the backend; see
        benchmarks/inference.py).
    """
    require(loop in EXPERT_LOOPS, "routing.expert_loop", loop, f"expected one of {', '.join(EXPERT_LOOPS)}")
    own = _select(variables, "experts")
    rngs = jax.random.split(rng if rng is not None else jax.random.key(0), self.num_experts)

    def run_one(expert_variables, expert_images, expert_rng):
      if not train:
        return self.expert_net.apply(expert_variables, expert_images)
      (logits, deterministic), updates = self.expert_net.apply(
          expert_variables, expert_images, train=True, with_deterministic=True,
          mutable=["batch_stats"], rngs={"dropout": expert_rng})
      return logits, deterministic, updates["batch_stats"]

    image_axis = None if shared_input else 0
    if loop == "vmap":
      return jax.vmap(run_one, in_axes=(0, image_axis, 0))(own, images, rngs)
    outputs = [run_one(jax.tree.map(lambda v: v[j], own),
                       images if shared_input else images[j], rngs[j])
               for j in range(self.num_experts)]
    # Stacked on a leading expert axis: logits [N, B, K] (and the rest, in train mode).
    return jax.tree.map(lambda *x: jnp.stack(x), *outputs)

  def expert(self, variables: Variables, index: int, images: jax.Array) -> jax.Array:
    """Expert `index` alone on images [B, H, W, Ch]: logits [B, K] (inference mode)."""
    own = jax.tree.map(lambda v: v[index], _select(variables, "experts"))
    return self.expert_net.apply(own, images)

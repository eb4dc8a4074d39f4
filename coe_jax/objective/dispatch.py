"""Routed training's dispatch: which images each expert trains on, in static-shape buffers.

Axis letters: B batch, N experts, G routing groups, Q = B / G images a group,
P slots an expert (docs/method.md, section 2).

Under `train.expert_dispatch=routed` an expert runs forward and backward on
its WGM portion only, instead of on the whole batch with the images outside
its portion weighted by alpha (`wgm.off_portion_weight`). WGM's balanced
partition gives every expert exactly Q / N images of each routing group, so
the buffers have static shapes and never overflow. Images from outside the
portion keep alpha's effect in expectation: `wgm.off_portion_samples` = m
images an expert and step, m / G from each group, drawn uniformly from the
group's images outside the portion and weighted so that the expected loss is
the "all" step's (`routed`'s docstring has the arithmetic).

The slots are ordered by group (each group's own images, then its drawn
ones), so that on a mesh whose data axis splits the groups, every slot of a
device's share names an image that device holds.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Dispatch(NamedTuple):
  """Each expert's buffer of a routed step.

  slots: [N, P] int32, the batch indices of expert j's images, group by
    group: the group's Q / N images of its portion, then its m / G drawn ones.
  weights: [N, P], each slot's loss weight: 1 in the portion, the drawn
    images' importance weight outside it.
  normaliser: [N], expert j's total weight in the "all" step (B / N + alpha
    (B - B / N)), so that the routed loss is the "all" loss in expectation.
  """
  slots: jax.Array
  weights: jax.Array
  normaliser: jax.Array


def routed(portion: jax.Array, num_experts: int, *, groups: int, off_portion_weight: float,
           off_portion_samples: int, rng: jax.Array) -> Dispatch:
  """The buffers of WGM's partition `portion` [B] (each image's expert).

  Every group's partition must be balanced (Q / N images an expert), which
  the balanced transport of each group gives when N divides Q.

  Expert j's loss in the "all" step is `(sum_own CE + alpha sum_off CE) / Z`,
  with Z = B / N + alpha (B - B / N). In a group, m / G images drawn
  uniformly without replacement from its Q - Q / N outside the portion, each
  weighted `alpha (Q - Q / N) / (m / G)`, have the expected weighted sum
  `alpha sum_off CE` of the group; dividing by the same Z keeps the
  expectation equal. With m = 0, alpha must be 0 (the config says so).
  """
  batch = portion.shape[0]
  per_group = batch // groups  # Q
  own = per_group // num_experts  # Q / N
  drawn = off_portion_samples // groups  # m / G
  offsets = (jnp.arange(groups) * per_group)[:, None, None]  # [G, 1, 1]
  grouped = portion.reshape(groups, per_group)  # [G, Q]
  # Stable: expert j's images are positions [j Q/N, (j+1) Q/N) of the sorted group.
  order = jnp.argsort(grouped, axis=1, stable=True).astype(jnp.int32)  # [G, Q]
  slots = order.reshape(groups, num_experts, own) + offsets  # [G, N, Q/N]
  weights = jnp.ones((groups, num_experts, own), jnp.float32)  # [G, N, Q/N]
  if drawn:
    outside = grouped[:, None, :] != jnp.arange(num_experts)[None, :, None]  # [G, N, Q]
    # Uniform keys, the portion's images pushed below every other: the top m / G
    # of each (group, expert) are a uniform draw without replacement from outside.
    keys = jnp.where(outside, jax.random.uniform(rng, outside.shape), -1.0)  # [G, N, Q]
    extra = jax.lax.top_k(keys, drawn)[1].astype(jnp.int32) + offsets  # [G, N, m/G]
    weight = off_portion_weight * (per_group - own) / drawn
    slots = jnp.concatenate([slots, extra], axis=2)  # [G, N, Q/N + m/G]
    weights = jnp.concatenate([weights, jnp.full(extra.shape, weight, jnp.float32)], axis=2)
  per_expert = lambda x: x.transpose(1, 0, 2).reshape(num_experts, -1)  # [N, P], group-major
  total = batch / num_experts + off_portion_weight * (batch - batch / num_experts)
  return Dispatch(per_expert(slots), per_expert(weights),
                  jnp.full((num_experts,), total, jnp.float32))


def scored_images(batch: int, score_fraction: float) -> jax.Array:
  """The images LGM and VCM score with every expert: every (1 / fraction)-th one [S].

  Strided, so that every data shard and micro-batch holds its equal share of
  them; batches are shuffled, so they are a uniform sample.
  """
  stride = round(1 / score_fraction)
  return jnp.arange(0, batch, stride, dtype=jnp.int32)  # [S]

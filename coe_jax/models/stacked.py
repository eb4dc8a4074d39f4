"""The layout of CoE's variables, and the helpers every module uses to read it.

Variables are one dict with Flax's collections at the top:

    {"params":      {"delegator": ..., "experts": ...},
     "batch_stats": {"delegator": ..., "experts": ...}}

Every leaf under "experts" has a leading expert axis of size N, so the experts
shard along a mesh's `expert` axis and run as one network looped over N. The
same holds for the trees that mirror the variables: gradients, optimizer
state and EMA.
"""

from typing import Any

import jax

Variables = dict[str, Any]
DELEGATOR = "delegator"
EXPERTS = "experts"


def part(variables: Variables, name: str) -> Variables:
  """The delegator's (`DELEGATOR`) or the stacked experts' (`EXPERTS`) own variables."""
  return {collection: tree[name] for collection, tree in variables.items()}


def expert(experts: Variables, j: int) -> Variables:
  """Expert j's variables, from the stacked experts' (`part(variables, EXPERTS)`)."""
  return jax.tree.map(lambda leaf: leaf[j], experts)


def under_experts(path: tuple[Any, ...]) -> bool:
  """Whether a pytree path (from `jax.tree_util.tree_map_with_path`) runs through
  the stacked experts, in the variables or in any tree that mirrors them."""
  return any(getattr(key, "key", None) == EXPERTS for key in path)


def resolve_loop(loop: str, backend: str) -> str:
  """The loop "auto" stands for on `backend`: "unroll" on CPUs, where XLA trains
  unrolled experts fastest, "scan" on accelerators, so the program does not grow
  with N. Other loops are returned as they are."""
  if loop != "auto":
    return loop
  return "unroll" if backend == "cpu" else "scan"

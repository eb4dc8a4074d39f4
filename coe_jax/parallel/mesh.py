"""The device mesh and how arrays are laid out on it: the partitioning rules, in one place.

Mesh axes: `data` (the batch is split along it) and `expert` (the stacked
experts' leading axis is split along it when it is larger than one). Every
other array is replicated. On a pod, the mesh spans all hosts' devices.
"""

from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from coe_jax.errors import require
from coe_jax.models.stacked import under_experts

DATA_AXIS = "data"  # Mesh axis the batch is split along.
EXPERT_AXIS = "expert"  # Mesh axis the stacked experts are split along.
# Batch-leading arrays split over every device of the mesh.
ALL_DEVICES = P((DATA_AXIS, EXPERT_AXIS))


def constrain(x: Any, mesh: Optional[Mesh], spec: P) -> Any:
  """Pins the sharding of `x` (an array or a tree of them) to `spec` on `mesh`; the
  identity without a mesh, so one code path serves one device and a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A `data` x `expert` mesh of `devices` (all of jax's by default), laid out
  by `mesh_utils.create_device_mesh`; `mesh.data = -1` takes all devices left over."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  num_devices = devices.size
  expert = config.mesh.expert
  require(
      isinstance(expert, int) and expert >= 1 and num_devices % expert == 0, "mesh.expert", expert,
      f"expected a positive divisor of the {num_devices} devices")
  require(config.num_experts % expert == 0, "mesh.expert", expert,
          f"expected a divisor of num_experts={config.num_experts}")
  data = config.mesh.data if config.mesh.data != -1 else num_devices // expert
  require(data >= 1 and data * expert == num_devices, "mesh.data", config.mesh.data,
          f"expected -1 or {num_devices // expert} (devices / mesh.expert)")
  # Evaluation pads its batches instead (`eval_batch_size`).
  size = config.train.batch_size
  require(size % data == 0, "train.batch_size", size,
          f"expected a multiple of the mesh's data axis ({data})")
  microbatches = config.train.microbatches
  require(
      config.train.batch_size % (data * microbatches) == 0, "train.microbatches", microbatches,
      f"expected a divisor of the per-device batch "
      f"({config.train.batch_size} / {data} data shards)")
  # Topology-aware on TPUs and GPUs (neighbouring chips share an expert group's
  # all-reduces); the plain order elsewhere.
  grid = mesh_utils.create_device_mesh((data, expert), devices=list(devices.flat))
  return Mesh(grid, (DATA_AXIS, EXPERT_AXIS))


def process_data_shard(mesh: Mesh, process_index: Optional[int] = None) -> tuple[int, int]:
  """(index, count): the share of every global batch this process loads.

  A process loads the examples of the data-axis rows its devices sit in, the
  same examples as every other process in those rows: on a 1 x 4 mesh over
  two hosts of 2 devices, both load the whole batch (one row); on 2 x 2,
  each loads its own half. The batch splits into `count` equal shares, and
  this process's rows are share `index`.

  Raises:
    CoEError: when this process's rows are not one contiguous block of the
      data axis (a device order that no batch split can follow).
  """
  process = jax.process_index() if process_index is None else process_index
  grid = mesh.devices  # [D, E]
  rows = [d for d in range(grid.shape[0]) if any(dev.process_index == process for dev in grid[d])]
  data = grid.shape[0]
  share = len(rows)
  require(
      share >= 1 and data % share == 0 and rows == list(range(rows[0], rows[0] + share)) and
      rows[0] % share == 0, "mesh", dict(mesh.shape),
      f"process {process} holds data rows {rows} of {data}; expected one aligned contiguous "
      "block, the same size on every process")
  return rows[0] // share, data // share


def eval_batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  """`eval.batch_size` rounded up to a multiple of the data axis.

  Evaluation batches are padded and masked anyway, so a size the mesh cannot
  split (500 on 8 GPUs) takes a few padding rows instead of stopping the run.
  """
  data = mesh.shape[DATA_AXIS]
  return -(-config.eval.batch_size // data) * data


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, replicated over `expert`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(tree: Any, mesh: Mesh, num_experts: int) -> Any:
  """Shardings for a tree of model state (params, batch stats, optimizer state).

  Leaves found under an "experts" key whose leading axis is the expert axis
  are split over the mesh's `expert` axis; everything else is replicated.
  """
  expert_sharding = NamedSharding(mesh, P(EXPERT_AXIS))

  def sharding(path, leaf):
    stacked = under_experts(path)
    shape = getattr(leaf, "shape", ())
    if stacked and len(shape) >= 1 and shape[0] == num_experts and mesh.shape[EXPERT_AXIS] > 1:
      return expert_sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding, tree)

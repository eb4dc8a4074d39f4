"""The device mesh and how arrays are laid out on it: the partitioning rules, in one place.

Mesh axes: `data` (the batch is split along it) and `expert` (the stacked
experts' leading axis is split along it when it is larger than one). Every
other array is replicated. On a pod, the mesh spans all hosts' devices (in
the torus's order on a TPU slice), and each process loads the examples of
the data rows its devices sit in (`process_data_shard`, `global_batch`),
however those rows are spread along the axis.
"""

import copy
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from coe_jax import config_base
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


def _axes(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, expert): the mesh's axes over `num_devices`, checked."""
  expert = config.mesh.expert
  require(
      isinstance(expert, int) and expert >= 1 and num_devices % expert == 0, "mesh.expert", expert,
      f"expected a positive divisor of the {num_devices} devices")
  require(config.num_experts % expert == 0, "mesh.expert", expert,
          f"expected a divisor of num_experts={config.num_experts}")
  data = config.mesh.data if config.mesh.data != -1 else num_devices // expert
  require(data >= 1 and data * expert == num_devices, "mesh.data", config.mesh.data,
          f"expected -1 or {num_devices // expert} (devices / mesh.expert)")
  return data, expert


def with_routing_groups(config: ml_collections.ConfigDict,
                        devices=None) -> ml_collections.ConfigDict:
  """`config` with `wgm.groups=-1` resolved to the data axis of its mesh over
  `devices` (all of jax's by default), validated; `config` itself otherwise."""
  if config.wgm.groups != -1:
    return config
  num_devices = np.asarray(devices).size if devices is not None else jax.device_count()
  data, _ = _axes(config, num_devices)
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    resolved.wgm.groups = data
  config_base.validate(resolved)
  return resolved


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A `data` x `expert` mesh of `devices` (all of jax's by default), laid out
  by `mesh_utils.create_device_mesh`; `mesh.data = -1` takes all devices left over."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  data, expert = _axes(config, devices.size)
  # Evaluation pads its batches instead (`eval_batch_size`).
  size = config.train.batch_size
  require(size % data == 0, "train.batch_size", size,
          f"expected a multiple of the mesh's data axis ({data})")
  microbatches = config.train.microbatches
  require(
      config.train.batch_size % (data * microbatches) == 0, "train.microbatches", microbatches,
      f"expected a divisor of the per-device batch "
      f"({config.train.batch_size} / {data} data shards)")
  if config.train.expert_dispatch == "routed":
    _check_routed(config, data)
  # Topology-aware on TPUs and GPUs (neighbouring chips share an expert group's
  # all-reduces); the plain order elsewhere. A torus whose axes cannot be
  # grouped into the two sizes (32 x 2 on v4-128's 4x4x4) has one of its axes
  # split rather than the mesh refused.
  grid = mesh_utils.create_device_mesh((data, expert),
                                       devices=list(devices.flat),
                                       allow_split_physical_axes=True)
  mesh = Mesh(grid, (DATA_AXIS, EXPERT_AXIS))
  _row_groups(mesh)  # A layout no batch split can follow stops here, not at the first batch.
  return mesh


def _process_rows(mesh: Mesh) -> dict[int, tuple[int, ...]]:
  """Every process's data rows: those its devices sit in, in increasing order."""
  rows: dict[int, set[int]] = {}
  for (row, _), device in np.ndenumerate(mesh.devices):
    rows.setdefault(device.process_index, set()).add(row)
  return {process: tuple(sorted(r)) for process, r in rows.items()}


def _row_groups(mesh: Mesh) -> tuple[dict[int, tuple[int, ...]], list[tuple[int, ...]]]:
  """(each process's rows, the distinct row sets ordered by their first row).

  On a TPU slice the mesh follows the torus, so one host's chips can sit in
  rows far apart ([0, 2, 4, 6] of 8 on v4-16); only the sets matter.
  """
  rows = _process_rows(mesh)
  groups = sorted(set(rows.values()))
  sizes = {len(g) for g in groups}
  # Equal sizes that add up to the data axis: the distinct sets are disjoint,
  # since together they cover every row.
  require(
      len(sizes) == 1 and len(groups) * len(groups[0]) == mesh.devices.shape[0], "mesh",
      dict(mesh.shape), "expected each process's data rows to equal or be disjoint from every "
      f"other's, as many on each; the processes hold rows {_shown(rows)}")
  return rows, groups


def _shown(rows: dict[int, tuple[int, ...]]) -> str:
  return ", ".join(f"{p}: {list(r)}" for p, r in sorted(rows.items()))


def _check_routed(config: ml_collections.ConfigDict, data: int) -> None:
  """Routed buffers on a mesh: each data shard routes whole groups of its own images,
  and its share of every buffer and of the scored images splits into the micro-batches."""
  groups, microbatches = config.wgm.groups, config.train.microbatches
  require(
      groups % data == 0, "wgm.groups", groups,
      f"routed dispatch on a mesh whose data axis is {data}: expected a multiple of {data} "
      "(each data shard routes its own images)")
  slots = config.train.batch_size // config.num_experts + config.wgm.off_portion_samples
  require(
      slots % (data * microbatches) == 0, "train.microbatches", microbatches,
      f"expected a divisor of each data shard's share of an expert's {slots} routed images "
      f"({slots} / {data})")
  scored = round(config.train.batch_size * config.lgm.score_fraction)
  require(
      scored % (data * microbatches) == 0, "lgm.score_fraction", config.lgm.score_fraction,
      f"its {scored} scored images a step must split over {data} data shards and "
      f"{microbatches} micro-batches")


def process_data_shard(mesh: Mesh, process_index: Optional[int] = None) -> tuple[int, int]:
  """(index, count): the share of every global batch this process loads.

  A process loads the examples of the data-axis rows its devices sit in, the
  same examples as every other process in those rows: on a 1 x 4 mesh over
  two hosts of 2 devices, both load the whole batch (one row); on 2 x 2,
  each loads its own half. The batch splits into `count` equal shares, one
  per distinct set of rows (ordered by their first row), and this process's
  rows are share `index`; the rows need not be contiguous (`global_batch`
  places them).

  Raises:
    CoEError: when this process holds no device of the mesh, or when two
      processes' rows overlap without being the same (no batch split can
      follow that layout).
  """
  process = jax.process_index() if process_index is None else process_index
  rows, groups = _row_groups(mesh)
  require(process in rows, "process_index", process,
          f"expected a process holding devices of the mesh ({sorted(rows)})")
  return groups.index(rows[process]), len(groups)


def process_shards(mesh: Mesh,
                   local: np.ndarray,
                   process_index: Optional[int] = None) -> list[tuple[Any, np.ndarray]]:
  """(device, examples) for each of this process's devices, from its share `local`.

  The share holds the examples of the process's data rows in increasing row
  order, B/D a row: its j-th block of B/D goes to every device of its j-th
  row, whichever rows those are.
  """
  process = jax.process_index() if process_index is None else process_index
  process_data_shard(mesh, process)  # The layout and the process, checked.
  rows = _process_rows(mesh)[process]
  size = local.shape[0] // len(rows)
  block = {row: j for j, row in enumerate(rows)}
  return [(device, local[block[row] * size:(block[row] + 1) * size])
          for (row, _), device in np.ndenumerate(mesh.devices)
          if device.process_index == process]


def global_batch(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """This process's share of a batch -> the global array split over `data`.

  Built device by device (`process_shards`), so that rows of one process that
  are not contiguous along the data axis each get their own block; the global
  batch is `process_data_shard`'s count of shares.
  """
  _, shares = process_data_shard(mesh)
  pairs = process_shards(mesh, local)
  arrays = jax.device_put([a for _, a in pairs], [d for d, _ in pairs])
  return jax.make_array_from_single_device_arrays((local.shape[0] * shares, *local.shape[1:]),
                                                  batch_sharding(mesh), arrays)


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

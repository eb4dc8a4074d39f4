"""Meshes on multi-host TPU slices, with stand-in devices, and where each process's examples go.

`mesh_utils.create_device_mesh` lays a slice's chips out by its torus, so one
host's chips can sit in data rows far apart (rows 0, 2, 4, 6 of 8 on v4-16).
The stand-ins carry what it reads from a TPU device (platform, device_kind,
coords, core_on_chip, process_index, id, slice_index): a v4 host holds 2x2x1
chips, a v5e or v6e host 2x2. v4-N names N cores, 2 a chip (v4-16 is 8
chips, 2 hosts); v5e-N and v6e-N name N chips.
"""

import dataclasses
import itertools
import math
from typing import Optional

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from coe_jax.config_loading import load_config
from coe_jax.errors import CoEError
from coe_jax.parallel import mesh as mesh_lib
from tests.tiny import config_path, tiny_config

# name: (device_kind, chips along x, y, z)
SLICES = {
    "v4-16": ("TPU v4", (2, 2, 2)),
    "v4-32": ("TPU v4", (2, 2, 4)),
    "v4-64": ("TPU v4", (2, 4, 4)),
    "v4-128": ("TPU v4", (4, 4, 4)),
    "v5e-16": ("TPU v5 lite", (4, 4, 1)),
    "v5e-32": ("TPU v5 lite", (4, 8, 1)),
    "v6e-64": ("TPU v6 lite", (8, 8, 1)),
}
HOST = (2, 2, 1)  # Chips of one host along x, y, z, on v4, v5e and v6e alike.


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  id: int
  process_index: int
  coords: tuple[int, int, int]
  device_kind: str
  core_on_chip: int = 0  # One device a chip: v4 runs its two cores as one (megacore).
  slice_index: int = 0
  platform: str = "tpu"


def tpu_slice(name: str, host_order: Optional[np.ndarray] = None) -> list[FakeTpu]:
  """The devices of slice `name`, ordered by id as `jax.devices()` is.

  Hosts are numbered x first, then y, then z, unless `host_order` renumbers
  them: host h becomes process `host_order[h]`.
  """
  kind, chips = SLICES[name]
  hosts = [c // h for c, h in zip(chips, HOST)]
  found = []
  for z, y, x in itertools.product(*(range(c) for c in reversed(chips))):
    host = x // HOST[0] + hosts[0] * (y // HOST[1] + hosts[1] * (z // HOST[2]))
    process = host if host_order is None else int(host_order[host])
    found.append((process, (x, y, z)))
  found.sort()
  return [FakeTpu(i, p, c, kind) for i, (p, c) in enumerate(found)]


def splits_of_194m():
  """(slice, expert) for every expert axis that divides both the chips and num_experts."""
  experts = load_config(config_path("imagenet_coe_194m")).num_experts
  for name, (_, chips) in SLICES.items():
    for expert in range(1, experts + 1):
      if experts % expert == 0 and math.prod(chips) % expert == 0:
        yield name, expert


def _rows(mesh: Mesh) -> dict[int, frozenset[int]]:
  """Each process's data rows, read off the grid."""
  rows = {}
  for (row, _), device in np.ndenumerate(mesh.devices):
    rows.setdefault(device.process_index, set()).add(row)
  return {p: frozenset(r) for p, r in rows.items()}


def assert_shares_consistent(mesh: Mesh) -> None:
  """Same rows, same share; different rows, different shares; every share loaded."""
  rows, data = _rows(mesh), mesh.shape[mesh_lib.DATA_AXIS]
  shares = {p: mesh_lib.process_data_shard(mesh, p) for p in rows}
  counts = {count for _, count in shares.values()}
  assert len(counts) == 1, shares
  count = counts.pop()
  by_rows = {}
  for p, (index, _) in shares.items():
    by_rows.setdefault(rows[p], set()).add(index)
  assert all(len(indices) == 1 for indices in by_rows.values()), by_rows
  assert sorted(i for (i,) in by_rows.values()) == list(range(count)), by_rows
  assert {count * len(r) for r in rows.values()} == {data}, (count, rows)


@pytest.mark.parametrize("name, expert", list(splits_of_194m()))
def test_the_194m_config_has_every_split_on_every_slice(name, expert):
  """Among them v4-16's 8 x 1 (process 0 holds rows 0, 2, 4, 6), v4-128's and
  v6e-64's 32 x 2 and v6e-64's 16 x 4 (no grouping of the torus's axes gives
  them: one axis is split)."""
  config = load_config(config_path("imagenet_coe_194m"))
  config.mesh.data, config.mesh.expert = -1, expert
  devices = tpu_slice(name)
  mesh = mesh_lib.make_mesh(config, devices)
  assert dict(mesh.shape) == {
      mesh_lib.DATA_AXIS: len(devices) // expert,
      mesh_lib.EXPERT_AXIS: expert
  }
  assert sorted(d.id for d in mesh.devices.flat) == list(range(len(devices)))
  assert_shares_consistent(mesh)


def test_a_v4_16_host_holds_rows_apart():
  """The layout the tests above cover: not one contiguous block per host."""
  config = load_config(config_path("imagenet_coe_194m"))
  config.mesh.data, config.mesh.expert = -1, 1
  mesh = mesh_lib.make_mesh(config, tpu_slice("v4-16"))
  assert _rows(mesh) == {0: frozenset({0, 2, 4, 6}), 1: frozenset({1, 3, 5, 7})}
  assert [mesh_lib.process_data_shard(mesh, p) for p in (0, 1)] == [(0, 2), (1, 2)]


@pytest.mark.parametrize("name", ["v4-64", "v5e-32", "v6e-64"])
@pytest.mark.parametrize("expert", [1, 2, 4])
def test_shares_follow_the_rows_however_the_hosts_are_numbered(name, expert):
  config = load_config(config_path("imagenet_coe_194m"))
  config.mesh.data, config.mesh.expert = -1, expert
  kind, chips = SLICES[name]
  hosts = math.prod(chips) // math.prod(HOST)
  order = np.random.default_rng(hosts * 10 + expert).permutation(hosts)
  assert_shares_consistent(mesh_lib.make_mesh(config, tpu_slice(name, order)))


@dataclasses.dataclass(frozen=True)
class FakeCpu:
  id: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def test_rows_shared_in_part_are_refused_in_one_line():
  """Process 0 in both rows of a 2 x 2 mesh, process 1 in the second alone:
  no split of the batch gives both their rows."""
  config = tiny_config(num_experts=2)
  config.mesh.data, config.mesh.expert = 2, 2
  devices = [FakeCpu(i, p) for i, p in enumerate([0, 0, 0, 1])]
  with pytest.raises(CoEError) as raised:
    mesh_lib.make_mesh(config, devices)
  message = str(raised.value)
  assert message.startswith("mesh={'data': 2, 'expert': 2}: expected each process's data rows")
  assert "0: [0, 1], 1: [1]" in message and "\n" not in message


def test_a_process_without_devices_in_the_mesh_is_named():
  config = tiny_config(num_experts=2)
  config.mesh.data, config.mesh.expert = 2, 2
  mesh = mesh_lib.make_mesh(config, [FakeCpu(i, i // 2) for i in range(4)])
  with pytest.raises(CoEError, match=r"^process_index=2: expected a process holding devices"):
    mesh_lib.process_data_shard(mesh, 2)


def _placed(mesh: Mesh, batch: np.ndarray) -> jax.Array:
  """The global array the processes of stand-in `mesh` build from their shares of
  `batch`, on the 8 CPU devices of the same ids: each process loads its share
  as the data pipeline cuts it (share i of count: examples [i b, (i + 1) b)),
  and puts each block on its devices (`mesh.process_shards`)."""
  cpus = {d.id: d for d in jax.devices()}
  arrays = {}
  for process in sorted(_rows(mesh)):
    index, count = mesh_lib.process_data_shard(mesh, process)
    share = len(batch) // count
    local = batch[index * share:(index + 1) * share]
    for device, block in mesh_lib.process_shards(mesh, local, process):
      assert device.id not in arrays, "two processes place data on one device"
      arrays[device.id] = jax.device_put(block, cpus[device.id])
  grid = np.vectorize(lambda d: cpus[d.id], otypes=[object])(mesh.devices)
  cpu_mesh = Mesh(grid, mesh.axis_names)
  assert len(arrays) == cpu_mesh.size
  return jax.make_array_from_single_device_arrays(batch.shape,
                                                  NamedSharding(cpu_mesh, P(mesh_lib.DATA_AXIS)),
                                                  list(arrays.values()))


@pytest.mark.parametrize("host_order", [None, [1, 0]])
@pytest.mark.parametrize("expert", [1, 2, 4])
def test_the_rows_of_each_process_hold_the_share_it_loaded(host_order, expert):
  """On v4-16's layout (a host's rows apart, on 8 CPU devices): the global
  batch restricted to a process's rows, in row order, is the share it loaded;
  the devices of a row agree; every example is in it once."""
  assert jax.device_count() >= 8
  config = tiny_config(num_experts=4)
  config.mesh.data, config.mesh.expert = -1, expert
  mesh = mesh_lib.make_mesh(config, tpu_slice("v4-16", host_order))
  data = mesh.shape[mesh_lib.DATA_AXIS]
  batch = np.arange(config.train.batch_size * 3).reshape(-1, 3)  # [B, 3]
  placed = _placed(mesh, batch)
  size = len(batch) // data
  whole = np.asarray(placed)
  for shard in placed.addressable_shards:
    np.testing.assert_array_equal(shard.data, whole[shard.index])
  for process, rows in _rows(mesh).items():
    index, count = mesh_lib.process_data_shard(mesh, process)
    share = len(batch) // count
    mine = np.concatenate([whole[r * size:(r + 1) * size] for r in sorted(rows)])
    np.testing.assert_array_equal(mine, batch[index * share:(index + 1) * share])
  np.testing.assert_array_equal(np.sort(whole[:, 0]), batch[:, 0])


def test_one_process_places_its_whole_batch_as_it_is():
  """The trainer's path on this machine: one process, every row its own."""
  config = tiny_config(num_experts=4)
  config.mesh.data, config.mesh.expert = 4, 2
  mesh = mesh_lib.make_mesh(config, jax.devices()[:8])
  batch = np.arange(config.train.batch_size * 2, dtype=np.float32).reshape(-1, 2)
  placed = mesh_lib.global_batch(mesh, batch)
  assert placed.sharding == mesh_lib.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(placed), batch)

"""The mesh and the state's layout on it: stacked experts split on `expert`, the rest replicated."""

import jax
import pytest
from jax.sharding import PartitionSpec

from coe_jax import config_base
from coe_jax.errors import CoEError
from coe_jax.models.coe import CoE
from coe_jax.models.stacked import under_experts
from coe_jax.parallel import mesh as mesh_lib
from coe_jax.training import optim, train, train_step
from tests.tiny import tiny_config


def _config(num_experts=4, data=4, expert=2):
  config = tiny_config(num_experts=num_experts)
  config.mesh.data, config.mesh.expert = data, expert
  return config


def test_the_state_splits_each_stacked_expert_leaf_and_replicates_the_rest():
  """Parameters, BatchNorm statistics, optimizer moments and EMA alike."""
  config = _config()
  config.train.ema_decay = 0.99
  mesh = mesh_lib.make_mesh(config, jax.devices()[:8])
  assert dict(mesh.shape) == {mesh_lib.DATA_AXIS: 4, mesh_lib.EXPERT_AXIS: 2}
  model = CoE(config, num_classes=10)
  state = jax.eval_shape(lambda: train_step.create_train_state(model, optim.make_optimizer(config),
                                                               config, jax.random.key(0)))
  shardings = mesh_lib.state_shardings(state, mesh, config.num_experts)
  counts = {"split": 0, "replicated": 0}

  def check(path, leaf, sharding):
    split = under_experts(path) and leaf.ndim >= 1 and leaf.shape[0] == config.num_experts
    expected = PartitionSpec(mesh_lib.EXPERT_AXIS) if split else PartitionSpec()
    assert sharding.spec == expected, jax.tree_util.keystr(path)
    counts["split" if split else "replicated"] += 1

  jax.tree_util.tree_map_with_path(check, state, shardings)
  assert min(counts.values()) > 10, counts
  fields = {
      path[0].name for path, _ in jax.tree_util.tree_leaves_with_path(state) if under_experts(path)
  }
  assert fields == {"params", "batch_stats", "ema_params", "opt_state"}, fields


def test_one_expert_group_replicates_everything_and_the_batch_splits_on_data():
  config = _config(data=8, expert=1)
  mesh = mesh_lib.make_mesh(config, jax.devices()[:8])
  model = CoE(config, num_classes=10)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0)))
  specs = {s.spec for s in jax.tree.leaves(mesh_lib.state_shardings(params, mesh, 4))}
  assert specs == {PartitionSpec()}
  assert mesh_lib.batch_sharding(mesh).spec == PartitionSpec(mesh_lib.DATA_AXIS)


def test_evaluation_pads_a_batch_the_data_axis_does_not_split():
  """cifar10's eval.batch_size=500 on 8 devices: 504 a batch, the 4 extra rows padding."""
  config = _config(data=8, expert=1)
  config.eval.batch_size = 500
  mesh = mesh_lib.make_mesh(config, jax.devices()[:8])
  assert mesh_lib.eval_batch_size(config, mesh) == 504
  config.eval.batch_size = 512
  assert mesh_lib.eval_batch_size(config, mesh) == 512


@pytest.mark.parametrize("key, value, fragment", [
    ("mesh.expert", 3, "mesh.expert=3: expected a positive divisor of the 8 devices"),
    ("mesh.data", 3, "mesh.data=3: expected -1 or 4"),
    ("num_experts", 6, "mesh.expert=4: expected a divisor of num_experts=6"),
    ("train.batch_size", 30, "train.batch_size=30: expected a multiple of the mesh's data axis"),
])
def test_a_mesh_that_does_not_fit_names_the_key(key, value, fragment):
  config = _config(expert=4 if key == "num_experts" else 2, data=-1)
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(CoEError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
    mesh_lib.make_mesh(config, jax.devices()[:8])


def test_one_routing_group_per_data_shard_resolves_with_the_mesh():
  """`wgm.groups=-1` (the digits config's): 1 group on one device, D on a mesh of D data
  shards; a positive number stays as it is; a resolved number that cannot route is
  refused in one line naming it."""
  config = tiny_config(num_experts=4)
  config.train.expert_dispatch, config.wgm.off_portion_weight = "routed", 0.0
  config.wgm.groups = -1
  config_base.validate(config)  # Checked once resolved, not before.
  config.mesh.data, config.mesh.expert = -1, 2
  assert mesh_lib.with_routing_groups(config, jax.devices()[:2]).wgm.groups == 1
  assert mesh_lib.with_routing_groups(config, jax.devices()[:8]).wgm.groups == 4
  assert config.wgm.groups == -1  # The input is untouched.
  mesh = mesh_lib.make_mesh(mesh_lib.with_routing_groups(config,
                                                         jax.devices()[:8]),
                            jax.devices()[:8])
  assert mesh.shape == {"data": 4, "expert": 2}
  # The trainer steps with the resolved number and keeps the config as given (config.json).
  trainer = train.Trainer(config, "/tmp/unused", devices=jax.devices()[:8])
  assert trainer.config.wgm.groups == 4 and trainer.given_config.wgm.groups == -1
  config.wgm.groups = 2
  assert mesh_lib.with_routing_groups(config, jax.devices()[:8]) is config
  config.wgm.groups, config.wgm.off_portion_samples, config.wgm.off_portion_weight = -1, 6, 0.2
  with pytest.raises(CoEError,
                     match=r"wgm.off_portion_samples=6: expected a multiple of "
                     r"wgm.groups=4, at most 24"):
    mesh_lib.with_routing_groups(config, jax.devices()[:8])
  for bad in (0, -2):
    config.wgm.groups = bad
    with pytest.raises(CoEError, match=rf"wgm.groups={bad}: expected -1 \(one per data shard\)"):
      config_base.validate(config)

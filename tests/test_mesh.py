"""The mesh and the state's layout on it: stacked experts split on `expert`, the rest replicated."""

import jax
import pytest
from jax.sharding import PartitionSpec

from coe_jax.errors import CoEError
from coe_jax.models.coe import CoE
from coe_jax.models.stacked import under_experts
from coe_jax.parallel import mesh as mesh_lib
from coe_jax.training import optim, train_step
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

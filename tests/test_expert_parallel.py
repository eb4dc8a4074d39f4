"""Expert parallelism: each device trains only its own experts, and the run equals one device."""

import re

import jax
import numpy as np
import pytest

from coe_jax.models import conv
from coe_jax.training import train
from tests.helpers import assert_same_update, grouped_reference_step, sgd_at_peak, train_config

NUM_STEPS = 2


def _config(data: int, expert: int, loop: str = "unroll", num_experts: int = 4):
  config = train_config()
  config.num_experts = num_experts
  config.mesh.data, config.mesh.expert = data, expert
  config.expert_loop = loop
  # Plain SGD: Adam would turn gradients that are zero up to float order into
  # learning-rate-sized steps, and hide a real difference in that noise.
  config.train.optimizer, config.train.momentum = "sgd", 0.0
  config.train.learning_rate = 0.1
  return config


def _trainer(config):
  devices = jax.devices()[:config.mesh.data * config.mesh.expert]
  return train.Trainer(config, "/tmp/unused", devices=devices)


def _train(config):
  """Losses and parameters after `NUM_STEPS` co-adaptation steps."""
  trainer = _trainer(config)
  state = trainer.init_state()
  step = trainer.compile_step("coadapt")
  batches = train.data.train_batches(config)
  losses = []
  for _ in range(NUM_STEPS):
    state, metrics = step(state, trainer.global_batch(next(batches)), jax.random.key(0))
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.leaves(jax.device_get((state.params, state.batch_stats)))


@pytest.fixture(scope="module")
def one_device():
  return _train(_config(1, 1))


@pytest.mark.parametrize(
    "data,expert,loop",
    [
        pytest.param(8, 1, "unroll", marks=pytest.mark.slow),
        pytest.param(2, 4, "unroll", marks=pytest.mark.slow),
        (2, 4, "scan"),
        # jax 0.10.2 miscompiles vmapped 1x1 convolutions whose kernels are sharded
        # on the vmapped axis; inside shard_map each device's kernels are its own.
        pytest.param(4, 2, "vmap", marks=pytest.mark.slow),
    ])
def test_a_sharded_run_trains_as_one_device(one_device, data, expert, loop):
  losses, variables = _train(_config(data, expert, loop))
  np.testing.assert_allclose(losses, one_device[0], rtol=1e-5)
  for got, want in zip(variables, one_device[1], strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_micro_batches_on_a_mesh_train_as_on_one_device():
  """Gradient accumulation under expert parallelism: shard_map inside the micro-batch loop."""

  def config(data, expert):
    c = _config(data, expert)
    c.train.microbatches = 2
    return c

  losses, variables = _train(config(2, 4))
  want_losses, want_variables = _train(config(1, 1))
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  for got, want in zip(variables, want_variables, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _lowered_step(config):
  """The co-adaptation step lowered for abstract inputs (no data, no state)."""
  trainer = _trainer(config)
  image_size = config.data.image_size
  batch = {
      "image":
          jax.ShapeDtypeStruct((config.train.batch_size, image_size, image_size, 3),
                               np.uint8,
                               sharding=trainer.batch_sharding),
      "label":
          jax.ShapeDtypeStruct((config.train.batch_size,),
                               np.int32,
                               sharding=trainer.batch_sharding)
  }
  return trainer.compile_step("coadapt").lower(trainer.abstract_state, batch, jax.random.key(0))


def _convolutions(config) -> int:
  """Dense convolutions in the lowered train step: for a mesh, one device's program.

  Lowered as on accelerators: CPUs compute them as matrix products.
  """
  with conv.formulation("conv"):
    return len(re.findall(r"stablehlo\.convolution", _lowered_step(config).as_text()))


@pytest.mark.slow
def test_per_replica_batch_norm_uses_each_devices_samples_with_fewer_all_reduces():
  """`train.batch_norm_scope=replica` on a data 2 x expert 2 mesh: the delegator's
  statistics are each device's quarter of the batch, the experts' each data shard's
  half, as a one-device pass over those groups computes them."""
  config = _config(2, 2)
  sgd_at_peak(config)
  config.train.batch_norm_scope = "replica"
  trainer = _trainer(config)
  state = trainer.init_state()
  batch = trainer.global_batch(next(train.data.train_batches(config)))
  before, host_batch = jax.device_get((state, batch))  # The step donates its state.
  new_state, _ = trainer.compile_step("coadapt")(state, batch, jax.random.key(0))
  params, batch_stats = jax.jit(lambda s, b: grouped_reference_step(
      trainer.model, trainer.optimizer, config, "coadapt", s, b, groups=(4, 2), strided=False))(
          before, host_batch)
  assert_same_update(before, jax.device_get(new_state), params, batch_stats)

  def all_reduces(scope):
    config.train.batch_norm_scope = scope
    return len(re.findall(r"all-reduce(-start)?\(", _lowered_step(config).compile().as_text()))

  assert all_reduces("replica") < all_reduces("global")


def test_each_device_program_holds_only_its_own_experts():
  everything = _convolutions(_config(8, 1))  # delegator + 4 experts
  one_each = _convolutions(_config(2, 4))  # delegator + 1 expert
  two_each = _convolutions(_config(2, 4, num_experts=8))  # delegator + 2 experts
  per_expert = two_each - one_each
  assert per_expert > 0
  assert everything - one_each == 3 * per_expert


def test_a_scanned_program_does_not_grow_with_the_number_of_experts():
  assert _convolutions(_config(1, 1, "scan", num_experts=32)) == _convolutions(
      _config(1, 1, "scan", num_experts=4))


def _with_dropout(config):
  config.delegator.dropout_rate = config.expert.dropout_rate = 0.3
  return config


@pytest.fixture(scope="module")
def one_device_with_dropout():
  return _train(_with_dropout(_config(1, 1)))


@pytest.mark.parametrize("data,expert", [(2, 4), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_dropout_masks_do_not_depend_on_the_mesh(one_device_with_dropout, data, expert):
  """Masks come from the step and each example's position in the global batch: the
  same config trains alike on every mesh, and a run resumed on another mesh keeps its course."""
  losses, variables = _train(_with_dropout(_config(data, expert)))
  np.testing.assert_allclose(losses, one_device_with_dropout[0], rtol=1e-5)
  for got, want in zip(variables, one_device_with_dropout[1], strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Dropout is on: the losses are not those of the run without it.
  without = _train(_config(1, 1))[0]
  assert abs(losses[0] - without[0]) > 1e-3

"""The optimizer: weight decay on every kernel, each stacked expert's included, and
each stage's own learning-rate schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax import config_base
from coe_jax.errors import CoEError
from coe_jax.models.coe import CoE
from coe_jax.models.stacked import under_experts
from coe_jax.training import optim
from tests.tiny import tiny_config

LEARNING_RATE, WEIGHT_DECAY = 0.5, 0.1


def _params(config):
  return CoE(config, num_classes=10).init(jax.random.key(0))["params"]


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_weight_decay_shrinks_every_kernel_and_nothing_else(rule):
  """With zero gradients, an update is the decay alone: -lr * wd * kernel for each
  convolution and dense kernel (every expert's slice of the stacked ones), 0 for
  biases, BatchNorm scales, PWLU and CondConv parameters."""
  config = tiny_config(num_experts=3, activation="pwlu", condconv_kernels=2)
  config.train.optimizer, config.train.momentum = rule, 0.0
  config.train.learning_rate, config.train.warmup_steps = LEARNING_RATE, 0
  config.train.weight_decay = WEIGHT_DECAY
  params = _params(config)
  optimizer = optim.make_optimizer(config)
  updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params),
                                params)
  kinds = {"kernel": 0, "other": 0, "stacked kernel": 0}

  def check(path, update, param):
    is_kernel = getattr(path[-1], "key", None) == "kernel"
    expected = -LEARNING_RATE * WEIGHT_DECAY * param if is_kernel else jnp.zeros_like(param)
    np.testing.assert_allclose(update,
                               expected,
                               rtol=1e-6,
                               atol=1e-9,
                               err_msg=jax.tree_util.keystr(path))
    kinds["kernel" if is_kernel else "other"] += 1
    if is_kernel and under_experts(path):
      assert param.shape[0] == 3  # Stacked: one slice per expert, each decayed.
      kinds["stacked kernel"] += 1

  jax.tree_util.tree_map_with_path(check, updates, params)
  assert min(kinds.values()) > 0, kinds
  names = {getattr(p[-1], "key", None) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert {"bias", "scale"} <= names and len(names) > 3, names  # PWLU, CondConv leaves too.


def test_each_stage_warms_up_and_decays_over_its_own_steps():
  config = tiny_config()
  config.train.num_steps, config.train.learning_rate, config.train.warmup_steps = 100, 1.0, 10
  config.train.stages.warmup, config.train.stages.coadapt = 0.2, 0.5
  config.train.stages.delegator = 0.3
  config.train.stage_schedules.delegator.learning_rate = 0.1
  config.train.stage_schedules.delegator.warmup_steps = 4
  schedule = optim.learning_rate_schedule(config)
  lr = lambda step: float(schedule(step))
  # warm-up [0, 20): 10 steps of linear warm-up to 1.0, then cosine to 0 at 20.
  assert lr(0) == 0 and lr(5) == pytest.approx(0.5) and lr(10) == pytest.approx(1.0)
  assert lr(19) < 0.05
  # coadapt [20, 70): its own warm-up from 0, to the same peak.
  assert lr(20) == 0 and lr(30) == pytest.approx(1.0) and lr(69) < 0.01
  # delegator [70, 100): its own peak and warm-up.
  assert lr(70) == 0 and lr(74) == pytest.approx(0.1) and lr(99) < 0.001
  assert max(lr(s) for s in range(70, 100)) == pytest.approx(0.1)


def test_a_continuous_schedule_warms_up_once_and_decays_over_the_whole_run():
  """`train.schedule=continuous`: co-adaptation does not start from a learning rate of
  0 again, and the run's one cosine reaches 0 at its last step, as a single network's."""
  config = tiny_config()
  config.train.num_steps, config.train.learning_rate, config.train.warmup_steps = 100, 1.0, 10
  config.train.stages.warmup, config.train.stages.coadapt = 0.2, 0.8
  config.train.schedule = "continuous"
  schedule = optim.learning_rate_schedule(config)
  lr = lambda step: float(schedule(step))
  assert lr(0) == 0 and lr(10) == pytest.approx(1.0)
  # At the warmup -> coadapt boundary (20) the rate goes on along the cosine.
  assert lr(20) == pytest.approx(lr(19), rel=0.02) and lr(20) > 0.9
  assert lr(55) == pytest.approx(0.5, abs=0.01) and lr(99) < 1e-3
  config.train.schedule = "per_stage"
  assert float(optim.learning_rate_schedule(config)(20)) == 0


def test_a_continuous_schedule_refuses_a_stage_schedule():
  config = tiny_config()
  config.train.schedule = "continuous"
  config.train.stage_schedules.delegator.learning_rate = 0.1
  with pytest.raises(CoEError,
                     match=r"train\.stage_schedules\.delegator\.learning_rate=0\.1: expected None"):
    config_base.validate(config)


def test_a_bad_optimizer_setting_names_its_key():
  config = tiny_config()
  config.train.optimizer = "lamb"
  with pytest.raises(CoEError, match=r"train\.optimizer='lamb'"):
    optim.make_optimizer(config)
  config = tiny_config()
  config.train.stage_schedules.coadapt.learning_rate = -1.0
  with pytest.raises(CoEError, match=r"train\.stage_schedules\.coadapt\.learning_rate=-1\.0"):
    optim.make_optimizer(config)

"""The train step and what the trainer wires around it: frozen experts, EMA, schedules,
micro-batches. (A resume across PWLU's realignment, with the EMA: tests/test_train.py.)"""

import jax
import numpy as np
import pytest

from coe_jax.models.coe import CoE
from coe_jax.models.stacked import under_experts
from coe_jax.training import optim, train, train_step
from tests.helpers import (
    assert_same_update,
    grouped_reference_step,
    sgd_at_peak,
    single_device_trainer,
    train_config,
    training_metrics,
)
from tests.tiny import tiny_config


def _leaves(tree, experts: bool):
  """The leaves of `tree` under (or outside) the stacked experts, as numpy arrays."""
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return [np.asarray(leaf) for path, leaf in flat if under_experts(path) == experts]


@pytest.fixture(scope="module")
def delegator_stage_steps():
  """Two warm-up steps, then two delegator-stage steps, with AdamW's decay and an EMA."""
  config = train_config(num_steps=4)
  config.train.stages.warmup, config.train.stages.coadapt = 0.5, 0.0
  config.train.stages.delegator = 0.5
  config.train.weight_decay, config.train.ema_decay = 0.1, 0.5
  trainer = single_device_trainer(config, "/tmp/unused")
  state = trainer.init_state()
  batches = train.data.train_batches(config)
  warmup = trainer.compile_step("warmup")
  for _ in range(2):
    state, _ = warmup(state, trainer.global_batch(next(batches)), jax.random.key(0))
  before = jax.device_get(state)
  delegator = trainer.compile_step("delegator")
  for _ in range(2):
    state, metrics = delegator(state, trainer.global_batch(next(batches)), jax.random.key(0))
  return before, jax.device_get(state), metrics


@pytest.mark.parametrize("part", ["params", "batch_stats", "opt_state", "ema_params"])
def test_the_delegator_stage_moves_no_expert_variable(delegator_stage_steps, part):
  before, after, metrics = delegator_stage_steps
  assert float(metrics["finite"]) == 1
  frozen = _leaves(getattr(before, part), experts=True)
  assert frozen
  for a, b in zip(frozen, _leaves(getattr(after, part), experts=True), strict=True):
    np.testing.assert_array_equal(a, b)
  if part != "batch_stats":  # The delegator itself trains on.
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(_leaves(getattr(before, part), False), _leaves(getattr(after, part), False))
    ]
    assert any(moved)


def test_ema_is_the_debiased_average_of_the_parameters_so_far():
  config = train_config(num_steps=4)
  config.train.ema_decay = 0.8
  trainer = single_device_trainer(config, "/tmp/unused")
  state = trainer.init_state()
  step = trainer.compile_step("warmup")
  batches = train.data.train_batches(config)
  seen = []
  for _ in range(3):
    state, _ = step(state, trainer.global_batch(next(batches)), jax.random.key(0))
    seen.append(jax.device_get(state.params))
  # sum_s d^(t-s) p_s / sum_s d^(t-s): no trace of the random initialisation.
  weights = np.array([0.8**2, 0.8, 1.0]) / (0.8**2 + 0.8 + 1.0)
  want = jax.tree.map(lambda *p: sum(w * x for w, x in zip(weights, p)), *seen)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.ema_params)),
                  jax.tree.leaves(want),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(train_step.ema_weight(0.8, np.int32(1)), 0.0)


def test_each_stage_has_its_own_schedule_and_the_delegator_stage_reaches_its_peak(tmp_path):
  config = train_config(num_steps=8)
  config.train.stages.warmup, config.train.stages.coadapt = 0.5, 0.0
  config.train.stages.delegator = 0.5
  config.train.learning_rate, config.train.warmup_steps = 1e-2, 1
  config.train.stage_schedules.delegator.learning_rate = 3e-3
  config.train.log_every_steps = 1
  train.train(single_device_trainer(config, str(tmp_path)))
  rates = [m["learning_rate"] for m in training_metrics(tmp_path)]  # steps 0-7
  # Warm-up over one step, then a cosine over the stage's other three steps.
  np.testing.assert_allclose(rates[:4], [0.0, 1e-2, 7.5e-3, 2.5e-3], rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(rates[4:], [0.0, 3e-3, 2.25e-3, 0.75e-3], rtol=1e-6, atol=1e-9)


def test_weight_decay_reaches_kernels_only():
  config = tiny_config(num_experts=2, activation="pwlu", condconv_kernels=2)
  config.expert.pwlu_per_channel = True
  model = CoE(config, num_classes=10)
  params = jax.eval_shape(model.init, jax.random.key(0))["params"]
  mask = jax.tree_util.tree_flatten_with_path(optim._decay_mask(params))[0]
  decayed = {"/".join(str(k.key) for k in path) for path, on in mask if on}
  kept = {"/".join(str(k.key) for k in path) for path, on in mask if not on}
  assert any("heights" in p for p in kept) and any("bias" in p for p in kept)
  assert all(p.endswith("kernel") for p in decayed)
  assert all(not p.endswith("kernel") for p in kept)
  heights = params["experts"]["backbone"]["stem_act"]["PWLU_0"]["heights"]
  assert heights.ndim == 3  # [N, C, n+1]: two axes of its own, yet no kernel.


def test_micro_batches_split_and_join_back_to_the_batch():
  x = np.arange(8 * 3).reshape(8, 3)
  micro = np.asarray(train_step.split_micro(x, 4))  # [4, 2, 3]
  np.testing.assert_array_equal(micro[1], x[[1, 5]])  # strided: every device shares each one
  np.testing.assert_array_equal(train_step.join_micro(micro), x)
  per_expert = np.stack([micro * 10, micro * 100], axis=1)  # [M, N, B/M, 3]
  np.testing.assert_array_equal(train_step.join_micro(per_expert, batch_axis=1),
                                np.stack([x * 10, x * 100]))


@pytest.mark.parametrize("stage", ["coadapt", "delegator"])
def test_micro_batches_train_the_objective_of_the_whole_batch(stage):
  """4 micro-batches: WGM, LGM, VCM and the loss normalisers see the whole batch."""
  config = train_config()
  config.num_experts = 3
  config.loss.distill_weight = 0.5  # the teacher is picked over the whole batch too
  config.train.microbatches = 4
  sgd_at_peak(config)
  trainer = single_device_trainer(config, "/tmp/unused")
  state = trainer.init_state()
  batch = trainer.global_batch(next(train.data.train_batches(config)))
  step = jax.jit(train_step.make_train_step(trainer.model, trainer.optimizer, config, stage))
  new_state, metrics = step(state, batch, jax.random.key(0))
  assert float(metrics["finite"]) == 1 and float(metrics["load_gap"]) <= 1
  params, batch_stats = jax.jit(lambda s, b: grouped_reference_step(
      trainer.model, trainer.optimizer, config, stage, s, b, groups=(4, 4), strided=True))(state,
                                                                                           batch)
  assert_same_update(state, new_state, params, batch_stats)
  moved = [
      not np.allclose(a, b) for a, b in zip(_leaves(state.params, experts=False),
                                            _leaves(new_state.params, experts=False))
  ]
  assert sum(moved) > len(moved) // 2

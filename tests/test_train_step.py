"""The train step and what the trainer wires around it: frozen experts, EMA, schedules, PWLU."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coe_jax import objective, optim, train, train_step
from coe_jax.models.coe import CoE, under_experts
from tests.helpers import single_device_trainer, train_config, training_metrics
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
    moved = [not np.array_equal(a, b) for a, b in zip(
        _leaves(getattr(before, part), False), _leaves(getattr(after, part), False))]
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
  weights = np.array([0.8 ** 2, 0.8, 1.0]) / (0.8 ** 2 + 0.8 + 1.0)
  want = jax.tree.map(lambda *p: sum(w * x for w, x in zip(weights, p)), *seen)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.ema_params)), jax.tree.leaves(want),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(train_step.ema_weight(0.8, np.int32(1)), 0.0)


def _stopped_and_resumed(config, tmp_path, stop_at):
  """(uninterrupted final state, final state of a run stopped at `stop_at` and resumed)."""
  straight = train.train(single_device_trainer(config, str(tmp_path / "straight")))
  legs = str(tmp_path / "legs")
  assert train.train(single_device_trainer(config, legs), stop_at=stop_at) is None
  return straight, train.train(single_device_trainer(config, legs))


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_a_resumed_run_has_the_ema_of_an_uninterrupted_one(tmp_path):
  config = train_config(num_steps=4)
  config.train.ema_decay = 0.9
  config.train.checkpoint_every_steps = 100  # Only the stop and the end save.
  straight, resumed = _stopped_and_resumed(config, tmp_path, stop_at=2)
  _assert_same(straight.ema_params, resumed.ema_params)


def test_pwlu_realigns_at_its_step_and_a_resume_across_it_ends_the_same(tmp_path):
  """Realignment at step 3 of 6; the first leg stops right before it."""
  config = train_config(num_steps=6)
  config.delegator.activation = config.expert.activation = "pwlu"
  config.train.pwlu_realign_fraction = 0.5
  config.train.checkpoint_every_steps = 100
  straight, resumed = _stopped_and_resumed(config, tmp_path, stop_at=3)
  _assert_same(straight.params, resumed.params)
  _assert_same(straight.batch_stats, resumed.batch_stats)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(resumed.batch_stats))[0]
  realigned = [leaf for path, leaf in flat if path[-1].key == "realigned"]
  assert realigned and all(np.all(r == 1) for r in realigned)


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


def _reference_micro_batched_step(model, optimizer, config, stage, state, batch, microbatches):
  """One update of the whole batch's objective computed in one pass (`coe_objective`),
  with the networks run on the micro-batches side by side (vmap), so that their
  BatchNorm statistics are the micro-batches' as in gradient accumulation."""
  split = lambda x: train_step.split_micro(x, microbatches)
  images, labels = split(batch["image"]), batch["label"]
  rng = jax.random.key(1)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    (class_logits, selection_logits), delegator_stats = jax.vmap(
        lambda x: model.delegator(variables, x, train=True, rng=rng))(images)
    if stage == "delegator":
      expert_logits = jax.lax.stop_gradient(jax.vmap(lambda x: model.experts(
          variables, x, shared_input=True, loop="unroll"))(images))
      expert_stats = state.batch_stats["experts"]
    else:
      expert_logits, _, expert_stats = jax.vmap(lambda x: model.run_stacked(
          {collection: tree["experts"] for collection, tree in variables.items()},
          x, shared_input=True, train=True, rngs=jax.random.split(rng, model.num_experts),
          loop="unroll"))(images)
      expert_stats = jax.tree.map(lambda x: x.mean(0), expert_stats)
    join = train_step.join_micro
    loss, _ = objective.coe_objective(join(class_logits), join(selection_logits),
                                      join(expert_logits, batch_axis=1), labels, config, stage)
    return loss, {"delegator": jax.tree.map(lambda x: x.mean(0), delegator_stats),
                  "experts": expert_stats}

  grads, batch_stats = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, _ = optimizer.update(grads, state.opt_state, state.params)
  return optax.apply_updates(state.params, updates), batch_stats


@pytest.mark.parametrize("stage", ["coadapt", "delegator"])
def test_micro_batches_train_the_objective_of_the_whole_batch(stage):
  """4 micro-batches: WGM, LGM, VCM and the loss normalisers see the whole batch."""
  config = train_config()
  config.num_experts = 3
  config.loss.distill_weight = 0.5  # the teacher is picked over the whole batch too
  config.train.microbatches = 4
  # SGD at its peak rate from the first step: the update is the gradient, scaled.
  config.train.warmup_steps, config.train.optimizer, config.train.momentum = 0, "sgd", 0.0
  trainer = single_device_trainer(config, "/tmp/unused")
  state = trainer.init_state()
  batch = trainer.global_batch(next(train.data.train_batches(config)))
  step = jax.jit(train_step.make_train_step(trainer.model, trainer.optimizer, config, stage))
  new_state, metrics = step(state, batch, jax.random.key(0))
  assert float(metrics["finite"]) == 1 and float(metrics["load_gap"]) <= 1
  params, batch_stats = jax.jit(lambda s, b: _reference_micro_batched_step(
      trainer.model, trainer.optimizer, config, stage, s, b, 4))(state, batch)
  got, want = (jax.tree.map(jnp.subtract, p, state.params) for p in (new_state.params, params))
  # Gradients that are zero but for float noise (a BatchNorm bias before another
  # BatchNorm) are compared against the largest update.
  scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * scale)
  for a, b in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(batch_stats),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  moved = [not np.allclose(a, b) for a, b in zip(_leaves(state.params, experts=False),
                                                   _leaves(new_state.params, experts=False))]
  assert sum(moved) > len(moved) // 2

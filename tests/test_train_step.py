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


@pytest.mark.slow
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


@pytest.mark.parametrize("stage,microbatches",
                         [("coadapt", 1), ("coadapt", 4),
                          pytest.param("delegator", 4, marks=pytest.mark.slow)])
def test_micro_batches_train_the_objective_of_the_whole_batch(stage, microbatches):
  """The step's update is that of the whole batch's `coe_objective`; with 4
  micro-batches WGM, LGM, VCM and the loss normalisers still see the whole batch."""
  config = train_config()
  config.num_experts = 3
  config.loss.distill_weight = 0.5  # the teacher is picked over the whole batch too
  config.train.microbatches = microbatches
  sgd_at_peak(config)
  trainer = single_device_trainer(config, "/tmp/unused")
  state = trainer.init_state()
  batch = trainer.global_batch(next(train.data.train_batches(config)))
  step = jax.jit(train_step.make_train_step(trainer.model, trainer.optimizer, config, stage))
  new_state, metrics = step(state, batch, jax.random.key(0))
  assert float(metrics["finite"]) == 1 and float(metrics["load_gap"]) <= 1
  params, batch_stats = jax.jit(lambda s, b: grouped_reference_step(trainer.model,
                                                                    trainer.optimizer,
                                                                    config,
                                                                    stage,
                                                                    s,
                                                                    b,
                                                                    groups=
                                                                    (microbatches, microbatches),
                                                                    strided=True))(state, batch)
  assert_same_update(state, new_state, params, batch_stats)
  moved = [
      not np.allclose(a, b) for a, b in zip(_leaves(state.params, experts=False),
                                            _leaves(new_state.params, experts=False))
  ]
  assert sum(moved) > len(moved) // 2


@pytest.mark.slow
def test_a_generalist_warmup_trains_one_expert_and_copies_it_into_all(tmp_path):
  """Warm-up (2 steps) trains expert 0 alone; when co-adaptation starts, every expert's
  parameters, BatchNorm statistics, optimizer state and EMA are expert 0's, also in a
  run resumed exactly there."""
  config = train_config(num_steps=4)
  config.train.generalist_warmup = True
  config.train.ema_decay = 0.9
  workdir = str(tmp_path / "run")
  trainer = single_device_trainer(config, workdir)
  initial = jax.device_get(trainer.init_state())
  assert train.train(trainer, stop_at=2) is None  # Stopped with a checkpoint at the boundary.
  _, warm = train.checkpointing.Checkpointer(workdir,
                                             keep=3,
                                             fingerprint=train.checkpointing.shape_fingerprint(
                                                 config, 10)).restore_latest(trainer.abstract_state)
  warm = jax.device_get(warm)
  bias = lambda state, j: state.params["experts"]["classifier"]["bias"][j]
  assert not np.allclose(bias(warm, 0), bias(initial, 0))  # Expert 0 trained...
  np.testing.assert_array_equal(bias(warm, 1), bias(initial, 1))  # ... expert 1 did not.

  copied = jax.device_get(trainer.copy_generalist(jax.device_put(warm)))
  flat = jax.tree_util.tree_flatten_with_path(copied)[0]
  stacked = [leaf for path, leaf in flat if under_experts(path)]
  assert {path[0].name for path, _ in flat if under_experts(path)
         } == {"params", "batch_stats", "opt_state", "ema_params"}
  for leaf in stacked:
    np.testing.assert_array_equal(leaf[1], leaf[0])
  for got, want in zip(_leaves(copied, experts=False), _leaves(warm, experts=False), strict=True):
    np.testing.assert_array_equal(got, want)

  # The resumed run copies at step 2, and only there.
  calls = []
  copy = trainer.copy_generalist
  trainer.copy_generalist = lambda state: (calls.append(int(state.step)), copy(state))[1]
  train.train(trainer)
  assert calls == [2]


@pytest.mark.slow
def test_a_run_starts_from_another_runs_networks(tmp_path):
  """`train.init_from`: a one-network run's expert becomes every expert (a generalist),
  its delegator the delegator but for the selection head; a run of another
  architecture is refused in one line naming the leaf."""
  source = train_config(num_steps=2)
  source.num_experts = 1
  source.train.stages = {"warmup": 1.0}
  source_dir = str(tmp_path / "generalist")
  trained = jax.device_get(train.train(single_device_trainer(source, source_dir)))

  config = train_config(num_steps=2)
  config.train.init_from = source_dir
  state = jax.device_get(single_device_trainer(config, str(tmp_path / "coe")).init_state())
  fresh_config = train_config(num_steps=2)
  fresh = jax.device_get(single_device_trainer(fresh_config, str(tmp_path / "x")).init_state())
  for part in ("params", "batch_stats"):
    got, want = getattr(state, part), getattr(trained, part)
    for g, w in zip(jax.tree.leaves(got["experts"]), jax.tree.leaves(want["experts"]), strict=True):
      np.testing.assert_array_equal(g, np.broadcast_to(w, g.shape))
  delegator = state.params["delegator"]
  np.testing.assert_array_equal(delegator["classifier"]["kernel"],
                                trained.params["delegator"]["classifier"]["kernel"])
  np.testing.assert_array_equal(delegator["selector"]["kernel"],
                                fresh.params["delegator"]["selector"]["kernel"])

  config.expert.head_features = 24
  with pytest.raises(train.CoEError, match=r"^train\.init_from=.*\['experts'\].* has shape"):
    single_device_trainer(config, str(tmp_path / "other")).init_state()


@pytest.mark.slow
def test_time_based_checkpoints_save_at_logging_steps(tmp_path, monkeypatch):
  """`train.checkpoint_every_secs`: with a clock that moves 10 s per reading, a
  1-second period saves at every logging step (2, 4), besides the end."""
  clock = iter(range(0, 10_000, 10))
  monkeypatch.setattr(train, "now", lambda: float(next(clock)))
  config = train_config(num_steps=6)
  config.train.checkpoint_every_steps, config.train.log_every_steps = 1000, 2
  config.train.checkpoint_every_secs = 1.0
  workdir = tmp_path / "run"
  train.train(single_device_trainer(config, str(workdir)))
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 6]
  config.train.checkpoint_every_secs = 0.0
  other = tmp_path / "other"
  train.train(single_device_trainer(config, str(other)))
  assert [p.name for p in (other / "checkpoints").iterdir()] == ["6"]


def test_prefetch_keeps_order_and_stays_a_fixed_number_of_batches_ahead():
  pulled = []

  def source():
    for i in range(10):
      pulled.append(i)
      yield i

  got = []
  for value in train.prefetch(source(), lambda b: b * 10, size=2):
    got.append(value)
    assert len(pulled) <= len(got) + 2
  assert got == [10 * i for i in range(10)]


def test_throughput_leaves_out_the_time_spent_saving_and_evaluating(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(train.time, "monotonic", lambda: clock[0])
  config = train_config(num_steps=20)
  config.train.peak_flops_per_device = 1e9
  progress = train.TrainingProgress(single_device_trainer(config, "/tmp/unused"), 0)
  clock[0] += 1.0  # One second of training ...
  with progress.excluded():
    clock[0] += 3.0  # ... and three of saving.
  rates = progress.report(10, {"loss": 1.0, "routed_accuracy": 0.5, "delegator_accuracy": 0.5})
  assert rates["steps_per_sec"] == pytest.approx(10.0)

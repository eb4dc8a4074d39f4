"""Figures users can trust: evaluation under expert sharding, and calibration on the hold-out."""

import jax
import numpy as np
import pytest

from coe_jax import data, evaluation
from coe_jax.evaluation import run as evaluation_run
from coe_jax.training import train
from tests.helpers import results_figures, single_device_trainer, train_config


def _mesh_config():
  config = train_config(num_steps=6)
  config.mesh.data, config.mesh.expert = 2, 2
  return config


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
  """A run trained and evaluated on a data 2 x expert 2 mesh of 4 devices."""
  workdir = str(tmp_path_factory.mktemp("mesh_run"))
  trainer = train.Trainer(_mesh_config(), workdir, devices=jax.devices()[:4])
  results = evaluation_run.evaluate(trainer, train.train(trainer))
  return workdir, results


def _one_device(workdir):
  """The run's trainer on one device, and its final state (restored, not trained again)."""
  config = _mesh_config()
  config.mesh.expert = 1
  trainer = single_device_trainer(config, workdir)
  return trainer, train.train(trainer)


@pytest.mark.slow
def test_expert_sharded_evaluation_equals_one_device(mesh_run):
  workdir, _ = mesh_run
  sharded = results_figures(workdir)
  trainer, state = _one_device(workdir)
  single = {
      k: v
      for k, v in evaluation_run.evaluate(trainer, state, write_files=False).items()
      if not k.endswith("_seconds")
  }
  assert set(single) == set(sharded)
  for key, value in single.items():
    assert sharded[key] == value, key


def test_tau_is_calibrated_on_the_holdout_never_the_test_split(mesh_run, monkeypatch):
  """Test labels shuffled: tau and the planned exit rate stay; test top-1 changes."""
  workdir, results = mesh_run
  trainer, state = _one_device(workdir)
  eval_batches = data.eval_batches

  def shuffled(config, *args, split="test", **kwargs):
    for batch in eval_batches(config, *args, split=split, **kwargs):
      if split == "test":
        batch = {**batch, "label": np.random.default_rng(0).permutation(batch["label"])}
      yield batch

  monkeypatch.setattr(data, "eval_batches", shuffled)
  got = evaluation_run.evaluate(trainer, state, write_files=False)
  for key in ("threshold", "expected_exit_rate", "threshold_rule"):
    assert got[key] == results[key], key
  assert got["delegator_top1"] != results["delegator_top1"]
  # Every rule's tau comes from the hold-out too; only its test figures move.
  for rule, figures in got["threshold_rules"].items():
    assert figures["threshold"] == results["threshold_rules"][rule]["threshold"], rule


def test_every_threshold_rule_is_reported_beside_the_runs_own(mesh_run):
  _, results = mesh_run
  rules = results["threshold_rules"]
  assert set(rules) == {"max_accuracy", "within"}
  own = rules[results["threshold_rule"]]
  assert own["threshold"] == results["threshold"]
  for key in ("top1", "early_exit_rate", "mean_flops"):
    assert own[key] == pytest.approx(results[key]), key
  # The cheapest tau within 0.1 points of the best hold-out accuracy costs no more.
  assert rules["within"]["mean_flops"] <= rules["max_accuracy"]["mean_flops"]


def test_expected_exit_rate_is_the_holdout_rate_at_tau(mesh_run):
  workdir, results = mesh_run
  trainer, state = _one_device(workdir)
  holdout = evaluation.collect_outputs(
      trainer.model, state.eval_variables(),
      (trainer.global_batch(b) for b in data.eval_batches(trainer.config, split="holdout")))
  assert len(holdout.labels) == trainer.info.num_holdout > 0
  assert results["expected_exit_rate"] == np.mean(holdout.confidence >= results["threshold"])
  assert results["threshold_source"] == "holdout"


def test_serving_mode_evaluates_when_every_holdout_sample_exits(mesh_run):
  """Expected exit rate 1.0 (tau 0): one slot per expert buffer, no crash."""
  workdir, _ = mesh_run
  trainer, state = _one_device(workdir)
  trainer.config.routing.mode = "serving"
  trainer.config.eval.threshold = 0.0
  results = evaluation_run.evaluate(trainer, state, write_files=False)
  assert results["expected_exit_rate"] == results["early_exit_rate"] == 1.0
  assert results["threshold_source"] == "config" and results["routing_mode"] == "serving"

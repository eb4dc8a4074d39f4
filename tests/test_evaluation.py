"""The threshold sweep and calibration, against a brute-force reference; the check
that the router agrees with the recorded outputs."""

import json
import logging
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax import config_base, data, evaluation, routing, run_dir
from coe_jax.errors import CoEError
from coe_jax.evaluation import report
from coe_jax.evaluation import run as evaluation_run
from coe_jax.models.coe import CoE
from tests.helpers import random_images, random_variables
from tests.tiny import tiny_config


def _outputs(seed=0, m=200, n=4, k=5, ties=False):
  rng = np.random.default_rng(seed)
  conf = rng.uniform(0.2, 1.0, m)
  if ties:
    conf = np.round(conf, 1)
  return evaluation.EvalOutputs(labels=rng.integers(0, k, m),
                                confidence=conf,
                                delegator_prediction=rng.integers(0, k, m),
                                selected_expert=rng.integers(0, n, m),
                                expert_predictions=rng.integers(0, k, (n, m)))


def _brute_force(outputs, tau, f_d, f_e):
  exits = outputs.confidence >= tau
  pred = np.where(exits, outputs.delegator_prediction, outputs.routed_prediction)
  return (pred == outputs.labels).mean(), f_d + (1 - exits.mean()) * f_e


@pytest.mark.parametrize("ties", [False, True])
def test_sweep_matches_brute_force_at_every_point(ties):
  outputs = _outputs(ties=ties)
  curve = evaluation.sweep(outputs, 10.0, 100.0)
  assert np.all(np.diff(curve.thresholds) > 0)
  assert curve.exit_rate[-1] == 0  # The largest tau lets nothing exit.
  assert curve.exit_rate[0] == np.mean(outputs.confidence >= curve.thresholds[0])
  for tau, acc, flops in zip(curve.thresholds, curve.accuracy, curve.mean_flops):
    ref_acc, ref_flops = _brute_force(outputs, tau, 10.0, 100.0)
    assert acc == pytest.approx(ref_acc) and flops == pytest.approx(ref_flops)
  # Every distinct operating point is present: one per distinct confidence, plus "no exit".
  assert len(curve.thresholds) == len(np.unique(outputs.confidence)) + 1


def test_a_rule_beside_a_flops_target_is_refused():
  config = tiny_config()
  config.eval.target_mean_flops, config.eval.threshold_rule = 1e5, "within"
  with pytest.raises(CoEError, match=r"eval.threshold_rule='within': eval.target_mean_flops"):
    config_base.validate(config)


def test_calibrate_maximises_accuracy_then_prefers_cheaper():
  curve = evaluation.Sweep(thresholds=np.array([0.2, 0.5, 0.8, 1.1]),
                           accuracy=np.array([0.7, 0.9, 0.9, 0.85]),
                           exit_rate=np.array([0.9, 0.6, 0.3, 0.0]),
                           mean_flops=np.array([20.0, 50.0, 80.0, 110.0]))
  assert evaluation.calibrate(curve, None) == (0.5, "max_accuracy")
  assert evaluation.calibrate(curve, 45.0) == (0.2, "target_mean_flops")
  assert evaluation.calibrate(curve, 100.0) == (0.5, "target_mean_flops")
  assert evaluation.calibrate(curve, 5.0) == (0.2, "cheapest")
  # "within": the cheapest tau within so many top-1 points of the best.
  assert evaluation.calibrate(curve, None, "within", 0.0) == (0.5, "within")
  assert evaluation.calibrate(curve, None, "within", 5.0) == (0.5, "within")
  curve.accuracy[0] = 0.895  # 0.5 points below the best.
  assert evaluation.calibrate(curve, None, "within", 0.4) == (0.5, "within")
  assert evaluation.calibrate(curve, None, "within", 0.5) == (0.2, "within")
  assert evaluation.calibrate(curve, None, "max_accuracy", 0.5) == (0.5, "max_accuracy")


def test_summary_figures():
  outputs = _outputs(seed=1)
  curve = evaluation.sweep(outputs, 10.0, 100.0)
  tau = float(np.median(outputs.confidence))
  results = evaluation.summary(outputs, curve, tau, 4, 10.0, 100.0)
  acc, flops = _brute_force(outputs, tau, 10.0, 100.0)
  assert results["top1"] == pytest.approx(acc) and results["mean_flops"] == pytest.approx(flops)
  assert sum(results["expert_load"]) == pytest.approx(1.0)
  assert results["expert_top1"][2] == pytest.approx(
      np.mean(outputs.expert_predictions[2] == outputs.labels))
  assert results["num_test_examples"] == 200


def test_the_report_names_the_results_file_and_every_plot():
  outputs = _outputs(seed=1)
  results = evaluation.summary(outputs, evaluation.sweep(outputs, 10.0, 100.0), 0.5, 4, 10.0, 100.0)
  text = report.format_results({**results, "threshold_rule": "fixed"}, "/w")
  assert f"results: /w/{run_dir.RESULTS}\n" in text
  assert f"plots:   /w/{run_dir.ACCURACY_VS_FLOPS_PLOT}," in text
  assert all(name in text for name in run_dir.PLOTS)
  # A single network's report: its own figures, no plots it did not draw.
  single = report.format_results(evaluation.single_network_figures(outputs, 100.0), "/w")
  top1 = (outputs.expert_predictions[0] == outputs.labels).mean()
  assert "Single network results" in single and f"{100 * top1:.2f}%" in single
  assert "plots:" not in single and f"results: /w/{run_dir.RESULTS}" in single


def test_portion_top1_compares_each_expert_with_the_others_on_its_portion():
  """Expert 0 is right exactly on the examples selected for it, expert 1 never is, and
  expert 2 (never selected) always is."""
  labels = np.array([0, 1, 2, 3, 4, 0])
  selected = np.array([0, 0, 1, 1, 0, 1])
  experts = np.stack([np.where(selected == 0, labels, (labels + 1) % 5), (labels + 1) % 5,
                      labels])  # [N=3, M]
  outputs = evaluation.EvalOutputs(labels=labels,
                                   confidence=np.zeros(6),
                                   delegator_prediction=labels,
                                   selected_expert=selected,
                                   expert_predictions=experts)
  figures = evaluation.portion_top1(outputs, 3)
  assert figures == {
      "expert_top1_own_portion": [1.0, 0.0, None],
      # Portion 0: expert 1 never right, expert 2 always: 0.5. Portion 1:
      # expert 0 wrong there, expert 2 right: 0.5. Portion 2 is empty.
      "other_experts_top1_on_portion": [0.5, 0.5, None],
      "expert_top1_off_portion": [0.0, 0.0, 1.0]
  }
  results = evaluation.summary(outputs, evaluation.sweep(outputs, 1.0, 2.0), 2.0, 3, 1.0, 2.0)
  assert {k: results[k] for k in figures} == figures


def test_the_no_exit_point_holds_in_float32_for_saturated_samples():
  """A confidence of exactly 1.0 (saturated softmax) must not exit at the no-exit tau."""
  outputs = _outputs()
  logits = jnp.array([[100.0, 0.0, 0.0]], jnp.float32)  # [1, K]
  assert float(routing.confidence(logits)[0]) == 1.0
  outputs.confidence[:3] = 1.0
  curve = evaluation.sweep(outputs, 10.0, 100.0)
  no_exit = curve.thresholds[-1]
  assert curve.exit_rate[-1] == 0
  assert not bool(routing.exit_mask(logits, no_exit)[0])  # As the jitted router decides.
  assert evaluation.summary(outputs, curve, no_exit, 4, 10.0, 100.0)["early_exit_rate"] == 0
  assert not bool(routing.exit_mask(logits, float("inf"))[0])  # eval.threshold=inf


def test_serving_capacity_takes_an_expected_exit_rate_of_one():
  assert routing.RoutingSpec("serving", 1.25, 1.0).capacity(64, 4) == 1
  assert routing.RoutingSpec("serving", 1.25, 0.5).capacity(64, 4) == 10


def test_oracles_on_a_hand_made_split():
  """Two experts, two classes, four images. Expert 0 knows class 0 (images 0, 1),
  expert 1 knows image 2 of class 1 and expert 0 image 3; the router picks expert 1
  for images 0 and 2 and expert 0 for 1 and 3."""
  outputs = evaluation.EvalOutputs(labels=np.array([0, 0, 1, 1]),
                                   confidence=np.zeros(4),
                                   delegator_prediction=np.zeros(4, int),
                                   selected_expert=np.array([1, 0, 1, 0]),
                                   expert_predictions=np.array([[0, 0, 0, 1], [1, 1, 1, 0]]))
  figures = evaluation.oracle_figures(outputs)
  assert figures["oracle_top1"] == 1.0  # Some expert is right on every image.
  # Class 0 to expert 0 (2 right); class 1: each expert is right once.
  assert figures["per_class_oracle_top1"] == 0.75
  # The router is right on images 1, 2 and 3, wrong on 0, where expert 0 was right.
  assert figures["chosen_wrong_given_some_right"] == 0.25
  assert figures["per_class_oracle_chosen_on"] == "test"
  # Chosen on a hold-out where expert 1 is the better on class 0 and class 1
  # is missing (it goes to expert 1, the better on the whole hold-out): class 0
  # to expert 1 gets 0 right on the test images, class 1 to expert 1 gets 1.
  holdout = evaluation.EvalOutputs(labels=np.array([0, 0]),
                                   confidence=np.zeros(2),
                                   delegator_prediction=np.zeros(2, int),
                                   selected_expert=np.zeros(2, int),
                                   expert_predictions=np.array([[1, 1], [0, 0]]))
  chosen = evaluation.oracle_figures(outputs, holdout)
  assert chosen["per_class_oracle_top1"] == 0.25
  assert chosen["per_class_oracle_chosen_on"] == "holdout"
  assert chosen["oracle_top1"] == figures["oracle_top1"]


def _router_one_step_off(outputs, tau, step):
  """The router's answers had it computed every confidence `step` higher."""
  exits = outputs.confidence + step >= tau
  return np.where(exits, outputs.delegator_prediction, outputs.routed_prediction)


def test_the_router_check_tolerates_a_step_of_the_compute_dtype():
  """In bfloat16, confidences near 1 are 2**-8 apart: two computations of one network
  may put an example a step either side of tau, and that is no disagreement."""
  outputs = _outputs(seed=2)
  tau = 0.9
  below = np.flatnonzero(outputs.delegator_prediction != outputs.routed_prediction)[:5]
  outputs.confidence[below] = tau - 0.003  # One bfloat16 step up reaches tau.
  step = float(jnp.finfo(jnp.bfloat16).eps) / 2  # bfloat16's step in [0.5, 1): 2**-8.
  routed = _router_one_step_off(outputs, tau, step)
  assert np.sum(routed != evaluation.answers_at(outputs, tau)) == 5
  assert evaluation.check_router_agrees(outputs, tau, routed, "bfloat16") == 0
  # float32 computations agree to far less than a bfloat16 step: there they differ.
  assert evaluation.check_router_agrees(outputs, tau, routed, "float32") == 5
  # A different answer away from tau is counted whatever the dtype.
  far = np.abs(outputs.confidence - tau) > 0.2
  wrong = np.flatnonzero(far & (outputs.delegator_prediction != outputs.routed_prediction))[0]
  routed[wrong] = outputs.delegator_prediction[wrong]  # An exit 0.2 or more below tau.
  assert evaluation.check_router_agrees(outputs, tau, routed, "bfloat16") == 1


class _Run:
  """What `evaluation.run.evaluate` reads of a trainer: a tiny CoE, 20 test images and
  no hold-out; each pass over the test split after the first gives other images, as a
  nondeterministic input pipeline would, so the router cannot agree with the outputs."""

  def __init__(self, workdir):
    self.config = tiny_config(num_experts=2)
    self.config.eval.threshold = 1.5  # Fixed: no hold-out to calibrate on. No exits.
    self.config.data.name = "cifar10"  # A TFDS name: no train_subset split either.
    self.workdir = str(workdir)
    self.info = data.DataInfo(num_classes=10,
                              class_names=[str(k) for k in range(10)],
                              num_train=0,
                              num_holdout=0,
                              num_test=20)
    self.model = CoE(self.config, num_classes=10)
    self.mesh = None
    self.flops = {"delegator_flops": 10, "expert_flops": 100}
    self.passes = 0
    variables = random_variables(self.model)
    self.state = types.SimpleNamespace(eval_variables=lambda: variables)

  def eval_batches(self, split="test"):
    assert split == "test"
    self.passes += 1
    mask = np.arange(24) < 20
    yield dict(image=np.asarray(random_images(self.passes, 24)),
               label=np.arange(24) % 10,
               mask=mask)


def test_a_router_disagreement_is_reported_after_results_json_is_written(tmp_path, caplog):
  run = _Run(tmp_path)
  with caplog.at_level(logging.WARNING, logger="absl"):
    results = evaluation_run.evaluate(run, run.state)
  assert run.passes == 2
  with open(os.path.join(tmp_path, run_dir.RESULTS)) as f:
    written = json.load(f)
  assert written["router_disagreements"] == results["router_disagreements"] > 0
  assert written["num_test_examples"] == 20
  warnings = [r.getMessage() for r in caplog.records if "disagree on" in r.getMessage()]
  assert len(warnings) == 1
  assert f"disagree on {written['router_disagreements']} of 20 " in warnings[0]

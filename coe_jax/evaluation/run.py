"""A trained run's evaluation: calibrate tau, route the test split, write the run's results.

    results = evaluation.run.evaluate(trainer, state)

The trainer (`coe_jax.training.train.Trainer`) calls it at the end of a run
(and every `train.eval_every_steps`, without files), as do the ablations. It
reads what `RunToEvaluate` lists of the trainer, so that evaluation, a layer
below training, imports none of it.
"""

import os
from typing import Any, Iterable, Optional, Protocol

import jax
import ml_collections
import numpy as np
from absl import logging

from coe_jax import answers, config_base, data, evaluation, flops, routing, run_dir, stages
from coe_jax.data.common import TRAIN_SUBSET_SIZE
from coe_jax.evaluation import plots
from coe_jax.models.coe import CoE


class RunToEvaluate(Protocol):
  """What `evaluate` reads of a run; `coe_jax.training.train.Trainer` has it all."""
  config: ml_collections.ConfigDict
  workdir: str
  info: data.DataInfo
  model: CoE
  mesh: Optional[jax.sharding.Mesh]
  flops: dict[str, int]  # `coe_jax.flops.count`: delegator_flops, expert_flops

  def eval_batches(self, split: str = "test") -> Iterable[dict[str, Any]]:
    """Global arrays of one padded pass over `split` (`data.common.EVAL_SPLITS`)."""


class EvaluatedState(Protocol):
  """A train state (`coe_jax.training.train_step.TrainState`): what it evaluates with."""

  def eval_variables(self) -> dict[str, Any]:
    """The variables to evaluate with: EMA parameters where trained with them."""


def evaluate(trainer: RunToEvaluate,
             state: EvaluatedState,
             *,
             write_files: bool = True,
             extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """Calibrates tau on the hold-out split, then evaluates on the test split.

  The test split never chooses anything: tau (unless `eval.threshold` fixes
  it) and the early-exit rate that sizes serving-mode buffers
  (`expected_exit_rate`) both come from the hold-out. Writes `results.json`,
  `early_exit_curve.json` and the plots unless `write_files` is False:
  accuracy vs FLOPs, expert load, the early-exit curve, and the routing (test
  images per expert, classes by expert).
  """
  config = trainer.config
  variables = state.eval_variables()
  f_d, f_e = trainer.flops["delegator_flops"], trainer.flops["expert_flops"]
  sizes = {
      "test": trainer.info.num_test,
      "holdout": trainer.info.num_holdout,
      "train_subset": min(TRAIN_SUBSET_SIZE, trainer.info.num_train)
  }

  def outputs_of(split):
    return evaluation.collect_outputs(trainer.model,
                                      variables,
                                      trainer.eval_batches(split),
                                      expert_loop=config.expert_loop,
                                      mesh=trainer.mesh,
                                      progress=evaluation.Progress(f"evaluating {split}",
                                                                   sizes[split]))

  # Top-1 on images trained on (unaugmented) beside the test split's: the
  # regime check, where the data set has the split.
  subset = outputs_of("train_subset") if data.has_train_subset(config) else None
  if stages.is_single_network(config):
    return _single_network(trainer, outputs_of("test"), subset, write_files, extra)
  holdout = outputs_of("holdout") if sizes["holdout"] else None
  if config.eval.threshold is not None:
    threshold, how, source = config.eval.threshold, "fixed", "config"
  else:
    # config_base.validate refuses to calibrate without a hold-out.
    threshold, how = evaluation.calibrate(evaluation.sweep(holdout, f_d,
                                                           f_e), config.eval.target_mean_flops,
                                          config.eval.threshold_rule, config.eval.within_points)
    source = "holdout"
  # Without a hold-out, serving-mode buffers are sized for every sample.
  expected_exit_rate = (float(np.mean(answers.exits(holdout.confidence, threshold)))
                        if holdout is not None else 0.0)
  test = outputs_of("test")
  test_curve = evaluation.sweep(test, f_d, f_e)
  results = evaluation.summary(test, test_curve, threshold, config.num_experts, f_d, f_e, holdout)
  results.update(threshold_rule=how, threshold_source=source, expected_exit_rate=expected_exit_rate)
  if subset is not None:
    results["train_subset_top1"] = float(
        np.mean(evaluation.answers_at(subset, threshold) == subset.labels))
  if source == "holdout" and config.eval.target_mean_flops is None:
    # Every rule's tau (chosen on the hold-out) and what it gives on the test
    # split, whichever rule the run used.
    holdout_curve = evaluation.sweep(holdout, f_d, f_e)
    results["threshold_rules"] = {
        rule:
            evaluation.figures_at(
                test,
                evaluation.calibrate(holdout_curve, None, rule, config.eval.within_points)[0], f_d,
                f_e) for rule in config_base.THRESHOLD_RULES
    }
  routed, routes = evaluation.routed_figures(
      trainer.model,
      variables,
      trainer.eval_batches("test"),
      threshold,
      routing.RoutingSpec.from_config(config, expected_exit_rate),
      mesh=trainer.mesh,
      examples_per_expert=plots.GRID_EXAMPLES if write_files else 0,
      progress=evaluation.Progress("routing test", sizes["test"]))
  # Serving mode may answer otherwise by design (overflows): None, not checked.
  disagreements = (evaluation.check_router_agrees(test, threshold, routes.prediction,
                                                  config.train.compute_dtype)
                   if config.routing.mode == "exact" else None)
  results.update(routed, router_disagreements=disagreements, **(extra or {}))
  results["mean_flops"] = answers.mean_flops(f_d, f_e, results["early_exit_rate"])
  results["train_flops"] = flops.run_train_flops(config, trainer.info.num_classes)
  if write_files and jax.process_index() == 0:
    workdir = trainer.workdir
    run_dir.write_json(os.path.join(workdir, run_dir.RESULTS), results)
    plots.accuracy_vs_flops(test_curve, results,
                            os.path.join(workdir, run_dir.ACCURACY_VS_FLOPS_PLOT))
    plots.expert_load(results, os.path.join(workdir, run_dir.EXPERT_LOAD_PLOT))
    plots.expert_portions(results, os.path.join(workdir, run_dir.EXPERT_PORTIONS_PLOT))
    plots.early_exit_curve(test_curve, results, os.path.join(workdir, run_dir.CURVE_PLOT))
    # The curve's numbers too, for comparisons across runs (coe_jax.ablate).
    run_dir.write_json(os.path.join(workdir, run_dir.CURVE), {
        k: v.tolist() for k, v in vars(test_curve).items()
    })
    _write_predictions(workdir, test, evaluation.answers_at(test, threshold))
    class_names = trainer.info.class_names
    plots.routing_grid(routes, class_names, os.path.join(workdir, run_dir.ROUTING_GRID_PLOT))
    plots.class_by_expert(routes, class_names, os.path.join(workdir, run_dir.CLASS_BY_EXPERT_PLOT))
  # A warning, after the files, rather than an error: a disagreement makes the
  # figures from the recorded outputs (the sweep, calibration, the oracles)
  # suspect, not the router's own top-1; an error would end the process after
  # a whole training run (or, at train.eval_every_steps, in the middle of one)
  # and keep nothing to look at. The count stays in results.json.
  if disagreements:
    logging.warning(
        "the exact-mode router and the recorded outputs disagree on %d of %d test examples "
        "at tau=%s (router_disagreements in %s): the figures computed from the recorded "
        "outputs are suspect, please report it", disagreements, results["num_test_examples"],
        threshold, run_dir.RESULTS)
  return results


def _write_predictions(workdir: str, test: evaluation.EvalOutputs, answers: np.ndarray) -> None:
  """Each test image's answers, for paired comparisons of runs (`coe_jax.ablate`)."""
  run_dir.write_predictions(os.path.join(workdir, run_dir.PREDICTIONS),
                            labels=test.labels,
                            coe=answers,
                            experts=test.expert_predictions)


def _single_network(trainer: RunToEvaluate, test: evaluation.EvalOutputs,
                    subset: Optional[evaluation.EvalOutputs], write_files: bool,
                    extra: Optional[dict[str, Any]]) -> dict[str, Any]:
  """`evaluate` for a single network: its own figures (no tau to calibrate, no
  routing), the training's cost, and its answers as CoE's in PREDICTIONS."""
  results = evaluation.single_network_figures(test, trainer.flops["expert_flops"])
  if subset is not None:
    results["train_subset_top1"] = float(np.mean(subset.expert_predictions[0] == subset.labels))
  results.update(train_flops=flops.run_train_flops(trainer.config, trainer.info.num_classes),
                 **(extra or {}))
  if write_files and jax.process_index() == 0:
    run_dir.write_json(os.path.join(trainer.workdir, run_dir.RESULTS), results)
    _write_predictions(trainer.workdir, test, test.expert_predictions[0])
  return results

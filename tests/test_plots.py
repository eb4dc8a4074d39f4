"""The routing figures: what the router counts, and that every plot is written."""

import numpy as np
import pytest

from coe_jax import data, evaluation
from coe_jax import routing as routing_lib
from coe_jax.evaluation import plots
from coe_jax.models.coe import CoE
from tests.helpers import random_variables
from tests.tiny import tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
  with open(path, "rb") as f:
    return f.read(8) == PNG_MAGIC


@pytest.fixture(scope="module")
def routed():
  """A random tiny CoE over the digits test split: recorded outputs and the router's routing."""
  config = tiny_config(num_experts=3)
  model = CoE(config, num_classes=10)
  variables = random_variables(model)
  outputs = evaluation.collect_outputs(model, variables, data.eval_batches(config))
  threshold = float(np.median(outputs.confidence))  # About half the examples exit.
  figures, routing = evaluation.routed_figures(model,
                                               variables,
                                               data.eval_batches(config),
                                               threshold,
                                               routing_lib.RoutingSpec.from_config(
                                                   config, expected_exit_rate=0.5),
                                               examples_per_expert=plots.GRID_EXAMPLES)
  images = np.concatenate([b["image"][b["mask"]] for b in data.eval_batches(config)])
  return outputs, threshold, figures, routing, images


def test_class_by_expert_equals_a_direct_count(routed):
  outputs, threshold, figures, routing, _ = routed
  exits = outputs.confidence >= threshold  # [M]
  expected = np.zeros((10, 3), np.int64)
  for label, expert in zip(outputs.labels[~exits], outputs.selected_expert[~exits]):
    expected[label, expert] += 1
  np.testing.assert_array_equal(routing.class_by_expert, expected)
  np.testing.assert_array_equal(routing.delegator_by_class,
                                np.bincount(outputs.labels[exits], minlength=10))
  assert 0 < exits.sum() < len(exits)
  np.testing.assert_allclose(figures["expert_load"], expected.sum(0) / expected.sum())


def test_examples_are_the_first_images_each_expert_answers(routed):
  outputs, threshold, _, routing, images = routed
  exits = outputs.confidence >= threshold
  for j in range(3):
    first = np.flatnonzero(~exits & (outputs.selected_expert == j))[:plots.GRID_EXAMPLES]
    np.testing.assert_array_equal(routing.examples[j], images[first])
    np.testing.assert_array_equal(routing.example_labels[j], outputs.labels[first])


def _curve_and_results():
  curve = evaluation.Sweep(thresholds=np.array([0.3, 0.6, 0.9, 1.0 + 1e-7]),
                           accuracy=np.array([0.7, 0.85, 0.9, 0.88]),
                           exit_rate=np.array([1.0, 0.7, 0.3, 0.0]),
                           mean_flops=np.array([1e5, 4e5, 8e5, 1.1e6]))
  results = {
      "threshold": 0.9,
      "early_exit_rate": 0.3,
      "mean_flops": 8e5,
      "top1": 0.9,
      "delegator_flops": 1e5,
      "delegator_top1": 0.7,
      "expert_flops": 1e6,
      "expert_top1": [0.85, 0.86],
      "expert_load": [0.5, 0.5]
  }
  return curve, results


def test_every_figure_is_written(routed, tmp_path):
  _, _, _, routing, _ = routed
  curve, results = _curve_and_results()
  names = [str(k) for k in range(10)]
  written = [
      plots.early_exit_curve(curve, results, str(tmp_path / "curve.png")),
      plots.routing_grid(routing, names, str(tmp_path / "grid.png")),
      plots.class_by_expert(routing, names, str(tmp_path / "classes.png")),
      plots.accuracy_vs_flops(curve, results, str(tmp_path / "acc.png")),
      plots.expert_load(results, str(tmp_path / "load.png")),
      plots.ablation([{
          "name": "coe",
          "mean_flops": 8e5,
          "top1": [0.9, 0.92]
      }, {
          "name": "single",
          "mean_flops": 7.5e5,
          "top1": [0.88]
      }],
                     str(tmp_path / "ablation.png"),
                     curve={
                         k: v.tolist() for k, v in vars(curve).items()
                     }),
  ]
  assert all(_is_png(path) for path in written)


def test_many_classes_and_an_idle_expert_still_plot(tmp_path):
  rng = np.random.default_rng(0)
  num_classes = plots.LABELLED_CLASSES + 20  # Unlabelled, rows sorted by main expert.
  counts = rng.integers(0, 5, (num_classes, 2))
  counts[:, 1] = 0  # Expert 1 answers nothing: an empty row in the grid.
  routing = evaluation.Routing(class_by_expert=counts,
                               delegator_by_class=rng.integers(0, 3, num_classes),
                               examples=[
                                   rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8),
                                   np.zeros((0, 8, 8, 1), np.uint8)
                               ],
                               example_labels=[np.array([0, 5, 7]),
                                               np.zeros(0, np.int64)],
                               prediction=np.zeros(0, np.int64))
  names = [f"class {k}" for k in range(num_classes)]
  assert _is_png(plots.class_by_expert(routing, names, str(tmp_path / "classes.png")))
  assert _is_png(plots.routing_grid(routing, names, str(tmp_path / "grid.png")))

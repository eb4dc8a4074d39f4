"""Evaluation: per-sample outputs, the threshold sweep, calibration and results.

`plots` draws the figures of a run and `report` prints its table; both read
what this module computes.

Axis letters: T evaluated examples (a whole evaluation split), B batch, N experts,
K classes, H/W/C image height, width and channels, A example images per expert
(docs/method.md, section 2).

One pass over an evaluation split records, per example, the delegator's
confidence and answer, its expert choice and every expert's answer. Because
routing is exact here (every expert has room for every sample), the CoE
answer at any threshold tau follows from these arrays: that is how tau is
swept and calibrated without re-running the networks. The reported figures
then come from the jitted router itself at the chosen tau (`coe_jax.routing`).
"""

import dataclasses
import functools
import time
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from coe_jax import answers, routing
from coe_jax.models.coe import CoE
from coe_jax.parallel import expert_parallel
from coe_jax.parallel import mesh as mesh_lib

# Confidences this close to tau may fall on either side of it in two
# computations of the same float32 network that sum floats in another order.
NEAR_THRESHOLD = 1e-5
# A network computed in a narrower dtype (bfloat16) rounds its logits to that
# dtype, and two computations may round a logit z to neighbouring values, a
# step of up to |z| eps apart. The confidence p moves by at most p (1 - p) <= 1/4
# times the change in the margin between two logits, so a step in each of the
# two moves it by up to |z| eps / 2: this many eps covers one step in logits up
# to |z| = 16, or a few steps (rounded in earlier layers too) in smaller ones.
NEAR_THRESHOLD_EPS = 8


@dataclasses.dataclass
class EvalOutputs:
  """What one pass over a split records; all arrays are over the T real examples."""
  labels: np.ndarray  # [T] int
  confidence: np.ndarray  # [T] delegator's max probability
  delegator_prediction: np.ndarray  # [T] int
  selected_expert: np.ndarray  # [T] int, argmax of the selection logits
  expert_predictions: np.ndarray  # [N, T] int, every expert on every example

  @property
  def routed_prediction(self) -> np.ndarray:
    """[T]: each example's answer from its selected expert (no early exit)."""
    return np.take_along_axis(self.expert_predictions, self.selected_expert[None], axis=0)[0]


class Progress:
  """Logs how far a long pass has got, at most every `every_seconds`, and when it ends."""

  def __init__(self, what: str, total: Optional[int], every_seconds: float = 10.0):
    self._what, self._total, self._every = what, total, every_seconds
    self._start = self._last = time.monotonic()
    self._done = 0

  def update(self, count: int) -> None:
    self._done += count
    now = time.monotonic()
    if now - self._last >= self._every:
      self._last = now
      elapsed = now - self._start
      of = f"/{self._total}" if self._total else ""
      eta = (f", about {(self._total - self._done) * elapsed / self._done:.0f} s left"
             if self._total and self._done else "")
      logging.info("%s: %d%s examples in %.0f s%s", self._what, self._done, of, elapsed, eta)

  def finish(self) -> None:
    logging.info("%s: %d examples in %.1f s", self._what, self._done,
                 time.monotonic() - self._start)


def outputs_program(model: CoE, expert_loop: str, mesh: Optional[jax.sharding.Mesh]):
  """The jitted pass `collect_outputs` runs on each batch: (variables, batch) -> a dict of
  per-example outputs, replicated on every device (the planner compiles it too)."""
  out_sharding = mesh_lib.replicated(mesh) if mesh is not None else None

  @functools.partial(jax.jit, out_shardings=out_sharding)
  def forward(variables, batch):
    class_logits, selection_logits = model.delegator(variables, batch["image"])  # [B, K], [B, N]
    expert_logits = expert_parallel.run_experts(model,
                                                variables,
                                                batch["image"],
                                                shared_input=True,
                                                expert_loop=expert_loop,
                                                mesh=mesh)  # [N, B, K]
    return dict(label=batch["label"],
                mask=batch["mask"],
                confidence=routing.confidence(class_logits),
                delegator=jnp.argmax(class_logits, -1),
                selected=jnp.argmax(selection_logits, -1),
                experts=jnp.argmax(expert_logits, -1))

  return forward


def collect_outputs(model: CoE,
                    variables: Any,
                    batches: Iterable[dict[str, Any]],
                    *,
                    expert_loop: str = "unroll",
                    mesh: Optional[jax.sharding.Mesh] = None,
                    progress: Optional[Progress] = None) -> EvalOutputs:
  """Runs the delegator and every expert over `batches` (masked padding dropped).

  `batches` hold arrays ready for the device (global arrays under `mesh`,
  split over its data axis). The experts run as the router runs them
  (`expert_parallel.run_experts`), and every process reads the whole outputs.
  """
  forward = outputs_program(model, expert_loop, mesh)
  parts = []
  for batch in batches:
    out = jax.device_get(forward(variables, batch))
    mask = np.asarray(out["mask"], bool)
    parts.append((out["label"][mask], out["confidence"][mask], out["delegator"][mask],
                  out["selected"][mask], out["experts"][:, mask]))
    if progress is not None:
      progress.update(int(mask.sum()))
  if progress is not None:
    progress.finish()
  labels, conf, delegator, selected, experts = (np.concatenate(p, axis=-1) for p in zip(*parts))
  # Confidences stay float32 values (exactly), as the router compares them with tau.
  return EvalOutputs(labels.astype(np.int64), conf.astype(np.float64), delegator, selected, experts)


@dataclasses.dataclass
class Sweep:
  """Accuracy and cost of CoE as tau sweeps over every distinct operating point."""
  thresholds: np.ndarray  # ascending, one per operating point (at most T + 1)
  accuracy: np.ndarray  # one per operating point, as `thresholds`
  exit_rate: np.ndarray  # one per operating point
  mean_flops: np.ndarray  # one per operating point


def sweep(outputs: EvalOutputs, delegator_flops: float, expert_flops: float) -> Sweep:
  """Every distinct tau: the examples' confidences, plus one above them all (no exits).

  The no-exit point is the next float32 above the largest confidence: the
  router compares float32 confidences with tau, and the next float64 would
  round back to the largest confidence there, letting its samples exit.
  """
  delegator_correct = outputs.delegator_prediction == outputs.labels  # [T]
  routed_correct = outputs.routed_prediction == outputs.labels  # [T]
  order = np.argsort(-outputs.confidence, kind="stable")
  conf = outputs.confidence[order]
  # With k exits (the k most confident examples), accuracy is the delegator's
  # on those plus the experts' on the rest.
  exit_correct = np.concatenate([[0], np.cumsum(delegator_correct[order])])
  routed_rest = np.concatenate([[0], np.cumsum(routed_correct[order][::-1])])[::-1]
  m = len(conf)
  # tau = conf[k-1] lets exactly the first k exit only where conf[k-1] > conf[k].
  distinct = np.concatenate([conf[:-1] > conf[1:], [True]])
  ks = np.concatenate([[0], np.nonzero(distinct)[0] + 1])  # exits per operating point
  no_exit = np.nextafter(np.float32(conf[0]), np.float32(np.inf))
  thresholds = np.concatenate([[float(no_exit)], conf[ks[1:] - 1]])
  accuracy = (exit_correct[ks] + routed_rest[ks]) / m
  exit_rate = ks / m
  mean_flops = answers.mean_flops(delegator_flops, expert_flops, exit_rate)
  ascending = np.argsort(thresholds, kind="stable")
  return Sweep(thresholds[ascending], accuracy[ascending], exit_rate[ascending],
               mean_flops[ascending])


def calibrate(curve: Sweep,
              target_mean_flops: Optional[float],
              rule: str = "max_accuracy",
              within_points: float = 0.1) -> tuple[float, str]:
  """(tau, how it was chosen).

  With a FLOPs target: the most accurate tau whose mean FLOPs meet it (the
  cheapest tau if none does). Without, by `rule`: "max_accuracy", the most
  accurate tau, ties going to the cheaper one; "within", the cheapest tau
  whose accuracy is within `within_points` top-1 points of the most accurate.
  """
  if target_mean_flops is not None:
    feasible = curve.mean_flops <= target_mean_flops
    if not feasible.any():
      logging.warning("no threshold reaches eval.target_mean_flops=%s; using the cheapest",
                      target_mean_flops)
      return float(curve.thresholds[np.argmin(curve.mean_flops)]), "cheapest"
    index = np.flatnonzero(feasible)[np.argmax(np.where(feasible, curve.accuracy, -1)[feasible])]
    return float(curve.thresholds[index]), "target_mean_flops"
  # A tolerance of float rounding, so that 0 points keeps exactly the best taus.
  margin = within_points / 100 if rule == "within" else 0.0
  best = np.flatnonzero(curve.accuracy >= curve.accuracy.max() - margin - 1e-12)
  index = best[np.argmin(curve.mean_flops[best])]
  return float(curve.thresholds[index]), rule


def figures_at(outputs: EvalOutputs, threshold: float, delegator_flops: float,
               expert_flops: float) -> dict[str, float]:
  """tau, top-1, the early-exit rate and mean FLOPs on `outputs` at `threshold`."""
  exit_rate = float(np.mean(answers.exits(outputs.confidence, threshold)))
  return dict(threshold=float(threshold),
              top1=float(np.mean(answers_at(outputs, threshold) == outputs.labels)),
              early_exit_rate=exit_rate,
              mean_flops=float(answers.mean_flops(delegator_flops, expert_flops, exit_rate)))


def answers_at(outputs: EvalOutputs, threshold: float) -> np.ndarray:
  """[T]: CoE's answers at `threshold` in exact mode, from the recorded outputs."""
  exits = answers.exits(outputs.confidence, threshold)
  return np.where(exits, outputs.delegator_prediction, outputs.routed_prediction)


def near_threshold(compute_dtype: Any = "float32") -> float:
  """How close to tau a confidence may decide otherwise in two computations of
  the same network in `compute_dtype` (`train.compute_dtype`)."""
  return max(NEAR_THRESHOLD, NEAR_THRESHOLD_EPS * float(jnp.finfo(compute_dtype).eps))


def check_router_agrees(outputs: EvalOutputs,
                        threshold: float,
                        routed: np.ndarray,
                        compute_dtype: Any = "float32") -> int:
  """The number of examples on which the exact-mode router and the recorded
  outputs give different answers; 0 when they agree.

  Both compute the same networks on the same examples, in other programs:
  float sums in another order, and in a narrow `compute_dtype` other
  roundings, may move a confidence by a few of that dtype's steps, so examples
  within `near_threshold(compute_dtype)` of tau may decide otherwise and are
  not counted. Any other difference is a bug, and every figure computed from
  the outputs is suspect.
  """
  near = np.abs(outputs.confidence - threshold) <= near_threshold(compute_dtype)
  return int(np.sum((answers_at(outputs, threshold) != routed) & ~near))


def summary(outputs: EvalOutputs,
            curve: Sweep,
            threshold: float,
            num_experts: int,
            delegator_flops: float,
            expert_flops: float,
            holdout: Optional[EvalOutputs] = None) -> dict[str, Any]:
  """The figures of `results.json` at `threshold`, from the recorded outputs
  (`holdout`'s, where given, choose the per-class oracle's experts)."""
  exits = answers.exits(outputs.confidence, threshold)
  prediction = answers_at(outputs, threshold)
  routed = outputs.selected_expert[~exits]
  load = np.bincount(routed, minlength=num_experts) / max(len(routed), 1)
  exit_rate = float(exits.mean())
  return {
      "top1": float((prediction == outputs.labels).mean()),
      "top1_no_early_exit": float((outputs.routed_prediction == outputs.labels).mean()),
      "delegator_top1": float((outputs.delegator_prediction == outputs.labels).mean()),
      "expert_top1": [float(x) for x in (outputs.expert_predictions == outputs.labels).mean(1)],
      **oracle_figures(outputs, holdout),
      **portion_top1(outputs, num_experts),
      "early_exit_rate": exit_rate,
      "threshold": float(threshold),
      "mean_flops": float(answers.mean_flops(delegator_flops, expert_flops, exit_rate)),
      "delegator_flops": int(delegator_flops),
      "expert_flops": int(expert_flops),
      "expert_load": [float(x) for x in load],
      "num_test_examples": int(len(outputs.labels)),
  }


def single_network_figures(outputs: EvalOutputs, expert_flops: float) -> dict[str, Any]:
  """The figures of `results.json` for a single network (`stages.is_single_network`):
  its own answers and cost; no tau, exits or routing (its one "expert" answers
  every image)."""
  top1 = float((outputs.expert_predictions[0] == outputs.labels).mean())
  return {
      "top1": top1,
      "top1_no_early_exit": top1,
      "expert_top1": [top1],
      "mean_flops": float(expert_flops),
      "expert_flops": int(expert_flops),
      "num_test_examples": int(len(outputs.labels)),
  }


def oracle_figures(outputs: EvalOutputs, chooser: Optional[EvalOutputs] = None) -> dict[str, Any]:
  """How far routing is from what the experts allow (no early exit):

  - `oracle_top1`: some expert is right. No router reaches it: it may pick a
    different expert for two images it cannot tell apart.
  - `per_class_oracle_top1`: each class sent to one expert, the best on that
    class in `chooser` (the hold-out; a class it lacks goes to the expert best
    on all of it), scored on `outputs`; a router that knew the class could
    reach it. Without `chooser` the experts are chosen on `outputs` itself,
    an upper bound: `per_class_oracle_chosen_on` says which ("holdout" or
    "test").
  - `chosen_wrong_given_some_right`: P(the selected expert is wrong | some
    expert is right), the share of reachable answers the router misses.
  """
  correct = outputs.expert_predictions == outputs.labels  # [N, T]
  some_right = correct.any(0)  # [T]
  chosen_right = outputs.routed_prediction == outputs.labels  # [T]
  chosen_on = chooser if chooser is not None else outputs
  chooser_correct = chosen_on.expert_predictions == chosen_on.labels  # [N, T']
  overall = int(np.argmax(chooser_correct.sum(1)))
  hits = 0
  for k in np.unique(outputs.labels):
    of_k = chosen_on.labels == k
    expert = int(np.argmax(chooser_correct[:, of_k].sum(1))) if of_k.any() else overall
    hits += int(correct[expert, outputs.labels == k].sum())
  missed = (some_right & ~chosen_right).sum() / some_right.sum() if some_right.any() else None
  return {
      "oracle_top1": float(some_right.mean()),
      "per_class_oracle_top1": hits / len(outputs.labels),
      "per_class_oracle_chosen_on": "holdout" if chooser is not None else "test",
      "chosen_wrong_given_some_right": None if missed is None else float(missed),
  }


def portion_top1(outputs: EvalOutputs, num_experts: int) -> dict[str, list[Optional[float]]]:
  """How far the experts specialise, per expert j and its portion (the examples the
  delegator selects j for, exits or not); None where a part is empty:

  - `expert_top1_own_portion`: expert j on its portion;
  - `other_experts_top1_on_portion`: the other experts on j's portion, on average:
    below the first when the delegator picks the expert that knows those examples;
  - `expert_top1_off_portion`: expert j on the other examples (their classes may
    be easier or harder, so this compares less directly).
  """
  correct = outputs.expert_predictions == outputs.labels  # [N, T]
  mean = lambda hits: float(hits.mean()) if hits.size else None
  figures = {
      "expert_top1_own_portion": [],
      "other_experts_top1_on_portion": [],
      "expert_top1_off_portion": []
  }
  others = lambda j: np.arange(num_experts) != j  # [N]
  for j in range(num_experts):
    mine = outputs.selected_expert == j  # [T]
    figures["expert_top1_own_portion"].append(mean(correct[j, mine]))
    figures["other_experts_top1_on_portion"].append(
        mean(correct[others(j)][:, mine]) if num_experts > 1 else None)
    figures["expert_top1_off_portion"].append(mean(correct[j, ~mine]))
  return figures


@dataclasses.dataclass
class Routing:
  """Where the jitted router sent the test examples at one threshold, for the figures."""
  class_by_expert: np.ndarray  # [K, N] int: examples of class k that expert j answered
  delegator_by_class: np.ndarray  # [K] int: examples of class k the delegator answered
  examples: list[np.ndarray]  # N arrays [A_j, H, W, C] uint8: expert j's first images
  example_labels: list[np.ndarray]  # N arrays [A_j] int: their classes
  prediction: np.ndarray  # [T] int: the router's answers, in example order


def routed_figures(model: CoE,
                   variables: Any,
                   batches: Iterable[dict[str, Any]],
                   threshold: float,
                   spec: routing.RoutingSpec,
                   *,
                   mesh: Optional[jax.sharding.Mesh] = None,
                   examples_per_expert: int = 0,
                   progress: Optional[Progress] = None) -> tuple[dict[str, Any], Routing]:
  """Top-1, exits and loads of the jitted router at `threshold` over `batches`, and its routing.

  Routing runs as in serving, with `spec`'s mode and overflow policy; in
  exact mode it must agree with `summary` on the same split. The batches'
  padding (`mask` False) takes no expert's slot, so in serving mode it cannot
  push a real example to another expert. The returned
  `Routing` counts classes by the expert (or delegator) that answered them
  and keeps up to `examples_per_expert` images per expert, so the figures
  need no second pass and little memory.
  """
  num_groups = mesh.shape[routing.DATA_AXIS] if mesh is not None else 1
  num_experts, num_classes = model.num_experts, model.num_classes
  correct = exits = total = to_delegator = 0
  class_by_expert = np.zeros((num_classes, num_experts), np.int64)  # [K, N]
  delegator_by_class = np.zeros(num_classes, np.int64)  # [K]
  examples = [[] for _ in range(num_experts)]
  example_labels = [[] for _ in range(num_experts)]
  predictions = []
  for batch in batches:
    out = routing.route_and_predict(model,
                                    variables,
                                    batch["image"],
                                    threshold,
                                    valid=batch["mask"],
                                    spec=spec,
                                    num_groups=num_groups,
                                    mesh=mesh)
    # The whole global batch on every process: on a pod, each process holds
    # only its own share of these arrays.
    out = multihost_utils.process_allgather(
        {
            "pred": jnp.argmax(out["logits"], -1),
            "early_exit": out["early_exit"],
            "expert": out["expert"],
            "label": batch["label"],
            "mask": batch["mask"]
        },
        tiled=True)
    mask = np.asarray(out["mask"], bool)
    predictions.append(out["pred"][mask])
    if progress is not None:
      progress.update(int(mask.sum()))
    correct += int(np.sum((out["pred"] == out["label"]) & mask))
    exits += int(np.sum(out["early_exit"] & mask))
    total += int(mask.sum())
    expert, label = out["expert"][mask], out["label"][mask]
    by_expert = expert >= 0
    np.add.at(class_by_expert, (label[by_expert], expert[by_expert]), 1)
    delegator_by_class += np.bincount(label[~by_expert], minlength=num_classes)
    to_delegator += int(np.sum(mask & ~out["early_exit"] & (out["expert"] < 0)))
    wanted = [examples_per_expert - sum(len(x) for x in kept) for kept in examples]
    if max(wanted) > 0:
      # Images are fetched from the device only while some expert still lacks examples;
      # `images` holds the batch's real rows alone.
      images = multihost_utils.process_allgather(batch["image"], tiled=True)[mask]  # [B, H, W, C]
      for j in range(num_experts):
        rows = np.flatnonzero(expert == j)[:wanted[j]]
        examples[j].append(images[rows])
        example_labels[j].append(label[rows])
  if progress is not None:
    progress.finish()
  load = class_by_expert.sum(0)  # [N]
  routed = max(int(load.sum()), 1)
  figures = {
      "top1": correct / total,
      "early_exit_rate": exits / total,
      "expert_load": [float(x) for x in load / routed],
      "routing_mode": spec.mode,
      "overflow_to_delegator": to_delegator
  }
  image_shape = model.image_shape
  stacked = [np.concatenate(x) if x else np.zeros((0, *image_shape), np.uint8) for x in examples]
  labels = [
      np.concatenate(x).astype(np.int64) if x else np.zeros(0, np.int64) for x in example_labels
  ]
  return figures, Routing(class_by_expert, delegator_by_class, stacked, labels,
                          np.concatenate(predictions))

"""The training stages: what each one trains, and which steps it runs.

The one owner of a stage's meaning. The objective, the train step, the FLOPs
count, the learning-rate schedule and the trainer read a `Stage`'s fields;
none of them compares stage names. docs/method.md, section 4, gives the
reading these records encode:

- `warmup`: experts and delegator are plain classifiers. Every expert weighs
  every sample by 1, or only expert 0 does with `train.generalist_warmup`
  (the trainer then copies it into every expert where `coadapt` starts). The
  selection head learns LGM's labels only with `loss.selection_in_warmup`.
- `coadapt`: WGM weighs the experts' losses; LGM and VCM train the selection.
- `delegator`: the experts are frozen (forward only); the delegator trains.

The delegator's class head trains in every stage.
"""

import dataclasses
from typing import Optional

import ml_collections

from coe_jax.config_base import STAGES
from coe_jax.errors import require

# How a stage weighs expert j's loss on sample i.
ALL_SAMPLES = "all_samples"  # 1 for every pair.
GENERALIST = "generalist"  # 1 for expert 0, 0 for the others.
WGM = "wgm"  # WGM's weights from the balanced transport of the selection.
FROZEN = "frozen"  # No expert loss: the experts do not train.


@dataclasses.dataclass(frozen=True)
class Stage:
  """What one stage trains.

  name: one of `config_base.STAGES`.
  trains_experts: the experts get gradients and updates (False: frozen, run
    forward only, their variables held).
  trains_selection: the selection head learns LGM's labels (VCM-weighted) and
    distillation applies; False: the selection logits are not read at all.
  expert_weights: ALL_SAMPLES, GENERALIST, WGM or FROZEN.
  """
  name: str
  trains_experts: bool
  trains_selection: bool
  expert_weights: str

  @property
  def uses_wgm(self) -> bool:
    """Whether the experts' weights come from WGM's transport (and its metrics exist)."""
    return self.expert_weights == WGM

  @property
  def expert_passes(self) -> int:
    """Forward-pass equivalents per image per expert: 3 to train, 1 when frozen."""
    return 3 if self.trains_experts else 1

  @classmethod
  def named(cls, name: str, config: ml_collections.ConfigDict) -> "Stage":
    """The record of stage `name` under `config` (whether or not the run schedules it)."""
    require(name in STAGES, "stage", name, f"expected one of {', '.join(STAGES)}")
    if name == "warmup":
      generalist = bool(config.train.generalist_warmup)
      return cls(name,
                 trains_experts=True,
                 trains_selection=bool(config.loss.selection_in_warmup),
                 expert_weights=GENERALIST if generalist else ALL_SAMPLES)
    if name == "coadapt":
      return cls(name, trains_experts=True, trains_selection=True, expert_weights=WGM)
    return cls(name, trains_experts=False, trains_selection=True, expert_weights=FROZEN)


@dataclasses.dataclass(frozen=True)
class Span:
  """A scheduled stage: steps [start, end)."""
  stage: Stage
  start: int
  end: int


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """The run's non-empty stages in training order, tiling [0, train.num_steps)."""
  spans: tuple[Span, ...]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "StagePlan":
    """Stage ends are the cumulative fractions of `train.num_steps`, rounded, and
    the last stage with a positive fraction ends at `num_steps`, so the stages
    tile the run exactly whatever the float rounding of the fractions."""
    num_steps = config.train.num_steps
    fractions = [config.train.stages.get(name, 0.0) for name in STAGES]  # Sum to 1 (validated).
    last = max(i for i, fraction in enumerate(fractions) if fraction > 0)
    spans, start, cumulative = [], 0, 0.0
    for i, (name, fraction) in enumerate(zip(STAGES[:last + 1], fractions)):
      cumulative += fraction
      end = num_steps if i == last else min(round(cumulative * num_steps), num_steps)
      if end > start:
        spans.append(Span(Stage.named(name, config), start, end))
        start = end
    return cls(tuple(spans))

  def at(self, step: int) -> Stage:
    """The stage that trains step `step` (0-based); the last stage from num_steps on."""
    require(step >= 0, "step", step, "expected a non-negative step")
    for span in self.spans:
      if step < span.end:
        return span.stage
    return self.spans[-1].stage

  def start_of(self, name: str) -> Optional[int]:
    """The first step of stage `name`; None when the run does not schedule it."""
    return next((span.start for span in self.spans if span.stage.name == name), None)

  def generalist_copy_step(self) -> Optional[int]:
    """The first step after a generalist warm-up, where every expert becomes a copy
    of expert 0; None without one. A run resumed there copies too: checkpoints
    hold the state before the step."""
    for before, after in zip(self.spans, self.spans[1:]):
      if before.stage.expert_weights == GENERALIST:
        return after.start
    return None

  def boundaries(self) -> tuple[tuple[str, int, int], ...]:
    """`(name, start, end)` of each scheduled stage."""
    return tuple((span.stage.name, span.start, span.end) for span in self.spans)


def is_single_network(config: ml_collections.ConfigDict) -> bool:
  """One expert trained as a plain classifier (the ablations' sized variants): it
  answers alone, and the delegator trained beside it is no part of it."""
  stages = {name: fraction for name, fraction in config.train.stages.items() if fraction > 0}
  return config.num_experts == 1 and set(stages) == {"warmup"}

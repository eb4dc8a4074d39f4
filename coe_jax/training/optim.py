"""The optimizer: learning-rate schedules, update rule and weight decay from the config.

With `train.schedule=continuous`, the run has one schedule, as a single
network's training does: a linear warm-up of `train.warmup_steps` to
`train.learning_rate`, then one cosine decay to 0 at `train.num_steps`,
whatever the stages.

With `per_stage` (the default), each stage of `train.stages` has its own schedule, over
its own steps: a linear warm-up from 0 to its peak, then cosine decay to 0 at the
stage's end. The peak is `train.stage_schedules.<stage>.learning_rate`, else
`train.learning_rate`; the warm-up `train.stage_schedules.<stage>.warmup_steps`, else
`train.warmup_steps`, at most half the stage. So the last stage (the delegator's, with
frozen experts) trains at a rate of its own choosing, not at the tail of one cosine over
the whole run.

Weight decay applies to kernels only (not to biases, BatchNorm scales, PWLU
bounds, heights and slopes, or CondConv biases), as in mobile-network training.
"""

import jax
import ml_collections
import optax

from coe_jax import config_base
from coe_jax.stages import StagePlan

# The keys the optimizer reads.
_KEYS = ("train.optimizer", "train.schedule", "train.num_steps", "train.learning_rate",
         "train.warmup_steps", "train.weight_decay", "train.momentum",
         *(f"train.stage_schedules.{stage}.{key}" for stage in config_base.STAGES
           for key in ("learning_rate", "warmup_steps")))


def stage_schedule(config: ml_collections.ConfigDict, stage: str) -> tuple[float, int]:
  """(peak learning rate, warm-up steps) of `stage`, its own settings over the defaults."""
  train = config.train
  own = train.stage_schedules[stage]
  peak = own.learning_rate if own.learning_rate is not None else train.learning_rate
  warmup = own.warmup_steps if own.warmup_steps is not None else train.warmup_steps
  return float(peak), warmup


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate at every step of the run: one schedule, or the stages' joined."""
  if config.train.schedule == "continuous":
    train = config.train
    return optax.warmup_cosine_decay_schedule(init_value=0.0,
                                              peak_value=float(train.learning_rate),
                                              warmup_steps=min(train.warmup_steps,
                                                               train.num_steps // 2),
                                              decay_steps=train.num_steps,
                                              end_value=0.0)
  schedules, starts = [], []
  for stage, start, end in StagePlan.from_config(config).boundaries():
    peak, warmup = stage_schedule(config, stage)
    length = end - start
    schedules.append(
        optax.warmup_cosine_decay_schedule(init_value=0.0,
                                           peak_value=peak,
                                           warmup_steps=min(warmup, length // 2),
                                           decay_steps=length,
                                           end_value=0.0))
    starts.append(start)
  # join_schedules hands each schedule the steps since its boundary.
  return optax.join_schedules(schedules, boundaries=starts[1:])


def _decay_mask(params):
  """True for convolution and dense kernels, False for every other parameter.

  By name, not by rank: per-channel PWLU heights [C, n+1] and CondConv biases
  [E, C] have two axes but are not kernels.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optax optimizer named by `train.optimizer`, with the schedule and weight decay."""
  config_base.check(config, *_KEYS)  # Also built from hand-made configs (notebooks, tools).
  train = config.train
  name = train.optimizer
  schedule = learning_rate_schedule(config)
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=train.weight_decay, mask=_decay_mask)
  if name == "rmsprop":
    # TensorFlow-style RMSProp (eps inside the square root, decay 0.9) as used
    # for MobileNetV3 and EfficientNet.
    rule = optax.rmsprop(schedule, decay=0.9, eps=1e-3, momentum=train.momentum, eps_in_sqrt=True)
  else:  # sgd
    rule = optax.sgd(schedule, momentum=train.momentum, nesterov=True)
  return optax.chain(optax.add_decayed_weights(train.weight_decay, mask=_decay_mask), rule)

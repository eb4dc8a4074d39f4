"""The optimizer: learning-rate schedule, update rule and weight decay from the config.

Warm-up is linear from 0 to `train.learning_rate` over `train.warmup_steps`,
then cosine decay to 0 at `train.num_steps`. Weight decay applies to
kernels only (not to biases, BatchNorm scales or PWLU/CondConv small
parameters), as in mobile-network training.
"""

import jax
import ml_collections
import optax

from coe_jax.errors import require

OPTIMIZERS = ("rmsprop", "sgd", "adamw")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  train = config.train
  require(train.learning_rate > 0, "train.learning_rate", train.learning_rate,
          "expected a positive learning rate")
  require(0 <= train.warmup_steps < train.num_steps, "train.warmup_steps", train.warmup_steps,
          f"expected at least 0 and below train.num_steps={train.num_steps}")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
      decay_steps=train.num_steps, end_value=0.0)


def _decay_mask(params):
  """True for kernels (2+ axes of their own), False for biases, scales and the like.

  Leaves under "experts" carry a leading expert axis that is not their own.
  """
  def is_kernel(path, p):
    stacked = any(getattr(k, "key", None) == "experts" for k in path)
    return p.ndim - int(stacked) > 1
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optax optimizer named by `train.optimizer`, with the schedule and weight decay."""
  train = config.train
  name = train.optimizer
  require(name in OPTIMIZERS, "train.optimizer", name, f"expected one of {', '.join(OPTIMIZERS)}")
  require(train.weight_decay >= 0, "train.weight_decay", train.weight_decay,
          "expected a non-negative weight decay")
  schedule = learning_rate_schedule(config)
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=train.weight_decay, mask=_decay_mask)
  if name == "rmsprop":
    # TensorFlow-style RMSProp (eps inside the square root, decay 0.9) as used
    # for MobileNetV3 and EfficientNet.
    rule = optax.rmsprop(schedule, decay=0.9, eps=1e-3, momentum=train.momentum,
                         eps_in_sqrt=True)
  else:
    rule = optax.sgd(schedule, momentum=train.momentum, nesterov=True)
  return optax.chain(optax.add_decayed_weights(train.weight_decay, mask=_decay_mask), rule)

"""Recipes the configs share: ImageNet's training recipe and the MobileNetV3 networks.

    from coe_jax import config_base as common
    from coe_jax import recipes

    c = common.base_config()
    recipes.imagenet_recipe(c)
    c.delegator = recipes.small_delegator(width_multiplier=0.5)

They live in the package, not beside the config files (configs/), because
config files are loaded by path (`--config=configs/NAME.py`, from any
directory, in tests and notebooks): a `configs` folder is importable only
from the repository root, while `coe_jax` is wherever it is installed. The
schema (`config_base`) holds the keys and their rules; this module only
fills them in.
"""

from typing import Any

import ml_collections

from coe_jax import config_base


def mobilenet_v3_large_stages(se_ratio: float = 0.25) -> list[dict[str, Any]]:
  """MobileNetV3-Large's stages (Howard et al. 2019), one expansion ratio per stage."""
  return [
      config_base.stage(16, 1, 3, 1, 1, se_ratio=0.0, activation="relu"),
      config_base.stage(24, 2, 3, 4, 2, se_ratio=0.0, activation="relu"),
      config_base.stage(40, 3, 5, 3, 2, se_ratio=se_ratio, activation="relu"),
      config_base.stage(80, 4, 3, 2.5, 2, se_ratio=0.0),
      config_base.stage(112, 2, 3, 6, 1, se_ratio=se_ratio),
      config_base.stage(160, 3, 5, 6, 2, se_ratio=se_ratio),
  ]


def small_delegator(width_multiplier: float) -> ml_collections.ConfigDict:
  """A MobileNetV3-Small-like delegator for 224 px inputs."""
  net = config_base.network(stem_features=16,
                            head_features=576,
                            classifier_features=1024,
                            stages=[
                                config_base.stage(16, 1, 3, 1, 2, activation="relu"),
                                config_base.stage(24, 2, 3, 4, 2, se_ratio=0.0, activation="relu"),
                                config_base.stage(40, 3, 5, 4, 2),
                                config_base.stage(48, 2, 5, 3, 1),
                                config_base.stage(96, 3, 5, 6, 2)
                            ])
  net.width_multiplier = width_multiplier
  return net


def imagenet_recipe(c: ml_collections.ConfigDict) -> None:
  """ImageNet data and an EfficientNet-style training recipe, at batch 4096."""
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.data.num_classes = 1000
  c.data.cache = False
  # A ~12.8k-image "minival" (1% of the training split) calibrates tau, so the
  # experts train on 99% of ImageNet, close to the paper's full training set.
  c.data.holdout_fraction = 0.01
  c.train.batch_size = 4096
  c.train.num_steps = 93_800  # 300 epochs of 1,281,167 images
  c.train.stages.warmup = 0.1
  c.train.stages.coadapt = 0.85
  c.train.stages.delegator = 0.05
  c.train.optimizer = "rmsprop"
  c.train.learning_rate = 0.016 * 4096 / 256
  c.train.warmup_steps = 1560  # 5 epochs, at the start of warmup and of coadapt
  # The delegator stage (frozen experts) fine-tunes at a tenth of the peak
  # with a short warm-up: our choice; the paper gives no schedule.
  c.train.stage_schedules.delegator.learning_rate = 0.1 * c.train.learning_rate
  c.train.stage_schedules.delegator.warmup_steps = 200
  c.train.weight_decay = 1e-5
  c.train.ema_decay = 0.9999
  c.train.compute_dtype = "bfloat16"
  c.train.checkpoint_every_steps = 2000
  c.train.log_every_steps = 100
  c.train.eval_every_steps = 10_000
  c.loss.label_smoothing = 0.1
  c.eval.batch_size = 1024

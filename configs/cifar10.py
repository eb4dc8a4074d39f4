r"""CoE on CIFAR-10: a delegator and 4 MBConv experts at 32 px.

TFDS `cifar10` by default (prepared with `tfds build cifar10`); the JPEG
folders of `cifar10-dev.tar.gz` (or any CIFAR-10 in the `image_folder`
layout) with

    python -m coe_jax.main --config=configs/cifar10.py --workdir=runs/cifar10 \
        --config.data.name=image_folder --config.data.path=DIR

Training augmentation is CIFAR's standard (`data.augment=pad_crop_flip`: pad
4 px of zeros, random 32 px crop, horizontal flip) in both pipelines;
evaluation sees whole images. 10% of the training split is held out to
calibrate tau. FLOPs (`python -m coe_jax.flops --config=configs/cifar10.py`):
delegator 1.20M, each expert 8.07M multiply-adds.

Work in progress (issue 15): the recipe (steps, learning rate) is not yet
tuned, and its runtime and accuracy on the 2-core CPU are not yet measured.
"""

import ml_collections

from coe_jax import config_base as common


def get_config() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.num_experts = 4
  c.data.name = "cifar10"
  c.data.image_size = 32
  c.data.num_classes = 10
  c.data.augment = "pad_crop_flip"
  c.delegator = common.network(
      stem_features=16, stem_stride=2, head_features=128, activation="hard_swish",
      stages=[common.stage(16, 1, 3, 1, 1), common.stage(24, 2, 3, 3, 2),
              common.stage(40, 2, 3, 3, 2)])
  c.expert = common.network(
      stem_features=16, stem_stride=1, head_features=192, activation="hard_swish",
      stages=[common.stage(16, 1, 3, 1, 1), common.stage(24, 2, 3, 4, 2),
              common.stage(48, 2, 3, 4, 2), common.stage(80, 2, 3, 4, 2)])
  c.train.batch_size = 128
  c.train.num_steps = 2000
  c.train.optimizer = "adamw"
  c.train.learning_rate = 3e-3
  c.train.weight_decay = 5e-4
  c.train.warmup_steps = 100
  c.train.checkpoint_every_steps = 250
  c.train.log_every_steps = 50
  c.eval.batch_size = 500
  return c

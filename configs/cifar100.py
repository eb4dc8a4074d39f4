r"""CoE on CIFAR-100: where the claim should hold (100 classes, networks short of parameters).

Networks of CIFAR-10's size (configs/cifar10.py): a delegator of 0.21M
multiply-adds (about 12% of the single network it is compared with; 21% on
CIFAR-10) and 4 experts of 1.42M at 32 px, Fused-MBConv, trained for 60
epochs (19,000 steps of 128 of the 40,500 images left after the 10%
hold-out that calibrates tau). cifar100-dev (`../shared/data`) in the
image_folder layout:

    python -m coe_jax.main --config=configs/cifar100.py --workdir=runs/cifar100 \
        --config.data.name=image_folder --config.data.path=DIR

The regime probe (issue 33's positive control: do parameters pay at fixed
FLOPs here?), the single networks alone, sized to 1.7M multiply-adds:

    python -m coe_jax.ablate --config=configs/cifar100.py --workdir=runs/cifar100_probe \
        --seeds=1 --variants=single,single_2x,condconv --reference_flops=1.7e6 \
        --config.data.name=image_folder --config.data.path=DIR

The recipe is CIFAR-10's (docs/method.md, section 4; configs/cifar10.py says
why each setting). TFDS `cifar100` is the default data (prepared with
`tfds build cifar100`).
"""

import ml_collections

from coe_jax import config_base as common


def get_config() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.num_experts = 4
  c.data.name = "cifar100"
  c.data.image_size = 32
  c.data.num_classes = 100
  c.data.augment = "pad_crop_flip"
  # A narrow delegator: its cost is paid by every image, and on 100 classes
  # its job is mostly to route.
  c.delegator = common.network(stem_features=8,
                               stem_stride=2,
                               head_features=48,
                               activation="relu",
                               stages=[
                                   common.stage(12, 1, 3, 1, 2, se_ratio=0.0, fused=True),
                                   common.stage(24, 1, 3, 1, 2, se_ratio=0.0, fused=True)
                               ])
  c.expert = common.network(stem_features=16,
                            stem_stride=2,
                            head_features=128,
                            activation="relu",
                            stages=[
                                common.stage(24, 1, 3, 1, 2, se_ratio=0.0, fused=True),
                                common.stage(48, 2, 3, 1, 2, se_ratio=0.0, fused=True),
                                common.stage(64, 1, 3, 1, 1, se_ratio=0.0, fused=True)
                            ])
  c.train.batch_size = 128
  c.train.num_steps = 19000  # 60 epochs of the 40,500 images left after the hold-out
  c.train.eval_every_steps = 6333
  c.train.stages.warmup = 0.2
  c.train.stages.coadapt = 0.8
  c.train.optimizer = "adamw"
  c.train.learning_rate = 3e-3
  c.train.schedule = "continuous"
  c.train.warmup_steps = 300
  c.train.weight_decay = 0.05
  c.train.generalist_warmup = True
  c.loss.label_smoothing = 0.0
  c.train.checkpoint_every_steps = 500
  c.train.log_every_steps = 100
  c.eval.batch_size = 500
  return c

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

The ceiling (issue 33): 4 experts of the single network's size, each trained
on a fixed group of 5 superclasses (`coarse.json`), each test image answered
by its group's expert, and the delegator's network predicting the group; the
same command with it added (the finished runs are reused, the table has them all):

    python -m coe_jax.ablate --config=configs/cifar100.py --workdir=runs/cifar100_probe \
        --seeds=1 --variants=single,single_2x,condconv,coe_oracle_groups \
        --reference_flops=1.7e6 --config.data.name=image_folder --config.data.path=DIR

The recipe and the experts are CIFAR-10's, read from configs/cifar10.py
(docs/method.md, section 4; that config says why each setting). TFDS
`cifar100` is the default data (prepared with `tfds build cifar100`).
"""

import os

import ml_collections

from coe_jax import config_base as common
from coe_jax.config_loading import load_config


def get_config() -> ml_collections.ConfigDict:
  # CIFAR-10's recipe and experts, read from its config so the two stay one recipe.
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10.py"))
  c.data.name = "cifar100"
  c.data.num_classes = 100
  # A narrow delegator: every image pays for it, and on 100 classes its job
  # is mostly to route.
  c.delegator = common.network(stem_features=8,
                               stem_stride=2,
                               head_features=48,
                               activation="relu",
                               stages=[
                                   common.stage(12, 1, 3, 1, 2, se_ratio=0.0, fused=True),
                                   common.stage(24, 1, 3, 1, 2, se_ratio=0.0, fused=True)
                               ])
  return c

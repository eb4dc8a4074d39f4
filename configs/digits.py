"""CoE on scikit-learn's bundled handwritten digits: the embedded default.

A tiny delegator and 4 tiny experts on 8x8 digits upsampled to 16x16 px.
Runs on a laptop CPU; `make demo` uses it.

    python -m coe_jax.main --config=configs/digits.py --workdir=runs/digits

Expected (measured here, 2-core AMD EPYC CPU): 3.5 minutes end to end on an
idle machine; CoE top-1 99.2% with 69% early exits at a mean of 0.277M
multiply-adds (delegator 0.046M, each expert 0.742M); each expert alone
98.3-99.4%, the delegator alone 96.1%.
"""

import ml_collections

from coe_jax import config_base as common


def get_config() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.num_experts = 4
  c.data.name = "digits"
  c.data.image_size = 16
  c.data.num_classes = 10
  c.delegator = common.network(stem_features=8,
                               stem_stride=2,
                               head_features=32,
                               activation="hard_swish",
                               stages=[common.stage(8, 1, 3, 1, 1),
                                       common.stage(16, 1, 3, 2, 2)])
  c.expert = common.network(stem_features=16,
                            stem_stride=1,
                            head_features=96,
                            activation="hard_swish",
                            stages=[
                                common.stage(16, 1, 3, 1, 1),
                                common.stage(24, 1, 3, 3, 2),
                                common.stage(40, 1, 3, 3, 2)
                            ])
  c.train.batch_size = 64
  c.train.num_steps = 1500
  c.train.optimizer = "adamw"
  c.train.learning_rate = 3e-3
  c.train.weight_decay = 1e-4
  c.train.warmup_steps = 50
  c.train.checkpoint_every_steps = 500
  c.train.log_every_steps = 100
  c.eval.batch_size = 256
  return c

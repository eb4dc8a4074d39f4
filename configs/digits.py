"""CoE on scikit-learn's bundled handwritten digits: the embedded default.

A tiny delegator and 4 tiny experts on 8x8 digits upsampled to 16x16 px.
Runs on a laptop CPU; `make demo` uses it.

    python -m coe_jax.main --config=configs/digits.py --workdir=runs/digits

Expected (measured here, 2-core AMD EPYC CPU with AVX-512): 2 minutes 13
seconds end to end on an idle machine (training 120 s, 36 s of it compiling);
CoE top-1 99.17% with 81.7% early exits at a mean of 0.182M multiply-adds
(delegator 0.046M, each expert 0.742M); each expert alone 98.6-99.2%, the
delegator alone 95.8% (docs/results.md).
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
  # Routed training (docs/method.md, section 4): each expert trains on its
  # WGM portion and 16 images drawn from outside it, a quarter of the batch
  # scores every expert for LGM and VCM, and the warm-up trains one generalist
  # that every expert starts co-adaptation from. A co-adaptation step takes
  # 54 ms against 85 with every expert on every image, at the same top-1
  # (docs/results.md).
  c.train.expert_dispatch = "routed"
  c.train.generalist_warmup = True
  c.wgm.off_portion_samples = 16
  c.wgm.groups = -1  # One routing group per data shard: 1 here, D on D GPUs.
  c.lgm.score_fraction = 0.25
  # Trains as fast as unrolled experts here (55 against 54 ms a step) and
  # compiles one expert's program instead of four (19 against 37 s).
  c.expert_loop = "vmap"
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

"""Tiny configs for tests: the digits config shrunk until it runs in seconds."""

import os

import ml_collections

from coe_jax import config_base
from coe_jax.config_loading import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(name: str) -> str:
  return os.path.join(REPO, "configs", f"{name}.py")


def tiny_config(num_experts: int = 3,
                image_size: int = 16,
                activation: str = "hard_swish",
                condconv_kernels: int = 0) -> ml_collections.ConfigDict:
  """A digits config with 2-3 block networks, 16 px images and few steps."""
  c = load_config(config_path("digits"))
  # The base config's training (every expert on every image, unrolled): the
  # tests that route say so (tests/test_routed.py).
  defaults = config_base.base_config()
  c.expert_loop = defaults.expert_loop
  c.train.expert_dispatch = defaults.train.expert_dispatch
  c.train.generalist_warmup = defaults.train.generalist_warmup
  c.wgm.off_portion_samples = defaults.wgm.off_portion_samples
  c.wgm.groups = defaults.wgm.groups
  c.lgm.score_fraction = defaults.lgm.score_fraction
  c.num_experts = num_experts
  c.data.image_size = image_size
  c.delegator = config_base.network(
      stem_features=8,
      stem_stride=2,
      head_features=16,
      activation=activation,
      stages=[config_base.stage(8, 1, 3, 1, 1),
              config_base.stage(8, 1, 3, 2, 2)])
  c.expert = config_base.network(
      stem_features=8,
      stem_stride=1,
      head_features=16,
      activation=activation,
      condconv_kernels=condconv_kernels,
      condconv_from_stage=1,
      stages=[config_base.stage(8, 1, 3, 1, 1),
              config_base.stage(16, 2, 3, 2, 2)])
  c.train.batch_size = 32
  c.train.num_steps = 8
  c.train.warmup_steps = 2
  c.train.checkpoint_every_steps = 4
  c.train.log_every_steps = 2
  c.eval.batch_size = 64
  return c

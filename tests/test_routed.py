"""Routed training: each expert trains on its WGM portion alone, and the step is the
"all" step's, exactly where they must agree and in expectation where they draw."""

import dataclasses
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax import config_base, flops, objective
from coe_jax.errors import CoEError
from coe_jax.models import kinds
from coe_jax.models.networks import normalize_images
from coe_jax.objective import dispatch, losses
from coe_jax.training import train
from tests.helpers import train_config

STILL = "still"  # A network kind whose outputs do not depend on the rest of the batch.


@dataclasses.dataclass(frozen=True)
class StillSpec:
  features: int
  dropout_rate: float
  kind: ClassVar[str] = STILL

  @classmethod
  def from_entry(cls, entry, name: str) -> "StillSpec":
    del name
    return cls(entry["features"], float(entry["dropout_rate"]))


class StillBody(nn.Module):
  """A convolution and a normalisation by running averages only, so that an image's
  output never depends on the batch it trains in (routed BatchNorm differs by design)."""
  spec: StillSpec
  dtype: Any = jnp.float32
  batch_norm_axis: Optional[str] = None
  remat: str = "none"

  @nn.compact
  def __call__(self, images, train: bool):
    del train
    x = normalize_images(images, self.dtype)  # [B, H, W, C]
    x = nn.Conv(self.spec.features, (3, 3), dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, dtype=self.dtype, name="bn")(x)
    return jnp.mean(nn.relu(x), axis=(1, 2))  # [B, F]


@pytest.fixture(scope="module")
def still_kind():
  kinds.register_kind(STILL,
                      spec=StillSpec.from_entry,
                      module=StillBody,
                      macs=lambda spec, size, channels, outputs: size * size * 9 * channels * spec.
                      features + spec.features * outputs,
                      keys=dict(features=config_base.Key(8, config_base.POSITIVE_INT),
                                dropout_rate=config_base.Key(0.0, config_base.UNIT_INTERVAL_OPEN)))
  yield
  kinds.unregister_kind(STILL)


def _config(dispatch_mode, data=1, expert=1, *, microbatches=1, generalist=False, groups=None):
  config = train_config()
  config.num_experts = 4
  config.expert = config_base.network_of(STILL, features=8, dropout_rate=0.3)
  config.train.expert_dispatch = dispatch_mode
  config.train.generalist_warmup = generalist
  config.train.microbatches = microbatches
  config.wgm.off_portion_weight = 0.0
  config.wgm.groups = groups or data
  config.mesh.data, config.mesh.expert = data, expert
  # Plain SGD: an update is the gradient, so equal updates are equal gradients.
  config.train.optimizer, config.train.momentum = "sgd", 0.0
  config.train.learning_rate = 0.1
  return config


def _step(config, stage):
  """One step of `stage` from the same state and batch: (metrics, new parameters)."""
  trainer = train.Trainer(config,
                          "/tmp/unused",
                          devices=jax.devices()[:config.mesh.data * config.mesh.expert])
  batch = trainer.global_batch(next(train.data.train_batches(config)))
  state, metrics = trainer.compile_step(stage)(trainer.init_state(), batch, jax.random.key(3))
  return jax.device_get(metrics), jax.device_get((state.params, state.batch_stats))


def _assert_same_step(got, want):
  for key in ("loss", "expert_loss", "selection_loss", "delegator_loss", "grad_norm"):
    np.testing.assert_allclose(got[0][key], want[0][key], rtol=2e-5, atol=1e-6, err_msg=key)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage, generalist", [("warmup", True), ("coadapt", False),
                                               ("delegator", False)])
def test_routed_step_equals_the_all_step_at_alpha_zero(still_kind, stage, generalist):
  """Losses, gradients (SGD updates) and statistics equal the "all" step's, every stage:
  at alpha = 0 the images outside a portion weigh nothing, and dropout masks follow
  the images, not the buffers."""
  _assert_same_step(_step(_config("routed", generalist=generalist), stage),
                    _step(_config("all", generalist=generalist), stage))


@pytest.mark.parametrize("microbatches", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_routed_step_on_a_mesh_equals_one_device(still_kind, microbatches):
  """On 2 x 2 devices (two routing groups, one a data shard), and in micro-batches."""
  for stage, generalist in (("warmup", True), ("coadapt", False)):
    one = _step(_config("routed", microbatches=microbatches, generalist=generalist, groups=2),
                stage)
    # Each data shard holds one routing group: the same groups as one device's.
    config = _config("routed", data=2, expert=2, microbatches=microbatches, generalist=generalist)
    _assert_same_step(_step(config, stage), one)
    _assert_same_step(
        one, _step(_config("all", data=2, microbatches=microbatches, generalist=generalist), stage))


def _portion(batch, num_experts, groups, seed=0):
  """A balanced partition of each group, in a random order."""
  rng = np.random.default_rng(seed)
  per_group = np.repeat(np.arange(num_experts), batch // groups // num_experts)
  return jnp.asarray(np.concatenate([rng.permutation(per_group) for _ in range(groups)]))


def test_buffers_hold_each_portion_and_draw_outside_it_within_the_group():
  batch, num_experts, groups, drawn = 48, 4, 2, 4
  portion = _portion(batch, num_experts, groups)
  plan = dispatch.routed(portion,
                         num_experts,
                         groups=groups,
                         off_portion_weight=0.3,
                         off_portion_samples=drawn,
                         rng=jax.random.key(0))
  slots, weights = np.asarray(plan.slots), np.asarray(plan.weights)
  own, extra = batch // groups // num_experts, drawn // groups
  assert slots.shape == weights.shape == (num_experts, batch // num_experts + drawn)
  per_group = slots.reshape(num_experts, groups, own + extra)
  for j in range(num_experts):
    for g in range(groups):
      mine, others = per_group[j, g, :own], per_group[j, g, own:]
      # Group-major: every slot of group g names an image of group g.
      assert set(per_group[j, g]) <= set(range(g * batch // groups, (g + 1) * batch // groups))
      assert sorted(mine) == sorted(np.flatnonzero(np.asarray(portion) == j)[g * own:(g + 1) * own])
      assert len(set(others)) == extra and all(portion[i] != j for i in others)
  outside = batch // groups - own
  np.testing.assert_allclose(weights[:, own:own + extra], 0.3 * outside / extra)
  assert np.all(weights.reshape(num_experts, groups, -1)[:, :, :own] == 1)
  np.testing.assert_allclose(plan.normaliser, batch / num_experts + 0.3 * (batch - 12))


def test_drawn_images_give_the_all_loss_in_expectation():
  """E[routed loss] = the "all" loss with alpha, over the uniform draws."""
  batch, num_experts, groups, drawn, alpha = 32, 4, 2, 4, 0.2
  portion = _portion(batch, num_experts, groups, seed=1)
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(num_experts, batch, 5)), jnp.float32)  # [N, B, K]
  labels = jnp.asarray(rng.integers(0, 5, batch), jnp.int32)  # [B]
  weights = jnp.where(jax.nn.one_hot(portion, num_experts) > 0, 1.0, alpha)  # [B, N]
  want = losses.weighted_expert_loss(logits, labels, weights)

  def routed_loss(key):
    plan = dispatch.routed(portion,
                           num_experts,
                           groups=groups,
                           off_portion_weight=alpha,
                           off_portion_samples=drawn,
                           rng=key)
    buffers = jnp.take_along_axis(logits, plan.slots[..., None], axis=1)  # [N, P, K]
    return losses.buffered_expert_loss(buffers, labels[plan.slots], plan.weights, plan.normaliser)

  draws = jax.jit(jax.vmap(routed_loss))(jax.random.split(jax.random.key(0), 20000))
  assert np.std(draws) > 1e-3  # The draws do differ.
  np.testing.assert_allclose(np.mean(draws), want, rtol=2e-3)
  # Without drawn images the alpha terms are missing: the expectation test can fail.
  assert abs(float(routed_loss(jax.random.key(0))) - float(want)) > 1e-3 or alpha == 0


def test_scored_images_are_strided_and_their_selection_loss_is_their_mean():
  scored = dispatch.scored_images(16, 0.25)
  np.testing.assert_array_equal(scored, [0, 4, 8, 12])
  rng = np.random.default_rng(0)
  selection = jax.nn.softmax(jnp.asarray(rng.normal(size=(4, 3)), jnp.float32))
  weights = jnp.asarray([0.5, 1.5, 1.0, 1.0], jnp.float32)
  logits = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  spread = objective.spread_targets(objective.DelegatorTargets(selection, weights, None), scored,
                                    16)
  np.testing.assert_allclose(losses.selection_loss(logits, spread.selection, spread.sample_weights),
                             losses.selection_loss(logits[scored], selection, weights),
                             rtol=1e-6)


def test_routed_step_with_drawn_and_partly_scored_images_trains(still_kind):
  config = _config("routed")
  config.wgm.off_portion_weight, config.wgm.off_portion_samples = 0.2, 4
  config.lgm.score_fraction = 0.25
  metrics, _ = _step(config, "coadapt")
  assert np.isfinite(metrics["loss"]) and metrics["selection_loss"] > 0
  assert metrics["load_gap"] == 0


@pytest.mark.parametrize("override, message", [
    (dict(off_portion_weight=0.2), "wgm.off_portion_weight=0.2: routed dispatch trains each "
     "expert on its portion only"),
    (dict(off_portion_samples=3, off_portion_weight=0.2), "wgm.off_portion_samples=3: expected a "
     "multiple of wgm.groups=2"),
    (dict(batch_size=20), "train.batch_size=20: routed dispatch gives each of the 4 experts"),
    (dict(score_fraction=0.3), "lgm.score_fraction=0.3: expected 1 / k"),
])
def test_bad_routed_settings_fail_in_one_line(override, message):
  config = train_config()
  config.num_experts = 4
  config.train.expert_dispatch = "routed"
  config.wgm.off_portion_weight = 0.0
  config.wgm.groups = 2
  for key, value in override.items():
    section = "train" if key == "batch_size" else "lgm" if key == "score_fraction" else "wgm"
    config[section][key] = value
  with pytest.raises(CoEError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
    config_base.validate(config)


def test_a_routed_mesh_needs_routing_groups_of_its_data_axis(still_kind):
  config = _config("routed", data=2, expert=1)
  config.wgm.groups = 1
  with pytest.raises(CoEError,
                     match=r"^wgm.groups=1: routed dispatch on a mesh whose data axis "
                     r"is 2"):
    train.Trainer(config, "/tmp/unused", devices=jax.devices()[:2])


def test_routed_step_flops_are_about_one_expert_an_image():
  config = train_config()
  config.num_experts = 8
  counts = flops.count(config, 10)
  batch = config.train.batch_size
  routed = config.copy_and_resolve_references()
  routed.train.expert_dispatch = "routed"
  routed.wgm.off_portion_weight = 0.0
  routed.lgm.score_fraction = 1 / 8
  d, e = counts["delegator_flops"], counts["expert_flops"]
  assert flops.train_step_flops(config, 10) == 2 * batch * (3 * d + 3 * 8 * e)
  # Each image: trained by one expert (3 passes), scored by all 8 with 1 in 8 chance.
  assert flops.train_step_flops(routed, 10) == 2 * batch * (3 * d + 3 * e + 1 * e)


def _device_flops(dispatch_mode, num_experts):
  """XLA's FLOPs of one device's co-adaptation step: N experts on a 1 x N mesh, 32
  images a device (the batch grows with the mesh, as a pod's does)."""
  config = train_config()
  config.num_experts = num_experts
  config.train.batch_size = 32 * num_experts
  config.mesh.data, config.mesh.expert = 1, num_experts
  config.expert_loop = "unroll"
  config.train.expert_dispatch = dispatch_mode
  config.wgm.off_portion_weight = 0.0
  config.lgm.score_fraction = 1 / num_experts
  trainer = train.Trainer(config, "/tmp/unused", devices=jax.devices()[:num_experts])
  shape = (config.train.batch_size, config.data.image_size, config.data.image_size, 3)
  batch = {
      "image": jax.ShapeDtypeStruct(shape, np.uint8, sharding=trainer.batch_sharding),
      "label": jax.ShapeDtypeStruct(shape[:1], np.int32, sharding=trainer.batch_sharding)
  }
  step = trainer.compile_step("coadapt").lower(trainer.abstract_state, batch, jax.random.key(0))
  return step.compile().cost_analysis()["flops"]


@pytest.mark.slow
def test_per_device_flops_stay_flat_as_experts_and_devices_grow_together():
  """Routed: a device trains its expert on its portion and scores a share, whatever N;
  "all": a device's expert trains on the whole (growing) batch."""
  routed = [_device_flops("routed", n) for n in (4, 8)]
  assert routed[1] / routed[0] < 1.1, routed
  every = [_device_flops("all", n) for n in (4, 8)]
  assert every[1] / every[0] > 1.5, every


def test_a_runs_training_flops_add_its_stages_steps():
  config = train_config(num_steps=10)  # warm-up 5 steps, co-adaptation 5
  config.train.expert_dispatch = "routed"
  config.train.generalist_warmup = True
  config.wgm.off_portion_weight = 0.0
  step = {stage: flops.train_step_flops(config, 10, stage) / 2 for stage in ("warmup", "coadapt")}
  assert step["warmup"] < step["coadapt"]  # The generalist alone, against one expert + scores.
  assert flops.run_train_flops(config, 10) == 5 * step["warmup"] + 5 * step["coadapt"]

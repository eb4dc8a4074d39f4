"""Routing: early exit, dispatch into expert buffers, overflow, and a device mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from coe_jax import evaluation, routing
from coe_jax.errors import CoEError
from coe_jax.models.coe import CoE
from tests.helpers import random_images, random_variables
from tests.tiny import tiny_config

NUM_EXPERTS = 4
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def model_and_variables():
  model = CoE(tiny_config(num_experts=NUM_EXPERTS), num_classes=NUM_CLASSES)
  return model, random_variables(model)


@pytest.fixture(scope="module")
def one_at_a_time(model_and_variables):
  """Jitted delegator and single expert, to compute answers sample by sample."""
  model, _ = model_and_variables
  return jax.jit(model.delegator), jax.jit(model.expert)


@pytest.fixture(scope="module")
def per_sample(model_and_variables, one_at_a_time):
  """The definition, one sample at a time: delegator outputs and the chosen expert's logits."""
  _, variables = model_and_variables
  delegator, expert = one_at_a_time
  images = random_images(1, 13)
  class_logits, choice, expert_logits = [], [], []
  for image in images:
    z, g = delegator(variables, image[None])
    j = int(jnp.argmax(g[0]))
    class_logits.append(z[0])
    choice.append(j)
    expert_logits.append(expert(variables, j, image[None])[0])
  return images, np.stack(class_logits), np.array(choice), np.stack(expert_logits)


def _reference(per_sample, threshold):
  """(logits, early_exit, expert) by the per-sample definition."""
  _, class_logits, choice, expert_logits = per_sample
  exits = np.asarray(jax.nn.softmax(class_logits)).max(-1) >= threshold
  return (np.where(exits[:, None], class_logits,
                   expert_logits), exits, np.where(exits, routing.NO_EXPERT, choice))


def _thresholds(per_sample):
  """0 (all exit), a value between two confidences near the median, 1.5 (none exit)."""
  confidences = np.sort(np.asarray(jax.nn.softmax(per_sample[1])).max(-1))
  middle = len(confidences) // 2
  return [0.0, float(confidences[middle - 1] + confidences[middle]) / 2, 1.5]


def test_per_sample_reference_is_not_degenerate(per_sample):
  _, _, choice, _ = per_sample
  assert len(set(choice.tolist())) >= 3
  mid = _thresholds(per_sample)[1]
  assert 0.3 < np.mean(_reference(per_sample, mid)[1]) < 0.7


@pytest.mark.parametrize("num_groups,expert_loop", [(3, "vmap"), (4, "unroll")])
def test_routed_output_equals_per_sample_definition(model_and_variables, per_sample, num_groups,
                                                    expert_loop):
  model, variables = model_and_variables
  images = per_sample[0]  # 13 images: 3 and 4 groups need padding.
  compilations = routing.route_and_predict._cache_size()
  for threshold in _thresholds(per_sample):
    out = routing.route_and_predict(model,
                                    variables,
                                    images,
                                    threshold,
                                    num_groups=num_groups,
                                    spec=routing.RoutingSpec(expert_loop=expert_loop))
    logits, exits, expert = _reference(per_sample, threshold)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["early_exit"], exits)
    np.testing.assert_array_equal(out["expert"], expert)
    metrics = out["metrics"]
    assert float(metrics["exit_rate"]) == pytest.approx(exits.mean())
    np.testing.assert_array_equal(metrics["expert_load"],
                                  np.bincount(expert[expert >= 0], minlength=NUM_EXPERTS))
    assert int(metrics["overflow_to_expert"]) == int(metrics["overflow_to_delegator"]) == 0
  # The threshold is traced: one compilation served all three.
  assert routing.route_and_predict._cache_size() - compilations <= 1


def _assign_reference(preferences, active, capacity, priority):
  """The overflow policy as plain loops: first choices by priority, then second choices, ..."""
  num_samples, num_experts = preferences.shape
  expert, slot, load = [-1] * num_samples, [0] * num_samples, [0] * num_experts
  order = sorted(range(num_samples), key=lambda i: (-priority[i], i))
  for rank in range(num_experts):
    for i in order:
      j = preferences[i, rank]
      if active[i] and expert[i] < 0 and load[j] < capacity:
        expert[i], slot[i], load[j] = j, load[j], load[j] + 1
  return np.array(expert), np.array(slot)


@pytest.mark.parametrize("capacity", [1, 2, 3, 12])
def test_assign_follows_ranked_preferences(capacity):
  rng = np.random.default_rng(capacity)
  preferences = np.stack([rng.permutation(NUM_EXPERTS) for _ in range(12)])
  for row in preferences[:7]:  # Crowd expert 0 so that its buffer overflows.
    row[:] = np.concatenate([[0], row[row != 0]])
  active = rng.random(12) < 0.8
  priority = rng.integers(0, 4, 12).astype(np.float32)  # With ties, served in sample order.
  expert, slot = routing.assign(jnp.asarray(preferences), jnp.asarray(active), capacity,
                                jnp.asarray(priority))
  ref_expert, ref_slot = _assign_reference(preferences, active, capacity, priority)
  np.testing.assert_array_equal(expert, ref_expert)
  np.testing.assert_array_equal(slot, ref_slot)


def test_dispatch_and_combine_use_only_filled_slots():
  images = jnp.arange(1, 6, dtype=jnp.float32)[:, None] * jnp.ones((5, 2))  # [S=5, 2]
  expert = jnp.array([1, -1, 0, 1, 2])
  slot = jnp.array([0, 0, 0, 1, 0])
  buffers = routing.dispatch(images, expert, slot, num_experts=3, capacity=2)  # [3, 2, 2]
  np.testing.assert_array_equal(buffers[:, :, 0], [[3, 0], [1, 4], [5, 0]])
  # The experts' outputs on empty slots are poisoned; no sample may read them.
  outputs = jnp.where(buffers[..., :1] > 0, buffers * 10, jnp.nan)  # [3, 2, K=2]
  fallback = -jnp.ones((5, 2))
  combined = routing.combine(outputs, fallback, expert, slot)
  np.testing.assert_array_equal(combined[:, 0], [10, -1, 30, 40, 50])


def test_exit_at_the_threshold_and_ranked_preferences():
  logits = jnp.array([[2.0, 0.0], [0.0, 0.0]])  # Max probabilities ~0.88 and exactly 0.5.
  np.testing.assert_array_equal(routing.exit_mask(logits, 0.5), [True, True])
  np.testing.assert_array_equal(routing.exit_mask(logits, 0.6), [True, False])
  np.testing.assert_array_equal(routing.exit_mask(logits, 1.5), [False, False])
  selection = jnp.array([[1.0, 3.0, 3.0, 0.0]])  # A tie goes to the lower index, as in argmax.
  np.testing.assert_array_equal(routing.expert_preferences(selection), [[1, 2, 0, 3]])
  np.testing.assert_array_equal(routing.expert_choice(selection), [1])


def test_capacity():
  assert routing.RoutingSpec("exact", 1.25, 0.5).capacity(16, 4) == 16
  assert routing.RoutingSpec("serving", 1.25, 0.5).capacity(16, 4) == 3  # ceil(2.5)
  assert routing.RoutingSpec("serving", 1.0, 0.0).capacity(16, 4) == 4
  assert routing.RoutingSpec("serving", 0.01, 0.0).capacity(16, 4) == 1
  assert routing.RoutingSpec("serving", 100.0, 0.0).capacity(16, 4) == 16
  with pytest.raises(CoEError, match="routing.mode='fast'"):
    routing.RoutingSpec("fast", 1.0, 0.0).capacity(16, 4)
  with pytest.raises(CoEError, match="routing.capacity_factor=0"):
    routing.RoutingSpec("serving", 0, 0.0).capacity(16, 4)


def test_bad_expert_loop_is_named(model_and_variables):
  model, variables = model_and_variables
  with pytest.raises(CoEError, match="^expert_loop='spiral'"):
    routing.route_and_predict(model,
                              variables,
                              random_images(0, 4),
                              0.5,
                              spec=routing.RoutingSpec(expert_loop="spiral"))


def test_the_routing_spec_is_built_once_from_the_config_frozen_and_hashable():
  config = tiny_config()
  config.routing.mode, config.routing.capacity_factor = "serving", 0.5
  spec = routing.RoutingSpec.from_config(config, expected_exit_rate=0.25)
  assert spec == routing.RoutingSpec("serving", 0.5, 0.25, config.expert_loop)
  assert hash(spec) == hash(routing.RoutingSpec.from_config(config, expected_exit_rate=0.25))
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.mode = "exact"
  config.routing.capacity_factor = -1.0
  with pytest.raises(CoEError, match=r"routing\.capacity_factor=-1\.0: expected a positive"):
    routing.RoutingSpec.from_config(config)


def _all_prefer_in_order(variables):
  """Every sample ranks the experts 0, 1, 2, 3: expert 0's buffer must overflow."""
  params = jax.tree.map(lambda x: x, variables["params"])
  selector = params["delegator"]["selector"]
  selector["kernel"] = jnp.zeros_like(selector["kernel"])
  selector["bias"] = jnp.arange(NUM_EXPERTS, 0, -1, dtype=jnp.float32)
  return {**variables, "params": params}


def _confidence(model, variables, images):
  return np.asarray(routing.confidence(model.delegator(variables, images)[0]))


def _least_confident_first(confidence, active):
  """Expected experts when every sample ranks 0, 1, 2, 3 and each buffer has one slot."""
  expected = np.full(len(confidence), -1)
  candidates = np.flatnonzero(active)
  served = candidates[np.argsort(confidence[candidates], kind="stable")][:NUM_EXPERTS]
  expected[served] = np.arange(len(served))
  return expected


def test_serving_overflow_falls_back_to_next_expert_then_delegator(model_and_variables,
                                                                   one_at_a_time):
  model, variables = model_and_variables
  variables = _all_prefer_in_order(variables)
  images = random_images(2, 15)  # 2 groups of S = 8, the last slot padding.
  # C = ceil(0.5 * 8 * (1 - 0) / 4) = 1 slot per expert and group.
  out = routing.route_and_predict(model,
                                  variables,
                                  images,
                                  1.5,
                                  spec=routing.RoutingSpec("serving", capacity_factor=0.5),
                                  num_groups=2)
  # Per group, the least confident samples take experts 0, 1, 2, 3 in turn;
  # the rest get the delegator.
  confidence = _confidence(model, variables, images)
  expected = np.concatenate([
      _least_confident_first(confidence[:8], np.ones(8, bool)),
      _least_confident_first(confidence[8:], np.ones(7, bool))
  ])
  assert sorted(expected[:8]) == [-1] * 4 + [0, 1, 2, 3]
  assert sorted(expected[8:]) == [-1] * 3 + [0, 1, 2, 3]
  in_sample_order = np.array([0, 1, 2, 3, -1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1])
  assert not np.array_equal(expected, in_sample_order)  # The test tells the policies apart.
  np.testing.assert_array_equal(out["expert"], expected)
  assert not np.any(out["early_exit"])
  metrics = out["metrics"]
  np.testing.assert_array_equal(metrics["expert_load"], [2, 2, 2, 2])
  assert int(metrics["overflow_to_expert"]) == 6
  assert int(metrics["overflow_to_delegator"]) == 7

  delegator, expert = one_at_a_time
  for i, j in enumerate(expected):
    image = images[i:i + 1]
    want = delegator(variables, image)[0][0] if j < 0 else expert(variables, int(j), image)[0]
    np.testing.assert_allclose(out["logits"][i], want, rtol=1e-4, atol=1e-4)


def test_serving_overflow_with_early_exits(model_and_variables, per_sample):
  """Exited samples take no slots; with a slot per expert the least confident rest are served."""
  model, variables = model_and_variables
  variables = _all_prefer_in_order(variables)
  images = per_sample[0]
  threshold = _thresholds(per_sample)[1]
  exits = _reference(per_sample, threshold)[1]
  # One group of 13: C = ceil(0.3 * 13 / 4) = 1.
  out = routing.route_and_predict(model,
                                  variables,
                                  images,
                                  threshold,
                                  spec=routing.RoutingSpec("serving", capacity_factor=0.3))
  expected = _least_confident_first(_confidence(model, variables, images), ~exits)
  np.testing.assert_array_equal(out["early_exit"], exits)
  np.testing.assert_array_equal(out["expert"], expected)
  assert int(out["metrics"]["overflow_to_expert"]) == NUM_EXPERTS - 1
  assert int(out["metrics"]["overflow_to_delegator"]) == (~exits).sum() - NUM_EXPERTS


@pytest.mark.parametrize("mode,expert_loop", [("exact", "vmap"), ("serving", "unroll")])
def test_mesh_routing_equals_single_device(model_and_variables, mode, expert_loop):
  """Data 4 x expert 2: each device routes its group; experts run where their variables live.
  The last group's last three rows are padding."""
  model, variables = model_and_variables
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), (routing.DATA_AXIS, routing.EXPERT_AXIS))
  images = random_images(3, 16)
  valid = np.arange(16) < 13
  kwargs = dict(spec=routing.RoutingSpec(mode, capacity_factor=1.0, expert_loop=expert_loop),
                num_groups=4)
  no_exit = routing.route_and_predict(model, variables, images, 1.5, **kwargs)
  threshold = float(np.median(routing.confidence(no_exit["class_logits"])))
  single = routing.route_and_predict(model, variables, images, threshold, valid=valid, **kwargs)
  assert len(set(single["expert"].tolist()) - {-1}) >= 2
  np.testing.assert_array_equal(single["expert"][13:], [routing.NO_EXPERT] * 3)

  replicated = NamedSharding(mesh, PartitionSpec())
  by_expert = NamedSharding(mesh, PartitionSpec(routing.EXPERT_AXIS))
  sharded_variables = {
      collection: {
          "delegator": jax.device_put(tree["delegator"], replicated),
          "experts": jax.device_put(tree["experts"], by_expert)
      } for collection, tree in variables.items()
  }
  by_data = NamedSharding(mesh, PartitionSpec(routing.DATA_AXIS))
  sharded = routing.route_and_predict(model,
                                      sharded_variables,
                                      jax.device_put(images, by_data),
                                      threshold,
                                      valid=jax.device_put(valid, by_data),
                                      mesh=mesh,
                                      **kwargs)
  assert len(sharded["logits"].sharding.device_set) == 8
  np.testing.assert_allclose(sharded["logits"], single["logits"], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(sharded["expert"], single["expert"])
  np.testing.assert_array_equal(sharded["early_exit"], single["early_exit"])
  for key, value in single["metrics"].items():
    np.testing.assert_allclose(sharded["metrics"][key], value)


def test_mesh_must_split_experts_and_groups(model_and_variables):
  model, variables = model_and_variables
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), (routing.DATA_AXIS, routing.EXPERT_AXIS))
  with pytest.raises(CoEError, match="num_groups=2: expected a multiple of the mesh's data axis"):
    routing.route_and_predict(model, variables, random_images(0, 8), 0.5, num_groups=2, mesh=mesh)


def _padded(real, padding):
  """`real` images followed by `padding`, with the validity mask that marks the padding."""
  images = jnp.concatenate([real, padding])
  return images, np.arange(len(images)) < len(real)


def _adversarial_padding(model, variables, real, count):
  """`count` copies of the least confident real image: served before every other real
  image but that one, they all want its expert, then its next-best ones."""
  return jnp.repeat(real[np.argmin(_confidence(model, variables, real))][None], count, axis=0)


def test_padding_takes_no_slot_and_cannot_change_a_real_answer(model_and_variables):
  """Serving mode, one group of 16: 12 real images and 4 padding rows, 2 slots per expert."""
  model, variables = model_and_variables
  real = random_images(4, 12)
  spec = routing.RoutingSpec("serving", capacity_factor=0.5)  # P = ceil(0.5 * 16 / 4) = 2
  route = lambda images, valid: routing.route_and_predict(
      model, variables, images, 1.5, valid=valid, spec=spec)
  zeros, valid = _padded(real, jnp.zeros((4, *real.shape[1:]), jnp.uint8))
  adversarial, _ = _padded(real, _adversarial_padding(model, variables, real, 4))
  quiet, crowded = route(zeros, valid), route(adversarial, valid)
  for key in ("logits", "early_exit", "expert"):
    np.testing.assert_array_equal(crowded[key][:12], quiet[key][:12], err_msg=key)
  # Counted as real, the adversarial rows would take slots from real images.
  unmasked = route(adversarial, None)
  assert np.any(np.asarray(unmasked["expert"][:12]) != np.asarray(crowded["expert"][:12]))
  np.testing.assert_array_equal(crowded["expert"][12:], [routing.NO_EXPERT] * 4)
  assert not np.any(crowded["early_exit"][12:])
  for key, value in quiet["metrics"].items():
    np.testing.assert_array_equal(crowded["metrics"][key], value, err_msg=key)
  metrics, expert = crowded["metrics"], np.asarray(crowded["expert"][:12])
  np.testing.assert_array_equal(metrics["expert_load"],
                                np.bincount(expert[expert >= 0], minlength=NUM_EXPERTS))
  assert int(metrics["overflow_to_delegator"]) == np.sum(expert < 0) == 12 - 2 * NUM_EXPERTS


def test_exit_rate_counts_valid_images_only(model_and_variables):
  model, variables = model_and_variables
  images = random_images(5, 8)
  valid = np.arange(8) < 6
  out = routing.route_and_predict(model, variables, images, 0.0, valid=valid)  # Every image exits.
  assert float(out["metrics"]["exit_rate"]) == 1.0
  np.testing.assert_array_equal(out["early_exit"], valid)
  with pytest.raises(CoEError, match=r"^valid.shape=\(7,\): expected \(8,\)"):
    routing.route_and_predict(model, variables, images, 0.0, valid=np.ones(7, bool))


def test_evaluation_masks_its_padded_last_batch(model_and_variables):
  """Serving-mode evaluation: the last batch's padding cannot change the figures."""
  model, variables = model_and_variables
  real = random_images(6, 12)
  labels = np.arange(16) % NUM_CLASSES
  spec = routing.RoutingSpec("serving", capacity_factor=0.5)

  def evaluate(padding):
    images, mask = _padded(real, padding)
    batch = dict(image=images, label=labels, mask=mask)
    return evaluation.routed_figures(model, variables, [batch], 1.5, spec)

  zeros = evaluate(jnp.zeros((4, *real.shape[1:]), jnp.uint8))
  crowded = evaluate(_adversarial_padding(model, variables, real, 4))
  assert crowded[0] == zeros[0]
  np.testing.assert_array_equal(crowded[1].prediction, zeros[1].prediction)
  np.testing.assert_array_equal(crowded[1].class_by_expert, zeros[1].class_by_expert)

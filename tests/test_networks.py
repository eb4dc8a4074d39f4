"""The delegator, the experts and their stacking on the expert axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax import flops
from coe_jax.errors import CoEError
from coe_jax.models.coe import CoE
from coe_jax.models.mbconv import MBConv
from coe_jax.models.spec import NetworkSpec
from tests.tiny import tiny_config


def _images(rng, shape):
  return jax.random.randint(rng, shape, 0, 256).astype(jnp.uint8)


@pytest.fixture(scope="module")
def model_and_variables():
  model = CoE(tiny_config(num_experts=3), num_classes=10)
  return model, model.init(jax.random.key(0))


def test_delegator_has_two_heads(model_and_variables):
  model, variables = model_and_variables
  images = _images(jax.random.key(1), (5, 16, 16, 3))
  class_logits, selection_logits = model.delegator(variables, images)
  assert class_logits.shape == (5, 10) and selection_logits.shape == (5, 3)


def test_expert_variables_are_stacked_and_distinct(model_and_variables):
  model, variables = model_and_variables
  for collection in ("params", "batch_stats"):
    leaves = jax.tree.leaves(variables[collection]["experts"])
    assert leaves and all(leaf.shape[0] == 3 for leaf in leaves)
  stem = variables["params"]["experts"]["backbone"]["stem"]["kernel"]  # [N, 3, 3, 3, 8]
  assert not np.allclose(stem[0], stem[1]) and not np.allclose(stem[1], stem[2])


@pytest.mark.parametrize("loop", ["vmap", "unroll"])
def test_stacked_experts_equal_each_expert_alone(model_and_variables, loop):
  model, variables = model_and_variables
  images = _images(jax.random.key(2), (4, 16, 16, 3))
  shared = model.experts(variables, images, shared_input=True, loop=loop)  # [N, B, K]
  buffers = jnp.stack([images, images[::-1], images])  # [N, C, H, W, 3]
  per_buffer = model.experts(variables, buffers, shared_input=False, loop=loop)
  for j in range(3):
    np.testing.assert_allclose(shared[j], model.expert(variables, j, images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(per_buffer[j],
                               model.expert(variables, j, buffers[j]),
                               rtol=1e-5,
                               atol=1e-5)
  assert not np.allclose(shared[0], shared[1])


def test_training_mode_updates_stacked_batch_stats(model_and_variables):
  model, variables = model_and_variables
  images = _images(jax.random.key(3), (8, 16, 16, 3))
  logits, deterministic, stats = model.experts(variables,
                                               images,
                                               shared_input=True,
                                               train=True,
                                               rng=jax.random.key(4))
  assert logits.shape == (3, 8, 10)
  np.testing.assert_array_equal(deterministic, logits)  # No dropout in this config.
  old = variables["batch_stats"]["experts"]["backbone"]["stem_bn"]["mean"]
  new = stats["backbone"]["stem_bn"]["mean"]
  assert new.shape == old.shape and not np.allclose(new, old)
  (_, _), delegator_stats = model.delegator(variables, images, train=True, rng=jax.random.key(5))
  assert jax.tree.structure(delegator_stats) == jax.tree.structure(
      variables["batch_stats"]["delegator"])


def test_inference_is_per_sample(model_and_variables):
  """BatchNorm in inference mode: a sample's output does not depend on its batch."""
  model, variables = model_and_variables
  images = _images(jax.random.key(6), (6, 16, 16, 3))
  together = model.expert(variables, 1, images)
  alone = jnp.concatenate([model.expert(variables, 1, images[i:i + 1]) for i in range(6)])
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "hard_swish", "swish", "pwlu"])
def test_every_activation_builds_and_runs(activation):
  model = CoE(tiny_config(num_experts=2, activation=activation), num_classes=4)
  variables = model.init(jax.random.key(0))
  logits = model.experts(variables, _images(jax.random.key(1), (2, 16, 16, 3)), shared_input=True)
  assert logits.shape == (2, 2, 4) and bool(jnp.all(jnp.isfinite(logits)))


def test_condconv_stages_only_where_configured():
  model = CoE(tiny_config(num_experts=2, condconv_kernels=3), num_classes=4)
  variables = model.init(jax.random.key(0))
  backbone = variables["params"]["experts"]["backbone"]
  assert "routing" not in backbone["stage0_block0"]
  assert backbone["stage1_block0"]["expand"]["kernel"].shape[:2] == (2, 3)  # [N, kernels, ...]
  logits = model.experts(variables, _images(jax.random.key(1), (2, 16, 16, 3)), shared_input=True)
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("strides,features,residual", [(1, 8, True), (2, 8, False), (1, 16, False)])
def test_mbconv_residual_only_when_shapes_match(strides, features, residual):
  block = MBConv(features=features,
                 kernel_size=3,
                 strides=strides,
                 expansion=2,
                 se_ratio=0.25,
                 activation="relu")
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
  variables = block.init(jax.random.key(1), x, train=False)
  y = block.apply(variables, x, train=False)
  assert y.shape == (2, 8 // strides, 8 // strides, features)
  # Zeroing the projection removes the block's own contribution: what is left is the shortcut.
  zeroed = jax.tree.map(lambda v: v, variables)
  zeroed["params"]["project"]["kernel"] = jnp.zeros_like(variables["params"]["project"]["kernel"])
  y0 = block.apply(zeroed, x, train=False)
  bn = variables["params"]["project_bn"]
  offset = bn["bias"] - variables["batch_stats"]["project_bn"]["mean"] * bn["scale"] / jnp.sqrt(
      variables["batch_stats"]["project_bn"]["var"] + 1e-3)
  expected = (x if residual else 0) + offset
  np.testing.assert_allclose(y0, jnp.broadcast_to(expected, y0.shape), atol=1e-5)


@pytest.mark.parametrize("expansion", [1, 2])
def test_fused_mbconv_is_one_dense_convolution_then_the_projection(expansion):
  """Fused-MBConv: a dense k x k convolution (BatchNorm, activation), then the 1x1
  projection when it expands; compared with the same layers written out."""
  block = MBConv(features=8,
                 kernel_size=3,
                 strides=2,
                 expansion=expansion,
                 se_ratio=0.0,
                 activation="relu",
                 fused=True)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
  variables = block.init(jax.random.key(1), x, train=False)
  params = variables["params"]
  assert "depthwise" not in params and "expand" not in params
  assert params["fused"]["kernel"].shape == (3, 3, 8, 8 * expansion)
  assert ("project" in params) == (expansion > 1)
  variables = jax.tree.map(  # Non-trivial BatchNorm statistics.
      lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), variables)

  def bn(y, name):
    p, stats = variables["params"][name], variables["batch_stats"][name]
    return (y - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-3) * p["scale"] + p["bias"]

  y = jax.lax.conv_general_dilated(x,
                                   variables["params"]["fused"]["kernel"], (2, 2),
                                   "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = jax.nn.relu(bn(y, "fused_bn"))
  if expansion > 1:
    y = bn(y @ variables["params"]["project"]["kernel"][0, 0], "project_bn")
  np.testing.assert_allclose(block.apply(variables, x, train=False), y, atol=1e-4, rtol=1e-4)


def test_fused_stages_count_and_build():
  """A stage's `fused` flag reaches the blocks and the FLOPs count; configs without it are
  unfused."""
  config = tiny_config(num_experts=2)
  stage = dict(config.expert.stages[0])
  assert NetworkSpec.from_config(config.expert, "expert").stages[0].fused is False
  before = flops.count(config)["expert_flops"]
  config.expert.stages = (dict(stage, fused=True),) + tuple(config.expert.stages[1:])
  assert NetworkSpec.from_config(config.expert, "expert").stages[0].fused is True
  assert flops.count(config)["expert_flops"] != before
  variables = CoE(config, num_classes=4).init(jax.random.key(0))
  assert "fused" in variables["params"]["experts"]["backbone"]["stage0_block0"]


@pytest.mark.parametrize("key,value,fragment", [
    ("expert.width_multiplier", 0.0, "expert.width_multiplier=0.0"),
    ("expert.activation", "gelu", "expert.activation='gelu'"),
    ("delegator.stem_features", -4, "delegator.stem_features=-4"),
    ("num_experts", 0, "num_experts=0"),
])
def test_bad_network_configs_name_key_and_value(key, value, fragment):
  config = tiny_config()
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(CoEError) as error:
    CoE(config, num_classes=10)
  assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("field,value,fragment", [
    ("kernel", 4, "expert.stages[1].kernel=4"),
    ("depth", 0, "expert.stages[1].depth=0"),
    ("features", -8, "expert.stages[1].features=-8"),
])
def test_bad_stage_configs_name_stage_and_value(field, value, fragment):
  config = tiny_config()
  stages = [dict(s) for s in config.expert.stages]
  stages[1][field] = value
  config.expert.stages = tuple(stages)
  with pytest.raises(CoEError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
    CoE(config, num_classes=10)


@pytest.mark.parametrize("stages,fragment", [
    ((1,), "delegator.stages[0]=1: expected a stage with features, depth"),
    (({
        "features": 8,
        "depth": 1
    },), "delegator.stages[0]={'features': 8, 'depth': 1}"),
    ((), "delegator.stages=(): expected a list of at least one stage"),
])
def test_stages_that_are_not_stage_dicts_are_refused_in_one_line(stages, fragment):
  config = tiny_config()
  config.delegator.stages = stages  # As `--config.delegator.stages=1` would set it.
  with pytest.raises(CoEError) as error:
    CoE(config, num_classes=10)
  assert fragment in str(error.value) and "\n" not in str(error.value)


def test_deterministic_logits_are_the_same_pass_without_dropout(model_and_variables):
  """With dropout, the scoring logits equal a dropout-free network's on the same batch."""
  _, variables = model_and_variables
  images = _images(jax.random.key(6), (8, 16, 16, 3))
  config = tiny_config(num_experts=3)
  config.expert.dropout_rate = 0.5
  logits, deterministic, stats = CoE(config, num_classes=10).experts(variables,
                                                                     images,
                                                                     shared_input=True,
                                                                     train=True,
                                                                     rng=jax.random.key(7),
                                                                     loop="unroll")
  config.expert.dropout_rate = 0.0
  plain, plain_deterministic, plain_stats = CoE(config,
                                                num_classes=10).experts(variables,
                                                                        images,
                                                                        shared_input=True,
                                                                        train=True,
                                                                        rng=jax.random.key(7),
                                                                        loop="unroll")
  assert not np.allclose(logits, plain, atol=1e-3)  # Dropout acted...
  np.testing.assert_allclose(deterministic, plain, rtol=1e-5, atol=1e-5)  # ...and not here.
  np.testing.assert_array_equal(plain_deterministic, plain)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(plain_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _expert_loss(config, images):
  """The loss of expert 0 in training mode, as a function of its parameters."""
  model = CoE(config, num_classes=10)
  variables = model.init(jax.random.key(0))
  own = jax.tree.map(lambda v: v[0], {c: t["experts"] for c, t in variables.items()})

  def loss(params):
    logits, _ = model.expert_net.apply({
        **own, "params": params
    },
                                       images,
                                       train=True,
                                       mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.key(1)})
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  return loss, own["params"]


def _saved_bytes(loss, params) -> int:
  """Bytes kept for the backward pass: the arrays the VJP closes over."""
  _, backward = jax.vjp(loss, params)
  return sum(leaf.nbytes for leaf in jax.tree.leaves(backward))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["block", "full"])
def test_remat_saves_less_and_computes_the_same_gradients(mode):
  config = tiny_config(num_experts=1)
  images = _images(jax.random.key(8), (16, 16, 16, 3))
  plain_loss, params = _expert_loss(config, images)
  config.train.remat = mode
  remat_loss, _ = _expert_loss(config, images)
  assert _saved_bytes(remat_loss, params) < _saved_bytes(plain_loss, params) / 2
  for a, b in zip(jax.tree.leaves(jax.grad(remat_loss)(params)),
                  jax.tree.leaves(jax.grad(plain_loss)(params)),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_computes_every_layer_in_bfloat16_and_keeps_float32_state():
  config = tiny_config(num_experts=1)
  config.train.compute_dtype = "bfloat16"
  model = CoE(config, num_classes=10)
  variables = model.init(jax.random.key(0))
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  own = jax.tree.map(lambda v: v[0], {c: t["experts"] for c, t in variables.items()})
  _, mutated = model.expert_net.apply(own,
                                      _images(jax.random.key(9), (4, 16, 16, 3)),
                                      train=True,
                                      mutable=["batch_stats", "intermediates"],
                                      capture_intermediates=True)
  state = mutated["batch_stats"]
  outputs = jax.tree_util.tree_flatten_with_path(mutated["intermediates"])[0]
  norms = [leaf.dtype for path, leaf in outputs if "_bn" in jax.tree_util.keystr(path)]
  assert norms and all(dtype == jnp.bfloat16 for dtype in norms)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))

"""Tests of the PWLU activation and its statistics-based realignment.

Axis letters: B batch, C channels, N experts (stacked variables).
Everything runs under jit: one compile per call is much faster than running
flax's many small ops eagerly.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax.errors import CoEError
from coe_jax.models import pwlu
from coe_jax.models.pwlu import PWLU, realign

INTERVALS = 8


def _reference(x: np.ndarray, left: float, right: float, heights: np.ndarray, left_slope: float,
               right_slope: float) -> np.ndarray:
  """The PWLU of the paper, written independently with np.interp."""
  grid = np.linspace(left, right, len(heights))
  return np.where(
      x < left, heights[0] + left_slope * (x - left),
      np.where(x > right, heights[-1] + right_slope * (x - right), np.interp(x, grid, heights)))


def _init(per_channel: bool = False, channels: int = 3):
  layer = PWLU(num_intervals=INTERVALS, per_channel=per_channel)
  init = jax.jit(functools.partial(layer.init, train=True))
  return layer, init(jax.random.key(0), jnp.zeros((2, channels)))


def _apply(layer, variables, x, train=False):
  """Returns (output, updated batch_stats)."""
  apply = jax.jit(functools.partial(layer.apply, train=train, mutable="batch_stats"))
  y, updates = apply(variables, x)
  return y, updates["batch_stats"]


def _with_stats(variables, mean, var):
  """Variables whose running statistics are set to the given values."""
  stats = dict(variables["batch_stats"],
               mean=jnp.asarray(mean, jnp.float32),
               var=jnp.asarray(var, jnp.float32))
  return {**variables, "batch_stats": stats}


def test_phase_one_is_relu_and_tracks_statistics_only_in_train():
  layer, variables = _init()
  x = 2.0 * jax.random.normal(jax.random.key(1), (64, 3)) + 1.0  # [B, C]

  y, stats = _apply(layer, variables, x)
  np.testing.assert_array_equal(y, nn.relu(x))
  np.testing.assert_array_equal(stats["mean"], 0.0)
  np.testing.assert_array_equal(stats["var"], 1.0)

  y, stats = _apply(layer, variables, x, train=True)
  np.testing.assert_array_equal(y, nn.relu(x))
  np.testing.assert_allclose(stats["mean"], 0.1 * np.mean(x), rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * np.var(x), rtol=1e-5)
  assert float(stats["realigned"]) == 0.0


def test_phase_one_gives_parameters_zero_finite_gradients():
  layer, variables = _init()
  x = jax.random.normal(jax.random.key(1), (16, 3))
  loss = lambda p: jnp.sum(layer.apply({**variables, "params": p}, x, train=False))
  grads = jax.jit(jax.grad(loss))(variables["params"])
  for name, g in grads.items():
    np.testing.assert_array_equal(g, 0.0, err_msg=name)


def test_realigned_unit_is_relu_inside_the_bounds_and_the_outer_lines_outside():
  layer, variables = _init()
  # mean 0.5, std 1: bounds [-2.5, 3.5]; 0 is not a grid point here.
  variables = realign(_with_stats(variables, 0.5, 1.0 - 1e-5))
  params = variables["params"]
  np.testing.assert_allclose([params["left_bound"], params["right_bound"]], [-2.5, 3.5], rtol=1e-6)
  assert float(variables["batch_stats"]["realigned"]) == 1.0

  x = jnp.linspace(-6.0, 8.0, 281)[:, None]  # [B, 1]
  y = np.asarray(_apply(layer, variables, x)[0])[:, 0]
  x = np.asarray(x)[:, 0]
  grid = np.linspace(-2.5, 3.5, INTERVALS + 1)
  # ReLU on every interval that does not contain the kink at 0; on that one
  # the unit is the chord between the grid points around it.
  kink = (x > grid[grid < 0].max()) & (x < grid[grid > 0].min())
  inside = (x >= -2.5) & (x <= 3.5)
  np.testing.assert_allclose(y[inside & ~kink], np.maximum(x, 0)[inside & ~kink], atol=1e-6)
  np.testing.assert_allclose(y[kink], np.interp(x[kink], grid, np.maximum(grid, 0)), atol=1e-6)
  np.testing.assert_allclose(y[x < -2.5], 0.0, atol=1e-6)  # K_L = 0, Y_0 = 0
  np.testing.assert_allclose(y[x > 3.5], x[x > 3.5], atol=1e-5)  # K_R = 1, Y_N = 3.5


def test_realigned_unit_with_centred_statistics_is_exactly_relu():
  layer, variables = _init()
  variables = realign(_with_stats(variables, 0.0, 4.0))  # 0 is the middle grid point
  x = jnp.linspace(-10.0, 10.0, 401)[:, None]
  np.testing.assert_allclose(_apply(layer, variables, x)[0], nn.relu(x), atol=1e-6)


def test_grid_points_take_the_perturbed_heights_and_intervals_interpolate():
  layer, variables = _init()
  variables = realign(_with_stats(variables, 0.3, 2.0))
  params = dict(variables["params"])
  rng = np.random.default_rng(0)
  params["heights"] = jnp.asarray(rng.normal(size=INTERVALS + 1), jnp.float32)
  params["left_slope"] = jnp.float32(-0.4)
  params["right_slope"] = jnp.float32(1.7)
  variables = {**variables, "params": params}
  left, right = float(params["left_bound"]), float(params["right_bound"])

  grid = np.linspace(left, right, INTERVALS + 1, dtype=np.float32)
  y = _apply(layer, variables, jnp.asarray(grid)[:, None])[0][:, 0]
  np.testing.assert_allclose(y, params["heights"], atol=1e-5)

  x = rng.uniform(left - 3, right + 3, size=500).astype(np.float32)
  y = _apply(layer, variables, jnp.asarray(x)[:, None])[0][:, 0]
  np.testing.assert_allclose(y,
                             _reference(x, left, right, np.asarray(params["heights"]), -0.4, 1.7),
                             atol=1e-5)


def test_gradients_reach_heights_slopes_and_bounds():
  layer, variables = _init()
  variables = realign(_with_stats(variables, 0.0, 1.0))  # bounds ~[-3, 3], width ~0.75
  params = variables["params"]
  # One point a quarter into interval 5, [0.75, 1.5], one left and one right
  # of the range.
  x = jnp.asarray([[0.75 + 0.25 * 0.75], [-5.0], [4.0]])
  loss = jax.jit(lambda p, x: jnp.sum(layer.apply({**variables, "params": p}, x, train=False)))
  grads = jax.jit(jax.grad(loss))(params, x)

  expected_heights = np.zeros(INTERVALS + 1)
  expected_heights[[5, 6]] = [0.75, 0.25]  # interpolation weights of the inside point
  expected_heights[0] += 1.0  # Y_0 carries the left point
  expected_heights[-1] += 1.0  # Y_N carries the right point
  np.testing.assert_allclose(grads["heights"], expected_heights, atol=1e-3)
  np.testing.assert_allclose(grads["left_slope"], -5.0 - params["left_bound"], rtol=1e-3)
  np.testing.assert_allclose(grads["right_slope"], 4.0 - params["right_bound"], rtol=1e-3)

  # Bounds: compare with finite differences of the whole loss.
  for name in ("left_bound", "right_bound"):
    eps = 1e-2
    shifted = lambda d: float(loss({**params, name: params[name] + d}, x))
    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(float(grads[name])) > 1e-3, name
    np.testing.assert_allclose(grads[name], numeric, rtol=1e-2, err_msg=name)


def test_phase_two_freezes_the_statistics():
  layer, variables = _init()
  variables = realign(_with_stats(variables, 0.5, 2.0))
  x = 5.0 + jax.random.normal(jax.random.key(2), (32, 3))
  _, stats = _apply(layer, variables, x, train=True)
  for name in ("mean", "var", "realigned"):
    np.testing.assert_array_equal(stats[name], variables["batch_stats"][name])


def test_per_channel_units_have_their_own_statistics_and_shapes():
  channels = 3
  layer, variables = _init(per_channel=True, channels=channels)
  assert variables["params"]["heights"].shape == (channels, INTERVALS + 1)
  for name in ("left_bound", "right_bound", "left_slope", "right_slope"):
    assert variables["params"][name].shape == (channels,), name

  scale = jnp.asarray([1.0, 3.0, 0.5])
  shift = jnp.asarray([0.0, -2.0, 4.0])
  x = shift + scale * jax.random.normal(jax.random.key(3), (256, channels))  # [B, C]
  _, stats = _apply(layer, variables, x, train=True)
  np.testing.assert_allclose(stats["mean"], 0.1 * np.mean(x, 0), rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * np.var(x, 0), rtol=1e-5)

  variables = realign(_with_stats(variables, shift, scale**2))
  params = dict(variables["params"])
  np.testing.assert_allclose(params["left_bound"], shift - 3 * scale, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(params["right_bound"], shift + 3 * scale, rtol=1e-4, atol=1e-4)
  rng = np.random.default_rng(1)
  params["heights"] = jnp.asarray(rng.normal(size=(channels, INTERVALS + 1)), jnp.float32)
  params["left_slope"] = jnp.asarray([0.1, -0.2, 0.3])
  params["right_slope"] = jnp.asarray([0.9, 1.1, -0.5])
  y, _ = _apply(layer, {**variables, "params": params}, x)
  x, p = np.asarray(x), jax.tree.map(np.asarray, params)
  for c in range(channels):
    expected = _reference(x[:, c], p["left_bound"][c], p["right_bound"][c], p["heights"][c],
                          p["left_slope"][c], p["right_slope"][c])
    np.testing.assert_allclose(y[:, c], expected, atol=1e-5, err_msg=f"channel {c}")


class _Tiny(nn.Module):
  """Dense -> BatchNorm -> PWLU in a submodule, as in a real network."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return PWLU(num_intervals=INTERVALS, per_channel=True, name="act")(x, train)


def test_realign_on_stacked_experts():
  num_experts = 3
  model = _Tiny()
  keys = jax.random.split(jax.random.key(0), num_experts)
  variables = jax.jit(jax.vmap(lambda k: model.init(k, jnp.zeros((1, 5)), train=False)))(keys)
  mean = jnp.arange(num_experts * 4, dtype=jnp.float32).reshape(num_experts, 4)  # [N, C]
  var = 1.0 + mean
  variables["batch_stats"]["act"] = dict(variables["batch_stats"]["act"], mean=mean, var=var)

  new = jax.jit(realign)(variables)  # jitted, as the trainer calls it

  act = new["params"]["act"]
  assert act["heights"].shape == (num_experts, 4, INTERVALS + 1)
  std = np.sqrt(np.asarray(var) + 1e-5)
  np.testing.assert_allclose(act["left_bound"], mean - 3 * std, atol=1e-5)
  np.testing.assert_allclose(act["right_bound"], mean + 3 * std, atol=1e-5)
  np.testing.assert_allclose(act["heights"][..., 0], np.maximum(mean - 3 * std, 0), atol=1e-6)
  np.testing.assert_allclose(act["heights"][..., -1], mean + 3 * std, atol=1e-5)
  np.testing.assert_array_equal(act["left_slope"], np.zeros((num_experts, 4)))
  np.testing.assert_array_equal(act["right_slope"], np.ones((num_experts, 4)))
  np.testing.assert_array_equal(new["batch_stats"]["act"]["realigned"], np.ones(num_experts))
  # Everything that is not a PWLU is untouched, and the input is not mutated.
  for collection in ("params", "batch_stats"):
    for name in ("Dense_0", "BatchNorm_0"):
      if name in variables[collection]:
        jax.tree.map(np.testing.assert_array_equal, new[collection][name],
                     variables[collection][name])
  assert not np.any(variables["batch_stats"]["act"]["realigned"])

  # Each realigned expert computes its own realigned unit.
  x = jax.random.normal(jax.random.key(1), (num_experts, 6, 5))
  apply = lambda v, x: model.apply(v, x, train=False)
  stacked = jax.jit(jax.vmap(apply))(new, x)
  one = jax.tree.map(lambda a: a[1], new)
  np.testing.assert_allclose(stacked[1], jax.jit(apply)(one, x[1]), rtol=1e-6)


def test_realign_leaves_models_without_pwlu_alone_and_rejects_missing_statistics():
  variables = {"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}}
  assert realign(variables) == variables

  _, pwlu_vars = _init()
  with pytest.raises(CoEError, match="batch_stats"):
    realign({"params": {"act": pwlu_vars["params"]}, "batch_stats": {}})


@pytest.mark.parametrize("per_channel", [False, True])
def test_ramps_formulation_equals_the_lookup_in_values_and_gradients(per_channel):
  channels = 3
  layer, variables = _init(per_channel, channels)
  stats_shape = (channels,) if per_channel else ()
  variables = realign(_with_stats(variables, np.full(stats_shape, 0.4), np.full(stats_shape, 1.5)))
  rng = np.random.default_rng(1)
  params = dict(variables["params"])
  heights_shape = params["heights"].shape  # [N+1] or [C, N+1]
  params["heights"] = jnp.asarray(rng.normal(size=heights_shape), jnp.float32)
  params["left_slope"] = params["left_slope"] - 0.3
  params["right_slope"] = params["right_slope"] + 0.6
  # Inside and on both sides of the range [0.4 - 3.67, 0.4 + 3.67].
  x = jnp.asarray(rng.uniform(-6, 7, size=(256, channels)), jnp.float32)  # [B, C]
  loss = lambda p: jnp.sum(jnp.sin(layer.apply({**variables, "params": p}, x, train=False)))

  def outputs(name):
    with pwlu.formulation(name):  # Fresh jits: the formulation is read while tracing.
      return jax.jit(lambda p: layer.apply({**variables, "params": p}, x, train=False))(params), \
          jax.jit(jax.grad(loss))(params)

  y, grads = outputs("lookup")
  y_ramps, grads_ramps = outputs("ramps")
  assert float(jnp.std(y - nn.relu(x))) > 0.1  # Really phase II, far from ReLU.
  np.testing.assert_allclose(y_ramps, y, atol=1e-5)
  for name in grads:
    np.testing.assert_allclose(grads_ramps[name], grads[name], rtol=1e-3, atol=1e-4, err_msg=name)

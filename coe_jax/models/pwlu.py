"""PWLU, the piecewise linear unit (Zhou et al., ICCV 2021, arXiv 2104.03693).

Axis letters: C channels (the input's last axis), I+1 the grid points of the
I = `num_intervals` intervals, N experts, and `...` any leading axes (batch and
spatial axes of an input; N stacked experts in front of a variable in
`realign`) (docs/method.md, section 2).

The unit has I intervals on [B_L, B_R], I+1 learnable heights Y_0..Y_I at the
grid points B_L + i (B_R - B_L) / I, and learnable slopes K_L, K_R outside:

  x < B_L:          Y_0 + K_L (x - B_L)
  B_L <= x <= B_R:  linear interpolation of the heights
  x > B_R:          Y_I + K_R (x - B_R)

Phase I (`realigned == 0`) is exactly ReLU and tracks the running mean and
variance of the inputs. `realign` starts phase II: bounds at mean -/+ 3 std,
heights reset to ReLU at the grid points, K_L = 0, K_R = 1, and everything is
learnt from there. The statistics live in the `batch_stats` collection, so they
are stacked, sharded and checkpointed with BatchNorm's.

Two formulations of phase II compute the same function (`formulation`):
  "lookup" (default)  interpolates between the two heights around x, fetched
                      with a gather. Fastest to train under XLA (CPU,
                      forward + backward).
  "ramps"             Y_0 + K_L min(x - B_0, 0) + sum_i c_i relu(x - B_i),
                      where c_i is the change of slope at grid point B_i:
                      elementwise ops only, which LiteRT's XNNPACK runs (it
                      runs no gathers), so exporters use it. Exported, it
                      runs faster than "lookup".
The figures behind both choices are in benchmarks/README.md.
"""

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from coe_jax.errors import require
from coe_jax.models.formulation import Switch

PARAM_NAMES = ("left_bound", "right_bound", "heights", "left_slope", "right_slope")
STAT_NAMES = ("mean", "var", "realigned")

# Bounds sit this many standard deviations either side of the mean.
_BOUND_STDS = 3.0
# Added to the variance before the square root: a channel whose inputs are
# constant still gets a usable, non-empty range.
_VAR_EPSILON = 1e-5
# Smallest range B_R - B_L used in the forward pass, so that learnt bounds that
# meet or cross cannot divide by zero.
_MIN_RANGE = 1e-6

formulation = Switch("PWLU", ("lookup", "ramps"), "lookup")


def _relu_heights(left: jax.Array, right: jax.Array, num_intervals: int) -> jax.Array:
  """ReLU at the grid points of [left, right]: [...] bounds -> [..., I+1]."""
  fractions = jnp.arange(num_intervals + 1) / num_intervals  # [I+1]
  return nn.relu(left[..., None] + (right - left)[..., None] * fractions)


def _interval_width(left: jax.Array, right: jax.Array, num_intervals: int) -> jax.Array:
  """(B_R - B_L) / I, [] or [C]; bounds that meet or cross still give a positive width."""
  return jnp.maximum(right - left, _MIN_RANGE) / num_intervals


def _lookup(x: jax.Array, left: jax.Array, right: jax.Array, heights: jax.Array,
            left_slope: jax.Array, right_slope: jax.Array) -> jax.Array:
  """The phase-II function by lookup, x [..., C]; parameters [] or [C] (heights [.., I+1])."""
  # A JAX array even when the variables are numpy ones (host copies, as for
  # export): a traced index cannot index a numpy array.
  heights = jnp.asarray(heights)
  n = heights.shape[-1] - 1
  width = _interval_width(left, right, n)  # [] or [C]
  # Position on the grid in units of intervals; clipping makes points outside
  # the range take Y_0 or Y_I, and the slope terms below add the outer lines.
  position = jnp.clip((x - left) / width, 0, n)  # [..., C]
  # floor has a zero gradient, so the heights' gradient comes from the gather
  # and the bounds' gradient from `position`.
  index = jnp.minimum(jnp.floor(position), n - 1).astype(jnp.int32)  # [..., C]
  if heights.ndim == 2:  # Per channel: heights [C, I+1].
    channel = jnp.arange(heights.shape[0])  # [C], broadcast against index
    lower, upper = heights[channel, index], heights[channel, index + 1]  # [..., C]
  else:
    lower, upper = heights[index], heights[index + 1]  # [..., C]
  inside = lower + (position - index) * (upper - lower)
  return (inside + left_slope * jnp.minimum(x - left, 0) + right_slope * jnp.maximum(x - right, 0))


def _ramps(x: jax.Array, left: jax.Array, right: jax.Array, heights: jax.Array,
           left_slope: jax.Array, right_slope: jax.Array) -> jax.Array:
  """The phase-II function as a sum of ramps, x [..., C]; parameters as in `_lookup`."""
  n = heights.shape[-1] - 1
  width = _interval_width(left, right, n)[..., None]  # [1] or [C, 1]
  grid = left[..., None] + width * jnp.arange(n + 1)  # [I+1] or [C, I+1]: B_0..B_I
  inside = jnp.diff(heights, axis=-1) / width  # [.., I], the slope on each interval
  # Slopes from left to right: 0 before B_0 (K_L enters through the min
  # below), then the intervals', then K_R after B_I.
  slopes = jnp.concatenate([jnp.zeros_like(inside[..., :1]), inside, right_slope[..., None]],
                           axis=-1)  # [.., I+2]
  kinks = jnp.diff(slopes, axis=-1)  # [.., I+1], the change of slope at each B_i
  y = heights[..., 0] + left_slope * jnp.minimum(x - left, 0)  # [..., C]
  # One ramp at a time: a [..., C, I+1] stack of them exports as a reshape and
  # matrix products that ran slower than these elementwise ops.
  for i in range(n + 1):
    y = y + kinks[..., i] * nn.relu(x - grid[..., i])
  return y


class PWLU(nn.Module):
  """Piecewise linear unit with statistics-based realignment.

  Attributes:
    num_intervals: I, the number of intervals on [B_L, B_R].
    per_channel: one unit per channel (parameters and statistics get a C axis:
      bounds and slopes [C], heights [C, I+1]) instead of one per layer.
    momentum: of the running mean and variance kept in phase I.
    axis_name: a mesh axis (inside `shard_map`) whose devices' shares of the
      batch make up the batch: the statistics are those of the whole batch.
  """
  num_intervals: int = 16
  per_channel: bool = False
  momentum: float = 0.9
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the unit to x [..., C]; `train` updates the phase-I statistics."""
    require(self.num_intervals >= 1, "PWLU.num_intervals", self.num_intervals, "must be at least 1")
    n = self.num_intervals
    shape = (x.shape[-1],) if self.per_channel else ()  # [C] or []
    # Phase I ignores the parameters; start them where realignment would put
    # them for unit-normal inputs.
    left = self.param("left_bound", nn.initializers.constant(-_BOUND_STDS), shape)
    right = self.param("right_bound", nn.initializers.constant(_BOUND_STDS), shape)
    heights = self.param("heights",
                         lambda _: _relu_heights(jnp.full(shape, -_BOUND_STDS),
                                                 jnp.full(shape, _BOUND_STDS), n))  # [..., I+1]
    left_slope = self.param("left_slope", nn.initializers.zeros_init(), shape)
    right_slope = self.param("right_slope", nn.initializers.ones_init(), shape)
    mean = self.variable("batch_stats", "mean", jnp.zeros, shape)
    var = self.variable("batch_stats", "var", jnp.ones, shape)
    realigned = self.variable("batch_stats", "realigned", jnp.zeros, ())
    phase_two = realigned.value > 0

    if train and not self.is_initializing():
      axes = tuple(range(x.ndim - 1)) if self.per_channel else None
      inputs = jax.lax.stop_gradient(x).astype(jnp.float32)
      batch_mean, batch_square = jnp.mean(inputs, axes), jnp.mean(jnp.square(inputs), axes)
      if self.axis_name is not None:
        batch_mean, batch_square = jax.lax.pmean((batch_mean, batch_square), self.axis_name)
      batch_var = jnp.maximum(batch_square - jnp.square(batch_mean), 0.0)
      m = self.momentum
      # Frozen in phase II, so they keep describing what the bounds came from.
      mean.value = jnp.where(phase_two, mean.value, m * mean.value + (1 - m) * batch_mean)
      var.value = jnp.where(phase_two, var.value, m * var.value + (1 - m) * batch_var)

    # A select rather than lax.cond: both sides are elementwise, so XLA fuses
    # them with the neighbouring ops, and a select is what vmap over stacked
    # experts would turn a cond into anyway.
    phase_two_fn = {"lookup": _lookup, "ramps": _ramps}[formulation.current]
    y = jnp.where(phase_two, phase_two_fn(x, left, right, heights, left_slope, right_slope),
                  nn.relu(x))
    return y.astype(x.dtype)


def realign(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Moves every PWLU in a model's variables from phase I to phase II.

  A PWLU is found by name: a params entry that holds all of `PARAM_NAMES`,
  whose `batch_stats` entry at the same path holds `STAT_NAMES`. Its bounds
  become mean -/+ 3 std, its heights ReLU at the new grid points, K_L = 0,
  K_R = 1, and `realigned` = 1. Every leaf may carry extra leading axes (N
  stacked experts: mean [N] or [N, C], heights [N, I+1] or [N, C, I+1]).
  Realigning an already realigned unit resets it from its frozen statistics.
  Pure and jit-compatible.

  Args:
    variables: `{'params': ..., 'batch_stats': ..., ...}` of a whole model.

  Returns:
    A new dict with the PWLU variables replaced; everything else is the same.
  """
  require("params" in variables, "variables", sorted(variables), "needs a 'params' collection")
  params = traverse_util.flatten_dict(variables["params"], keep_empty_nodes=True)
  units = [
      path[:-1] for path in params if path[-1] == "heights" and all(path[:-1] + (p,) in params
                                                                    for p in PARAM_NAMES)
  ]
  if not units:
    return dict(variables)
  stats = traverse_util.flatten_dict(variables.get("batch_stats", {}), keep_empty_nodes=True)
  for unit in units:
    require(all(unit + (s,) in stats for s in STAT_NAMES), "batch_stats/" + "/".join(unit),
            sorted(k[-1] for k in stats if k[:-1] == unit),
            f"a PWLU needs the statistics {STAT_NAMES}")
    mean, var = stats[unit + ("mean",)], stats[unit + ("var",)]  # [...] or [..., C]
    std = jnp.sqrt(var + _VAR_EPSILON)
    left, right = mean - _BOUND_STDS * std, mean + _BOUND_STDS * std
    n = params[unit + ("heights",)].shape[-1] - 1
    new = {
        "left_bound": left,
        "right_bound": right,
        "heights": _relu_heights(left, right, n),
        "left_slope": jnp.zeros_like(left),
        "right_slope": jnp.ones_like(left)
    }
    for name, value in new.items():
      old = params[unit + (name,)]
      require(value.shape == old.shape, "/".join(unit + (name,)), old.shape,
              f"does not match the shape {value.shape} implied by its statistics")
      params[unit + (name,)] = value.astype(old.dtype)
    stats[unit + ("realigned",)] = jnp.ones_like(stats[unit + ("realigned",)])
  return {
      **variables, "params": traverse_util.unflatten_dict(params),
      "batch_stats": traverse_util.unflatten_dict(stats)
  }

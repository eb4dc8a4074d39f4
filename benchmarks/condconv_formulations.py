"""Times batched CondConv formulations on the local backend (CPU by default).

CondConv convolves every example with its own kernel `W(x) = sum_e alpha_e W_e`.
XLA has no per-example-kernel convolution, so the layer must be phrased as
ordinary ops; this script times the candidates on MBConv-like shapes and
checks that they agree before timing them:

  mixed_grouped    mix the kernels per example, fold the batch into feature
                   groups, and run one grouped convolution.
  stacked_outputs  convolve with all E kernels stacked on the output axis,
                   then mix the E outputs with alpha (exact by linearity).
  vmap_conv        vmap a single-example convolution over (example, kernel).
  per_tap          `coe_jax.models.condconv.CondConv` itself (routing given):
                   mix the kernels per example, then sum the K*K taps, each a
                   strided slice of the padded input contracted with the tap's
                   per-example weights (batched matmul, or a product when
                   depthwise).

Axis letters: B batch, H/W spatial, C input channels, F output channels,
E CondConv kernels, G feature groups, K spatial kernel size.

Usage: python -m benchmarks.condconv_formulations [--batch=64] [--kernels=4,8]
Prints one JSON line (images/s per case and formulation, forward and
forward+backward), then a table of the same numbers.
"""

import json
import os
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from coe_jax.config_loading import run_command
from coe_jax.models.condconv import CondConv

Formulation = Callable[[jax.Array, jax.Array, jax.Array, int, int], jax.Array]


def _conv(x: jax.Array, kernel: jax.Array, strides: int, groups: int) -> jax.Array:
  """NHWC x HWIO convolution with 'SAME' padding, as `nn.Conv` does it."""
  return jax.lax.conv_general_dilated(x,
                                      kernel, (strides, strides),
                                      "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


def mixed_grouped(x: jax.Array, kernel: jax.Array, alpha: jax.Array, strides: int,
                  groups: int) -> jax.Array:
  """Per-example kernels, batch folded into feature groups: one grouped conv."""
  b, h, w, c = x.shape
  _, k, _, cg, f = kernel.shape
  mixed = jnp.einsum("be,ehwio->hwibo", alpha, kernel)  # [K, K, C/G, B, F]
  mixed = mixed.reshape(k, k, cg, b * f)
  folded = x.transpose(1, 2, 0, 3).reshape(1, h, w, b * c)  # [1, H, W, B*C]
  y = _conv(folded, mixed, strides, b * groups)  # [1, H', W', B*F]
  return y.reshape(y.shape[1], y.shape[2], b, f).transpose(2, 0, 1, 3)


def stacked_outputs(x: jax.Array, kernel: jax.Array, alpha: jax.Array, strides: int,
                    groups: int) -> jax.Array:
  """All E kernels in one conv (E times the FLOPs), outputs mixed by alpha."""
  e, k, _, cg, f = kernel.shape
  # Output channels of a grouped conv are contiguous per group, so the E copies
  # of a group's outputs must sit inside that group: order (G, E, F/G).
  stacked = kernel.reshape(e, k, k, cg, groups, f // groups)
  stacked = stacked.transpose(1, 2, 3, 4, 0, 5).reshape(k, k, cg, groups * e * f // groups)
  y = _conv(x, stacked, strides, groups)  # [B, H', W', G*E*F/G]
  y = y.reshape(*y.shape[:3], groups, e, f // groups)
  y = jnp.einsum("bhwgef,be->bhwgf", y, alpha)
  return y.reshape(*y.shape[:3], f)


def vmap_conv(x: jax.Array, kernel: jax.Array, alpha: jax.Array, strides: int,
              groups: int) -> jax.Array:
  """vmap of a batch-1 convolution over (example, its mixed kernel)."""
  mixed = jnp.einsum("be,ehwio->bhwio", alpha, kernel)  # [B, K, K, C/G, F]
  one = lambda xb, wb: _conv(xb[None], wb, strides, groups)[0]
  return jax.vmap(one)(x, mixed)


class Case(NamedTuple):
  """One convolution shape, as found in MobileNetV3's later stages."""
  name: str
  size: int  # input H = W
  channels: int  # C
  features: int  # F
  kernel_size: int
  strides: int
  depthwise: bool


CASES = (
    Case("1x1 expand 14x14 112->672", 14, 112, 672, 1, 1, False),
    Case("1x1 project 7x7 960->160", 7, 960, 160, 1, 1, False),
    Case("dw 3x3 14x14 672", 14, 672, 672, 3, 1, True),
    Case("dw 5x5 14x14->7x7 672 s2", 14, 672, 672, 5, 2, True),
    Case("dw 5x5 7x7 960", 7, 960, 960, 5, 1, True),
)


def _time(fn: Callable[[], jax.Array], min_seconds: float) -> float:
  """Median seconds per call over repeats that total at least `min_seconds`."""
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  while sum(times) < min_seconds or len(times) < 3:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


# On XLA:CPU the convolution-based formulations cannot train a depthwise conv
# at batch 64, so they are not run there. Measured on 2 shared cores (dw 3x3,
# 14x14x672, E=4): the batch-folded grouped conv fails to allocate 133 GB at
# batch 64 (the kernel gradient is lowered densely, O((B*C)^2)); at batch 4 it
# and vmap_conv take 0.6-0.8 s per step and stacked_outputs 17 s.
_CPU_DEPTHWISE_TRAIN_INFEASIBLE = {
    "mixed_grouped": "kernel gradient needs O((B*C)^2) memory (133 GB at batch 64)",
    "vmap_conv": "lowers like mixed_grouped",
    "stacked_outputs": "kernel gradient takes ~17 s per step already at batch 4",
}


def _layer_formulation(case: Case, num_kernels: int) -> Formulation:
  """The CondConv layer as a formulation: its kernel is set to the given one."""
  layer = CondConv(case.features,
                   case.kernel_size,
                   num_kernels,
                   case.strides,
                   depthwise=case.depthwise)

  def apply(x, kernel, alpha, strides, groups):
    del strides, groups  # fixed by the layer's attributes
    return layer.apply({"params": {"kernel": kernel}}, x, alpha)

  return apply


def run_case(case: Case, batch: int, num_kernels: int,
             min_seconds: float) -> dict[str, dict[str, float | str | None]]:
  """Images/s of every formulation on one case, forward and forward+backward.

  `train` is None (with the reason in `train_skipped`) where it cannot run.
  """
  groups = case.channels if case.depthwise else 1
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (batch, case.size, case.size, case.channels))
  kernel = jax.random.normal(keys[1], (num_kernels, case.kernel_size, case.kernel_size,
                                       case.channels // groups, case.features)) / case.kernel_size
  alpha = jax.nn.sigmoid(jax.random.normal(keys[2], (batch, num_kernels)))
  formulations = dict(mixed_grouped=mixed_grouped,
                      stacked_outputs=stacked_outputs,
                      vmap_conv=vmap_conv,
                      per_tap=_layer_formulation(case, num_kernels))

  reference = None
  results = {}
  for name, formulation in formulations.items():
    forward = jax.jit(lambda x, w, a, f=formulation: f(x, w, a, case.strides, groups))
    # Training cost: gradients to the input, the kernels and the routing.
    loss = lambda x, w, a, f=formulation: jnp.sum(f(x, w, a, case.strides, groups)**2)
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    y = forward(x, kernel, alpha)
    if reference is None:
      reference = y
    np.testing.assert_allclose(y,
                               reference,
                               rtol=2e-3,
                               atol=2e-3 * float(jnp.std(reference)),
                               err_msg=f"{name} disagrees on {case.name}")
    results[name] = {"forward": batch / _time(lambda: forward(x, kernel, alpha), min_seconds)}
    infeasible = case.depthwise and jax.default_backend() == "cpu"
    if infeasible and name in _CPU_DEPTHWISE_TRAIN_INFEASIBLE:
      results[name].update(train=None, train_skipped=_CPU_DEPTHWISE_TRAIN_INFEASIBLE[name])
    else:
      results[name]["train"] = batch / _time(lambda: backward(x, kernel, alpha), min_seconds)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    kernels = [int(e) for e in _KERNELS.value.split(",")]
  except ValueError:
    sys.exit(f"error: --kernels={_KERNELS.value!r}: expected integers, e.g. 4,8")

  rows = []
  for num_kernels in kernels:
    for case in CASES:
      rows.append(
          dict(case=case.name,
               kernels=num_kernels,
               images_per_s=run_case(case, _BATCH.value, num_kernels, _MIN_SECONDS.value)))
  print(
      json.dumps(
          dict(benchmark="condconv_formulations",
               backend=jax.default_backend(),
               devices=jax.device_count(),
               cpu_count=os.cpu_count(),
               batch=_BATCH.value,
               results=rows)))

  names = list(rows[0]["images_per_s"])
  print(f"\nimages/s, batch {_BATCH.value}, forward / forward+backward "
        f"({jax.default_backend()}, {jax.device_count()} device(s))")
  print(f"{'case':<28} {'E':>2} " + " ".join(f"{n:>17}" for n in names))
  for row in rows:
    cells = " ".join(f"{r['forward']:>7.0f} / {'-' if r['train'] is None else round(r['train']):<7}"
                     for r in row["images_per_s"].values())
    print(f"{row['case']:<28} {row['kernels']:>2} {cells}")
  skipped = {
      name: r["train_skipped"]
      for row in rows for name, r in row["images_per_s"].items() if "train_skipped" in r
  }
  for name, reason in skipped.items():
    print(f"-: {name} not trained on depthwise cases: {reason}")


if __name__ == "__main__":
  # Defined here, not at import, so that other benchmarks can import this module.
  _BATCH = flags.DEFINE_integer("batch", 64, "Images per batch.")
  _KERNELS = flags.DEFINE_string("kernels", "4,8", "Comma-separated E values.")
  _MIN_SECONDS = flags.DEFINE_float("min_seconds", 0.3,
                                    "Time spent measuring each (case, formulation, pass).")
  run_command(main)

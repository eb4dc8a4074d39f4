"""The analytic FLOPs count, cross-checked against XLA, and the configs' budgets."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from coe_jax import config_base, flops
from coe_jax.config_loading import load_config
from coe_jax.models import conv
from coe_jax.models.networks import Expert
from coe_jax.models.spec import NetworkSpec
from tests.tiny import REPO, config_path, tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_count_matches_xla_cost_analysis(fused):
  """On a plain network (no squeeze-excitation): XLA counts 2 FLOPs per multiply-add,
  plus the elementwise work (BatchNorm, activations) that the analytic count leaves out.

  Lowered with convolutions as convolutions: XLA also counts the window copies
  of the CPU's matrix-product form, which are not multiply-adds. `fused` makes
  the first two stages Fused-MBConv (expansion 1, then 4)."""
  se_ratio = 0.0
  net = config_base.network(stem_features=16,
                            head_features=96,
                            classifier_features=64,
                            activation="relu",
                            stages=[
                                config_base.stage(16, 1, 3, 1, 1, se_ratio=se_ratio, fused=fused),
                                config_base.stage(24, 2, 3, 4, 2, se_ratio=se_ratio, fused=fused),
                                config_base.stage(32, 2, 5, 4, 2, se_ratio=se_ratio)
                            ])
  spec = NetworkSpec.from_config(net, "expert")
  module = Expert(spec, num_classes=10)
  images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
  variables = module.init(jax.random.key(0), images)
  with conv.formulation("conv"):
    compiled = jax.jit(lambda v, x: module.apply(v, x)).lower(variables, images).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  xla_macs = analysis["flops"] / 2
  ours = flops.network_macs(spec, 64, 3, 10)
  assert abs(ours - xla_macs) / xla_macs < 0.10, (ours, xla_macs)


def test_condconv_adds_mixing_cost():
  plain = config_base.network(16, [config_base.stage(16, 1, 3, 4, 1)], 32)
  cond = config_base.network(16, [config_base.stage(16, 1, 3, 4, 1)], 32, condconv_kernels=4)
  spec_plain = NetworkSpec.from_config(plain, "expert")
  spec_cond = NetworkSpec.from_config(cond, "expert")
  extra = flops.network_macs(spec_cond, 32, 3, 10) - flops.network_macs(spec_plain, 32, 3, 10)
  hidden = 64
  mixing = 4 * (16 * hidden + 9 * hidden + hidden * 16)  # expand, depthwise, project weights
  assert extra == mixing + 16 * 4  # plus the routing layer


@pytest.mark.parametrize("name,low,high", [("imagenet_coe_194m", 150e6, 194e6),
                                           ("imagenet_coe_100m", 75e6, 100e6)])
def test_imagenet_configs_meet_their_budgets(name, low, high):
  counts = flops.count(load_config(config_path(name)))
  assert low <= counts["max_flops"] <= high, counts
  assert counts["max_flops"] == counts["delegator_flops"] + counts["expert_flops"]
  assert counts["delegator_flops"] < counts["expert_flops"] / 3


def test_cli_prints_one_json_line():
  out = subprocess.run(
      [sys.executable, "-m", "coe_jax.flops", f"--config={config_path('imagenet_coe_194m')}"],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=True).stdout
  lines = out.strip().splitlines()
  assert len(lines) == 1
  counts = json.loads(lines[0])
  assert set(counts) == {"delegator_flops", "expert_flops", "max_flops"}
  assert 150e6 <= counts["max_flops"] <= 194e6


def test_cli_names_a_bad_key():
  result = subprocess.run([
      sys.executable, "-m", "coe_jax.flops", f"--config={config_path('digits')}",
      "--config.expert.stem_kernel=2"
  ],
                          cwd=REPO,
                          capture_output=True,
                          text=True)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "error: expert.stem_kernel=2: expected an odd kernel size")
  assert "Traceback" not in result.stderr


def test_train_step_flops_count_three_passes_per_trained_network():
  config = load_config(config_path("digits"))
  config.train.batch_size = 8
  # Every expert on every image (the routed step's count: tests/test_routed.py).
  config.train.expert_dispatch, config.train.generalist_warmup = "all", False
  macs = flops.count(config, 10)
  delegator, expert, n = macs["delegator_flops"], macs["expert_flops"], config.num_experts
  assert flops.train_step_flops(config, 10, "coadapt") == 2 * 8 * 3 * (delegator + n * expert)
  assert flops.train_step_flops(config, 10, "warmup") == 2 * 8 * 3 * (delegator + n * expert)
  # Frozen experts run forward only.
  assert flops.train_step_flops(config, 10, "delegator") == 2 * 8 * (3 * delegator + n * expert)


@pytest.mark.parametrize("kind, dtype, peak", [("TPU v4", "bfloat16", 275e12),
                                               ("TPU v5 lite", "bfloat16", 197e12),
                                               ("TPU v5", "bfloat16", 459e12),
                                               ("TPU v6 lite", "float32", 918e12),
                                               ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
                                               ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
                                               ("NVIDIA H100 PCIe", "bfloat16", 756e12),
                                               ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
                                               ("NVIDIA H200", "bfloat16", 989e12),
                                               ("cpu", "float32", None)])
def test_peak_flops_by_device_kind(kind, dtype, peak):
  assert flops.peak_flops_per_device(kind, dtype) == peak


def test_bracketing_widths_are_the_neighbours_of_the_target():
  network = tiny_config().expert
  widths = flops.WIDTH_MULTIPLIERS
  # A target between the FLOPs of two widths far apart.
  low = flops.bracketing_widths(network, 1.0, 16, 3, 10)[0].flops  # The narrowest width's.
  high = flops.bracketing_widths(network, 1e15, 16, 3, 10)[0].flops  # The widest's.
  target = (low * high)**0.5
  below, above = flops.bracketing_widths(network, target, 16, 3, 10)
  assert below.flops < target < above.flops
  assert widths.index(above.width_multiplier) == widths.index(below.width_multiplier) + 1
  closest = flops.scaled_to_flops(network, target, 16, 3, 10)
  assert closest in (below, above)
  assert closest.flops == min((below.flops, above.flops), key=lambda f: abs(math.log(f / target)))
  # A width that hits the target exactly is both neighbours.
  exact = flops.bracketing_widths(network, above.flops, 16, 3, 10)
  assert exact[0] == exact[1] and exact[0].flops == above.flops
  # Beyond the ends: the end's width twice.
  for target, end in ((1.0, widths[0]), (1e15, widths[-1])):
    ends = flops.bracketing_widths(network, target, 16, 3, 10)
    assert ends[0] == ends[1] and ends[0].width_multiplier == end

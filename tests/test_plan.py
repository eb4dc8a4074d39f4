"""The planner: one device's share of the step's FLOPs and memory, before renting a pod."""

import jax
import numpy as np
import pytest

from coe_jax import flops, plan
from coe_jax.models.coe import CoE
from tests.helpers import error_line, run_module
from tests.tiny import config_path, tiny_config


def _bytes(shape_tree) -> int:
  return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(shape_tree))


def test_a_plan_counts_one_devices_share_of_the_state():
  config = tiny_config(num_experts=4)
  config.train.ema_decay = 0.9
  result = plan.plan(config, data=2, expert=2, hbm_gib=1.0)
  params = jax.eval_shape(CoE(config, 10).init, jax.random.key(0))["params"]
  # The delegator on every device, half the experts on each.
  want = _bytes(params["delegator"]) + _bytes(params["experts"]) / 2
  gib = result["gib_per_device"]
  assert gib["params"] * plan.GIB == pytest.approx(want)
  assert gib["ema"] == pytest.approx(gib["params"])
  assert gib["activations_and_scratch"] > 0
  # Training FLOPs (3 forward passes) of the delegator on a quarter of the
  # batch and of two experts on half of it.
  macs = flops.count(config, 10)
  batch = config.train.batch_size
  want = 6 * (macs["delegator_flops"] * batch / 4 + macs["expert_flops"] * 2 * batch / 2)
  assert result["gflops_per_device"] * 1e9 == pytest.approx(want)
  assert result["fits"] == (result["total_gib_per_device"] <= 1.0)
  assert result["fits"] and not plan.plan(config, 2, 2, hbm_gib=1e-6)["fits"]


@pytest.mark.parametrize("args,fragment", [
    (["--mesh=4"], "--mesh='4': expected DATAxEXPERT"),
    (["--mesh=2x2", "--hbm-gib=0"], "--hbm-gib=0.0"),
    (["--mesh=1x3"], "mesh.expert=3"),
    (["--mesh=2x2", "--config.train.microbatches=1024"], "train.microbatches=1024"),
    (["--mesh=2x2", "--config.train.remat=everything"], "train.remat='everything'"),
])
def test_bad_planner_arguments_fail_in_one_line(args, fragment):
  assert fragment in error_line(
      run_module("coe_jax.plan", f"--config={config_path('digits')}", *args))

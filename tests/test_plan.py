"""The planner: one device's share of the step's FLOPs and memory, before renting a pod."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from coe_jax import flops, plan
from coe_jax.errors import CoEError
from coe_jax.models.coe import CoE
from tests.helpers import error_line, run_module
from tests.tiny import REPO, config_path, tiny_config


def _bytes(shape_tree) -> int:
  return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(shape_tree))


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_plan_compiles_the_accelerators_forms_and_evaluation():
  """The CPU's convolution forms (matrix products, taps) need more scratch than the
  accelerators' (the plan's own figure); evaluation's memory counts beside the state."""
  config = tiny_config(num_experts=4)
  small = plan.plan(config, data=2, expert=2, hbm_gib=1.0)
  assert small["cpu_forms_scratch_gib_per_device"] > small["gib_per_device"][
      "activations_and_scratch"] > 0
  assert small["eval_scratch_gib_per_device"] > 0
  assert small["total_gib_per_device"] == max(small["train_gib_per_device"],
                                              small["eval_gib_per_device"])
  config.eval.batch_size = 4096
  large = plan.plan(config, data=2, expert=2, hbm_gib=1.0)
  assert large["eval_scratch_gib_per_device"] > 4 * small["eval_scratch_gib_per_device"]
  assert large["train_gib_per_device"] == pytest.approx(small["train_gib_per_device"])
  assert large["total_gib_per_device"] == large["eval_gib_per_device"]


@pytest.mark.slow
def test_a_step_that_does_not_fit_gets_the_remat_or_micro_batches_that_fit():
  config = tiny_config(num_experts=4)
  config.train.batch_size = 64
  base = plan.plan(config, data=2, expert=2, hbm_gib=1.0, suggest=False)
  # A chip just too small for the step as configured, and big enough for the
  # same step in 2 micro-batches.
  config.train.microbatches = 2
  halved = plan.plan(config, data=2, expert=2, hbm_gib=1.0, suggest=False)["total_gib_per_device"]
  assert halved < base["total_gib_per_device"]
  config.train.microbatches = 1
  hbm = (halved + base["total_gib_per_device"]) / 2
  tight = plan.plan(config, data=2, expert=2, hbm_gib=hbm)
  assert not tight["fits"]
  suggestion = tight["suggestion"]
  assert suggestion and suggestion["total_gib_per_device"] <= hbm
  assert "fits with --config.train.remat=" in plan.format_plan(tight)


@pytest.mark.slow
def test_the_planner_runs_on_an_accelerator_host():
  """JAX_PLATFORMS names an accelerator this machine lacks, as on a TPU host: the
  planner still plans on fake CPU devices instead of starting (or failing on) the chips."""
  result = run_module(
      "coe_jax.plan",
      f"--config={config_path('digits')}",
      "--mesh=2x2",
      "--chip=v5e",
      # Each of the 2 data shards' routing groups holds 16 images: room
      # for digits' 16 drawn images, 6 + 6 outside the portions of 4.
      "--config.train.batch_size=32",
      JAX_PLATFORMS="tpu")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "fits in 14.9 GiB" in result.stdout  # 16 GB


@pytest.mark.parametrize("args,fragment", [
    (["--mesh=4", "--chip=v4"], "--mesh='4': expected DATAxEXPERT"),
    (["--mesh=2x2", "--hbm-gib=0"], "--hbm-gib=0.0"),
    (["--mesh=2x2"], "--chip=None: name the chip"),
    (["--mesh=2x2", "--chip=v9"], "--chip='v9': expected one of v4, v5e"),
    (["--mesh=1x3", "--chip=v4"], "mesh.expert=3"),
    (["--mesh=2x2", "--chip=v4", "--config.train.microbatches=1024"], "train.microbatches=1024"),
    (["--mesh=2x2", "--chip=v4", "--config.train.remat=everything"], "train.remat='everything'"),
    (["--accelerator=v4-63"], "--accelerator='v4-63': v4 types count TensorCores"),
    (["--accelerator=v9-8"], "--accelerator='v9-8': expected a Cloud TPU type"),
    (["--accelerator=v4-8", "--mesh=2x2"], "not with --mesh or --chip"),
    (["--accelerator=v5litepod-8", "--config.mesh.expert=3"], "mesh.expert=3"),
    (["--chip=v4"], "--mesh=None: expected DATAxEXPERT"),
    (["--mesh=2x2", "--chip=h100", "--mem_fraction=1.5"], "--mem_fraction=1.5"),
])
def test_bad_planner_arguments_fail_in_one_line(args, fragment):
  assert fragment in error_line(
      run_module("coe_jax.plan", f"--config={config_path('digits')}", *args))


@pytest.mark.parametrize("accelerator, chip, chips", [("v4-16", "v4", 8), ("v4-64", "v4", 32),
                                                      ("v5litepod-16", "v5e", 16),
                                                      ("v5e-32", "v5e", 32), ("v5p-128", "v5p", 64),
                                                      ("v6e-64", "v6e", 64)])
def test_a_cloud_tpu_type_names_its_chips(accelerator, chip, chips):
  """v4 and v5p names count TensorCores, two a chip; v5e and v6e names count chips."""
  assert plan.accelerator_chips(accelerator) == (chip, chips)


def test_the_config_mesh_is_laid_over_the_chips():
  config = tiny_config(num_experts=4)
  config.mesh.data, config.mesh.expert = -1, 2
  assert plan.config_mesh(config, 32) == (16, 2)
  config.mesh.data = 8
  with pytest.raises(CoEError, match="mesh.data=8"):
    plan.config_mesh(config, 32)


def test_chip_memories_are_in_gib_and_gpus_plan_against_what_jax_allocates():
  gib = {name: chip.gib for name, chip in plan.CHIPS.items()}
  assert gib["v4"] == 32.0  # 32 GiB of HBM
  assert abs(gib["v5e"] - 14.90) < 0.01 and abs(gib["v6e"] - 29.80) < 0.01  # 16 and 32 GB
  assert abs(gib["v5p"] - 88.48) < 0.01  # 95 GB
  # JAX takes 75% of a GPU unless XLA_CLIENT_MEM_FRACTION says otherwise.
  assert plan.chip_memory("h100", None) == ("h100", gib["h100"] * 0.75)
  assert plan.chip_memory("h100", None, 0.9) == ("h100", gib["h100"] * 0.9)
  assert plan.chip_memory("v4", None) == ("v4", 32.0)
  assert plan.chip_memory(None, 40.0) == (None, 40.0)


def _readme_pod_command() -> list[str]:
  """The words of the README's TPU-pod command (its table row)."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    row = next(line for line in f if line.startswith("| train on a TPU pod"))
  return re.search(r"`(launch/tpu_pod\.sh [^`]+)`", row).group(1).split()


@pytest.mark.slow
def test_the_readme_pod_command_fits_its_slice():
  """The planner on the README's exact command: its accelerator's chips, its config's
  mesh over them, its overrides (about 7 minutes of compiling on 2 cores)."""
  words = _readme_pod_command()
  flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
  overrides = words[words.index("--") + 1:] if "--" in words else []
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # As a user runs it.
  result = subprocess.run([
      sys.executable, "-m", "coe_jax.plan", f"--accelerator={flags['accelerator']}",
      f"--config={flags['config']}", "--json=/dev/stdout", *overrides
  ],
                          cwd=REPO,
                          env=env,
                          capture_output=True,
                          text=True,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  planned = json.loads(result.stdout.splitlines()[0])
  chip, chips = plan.accelerator_chips(flags["accelerator"])
  assert planned["devices"] == chips and planned["chip"] == chip
  assert planned["fits"], (planned["total_gib_per_device"], planned["hbm_gib"])

"""A two-process CPU 'pod' trains and evaluates like one process on the same mesh.

`tests/pod_worker.py` runs each process: 2 CPU devices each, joined by
`jax.distributed` through a coordinator on localhost that the environment
names (COE_COORDINATOR_ADDRESS, ...: the path of launch/gpu.sh's multi-node
runs; gloo collectives), a mesh across the 4 devices: data 2 x expert 2, where
each process reads its own half of every batch, and data 1 x expert 4, where
the expert axis spans the processes and both read the whole batch (the layout
of an 8x8 plan on TPU hosts of 4 chips). This is the multi-host path of pod
training: checkpoints are written together, the evaluation gathers outputs
from both processes, the first one writes the results. This process then
evaluates the pod's checkpoint on 4 devices, and trains the same config from
scratch for the reference losses and parameters.
"""

import shutil

import jax
import numpy as np
import pytest

from coe_jax.evaluation import run as evaluation_run
from coe_jax.training import train
from tests.helpers import (
    checkpoint_params,
    pod_config,
    results_figures,
    run_processes,
    training_metrics,
)

# End to end and minutes long: `make test-all` runs them, `make test` does not.
pytestmark = pytest.mark.slow

NUM_PROCESSES = 2


@pytest.mark.parametrize("data,expert", [(2, 2), (1, 4)])
def test_two_process_pod_run_equals_a_one_process_run(tmp_path, data, expert):
  pod = tmp_path / "pod"
  outputs = run_processes("tests.pod_worker",
                          [[str(pod), str(data), str(expert)]] * NUM_PROCESSES,
                          timeout_s=600)
  # Each process says how much of every batch it loads.
  share = pod_config().train.batch_size // data  # Each data row is one process's or both's.
  for i, output in enumerate(outputs):
    assert f"this process ({i} of {NUM_PROCESSES}) loads {share} examples" in output, output[-3000:]

  pod_results = results_figures(pod)
  # Every process ends with the same answer, which only the first one wrote.
  top1 = [line for output in outputs for line in output.splitlines() if " top1=" in line]
  assert sorted(top1) == [
      f"process {i}: top1={pod_results['top1']!r}" for i in range(NUM_PROCESSES)
  ]

  # Evaluation: the pod's checkpoint evaluated in this process, on the same
  # mesh at the pod's tau, gives the same figures exactly: the same networks
  # on the same examples, each device computing its own share alike.
  copy = tmp_path / "pod_copy"
  shutil.copytree(pod, copy)
  config = pod_config(data, expert)
  config.eval.threshold = pod_results["threshold"]
  trainer = train.Trainer(config, str(copy), devices=jax.devices()[:4])
  here = evaluation_run.evaluate(trainer, train.train(trainer), write_files=False)
  # Calibrated there, fixed here: only a calibrated tau has every rule's (threshold_rules).
  assert set(here) == set(pod_results) - {"threshold_rules"}
  for key, value in pod_results.items():
    if key not in ("threshold_rule", "threshold_source", "threshold_rules"):
      assert here[key] == value, key

  # Training: the same run in this process on 4 devices. The logged losses
  # agree closely. Parameters only loosely: Adam scales each gradient to a
  # step of about the learning rate, so near-zero gradients, whose sign
  # depends on the order of float sums across processes, move a few BatchNorm
  # biases by up to ~1e-3 either way. (Its figures are not compared: tau is
  # one of the hold-out's confidences, and float order can move which.)
  reference = tmp_path / "reference"
  train.train(train.Trainer(pod_config(data, expert), str(reference), devices=jax.devices()[:4]))
  got, want = training_metrics(pod), training_metrics(reference)
  assert [m["step"] for m in got] == [m["step"] for m in want] and want
  for g, w in zip(got, want):
    for key in ("loss", "expert_loss", "selection_loss", "delegator_loss"):
      assert g[key] == pytest.approx(w[key], rel=1e-4), (g["step"], key)
  for a, b in zip(checkpoint_params(pod), checkpoint_params(reference), strict=True):
    np.testing.assert_allclose(a, b, atol=5e-3)

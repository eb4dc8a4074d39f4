"""Two processes resume the same checkpoint when only one of them can read the newest.

Each process (`tests/restore_worker.py`, one CPU device, joined through
`jax.distributed` on localhost as tests/test_pod.py's are) gets its own copy
of a run's workdir, as hosts whose views of shared storage differ would; in
process 1's copy the newest checkpoint has lost its array data. Both must
restore the same older step, with the same parameters, and neither may wait
forever on the other: process 0 names the steps to try, a step counts only if
every process read it, and all of them join the setting aside.
"""

import shutil

import jax
import numpy as np
import pytest

from coe_jax import run_dir
from coe_jax.training import checkpointing, train
from tests.helpers import run_processes, single_device_trainer, train_config

# Two processes that start jax and build a trainer each: about half a minute.
pytestmark = pytest.mark.slow

NUM_PROCESSES = 2
# Long enough for both processes to start on a busy machine; a deadlock never ends.
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A trained workdir with checkpoints 3 and 6, and the sum of |params| of checkpoint 3."""
  workdir = tmp_path_factory.mktemp("multihost") / "run"
  trainer = single_device_trainer(train_config(), str(workdir))
  train.train(trainer)
  checkpointer = checkpointing.Checkpointer(str(workdir),
                                            keep=trainer.config.train.keep_checkpoints,
                                            fingerprint=checkpointing.shape_fingerprint(
                                                trainer.config, trainer.info.num_classes))
  try:
    assert sorted(checkpointer.manager.all_steps()) == [3, 6]
    _, state = checkpointer.restore_exactly(trainer.abstract_state, 3)
  finally:
    checkpointer.close()
  checksum = sum(
      float(np.abs(np.asarray(leaf, np.float64)).sum())
      for leaf in jax.tree.leaves(jax.device_get(state.params)))
  return workdir, checksum


def test_processes_that_disagree_on_the_newest_checkpoint_resume_the_same_step(run, tmp_path):
  reference, step3_checksum = run
  workdirs = [shutil.copytree(reference, tmp_path / f"host{i}") for i in range(NUM_PROCESSES)]
  shutil.rmtree(workdirs[1] / run_dir.CHECKPOINTS / "6" / "state" / "d")  # Its arrays' data.
  outputs = run_processes("tests.restore_worker", [[str(w)] for w in workdirs], timeout_s=TIMEOUT_S)
  results = [line for output in outputs for line in output.splitlines() if ": step=" in line]
  assert results == [
      f"process {i}: step=3 checksum={step3_checksum!r}" for i in range(NUM_PROCESSES)
  ], "\n".join(output[-2000:] for output in outputs)
  # Process 0 set aside its own copy of step 6 (which process 1 could not read),
  # so that the run saves step 6 again; process 1 moves nothing.
  assert sorted(p.name for p in (workdirs[0] / run_dir.CHECKPOINTS).iterdir()) == ["3"]
  assert (workdirs[0] / run_dir.UNREADABLE_CHECKPOINTS / "6" / "state").is_dir()
  assert not (workdirs[1] / run_dir.UNREADABLE_CHECKPOINTS).exists()
  reports = [line for line in outputs[0].splitlines() if "cannot be read" in line]
  assert len(reports) == 1 and "process 1 cannot read it" in reports[0], outputs[0][-3000:]

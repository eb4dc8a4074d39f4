r"""One process of tests/test_multihost_restore.py (not a test module itself).

    COE_COORDINATOR_ADDRESS=localhost:PORT COE_NUM_PROCESSES=N COE_PROCESS_ID=I \
        python -m tests.restore_worker WORKDIR

Each process has one CPU device and its own WORKDIR, joins the others through
`coe_jax.parallel.distributed` as `coe_jax.main` does, and restores the
newest readable checkpoint of `pod_config(data=N, expert=1)` there as a
resuming run does (setting unreadable ones aside), then prints the step and a
checksum of the restored parameters.
"""

import os
import sys

# Before jax starts its backend.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from coe_jax.parallel import distributed  # noqa: E402
from coe_jax.training import checkpointing, train  # noqa: E402
from tests.helpers import pod_config  # noqa: E402

# pylint: enable=g-import-not-at-top,wrong-import-position


def main(workdir: str) -> None:
  processes = distributed.resolve()  # From the environment, as main without the flags.
  distributed.initialize(processes)
  trainer = train.Trainer(pod_config(data=jax.process_count(), expert=1), workdir)
  checkpointer = checkpointing.Checkpointer(workdir,
                                            keep=trainer.config.train.keep_checkpoints,
                                            fingerprint=checkpointing.shape_fingerprint(
                                                trainer.config, trainer.info.num_classes))
  try:
    restored = checkpointer.restore_latest(trainer.abstract_state, set_aside_unreadable=True)
  finally:
    checkpointer.close()
  step, state = restored if restored is not None else (None, None)
  # The parameters are replicated over the data axis: each process holds them whole.
  checksum = sum(
      float(np.abs(np.asarray(leaf.addressable_shards[0].data, np.float64)).sum())
      for leaf in jax.tree.leaves(state.params)) if state is not None else None
  print(f"process {jax.process_index()}: step={step} checksum={checksum!r}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])

r"""One process of a CPU 'pod' for tests/test_pod.py (not a test module itself).

    COE_COORDINATOR_ADDRESS=localhost:PORT COE_NUM_PROCESSES=N COE_PROCESS_ID=I \
        python -m tests.pod_worker WORKDIR DATA EXPERT

Each process gets `LOCAL_DEVICES` CPU devices and joins the others as
`coe_jax.main` does, through `coe_jax.parallel.distributed` with an explicit
coordinator (the path of launch/gpu.sh; gloo for the CPU's cross-process
collectives), then trains and evaluates `pod_config(DATA, EXPERT)` in WORKDIR, as every
host of a pod runs `coe_jax.main`.
"""

import os
import sys

LOCAL_DEVICES = 2

# Before jax starts its backend.
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
                           " --xla_backend_optimization_level=0")
os.environ["JAX_PLATFORMS"] = "cpu"

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # noqa: E402

from coe_jax.parallel import distributed  # noqa: E402
from coe_jax.training import train  # noqa: E402
from tests.helpers import pod_config  # noqa: E402

# pylint: enable=g-import-not-at-top,wrong-import-position


def main(workdir: str, data: int, expert: int) -> None:
  logging.set_verbosity(logging.INFO)  # The set-up lines the test reads.
  processes = distributed.resolve()  # From the environment, as main without the flags.
  distributed.initialize(processes)
  results = train.train_and_evaluate(pod_config(data, expert), workdir)
  print(f"process {processes['process_id']}: top1={results['top1']!r}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

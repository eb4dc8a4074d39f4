"""One process of a CPU 'pod' for tests/test_pod.py (not a test module itself).

    python -m tests.pod_worker PROCESS_ID NUM_PROCESSES PORT WORKDIR

Each process gets `LOCAL_DEVICES` CPU devices and joins the others through
`jax.distributed` on localhost, with gloo for the cross-process collectives,
then trains and evaluates `pod_config()` in WORKDIR, as every host of a TPU
pod runs `coe_jax.main`.
"""

import os
import sys

LOCAL_DEVICES = 2

# Before jax starts its backend.
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
                           " --xla_backend_optimization_level=0")
os.environ["JAX_PLATFORMS"] = "cpu"

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from coe_jax import train
from tests.helpers import pod_config
# pylint: enable=g-import-not-at-top,wrong-import-position


def main(process_id: int, num_processes: int, port: int, workdir: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes,
                             process_id=process_id)
  results = train.train_and_evaluate(pod_config(), workdir)
  print(f"process {process_id}: top1={results['top1']!r}", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

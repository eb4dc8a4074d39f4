r"""Trains and evaluates CoE; resumes from the workdir's checkpoints.

    python -m coe_jax.main --config=configs/digits.py --workdir=runs/digits \
        [--config.train.batch_size=256 ...]

Writes `WORKDIR/results.json`, plots and TensorBoard summaries. On a TPU pod,
run the same command on every host with COE_DISTRIBUTED=1 (launch/tpu_pod.sh
does); `jax.distributed` then finds the other hosts.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from coe_jax.errors import CoEError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # TensorFlow only feeds data on the host; it must not take accelerator memory.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax  # pylint: disable=g-import-not-at-top
  if os.environ.get("COE_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  from coe_jax import report, train  # pylint: disable=g-import-not-at-top
  try:
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except CoEError as e:
    sys.exit(f"error: {e}")
  if results is not None and jax.process_index() == 0:
    print(report.format_results(results, _WORKDIR.value), flush=True)


if __name__ == "__main__":
  app.run(main)

r"""Trains and evaluates CoE; resumes from the workdir's checkpoints.

    python -m coe_jax.main --config=configs/digits.py --workdir=runs/digits \
        [--config.train.batch_size=256 ...]

Writes `WORKDIR/results.json`, plots and TensorBoard summaries. On a TPU pod,
run the same command on every host with COE_DISTRIBUTED=1 (launch/tpu_pod.sh
does); `jax.distributed` then finds the other hosts.

Bad input (config values, data, workdir, an unknown --config.KEY, a missing
config file) is reported in one line, `error: KEY=VALUE: ...`, with exit
status 1. A run stopped by SIGTERM saves a checkpoint and exits with status
143 (128 + SIGTERM), so that schedulers see it did not finish; the same
command resumes it.
"""

import logging as pylogging
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from coe_jax.config_loading import flag_config, parse_flags
from coe_jax.errors import CoEError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Drops the checkpoint library's routine INFO lines; its warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    config = flag_config(_CONFIG)  # Before the slow imports below.
  except CoEError as e:
    sys.exit(f"error: {e}")
  import jax  # pylint: disable=g-import-not-at-top
  if os.environ.get("COE_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  from coe_jax import report, train  # pylint: disable=g-import-not-at-top
  try:
    results = train.train_and_evaluate(config, _WORKDIR.value)
  except CoEError as e:
    sys.exit(f"error: {e}")
  if results is None:  # Stopped by SIGTERM, with a checkpoint.
    sys.exit(128 + signal.SIGTERM)
  if jax.process_index() == 0:
    print(report.format_results(results, _WORKDIR.value), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

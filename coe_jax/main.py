r"""Trains and evaluates CoE; resumes from the workdir's checkpoints.

    python -m coe_jax.main --config=configs/digits.py --workdir=runs/digits \
        [--config.train.batch_size=256 ...]

Writes `WORKDIR/results.json`, plots and TensorBoard summaries. Several
processes (hosts) train one run together when each runs the same command with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the
environment variables COE_COORDINATOR_ADDRESS, COE_NUM_PROCESSES,
COE_PROCESS_ID), process 0 serving at HOST:PORT; launch/gpu.sh does this on GPU
nodes and under SLURM. On a TPU pod, COE_DISTRIBUTED=1 instead lets
`jax.distributed` find the other hosts (launch/tpu_pod.sh). See
`coe_jax/parallel/distributed.py`.

`--platform=gpu` (or tpu, cpu) stops the run in one line unless jax
computes there, instead of letting it fall back to the CPU.

Bad input (config values, data, workdir, an unknown --config.KEY, a missing
config file, incomplete or bad multi-process settings, a missing platform) is reported in one
line, `error: KEY=VALUE: ...`, with exit status 1. A run stopped by SIGTERM
saves a checkpoint and exits with status 143 (128 + SIGTERM), so that
schedulers see it did not finish; the same command resumes it.
"""

import logging as pylogging
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from coe_jax.config_loading import flag_config, run_command
from coe_jax.errors import CoEError
from coe_jax.parallel import distributed

PLATFORMS = ("cpu", "gpu", "tpu")


def check_platform(wanted: str | None) -> None:
  """Raises `CoEError` unless jax's default backend is `wanted` (None: any)."""
  import jax  # pylint: disable=g-import-not-at-top
  if wanted is None:
    return
  try:
    backend = jax.default_backend()
  except RuntimeError as e:  # No platform at all could start (JAX_PLATFORMS names a missing one).
    raise CoEError(
        f"platform={wanted!r}: jax could not start a backend ({str(e).splitlines()[0]})") from None
  if backend != wanted:
    kinds = sorted({d.device_kind for d in jax.devices()})
    raise CoEError(f"platform={wanted!r}: jax found no {wanted} and would run on {backend} "
                   f"({', '.join(kinds)}); install jax's {wanted} support (launch/gpu.sh does: "
                   "pip install -e '.[cuda]') and check the devices are visible (nvidia-smi, "
                   "CUDA_VISIBLE_DEVICES)")


_CONFIG = config_flags.DEFINE_config_file("config",
                                          None,
                                          "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])
# Strings, checked by `distributed.resolve` alike whether they come from these
# flags or the environment, so that a bad value is one `error:` line either way.
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a multi-process run "
    "(else $COE_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_string(
    "num_processes", None, "Number of processes of a multi-process run (else $COE_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_string(
    "process_id", None, "This process's index, 0 to num_processes - 1 (else $COE_PROCESS_ID).")
# jax falls back to the CPU when it finds no accelerator; a GPU or TPU run that
# did would train for days at a fraction of the speed, or stop on the mesh.
_PLATFORM = flags.DEFINE_enum(
    "platform", None, PLATFORMS, "Stop in one line unless jax computes on this platform "
    "(launch/gpu.sh passes gpu, launch/tpu_pod.sh tpu).")


class _QuietLibraries(pylogging.Filter):
  """Drops the checkpoint library's routine INFO lines; its warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Bad flags fail here, before the slow imports below (`run_command` reports them).
  config = flag_config(_CONFIG)
  processes = distributed.resolve(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  import jax  # pylint: disable=g-import-not-at-top
  distributed.initialize(processes)
  from coe_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  from coe_jax.training import train  # pylint: disable=g-import-not-at-top
  check_platform(_PLATFORM.value)
  results = train.train_and_evaluate(config, _WORKDIR.value)
  if results is None:  # Stopped by SIGTERM, with a checkpoint.
    sys.exit(128 + signal.SIGTERM)
  if jax.process_index() == 0:
    print(report.format_results(results, _WORKDIR.value), flush=True)


if __name__ == "__main__":
  run_command(main)

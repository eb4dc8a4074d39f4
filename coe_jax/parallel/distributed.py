"""Multi-process settings: which processes train together, and joining them.

Each setting comes from its flag of `coe_jax.main`, else from its environment
variable (so that a scheduler can set it per process):

    --coordinator_address=HOST:PORT   COE_COORDINATOR_ADDRESS
    --num_processes=N                 COE_NUM_PROCESSES
    --process_id=I                    COE_PROCESS_ID

Given, the three go together and `jax.distributed` joins the processes through
the coordinator (process 0 serves it at HOST:PORT), on any platform. None
given and `COE_DISTRIBUTED=1`: jax detects them itself, which it can on TPU
pods, SLURM and Open MPI (launch/tpu_pod.sh). Otherwise: one process.

`resolve` only reads and checks, without importing jax, so that bad values
are reported before the slow imports; `initialize` then acts on its answer.
"""

import os
from collections.abc import Mapping
from typing import Any

from coe_jax.errors import require

# Setting -> its environment variable.
ENV = {
    "coordinator_address": "COE_COORDINATOR_ADDRESS",
    "num_processes": "COE_NUM_PROCESSES",
    "process_id": "COE_PROCESS_ID"
}


def resolve(coordinator_address: str | None = None,
            num_processes: str | None = None,
            process_id: str | None = None,
            environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """The keyword arguments of `jax.distributed.initialize` for this process.

  Args:
    coordinator_address, num_processes, process_id: the flags' values as
      given (strings), or None (an empty string counts as not given).
    environ: where the environment variables are read; `os.environ` if None.

  Returns:
    The three settings, checked and typed; `{}` to let jax detect them
    (`COE_DISTRIBUTED=1`, none given); or None for a single process.

  Raises:
    CoEError: some of the three given but not all, or a bad value; the message
      names the flag or variable the value came from.
  """
  environ = os.environ if environ is None else environ
  flag_values = {
      "coordinator_address": coordinator_address,
      "num_processes": num_processes,
      "process_id": process_id
  }
  given = {}  # Setting -> (the key it came from, its value).
  for name, value in flag_values.items():
    if value not in (None, ""):
      given[name] = (name, value)
    elif environ.get(ENV[name], "") != "":
      given[name] = (ENV[name], environ[ENV[name]])
  if not given:
    return {} if environ.get("COE_DISTRIBUTED") == "1" else None
  for name in flag_values:
    require(
        name in given, name, None, f"--coordinator_address, --num_processes and --process_id (or "
        f"{', '.join(ENV.values())}) go together: give all three or none")

  key, address = given["coordinator_address"]
  host, _, port = address.rpartition(":")
  port_ok = port.isascii() and port.isdigit() and 0 < int(port) < 65536
  require(
      bool(host) and port_ok, key, address,
      "expected HOST:PORT, process 0's host and a port number from 1 to 65535")
  key, value = given["num_processes"]
  count = _integer(value)
  require(count is not None and count >= 1, key, value, "expected an integer >= 1")
  key, value = given["process_id"]
  index = _integer(value)
  require(index is not None and 0 <= index < count, key, value,
          f"expected an integer from 0 to {count - 1} (the number of processes - 1)")
  return {"coordinator_address": address, "num_processes": count, "process_id": index}


def _integer(text: str) -> int | None:
  try:
    return int(text)
  except ValueError:
    return None


def initialize(arguments: dict[str, Any] | None) -> None:
  """Joins the other processes as `resolve` said; must come before any jax computation."""
  if arguments is None:
    return
  import jax  # pylint: disable=g-import-not-at-top
  if _wants_gloo(arguments.get("num_processes", 1), jax.config.jax_platforms,
                 jax.config.jax_cpu_collectives_implementation):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**arguments)


def _wants_gloo(num_processes: int, platforms: str | None, chosen: str | None) -> bool:
  """Whether to select gloo for the CPU's cross-process collectives.

  Without an implementation, computations on CPU devices of several processes
  fail. jax 0.10.2 defaults to gloo, older versions to none; a user's choice
  (e.g. mpi) stands. Unless the platforms are named (JAX_PLATFORMS), the CPU
  may be the one used; gloo then costs nothing on an accelerator.
  """
  may_use_cpu = not platforms or "cpu" in platforms.split(",")
  return num_processes > 1 and may_use_cpu and chosen is None

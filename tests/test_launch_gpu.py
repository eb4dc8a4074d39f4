"""The GPU launch path: launch/gpu.sh's dry runs and errors, and `coe_jax.parallel.distributed`.

The script's SLURM job is also run here, with stand-ins for `scontrol` and
`srun` that print what each task would run. The two-process run through the
same explicit coordinator is tests/test_pod.py.
"""

import os
import re
import stat
import subprocess

import jax
import pytest

from coe_jax.errors import CoEError
from coe_jax.parallel import distributed
from tests.helpers import error_line, run_module
from tests.tiny import REPO, config_path

GPU = os.path.join(REPO, "launch", "gpu.sh")
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
BASE = ["--config=configs/digits.py", "--workdir=runs/x"]
# What a user's shell may hold; each run starts without them.
CLUSTER_ENV = ("COE_COORDINATOR_ADDRESS", "COE_NUM_PROCESSES", "COE_PROCESS_ID", "COE_DISTRIBUTED")


def _run(*args, env=None, path=None):
  full = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
  full.update(env or {})
  if path:
    full["PATH"] = f"{path}{os.pathsep}{full['PATH']}"
  return subprocess.run(["bash", GPU, *args],
                        capture_output=True,
                        text=True,
                        cwd=REPO,
                        env=full,
                        timeout=60)


def _lines(result):
  assert result.returncode == 0, result.stderr
  return [line.strip() for line in result.stdout.strip().splitlines()]


def test_single_node_dry_run_installs_then_trains():
  install, train = _lines(_run("--dry-run", *BASE, "--", "--config.seed=3"))
  assert install == f"bash {REPO}/launch/install.sh cuda"
  assert train == f"{PYTHON} -m coe_jax.main --platform=gpu {' '.join(BASE)} --config.seed=3"


def test_mem_fraction_reaches_jax_on_every_node():
  install, train = _lines(_run("--dry-run", "--mem-fraction=0.9", *BASE))
  assert train.startswith(f"env XLA_CLIENT_MEM_FRACTION=0.9 {PYTHON} -m coe_jax.main")
  _, _, script = _slurm_dry_run("--nodes=2", "--mem-fraction=0.95", *BASE)
  assert f"{REPO}/launch/gpu.sh --no-install --mem-fraction=0.95" in script


@pytest.mark.parametrize("source", ["flags", "environment"])
def test_multi_node_dry_run_gives_main_the_processes(source):
  cluster = {
      "COE_COORDINATOR_ADDRESS": "node0:1234",
      "COE_NUM_PROCESSES": "4",
      "COE_PROCESS_ID": "3"
  }
  if source == "flags":
    result = _run("--dry-run", "--no-install", *BASE, "--coordinator=node0:1234",
                  "--num-processes=4", "--process-id=3")
  else:
    result = _run("--dry-run", "--no-install", *BASE, env=cluster)
  assert _lines(result) == [
      f"{PYTHON} -m coe_jax.main --platform=gpu {' '.join(BASE)} --coordinator_address=node0:1234 "
      "--num_processes=4 --process_id=3"
  ]


def _slurm_dry_run(*args):
  """The dry run of --slurm: (its command lines, the job script's path, its text)."""
  lines = _run("--dry-run", "--slurm", *args).stdout.splitlines()
  start = lines.index(next(line for line in lines if line.startswith("cat > ")))
  end = lines.index("EOF")
  job = re.fullmatch(r"cat > (\S+) <<'EOF'", lines[start]).group(1)
  return [line.strip() for line in lines[:start] + lines[end + 1:]
         ], job, "\n".join(lines[start + 1:end])


def test_slurm_dry_run_writes_a_job_script_then_submits_it():
  commands, job, script = _slurm_dry_run("--nodes=4", "--gpus-per-node=8", "--partition=gpu",
                                         "--time=12:00:00", "--port=9999", *BASE, "--",
                                         "--config.train.batch_size=1024")
  assert job == "runs/x/slurm/train.sbatch"
  assert commands == ["mkdir -p runs/x/slurm", f"sbatch {job}"]
  for header in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                 "--time=12:00:00", "--output=runs/x/slurm/%j.out"):
    assert f"#SBATCH {header}\n" in script, header
  # Installed once, by the job's shell, before the tasks start.
  assert script.index(f"bash {REPO}/launch/install.sh cuda") < script.index("srun")
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
  srun = script[script.index("exec srun"):]
  # In single quotes: each task's shell expands its own index.
  assert ("'exec bash \"$0\" --num-processes=\"$SLURM_NTASKS\" --process-id=\"$SLURM_PROCID\" "
          "\"$@\"'") in srun
  for part in (f"{REPO}/launch/gpu.sh --no-install", *BASE, '--coordinator="$FIRST_NODE:9999"',
               "-- --config.train.batch_size=1024"):
    assert part in srun, part


def test_slurm_defaults_and_no_install():
  _, _, script = _slurm_dry_run("--nodes=2", "--no-install", *BASE)
  assert "#SBATCH --nodes=2\n" in script and '--coordinator="$FIRST_NODE:8476"' in script
  for absent in ("--gpus-per-node", "--partition", "--time", "install.sh", "--mem-fraction"):
    assert absent not in script, absent


def _stand_in(folder, name, body):
  path = folder / name
  path.write_text(f"#!/usr/bin/env bash\n{body}\n")
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_job_runs_main_once_per_node_with_its_index(tmp_path):
  """The written script, run under stand-ins for SLURM's commands, as the job would be."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stand_in(bin_dir, "sbatch", 'echo "sbatch $*"')
  _stand_in(bin_dir, "scontrol", 'echo "gpu-a"; echo "gpu-b"; echo "gpu-c"')
  # Each task with its own SLURM_PROCID, as a dry run: it prints main's command.
  _stand_in(
      bin_dir, "srun", 'while [[ $1 == --* ]]; do shift; done\n'
      'for i in 0 1 2; do '
      'SLURM_NTASKS=3 SLURM_PROCID=$i "$@" --dry-run; done')
  workdir = tmp_path / "run"
  submitted = _lines(
      _run("--slurm",
           "--nodes=3",
           "--no-install",
           "--config=configs/digits.py",
           f"--workdir={workdir}",
           path=bin_dir))
  job = workdir / "slurm" / "train.sbatch"
  assert submitted == [f"sbatch {job}"]
  _, _, dry_script = _slurm_dry_run("--nodes=3", "--no-install", "--config=configs/digits.py",
                                    f"--workdir={workdir}")
  assert job.read_text() == dry_script + "\n"  # The dry run shows what is written.

  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
  env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="gpu-[a-c]")
  result = subprocess.run(["bash", str(job)], capture_output=True, text=True, env=env, timeout=60)
  assert _lines(result) == [
      f"{PYTHON} -m coe_jax.main --platform=gpu --config=configs/digits.py --workdir={workdir} "
      f"--coordinator_address=gpu-a:8476 --num_processes=3 --process_id={i}" for i in range(3)
  ]


@pytest.mark.parametrize("args, env, fragment", [
    (["--workdir=runs/x"], {}, "missing --config"),
    (["--config=configs/digits.py"], {}, "missing --workdir"),
    ([*BASE, "--gpus=8"], {}, "unknown argument --gpus=8"),
    ([*BASE, "--coordinator=node0:1234", "--num-processes=2", "--process-id=2"
     ], {}, "--process-id=2: expected an integer from 0 to 1"),
    ([*BASE], {
        "COE_COORDINATOR_ADDRESS": "node0:1234",
        "COE_NUM_PROCESSES": "2",
        "COE_PROCESS_ID": "-1"
    }, "COE_PROCESS_ID=-1: expected an integer from 0 to 1"),
    ([*BASE, "--coordinator=node0", "--num-processes=2", "--process-id=0"
     ], {}, "--coordinator=node0: expected HOST:PORT"),
    ([*BASE, "--coordinator=node0:1234", "--num-processes=0", "--process-id=0"
     ], {}, "--num-processes=0: expected an integer >= 1"),
    ([*BASE, "--coordinator=node0:1234", "--process-id=0"], {}, "missing --num-processes=N"),
    ([*BASE, "--slurm"], {}, "--slurm needs --nodes=N"),
    ([*BASE, "--slurm", "--nodes=two"], {}, "--nodes=two: expected an integer >= 1"),
    ([*BASE, "--slurm", "--nodes=2", "--process-id=1"], {}, "--process-id=1: not with --slurm"),
    (["--config=configs/digits.py", "--workdir=gs://b/run", "--slurm", "--nodes=2"
     ], {}, "--workdir=gs://b/run: with --slurm"),
    ([*BASE, "--nodes=2"], {}, "--nodes=2: only with --slurm"),
    ([*BASE, "--mem-fraction=1.5"], {}, "--mem-fraction=1.5: expected a share"),
    ([*BASE, "--mem-fraction=0"], {}, "--mem-fraction=0: expected a share"),
])
def test_bad_arguments_fail_in_one_line(args, env, fragment):
  result = _run("--dry-run", *args, env=env)
  assert result.returncode == 2 and not result.stdout, result
  assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
  assert fragment in result.stderr, result.stderr


# coe_jax.parallel.distributed


def test_resolve_reads_flags_then_the_environment():
  explicit = {"coordinator_address": "node0:1234", "num_processes": 4, "process_id": 3}
  assert distributed.resolve("node0:1234", "4", "3", environ={}) == explicit
  environ = {
      "COE_COORDINATOR_ADDRESS": "node0:1234",
      "COE_NUM_PROCESSES": "4",
      "COE_PROCESS_ID": "1"
  }
  assert distributed.resolve(environ=environ) == {**explicit, "process_id": 1}
  # A flag stands for its own variable; the others still count.
  assert distributed.resolve(process_id="3", environ=environ) == explicit
  assert distributed.resolve("", "", "", environ={"COE_DISTRIBUTED": "1"}) == {}
  assert distributed.resolve(environ={"COE_DISTRIBUTED": "0"}) is None
  assert distributed.resolve(environ={}) is None


@pytest.mark.parametrize("flags, environ, message", [
    (("node0:1234", None, "0"), {}, "num_processes=None: --coordinator_address, --num_processes "
     "and --process_id (or COE_COORDINATOR_ADDRESS"),
    ((None, None, None), {
        "COE_PROCESS_ID": "0",
        "COE_DISTRIBUTED": "1"
    }, "coordinator_address=None"),
    (("node0", "2", "0"), {}, "coordinator_address='node0': expected HOST:PORT"),
    ((":1234", "2", "0"), {}, "coordinator_address=':1234': expected HOST:PORT"),
    (("node0:http", "2", "0"), {}, "coordinator_address='node0:http'"),
    (("node0:70000", "2", "0"), {}, "coordinator_address='node0:70000'"),
    (("node0:1234", "two", "0"), {}, "num_processes='two': expected an integer >= 1"),
    (("node0:1234", "0", "0"), {}, "num_processes='0': expected an integer >= 1"),
    (("node0:1234", "2", "2"), {}, "process_id='2': expected an integer from 0 to 1"),
    ((None, None, None), {
        "COE_COORDINATOR_ADDRESS": "node0:1234",
        "COE_NUM_PROCESSES": "2",
        "COE_PROCESS_ID": "-1"
    }, "COE_PROCESS_ID='-1': expected an integer"),
])
def test_resolve_names_what_is_missing_or_bad(flags, environ, message):
  with pytest.raises(CoEError) as error:
    distributed.resolve(*flags, environ=environ)
  assert str(error.value).startswith(message) and "\n" not in str(error.value), error.value


@pytest.fixture(name="initialize_calls")
def _initialize_calls(monkeypatch):
  """What `jax.distributed.initialize` is called with, and the CPU collectives then."""
  calls = []
  monkeypatch.setattr(
      jax.distributed, "initialize", lambda *args, **kwargs: calls.append(
          (args, kwargs, jax.config.jax_cpu_collectives_implementation)))
  chosen = jax.config.jax_cpu_collectives_implementation
  jax.config.update("jax_cpu_collectives_implementation", None)  # As jax before 0.10 had it.
  yield calls
  jax.config.update("jax_cpu_collectives_implementation", chosen)


def test_initialize_joins_through_the_coordinator_with_gloo_on_cpu(initialize_calls):
  explicit = {"coordinator_address": "node0:1234", "num_processes": 2, "process_id": 1}
  distributed.initialize(explicit)
  assert initialize_calls == [((), explicit, "gloo")]


def test_initialize_lets_jax_detect_or_does_nothing(initialize_calls):
  distributed.initialize({})  # COE_DISTRIBUTED=1: the TPU pods' path, as before.
  assert initialize_calls == [((), {}, None)]
  distributed.initialize(None)
  assert len(initialize_calls) == 1


@pytest.mark.parametrize("num_processes, platforms, chosen, wanted", [
    (2, None, None, True),
    (2, "cpu", None, True),
    (2, "cuda,cpu", None, True),
    (2, "cuda", None, False),
    (1, None, None, False),
    (2, None, "mpi", False),
])
def test_gloo_where_the_cpu_computes_across_processes(num_processes, platforms, chosen, wanted):
  # pylint: disable-next=protected-access
  assert distributed._wants_gloo(num_processes, platforms, chosen) == wanted


def test_main_with_a_bad_num_processes_fails_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  line = error_line(
      run_module("coe_jax.main", f"--config={config_path('digits')}", f"--workdir={workdir}",
                 "--coordinator_address=localhost:1234", "--num_processes=2.5", "--process_id=0"))
  assert line == "error: num_processes='2.5': expected an integer >= 1"
  assert not workdir.exists()


def test_a_gpu_run_on_a_machine_without_one_stops_in_one_line(tmp_path):
  """What launch/gpu.sh runs, on this CPU-only machine: no silent fall-back to the CPU."""
  workdir = tmp_path / "run"
  line = error_line(
      run_module("coe_jax.main",
                 "--platform=gpu",
                 f"--config={config_path('digits')}",
                 f"--workdir={workdir}",
                 JAX_PLATFORMS=""))
  assert line.startswith("error: platform='gpu': jax found no gpu and would run on cpu")
  assert not (workdir / "checkpoints").exists()

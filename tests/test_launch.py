"""The launch scripts' dry runs print the commands a user would run."""

import os
import re
import subprocess
import time

import pytest

from tests.tiny import REPO

POD = os.path.join(REPO, "launch", "tpu_pod.sh")
LOCAL = os.path.join(REPO, "launch", "local.sh")
WORKER = os.path.join(REPO, "launch", "tpu_worker.sh")
POD_ARGS = [
    "--dry-run", "--name=coe194", "--zone=us-central2-b", "--accelerator=v4-64",
    "--config=configs/imagenet_coe_194m.py", "--workdir=gs://bucket/runs/coe194",
    "--tfds-data-dir=gs://bucket/tfds", "--repo=https://example.org/coe-jax.git"
]


def _run(*args):
  return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=REPO)


def test_pod_dry_run_creates_installs_and_trains_detached_on_all_workers():
  result = _run(POD, *POD_ARGS, "--", "--config.train.batch_size=2048")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  create, install, train = lines
  assert create.startswith("gcloud compute tpus tpu-vm create coe194")
  assert "--accelerator-type=v4-64" in create and "--spot" not in create
  for line in (install, train):
    assert line.startswith("gcloud compute tpus tpu-vm ssh coe194") and "--worker=all" in line
  assert "example.org/coe-jax.git" in install
  # A Python the pins support, jax for TPUs, the versions the suite passed with.
  assert install.replace("\\", "").rstrip().endswith("FETCH_HEAD; launch/install.sh tpu")
  # The runtime image of the accelerator's generation.
  assert "--version=tpu-ubuntu2204-base" in create
  train = train.replace("\\", "")
  # Detached on each worker, its log copied to the workdir.
  assert "launch/tpu_worker.sh start ~/coe-run gs://bucket/runs/coe194 -- " in train
  for part in ("COE_DISTRIBUTED=1", "coe_jax.main", "imagenet_coe_194m.py",
               "--workdir=gs://bucket/runs/coe194", "TFDS_DATA_DIR=gs://bucket/tfds",
               "--config.train.batch_size=2048"):
    assert part in train, part


@pytest.mark.parametrize("action, workers, worker_command",
                         [("--status", "all", "status ~/coe-run"),
                          ("--attach", "0", "log ~/coe-run"), ("--stop", "all", "stop ~/coe-run")])
def test_pod_follows_and_stops_a_detached_run(action, workers, worker_command):
  result = _run(POD, "--dry-run", action, "--name=coe194", "--zone=us-central2-b")
  assert result.returncode == 0, result.stderr
  assert result.stdout.replace("\\", "").split() == [
      "gcloud", "compute", "tpus", "tpu-vm", "ssh", "coe194", "--zone=us-central2-b",
      f"--worker={workers}", "--command=cd", "coe-jax", "&&", "launch/tpu_worker.sh",
      *worker_command.split()
  ]


FAKE_GCLOUD = """#!/usr/bin/env bash
# Records each call; `describe` answers the next state in $FAKE_STATES.
echo "$*" >> "$FAKE_CALLS"
if [[ " $* " == *" describe "* ]]; then
  state="$(head -n 1 "$FAKE_STATES")"
  if [[ $(wc -l < "$FAKE_STATES") -gt 1 ]]; then sed -i 1d "$FAKE_STATES"; fi
  [[ "$state" == ABSENT ]] && exit 1
  echo "$state"
fi
"""


def _launch_with_states(tmp_path, states, *flags):
  """Runs the pod launch (not a dry run) against a fake gcloud; returns its calls' verbs."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(parents=True)
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  (tmp_path / "states").write_text("\n".join(states) + "\n")
  env = {
      **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
      "COE_POLL_SECONDS": "0",
      "FAKE_STATES": str(tmp_path / "states"),
      "FAKE_CALLS": str(tmp_path / "calls")
  }
  result = subprocess.run(["bash", POD, *POD_ARGS[1:], *flags],
                          capture_output=True,
                          text=True,
                          cwd=REPO,
                          env=env)
  assert result.returncode == 0, result.stderr
  calls = (tmp_path / "calls").read_text().splitlines()
  # "tpu-vm create NAME ..." -> "tpu-vm create", plus the worker action of an ssh.
  verbs = []
  for call in calls:
    words = call.split()
    verb = " ".join(words[2:4])
    if words[3] == "ssh":
      verb += " start" if "tpu_worker.sh start" in call else " install"
    verbs.append(verb)
  return verbs, calls, result.stderr


def test_pod_launch_recreates_a_preempted_spot_vm(tmp_path):
  verbs, calls, stderr = _launch_with_states(tmp_path, ["PREEMPTED", "READY"], "--spot")
  assert verbs == [
      "tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm describe", "tpu-vm ssh install",
      "tpu-vm ssh start"
  ]
  assert "--spot" in calls[2] and "--quiet" in calls[1]
  assert "coe194 is PREEMPTED: deleting and creating it again" in stderr


def test_pod_launch_reuses_a_ready_vm(tmp_path):
  verbs, _, _ = _launch_with_states(tmp_path, ["READY"])
  assert verbs == ["tpu-vm describe", "tpu-vm ssh install", "tpu-vm ssh start"]


def test_pod_launch_waits_for_and_recreates_queued_resources(tmp_path):
  verbs, calls, _ = _launch_with_states(
      tmp_path, ["ABSENT", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], "--queued")
  assert verbs == [
      "queued-resources describe", "queued-resources create", *["queued-resources describe"] * 3,
      "tpu-vm ssh install", "tpu-vm ssh start"
  ]
  assert "--node-id=coe194" in calls[1] and "--runtime-version=" in calls[1]
  verbs, calls, _ = _launch_with_states(tmp_path / "x", ["SUSPENDED", "ACTIVE"], "--queued",
                                        "--spot")
  assert verbs[:3] == [
      "queued-resources describe", "queued-resources delete", "queued-resources create"
  ]
  assert "--force" in calls[1] and "--spot" in calls[2]


def test_worker_runs_detached_reports_and_stops(tmp_path):
  """launch/tpu_worker.sh: the run outlives the shell that started it; its log reaches the
  workdir."""
  run_dir, workdir = tmp_path / "run", tmp_path / "workdir"
  env = {**os.environ, "COE_LOG_COPY_SECONDS": "0.2"}

  def worker(*args):
    return subprocess.run(["bash", WORKER, *map(str, args)],
                          capture_output=True,
                          text=True,
                          cwd=REPO,
                          env=env,
                          timeout=60).stdout

  slow = "trap 'echo checkpoint; exit 143' TERM; echo training; sleep 60 & wait"
  assert "started" in worker("start", run_dir, workdir, "--", "bash", "-c", slow)
  _wait_for(lambda: "training" in worker("status", run_dir))
  assert "running" in worker("status", run_dir)
  assert "already going" in worker("start", run_dir, workdir, "--", "true")
  assert "sent SIGTERM" in worker("stop", run_dir)
  _wait_for(lambda: "exited 143" in worker("status", run_dir))
  copied = next((workdir / "logs").iterdir()).read_text()
  assert copied == "training\ncheckpoint\n"
  # A new run appends to the log, as a resumed run goes on from a checkpoint.
  worker("start", run_dir, workdir, "--", "bash", "-c", "echo resumed; exit 3")
  _wait_for(lambda: "exited 3" in worker("status", run_dir))
  assert (run_dir / "train.log").read_text() == "training\ncheckpoint\nresumed\n"


def _wait_for(condition, timeout=30.0):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.1)


def test_pod_refuses_a_local_workdir_and_missing_arguments():
  bad = [a if not a.startswith("--workdir") else "--workdir=/tmp/run" for a in POD_ARGS]
  result = _run(POD, *bad)
  assert result.returncode == 2 and "--workdir=/tmp/run" in result.stderr
  result = _run(POD, "--dry-run", "--name=x")
  assert result.returncode == 2 and "missing --zone" in result.stderr


def test_local_dry_run_installs_then_trains():
  result = _run(LOCAL, "--dry-run", "configs/digits.py", "runs/x", "--config.seed=3")
  assert result.returncode == 0, result.stderr
  install, train = (line.strip() for line in result.stdout.strip().splitlines())
  assert install.startswith("make -C") and install.endswith("venv")
  assert "-m coe_jax.main --config=configs/digits.py --workdir=runs/x --config.seed=3" in train


def test_the_environment_has_the_pinned_versions():
  """`make venv` installs constraints.txt: what the suite runs on is what it pins."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, "constraints.txt"), encoding="utf-8") as f:
    pins = dict(line.strip().split("==") for line in f if "==" in line)
  assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint"} <= set(pins)
  installed = {name: metadata.version(name) for name in pins}
  assert installed == pins


@pytest.mark.parametrize("accelerator, runtime", [("v4-16", "tpu-ubuntu2204-base"),
                                                  ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                                  ("v5p-128", "v2-alpha-tpuv5"),
                                                  ("v6e-64", "v2-alpha-tpuv6e")])
def test_pod_runtime_follows_the_accelerator(accelerator, runtime):
  args = [
      a if not a.startswith("--accelerator=") else f"--accelerator={accelerator}" for a in POD_ARGS
  ]
  create = _run(POD, *args).stdout.splitlines()[0]
  assert f"--accelerator-type={accelerator} --version={runtime}" in create, create
  # --version still wins.
  create = _run(POD, *args, "--version=my-image").stdout.splitlines()[0]
  assert "--version=my-image" in create and runtime not in create


def test_pod_refuses_an_accelerator_without_a_known_runtime():
  args = [a if not a.startswith("--accelerator=") else "--accelerator=v9-8" for a in POD_ARGS]
  result = _run(POD, *args)
  assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
  assert result.stderr.startswith("error: --accelerator=v9-8: no default runtime")


def test_pod_help_says_the_workers_run_the_remote_ref():
  result = _run(POD, "--help")
  assert result.returncode == 0 and not any(
      line.startswith("#") for line in result.stdout.splitlines())
  text = " ".join(result.stdout.split())
  assert "--ref (main by default), cloned on each worker: not this checkout" in text
  assert "python -m coe_jax.plan --config=CONFIG --accelerator=TYPE" in text


def _possibly_empty_arrays(script: str) -> set[str]:
  return set(re.findall(r"(?:^|\s|local )([A-Za-z_]\w*)=\(\)", script))


@pytest.mark.parametrize(
    "name", ["tpu_pod.sh", "gpu.sh", "local.sh", "tpu_worker.sh", "install.sh", "python.sh"])
def test_launchers_expand_empty_arrays_as_bash_3_2_needs(name):
  """macOS's bash 3.2 under `set -u` stops at "${a[@]}" when a is empty: every
  array that starts empty is expanded as ${a[@]+"${a[@]}"}."""
  script = open(os.path.join(REPO, "launch", name), encoding="utf-8").read()
  for array in _possibly_empty_arrays(script):
    # ${a[@]+ ... "${a[@]}"}: expanded only when a has elements.
    guarded = re.sub(r"\$\{" + array + r'\[@\]\+[^\n]*?"\$\{' + array + r'\[@\]\}"', "", script)
    bare = re.findall(r'"\$\{' + array + r'\[@\]\}"', guarded)
    assert not bare, f"{name}: {array} may be empty and is expanded as {bare[0]}"


def test_the_bash_3_2_check_finds_a_bare_expansion(tmp_path, monkeypatch):
  assert _possibly_empty_arrays('X=()\nlocal spot=()\nY=(a)') == {"X", "spot"}
  monkeypatch.setattr(os.path, "join", lambda *parts: str(tmp_path / parts[-1]))
  (tmp_path / "bad.sh").write_text('X=()\nrun ${X[@]+"${X[@]}"}\nrun "${X[@]}"\n')
  with pytest.raises(AssertionError, match='X may be empty'):
    test_launchers_expand_empty_arrays_as_bash_3_2_needs("bad.sh")

"""The launch scripts' dry runs print the commands a user would run."""

import os
import subprocess

from tests.tiny import REPO

POD = os.path.join(REPO, "launch", "tpu_pod.sh")
LOCAL = os.path.join(REPO, "launch", "local.sh")
POD_ARGS = ["--dry-run", "--name=coe194", "--zone=us-central2-b", "--accelerator=v4-64",
            "--config=configs/imagenet_coe_194m.py", "--workdir=gs://bucket/runs/coe194",
            "--tfds-data-dir=gs://bucket/tfds", "--repo=https://example.org/coe-jax.git"]


def _run(*args):
  return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=REPO)


def test_pod_dry_run_creates_installs_and_trains_on_all_workers():
  result = _run(POD, *POD_ARGS, "--", "--config.train.batch_size=2048")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  create, install, train = lines
  assert create.startswith("gcloud compute tpus tpu-vm create coe194")
  assert "--accelerator-type=v4-64" in create
  for line in (install, train):
    assert line.startswith("gcloud compute tpus tpu-vm ssh coe194") and "--worker=all" in line
  assert "jax\\[tpu\\]" in install and "example.org/coe-jax.git" in install
  # Both installs take the versions the suite passed with.
  assert install.replace("\\", "").count("-c constraints.txt") == 2
  for part in ("COE_DISTRIBUTED=1", "coe_jax.main", "imagenet_coe_194m.py",
               "gs://bucket/runs/coe194", "TFDS_DATA_DIR=gs://bucket/tfds",
               "--config.train.batch_size=2048"):
    assert part in train.replace("\\", ""), part


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

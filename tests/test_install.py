"""What a node needs to install and train: a Python the pins support, and no TensorFlow
where it has no wheel (aarch64 GPU nodes)."""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from coe_jax import data, run_dir
from coe_jax.errors import CoEError
from tests.helpers import train_config
from tests.tiny import REPO

FIND_PYTHON = os.path.join(REPO, "launch", "python.sh")


def _fake(folder, name, body):
  path = folder / name
  path.write_text(f"#!/bin/bash\n{body}\n")
  path.chmod(0o755)
  return path


def _fake_python(folder, name, version):
  """A stand-in interpreter that answers the version checks of launch/python.sh."""
  ok = 0 if tuple(map(int, version.split(".")[:2])) >= (3, 11) else 1
  return _fake(
      folder, name, f'case "$2" in *version_info*) exit {ok};; *python_version*) echo {version};;'
      f' esac\n[[ "$1 $2" == "-m pip" ]] && exit 1\nexit 0')


def _find_python(tmp_path, *args):
  """launch/python.sh with only tmp_path/bin on the PATH and tmp_path/home as HOME."""
  env = {"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path / "home")}
  return subprocess.run(["/bin/bash", FIND_PYTHON, *args],
                        capture_output=True,
                        text=True,
                        env=env,
                        check=False)


@pytest.fixture
def bin_dir(tmp_path):
  (tmp_path / "bin").mkdir()
  (tmp_path / "home").mkdir()
  return tmp_path / "bin"


def test_a_recent_python_beside_an_old_python3_is_found(tmp_path, bin_dir):
  _fake_python(bin_dir, "python3", "3.10.12")
  good = _fake_python(bin_dir, "python3.12", "3.12.3")
  result = _find_python(tmp_path)
  assert result.returncode == 0 and result.stdout.strip() == str(good), result.stderr


def test_uv_installs_a_python_where_the_node_has_only_3_10(tmp_path, bin_dir):
  """TPU VMs' tpu-ubuntu2204-base: python3 is 3.10; uv is there or pip installs it."""
  _fake_python(bin_dir, "python3", "3.10.12")
  managed = _fake_python(tmp_path, "managed-python3.12", "3.12.8")
  uv = (f'echo "$*" >> {tmp_path}/uv-calls\n'
        f'[[ "$1 $2" == "python find" ]] && echo {managed}\nexit 0')
  _fake(bin_dir, "uv", uv)
  result = _find_python(tmp_path)
  assert result.returncode == 0 and result.stdout.strip() == str(managed), result.stderr
  assert (tmp_path / "uv-calls").read_text().splitlines() == [
      "python install --quiet 3.12", "python find 3.12"
  ]


def test_pip_installs_uv_when_the_node_has_none(tmp_path, bin_dir):
  managed = _fake_python(tmp_path, "managed-python3.12", "3.12.8")
  wheel = _fake(tmp_path, "uv-from-pip",
                f'[[ "$1 $2" == "python find" ]] && echo {managed}\nexit 0')
  # pip --user puts uv in ~/.local/bin, which launch/python.sh adds to the PATH.
  _fake(
      bin_dir, "python3", 'case "$2" in *version_info*) exit 1;; *python_version*) echo 3.10.12;;'
      ' esac\nif [[ "$1 $2 $3 $4" == "-m pip install --user" ]]; then '
      f'/bin/mkdir -p "$HOME/.local/bin" && /bin/cp {wheel} "$HOME/.local/bin/uv"; fi')
  result = _find_python(tmp_path)
  assert result.returncode == 0 and result.stdout.strip() == str(managed), result.stderr


def test_no_python_and_no_uv_fail_in_one_line(tmp_path, bin_dir):
  _fake_python(bin_dir, "python3", "3.10.12")
  result = _find_python(tmp_path)
  assert result.returncode == 1 and not result.stdout
  assert result.stderr.count("\n") == 1, result.stderr
  assert result.stderr.startswith("error: coe-jax needs Python >= 3.11 and this machine has "
                                  "python3 3.10.12; uv could not install Python 3.12")


def test_an_explicit_python_that_is_too_old_is_refused(tmp_path, bin_dir):
  old = _fake_python(bin_dir, "python3.10", "3.10.12")
  _fake_python(bin_dir, "python3", "3.12.3")
  result = _find_python(tmp_path, str(old))
  assert result.returncode == 1 and result.stderr == (
      f"error: PYTHON={old}: 3.10.12; coe-jax needs Python >= 3.11\n")


def _setup_text():
  with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
    return f.read()


def _lowest_minor(specifier: str) -> int:
  return next(m for m in range(6, 20) if SpecifierSet(specifier).contains(f"3.{m}.0"))


def test_python_requires_is_what_the_pinned_versions_need():
  """Each pinned package's own Requires-Python, at its pinned version: the highest
  of their minimums is the project's (3.10 would fail to install jax and numpy)."""
  with open(os.path.join(REPO, "constraints.txt"), encoding="utf-8") as f:
    pins = [line.split("==")[0] for line in f if "==" in line]
  needed = 0
  for name in pins:
    try:
      requires = importlib.metadata.metadata(name).get("Requires-Python")
    except importlib.metadata.PackageNotFoundError:
      continue
    if requires:
      needed = max(needed, _lowest_minor(requires))
  assert needed >= 11
  declared = re.search(r'python_requires="([^"]+)"', _setup_text()).group(1)
  assert declared == f">=3.{needed}"
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    assert f"Python 3.{needed}+" in f.read()


def test_tensorflow_is_not_required_on_aarch64():
  line = re.search(r'"(tensorflow-cpu[^"]*)"', _setup_text()).group(1)
  requirement = Requirement(line)
  assert requirement.marker is not None
  assert requirement.marker.evaluate({"platform_machine": "x86_64"})
  assert not requirement.marker.evaluate({"platform_machine": "aarch64"})


@pytest.fixture
def without_tensorflow(monkeypatch):
  """As on a node where TensorFlow is not installed: importing it (or clu's writers,
  which import it) fails."""
  import clu  # pylint: disable=g-import-not-at-top

  from coe_jax.training import writers  # pylint: disable=g-import-not-at-top
  for name in ("tensorflow", "clu.metric_writers", "clu.periodic_actions",
               "coe_jax.data.tfds_source"):
    monkeypatch.setitem(sys.modules, name, None)
  for name in ("metric_writers", "periodic_actions"):
    monkeypatch.delattr(clu, name, raising=False)
  writers.tensorflow_missing.cache_clear()
  yield
  writers.tensorflow_missing.cache_clear()


@pytest.mark.slow
def test_training_runs_without_tensorflow(tmp_path, without_tensorflow):
  from coe_jax.training import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  config = train_config(num_steps=4)
  config.mesh.data = -1
  results = train.train_and_evaluate(config, str(workdir))
  assert results is not None and (workdir / run_dir.RESULTS).exists()
  assert run_dir.read_metrics(str(workdir)), "metrics.jsonl is the record without TensorBoard"
  assert not list(workdir.glob("events.out.tfevents.*"))


def test_a_tfds_data_set_without_tensorflow_fails_in_one_line(without_tensorflow):
  config = train_config()
  config.data.name = "cifar10"
  with pytest.raises(CoEError,
                     match=r"^data.name='cifar10': TFDS data sets are read through "
                     r"TensorFlow, which cannot be imported here \(.*\); use "
                     r"data.name=image_folder or digits") as e:
    data.get_info(config)
  assert "\n" not in str(e.value)

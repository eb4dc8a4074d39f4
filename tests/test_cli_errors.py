"""Bad input on the command line: exit status 1, one `error:` line naming the key or file.

Each case runs the real CLI, `python -m coe_jax.main` (or `coe_jax.serving.predict`,
`coe_jax.serving.export`, `coe_jax.flops`, `coe_jax.ablate`), in a subprocess, and
checks its stderr: exactly one `error: ...` line that names the offending key or
file, and no Python traceback. Logging from absl, TensorFlow and XLA may share stderr; only
the error line has to be one line. Every case fails before anything is
compiled, so none of them trains, and none writes a checkpoint.
"""

import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from coe_jax import config_base
from coe_jax.config_loading import load_config
from coe_jax.errors import CoEError
from tests.helpers import error_line, make_image_folder, run_module
from tests.tiny import config_path

DIGITS = config_path("digits")


def _main(workdir, *overrides: str, config: str = DIGITS) -> subprocess.CompletedProcess:
  return run_module("coe_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides)


@pytest.mark.parametrize("override, fragment", [
    ("--config.num_experts=-3", "num_experts=-3: expected a positive integer"),
    ("--config.eval.threshold=1.5", "eval.threshold=1.5: expected None"),
    ("--config.train.batch_size=0", "train.batch_size=0: expected a positive integer"),
    ("--config.data.name=cifar11", "data.name='cifar11': unknown data set"),
])
def test_bad_config_value(tmp_path, override, fragment):
  workdir = tmp_path / "run"
  assert fragment in error_line(_main(workdir, override))
  # Validation comes before any training: nothing was saved.
  assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize("key, value", [("num_experts", 0), ("eval.threshold", -0.1),
                                        ("train.batch_size", -8)])
def test_other_bad_values_fail_the_same_check(key, value):
  """The other side of each range, in-process: the CLI reports these checks' messages."""
  config = load_config(DIGITS)
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(CoEError, match=f"^{key}={value}: expected"):
    config_base.validate(config)


@pytest.mark.slow
def test_missing_data_path(tmp_path):
  missing = str(tmp_path / "nowhere")
  line = error_line(
      _main(tmp_path / "run", "--config.data.name=image_folder", f"--config.data.path={missing}"))
  assert f"data.path={missing!r}" in line and "does not exist" in line


def _folder_error(tmp_path, root) -> str:
  return error_line(
      _main(tmp_path / "run", "--config.data.name=image_folder", f"--config.data.path={root}"))


@pytest.mark.slow
def test_image_folder_without_classes(tmp_path):
  root = tmp_path / "folder"
  (root / "train").mkdir(parents=True)
  (root / "test").mkdir()
  assert "has no class folders" in _folder_error(tmp_path, root)


@pytest.mark.slow
def test_image_folder_with_an_empty_class(tmp_path):
  root = make_image_folder(tmp_path / "folder", per_class=1)
  empty = os.path.join(root, "train", "yak")
  os.makedirs(empty)
  line = _folder_error(tmp_path, root)
  assert empty in line and "has no .png/.jpg/.jpeg files" in line


@pytest.mark.slow
def test_image_folder_with_other_classes_in_test(tmp_path):
  root = make_image_folder(tmp_path / "folder", per_class=1)
  os.rename(os.path.join(root, "test", "dog"), os.path.join(root, "test", "wolf"))
  line = _folder_error(tmp_path, root)
  assert "only in train ['dog']" in line and "only in test ['wolf']" in line


@pytest.mark.slow
def test_corrupt_image_fails_naming_the_file(tmp_path):
  """The choice made for corrupt files: fail naming the first, never train on fewer."""
  root = make_image_folder(tmp_path / "folder", per_class=2)
  broken = os.path.join(root, "test", "cat", "broken.png")
  with open(broken, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n truncated")
  line = _folder_error(tmp_path, root)
  assert broken in line and "1 of 7 image files cannot be read" in line


@pytest.mark.slow
def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("a regular file, so nothing can be created under it")
  workdir = str(blocker / "run")
  line = error_line(_main(workdir))
  assert f"workdir={workdir!r}: not writable" in line


@pytest.mark.parametrize("override, fragment", [
    ("--config.train.bach_size=8",
     '--config.train.bach_size: the config has no such key (Did you mean "batch_size"'),
    ("--config.nosuch.key=1", "--config.nosuch.key: the config has no such key"),
])
def test_unknown_config_key(tmp_path, override, fragment):
  assert fragment in error_line(_main(tmp_path / "run", override))


def test_missing_config_file(tmp_path):
  missing = str(tmp_path / "no_such_config.py")
  line = error_line(_main(tmp_path / "run", config=missing))
  assert f"config={missing!r}: cannot load it" in line and "No such file" in line


def test_predict_on_an_undecodable_file(tmp_path):
  """Image files are checked before the model is loaded, so any workdir will do."""
  good = str(tmp_path / "good.png")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
  bad = str(tmp_path / "notes.png")
  with open(bad, "w") as f:
    f.write("not an image")
  line = error_line(
      run_module("coe_jax.serving.predict", f"--workdir={tmp_path / 'run'}", good, bad))
  assert f"image={bad!r}: cannot decode it as an image" in line


@pytest.mark.slow
@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_export_to_a_directory_that_cannot_be_made(tmp_path, where):
  """The output is checked before the workdir is read, so any workdir will do."""
  if where == "under_a_file":
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file, so nothing can be created under it")
    out, reason = str(blocker / "serve"), f"{blocker} is not a directory"
  else:
    if not os.path.isdir("/proc"):
      pytest.skip("no /proc on this system")
    out, reason = "/proc/coe_jax_serve", "cannot create a directory in /proc"
  line = error_line(
      run_module("coe_jax.serving.export", f"--workdir={tmp_path / 'run'}", f"--out={out}"))
  assert f"out={out!r}: not writable ({reason}" in line
  assert os.listdir(tmp_path) == (["a_file"] if where == "under_a_file" else [])


def test_flops_of_a_missing_config_file(tmp_path):
  missing = str(tmp_path / "no_such_config.py")
  line = error_line(run_module("coe_jax.flops", f"--config={missing}"))
  assert f"config={missing!r}: cannot load it" in line and "No such file" in line


def test_flops_with_an_unknown_config_key():
  line = error_line(run_module("coe_jax.flops", f"--config={DIGITS}", "--config.nosuch.key=1"))
  assert "--config.nosuch.key: the config has no such key" in line


def test_ablate_with_an_unknown_config_key(tmp_path):
  """The ablations parse their flags as `coe_jax.main` does (`config_loading.run_command`)."""
  workdir = tmp_path / "ablation"
  line = error_line(
      run_module("coe_jax.ablate", f"--config={DIGITS}", f"--workdir={workdir}",
                 "--config.train.num_step=5"))
  assert "--config.train.num_step: the config has no such key" in line
  assert not workdir.exists()


@pytest.mark.parametrize("module, args, fragment", [
    ("benchmarks.scale", ("--num-experts=4,a",), "--num-experts='4,a': expected integers"),
    ("benchmarks.scale", ("--meshes=8",), "--meshes='8': expected DATAxEXPERT"),
    ("benchmarks.train_step",
     ("--config=no_such_config.py",), "config='no_such_config.py': cannot load it"),
    ("benchmarks.train_step", ("--sweep_experts=4,a",), "--sweep_experts='4,a': expected positive"),
    ("benchmarks.train_step", ("--sweep_experts=4", "--sweep_dispatches=some"),
     "--sweep_dispatches='some': expected some of all, routed"),
    ("benchmarks.train_step", ("--config.wgm.off_portion_samples=0",),
     "wgm.off_portion_weight=0.2: routed dispatch trains each expert on its portion only"),
])
def test_benchmarks_report_bad_flags_in_one_line(module, args, fragment):
  """The benchmarks' errors reach `run_command`'s one line too."""
  assert fragment in error_line(run_module(module, *args))

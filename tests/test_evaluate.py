"""`python -m coe_jax.evaluate`: a run, or its weights-only copy, on a folder's test split."""

import json

import pytest

from coe_jax import evaluate, run_dir
from coe_jax.evaluation import run as evaluation_run
from coe_jax.serving.jax_predictor import Predictor
from coe_jax.training import train
from tests.helpers import (
    IMAGE_FOLDER_CLASSES,
    make_image_folder,
    single_device_trainer,
    train_config,
)

SAME = ("top1", "top1_no_early_exit", "delegator_top1", "expert_top1", "early_exit_rate",
        "mean_flops", "num_test_examples", "threshold")


def _run(tmp_path, name, folder, single=False):
  config = train_config(num_steps=2)
  config.data.name, config.data.path, config.data.num_classes = "image_folder", folder, None
  config.eval.batch_size = 8
  if single:
    config.num_experts = 1
    config.train.stages = {"warmup": 1.0}
  workdir = str(tmp_path / name)
  trainer = single_device_trainer(config, workdir)
  return workdir, evaluation_run.evaluate(trainer, train.train(trainer))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return make_image_folder(tmp_path_factory.mktemp("data") / "folder", per_class=6)


@pytest.fixture(scope="module")
def coe_run(tmp_path_factory, folder):
  return _run(tmp_path_factory.mktemp("runs"), "coe", folder)


def test_a_run_and_its_weights_only_copy_give_the_runs_figures(coe_run, folder, tmp_path):
  workdir, results = coe_run
  got = evaluate.evaluate_run(workdir, folder)
  for key in SAME:
    assert got[key] == pytest.approx(results[key]), key
  copy = tmp_path / "copy"
  assert evaluate.main([f"--workdir={workdir}", f"--save_weights={copy}"]) == 0
  assert not (copy / run_dir.CHECKPOINTS).exists() and (copy / run_dir.WEIGHTS).is_file()
  out = tmp_path / "out.json"
  assert evaluate.main([f"--workdir={copy}", f"--data_path={folder}", f"--json={out}"]) == 0
  again = json.loads(out.read_text())
  for key in SAME:
    assert again[key] == pytest.approx(results[key]), key
  assert Predictor.load(str(copy)).threshold == results["threshold"]


@pytest.mark.slow
def test_a_single_network_run_reports_its_own_top1_and_cost(tmp_path, folder):
  workdir, results = _run(tmp_path, "single", folder, single=True)
  got = evaluate.evaluate_run(workdir, folder)
  own = {
      "top1", "top1_no_early_exit", "expert_top1", "mean_flops", "expert_flops", "num_test_examples"
  }
  assert set(got) == own
  # The run's results.json: the same figures and the training's, nothing of the
  # delegator trained beside it (no tau, exits or routing).
  assert set(results) == own | {"train_flops", "train_subset_top1"}
  for key in own:
    assert got[key] == pytest.approx(results[key]), key
  assert results["top1"] == results["expert_top1"][0] and results["mean_flops"] == results[
      "expert_flops"]


def test_bad_paths_and_other_classes_fail_in_one_line(coe_run, folder, tmp_path, capsys):
  workdir, _ = coe_run
  other = make_image_folder(tmp_path / "other",
                            splits=("test",),
                            classes=dict(list(IMAGE_FOLDER_CLASSES.items())[:2]))
  cases = [
      ([f"--workdir={workdir}", f"--data_path={other}"], "only in the run ['zebra']"),
      ([f"--workdir={workdir}",
        f"--data_path={tmp_path / 'nowhere'}"], "does not exist or is not a folder"),
      ([f"--workdir={tmp_path / 'nowhere'}", f"--data_path={folder}"], "no config.json"),
      ([f"--workdir={workdir}"], "data_path=None"),
  ]
  for args, fragment in cases:
    assert evaluate.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err

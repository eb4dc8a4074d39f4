"""The trainer end to end: results, plots, prediction, resuming, meshes, data sources."""

import json
import logging
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from coe_jax import flops, run_dir
from coe_jax.errors import CoEError
from coe_jax.evaluation import run as evaluation_run
from coe_jax.serving.jax_predictor import Predictor
from coe_jax.training import train, writers
from tests.helpers import (
    IMAGE_FOLDER_CLASSES,
    IMAGENET_SIZES,
    imagenet_example,
    make_image_folder,
    single_device_trainer,
    train_config,
    training_metrics,
    write_prepared_tfds,
)
from tests.tiny import REPO

RESULT_KEYS = {
    "top1", "top1_no_early_exit", "delegator_top1", "expert_top1", "early_exit_rate", "threshold",
    "mean_flops", "expert_load", "num_test_examples"
}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("digits_run"))
  config = train_config()
  config.train.peak_flops_per_device = 1e9  # A CPU's peak is not in the table.
  trainer = single_device_trainer(config, workdir)
  state = train.train(trainer)
  results = evaluation_run.evaluate(trainer, state)
  return workdir, results


def test_results_have_every_key_and_consistent_figures(digits_run):
  workdir, results = digits_run
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert RESULT_KEYS <= set(saved) and saved["top1"] == results["top1"]
  assert saved["num_test_examples"] == 360
  assert len(saved["expert_top1"]) == 2 and len(saved["expert_load"]) == 2
  assert sum(saved["expert_load"]) == pytest.approx(1.0) or saved["early_exit_rate"] == 1.0
  expected_flops = (saved["delegator_flops"] +
                    (1 - saved["early_exit_rate"]) * saved["expert_flops"])
  assert saved["mean_flops"] == pytest.approx(expected_flops)
  for name in (*run_dir.PLOTS, run_dir.METRICS, run_dir.CONFIG):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  losses = [m for m in logged if "loss" in m]
  assert [m["step"] for m in losses] == [3, 6]
  assert all(np.isfinite(m["loss"]) for m in losses)


def test_progress_counts_finished_steps_images_and_utilisation(digits_run):
  workdir, _ = digits_run
  logged = training_metrics(workdir)
  config = train_config()
  assert [m["step"] for m in logged] == [3, 6]  # A warm-up window, then a co-adaptation one.
  for m, stage in zip(logged, ("warmup", "coadapt")):
    assert m["steps_per_sec"] > 0
    assert m["images_per_sec"] == pytest.approx(32 * m["steps_per_sec"])  # batch 32
    assert m["images_per_sec_per_device"] == m["images_per_sec"]  # One device.
    model_flops = flops.train_step_flops(config, 10, stage)
    assert m["mfu"] == pytest.approx(model_flops * m["steps_per_sec"] / 1e9)


def test_the_console_gets_one_short_progress_line_per_logged_window(caplog):
  """Step, stage, loss, routed and delegator accuracy, images/s and the time left;
  no routed accuracy in warm-up, which routes nothing. The full set goes to
  TensorBoard and metrics.jsonl."""
  config = train_config()
  config.train.num_steps, config.train.peak_flops_per_device = 10, 1e9
  device = jax.devices()[0]
  trainer = types.SimpleNamespace(config=config,
                                  info=types.SimpleNamespace(num_classes=10),
                                  mesh=types.SimpleNamespace(size=1, devices=np.array([device])))
  progress = train.TrainingProgress(trainer, start_step=0)
  means = {"loss": 2.345678, "routed_accuracy": 0.625, "delegator_accuracy": 0.5}
  with caplog.at_level(logging.INFO):
    progress.report(2, means)  # Step 2 lies in warm-up (the first 50% of 10 steps)...
    progress.report(8, means)  # ... step 8 in co-adaptation.
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert len(lines) == 2 and all(len(line) < 120 for line in lines), lines
  assert re.fullmatch(
      r"step 2/10 \(warmup\): loss 2\.346, delegator 50\.0% \| \d+ images/s, "
      r"mfu [\d.]+% \| about \d+m\d\ds left", lines[0]), lines[0]
  assert lines[1].startswith("step 8/10 (coadapt): loss 2.346, routed 62.5%, delegator 50.0% | ")


def test_predictor_loads_the_run(digits_run):
  workdir, results = digits_run
  predictor = Predictor.load(workdir)
  assert predictor.threshold == results["threshold"]
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
  out = predictor(images)
  assert out["logits"].shape == (5, 10)
  exited = out["early_exit"]
  np.testing.assert_array_equal(out["expert"][exited], -1)
  class_logits, _ = predictor.delegator(images)
  np.testing.assert_allclose(out["logits"][exited], class_logits[exited], rtol=1e-5, atol=1e-5)


def test_predict_cli_on_the_run(digits_run, tmp_path):
  workdir, _ = digits_run
  path = str(tmp_path / "digit.png")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
  result = subprocess.run(
      [sys.executable, "-m", "coe_jax.serving.predict", f"--workdir={workdir}", path],
      capture_output=True,
      text=True,
      cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  line = result.stdout.strip().splitlines()[-1]
  assert line.startswith(f"{path}:") and "p=" in line


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
  """Stopped right before PWLU's realignment (step 3 of 6) and resumed: the same
  parameters, BatchNorm and PWLU statistics, and EMA as a run that never stopped."""
  config = train_config(num_steps=6)
  config.delegator.activation = config.expert.activation = "pwlu"
  config.train.pwlu_realign_fraction = 0.5
  config.train.ema_decay = 0.9
  config.train.checkpoint_every_steps = 100  # Only the stop and the end save.
  straight = train.train(single_device_trainer(config, str(tmp_path / "straight")))
  legs = str(tmp_path / "legs")
  assert train.train(single_device_trainer(config, legs), stop_at=3) is None
  assert sorted(os.listdir(os.path.join(legs, "checkpoints"))) == ["3"]
  resumed = train.train(single_device_trainer(config, legs))
  assert int(resumed.step) == int(straight.step) == 6
  for part in ("params", "batch_stats", "ema_params"):
    for a, b in zip(jax.tree.leaves(jax.device_get(getattr(straight, part))),
                    jax.tree.leaves(jax.device_get(getattr(resumed, part))),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=part)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(resumed.batch_stats))[0]
  realigned = [leaf for path, leaf in flat if path[-1].key == "realigned"]
  assert realigned and all(np.all(r == 1) for r in realigned)


def test_coadaptation_steps_decrease_the_loss():
  """A few co-adaptation steps on one batch: every loss term goes down."""
  config = train_config(num_steps=100)  # A schedule still near its peak over these steps.
  config.train.learning_rate = 1e-2
  trainer = single_device_trainer(config, "/tmp/unused")
  state = trainer.init_state()
  step = trainer.compile_step("coadapt")
  batch = trainer.global_batch(next(train.data.train_batches(config)))
  history = []
  for _ in range(8):
    state, metrics = step(state, batch, jax.random.key(0))
    history.append({k: float(v) for k, v in metrics.items()})
  assert history[-1]["loss"] < 0.9 * history[0]["loss"]
  for term in ("expert_loss", "delegator_loss"):
    assert history[-1][term] < history[0][term], (term, history[0][term], history[-1][term])
  assert all(m["load_gap"] <= 1 for m in history)


@pytest.mark.slow
def test_image_folder_end_to_end(tmp_path):
  root = make_image_folder(tmp_path / "folder", per_class=6)
  config = train_config(num_steps=2)
  config.data.name, config.data.path = "image_folder", root
  config.data.num_classes = None
  config.eval.batch_size = 8
  trainer = single_device_trainer(config, str(tmp_path / "run"))
  results = evaluation_run.evaluate(trainer, train.train(trainer))
  assert RESULT_KEYS <= set(results)
  assert results["num_test_examples"] == 6 * len(IMAGE_FOLDER_CLASSES)


@pytest.mark.slow
def test_tfds_imagenet_end_to_end(tmp_path):
  data_dir = str(tmp_path / "tfds")
  write_prepared_tfds(data_dir, "imagenet2012", IMAGENET_SIZES, imagenet_example)
  config = train_config(num_steps=2)
  config.data.name, config.data.tfds_data_dir = "imagenet2012", data_dir
  config.data.num_classes = 1000
  config.train.batch_size = 8
  config.eval.batch_size = 8
  trainer = single_device_trainer(config, str(tmp_path / "run"))
  results = evaluation_run.evaluate(trainer, train.train(trainer))
  assert RESULT_KEYS <= set(results)
  assert results["num_test_examples"] == IMAGENET_SIZES["validation"]


@pytest.mark.parametrize("key,value,fragment", [
    ("train.batch_size", 0, "train.batch_size=0"),
    ("eval.threshold", 1.5, "eval.threshold=1.5"),
    ("data.name", "cifar11", "cifar11"),
    ("num_experts", -1, "num_experts=-1"),
    ("routing.mode", "fast", "routing.mode='fast'"),
    ("data.holdout_fraction", 0.0, "data.holdout_fraction=0.0: tau is calibrated on a hold-out"),
])
def test_bad_config_values_name_key_and_value(tmp_path, key, value, fragment):
  config = train_config()
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(CoEError, match=fragment):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_batch_size_must_divide_over_the_data_axis(tmp_path):
  config = train_config()
  config.train.batch_size, config.mesh.data = 30, 4
  with pytest.raises(CoEError, match="train.batch_size=30"):
    train.Trainer(config, str(tmp_path), devices=jax.devices()[:4])


def test_metrics_file_drops_the_steps_a_resumed_run_trains_again(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (2, 4, 6))
  path.write_text(lines + '{"step": 8, "lo')  # Killed while writing step 8.
  writers.JsonlWriter(str(path), start_step=4).write_scalars(6, {"loss": 0.5})
  logged = [json.loads(line) for line in path.read_text().splitlines()]
  assert logged == [{"step": 2, "loss": 0.5}, {"step": 4, "loss": 0.25}, {"step": 6, "loss": 0.5}]
  # Killed just before a line's newline: the line stays, and the next starts on its own.
  path.write_text(lines.rstrip("\n"))
  writers.JsonlWriter(str(path), start_step=6).write_scalars(8, {"loss": 0.1})
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4, 6, 8]


def test_compiled_programs_are_kept_in_the_workdir_unless_told_otherwise():
  config = train_config()
  assert train.compilation_cache_dir(config, "/w", None) == "/w/compilation_cache"
  assert train.compilation_cache_dir(config, "/w", "/shared") == "/shared"
  config.train.compilation_cache_dir = ""  # Off, whatever the environment says.
  assert train.compilation_cache_dir(config, "/w", "/shared") == ""


def test_the_trainer_and_the_ablations_point_jax_at_that_cache():
  before = jax.config.jax_compilation_cache_dir
  try:
    config = train_config()
    config.train.compilation_cache_dir = "/elsewhere"
    train.use_compilation_cache(config, "/w")
    assert jax.config.jax_compilation_cache_dir == "/elsewhere"
    config.train.compilation_cache_dir = ""
    train.use_compilation_cache(config, "/w")
    assert not jax.config.jax_compilation_cache_dir
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.slow
def test_a_three_stage_run_on_a_mesh_with_scanned_experts(tmp_path):
  """The accelerators' default loop (scan) through warm-up, co-adaptation, the
  delegator stage and evaluation on a data 2 x expert 2 mesh: no collective
  deadlock, and the figures match a pass over the same checkpoint on one device.
  The evaluation batch (15) does not split over the data axis: it is padded."""
  config = train_config(num_steps=6)
  config.num_experts, config.expert_loop = 4, "scan"
  config.train.stages.warmup, config.train.stages.coadapt = 1 / 3, 1 / 3
  config.train.stages.delegator = 1 / 3
  config.mesh.data, config.mesh.expert = 2, 2
  config.eval.batch_size = 15
  workdir = str(tmp_path / "run")
  trainer = train.Trainer(config, workdir, devices=jax.devices()[:4])
  assert trainer.eval_config.eval.batch_size == 16
  results = evaluation_run.evaluate(trainer, train.train(trainer))
  stages = [m["step"] for m in training_metrics(workdir)]
  assert stages[-1] == 6 and results["num_test_examples"] == 360

  config.mesh.data, config.mesh.expert = 1, 1
  config.eval.threshold = results["threshold"]
  one = train.Trainer(config, workdir, devices=jax.devices()[:1])
  again = evaluation_run.evaluate(one, train.train(one), write_files=False)
  for key in ("top1", "top1_no_early_exit", "delegator_top1", "expert_top1", "early_exit_rate"):
    assert again[key] == pytest.approx(results[key], abs=1 / 360), key

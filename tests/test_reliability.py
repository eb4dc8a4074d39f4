"""Faults: killed runs resume exactly, bad checkpoints are skipped or refused, NaNs stop cleanly.

The interrupted runs are real CLI runs, `python -m coe_jax.main` on a tiny
config file, in subprocesses. To kill a run at a chosen moment rather than a
lucky one, a `sitecustomize` module on its PYTHONPATH (`_HOOKS`) pauses it on
request: before a given training step takes its batch, or inside orbax's save
of a given checkpoint, after its files are written and before the rename that
commits it. The test then sends SIGKILL or SIGTERM from outside. All runs share
a persistent JAX compilation cache, so only the first one compiles; the
interrupted run's legs keep theirs in their workdir, as a user's run does.

The checkpoint and non-finite cases run in-process, on copies of the
uninterrupted run's workdir or with a poisoned loss.
"""

import asyncio
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from PIL import Image

from coe_jax import data, objective, run_dir
from coe_jax.config_loading import load_config
from coe_jax.errors import CoEError
from coe_jax.serving import predict
from coe_jax.serving.jax_predictor import Predictor
from coe_jax.training import checkpointing, train
from tests.helpers import checkpoint_params, results_figures, subprocess_env, training_metrics
from tests.tiny import REPO

# 6 steps, warm-up for steps 0-2 and co-adaptation for 3-5 (so that resumes
# cross the stage change), a checkpoint every 2 steps, metrics every step.
_TINY_CONFIG = '''\
"""A 2-expert CoE on 8 px digits: 6 training steps in seconds."""
from coe_jax import config_base as common


def get_config():
  c = common.base_config()
  c.num_experts = 2
  c.data.name = "digits"
  c.data.image_size = 8
  c.data.num_classes = 10
  net = dict(stem_features=4, stem_stride=2, head_features=8,
             stages=[common.stage(4, 1, 3, 1, 1)])
  c.delegator = common.network(**net)
  c.expert = common.network(**net)
  c.train.batch_size = 16
  c.train.num_steps = 6
  c.train.warmup_steps = 1
  c.train.optimizer = "adamw"
  c.train.learning_rate = 1e-2
  c.train.stages.warmup = 0.5
  c.train.stages.coadapt = 0.5
  c.train.checkpoint_every_steps = 2
  c.train.log_every_steps = 1
  c.mesh.data = 1
  c.eval.batch_size = 512
  return c
'''

_HOOKS = '''\
"""Pauses a coe_jax.main run where a test asks, so that the test can kill it there.

COE_TEST_HOOKS=DIR turns the hooks on; they signal by creating files in DIR.
COE_TEST_PAUSE_STEP=k: before training step k (0-based) runs, where it waits
  for the input pipeline, create DIR/paused-step, then wait for DIR/resume.
COE_TEST_PAUSE_SAVE=k: when orbax is about to commit checkpoint k (rename its
  temporary directory), create DIR/paused-save and hold that save.
"""
import asyncio
import os
import time
import traceback

_DIR = os.environ.get("COE_TEST_HOOKS")
_LIMIT_S = 300  # A run whose test died carries on after this rather than linger.


def _signal(name):
  open(os.path.join(_DIR, name), "w").close()


if _DIR and os.environ.get("COE_TEST_PAUSE_STEP"):
  from coe_jax import data
  from coe_jax.training import train

  # The trainer pulls batches PREFETCH - 1 steps ahead of the step that asks
  # for one: step k asks while batch k + PREFETCH - 1 is read.
  _PAUSE_STEP = int(os.environ["COE_TEST_PAUSE_STEP"]) + train.PREFETCH - 1
  _train_batches = data.train_batches

  def train_batches(config, start_step=0, **kwargs):
    for step, batch in enumerate(_train_batches(config, start_step=start_step, **kwargs),
                                 start_step):
      if step == _PAUSE_STEP:
        _signal("paused-step")
        deadline = time.time() + _LIMIT_S
        while not os.path.exists(os.path.join(_DIR, "resume")) and time.time() < deadline:
          time.sleep(0.02)
      yield batch

  data.train_batches = train_batches

if _DIR and os.environ.get("COE_TEST_PAUSE_SAVE"):
  from orbax.checkpoint._src.path import atomicity

  _finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if self.get_final().name == os.environ["COE_TEST_PAUSE_SAVE"]:
      _signal("paused-save")
      await asyncio.sleep(_LIMIT_S)
    return await _finalize(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize
'''

_RUN_TIMEOUT_S = 300
_RESUMING = re.compile(r"resuming \S+ from step (\d+)")


class _Cli:
  """Starts `coe_jax.main` runs of the tiny config, with the hooks and a shared compile cache."""

  def __init__(self, root):
    self.root = root
    self.config = root / "tiny.py"
    self.config.write_text(_TINY_CONFIG)
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_HOOKS)
    self.env = subprocess_env(PYTHONPATH=os.pathsep.join(
        filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
                              JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

  def start(self, workdir, leg: str, *, workdir_cache: bool = False, **pauses) -> "_Leg":
    """A run in the background; `pauses` (step=k, save=k) set the hooks.

    With `workdir_cache`, the run keeps its compiled programs where a user's
    does by default, in the workdir, and logs each compilation and cache hit.
    """
    signals = self.root / leg
    signals.mkdir()
    env = {
        **self.env, "COE_TEST_HOOKS": str(signals),
        **{
            f"COE_TEST_PAUSE_{key.upper()}": str(value) for key, value in pauses.items()
        }
    }
    if workdir_cache:
      del env["JAX_COMPILATION_CACHE_DIR"]
      env["JAX_LOG_COMPILES"] = "1"
    # Files, not pipes: a full pipe would stall a run the test is not reading yet.
    with open(signals / "stdout", "w") as stdout, open(signals / "stderr", "w") as stderr:
      process = subprocess.Popen(
          [sys.executable, "-m", "coe_jax.main", f"--config={self.config}", f"--workdir={workdir}"],
          cwd=REPO,
          env=env,
          stdout=stdout,
          stderr=stderr)
    return _Leg(process, signals, workdir)


class _Leg:
  """One run of the interrupted workdir, and what it left behind."""

  def __init__(self, process, signals, workdir):
    self.process, self.signals, self.workdir = process, signals, workdir

  @property
  def stderr(self) -> str:
    return (self.signals / "stderr").read_text()

  def wait_for(self, ready, what: str) -> None:
    """Polls `ready()` until true; fails if the run ends or stalls first."""
    deadline = time.monotonic() + _RUN_TIMEOUT_S
    while not ready():
      if self.process.poll() is not None:
        pytest.fail(f"the run ended ({self.process.returncode}) before {what}:\n"
                    f"{self.stderr[-3000:]}")
      if time.monotonic() > deadline:
        self.process.kill()
        pytest.fail(f"no {what} after {_RUN_TIMEOUT_S} s")
      time.sleep(0.02)

  def wait_for_signal(self, name: str) -> None:
    self.wait_for((self.signals / name).exists, f"the hook's {name}")

  def finish(self) -> dict:
    """Waits for the exit; the exit status, resume step and checkpoints left."""
    try:
      returncode = self.process.wait(timeout=_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      self.process.kill()
      pytest.fail(f"the run did not end within {_RUN_TIMEOUT_S} s:\n{self.stderr[-3000:]}")
    resumed = _RESUMING.search(self.stderr)
    return {
        "returncode": returncode,
        "stderr": self.stderr,
        "resumed_from": int(resumed.group(1)) if resumed else None,
        "checkpoints": _listing(self.workdir / "checkpoints"),
        "compiled": _listing(self.workdir / "compilation_cache")
    }


def _listing(directory) -> list[str]:
  return sorted(os.listdir(directory)) if directory.is_dir() else []


def _files(directory) -> list[str]:
  return sorted(
      os.path.relpath(os.path.join(parent, name), directory)
      for parent, _, names in os.walk(directory)
      for name in names)


def _losses(workdir) -> list:
  return [(m["step"], m["loss"]) for m in training_metrics(workdir)]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  return _Cli(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def reference(cli):
  """An uninterrupted run of the tiny config: its workdir."""
  workdir = cli.root / "reference"
  result = cli.start(workdir, "reference").finish()
  assert result["returncode"] == 0, result["stderr"][-3000:]
  assert result["checkpoints"] == ["2", "4", "6"]
  return workdir


@pytest.fixture(scope="module")
def interrupted(cli):
  """One workdir through SIGTERM, SIGKILL in a save, SIGKILL mid-training, then to the end.

  The legs, in order (steps count from 0; checkpoint k holds the state after k steps):
    sigterm: SIGTERM while step 2 waits for its batch; the run finishes the step.
    kill_in_save: SIGKILL while checkpoint 4 is written but not yet committed.
    kill_mid_training: SIGKILL while step 5 waits, checkpoint 4 complete.
    final: runs to the end and evaluates.
  Every leg keeps its compiled programs in the workdir, as a user's run does.
  Returns the workdir and leg -> `_Leg.finish()` of that leg, for the tests to check.
  """
  workdir = cli.root / "interrupted"
  legs = {}

  leg = cli.start(workdir, "sigterm", workdir_cache=True, step=2)
  leg.wait_for_signal("paused-step")
  leg.process.send_signal(signal.SIGTERM)
  (leg.signals / "resume").touch()
  legs["sigterm"] = leg.finish()

  leg = cli.start(workdir, "kill_in_save", workdir_cache=True, save=4)
  leg.wait_for_signal("paused-save")
  leg.process.kill()
  legs["kill_in_save"] = leg.finish()
  uncommitted = [
      workdir / "checkpoints" / name
      for name in legs["kill_in_save"]["checkpoints"]
      if name.startswith("4.orbax-checkpoint-tmp")
  ]
  legs["kill_in_save"]["uncommitted"] = [_listing(path) for path in uncommitted]

  leg = cli.start(workdir, "kill_mid_training", workdir_cache=True, step=5)
  leg.wait_for_signal("paused-step")
  # Checkpoint 4 was saved asynchronously; kill once it is committed, so that
  # no save is in flight.
  leg.wait_for(
      lambda: (workdir / "checkpoints" / "4").is_dir() and not any(
          "tmp" in name for name in _listing(workdir / "checkpoints")), "commit of checkpoint 4")
  leg.process.kill()
  legs["kill_mid_training"] = leg.finish()

  legs["final"] = cli.start(workdir, "final", workdir_cache=True).finish()
  return workdir, legs


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(interrupted):
  _, legs = interrupted
  sigterm = legs["sigterm"]
  # 3 is no multiple of train.checkpoint_every_steps: SIGTERM saved it.
  assert sigterm["checkpoints"] == ["2", "3"], sigterm["stderr"][-3000:]
  assert sigterm["returncode"] == 128 + signal.SIGTERM
  assert "stopped at step 3" in sigterm["stderr"]


@pytest.mark.slow
def test_the_rerun_resumes_from_the_sigterm_checkpoint(interrupted):
  _, legs = interrupted
  assert legs["kill_in_save"]["resumed_from"] == 3


@pytest.mark.slow
def test_a_save_killed_before_its_commit_is_never_resumed_from(interrupted):
  _, legs = interrupted
  killed = legs["kill_in_save"]
  assert killed["returncode"] == -signal.SIGKILL
  # Killed in the save: checkpoint 4 is all written, but not committed.
  assert "4" not in killed["checkpoints"], killed["checkpoints"]
  assert len(killed["uncommitted"]) == 1 and {"meta", "state"} <= set(killed["uncommitted"][0])
  assert legs["kill_mid_training"]["resumed_from"] == 3


@pytest.mark.slow
def test_a_resumed_run_reuses_the_programs_compiled_into_its_workdir(interrupted):
  _, legs = interrupted
  steps = {
      name: [entry for entry in legs[name]["compiled"] if entry.startswith("jit_step_fn-")]
      for name in legs
  }
  # The warm-up step's program, then the co-adaptation step's, each compiled once.
  assert len(steps["sigterm"]) == 1 and len(steps["kill_in_save"]) == 2, steps
  assert steps["kill_mid_training"] == steps["final"] == steps["kill_in_save"]
  for name in ("kill_mid_training", "final"):  # Both resume in co-adaptation.
    assert "Persistent compilation cache hit for 'jit_step_fn'" in legs[name]["stderr"], name


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_from_its_last_checkpoint(interrupted):
  _, legs = interrupted
  killed = legs["kill_mid_training"]
  assert killed["returncode"] == -signal.SIGKILL
  assert killed["checkpoints"] == ["2", "3", "4"]
  assert legs["final"]["resumed_from"] == 4


@pytest.mark.slow
def test_the_interrupted_run_ends_like_an_uninterrupted_one(interrupted, reference):
  workdir, legs = interrupted
  assert legs["final"]["returncode"] == 0, legs["final"]["stderr"][-3000:]
  assert results_figures(workdir) == results_figures(reference)
  # Steps trained again after the resumes are logged once, as in the reference.
  assert _losses(workdir) == _losses(reference)
  interrupted_params, reference_params = checkpoint_params(workdir), checkpoint_params(reference)
  assert len(interrupted_params) == len(reference_params)
  for a, b in zip(interrupted_params, reference_params):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_rerun_resumes_past_an_unreadable_checkpoint_to_the_same_end(cli, reference):
  """The whole path: one line, the checkpoint set aside, its step trained and saved again."""
  workdir = shutil.copytree(reference, cli.root / "unreadable")
  (workdir / "results.json").unlink()
  _damage(workdir / "checkpoints" / "6", "truncated")
  result = cli.start(workdir, "unreadable_leg").finish()
  assert result["returncode"] == 0, result["stderr"][-3000:]
  reports = [line for line in result["stderr"].splitlines() if "cannot be read" in line]
  assert len(reports) == 1 and "Traceback" not in result["stderr"], result["stderr"][-3000:]
  assert result["resumed_from"] == 4 and result["checkpoints"] == ["2", "4", "6"]
  assert (workdir / run_dir.UNREADABLE_CHECKPOINTS / "6" / "state").is_dir()
  assert results_figures(workdir) == results_figures(reference)
  for a, b in zip(checkpoint_params(workdir), checkpoint_params(reference)):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def trainer(cli, reference):
  """An in-process trainer of the tiny config, on one device, for its abstract state."""
  return train.Trainer(load_config(str(cli.config)), str(reference), devices=jax.devices()[:1])


def _checkpointer(trainer, workdir) -> checkpointing.Checkpointer:
  return checkpointing.Checkpointer(str(workdir),
                                    keep=trainer.config.train.keep_checkpoints,
                                    fingerprint=checkpointing.shape_fingerprint(
                                        trainer.config, trainer.info.num_classes))


def _damage(step_dir, how: str) -> None:
  """Makes a checkpoint unreadable as a crash or a bad copy would."""
  arrays = step_dir / "state" / "d"  # The array data; the metadata stays intact.
  if how == "truncated":
    for path in arrays.iterdir():
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  else:
    shutil.rmtree(arrays)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_an_unreadable_latest_checkpoint_is_reported_in_one_line_and_skipped(
    trainer, reference, tmp_path, how, caplog, capfd):
  workdir = shutil.copytree(reference, tmp_path / "run")
  latest = workdir / "checkpoints" / "6"
  _damage(latest, how)
  files = _files(latest)
  checkpointer = _checkpointer(trainer, workdir)
  try:
    with caplog.at_level(logging.WARNING):
      step, state = checkpointer.restore_latest(trainer.abstract_state, set_aside_unreadable=True)
    assert step == 4
    reports = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(reports) == 1 and "\n" not in reports[0] and len(reports[0]) < 1000, reports
    assert f"{checkpointer.directory}/6 cannot be read" in reports[0]
    assert "resuming from step 4" in reports[0]
    # Nothing deleted: the unreadable checkpoint moved aside whole.
    moved = workdir / run_dir.UNREADABLE_CHECKPOINTS / "6"
    assert str(moved) in reports[0]
    assert not latest.exists() and _files(moved) == files
    # ... so that the resumed run can save that step again.
    checkpointer.save(6, state, force=True)
    checkpointer.wait()
    assert _listing(workdir / "checkpoints") == ["2", "4", "6"]
  finally:
    checkpointer.close()
  assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow
def test_a_predictor_refuses_an_unreadable_newest_checkpoint(reference, tmp_path, capsys):
  """Training falls back to an older checkpoint; serving must not answer with an older
  model than the user thinks: one line, naming the saved steps, unless asked for one."""
  workdir = shutil.copytree(reference, tmp_path / "run")
  _damage(workdir / "checkpoints" / "6", "truncated")
  with pytest.raises(CoEError) as error:
    Predictor.load(str(workdir))
  message = str(error.value)
  assert "\n" not in message and message.startswith("step=6: the newest checkpoint in")
  assert "ask for an older one on purpose (step=4; saved steps: 2, 4, 6)" in message
  image = tmp_path / "digit.png"
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
  assert predict.main([f"--workdir={workdir}", str(image)]) == 1
  assert capsys.readouterr().err.startswith("error: step=6: the newest checkpoint")
  # Asked for on purpose, the older checkpoint serves; nothing was moved or deleted.
  assert Predictor.load(str(workdir), step=4).num_experts == 2
  assert predict.main([f"--workdir={workdir}", "--step=4", str(image)]) == 0
  assert _listing(workdir / "checkpoints") == ["2", "4", "6"]
  with pytest.raises(CoEError, match="step=5: no such checkpoint .* saved steps: 2, 4, 6"):
    Predictor.load(str(workdir), step=5)


@pytest.mark.slow
def test_when_no_checkpoint_can_be_read_the_run_stops_and_moves_nothing(
    trainer, reference, tmp_path):
  workdir = shutil.copytree(reference, tmp_path / "run")
  for step in ("2", "4", "6"):
    _damage(workdir / "checkpoints" / step, "missing")
  checkpointer = _checkpointer(trainer, workdir)
  try:
    with pytest.raises(CoEError, match="none of the 3 checkpoints can be read") as error:
      checkpointer.restore_latest(trainer.abstract_state, set_aside_unreadable=True)
  finally:
    checkpointer.close()
  assert "\n" not in str(error.value)
  assert _listing(workdir / "checkpoints") == ["2", "4", "6"]
  assert not (workdir / run_dir.UNREADABLE_CHECKPOINTS).exists()


@pytest.mark.slow
def test_checkpoints_of_another_config_fail_naming_the_mismatch(cli, reference, tmp_path):
  workdir = shutil.copytree(reference, tmp_path / "run")
  config = load_config(str(cli.config))
  config.num_experts = 3
  other = train.Trainer(config, str(workdir), devices=jax.devices()[:1])
  with pytest.raises(CoEError) as error:
    train.train(other)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("num_experts=3: the checkpoints in") and "num_experts=2" in message


@pytest.mark.slow
@pytest.mark.parametrize("key, value, fragment", [
    ("train.optimizer", "sgd", "train.optimizer='sgd': the checkpoints in /ckpt were written "
     "with train.optimizer='adamw'"),
    ("train.ema_decay", 0.999, "ema (train.ema_decay > 0)=True: the checkpoints in /ckpt were "
     "written with ema (train.ema_decay > 0)=False"),
])
def test_the_fingerprint_covers_the_optimizer_state_layout(cli, key, value, fragment):
  """Another optimizer or EMA changes the state's layout; a restore would fail obscurely."""
  config = load_config(str(cli.config))
  saved = checkpointing.shape_fingerprint(config, 10)
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(CoEError) as error:
    checkpointing.check_fingerprint(saved, checkpointing.shape_fingerprint(config, 10), "/ckpt")
  assert str(error.value).startswith(fragment)


# Step 3 gets a batch whose delegator loss is NaN.
_BAD_STEP, _BAD_TERM = 3, "delegator_loss"


@pytest.fixture(scope="module")
def nonfinite_runs(cli, tmp_path_factory):
  """The tiny config trained in-process twice, with train.nonfinite stop then skip.

  A NaN is injected deterministically: the data stream zeroes the labels of
  step `_BAD_STEP`'s batch, and the objective turns `_BAD_TERM` (and so the
  loss and the gradient) into NaN on an all-zero-label batch. Checkpoints
  every 2 steps, metrics every 3: step 3 ends at a save that is no log step.
  One stage (warm-up) throughout, to compile one train step.
  Both runs share the compiled steps (the policy is applied outside them).
  Returns policy -> (workdir, error message or None, final state or None).
  """
  config = load_config(str(cli.config))
  config.train.log_every_steps = 3
  config.train.stages.warmup, config.train.stages.coadapt = 1.0, 0.0
  root = tmp_path_factory.mktemp("nonfinite")
  trainer = train.Trainer(config, str(root / "stop"), devices=jax.devices()[:1])
  compiled, compile_step = {}, trainer.compile_step
  train_batches, delegator_side_loss = data.train_batches, objective.delegator_side_loss

  def zero_labels_at_the_bad_step(config, start_step=0, **kwargs):
    for step, batch in enumerate(train_batches(config, start_step=start_step, **kwargs),
                                 start_step):
      yield {**batch, "label": np.zeros_like(batch["label"])} if step == _BAD_STEP else batch

  def poisoned(class_logits, selection_logits, labels, *args, **kwargs):
    total, selection_loss, delegator_loss = delegator_side_loss(class_logits, selection_logits,
                                                                labels, *args, **kwargs)
    scale = jnp.where(jnp.all(labels == 0), jnp.nan, 1.0)
    return total * scale, selection_loss, delegator_loss * scale  # _BAD_TERM

  def compile_once(stage):
    if stage not in compiled:
      compiled[stage] = compile_step(stage)
    return compiled[stage]

  runs = {}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(data, "train_batches", zero_labels_at_the_bad_step)
    patch.setattr(objective, "delegator_side_loss", poisoned)
    patch.setattr(trainer, "compile_step", compile_once)
    for policy in ("stop", "skip"):
      trainer.workdir = str(root / policy)
      config.train.nonfinite = policy
      try:
        runs[policy] = (root / policy, None, train.train(trainer))
      except CoEError as e:
        runs[policy] = (root / policy, str(e), None)
  return runs


def test_a_nonfinite_loss_stops_naming_step_and_term_and_keeps_the_last_good_checkpoint(
    nonfinite_runs):
  workdir, message, _ = nonfinite_runs["stop"]
  assert message is not None and "\n" not in message
  assert message.startswith(f"step={_BAD_STEP}: non-finite {_BAD_TERM}; training stopped")
  assert "the last good checkpoint is step 2" in message
  # The save after the bad step (4) did not happen: no checkpoint holds a state past it.
  assert _listing(workdir / "checkpoints") == ["2"]


def test_skip_policy_skips_and_counts_the_nonfinite_step(nonfinite_runs):
  workdir, message, state = nonfinite_runs["skip"]
  assert message is None and int(state.step) == 6
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(state.params)))
  with open(workdir / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f if '"loss"' in line]
  assert [(m["step"], m["skipped_steps"]) for m in logged] == [(3, 0), (6, 1)]
  assert all(np.isfinite(m["loss"]) for m in logged)  # Means over the finite steps only.


@pytest.mark.parametrize("bad, named", [
    (("expert_loss", "selection_loss", "loss"), "expert_loss"),
    (("selection_loss", "loss"), "selection_loss"),
    (("delegator_loss", "loss"), "delegator_loss"),
    (("loss",), "loss"),
    ((), "gradient"),
])
def test_the_first_nonfinite_term_is_named(bad, named):
  finite = {
      "expert_loss": 1.0,
      "selection_loss": 0.5,
      "delegator_loss": 2.0,
      "loss": 3.5,
      "finite": 1.0
  }
  history = [(0, finite), (1, {
      **finite,
      **{
          t: float("nan") for t in bad
      }, "finite": 0.0
  }), (2, {
      **finite, "expert_loss": float("inf"),
      "finite": 0.0
  })]
  assert train._first_nonfinite(history) == (1, named)  # pylint: disable=protected-access


def test_checkpoints_are_read_through_orbax_only():
  """No module of the package unpickles: a checkpoint may come from anywhere."""
  unpickling = re.compile(
      r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|joblib|marshal|shelve)\b"
      r"|allow_pickle\s*=\s*True|\bpickle\.loads?\(", re.MULTILINE)
  package = os.path.join(REPO, "coe_jax")
  sources = [
      os.path.join(parent, name)
      for parent, _, names in os.walk(package)
      for name in names
      if name.endswith(".py")
  ]
  assert len(sources) > 20
  for path in sources:
    with open(path, encoding="utf-8") as f:
      assert not unpickling.search(f.read()), path


def _abandoned_task_failure(module: str) -> None:
  """Lets asyncio garbage-collect a failed task whose coroutine lives in `module`."""
  namespace = {"__name__": module}
  exec(
      compile(
          "async def read():\n  raise ValueError('OUT_OF_RANGE: byte range')\n",  # pylint: disable=exec-used
          module.replace(".", "/") + ".py",
          "exec"),
      namespace)
  loop = asyncio.new_event_loop()
  try:
    task = loop.create_task(namespace["read"]())
    loop.run_until_complete(asyncio.sleep(0))  # The task runs and fails; nobody awaits it.
    del task
    gc.collect()  # Its destructor reports "Task exception was never retrieved".
  finally:
    loop.close()


def _abandoned_future_failure(message: str) -> None:
  """Lets asyncio garbage-collect a failed future nobody awaited (tensorstore's reads)."""
  loop = asyncio.new_event_loop()
  try:
    future = loop.create_future()
    future.set_exception(ValueError(message))
    del future
    gc.collect()  # Its destructor reports "Future exception was never retrieved".
  finally:
    loop.close()


def test_abandoned_orbax_reads_are_silenced_and_other_task_failures_are_not(caplog):
  """A failed restore leaves orbax read tasks whose failures surface whenever they are
  collected; they must not print tracebacks, while other code's failures still do."""
  checkpointing._ignore_abandoned_reads()  # pylint: disable=protected-access
  gc.collect()  # Earlier tests' abandoned reads report now, not inside the window below.
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    _abandoned_task_failure("orbax.checkpoint._src.serialization.fake")
    _abandoned_task_failure("user_code.reader")
    _abandoned_future_failure("NOT_FOUND: Error reading ... [tensorstore_spec='{}']")
    _abandoned_future_failure("a failure of other code")
  reports = [r for r in caplog.records if "never retrieved" in r.getMessage()]
  assert len(reports) == 2, [r.getMessage() for r in reports]
  assert "a failure of other code" in reports[1].getMessage()
  reports = reports[:1]
  assert "user_code" in "".join(traceback.format_exception(*reports[0].exc_info))

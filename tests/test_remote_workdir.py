"""A remote workdir (gs://bucket/...) stays remote in every reader and writer of it.

No network: `fake_bucket` serves gs://bucket/... from a local folder through
etils.epath's backend, recording each gs:// path asked for, and hands orbax
(whose tensorstore would go to Google Cloud Storage itself) the folder behind
the checkpoints' gs:// directory. The tests run in an empty working directory:
a gs:// path read as a local relative one (`<cwd>/gs:/bucket/...`) would land
there, on the disk of one host, where a recreated machine or the other hosts
of a pod never find it.
"""

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils.epath import backend, gpath

from coe_jax import run_dir
from coe_jax.errors import CoEError
from coe_jax.training import checkpointing

BUCKET = "gs://bucket"


class _FakeBucket(backend.Backend):
  """epath's backend for gs://: the files of `root`, each path asked for recorded.

  As in an object store, writing a file needs no folder made first.
  """

  def __init__(self, root: str):
    self.root = root
    self.asked: list[str] = []  # Every gs:// path epath was asked about.
    self.managers: list[str] = []  # Every directory orbax's CheckpointManager was given.
    self._os = backend.os_backend

  def local(self, path) -> str:
    path = os.fspath(path)
    assert path.startswith("gs://"), path
    self.asked.append(path)
    return os.path.join(self.root, path[len("gs://"):])

  def _remote(self, path) -> str:
    return "gs://" + os.path.relpath(os.fspath(path), self.root)

  def open(self, path, mode):
    local = self.local(path)
    if "r" not in mode:
      os.makedirs(os.path.dirname(local), exist_ok=True)
    return self._os.open(local, mode)

  def exists(self, path):
    return self._os.exists(self.local(path))

  def isdir(self, path):
    return self._os.isdir(self.local(path))

  def listdir(self, path):
    return self._os.listdir(self.local(path))

  def glob(self, path):
    return [self._remote(p) for p in self._os.glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, files in self._os.walk(self.local(top), top_down=top_down, on_error=on_error):
      yield self._remote(root), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    self._os.makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    self._os.mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    self._os.rmtree(self.local(path))

  def remove(self, path):
    self._os.remove(self.local(path))

  def rename(self, path, dst):
    self._os.rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    self._os.replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    self._os.copy(self.local(path), self.local(dst), overwrite=overwrite)

  def stat(self, path):
    return self._os.stat(self.local(path))


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  bucket = _FakeBucket(str(tmp_path / "storage"))
  os.makedirs(bucket.local(BUCKET))
  bucket.asked.clear()
  original = gpath._GPath._backend  # pylint: disable=protected-access
  monkeypatch.setattr(
      gpath._GPath,  # pylint: disable=protected-access
      "_backend",
      property(lambda path: bucket if path._uri_scheme == "gs" else original.fget(path)))  # pylint: disable=protected-access
  real_manager = ocp.CheckpointManager

  def manager(directory, *args, **kwargs):
    bucket.managers.append(str(directory))
    if str(directory).startswith("gs://"):
      directory = bucket.local(directory)
    return real_manager(directory, *args, **kwargs)

  monkeypatch.setattr(ocp, "CheckpointManager", manager)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield bucket
  assert not os.listdir(cwd), "a gs:// path was written as a local one"


def _in_bucket(bucket: _FakeBucket, *parts: str) -> str:
  return os.path.join(bucket.root, "bucket", *parts)


def test_paths_keep_their_scheme_and_local_ones_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert run_dir.absolute(f"{BUCKET}/runs/x") == f"{BUCKET}/runs/x"
  assert run_dir.absolute("runs/x") == str(tmp_path / "runs" / "x")
  assert run_dir.is_remote(f"{BUCKET}/x") and not run_dir.is_remote("/gs/bucket/x")


def test_run_dir_reads_and_writes_remote_files_where_named(fake_bucket):
  run_dir.write_json(f"{BUCKET}/run/{run_dir.RESULTS}", {"top1": 0.5})
  assert run_dir.read_json(f"{BUCKET}/run/{run_dir.RESULTS}") == {"top1": 0.5}
  run_dir.write_text_atomically(f"{BUCKET}/run/{run_dir.METRICS}", '{"step": 2}\n{"st')
  assert run_dir.read_metrics(f"{BUCKET}/run") == [{"step": 2}]
  assert sorted(os.listdir(_in_bucket(fake_bucket, "run"))) == [run_dir.METRICS, run_dir.RESULTS]
  assert fake_bucket.asked and all(p.startswith(f"{BUCKET}/run/") for p in fake_bucket.asked)


def test_checkpoints_of_a_remote_workdir_stay_there_and_are_set_aside_there(
    fake_bucket, tmp_path, caplog):
  """The bug: `epath.Path(workdir).resolve()` made gs://bucket/run <cwd>/gs:/bucket/run,
  so each host saved to, and resumed from, its own disk."""
  state = {"w": np.arange(4, dtype=np.float32)}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=device)}
  checkpointer = checkpointing.Checkpointer(f"{BUCKET}/run", keep=3, fingerprint={"n": 1})
  try:
    assert checkpointer.directory == f"{BUCKET}/run/checkpoints"
    assert fake_bucket.managers == [f"{BUCKET}/run/checkpoints"]
    for step in (1, 2):
      checkpointer.save(step, {"w": state["w"] * step}, force=True)
    checkpointer.wait()
  finally:
    checkpointer.close()
  checkpoints = _in_bucket(fake_bucket, "run", "checkpoints")
  assert sorted(os.listdir(checkpoints)) == ["1", "2"]
  # A new process (a recreated machine) finds them, and skips a damaged newest.
  for name in os.listdir(os.path.join(checkpoints, "2", "state", "d")):
    os.remove(os.path.join(checkpoints, "2", "state", "d", name))
  checkpointer = checkpointing.Checkpointer(f"{BUCKET}/run", keep=3, fingerprint={"n": 1})
  try:
    with caplog.at_level(logging.WARNING, logger="absl"):
      step, restored = checkpointer.restore_latest(abstract, set_aside_unreadable=True)
  finally:
    checkpointer.close()
  assert step == 1
  np.testing.assert_array_equal(restored["w"], state["w"])
  reports = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
  assert len(reports) == 1 and f"{BUCKET}/run/checkpoints/2 cannot be read" in reports[0]
  assert f"moved to {BUCKET}/run/unreadable_checkpoints/2" in reports[0]
  assert os.listdir(checkpoints) == ["1"]
  assert os.path.isdir(_in_bucket(fake_bucket, "run", "unreadable_checkpoints", "2", "state"))


def test_a_local_workdir_is_still_made_absolute(tmp_path, monkeypatch):
  """Orbax wants an absolute directory; a relative local workdir still gets one."""
  monkeypatch.chdir(tmp_path)
  checkpointer = checkpointing.Checkpointer("run", keep=1, fingerprint={})
  try:
    assert checkpointer.directory == str(tmp_path / "run" / "checkpoints")
  finally:
    checkpointer.close()


def test_the_exporter_refuses_a_remote_serving_dir_in_one_line(fake_bucket):
  from coe_jax.serving import export  # pylint: disable=g-import-not-at-top
  with pytest.raises(CoEError) as error:
    export.check_out_dir(f"{BUCKET}/run/serving")
  assert str(error.value).startswith(f"out='{BUCKET}/run/serving': expected a local folder")
  assert not fake_bucket.asked


@pytest.mark.slow
def test_a_run_in_a_remote_workdir_trains_resumes_and_serves_from_there(
    fake_bucket, tmp_path, monkeypatch, capsys, caplog):
  """Every writer of a training run, and every reader of its workdir, on gs://."""
  # pylint: disable=g-import-not-at-top
  from clu import metric_writers

  from coe_jax import evaluate
  from coe_jax.evaluation import run as evaluation_run
  from coe_jax.serving.jax_predictor import Predictor
  from coe_jax.training import saved_run, train
  from tests.helpers import make_image_folder, single_device_trainer, train_config

  # pylint: enable=g-import-not-at-top
  summaries = []  # TensorBoard's writer goes through TensorFlow's own gs:// support.

  def summary_writer(logdir, *args, **kwargs):
    summaries.append(logdir)
    return metric_writers.MultiWriter([])

  monkeypatch.setattr(metric_writers, "SummaryWriter", summary_writer)
  workdir = f"{BUCKET}/run"
  config = train_config(num_steps=6)
  trainer = single_device_trainer(config, workdir)
  assert train.train(trainer, stop_at=3) is None  # As a preempted machine stops.
  # A recreated machine: a fresh trainer resumes from the bucket, not from step 0.
  trainer = single_device_trainer(train_config(num_steps=6), workdir)
  # On absl's own logger: another test in this process may have set its level.
  with caplog.at_level(logging.INFO, logger="absl"):
    state = train.train(trainer)
  assert f"resuming {workdir} from step 3" in caplog.text
  assert state is not None
  results = evaluation_run.evaluate(trainer, state)
  assert set(fake_bucket.managers) == {f"{workdir}/checkpoints"}
  assert summaries == [workdir, workdir]
  stored = set(os.listdir(_in_bucket(fake_bucket, "run")))
  assert {
      run_dir.CONFIG, run_dir.RUN, run_dir.RESULTS, run_dir.CURVE, *run_dir.PLOTS,
      run_dir.CHECKPOINTS
  } <= stored, stored
  assert sorted(os.listdir(_in_bucket(fake_bucket, "run", "checkpoints"))) == ["3", "6"]
  # metrics.jsonl in the bucket too (rewritten whole: no appends there), each step once.
  assert [m["step"] for m in run_dir.read_metrics(workdir)] == [3, 6]

  # The readers: saved_run, the predictor, evaluation and the weights-only copy.
  _, _, meta = saved_run.load_for_inference(workdir)
  assert meta["threshold"] == results["threshold"]
  assert Predictor.load(workdir, step=3).num_experts == config.num_experts
  images = make_image_folder(tmp_path / "images",
                             splits=("test",),
                             classes={
                                 name: ("L", 20 * i) for i, name in enumerate(meta["class_names"])
                             },
                             per_class=1)
  assert evaluate.main(
      [f"--workdir={workdir}", f"--data_path={images}",
       f"--json={BUCKET}/eval.json"]) == 0, capsys.readouterr().err
  assert run_dir.read_json(f"{BUCKET}/eval.json")["num_test_examples"] == len(meta["class_names"])
  assert evaluate.main([f"--workdir={workdir}", f"--save_weights={BUCKET}/weights"]) == 0
  assert os.path.isfile(_in_bucket(fake_bucket, "weights", run_dir.WEIGHTS))
  assert Predictor.load(f"{BUCKET}/weights").num_experts == config.num_experts
  assert all(p.startswith(f"{BUCKET}/") for p in fake_bucket.asked)

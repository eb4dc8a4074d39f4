"""The trainer: `train_and_evaluate(config, workdir)`.

One loop, jitted with shardings on a `data` x `expert` mesh:

1. Build the model, the optimizer and the sharded train state; resume from
   the newest readable checkpoint in `workdir/checkpoints` if there is one
   (the data pipeline is deterministic in the step, so a resumed run sees
   the batches an uninterrupted one would have seen).
2. Train through the stages of `train.stages` (warmup, coadapt, delegator),
   one compiled step per stage; PWLU layers switch from phase I to II at
   `train.pwlu_realign_fraction`. Metrics go to TensorBoard, the console and
   `workdir/metrics.jsonl`; checkpoints are saved every
   `train.checkpoint_every_steps`, at the end, and on SIGTERM (preemption).
3. Evaluate (`coe_jax.evaluation.run.evaluate`): calibrate the early-exit
   threshold, route the test split at it, and write `workdir/results.json`
   plus PNG plots.
"""

import collections
import contextlib
import copy
import itertools
import json
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from coe_jax import config_base, data, flops, run_dir
from coe_jax.errors import CoEError, require
from coe_jax.evaluation import run as evaluation_run
from coe_jax.models import pwlu
from coe_jax.models.coe import CoE
from coe_jax.parallel import mesh as mesh_lib
from coe_jax.stages import StagePlan
from coe_jax.training import checkpointing, optim, saved_run, train_step, writers
from coe_jax.training.train_step import TrainState, create_train_state, make_train_step

LOSS_TERMS = ("expert_loss", "selection_loss", "delegator_loss")


class _Preemption:
  """Notes SIGTERM so the loop can save a checkpoint and stop cleanly.

  In a single process only. With several, JAX's preemption service takes
  SIGTERM (from `jax.distributed.initialize`) and `reached_preemption` stops
  every process at the same step; a handler here would take the signal from it
  and let each process stop at its own step, to hang in the collective save.
  """

  def __init__(self):
    self.requested = False
    self._installed = jax.process_count() == 1
    if self._installed:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    self.requested = True

  def restore(self):
    if self._installed:
      # None: the previous handler was not set from Python; the default is the nearest.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)


def _check_workdir(workdir: str) -> None:
  try:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    # One probe per process: on a pod every host checks the same workdir.
    probe = path / f".write_test_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise CoEError(f"workdir={workdir!r}: not writable ({e.strerror or e})") from None


class Trainer:
  """The pieces of one run that training and evaluation share."""

  def __init__(self,
               config: ml_collections.ConfigDict,
               workdir: str,
               devices=None,
               info: Optional[data.DataInfo] = None):
    """`info` stands in for the data set's (the planner compiles steps with no data at hand)."""
    config_base.validate(config)
    # The config as given is the run's (config.json): a rerun of the same
    # command matches it, and it resolves again on whatever mesh runs it.
    self.given_config = config
    config = mesh_lib.with_routing_groups(config, devices)
    self.config = config
    self.workdir = workdir
    self.info = info if info is not None else data.get_info(config)
    if config.data.num_classes is not None:
      require(config.data.num_classes == self.info.num_classes, "data.num_classes",
              config.data.num_classes, f"but the data set has {self.info.num_classes} classes")
    self.model = CoE(config, self.info.num_classes)
    self.mesh = mesh_lib.make_mesh(config, devices)
    self.optimizer = optim.make_optimizer(config)
    self.flops = flops.count(config, self.info.num_classes)
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
    # The share of every batch this process loads (`mesh.process_data_shard`).
    self.data_shard, self.data_shards = mesh_lib.process_data_shard(self.mesh)
    # Evaluation's batches, padded to a size the data axis splits.
    self.eval_config = config
    padded = mesh_lib.eval_batch_size(config, self.mesh)
    if padded != config.eval.batch_size:
      logging.info(
          "evaluating in batches of %d (eval.batch_size=%d padded to a multiple of the "
          "%d data shards)", padded, config.eval.batch_size, self.mesh.shape[mesh_lib.DATA_AXIS])
      self.eval_config = copy.deepcopy(config)
      with self.eval_config.unlocked():
        self.eval_config.eval.batch_size = padded
    self.replicated = mesh_lib.replicated(self.mesh)
    abstract = jax.eval_shape(
        lambda: create_train_state(self.model, self.optimizer, config, jax.random.key(0)))
    self.state_sharding = mesh_lib.state_shardings(abstract, self.mesh, config.num_experts)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.state_sharding)

  def train_batches(self, start_step: int = 0):
    """This process's share of every training batch from `start_step` on."""
    return data.train_batches(self.config,
                              start_step=start_step,
                              process_index=self.data_shard,
                              process_count=self.data_shards)

  def eval_batches(self, split: str = "test"):
    """Global arrays of one padded pass over `split` (`data.common.EVAL_SPLITS`)."""
    return (self.global_batch(b) for b in data.eval_batches(self.eval_config,
                                                            process_index=self.data_shard,
                                                            process_count=self.data_shards,
                                                            split=split))

  def global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's share of a batch -> global arrays split over `data`.

    Processes in the same data rows hold the same share; the global batch is
    `data_shards` shares. On a TPU slice a process's rows need not be
    contiguous; `mesh.global_batch` gives each row its block of the share.
    """
    return {k: mesh_lib.global_batch(self.mesh, v) for k, v in batch.items()}

  def init_state(self) -> TrainState:
    """The state of a new run: random, or with `train.init_from`'s networks."""
    init = jax.jit(lambda rng: create_train_state(self.model, self.optimizer, self.config, rng),
                   out_shardings=self.state_sharding)
    rng = jax.random.key(self.config.seed)
    # A program that runs once: on CPUs XLA spent 13 s optimising its draws
    # (the digits demo; 1,115 fusions of unrolled threefry) and 3.5 s unoptimised.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    state = init.lower(rng).compile(compiler_options=options)(rng)
    origin = self.config.train.init_from
    if not origin:
      return state
    _, source, _ = saved_run.load_for_inference(origin)
    fresh = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    variables = saved_run.start_from(fresh, source, origin)
    logging.info("networks from %s", origin)
    # The optimizer's moments start at zero whatever the parameters; the EMA
    # starts from the loaded ones.
    state = state.replace(params=variables["params"],
                          batch_stats=variables["batch_stats"],
                          ema_params=variables["params"] if state.ema_params is not None else None)
    return jax.device_put(state, self.state_sharding)

  def compile_step(self, stage: str):
    step = make_train_step(self.model, self.optimizer, self.config, stage, self.mesh)
    return jax.jit(step,
                   in_shardings=(self.state_sharding, self.batch_sharding, self.replicated),
                   out_shardings=(self.state_sharding, self.replicated),
                   donate_argnums=0)

  def copy_generalist(self, state: TrainState) -> TrainState:
    """Every expert becomes a copy of expert 0: parameters, BatchNorm statistics,
    optimizer state and EMA (`train.generalist_warmup`, when co-adaptation starts)."""
    return jax.jit(train_step.copy_expert_zero, out_shardings=self.state_sharding,
                   donate_argnums=0)(state)

  def realign_pwlu(self, state: TrainState) -> TrainState:
    """PWLU phase I -> II: bounds from the running statistics, ReLU-shaped heights."""

    def realign(state):
      variables = pwlu.realign({"params": state.params, "batch_stats": state.batch_stats})
      ema = state.ema_params
      if ema is not None:
        ema = pwlu.realign({"params": ema, "batch_stats": state.batch_stats})["params"]
      return state.replace(params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           ema_params=ema)

    return jax.jit(realign, out_shardings=self.state_sharding, donate_argnums=0)(state)


def log_setup(trainer: Trainer) -> None:
  """Logs where the run computes and how its batches are split, before anything compiles."""
  config, device = trainer.config, trainer.mesh.devices.flat[0]
  logging.info("backend %s (%s), %d devices in %d processes; mesh %s; FLOPs %s",
               jax.default_backend(), device.device_kind, trainer.mesh.size, jax.process_count(),
               dict(trainer.mesh.shape), trainer.flops)
  per_process = config.train.batch_size // trainer.data_shards
  logging.info(
      "global batch %d; this process (%d of %d) loads %d examples a step, share %d of %d "
      "of every batch", config.train.batch_size, jax.process_index(), jax.process_count(),
      per_process, trainer.data_shard, trainer.data_shards)


def _write_run_files(trainer: Trainer) -> None:
  config, workdir = trainer.given_config, trainer.workdir
  run_dir.write_json(os.path.join(workdir, run_dir.CONFIG), json.loads(config.to_json()))
  run_dir.write_json(
      os.path.join(workdir, run_dir.RUN), {
          "class_names": trainer.info.class_names,
          "num_classes": trainer.info.num_classes,
          "num_train_examples": trainer.info.num_train,
          "num_test_examples": trainer.info.num_test,
          **trainer.flops
      })


def _first_nonfinite(history: list[tuple[int, dict[str, float]]]) -> Optional[tuple[int, str]]:
  """(step, what) of the first step whose loss or gradient was not finite, or None.

  `what` is the first non-finite loss term (expert, selection, delegator), else
  the weighted total `loss` (a sum can overflow), else `gradient`.
  """
  for step, metrics in history:
    if not metrics["finite"]:
      bad = [t for t in (*LOSS_TERMS, "loss") if not np.isfinite(metrics[t])]
      return step, (bad[0] if bad else "gradient")
  return None


class TrainingProgress:
  """Throughput and time left, from the steps that have finished (not merely been dispatched).

  Reports images/s in total and per device and, where the device's peak is
  known (`train.peak_flops_per_device`, else `flops.PEAK_FLOPS`), the
  model-FLOPs utilisation: the analytic FLOPs of the steps done (3 forward
  passes per trained network, `flops.train_step_flops`) over the devices'
  peak. The first window after a start includes compiling; the ETA then
  comes from the latest window alone, which tracks the current stage's step
  time.
  """

  def __init__(self, trainer: "Trainer", start_step: int):
    config = trainer.config
    self._config, self._num_steps = config, config.train.num_steps
    self._batch_size, self._devices = config.train.batch_size, trainer.mesh.size
    self._plan = StagePlan.from_config(config)
    self._stage_flops = {
        span.stage.name: flops.train_step_flops(config, trainer.info.num_classes, span.stage.name)
        for span in self._plan.spans
    }
    kind = trainer.mesh.devices.flat[0].device_kind
    self._peak = config.train.peak_flops_per_device or flops.peak_flops_per_device(
        kind, config.train.compute_dtype)
    if self._peak is None:
      logging.info(
          "mfu not logged: no peak FLOP/s known for %r; set "
          "train.peak_flops_per_device", kind)
    else:
      logging.info("mfu against %.4g FLOP/s per device (%s, %s)", self._peak, kind,
                   config.train.compute_dtype)
    self._last_step, self._last_time = start_step, time.monotonic()
    self._excluded = 0.0  # Seconds of this window spent saving and evaluating.

  @contextlib.contextmanager
  def excluded(self) -> Iterator[None]:
    """Time spent in the block (checkpoints, evaluation) is not training time: the
    rates and MFU leave it out."""
    start = time.monotonic()
    try:
      yield
    finally:
      self._excluded += time.monotonic() - start

  def report(self, done: int, means: dict[str, float]) -> dict[str, float]:
    """Logs one short line and returns the rates since the last report.

    `done` steps have finished; `means` are their metrics' means. The line
    gives the step, the loss, the routed and delegator accuracies, the
    throughput and the time left; every metric goes to TensorBoard and
    `metrics.jsonl`.
    """
    now = time.monotonic()
    seconds = max(now - self._last_time - self._excluded, 1e-9)
    self._excluded = 0.0
    steps = range(self._last_step, done)
    steps_per_sec = len(steps) / seconds
    model_flops = sum(self._stage_flops[self._plan.at(s).name] for s in steps)
    self._last_step, self._last_time = done, now
    images_per_sec = steps_per_sec * self._batch_size
    rates = {
        "steps_per_sec": steps_per_sec,
        "images_per_sec": images_per_sec,
        "images_per_sec_per_device": images_per_sec / self._devices
    }
    mfu = ""
    if self._peak is not None:
      rates["mfu"] = model_flops / seconds / (self._devices * self._peak)
      mfu = f", mfu {rates['mfu']:.1%}"
    stage = self._plan.at(done - 1)
    # A stage that trains no selection routes nothing: its routed accuracy would read 0.
    routed = f", routed {means['routed_accuracy']:.1%}" if stage.trains_selection else ""
    left = (self._num_steps - done) / steps_per_sec
    logging.info(
        "step %d/%d (%s): loss %.4g%s, delegator %.1f%% | %.0f images/s%s | "
        "about %dm%02ds left", done, self._num_steps, stage.name, means["loss"], routed,
        100 * means["delegator_accuracy"], images_per_sec, mfu, left // 60, left % 60)
    return rates


# Batches on the devices ahead of the step that computes.
PREFETCH = 2


def prefetch(batches: Iterator[Any], to_device: Callable[[Any], Any], size: int) -> Iterator[Any]:
  """`to_device` of each of `batches`, `size` of them put ahead of the one consumed.

  `to_device` starts the transfers and returns at once (jax copies
  asynchronously), so the next batches travel while a step computes.
  """
  queue = collections.deque(to_device(b) for b in itertools.islice(batches, size))
  while queue:
    yield queue.popleft()
    queue.extend(to_device(b) for b in itertools.islice(batches, 1))


class _SaveClock:
  """Whether `train.checkpoint_every_secs` have passed since the last save (0: never).

  Every process must decide alike, or the collective save waits forever for
  the ones that did not: on several processes, process 0's clock decides.
  """

  def __init__(self, every_secs: float):
    self._every, self._last = every_secs, now()

  def due(self) -> bool:
    if not self._every:
      return False
    due = now() - self._last >= self._every
    if jax.process_count() > 1:
      due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
    return due

  def saved(self) -> None:
    self._last = now()


def now() -> float:
  """The clock of time-based checkpoints (tests replace it)."""
  return time.monotonic()


def train(trainer: Trainer, stop_at: Optional[int] = None) -> Optional[TrainState]:
  """Runs (or resumes) training; returns the final state, or None when stopped early.

  Args:
    trainer: the run.
    stop_at: stop after this step, with a checkpoint, as a preemption would
      (for notebooks and tests: the next call resumes from there).
  """
  config, workdir = trainer.config, trainer.workdir
  num_steps = config.train.num_steps
  is_chief = jax.process_index() == 0
  checkpointer = checkpointing.Checkpointer(workdir,
                                            keep=config.train.keep_checkpoints,
                                            fingerprint=checkpointing.shape_fingerprint(
                                                config, trainer.info.num_classes))
  restored = checkpointer.restore_latest(trainer.abstract_state, set_aside_unreadable=True)
  if restored is None:
    start_step, state = 0, trainer.init_state()
    logging.info("starting a new run in %s", workdir)
  else:
    start_step, state = restored
    logging.info("resuming %s from step %d", workdir, start_step)
  if is_chief:
    _write_run_files(trainer)

  # The console gets `progress`'s short line; every metric goes to TensorBoard
  # and metrics.jsonl, written by the chief alone.
  writer = writers.open_writers(workdir, start_step, chief=is_chief)
  hooks = []
  if config.train.profile_steps and is_chief:
    hooks.append(writers.profiler(workdir, config.train.profile_steps, min(10, num_steps)))
  steps = {}
  realign_step = int(config.train.pwlu_realign_fraction * num_steps)
  # The first co-adaptation step, where a generalist warm-up ends (a resumed
  # run that starts there copies too: checkpoints hold the state before it).
  plan = StagePlan.from_config(config)
  generalist_step = plan.generalist_copy_step()
  rng = jax.random.key(config.seed + 1)
  # Batches go to the devices two steps ahead, while the current step computes.
  batches = prefetch(trainer.train_batches(start_step), trainer.global_batch, PREFETCH)
  preemption = _Preemption()
  history, skipped = [], 0
  progress = TrainingProgress(trainer, start_step)
  save_clock = _SaveClock(config.train.checkpoint_every_secs)
  try:
    for step in range(start_step, num_steps):
      if step == realign_step:
        state = trainer.realign_pwlu(state)
      if step == generalist_step:
        logging.info("step %d: every expert starts co-adaptation as a copy of the generalist", step)
        state = trainer.copy_generalist(state)
      stage = plan.at(step).name
      if stage not in steps:
        logging.info("step %d: stage %s", step, stage)
        steps[stage] = trainer.compile_step(stage)
      state, metrics = steps[stage](state, next(batches), rng)
      history.append((step, metrics))
      done = step + 1
      for hook in hooks:
        hook(done)
      preempted = (preemption.requested or done == stop_at or checkpointer.reached_preemption(done))
      log = done % config.train.log_every_steps == 0 or done == num_steps
      save = (done % config.train.checkpoint_every_steps == 0 or done == num_steps or preempted or
              (log and save_clock.due()))
      if log or save:
        # Also before every save: under "stop", no checkpoint holds a state past a bad step.
        history = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in history]
        bad = _first_nonfinite(history)
        if bad is not None and config.train.nonfinite == "stop":
          last = checkpointer.latest_step()
          kept = (f"the last good checkpoint is step {last} in {checkpointer.directory}"
                  if last is not None else "no checkpoint had been saved yet")
          raise CoEError(f"step={bad[0]}: non-finite {bad[1]}; training stopped, {kept} "
                         "(train.nonfinite='skip' skips such steps instead)")
      if log:
        skipped += sum(1 for _, m in history if not m["finite"])
        means = {
            k: float(np.mean([m[k] for _, m in history if m["finite"]] or [np.nan]))
            for k in history[-1][1]
        }
        # The device_get above waited for these steps: they are finished, not dispatched.
        writer.write_scalars(done, {
            **means, "skipped_steps": skipped,
            **progress.report(done, means)
        })
        history = []
      if save:
        with progress.excluded():
          checkpointer.save(done, state, force=True)
        save_clock.saved()
      if preempted:
        checkpointer.wait()
        logging.warning("stopped at step %d; run the same command again to resume", done)
        return None
      if config.train.eval_every_steps and done % config.train.eval_every_steps == 0 \
          and done < num_steps:
        with progress.excluded():
          results = evaluation_run.evaluate(trainer, state, write_files=False)
        writer.write_scalars(done, {
            f"eval/{k}": v for k, v in results.items() if isinstance(v, float)
        })
    checkpointer.wait()
  finally:
    preemption.restore()
    writer.flush()
    checkpointer.close()
  return state


def compilation_cache_dir(config: ml_collections.ConfigDict, workdir: str,
                          environment_dir: Optional[str]) -> str:
  """Where the run keeps its compiled programs ("" for nowhere).

  `train.compilation_cache_dir` when set, else JAX's own setting
  (`environment_dir`, from JAX_COMPILATION_CACHE_DIR), else the workdir's
  `compilation_cache`, which a preempted run finds again when it resumes.
  """
  if config.train.compilation_cache_dir is not None:
    return config.train.compilation_cache_dir
  return environment_dir or os.path.join(workdir, run_dir.COMPILATION_CACHE)


def use_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Points JAX's persistent compilation cache at `compilation_cache_dir`'s choice
  (JAX's current setting as the environment's), or turns it off for ""."""
  cache = compilation_cache_dir(config, workdir, jax.config.jax_compilation_cache_dir)
  jax.config.update("jax_compilation_cache_dir", cache or None)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Optional[dict[str, Any]]:
  """Trains (or resumes) and evaluates; returns the results, or None if preempted."""
  _check_workdir(workdir)
  use_compilation_cache(config, workdir)
  trainer = Trainer(config, workdir)
  log_setup(trainer)
  started = time.time()
  state = train(trainer)
  if state is None:
    return None
  return evaluation_run.evaluate(trainer, state, extra={"train_seconds": time.time() - started})

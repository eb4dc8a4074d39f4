"""A trained run as its networks: loading its variables for inference, and its
weights-only copy.

A run is a training workdir (orbax checkpoints, `coe_jax.run_dir`) or a
weights-only copy of one (`run_dir.WEIGHTS` beside its JSON files), small
enough to commit. The predictor, the exporter, `python -m coe_jax.evaluate`
and `train.init_from` read both through `load_for_inference`.
"""

import os
from typing import Any, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from coe_jax import config_base, run_dir
from coe_jax.errors import CoEError, require
from coe_jax.models.coe import CoE
from coe_jax.models.stacked import under_experts
from coe_jax.training import checkpointing, optim, train_step


def load_for_inference(
    workdir: str,
    step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, dict[str, Any], dict[str, Any]]:
  """(config, eval variables, meta) of a run, for the predictor and the exporter.

  `workdir` is a training run's, or a weights-only copy of one (`save_weights`).
  The newest checkpoint, or checkpoint `step`; when it cannot be read, a
  one-line `CoEError`, never an older model in its place (training resumes
  from an older one; serving must not).

  `meta` has `class_names`, `num_classes`, `threshold` (the calibrated tau
  from results.json; before the run has been evaluated, `eval.threshold` or,
  if unset, infinity: no early exit; a single network's is infinity too) and
  `expected_exit_rate` (the hold-out's exit rate at that tau, which sizes
  serving-mode expert buffers; 0 before).
  """
  config_path = os.path.join(workdir, run_dir.CONFIG)
  if not epath.Path(config_path).is_file():
    raise CoEError(f"workdir={workdir!r}: no config.json; is this the workdir of a training run?")
  config = ml_collections.ConfigDict(config_base.upgrade(run_dir.read_json(config_path)))
  config_base.validate(config)
  run_path = os.path.join(workdir, run_dir.RUN)
  if not epath.Path(run_path).is_file():
    raise CoEError(f"workdir={workdir!r}: no run.json; the run has not started training")
  run = run_dir.read_json(run_path)
  model = CoE(config, run["num_classes"])
  optimizer = optim.make_optimizer(config)
  abstract = jax.eval_shape(
      lambda: train_step.create_train_state(model, optimizer, config, jax.random.key(0)))
  # Onto this process's first device, whatever devices the run was saved from:
  # a checkpoint written by a pod or a multi-device mesh loads on a laptop.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  weights = os.path.join(workdir, run_dir.WEIGHTS)
  if epath.Path(weights).is_file() and not epath.Path(workdir, run_dir.CHECKPOINTS).exists():
    require(step is None, "step", step, f"{workdir} holds one set of weights, no checkpoints")
    variables = read_weights(weights, abstract.eval_variables())
  else:
    fingerprint = checkpointing.shape_fingerprint(config, run["num_classes"])
    checkpointer = checkpointing.Checkpointer(workdir,
                                              keep=config.train.keep_checkpoints,
                                              fingerprint=fingerprint)
    try:
      _, state = checkpointer.restore_exactly(abstract, step)
    finally:
      checkpointer.close()
    variables = state.eval_variables()
  results_path = os.path.join(workdir, run_dir.RESULTS)
  if epath.Path(results_path).is_file():
    results = run_dir.read_json(results_path)
    # A single network's results have no tau: it answers every image itself.
    threshold = results.get("threshold", float("inf"))
    exit_rate = results.get("expected_exit_rate", 0.0)
  else:
    threshold = config.eval.threshold if config.eval.threshold is not None else float("inf")
    exit_rate = 0.0
  meta = {
      "class_names": run["class_names"],
      "num_classes": run["num_classes"],
      "threshold": threshold,
      "expected_exit_rate": exit_rate
  }
  return config, variables, meta


def read_weights(path: str, template: dict[str, Any]) -> dict[str, Any]:
  """The variables of a `run_dir.WEIGHTS` file, shaped and typed like `template`'s leaves.

  Raises:
    CoEError: the file cannot be read, or its shapes are not the run's.
  """
  try:
    restored = flax.serialization.from_bytes(template, epath.Path(path).read_bytes())
  except (ValueError, KeyError, TypeError) as e:
    raise CoEError(f"weights={path!r}: cannot be read as this run's variables ({e})") from None
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(template), strict=True):
    require(
        np.shape(got) == tuple(want.shape), "weights", path,
        f"holds an array of shape {np.shape(got)} where the run's config has {tuple(want.shape)}")
  return jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), restored, template)


def save_weights(workdir: str, out_dir: str, step: Optional[int] = None) -> str:
  """Writes a run's evaluated variables and its JSON files to `out_dir` (`run_dir.WEIGHTS`).

  Returns the weights file's path. The optimizer state stays behind: the
  copy serves, evaluates and initialises other runs, and is small enough to commit.
  """
  _, variables, _ = load_for_inference(workdir, step)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  for name in (run_dir.CONFIG, run_dir.RUN, run_dir.RESULTS, run_dir.CURVE, run_dir.PREDICTIONS):
    source = epath.Path(workdir, name)
    if source.is_file():
      run_dir.write_bytes_atomically(str(out / name), source.read_bytes())
  path = str(out / run_dir.WEIGHTS)
  run_dir.write_bytes_atomically(path, flax.serialization.to_bytes(jax.device_get(variables)))
  return path


# The delegator's selection head: [F, N] and [N], so its shape follows num_experts.
SELECTION_HEAD = "selector"


def start_from(fresh: dict[str, Any], source: dict[str, Any], origin: str) -> dict[str, Any]:
  """`fresh` variables ({params, batch_stats}) with every network taken from `source`'s.

  Experts: the same number of stacked experts are copied one for one; a
  single expert (a one-network run: a generalist) is copied into all N.
  The delegator is copied whole, but for its selection head where the
  numbers of experts differ, which keeps its fresh initialisation.

  Raises:
    CoEError: a leaf `fresh` has and `source` lacks, or of another shape, named.
  """
  flat_source = {
      jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(source)
  }

  def take(path, leaf):
    name = jax.tree_util.keystr(path)
    require(name in flat_source, "train.init_from", origin,
            f"has no {name}: not a run of this architecture")
    got = flat_source[name]
    shape = tuple(np.shape(got))
    if shape == tuple(leaf.shape):
      return jnp.asarray(got, leaf.dtype)
    if under_experts(path) and shape[0] == 1 and shape[1:] == tuple(leaf.shape[1:]):
      return jnp.broadcast_to(jnp.asarray(got, leaf.dtype), leaf.shape)  # The generalist.
    if any(getattr(key, "key", None) == SELECTION_HEAD for key in path):
      return leaf  # Another number of experts: a fresh selection head.
    raise CoEError(f"train.init_from={origin!r}: {name} has shape {shape}, this run's "
                   f"{tuple(leaf.shape)}")

  return jax.tree_util.tree_map_with_path(take, fresh)

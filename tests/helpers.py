"""What several test files share: configs, trainers, random variables, fake data, checks.

Each helper lives here once it serves more than one test file; a helper that
one file alone uses stays in that file. The trainer, TensorFlow and TFDS are
imported inside the helpers that use them, so that a test file that needs only
the light helpers (`random_variables`, `make_image_folder`) starts without
loading TensorFlow.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from coe_jax.evaluation import NEAR_THRESHOLD
from coe_jax.models.coe import CoE
from tests.tiny import REPO, tiny_config

# Class -> constant pixel each of its images has, in the mode its files use.
IMAGE_FOLDER_CLASSES = {
    "cat": ("L", 90),
    "dog": ("RGB", (200, 40, 10)),
    "zebra": ("RGBA", (10, 120, 250, 0))
}

# Examples per split of the fake imagenet2012 that `write_prepared_tfds` writes.
IMAGENET_SIZES = {"train": 20, "validation": 9}


def train_config(num_steps=6, **kwargs):
  config = tiny_config(num_experts=2, **kwargs)
  config.train.num_steps = num_steps
  config.train.warmup_steps = 1
  config.train.stages.warmup = 0.5
  config.train.stages.coadapt = 0.5
  config.train.checkpoint_every_steps = 3
  config.train.log_every_steps = 3
  config.mesh.data = 1
  return config


def pod_config(data: int = 2, expert: int = 2):
  """The run of tests/test_pod.py: `train_config` for 4 steps on a data x expert mesh."""
  config = train_config(num_steps=4)
  config.num_experts = max(config.num_experts, expert)
  config.mesh.data, config.mesh.expert = data, expert
  return config


def single_device_trainer(config, workdir):
  """A trainer on the first device only (the tests run with 8 fake devices)."""
  from coe_jax.training import train  # pylint: disable=g-import-not-at-top
  config.mesh.data = 1
  return train.Trainer(config, workdir, devices=jax.devices()[:1])


def results_figures(workdir) -> dict:
  """A run's results.json but the timings (`train_seconds`, ...), which measure the machine."""
  with open(os.path.join(workdir, "results.json")) as f:
    return {k: v for k, v in json.load(f).items() if not k.endswith("_seconds")}


def training_metrics(workdir) -> list:
  """The training lines of a run's metrics.jsonl (those with a loss), in file order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [m for m in map(json.loads, f) if "loss" in m]


def checkpoint_params(workdir) -> list:
  """The latest checkpoint's evaluation variables, as a flat list of arrays."""
  from coe_jax.training import saved_run  # pylint: disable=g-import-not-at-top
  _, variables, _ = saved_run.load_for_inference(str(workdir))
  return jax.tree.leaves(jax.device_get(variables))


def subprocess_env(**extra: str) -> dict[str, str]:
  """This process's environment for a CLI run, plus `extra`.

  conftest gives the test process 8 fake CPU devices; a CLI run gets the one
  CPU device a user's laptop has, and no probing for accelerators, so that it
  runs alike on every machine.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(flag for flag in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in flag)
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra)
  return env


def run_processes(module: str, args_of_process: list[list[str]], timeout_s: float) -> list[str]:
  """Runs `python -m module` as one jax.distributed process per entry of
  `args_of_process`, joined through a local coordinator; their outputs, once all
  exited with status 0. Processes still running after `timeout_s` (waiting on
  each other) are killed and the test fails with the tail of each one's output."""
  import socket  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  count = len(args_of_process)
  workers = [
      subprocess.Popen([sys.executable, "-m", module, *args],
                       cwd=REPO,
                       env=subprocess_env(COE_COORDINATOR_ADDRESS=f"localhost:{port}",
                                          COE_NUM_PROCESSES=str(count),
                                          COE_PROCESS_ID=str(i)),
                       stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT,
                       text=True) for i, args in enumerate(args_of_process)
  ]
  deadline = time.monotonic() + timeout_s
  try:
    outputs = [
        worker.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for worker in workers
    ]
  except subprocess.TimeoutExpired:
    for worker in workers:
      worker.kill()
    said = "\n".join(
        f"process {i}: ...{worker.communicate()[0][-1500:]}" for i, worker in enumerate(workers))
    import pytest  # pylint: disable=g-import-not-at-top
    pytest.fail(f"still running after {timeout_s} s, waiting on each other:\n{said}")
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]
  return outputs


def run_module(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  """`python -m module args...` from the repository root, its output captured; `env`
  adds to (or replaces) `subprocess_env`'s variables."""
  return subprocess.run([sys.executable, "-m", module, *args],
                        capture_output=True,
                        text=True,
                        cwd=REPO,
                        env=subprocess_env(**env),
                        timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
  """The one `error:` line of a failed run; fails on a traceback or a zero exit."""
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  # No TensorFlow start-up notices around it (`coe_jax/__init__.py`).
  assert "oneDNN" not in result.stderr and "InitializeLog" not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


def random_images(seed: int, batch: int) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, 16, 16, 3), 0, 256).astype(jnp.uint8)


def random_variables(model: CoE, seed: int = 0):
  """Random variables of `model`, without compiling `model.init`.

  Compiling the init of even a tiny CoE takes ~20 s on a busy 2-core CPU.
  Kernels are N(0, 1 / fan_in), BatchNorm scales and variances near 1, biases
  and means near 0. The delegator's heads are then centred and scaled on a
  batch of random images: a tiny random backbone's pooled features barely
  differ between images, so its raw confidences would all sit near 1/K and
  its expert choices would hinge on rounding.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, stacked = path[-1].key, path[1].key == "experts"
    if name == "kernel":  # [(N,) kernel dims..., fan-in, out]
      fan_in = int(np.prod(leaf.shape[int(stacked):-1]))
      value = rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(0, 0.1, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, jax.random.key(0)))
  heads = variables["params"]["delegator"]
  logits = model.delegator(variables, random_images(seed + 1000, 32))  # ([32, K], [32, N])
  for head, head_logits in zip(("classifier", "selector"), logits):
    centred = head_logits - heads[head]["bias"]  # [32, K or N], without the bias.
    scale = 2.0 / jnp.mean(jnp.std(centred, axis=0))  # Logits spread ~2 across images.
    heads[head] = dict(kernel=heads[head]["kernel"] * scale,
                       bias=-jnp.mean(centred, axis=0) * scale)
  return variables


def assert_same_answers(lite, ref, confidence, tau):
  """Equal decisions away from tau; logits within 1e-4 of each sample's largest."""
  decided = np.abs(confidence - tau) > NEAR_THRESHOLD
  np.testing.assert_array_equal(lite["early_exit"][decided], ref["early_exit"][decided])
  np.testing.assert_array_equal(lite["expert"][decided], ref["expert"][decided])
  same = decided | (lite["expert"] == ref["expert"])
  scale = np.abs(ref["logits"][same]).max(axis=-1, keepdims=True)
  assert np.all(np.abs(lite["logits"][same] - ref["logits"][same]) <= 1e-4 * scale)


def save_image(path, mode, value, size):
  image = Image.new(mode, size, value)
  if path.endswith(".jpg"):
    image.convert("RGB" if mode == "RGBA" else mode).save(path, quality=100)
  else:
    image.save(path)


def make_image_folder(root, splits=("train", "test"), classes=IMAGE_FOLDER_CLASSES, per_class=3):
  for split in splits:
    for name, (mode, value) in classes.items():
      os.makedirs(os.path.join(root, split, name))
      for i in range(per_class):
        ext = ".jpg" if i == 1 else ".png"  # Both formats in every class.
        save_image(os.path.join(root, split, name, f"{i}{ext}"), mode, value, (12 + 5 * i, 20))
  return str(root)


def write_prepared_tfds(root, name, sizes, example, shards=2):
  """Writes a prepared TFDS data set `name` with `sizes[split]` examples."""
  from coe_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  tfds_source.write_prepared(root, name, sizes, example, shards)


def imagenet_example(split, i):
  rng = np.random.default_rng([i, split == "validation"])
  height, width = rng.integers(24, 60, size=2)
  y, x = np.mgrid[0:height, 0:width]
  frequencies = rng.uniform(0.05, 0.3, size=3)
  image = np.stack(
      [127 + 120 * np.sin(f * x + c) * np.cos(f * y) for c, f in enumerate(frequencies)],
      -1)  # [H, W, 3], smooth like a photo.
  return {
      "image": image.round().astype(np.uint8),
      "label": i % 1000,
      "file_name": f"{split}_{i}.JPEG"
  }


def sgd_at_peak(config) -> None:
  """Plain SGD at its peak rate from the first step: an update is the gradient, scaled.
  (Adam would turn gradients that are zero up to float order into
  learning-rate-sized steps, and hide a real difference in that noise.)"""
  config.train.warmup_steps, config.train.optimizer, config.train.momentum = 0, "sgd", 0.0


def assert_same_update(state, new_state, params, batch_stats) -> None:
  """`new_state` moved `state` to the reference's `params` and `batch_stats`.

  Updates are compared, not parameters, and against the largest one: some
  gradients are zero but for float noise (a BatchNorm bias before another
  BatchNorm)."""
  got, want = (jax.tree.map(jnp.subtract, p, state.params) for p in (new_state.params, params))
  scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * scale)
  for a, b in zip(jax.tree.leaves(jax.device_get(new_state.batch_stats)),
                  jax.tree.leaves(jax.device_get(batch_stats)),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def grouped_reference_step(model, optimizer, config, stage, state, batch, *,
                           groups: tuple[int, int], strided: bool):
  """(params, batch_stats) after one update of the whole batch's objective, computed
  in one pass on one device (`coe_objective`), with the delegator and the experts
  run on `groups` = (G_delegator, G_experts) groups of the batch side by side (vmap),
  so that BatchNorm's statistics are each group's: strided groups are the train
  step's micro-batches, contiguous ones the devices' shares of a mesh."""
  import optax  # pylint: disable=g-import-not-at-top

  from coe_jax import objective  # pylint: disable=g-import-not-at-top
  from coe_jax.training import train_step  # pylint: disable=g-import-not-at-top

  def split(x, count):  # [B, ...] -> [G, B / G, ...]
    if strided:
      return train_step.split_micro(x, count)
    return x.reshape(count, x.shape[0] // count, *x.shape[1:])

  def join(x, batch_axis=0):  # [G, ..., B / G at batch_axis + 1, ...] -> [..., B, ...]
    if strided:
      return train_step.join_micro(x, batch_axis)
    x = jnp.moveaxis(x, 0, batch_axis)  # [..., G, B / G, ...]
    return x.reshape(*x.shape[:batch_axis], -1, *x.shape[batch_axis + 2:])

  rng = jax.random.key(1)
  mean = lambda tree: jax.tree.map(lambda x: x.mean(0), tree)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    experts = {collection: tree["experts"] for collection, tree in variables.items()}
    (class_logits, selection_logits
    ), delegator_stats = jax.vmap(lambda x: model.delegator(variables, x, train=True, rng=rng))(
        split(batch["image"], groups[0]))
    expert_images = split(batch["image"], groups[1])
    if stage == "delegator":
      expert_logits = jax.lax.stop_gradient(
          jax.vmap(lambda x: model.experts(variables, x, shared_input=True, loop="unroll"))(
              expert_images))
      expert_stats = state.batch_stats["experts"]
    else:
      expert_logits, _, expert_stats = jax.vmap(
          lambda x: model.run_stacked(experts,
                                      x,
                                      shared_input=True,
                                      train=True,
                                      rngs=jax.random.split(rng, model.num_experts),
                                      loop="unroll"))(expert_images)
      expert_stats = mean(expert_stats)
    loss, _ = objective.coe_objective(join(class_logits), join(selection_logits),
                                      join(expert_logits, batch_axis=1), batch["label"], config,
                                      stage)
    return loss, {"delegator": mean(delegator_stats), "experts": expert_stats}

  grads, batch_stats = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, _ = optimizer.update(grads, state.opt_state, state.params)
  return optax.apply_updates(state.params, updates), batch_stats


def pad_crop_flip_candidates(image: np.ndarray, margin: int) -> list[np.ndarray]:
  """Every image pad_crop_flip can make of `image` [S, S, C]: each shift in [-m, m]^2
  (zeros filled in), flipped or not."""
  size = image.shape[0]
  padded = np.pad(image, ((margin, margin), (margin, margin), (0, 0)))
  crops = [
      padded[top:top + size, left:left + size]
      for top in range(2 * margin + 1)
      for left in range(2 * margin + 1)
  ]
  return crops + [crop[:, ::-1] for crop in crops]

r"""Plans a run before renting the pod: per-device FLOPs, memory and collectives of the train step.

    python -m coe_jax.plan --config=configs/imagenet_coe_194m.py --mesh=16x4 \
        [--hbm-gib=32] [--json=FILE] [--config.num_experts=32 ...]

Compiles the co-adaptation step for a data x expert mesh of fake CPU devices
(one per chip of the mesh; no accelerator is needed) and prints, for one
device: its share of the model FLOPs (analytic, 3 forward passes), the bytes of its
parameters, optimizer state, EMA and BatchNorm statistics, its peak scratch
memory (activations kept for the backward pass and temporaries, from
`memory_analysis`), its collectives by kind, and whether it fits in
`--hbm-gib`. CPU compilation stands in for the accelerator's: memory and
FLOPs are close, not exact (the accelerator's compiler fuses and lays out
differently). Large configs take minutes to compile.

Bad input (a mesh that is not DATAxEXPERT, an expert axis that does not
divide num_experts, a batch that does not split over the data axis) is
reported in one line with exit status 1.
"""

import json
import os
import re
import sys
import tempfile
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from coe_jax.config_loading import flag_config, parse_flags
from coe_jax.data import DataInfo
from coe_jax.errors import CoEError, require
from coe_jax.models import stacked

_CONFIG = config_flags.DEFINE_config_file("config",
                                          None,
                                          "Path to a config file.",
                                          lock_config=True)
_MESH = flags.DEFINE_string("mesh", None, "DATAxEXPERT, e.g. 16x4 for 64 chips.")
_HBM_GIB = flags.DEFINE_float("hbm-gib", 32.0, "Memory of one chip, GiB.")
_JSON = flags.DEFINE_string("json", "", "Also write the plan to this JSON file.")
flags.mark_flags_as_required(["config", "mesh"])

GIB = 2**30


def parse_mesh(text: str) -> tuple[int, int]:
  """`DATAxEXPERT` -> (data, expert); a one-line `CoEError` for anything else."""
  data, sep, expert = (text or "").partition("x")
  require(sep == "x" and data.isdigit() and expert.isdigit() and int(data) > 0 and int(expert) > 0,
          "--mesh", text, "expected DATAxEXPERT, e.g. 16x4")
  return int(data), int(expert)


def _shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded abstract arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(
      int(_product(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
      for leaf in jax.tree.leaves(tree))


def _product(shape: tuple[int, ...]) -> int:
  size = 1
  for dim in shape:
    size *= dim
  return size


def plan(config, data: int, expert: int, hbm_gib: float) -> dict[str, Any]:
  """The plan of `config` on a data x expert mesh of this process's (fake) devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from coe_jax import flops  # pylint: disable=g-import-not-at-top
  from coe_jax.training import train  # pylint: disable=g-import-not-at-top
  require(hbm_gib > 0, "--hbm-gib", hbm_gib, "expected a positive number of GiB")
  require(jax.device_count() >= data * expert, "--mesh", f"{data}x{expert}",
          f"needs {data * expert} devices; this process has {jax.device_count()}")
  num_classes = config.data.num_classes
  require(
      isinstance(num_classes, int) and num_classes >= 2, "data.num_classes", num_classes,
      "the planner reads no data: set the number of classes")
  config.mesh.data, config.mesh.expert = data, expert
  # The loop an accelerator takes, not the CPU's: the plan is for the pod.
  config.expert_loop = stacked.resolve_loop(config.expert_loop, "gpu")
  # The shapes alone: no data set is read.
  info = DataInfo(num_classes, [str(k) for k in range(num_classes)], 0, 0, 0)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = train.Trainer(config, workdir, devices=jax.devices()[:data * expert], info=info)
  size, channels, batch = config.data.image_size, config.data.channels, config.train.batch_size
  sharding = trainer.batch_sharding
  abstract_batch = {
      "image": jax.ShapeDtypeStruct((batch, size, size, channels), np.uint8, sharding=sharding),
      "label": jax.ShapeDtypeStruct((batch,), np.int32, sharding=sharding)
  }
  start = time.perf_counter()
  compiled = trainer.compile_step("coadapt").lower(trainer.abstract_state, abstract_batch,
                                                   jax.random.key(0)).compile()
  compile_s = time.perf_counter() - start
  text = compiled.as_text()
  state = trainer.abstract_state
  memory = {
      "params": _shard_bytes(state.params),
      "optimizer": _shard_bytes(state.opt_state),
      "ema": _shard_bytes(state.ema_params) if state.ema_params is not None else 0,
      "batch_stats": _shard_bytes(state.batch_stats),
      "activations_and_scratch": int(compiled.memory_analysis().temp_size_in_bytes),
      "batch": _shard_bytes(abstract_batch)
  }
  total = sum(memory.values())
  return {
      "config_experts": config.num_experts,
      "mesh": f"{data}x{expert}",
      "devices": data * expert,
      "global_batch": batch,
      "remat": config.train.remat,
      "microbatches": config.train.microbatches,
      "compute_dtype": config.train.compute_dtype,
      "expert_loop": config.expert_loop,
      "gflops_per_device": flops.train_step_flops(config, num_classes) / (data * expert) / 1e9,
      # XLA's cost analysis counts a loop's body once: with scanned experts or
      # micro-batches it sees one expert and one micro-batch.
      "xla_gflops_per_device_loop_bodies_once": compiled.cost_analysis()["flops"] / 1e9,
      "gib_per_device": {
          key: value / GIB for key, value in memory.items()
      },
      "total_gib_per_device": total / GIB,
      "hbm_gib": hbm_gib,
      "fits": total <= hbm_gib * GIB,
      "collectives": {
          kind: len(re.findall(rf"= \S+ {kind}(-start)?\(", text))
          for kind in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                       "all-to-all")
      },
      "compile_s": compile_s,
  }


def format_plan(result: dict[str, Any]) -> str:
  lines = [
      f"mesh {result['mesh']} ({result['devices']} devices), N={result['config_experts']}, "
      f"global batch {result['global_batch']} in {result['microbatches']} micro-batches, "
      f"remat={result['remat']}, "
      f"{result['compute_dtype']}",
      f"  {result['gflops_per_device']:.1f} GFLOP per device and step (model FLOPs)"
  ]
  for key, gib in result["gib_per_device"].items():
    lines.append(f"  {key:<24} {gib:8.3f} GiB")
  verdict = "fits" if result["fits"] else "does NOT fit"
  lines.append(f"  {'total':<24} {result['total_gib_per_device']:8.3f} GiB: {verdict} in "
               f"{result['hbm_gib']:g} GiB")
  lines.append("  collectives: " + ", ".join(f"{k} {v}" for k, v in result["collectives"].items()))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = flag_config(_CONFIG)
    data, expert = parse_mesh(_MESH.value)
  except CoEError as e:
    sys.exit(f"error: {e}")
  # One fake CPU device per chip of the mesh, before jax starts its backend.
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={data * expert}").strip()
  try:
    result = plan(config, data, expert, _HBM_GIB.value)
  except CoEError as e:
    sys.exit(f"error: {e}")
  print(json.dumps(result))
  print(format_plan(result), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

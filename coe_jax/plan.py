r"""Plans a run before renting the chips: per-device FLOPs, memory and collectives.

    python -m coe_jax.plan --config=configs/imagenet_coe_194m.py --accelerator=v4-64 \
        [--json=FILE] [--config.train.remat=block ...]
    python -m coe_jax.plan --config=configs/imagenet_coe_194m.py --mesh=16x4 --chip=v4 \
        [--hbm-gib=32] [--mem_fraction=0.9] [--json=FILE] [--config.num_experts=32 ...]

`--accelerator` takes a Cloud TPU type as `launch/tpu_pod.sh` does (v4-64 is
32 chips: v4 and v5p names count TensorCores, two a chip; v5e and v6e names
count chips) and lays the config's mesh (`mesh.data`, `mesh.expert`) over its
chips, as the run will; `--mesh` and `--chip` name them instead.

Compiles the co-adaptation step and the evaluation programs for a data x
expert mesh of fake CPU devices (one per chip of the mesh; no accelerator is
needed, and on an accelerator host the chips are left alone) and prints, for
one device: its share of the model FLOPs (analytic, 3 forward passes), the
bytes of its parameters, optimizer state, EMA and BatchNorm statistics, the
peak scratch memory of the train step (activations kept for the backward
pass and temporaries, from `memory_analysis`) and of evaluation (which runs
beside the train state), its collectives by kind, and whether it fits in the
chip's memory (`--chip`, or `--hbm-gib`). When it does not fit, it compiles
the step again with remat and micro-batches and names the first setting that
fits.

The programs are compiled with the accelerators' convolution forms (dense and
depthwise convolutions as convolutions), not the CPU's (matrix products and
taps), which need more scratch memory; the plan prints both figures. The
compiler is still XLA:CPU: XLA:TPU and XLA:GPU fuse and lay out memory
differently, so the figures are estimates, not measurements of the chip.

Bad input (a mesh that is not DATAxEXPERT, an expert axis that does not
divide num_experts, a batch that does not split over the data axis, an
unknown chip) is reported in one line with exit status 1.
"""

import contextlib
import copy
import dataclasses
import json
import os
import re
import tempfile
import time
from typing import Any, Iterator, Optional

from absl import app, flags
from ml_collections import config_flags

from coe_jax.config_loading import flag_config, run_command
from coe_jax.data import DataInfo
from coe_jax.errors import require
from coe_jax.models import stacked

_CONFIG = config_flags.DEFINE_config_file("config",
                                          None,
                                          "Path to a config file.",
                                          lock_config=True)
_ACCELERATOR = flags.DEFINE_string(
    "accelerator", None, "A Cloud TPU type (v4-64, v5litepod-16, v5p-128, v6e-64): its chips "
    "and the config's mesh over them, instead of --mesh and --chip.")
_MESH = flags.DEFINE_string("mesh", None, "DATAxEXPERT, e.g. 16x4 for 64 chips.")
_CHIP = flags.DEFINE_string("chip", None, "The chip: one of CHIPS (its memory); or --hbm-gib.")
_HBM_GIB = flags.DEFINE_float("hbm-gib", None, "Memory of one chip, GiB (instead of --chip's).")
_MEM_FRACTION = flags.DEFINE_float(
    "mem_fraction", None, "The share of a chip's memory the run may use; on GPUs JAX takes "
    "0.75 by default (launch/gpu.sh --mem-fraction sets XLA_CLIENT_MEM_FRACTION), on TPUs all.")
_JSON = flags.DEFINE_string("json", "", "Also write the plan to this JSON file.")
flags.mark_flags_as_required(["config"])

GIB = 2**30
GB = 1e9
# JAX's default XLA_CLIENT_MEM_FRACTION: the share of a GPU's memory it allocates.
GPU_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str  # The device kind, as jax names it (flops.PEAK_FLOPS).
  gib: float  # Memory of one chip, GiB (vendors give most in GB: 16 GB is 14.9 GiB).
  platform: str  # "tpu" or "gpu".
  cores_per_chip: int = 1  # TensorCores a Cloud TPU type's name counts for one chip.


# --chip -> its facts.
CHIPS = {
    "v4": Chip("TPU v4", 32.0, "tpu", cores_per_chip=2),  # 32 GiB HBM2
    "v5e": Chip("TPU v5 lite", 16 * GB / GIB, "tpu"),
    "v5p": Chip("TPU v5", 95 * GB / GIB, "tpu", cores_per_chip=2),
    "v6e": Chip("TPU v6 lite", 32 * GB / GIB, "tpu"),
    "a100": Chip("A100", 81920 / 1024, "gpu"),  # The 80 GB part; --hbm-gib=40 for the other.
    "h100": Chip("H100", 81559 / 1024, "gpu"),  # nvidia-smi's MiB of an SXM H100
    "h200": Chip("H200", 143771 / 1024, "gpu"),
}
# Cloud TPU type prefixes (gcloud's --accelerator-type) -> --chip.
_TPU_TYPES = {"v4": "v4", "v5litepod": "v5e", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
# What the planner tries, in order, when a step does not fit: less activation
# memory for more compute (remat) or more, smaller passes (micro-batches).
_REMEDIES = (("block", 1), ("none", 2), ("block", 2), ("none", 4), ("block", 4), ("full", 4),
             ("none", 8), ("block", 8), ("full", 8), ("full", 16))


def parse_mesh(text: str) -> tuple[int, int]:
  """`DATAxEXPERT` -> (data, expert); a one-line `CoEError` for anything else."""
  data, sep, expert = (text or "").partition("x")
  require(sep == "x" and data.isdigit() and expert.isdigit() and int(data) > 0 and int(expert) > 0,
          "--mesh", text, "expected DATAxEXPERT, e.g. 16x4")
  return int(data), int(expert)


def accelerator_chips(accelerator: str) -> tuple[str, int]:
  """(--chip, number of chips) of a Cloud TPU type: `v4-64` -> ("v4", 32)."""
  prefix, _, count = (accelerator or "").rpartition("-")
  require(
      prefix in _TPU_TYPES and count.isdigit() and int(count) > 0, "--accelerator", accelerator,
      f"expected a Cloud TPU type, one of {', '.join(_TPU_TYPES)} and a count "
      "(e.g. v4-64, v5litepod-16)")
  chip = _TPU_TYPES[prefix]
  cores = CHIPS[chip].cores_per_chip
  require(
      int(count) % cores == 0, "--accelerator", accelerator,
      f"{prefix} types count TensorCores, {cores} a chip: expected a multiple of {cores}")
  return chip, int(count) // cores


def config_mesh(config, chips: int) -> tuple[int, int]:
  """(data, expert): the config's mesh over `chips` devices, as `mesh.make_mesh` lays it."""
  expert = config.mesh.expert
  require(
      isinstance(expert, int) and expert >= 1 and chips % expert == 0, "mesh.expert", expert,
      f"expected a positive divisor of the {chips} chips")
  data = config.mesh.data if config.mesh.data != -1 else chips // expert
  require(data * expert == chips, "mesh.data", config.mesh.data,
          f"expected -1 or {chips // expert} ({chips} chips / mesh.expert)")
  return data, expert


def chip_memory(chip: Optional[str],
                hbm_gib: Optional[float],
                mem_fraction: Optional[float] = None) -> tuple[Optional[str], float]:
  """(chip, GiB a run may use on one chip) from `--chip`, `--hbm-gib` (which wins) and
  `--mem_fraction`; a chip or a size is needed.

  On GPUs JAX allocates only `GPU_MEM_FRACTION` of the memory unless told
  otherwise, so a plan between that share and the whole would say "fits" and
  then run out.
  """
  if chip is not None:
    require(chip in CHIPS, "--chip", chip, f"expected one of {', '.join(CHIPS)}")
  require(chip is not None or hbm_gib is not None, "--chip", chip,
          f"name the chip ({', '.join(CHIPS)}) or give --hbm-gib: their memories differ 9-fold")
  if mem_fraction is not None:
    require(0 < mem_fraction <= 1, "--mem_fraction", mem_fraction,
            "expected a share of the memory in (0, 1]")
  if hbm_gib is not None:
    require(hbm_gib > 0, "--hbm-gib", hbm_gib, "expected a positive number of GiB")
  gib = float(hbm_gib) if hbm_gib is not None else CHIPS[chip].gib
  gpu = chip is not None and CHIPS[chip].platform == "gpu"
  fraction = mem_fraction if mem_fraction is not None else (GPU_MEM_FRACTION if gpu else 1.0)
  return chip, gib * fraction


@contextlib.contextmanager
def accelerator_forms() -> Iterator[None]:
  """Traces convolutions in the forms accelerators run (`models/formulation.py`)."""
  from coe_jax.models import conv, depthwise  # pylint: disable=g-import-not-at-top
  with conv.formulation("conv"), depthwise.formulation("conv"):
    yield


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


def _trainer(config, data: int, expert: int):
  import jax  # pylint: disable=g-import-not-at-top

  from coe_jax.training import train  # pylint: disable=g-import-not-at-top
  num_classes = config.data.num_classes
  # The shapes alone: no data set is read.
  info = DataInfo(num_classes, [str(k) for k in range(num_classes)], 0, 0, 0)
  with tempfile.TemporaryDirectory() as workdir:
    return train.Trainer(config, workdir, devices=jax.devices()[:data * expert], info=info)


def _abstract_batch(trainer, batch: int, mask: bool = False) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  config, sharding = trainer.config, trainer.batch_sharding
  size, channels = config.data.image_size, config.data.channels
  arrays = {
      "image": jax.ShapeDtypeStruct((batch, size, size, channels), np.uint8, sharding=sharding),
      "label": jax.ShapeDtypeStruct((batch,), np.int32, sharding=sharding)
  }
  if mask:
    arrays["mask"] = jax.ShapeDtypeStruct((batch,), np.bool_, sharding=sharding)
  return arrays


def _train_scratch(trainer) -> tuple[int, Any]:
  """(scratch bytes of one device, the compiled step) of the co-adaptation step."""
  import jax  # pylint: disable=g-import-not-at-top
  batch = _abstract_batch(trainer, trainer.config.train.batch_size)
  compiled = trainer.compile_step("coadapt").lower(trainer.abstract_state, batch,
                                                   jax.random.key(0)).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes), compiled


def _eval_scratch(trainer) -> int:
  """Peak scratch bytes of one device over evaluation's two programs: the pass that
  records every network's outputs, and the router, at the padded eval batch."""

  from coe_jax import evaluation, routing  # pylint: disable=g-import-not-at-top
  from coe_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  config, mesh = trainer.config, trainer.mesh
  batch = _abstract_batch(trainer, mesh_lib.eval_batch_size(config, mesh), mask=True)
  variables = trainer.abstract_state.eval_variables()
  outputs = evaluation.outputs_program(trainer.model, config.expert_loop,
                                       mesh).lower(variables, batch).compile()
  router = routing.route_and_predict.lower(trainer.model,
                                           variables,
                                           batch["image"],
                                           0.5,
                                           spec=routing.RoutingSpec.from_config(config, 0.0),
                                           num_groups=mesh.shape[mesh_lib.DATA_AXIS],
                                           mesh=mesh).compile()
  return max(int(p.memory_analysis().temp_size_in_bytes) for p in (outputs, router))


def plan(config,
         data: int,
         expert: int,
         hbm_gib: float,
         chip: Optional[str] = None,
         suggest: bool = True) -> dict[str, Any]:
  """The plan of `config` on a data x expert mesh of this process's (fake) devices."""
  import jax  # pylint: disable=g-import-not-at-top

  from coe_jax import flops  # pylint: disable=g-import-not-at-top
  require(hbm_gib > 0, "--hbm-gib", hbm_gib, "expected a positive number of GiB")
  require(jax.device_count() >= data * expert, "--mesh", f"{data}x{expert}",
          f"needs {data * expert} devices; this process has {jax.device_count()}")
  num_classes = config.data.num_classes
  require(
      isinstance(num_classes, int) and num_classes >= 2, "data.num_classes", num_classes,
      "the planner reads no data: set the number of classes")
  config = copy.deepcopy(config)
  with config.unlocked():
    config.mesh.data, config.mesh.expert = data, expert
    # The loop an accelerator takes, not the CPU's: the plan is for the chips.
    config.expert_loop = stacked.resolve_loop(config.expert_loop, "gpu")
  trainer = _trainer(config, data, expert)
  start = time.perf_counter()
  with accelerator_forms():
    train_scratch, compiled = _train_scratch(trainer)
    eval_scratch = _eval_scratch(trainer)
  compile_s = time.perf_counter() - start
  cpu_forms_scratch, _ = _train_scratch(_trainer(config, data, expert))
  text = compiled.as_text()
  state = trainer.abstract_state
  memory = {
      "params": _shard_bytes(state.params),
      "optimizer": _shard_bytes(state.opt_state),
      "ema": _shard_bytes(state.ema_params) if state.ema_params is not None else 0,
      "batch_stats": _shard_bytes(state.batch_stats),
      "activations_and_scratch": train_scratch,
      "batch": _shard_bytes(_abstract_batch(trainer, config.train.batch_size)),
  }
  # Evaluation runs between steps, beside the whole train state: the peak is
  # the state plus the larger of the two programs' own memory.
  state_bytes = sum(memory[k] for k in ("params", "optimizer", "ema", "batch_stats"))
  train_total = state_bytes + memory["activations_and_scratch"] + memory["batch"]
  eval_total = state_bytes + eval_scratch
  total = max(train_total, eval_total)
  result = {
      "config_experts": config.num_experts,
      "mesh": f"{data}x{expert}",
      "devices": data * expert,
      "chip": chip,
      "global_batch": config.train.batch_size,
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
      "eval_scratch_gib_per_device": eval_scratch / GIB,
      "train_gib_per_device": train_total / GIB,
      "eval_gib_per_device": eval_total / GIB,
      "total_gib_per_device": total / GIB,
      # The same step with the CPU's convolution forms, as a CPU run compiles it.
      "cpu_forms_scratch_gib_per_device": cpu_forms_scratch / GIB,
      "hbm_gib": hbm_gib,
      "fits": total <= hbm_gib * GIB,
      "collectives": {
          kind: len(re.findall(rf"= \S+ {kind}(-start)?\(", text))
          for kind in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                       "all-to-all")
      },
      "compile_s": compile_s,
      "suggestion": None,
  }
  if not result["fits"] and suggest:
    result["suggestion"] = _first_that_fits(config, data, expert, hbm_gib, eval_total)
  return result


def _first_that_fits(config, data: int, expert: int, hbm_gib: float,
                     eval_total: int) -> Optional[dict[str, Any]]:
  """The first of `_REMEDIES` with which the step fits: {remat, microbatches, total_gib}."""
  from coe_jax.errors import CoEError as Error  # pylint: disable=g-import-not-at-top
  for remat, microbatches in _REMEDIES:
    if (remat, microbatches) == (config.train.remat, config.train.microbatches):
      continue
    if config.train.batch_size % (data * microbatches):
      continue
    candidate = copy.deepcopy(config)
    with candidate.unlocked():
      candidate.train.remat, candidate.train.microbatches = remat, microbatches
    try:
      trainer = _trainer(candidate, data, expert)
    except Error:
      continue
    with accelerator_forms():
      scratch, _ = _train_scratch(trainer)
    state = trainer.abstract_state
    total = max(
        sum(
            _shard_bytes(t)
            for t in (state.params, state.opt_state, state.ema_params or {}, state.batch_stats)) +
        scratch + _shard_bytes(_abstract_batch(trainer, candidate.train.batch_size)), eval_total)
    if total <= hbm_gib * GIB:
      return {"remat": remat, "microbatches": microbatches, "total_gib_per_device": total / GIB}
  return None


def format_plan(result: dict[str, Any]) -> str:
  chip = f" of {result['chip']}" if result["chip"] else ""
  lines = [
      f"mesh {result['mesh']} ({result['devices']} devices{chip}), "
      f"N={result['config_experts']}, global batch {result['global_batch']} in "
      f"{result['microbatches']} micro-batches, remat={result['remat']}, "
      f"{result['compute_dtype']}",
      f"  {result['gflops_per_device']:.1f} GFLOP per device and step (model FLOPs)"
  ]
  for key, gib in result["gib_per_device"].items():
    lines.append(f"  {key:<24} {gib:8.3f} GiB")
  lines.append(f"  {'train step in all':<24} {result['train_gib_per_device']:8.3f} GiB")
  lines.append(f"  {'evaluation in all':<24} {result['eval_gib_per_device']:8.3f} GiB "
               f"(the state and {result['eval_scratch_gib_per_device']:.3f} GiB of scratch)")
  verdict = "fits" if result["fits"] else "does NOT fit"  # hbm_gib: the usable share
  lines.append(f"  {'peak':<24} {result['total_gib_per_device']:8.3f} GiB: {verdict} in "
               f"{result['hbm_gib']:.1f} GiB")
  lines.append("  collectives: " + ", ".join(f"{k} {v}" for k, v in result["collectives"].items()))
  accelerator = result["gib_per_device"]["activations_and_scratch"]
  cpu = result["cpu_forms_scratch_gib_per_device"]
  ratio = f"{cpu / accelerator:.2f}x" if accelerator else "n/a"
  lines.append(f"  how close: XLA:CPU compiled the accelerators' convolution forms; the CPU's own "
               f"forms need {cpu:.3f} GiB of step scratch ({ratio}). XLA:TPU/GPU lay memory out "
               "differently again: the figures are estimates, not measurements of the chip.")
  suggestion = result["suggestion"]
  if not result["fits"]:
    if suggestion:
      lines.append(f"  fits with --config.train.remat={suggestion['remat']} "
                   f"--config.train.microbatches={suggestion['microbatches']} "
                   f"({suggestion['total_gib_per_device']:.3f} GiB)")
    else:
      lines.append("  no remat or micro-batch setting tried fits: use more chips or a smaller "
                   "batch")
  return "\n".join(lines)


def use_cpu_devices(count: int) -> None:
  """`count` fake CPU devices, the only platform jax starts, whatever the host has.

  JAX reads JAX_PLATFORMS when it is imported (the config modules import it),
  so the platform is set through `jax.config`; XLA_FLAGS is read when the
  backend starts, which must not have happened yet.
  """
  import jax  # pylint: disable=g-import-not-at-top
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={count}").strip()
  jax.config.update("jax_platforms", "cpu")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = flag_config(_CONFIG)
  chip = _CHIP.value
  if _ACCELERATOR.value is not None:
    require(_MESH.value is None and chip is None, "--accelerator", _ACCELERATOR.value,
            "names the chips and the mesh comes from the config: not with --mesh or --chip")
    chip, chips = accelerator_chips(_ACCELERATOR.value)
    data, expert = config_mesh(config, chips)
  else:
    require(_MESH.value is not None, "--mesh", _MESH.value,
            "expected DATAxEXPERT, e.g. 16x4 (or --accelerator=TYPE)")
    data, expert = parse_mesh(_MESH.value)
  chip, hbm_gib = chip_memory(chip, _HBM_GIB.value, _MEM_FRACTION.value)
  # One fake CPU device per chip of the mesh, before jax starts its backend.
  use_cpu_devices(data * expert)
  result = plan(config, data, expert, hbm_gib, chip)
  print(json.dumps(result))
  print(format_plan(result), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  run_command(main)

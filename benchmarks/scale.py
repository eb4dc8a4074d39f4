r"""How the train step scales with the number of experts and the mesh.

    python -m benchmarks.scale [--config=configs/digits.py] [--num-experts=4,8,16,32] \
        [--meshes=8x1,4x2,2x4] [--batch-size=64] [--expert-loop=auto] [--json=FILE]

For every N and every data x expert mesh, the co-adaptation step is compiled
on fake CPU devices (8 unless XLA_FLAGS says otherwise) and measured in one
run:
- `gflops_per_device`: XLA's cost analysis of one device's program, the
  work it really does (remat included); `flops_vs_data_only` divides it by
  the figure at the mesh with expert axis 1 (expert parallelism should keep
  it near 1). XLA counts a loop's body once, so with `--expert-loop=scan`
  it sees one expert per device: judge the work with the unrolled loop;
  `model_gflops_per_device` is the analytic figure (3 forward passes);
- `temp_mib`, `argument_mib`: one device's scratch and argument memory
  (`memory_analysis`);
- `convolutions`: dense convolutions in one device's compiled program (with
  expert parallelism, the delegator's and its own N/E experts'), lowered as
  on accelerators (`conv.formulation("conv")`; CPUs run them as products);
- `all_reduce`, `all_gather`, `collective_permute`: collectives in it;
- `compile_s`, `step_s`: compile time of the co-adaptation step and its
  median wall time per step; `run_compile_s`: compile time of the whole
  run's programs (the three stages'). Fake
  devices share this machine's cores, so wall time does not show wasted
  work: judge by the FLOPs and the program.

It also solves one balanced transport problem at B=4096, N=32 on peaked
random scores (`transport`): Sinkhorn iterations, convergence, time.
"""

import os

# Fake devices for the meshes: set before jax starts its backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import re
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags

from coe_jax import flops
from coe_jax.config_loading import load_config, run_command
from coe_jax.errors import CoEError
from coe_jax.models import conv
from coe_jax.objective import transport
from coe_jax.training import train

# pylint: enable=g-import-not-at-top,wrong-import-position


def _mesh(text: str) -> tuple[int, int]:
  data, sep, expert = text.partition("x")
  if not (sep and data.isdigit() and expert.isdigit() and int(data) > 0 and int(expert) > 0):
    raise CoEError(f"--meshes={text!r}: expected DATAxEXPERT, e.g. 4x2")
  return int(data), int(expert)


def measure(config_path: str, num_experts: int, data: int, expert: int, batch_size: int,
            expert_loop: str, steps: int) -> dict[str, Any]:
  """One row of the table (see the module docstring)."""
  config = load_config(config_path)
  config.num_experts = num_experts
  config.mesh.data, config.mesh.expert = data, expert
  config.train.batch_size = batch_size
  config.expert_loop = expert_loop
  with tempfile.TemporaryDirectory() as workdir:
    trainer = train.Trainer(config, workdir, devices=jax.devices()[:data * expert])
  size, channels = config.data.image_size, config.data.channels
  sharding = trainer.batch_sharding
  abstract_batch = {
      "image":
          jax.ShapeDtypeStruct((batch_size, size, size, channels), np.uint8, sharding=sharding),
      "label":
          jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=sharding)
  }
  step = trainer.compile_step("coadapt")
  start = time.perf_counter()
  with conv.formulation("conv"):  # Convolutions as an accelerator's program has them.
    compiled = step.lower(trainer.abstract_state, abstract_batch, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - start
  text = compiled.as_text()
  memory = compiled.memory_analysis()
  state = trainer.init_state()
  batches = train.data.train_batches(config)
  batch = trainer.global_batch(next(batches))
  times = []
  for _ in range(steps + 1):  # The first call also transfers; it is not timed.
    start = time.perf_counter()
    state, metrics = compiled(state, batch, jax.random.key(0))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  # The whole run compiles one program per stage (the coadapt one above).
  # Compiled after the timed steps: on 0.10.2's CPU runtime, running a
  # sharded step after compiling other sharded programs deadlocked in its
  # collectives (benchmark only; a run compiles each stage when it starts it).
  start = time.perf_counter()
  for stage in ("warmup", "delegator"):
    with conv.formulation("conv"):
      trainer.compile_step(stage).lower(trainer.abstract_state, abstract_batch,
                                        jax.random.key(0)).compile()
  run_compile_s = compile_s + time.perf_counter() - start
  return {
      "num_experts":
          num_experts,
      "mesh":
          f"{data}x{expert}",
      "gflops_per_device":
          compiled.cost_analysis()["flops"] / 1e9,
      "model_gflops_per_device":
          flops.train_step_flops(config, trainer.info.num_classes) / (data * expert) / 1e9,
      "temp_mib":
          memory.temp_size_in_bytes / 2**20,
      "argument_mib":
          memory.argument_size_in_bytes / 2**20,
      "convolutions":
          len(re.findall(r"= \S+ convolution\(", text)),
      "all_reduce":
          len(re.findall(r"all-reduce(-start)?\(", text)),
      "all_gather":
          len(re.findall(r"all-gather(-start)?\(", text)),
      "collective_permute":
          len(re.findall(r"collective-permute(-start)?\(", text)),
      "compile_s":
          compile_s,
      "run_compile_s":
          run_compile_s,
      "step_s":
          float(np.median(times[1:])),
      "sinkhorn_iterations":
          float(metrics["sinkhorn_iterations"]),
  }


def transport_at_scale(batch: int = 4096, num_experts: int = 32) -> dict[str, Any]:
  """One balanced assignment on peaked scores, as WGM solves it late in training."""
  rng = np.random.default_rng(0)
  logits = 8.0 * rng.standard_normal((batch, num_experts)).astype(np.float32)
  scores = jax.nn.log_softmax(logits, axis=-1)  # [B, N]
  solve = jax.jit(
      lambda s: transport.balanced_assignment(s, epsilon=0.05, max_iterations=200, threshold=1e-3))
  assignment, info = jax.block_until_ready(solve(scores))
  start = time.perf_counter()
  jax.block_until_ready(solve(scores))
  loads = np.bincount(np.asarray(assignment), minlength=num_experts)
  return {
      "batch": batch,
      "num_experts": num_experts,
      "sinkhorn_iterations": int(info["sinkhorn_iterations"]),
      "sinkhorn_converged": bool(info["sinkhorn_converged"]),
      "load_gap": int(loads.max() - loads.min()),
      "seconds": time.perf_counter() - start
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  meshes = [_mesh(m) for m in _MESHES.value.split(",")]
  try:
    counts = [int(n) for n in _NUM_EXPERTS.value.split(",")]
  except ValueError:
    raise CoEError(f"--num-experts={_NUM_EXPERTS.value!r}: expected integers, e.g. 4,8") from None
  rows = []
  for n in counts:
    for data, expert in meshes:
      row = measure(_CONFIG.value, n, data, expert, _BATCH_SIZE.value, _EXPERT_LOOP.value,
                    _STEPS.value)
      rows.append(row)
      print(
          f"N={n} mesh {data}x{expert}: {row['gflops_per_device']:.3f} GFLOP/device, "
          f"{row['convolutions']} convolutions, compile {row['compile_s']:.0f} s",
          flush=True)
  for row in rows:
    base = [r for r in rows if r["num_experts"] == row["num_experts"] and r["mesh"].endswith("x1")]
    row["flops_vs_data_only"] = (row["gflops_per_device"] /
                                 base[0]["gflops_per_device"] if base else None)
  report = {
      "device": jax.devices()[0].device_kind,
      "devices": jax.device_count(),
      "config": _CONFIG.value,
      "batch_size": _BATCH_SIZE.value,
      "expert_loop": _EXPERT_LOOP.value,
      "rows": rows,
      "transport": transport_at_scale()
  }
  print(json.dumps(report))
  columns = ("num_experts", "mesh", "gflops_per_device", "flops_vs_data_only",
             "model_gflops_per_device", "temp_mib", "convolutions", "all_reduce", "all_gather",
             "collective_permute", "compile_s", "run_compile_s", "step_s")
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for row in rows:
    cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
    print("| " + " | ".join(cells) + " |")
  t = report["transport"]
  print(f"transport B={t['batch']} N={t['num_experts']}: {t['sinkhorn_iterations']} Sinkhorn "
        f"iterations, converged {t['sinkhorn_converged']}, load gap {t['load_gap']}, "
        f"{t['seconds']:.3f} s")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  # Defined here, not at import, so that other benchmarks and the tests can import this module.
  _CONFIG = flags.DEFINE_string("config", "configs/digits.py", "Config file.")
  _NUM_EXPERTS = flags.DEFINE_string("num-experts", "4,8,16,32", "Comma-separated N values.")
  _MESHES = flags.DEFINE_string("meshes", "8x1,4x2,2x4", "Comma-separated DATAxEXPERT meshes.")
  _BATCH_SIZE = flags.DEFINE_integer("batch-size", 64, "Global batch of the train step.")
  _EXPERT_LOOP = flags.DEFINE_string("expert-loop", "auto", "The config's expert_loop.")
  _STEPS = flags.DEFINE_integer("steps", 3, "Timed steps; the median is reported.")
  _JSON = flags.DEFINE_string("json", "", "Also write the report to this JSON file.")
  run_command(main)

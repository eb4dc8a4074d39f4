r"""What a CoE train step costs: its parts, and how it grows with N under each dispatch.

    python -m benchmarks.train_step --config=configs/digits.py [--json=FILE] \
        [--config.train.batch_size=256 --config.num_experts=4 ...]
    python -m benchmarks.train_step --config=configs/cifar10.py \
        --sweep_experts=4,8,16,32 --sweep_dispatches=all,routed [--json=FILE]

With `--sweep_experts` (and `--sweep_dispatches`), the co-adaptation step of
every (dispatch, N) is compiled and timed in one run instead: `images_per_s`,
XLA's FLOPs per image (`xla_flops_per_image`, of the compiled program; the
experts' loop unrolled, so XLA counts every expert) and the model's
(`model_flops_per_image`, `coe_jax.flops.train_step_flops`), and each
routed row's speed-up over the "all" row of its N. Routed rows score 1 / N of
each batch (`lgm.score_fraction`), which keeps the step flat in N, and keep
the config's `wgm.off_portion_samples` (alpha 0 when it has none).

Otherwise, at the config as given (after its overrides):

Measured in one run, after warm-up, on the default backend:
- `train_step`: the whole jitted co-adaptation step (delegator + N experts
  forward and backward, objective, optimizer update);
- `warmup_step`: the same step in the warm-up stage (plain classifiers, no
  WGM/LGM/VCM), for reference;
- `train_step_as_convolutions`: `train_step` with dense convolutions as XLA
  convolutions rather than matrix products (`coe_jax.models.conv`);
  `matmul_speedup` is its time over `train_step`'s;
- `wgm_lgm_vcm`: WGM's balanced partition and weights, LGM's labels and VCM's
  weights, jitted on their own, on the same [N, B, K] expert logits;
- `input`: the config's training pipeline (`coe_jax.data.train_batches`,
  augmentation included) delivering batches of the same size, in
  `input_images_per_s` beside the step's `images_per_s`: `input_headroom`
  below 1 means the run waits for its input. `--input=fake_tfds` times the
  TFDS pipeline instead (ImageNet's decoding and inception crop), on a small
  fake imagenet2012 written to a temporary folder, for machines without the
  data.

It prints one JSON line and a table; the figure of interest is
`share = wgm_lgm_vcm / train_step` (goal: at most 5%). Both steps' rates are
also given as a percentage of `peak`, this machine's float32 rate measured in
the same run by a 2048x2048 numpy matmul (`benchmarks.peak`), with a step's
multiply-adds from `coe_jax.flops.train_step_flops` (forward and backward
passes of the delegator and the experts the dispatch trains).
"""

import json
import platform
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.peak import measured_peak
from coe_jax import config_base, data, flops
from coe_jax.config_loading import flag_config, run_command
from coe_jax.errors import require
from coe_jax.models import conv
from coe_jax.models.coe import CoE
from coe_jax.objective import lgm, vcm, wgm
from coe_jax.parallel import mesh
from coe_jax.training import optim
from coe_jax.training.train_step import create_train_state, make_train_step

# The timed steps, whose % of the peak is reported.
STEPS = ("train_step", "warmup_step", "train_step_as_convolutions")


def _seconds_per_call(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of `fn` (already compiled), blocking on its outputs."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def fake_tfds_config(config: ml_collections.ConfigDict, data_dir: str,
                     examples: int) -> ml_collections.ConfigDict:
  """`config` reading a fake imagenet2012 of `examples` JPEG images written to `data_dir`."""
  from coe_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

  def example(split: str, i: int) -> dict[str, Any]:
    rng = np.random.default_rng([i, split == "validation"])
    height, width = rng.integers(200, 400, size=2)  # ImageNet-like sizes, decoded each time.
    return {
        "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "label": i % 1000,
        "file_name": f"{split}_{i}.JPEG"
    }

  tfds_source.write_prepared(data_dir, "imagenet2012", {
      "train": examples,
      "validation": 8
  }, example)
  config = config.copy_and_resolve_references()
  config.data.name, config.data.tfds_data_dir = "imagenet2012", data_dir
  config.data.num_classes, config.data.augment = 1000, "auto"
  config.data.holdout_fraction = 0.0
  config.eval.threshold = 0.5  # No hold-out: tau fixed (validation's rule).
  return config


def run(config: ml_collections.ConfigDict,
        batch_size: int,
        num_experts: int,
        repeats: int,
        input_config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Times both steps and the modules on `config`, and the input pipeline of
  `input_config` (default `config`); returns the report (see the module docstring)."""
  config = config.copy_and_resolve_references()
  config.num_experts = num_experts
  config.train.batch_size = batch_size
  config = mesh.with_routing_groups(config, jax.devices()[:1])  # One device, no mesh.
  num_classes = config.data.num_classes or 10
  model = CoE(config, num_classes)
  optimizer = optim.make_optimizer(config)
  state = create_train_state(model, optimizer, config, jax.random.key(0))
  size, channels = config.data.image_size, config.data.channels
  rng = np.random.default_rng(0)
  batch = {
      "image": jnp.asarray(rng.integers(0, 256, (batch_size, size, size, channels)), jnp.uint8),
      "label": jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32)
  }
  key = jax.random.key(1)

  timings = {}
  for stage, name in (("coadapt", "train_step"), ("warmup", "warmup_step")):
    step = jax.jit(make_train_step(model, optimizer, config, stage))
    timings[name] = _seconds_per_call(lambda: step(state, batch, key), repeats)
  # The same step with dense convolutions as XLA convolutions, not the CPU's
  # matrix products (`coe_jax.models.conv`): the formulation's speed-up.
  with conv.formulation("conv"):
    step = jax.jit(make_train_step(model, optimizer, config, "coadapt"))
    timings["train_step_as_convolutions"] = _seconds_per_call(lambda: step(state, batch, key),
                                                              repeats)

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  _, selection_logits = model.delegator(variables, batch["image"])
  expert_logits = model.experts(variables, batch["image"], shared_input=True)  # [N, B, K]
  solver = dict(epsilon=config.wgm.sinkhorn_epsilon,
                max_iterations=config.wgm.sinkhorn_max_iterations,
                threshold=config.wgm.sinkhorn_threshold)

  @jax.jit
  def modules(selection_logits, expert_logits, labels):
    weights, _, _ = wgm.expert_loss_weights(selection_logits,
                                            off_portion_weight=config.wgm.off_portion_weight,
                                            **solver)
    targets, _ = lgm.selection_targets(expert_logits,
                                       labels,
                                       rule=config.lgm.rule,
                                       temperature=config.lgm.temperature,
                                       rng=jax.random.key(0),
                                       **solver)
    sample_weights = vcm.selection_sample_weights(expert_logits, labels, enabled=config.vcm.enabled)
    return weights, targets, sample_weights

  timings["wgm_lgm_vcm"] = _seconds_per_call(
      lambda: modules(selection_logits, expert_logits, batch["label"]), repeats)

  source = (input_config if input_config is not None else config).copy_and_resolve_references()
  source.train.batch_size = batch_size
  batches = data.train_batches(source)
  next(batches)  # Opens (and for in-memory sources, loads) the data set.
  start = time.perf_counter()
  for _ in range(repeats):
    next(batches)
  input_seconds = (time.perf_counter() - start) / repeats

  peak = measured_peak()  # Right after the timing, under the same load.
  step_macs = flops.train_step_flops(config, num_classes) / 2
  return {
      "batch_size": batch_size,
      "num_experts": num_experts,
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "machine": platform.processor() or platform.machine(),
      **{
          f"{k}_ms": 1e3 * v for k, v in timings.items()
      },
      "share": timings["wgm_lgm_vcm"] / timings["train_step"],
      "images_per_s": batch_size / timings["train_step"],
      "input_images_per_s": batch_size / input_seconds,
      "input_headroom": timings["train_step"] / input_seconds,
      "matmul_speedup": timings["train_step_as_convolutions"] / timings["train_step"],
      "step_macs": step_macs,
      **{
          f"{k}_percent_of_peak": 100 * step_macs / timings[k] / peak["macs_per_s"] for k in STEPS
      },
      "peak": peak,
  }


def sweep_config(config: ml_collections.ConfigDict, dispatch: str,
                 num_experts: int) -> ml_collections.ConfigDict:
  """`config` at N experts under `dispatch`; routed scores 1 / N of the batch."""
  config = config.copy_and_resolve_references()
  config.num_experts = num_experts
  config.train.expert_dispatch = dispatch
  config.expert_loop = "unroll"  # XLA's cost analysis then counts every expert.
  if dispatch == "routed":
    config.lgm.score_fraction = 1 / num_experts
    if not config.wgm.off_portion_samples:
      config.wgm.off_portion_weight = 0.0
  return config


def sweep(config: ml_collections.ConfigDict, experts: list[int], dispatches: list[str],
          repeats: int) -> list[dict[str, Any]]:
  """The co-adaptation step of each (dispatch, N), compiled and timed in one run."""
  config = mesh.with_routing_groups(config, jax.devices()[:1])  # One device, no mesh.
  num_classes = config.data.num_classes or 10
  batch_size = config.train.batch_size
  rng = np.random.default_rng(0)
  size, channels = config.data.image_size, config.data.channels
  batch = {
      "image": jnp.asarray(rng.integers(0, 256, (batch_size, size, size, channels)), jnp.uint8),
      "label": jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32)
  }
  rows = []
  for num_experts in experts:
    for dispatch in dispatches:
      point = sweep_config(config, dispatch, num_experts)
      model = CoE(point, num_classes)
      optimizer = optim.make_optimizer(point)
      state = create_train_state(model, optimizer, point, jax.random.key(0))
      step = jax.jit(make_train_step(model, optimizer, point, "coadapt"))
      start = time.perf_counter()
      compiled = step.lower(state, batch, jax.random.key(1)).compile()
      compile_s = time.perf_counter() - start
      seconds = _seconds_per_call(lambda: compiled(state, batch, jax.random.key(1)), repeats)
      rows.append({
          "dispatch": dispatch,
          "num_experts": num_experts,
          "batch_size": batch_size,
          "images_per_s": batch_size / seconds,
          "step_ms": 1e3 * seconds,
          "compile_s": compile_s,
          "xla_flops_per_image": compiled.cost_analysis()["flops"] / batch_size,
          "model_flops_per_image": flops.train_step_flops(point, num_classes) / batch_size,
      })
  for row in rows:
    all_row = next(
        (r for r in rows if r["dispatch"] == "all" and r["num_experts"] == row["num_experts"]),
        None)
    row["speedup_over_all"] = (row["images_per_s"] /
                               all_row["images_per_s"] if all_row is not None else None)
  return rows


def format_sweep(rows: list[dict[str, Any]]) -> str:
  lines = [
      f"{'dispatch':<10}{'N':>4}{'images/s':>10}{'x all':>7}{'XLA MFLOP/image':>17}"
      f"{'model MFLOP/image':>19}{'compile s':>11}"
  ]
  for row in rows:
    speedup = row["speedup_over_all"]
    lines.append(f"{row['dispatch']:<10}{row['num_experts']:>4}{row['images_per_s']:>10.1f}"
                 f"{'' if speedup is None else f'{speedup:.2f}':>7}"
                 f"{row['xla_flops_per_image'] / 1e6:>17.2f}"
                 f"{row['model_flops_per_image'] / 1e6:>19.2f}{row['compile_s']:>11.1f}")
  return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
  """The report as a table: each part's time, share of the step and % of the peak."""
  lines = [
      f"peak: {report['peak']['derivation']}; "
      f"a step: {report['step_macs'] / 1e9:.2f} G multiply-adds (estimated)",
      f"{'part':<28}{'ms':>10}{'share of train step':>24}{'% peak':>8}"
  ]
  for name in (*STEPS, "wgm_lgm_vcm"):
    of_peak = report.get(f"{name}_percent_of_peak")
    lines.append(f"{name:<28}{report[f'{name}_ms']:>10.2f}"
                 f"{report[f'{name}_ms'] / report['train_step_ms']:>23.1%}" +
                 (f"{of_peak:>8.1f}" if of_peak is not None else ""))
  lines.append(f"input: {report['input_images_per_s']:.0f} images/s against the step's "
               f"{report['images_per_s']:.0f} (headroom {report['input_headroom']:.1f}x"
               f"{'' if report['input_headroom'] >= 1 else ': INPUT-BOUND'})")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = flag_config(_CONFIG)
  if _SWEEP_EXPERTS.value:
    experts = _integers("--sweep_experts", _SWEEP_EXPERTS.value)
    dispatches = _SWEEP_DISPATCHES.value
    require(dispatches and set(dispatches) <= set(config_base.EXPERT_DISPATCHES),
            "--sweep_dispatches", ",".join(dispatches),
            f"expected some of {', '.join(config_base.EXPERT_DISPATCHES)}")
    rows = sweep(config, experts, dispatches, _REPEATS.value)
    report = {
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "machine": platform.processor(),
        "rows": rows
    }
    table = format_sweep(rows)
  else:
    with tempfile.TemporaryDirectory() as data_dir:
      input_config = None
      if _INPUT.value == "fake_tfds":
        input_config = fake_tfds_config(config, data_dir, examples=2 * config.train.batch_size)
      report = {
          "config": config_flags.get_config_filename(flags.FLAGS["config"]),
          "input": _INPUT.value,
          **run(config, config.train.batch_size, config.num_experts, _REPEATS.value, input_config)
      }
    table = format_table(report)
  print(json.dumps(report))
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  print()
  print(table)


def _integers(flag: str, values: list[str]) -> list[int]:
  require(all(v.isdigit() and int(v) > 0 for v in values), flag, ",".join(values),
          "expected positive integers, e.g. 4,8,16")
  return [int(v) for v in values]


if __name__ == "__main__":
  # Defined here, not at import, so that other benchmarks and the tests can import this module.
  _CONFIG = config_flags.DEFINE_config_file("config",
                                            "configs/digits.py",
                                            "Config file, then --config.KEY=VALUE overrides.",
                                            lock_config=True)
  _REPEATS = flags.DEFINE_integer("repeats", 10,
                                  "Timed calls of each step; the median is reported.")
  _JSON = flags.DEFINE_string("json", "", "Also write the report to this JSON file.")
  _INPUT = flags.DEFINE_enum(
      "input", "config", ["config", "fake_tfds"],
      "Whose input pipeline to time: the config's, or TFDS on fake ImageNet.")
  _SWEEP_EXPERTS = flags.DEFINE_list(
      "sweep_experts", [], "Numbers of experts: time the step of each under each "
      "--sweep_dispatches instead.")
  _SWEEP_DISPATCHES = flags.DEFINE_list("sweep_dispatches", ["all", "routed"],
                                        "Dispatches of the sweep: all, routed.")
  run_command(main)

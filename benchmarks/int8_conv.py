r"""The ceiling on int8 serving speed-ups: LiteRT convolutions alone, int8 against float32.

    python -m benchmarks.int8_conv [--json=FILE]

Each case is a stack of four same-size convolutions (ReLU after each),
converted twice by the TFLite converter, in float32 and fully in int8
(post-training, calibrated on random inputs), and timed on one thread with
XNNPACK, best of 5 rounds of 10 calls. Whole networks add depthwise
convolutions, squeeze-excitation and element-wise work on top, so their
int8 / float32 ratio stays at or below these. On x86, XNNPACK's fast int8
kernels need VNNI (AVX512-VNNI or AVX-VNNI); `cpu_flags` says whether this
machine has it.
"""

import json
import os
import time
from typing import Any

import numpy as np
from absl import app, flags

from benchmarks.peak import cpu_name
from coe_jax.config_loading import run_command

# (spatial size, channels, kernel): 1x1 expansions and projections of mobile
# networks at three resolutions, and one 3x3 convolution.
CASES = ((56, 72, 1), (28, 256, 1), (14, 512, 1), (28, 128, 3))
LAYERS = 4


def _convert(size: int, channels: int, kernel: int, int8: bool) -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = inputs = tf.keras.Input((size, size, channels), batch_size=1)
  for _ in range(LAYERS):
    x = tf.keras.layers.Conv2D(channels, kernel, padding="same", activation="relu")(x)
  converter = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inputs, x))
  if int8:
    rng = np.random.default_rng(0)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([rng.random((1, size, size, channels), np.float32)]
                                                for _ in range(8))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  return converter.convert()


def _seconds_per_call(model: bytes, rounds: int = 5, calls: int = 10) -> float:
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  interpreter = Interpreter(model_content=model, num_threads=1)
  interpreter.allocate_tensors()
  detail = interpreter.get_input_details()[0]
  interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
  interpreter.invoke()
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      interpreter.invoke()
    best = min(best, (time.perf_counter() - start) / calls)
  return best


def cpu_flags() -> dict[str, bool]:
  """Whether this CPU has the instructions XNNPACK's int8 kernels use."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = next((line.split(":")[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    flags = []
  return {name: name in flags for name in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")}


def measure(cases=CASES) -> dict[str, Any]:
  rows = []
  for size, channels, kernel in cases:
    macs = LAYERS * size * size * channels * channels * kernel * kernel
    f32 = _seconds_per_call(_convert(size, channels, kernel, int8=False))
    int8 = _seconds_per_call(_convert(size, channels, kernel, int8=True))
    rows.append({
        "case": f"{size}x{size}x{channels} k{kernel}",
        "macs": macs,
        "float32_gmacs_per_s": macs / f32 / 1e9,
        "int8_gmacs_per_s": macs / int8 / 1e9,
        "int8_over_float32": f32 / int8
    })
  return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": 1, "rows": rows}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  report = measure()
  print(json.dumps(report))
  print(f"{report['cpu']}, one thread; flags: " +
        ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report["cpu_flags"].items()))
  print("| convolutions | float32 G multiply-adds/s | int8 G multiply-adds/s | int8 / float32 |")
  print("|---|---|---|---|")
  for row in report["rows"]:
    print(f"| {row['case']} | {row['float32_gmacs_per_s']:.1f} | {row['int8_gmacs_per_s']:.1f} "
          f"| {row['int8_over_float32']:.2f} |")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  # Defined here, not at import, so that other benchmarks and the tests can import this module.
  _JSON = flags.DEFINE_string("json", "", "Also write the report to this JSON file.")
  run_command(main)

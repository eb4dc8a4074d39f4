"""This machine's attainable float32 rate, measured, for the benchmarks' "% of peak".

A peak derived from the CPU's specification (cores x FMA units x lanes x
clock) needs figures /proc/cpuinfo does not give (the FMA units per core) and
ignores what the machine actually sustains (turbo, throttling, other jobs on
a shared machine). The rate of a large float32 matrix multiply, timed in the
same run as the benchmark, is what tuned kernels attain here and now: numpy's
BLAS on all cores, which is also what the benchmarks' runtimes use.
"""

import platform
import time
from typing import Any

import numpy as np

MATMUL_SIZE = 2048  # 8.6G multiply-adds: ~0.1 s at 100 G/s, far above call overheads.
REPEATS = 5


def cpu_name() -> str:
  """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          return value.strip()
  except OSError:  # Not Linux: the name is only a label.
    pass
  return platform.processor() or platform.machine()


def measured_peak(size: int = MATMUL_SIZE, repeats: int = REPEATS) -> dict[str, Any]:
  """The best rate of a float32 [size, size] x [size, size] numpy matmul, in multiply-adds/s.

  Best of `repeats` timed calls after one untimed warm-up: on a shared machine
  other work only slows a call down, so the fastest is the machine's own rate.

  Returns:
    {"macs_per_s", "gmacs_per_s", "seconds", "matmul_size", "repeats", "cpu",
    "derivation"}: the rate, the best call's seconds, and one line saying how
    it was measured.
  """
  rng = np.random.default_rng(0)
  a = rng.standard_normal((size, size), dtype=np.float32)
  b = rng.standard_normal((size, size), dtype=np.float32)
  out = np.empty((size, size), np.float32)
  np.matmul(a, b, out=out)  # Warm-up: the BLAS threads start, the pages are touched.
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    np.matmul(a, b, out=out)
    seconds.append(time.perf_counter() - start)
  best = min(seconds)
  macs = size**3 / best
  return dict(macs_per_s=macs,
              gmacs_per_s=macs / 1e9,
              seconds=best,
              matmul_size=size,
              repeats=repeats,
              cpu=cpu_name(),
              derivation=f"measured: float32 {size}x{size} numpy matmul, best of {repeats}, "
              f"{macs / 1e9:.1f} G multiply-adds/s")

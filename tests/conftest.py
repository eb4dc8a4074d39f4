"""Test setup: 8 fake CPU devices, so mesh tests run on any machine.

The flags must be set before jax initialises its backend, hence at import
time. Single-device tests simply use the first device. XLA's CPU backend
compiles the tests' many small programs about 8x faster without LLVM's
optimisations, which pays for itself many times over on tiny networks, and
about 2x faster again with its older loop emitters instead of the fusion
emitters (the step programs run no slower at these sizes).

Many tests compile the same programs (a run and its resumed legs, the same
tiny config in several files), so each test process keeps a persistent
compilation cache of its own for its session; the command-line runs the
tests start inherit it.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_cpu_use_fusion_emitters=false").strip()
# TensorFlow only feeds data here; keep it off any accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

_COMPILATION_CACHE = tempfile.mkdtemp(prefix="coe-jax-test-compilations-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

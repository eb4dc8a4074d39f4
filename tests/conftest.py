"""Test setup: 8 fake CPU devices, so mesh tests run on any machine.

The flags must be set before jax initialises its backend, hence at import
time. Single-device tests simply use the first device. XLA's CPU backend
compiles the tests' many small programs about 8x faster without LLVM's
optimisations, which pays for itself many times over on tiny networks.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
# TensorFlow only feeds data here; keep it off any accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

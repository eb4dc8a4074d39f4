"""Test setup: 8 fake CPU devices, so mesh tests run on any machine.

The flag must be set before jax initialises its backend, hence at import time.
Single-device tests simply use the first device.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow only feeds data here; keep it off any accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

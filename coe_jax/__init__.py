"""coe-jax: Collaboration of Experts (CoE) in JAX/Flax.

A small delegator network either answers a sample at once (early exit) or
picks one of N expert networks to answer it. docs/design.md draws the layout.
"""

import os

# TensorFlow only feeds data and converts exports here. Unless the user chose
# otherwise, it loads without oneDNN's custom CPU ops (which the input
# pipeline does not need) and logs errors only: otherwise every command
# starts with TensorFlow's start-up notices. Set before any module imports it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

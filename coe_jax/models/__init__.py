"""Flax Linen networks and layers of coe-jax."""

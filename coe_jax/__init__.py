"""coe-jax: Collaboration of Experts (CoE) in JAX/Flax.

A small delegator network either answers a sample at once (early exit) or
picks one of N expert networks to answer it. See README.md for the layout.
"""

__version__ = "0.1.0"

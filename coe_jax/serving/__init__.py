"""Answering with a trained CoE: the JAX predictor on a run's checkpoint
(`jax_predictor`), the LiteRT export (`export`) and its JAX-free runtime
(`litert_predictor`), the call both predictors share (`predictor_base`), and
the command line that classifies image files (`predict`).

`predictor_base` and `litert_predictor` import neither JAX nor TensorFlow, so
a phone or a CPU server needs only LiteRT, numpy and Pillow.
"""

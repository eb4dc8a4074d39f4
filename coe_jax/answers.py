"""What CoE answers with, the same from the JAX router and from both predictors.

    logits      float32 [B, K]: the answers
    early_exit  bool [B]: True where the delegator answered alone
    expert      int [B]: the expert that answered, or NO_EXPERT where the
                delegator did (an early exit, or in serving mode a sample
                that found every expert full)

Also the rule that decides them and what it costs (`exits`, `mean_flops`),
which the router, the evaluation, the trainer, the benchmarks and the LiteRT
runtime all apply.

Imports nothing: the LiteRT runtime, which must not import JAX, shares it.
"""

ANSWER_KEYS = ("logits", "early_exit", "expert")
NO_EXPERT = -1


def exits(confidence, tau):
  """The early-exit rule: True where the delegator answers alone, `confidence >= tau`.

  `confidence` is the delegator's max softmax probability per sample (an
  array of any shape, numpy or jax alike, or a float) and tau a scalar
  threshold (a float, or a traced jax scalar); the result is a bool array of
  `confidence`'s shape. tau above 1 disables early exit (no probability
  reaches it); 0 makes every sample exit. A sample exactly at tau exits.
  None is not a tau here: where a caller takes None (the calibrated tau of a
  predictor, `eval.threshold`), it resolves it to a number first.
  """
  return confidence >= tau


def mean_flops(delegator_flops, expert_flops, exit_rate):
  """CoE's mean multiply-adds per image when a fraction `exit_rate` of the samples exit.

  Every sample pays for the delegator, and the samples that do not exit for
  one expert too: `delegator_flops + (1 - exit_rate) * expert_flops`.
  `exit_rate` may be an array (a sweep's points); the result then is one too.
  """
  return delegator_flops + (1 - exit_rate) * expert_flops

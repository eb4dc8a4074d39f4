"""What CoE answers with, the same from the JAX router and from both predictors.

    logits      float32 [B, K]: the answers
    early_exit  bool [B]: True where the delegator answered alone
    expert      int [B]: the expert that answered, or NO_EXPERT where the
                delegator did (an early exit, or in serving mode a sample
                that found every expert full)

Imports nothing: the LiteRT runtime, which must not import JAX, shares it.
"""

ANSWER_KEYS = ("logits", "early_exit", "expert")
NO_EXPERT = -1

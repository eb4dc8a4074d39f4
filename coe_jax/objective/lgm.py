"""LGM, the label generation module: the target of the delegator's selection.

Axis letters: B batch, N experts, K classes (docs/method.md, section 2).

From the paper: LGM generates the label that forms the delegator's
expert-selection loss. The paper does not give the rule.

This project's reading: score expert j on sample i by its log-probability of
the true class, `s_ij = log softmax(z_j[i])[y_i]`, with the gradient stopped
(the experts are not trained by the selection loss), and turn the scores into
a target distribution over experts by one of three rules (`lgm.rule`):
- `argmax`: one-hot of the best expert;
- `balanced`: one-hot of the balanced transportation over `s` (the same solver
  as WGM), so that no expert is starved of selections;
- `soft`: `softmax(s_i / lgm.temperature)`.

`random` (`config_base.RANDOM_RULE`) is LGM switched off, for ablations: one-hot labels
drawn uniformly, whatever the experts score.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

from coe_jax import config_base
from coe_jax.config_base import RANDOM_RULE
from coe_jax.errors import require
from coe_jax.objective import transport


def expert_scores(expert_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Each expert's log-probability of the true class, gradient stopped.

  Args:
    expert_logits: [N, B, K], the expert axis leading as stacked experts
      return it.
    labels: [B] int class labels.

  Returns:
    s: [B, N].
  """
  log_probs = jax.nn.log_softmax(jax.lax.stop_gradient(expert_logits), axis=-1)  # [N, B, K]
  true_class = jnp.broadcast_to(labels[None, :, None], log_probs.shape[:2] + (1,))  # [N, B, 1]
  return jnp.take_along_axis(log_probs, true_class, axis=-1)[..., 0].T  # [B, N]


def random_targets(rng: jax.Array, batch: int, num_experts: int) -> jax.Array:
  """One-hot selection labels drawn uniformly at random: LGM switched off.

  Returns:
    targets: [B, N], one-hot.
  """
  labels = jax.random.randint(rng, (batch,), 0, num_experts)  # [B]
  return jax.nn.one_hot(labels, num_experts, dtype=jnp.float32)  # [B, N]


def selection_targets(expert_logits: jax.Array,
                      labels: jax.Array,
                      *,
                      rule: str,
                      temperature: float = 1.0,
                      rng: Optional[jax.Array] = None,
                      **solver_kwargs: Any) -> tuple[jax.Array, dict[str, Any]]:
  """The delegator's selection target for each sample.

  Args:
    expert_logits: [N, B, K]. No gradient flows from the targets back to them.
    labels: [B] int class labels.
    rule: `argmax`, `balanced`, `soft`, or `random` for no LGM (static).
    temperature: the `soft` rule's temperature, > 0.
    rng: the key the `random` rule draws with (the other rules ignore it).
    **solver_kwargs: `epsilon`, `max_iterations` and `threshold` of
      `transport.balanced_assignment`, used by the `balanced` rule.

  Returns:
    targets: [B, N], a probability distribution over experts per sample.
    info: the solver's info for `balanced`, else empty.
  """
  config_base.check_value("lgm.rule", rule)
  if rule == RANDOM_RULE:
    require(rng is not None, "rng", rng, f"lgm.rule={RANDOM_RULE!r} draws its labels with a key")
    num_experts, batch = expert_logits.shape[:2]
    return random_targets(rng, batch, num_experts), {}  # [B, N]
  scores = expert_scores(expert_logits, labels)  # [B, N]
  experts = scores.shape[1]
  if rule == "soft":
    return jax.nn.softmax(scores / temperature, axis=-1), {}  # [B, N]
  if rule == "argmax":
    return jax.nn.one_hot(jnp.argmax(scores, axis=-1), experts, dtype=scores.dtype), {}  # [B, N]
  assignment, info = transport.balanced_assignment(scores, **solver_kwargs)  # [B]
  return jax.nn.one_hot(assignment, experts, dtype=scores.dtype), info  # [B, N]

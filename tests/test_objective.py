"""The staged CoE objective: gradient routing, stages, loss terms, config checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coe_jax import config_base, objective, stages
from coe_jax.config_base import base_config
from coe_jax.errors import CoEError
from coe_jax.objective import lgm, losses
from coe_jax.stages import Stage, StagePlan

B, N, K = 16, 4, 5
METRICS = {
    "loss", "expert_loss", "selection_loss", "delegator_loss", "load_gap", "selection_load_gap",
    "selection_agreement", "own_portion_accuracy", "off_portion_accuracy", "routed_accuracy",
    "sinkhorn_iterations", "sinkhorn_converged", "lgm_sinkhorn_iterations",
    "lgm_sinkhorn_converged", "delegator_accuracy"
}


def make_config(**loss):
  config = base_config()
  config.loss.update(dict(distill_weight=0.5, **loss))
  return config


CONFIG = make_config()


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  shifted = x - x.max(axis=-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def inputs(seed: int = 0) -> tuple[jax.Array, ...]:
  k = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(k[0], (B, K)), jax.random.normal(k[1], (B, N)),
          2.0 * jax.random.normal(k[2], (N, B, K)), jax.random.randint(k[3], (B,), 0, K))


def is_zero(x: jax.Array) -> bool:
  return bool(jnp.all(x == 0))


@pytest.fixture(scope="module")
def coadapt() -> tuple[jax.Array, dict[str, jax.Array], dict[str, tuple[jax.Array, ...]]]:
  """Loss, metrics, and each loss term's gradient w.r.t. (class, selection,
  expert) logits, from one compilation."""
  config = make_config(selection_weight=0.7, delegator_weight=0.3)

  def terms(*args):
    _, metrics = objective.coe_objective(*args, config, "coadapt")
    return {key: metrics[key] for key in ("expert_loss", "selection_loss", "delegator_loss")}

  def run(*args):
    return (*objective.coe_objective(*args, config, "coadapt"),
            jax.jacrev(terms, argnums=(0, 1, 2))(*args))

  return jax.jit(run)(*inputs())


def test_expert_loss_trains_experts_only(coadapt):
  to_class, to_selection, to_experts = coadapt[2]["expert_loss"]
  assert is_zero(to_selection)  # WGM weights carry no gradient into g
  assert is_zero(to_class)
  assert not is_zero(to_experts)


def test_selection_loss_trains_selection_only(coadapt):
  to_class, to_selection, to_experts = coadapt[2]["selection_loss"]
  assert is_zero(to_experts)  # LGM targets and VCM weights are constants
  assert is_zero(to_class)
  assert not is_zero(to_selection)


def test_delegator_loss_distils_without_training_the_teacher(coadapt):
  to_class, to_selection, to_experts = coadapt[2]["delegator_loss"]
  assert is_zero(to_experts) and is_zero(to_selection)
  assert not is_zero(to_class)


def test_coadapt_total_and_metrics(coadapt):
  total, metrics, _ = coadapt
  class_logits, _, _, labels = inputs()
  assert set(metrics) == METRICS
  assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())
  np.testing.assert_allclose(total,
                             metrics["expert_loss"] + 0.7 * metrics["selection_loss"] +
                             0.3 * metrics["delegator_loss"],
                             rtol=1e-6)
  assert float(metrics["load_gap"]) == 0  # B divisible by N
  assert float(metrics["sinkhorn_iterations"]) > 0
  assert float(metrics["lgm_sinkhorn_iterations"]) > 0  # base config's rule is balanced
  _, selection_logits, expert_logits, _ = inputs()
  targets, _ = lgm.selection_targets(expert_logits,
                                     labels,
                                     rule="balanced",
                                     temperature=1.0,
                                     epsilon=0.05,
                                     max_iterations=200,
                                     threshold=1e-3)
  agree = np.argmax(selection_logits, axis=-1) == np.argmax(targets, axis=-1)  # [B]
  assert 0 < agree.mean() < 1  # Inputs where the metric can be wrong either way.
  np.testing.assert_allclose(metrics["selection_agreement"], agree.mean())
  correct = np.argmax(class_logits, axis=-1) == labels
  np.testing.assert_allclose(metrics["delegator_accuracy"], np.mean(correct))


def test_warmup_ignores_selection_logits():
  class_logits, selection_logits, expert_logits, labels = inputs()
  warmup = jax.jit(
      lambda g: objective.coe_objective(class_logits, g, expert_logits, labels, CONFIG, "warmup"))
  loss, metrics = warmup(selection_logits)
  other_loss, other_metrics = warmup(-3.0 * selection_logits)
  assert float(loss) == float(other_loss)
  assert all(float(metrics[k]) == float(other_metrics[k]) for k in metrics)
  assert set(metrics) == METRICS
  assert is_zero(jax.jit(jax.grad(lambda g: warmup(g)[0]))(selection_logits))
  # Plain classifiers: every expert's mean cross-entropy, summed.
  ce = -log_softmax(np.asarray(expert_logits))[:, np.arange(B), labels]  # [N, B]
  np.testing.assert_allclose(metrics["expert_loss"], np.sum(np.mean(ce, axis=1)), rtol=1e-5)


def test_delegator_stage_freezes_experts():

  def loss(*args):
    return objective.coe_objective(*args, CONFIG, "delegator")

  (total, metrics), (to_selection,
                     to_experts) = jax.jit(jax.value_and_grad(loss, argnums=(1, 2),
                                                              has_aux=True))(*inputs())
  assert is_zero(to_experts)
  assert not is_zero(to_selection)
  assert float(metrics["expert_loss"]) == 0
  assert set(metrics) == METRICS and float(total) > 0


def test_weighted_expert_loss_formula():
  expert_logits = np.random.default_rng(1).normal(size=(2, 3, K)).astype(np.float32)
  labels = np.array([0, 1, 2])
  weights = np.array([[1.0, 0.5], [0.0, 1.0], [1.0, 0.0]], np.float32)  # expert 1 skips sample 2
  ce = -log_softmax(expert_logits)[:, np.arange(3), labels]  # [N, B]
  expected = ((ce[0, 0] + ce[0, 2]) / 2) + ((0.5 * ce[1, 0] + ce[1, 1]) / 1.5)
  np.testing.assert_allclose(losses.weighted_expert_loss(expert_logits, labels, weights),
                             expected,
                             rtol=1e-6)
  assert float(losses.weighted_expert_loss(expert_logits, labels, np.zeros((3, 2)))) == 0


def test_delegator_loss_smoothing_and_distillation():
  rng = np.random.default_rng(2)
  logits, teacher = rng.normal(size=(2, 4, K)).astype(np.float32)
  labels = np.array([0, 1, 2, 3])
  smooth = 0.9 * np.eye(K)[labels] + 0.1 / K
  ce = -np.mean(np.sum(smooth * log_softmax(logits), axis=-1))
  np.testing.assert_allclose(losses.delegator_loss(logits, labels, label_smoothing=0.1),
                             ce,
                             rtol=1e-6)
  t = 2.0
  log_p = log_softmax(teacher / t)
  kl = np.mean(np.sum(np.exp(log_p) * (log_p - log_softmax(logits / t)), axis=-1))
  got = losses.delegator_loss(logits,
                              labels,
                              label_smoothing=0.1,
                              distill_logits=teacher,
                              distill_weight=0.5,
                              distill_temperature=t)
  np.testing.assert_allclose(got, ce + 0.5 * t**2 * kl, rtol=1e-5)


def test_selection_loss_is_weighted_cross_entropy():
  g = np.random.default_rng(4).normal(size=(3, N)).astype(np.float32)
  targets = np.eye(N, dtype=np.float32)[[0, 1, 3]]
  weights = np.array([0.0, 1.0, 2.0], np.float32)
  ce = -log_softmax(g)[np.arange(3), [0, 1, 3]]
  np.testing.assert_allclose(losses.selection_loss(g, targets, weights), (ce[1] + 2 * ce[2]) / 3,
                             rtol=1e-6)


def _set(config, key, value):
  section, name = key.split(".")
  config[section][name] = value


@pytest.mark.parametrize("key,value", [
    ("wgm.off_portion_weight", 1.5),
    ("wgm.off_portion_weight", -0.1),
    ("lgm.temperature", 0.0),
    ("lgm.temperature", -1.0),
    ("loss.selection_weight", -1.0),
    ("loss.delegator_weight", float("inf")),
    ("loss.distill_weight", float("nan")),
    ("loss.label_smoothing", 1.0),
    ("loss.label_smoothing", -0.1),
    ("lgm.rule", "best"),
    ("wgm.sinkhorn_epsilon", 0.0),
])
def test_bad_config_values(key, value):
  config = base_config()
  _set(config, key, value)
  with pytest.raises(CoEError) as error:
    config_base.validate(config)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"{key}={value!r}: "), message


def test_bad_rule_message():
  config = base_config()
  config.lgm.rule = "best"
  with pytest.raises(CoEError,
                     match=r"^lgm.rule='best': expected one of argmax, balanced, "
                     r"soft \(or random: LGM off, for ablations\)$"):
    config_base.validate(config)


@pytest.mark.parametrize("stages,key", [
    (dict(warmup=0.2, coadapt=0.9, delegator=0.0), "train.stages"),
    (dict(warmup=-0.2, coadapt=1.2, delegator=0.0), "train.stages.warmup"),
    (dict(warmup=0.2, coadapt=0.7, finetune=0.1), "train.stages.finetune"),
])
def test_bad_stages(stages, key):
  config = base_config()
  config.train.stages = stages
  with pytest.raises(CoEError, match=rf"^{key}=[^\n]*$"):
    config_base.validate(config)


def test_base_config_is_valid_and_a_saved_copy_loads_back_the_same():
  config = base_config()
  config_base.validate(config)
  saved = json.loads(config.to_json())
  assert config_base.upgrade(saved) == saved  # Nothing to fill in a current config.
  del saved["train"]["schedule"]  # A run saved before the key existed.
  assert config_base.upgrade(saved)["train"]["schedule"] == config.train.schedule


def test_stage_schedule():
  config = base_config()
  config.train.num_steps = 1001
  config.train.stages = dict(warmup=0.1, coadapt=0.0, delegator=0.9)
  plan = StagePlan.from_config(config)
  assert plan.boundaries() == (("warmup", 0, 100), ("delegator", 100, 1001))
  assert [plan.at(s).name for s in (0, 99, 100, 1000, 5000)
         ] == ["warmup", "warmup", "delegator", "delegator", "delegator"]
  assert plan.start_of("delegator") == 100 and plan.start_of("coadapt") is None
  assert plan.generalist_copy_step() is None
  config.train.stages = dict(warmup=0.2, coadapt=0.8, delegator=0.0)
  config.train.num_steps = 10
  assert StagePlan.from_config(config).boundaries() == (("warmup", 0, 2), ("coadapt", 2, 10))
  config.train.generalist_warmup = True
  assert StagePlan.from_config(config).generalist_copy_step() == 2


@pytest.mark.parametrize("selection_in_warmup", [False, True])
def test_each_stage_record_says_what_it_trains(selection_in_warmup):
  config = make_config(selection_in_warmup=selection_in_warmup)
  warmup, coadapt, delegator = (Stage.named(name, config) for name in config_base.STAGES)
  assert (warmup.trains_experts, warmup.trains_selection,
          warmup.expert_weights) == (True, selection_in_warmup, stages.ALL_SAMPLES)
  assert (coadapt.trains_experts, coadapt.trains_selection, coadapt.uses_wgm) == (True, True, True)
  assert (delegator.trains_experts, delegator.expert_weights) == (False, stages.FROZEN)
  assert [s.expert_passes for s in (warmup, coadapt, delegator)] == [3, 3, 1]
  config = make_config()
  config.train.generalist_warmup = True
  assert Stage.named("warmup", config).expert_weights == stages.GENERALIST
  # The objective follows the record: no selection loss where none is trained.
  for stage in (warmup, coadapt, delegator):
    _, metrics = objective.coe_objective(*inputs(),
                                         make_config(selection_in_warmup=selection_in_warmup),
                                         stage)
    assert (float(metrics["selection_loss"]) > 0) == stage.trains_selection, stage
    assert (float(metrics["expert_loss"]) > 0) == stage.trains_experts, stage


def test_unknown_stage():
  with pytest.raises(CoEError, match=r"^stage='finetune': "):
    objective.coe_objective(*inputs(), CONFIG, "finetune")


def test_experts_are_scored_on_the_scoring_logits_and_trained_on_their_own():
  """LGM, VCM and distillation read `scoring_logits`; only L_E reads `expert_logits`."""
  class_logits, selection_logits, expert_logits, labels = inputs()
  scoring = inputs(seed=1)[2]  # [N, B, K], other logits
  run = jax.jit(lambda *args, **kw: objective.coe_objective(*args, CONFIG, "coadapt", **kw)[1])
  both = run(class_logits, selection_logits, expert_logits, labels, scoring_logits=scoring)
  trained = run(class_logits, selection_logits, expert_logits, labels)
  scored = run(class_logits, selection_logits, scoring, labels)
  assert both["expert_loss"] == trained["expert_loss"]
  for key in ("selection_loss", "delegator_loss", "selection_agreement", "routed_accuracy"):
    assert both[key] == scored[key], key
  assert both["selection_loss"] != trained["selection_loss"]


def test_a_generalist_warmup_trains_expert_zero_alone():
  config = make_config()
  config.train.generalist_warmup = True
  class_logits, selection_logits, expert_logits, labels = inputs()
  targets, _ = objective.expert_targets(Stage.named("warmup", config),
                                        config,
                                        batch=B,
                                        num_experts=N)
  np.testing.assert_array_equal(targets.weights, np.eye(N)[[0] * B])
  to_experts = jax.grad(lambda z: objective.coe_objective(class_logits, selection_logits, z, labels,
                                                          config, "warmup")[0])(expert_logits)
  assert not is_zero(to_experts[0]) and is_zero(to_experts[1:])


def test_the_selection_head_can_learn_in_warmup():
  """`loss.selection_in_warmup`: LGM's labels train g in warm-up (independent experts
  already differ); the experts still weigh every sample by 1."""
  config = make_config(selection_in_warmup=True)
  class_logits, selection_logits, expert_logits, labels = inputs()
  loss = lambda g: objective.coe_objective(class_logits, g, expert_logits, labels, config, "warmup")
  total, metrics = loss(selection_logits)
  assert float(metrics["selection_loss"]) > 0 and float(metrics["selection_agreement"]) > 0
  assert not is_zero(jax.grad(lambda g: loss(g)[0])(selection_logits))
  ce = -log_softmax(np.asarray(expert_logits))[:, np.arange(B), labels]  # [N, B]
  np.testing.assert_allclose(metrics["expert_loss"], np.sum(np.mean(ce, axis=1)), rtol=1e-5)


@pytest.mark.parametrize("smoothing,cap", [(0.1, 0.91), (0.0, 1.0)])
def test_label_smoothing_caps_the_delegators_confidence(smoothing, cap):
  """The delegator's loss is minimised at confidence 1 - smoothing (K-1)/K: with
  CIFAR's 10 classes and 0.1, no image passes a tau above 0.91."""
  classes = 10
  grad = jax.jit(
      jax.grad(lambda z: losses.delegator_loss(z[None], jnp.array([3]), label_smoothing=smoothing)))
  z = jnp.zeros(classes)
  for _ in range(3000):
    z = z - 1.0 * grad(z)
  confidence = float(jax.nn.softmax(z)[3])
  assert confidence == pytest.approx(1 - smoothing * (classes - 1) / classes, abs=2e-3)
  assert confidence <= cap + 1e-3
  if smoothing == 0:
    assert confidence > 0.99


@pytest.mark.parametrize("update,key", [
    (dict(generalist_warmup=True, stages=dict(warmup=0.0, coadapt=1.0)), "train.generalist_warmup"),
    (dict(generalist_warmup=True, selection_in_warmup=True), "loss.selection_in_warmup"),
])
def test_a_generalist_warmup_needs_its_stages_and_no_selection(update, key):
  config = base_config()
  config.train.generalist_warmup = update["generalist_warmup"]
  if "stages" in update:
    config.train.stages.update(update["stages"])
  if "selection_in_warmup" in update:
    config.loss.selection_in_warmup = True
  with pytest.raises(CoEError, match="^" + key.replace(".", r"\.") + "=True"):
    config_base.validate(config)

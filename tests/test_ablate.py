"""The ablation command on a tiny config, its variants, and LGM's `random` rule."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from coe_jax import ablate, answers, config_base, flops, objective, run_dir
from coe_jax.config_base import base_config
from coe_jax.config_loading import load_config
from coe_jax.errors import CoEError
from coe_jax.models.spec import NetworkSpec
from coe_jax.objective import lgm
from tests.tiny import REPO, config_path

# The digits config shrunk on the command line: 2 experts, 4 steps, 1 seed.
# tau = 1 lets (almost) nothing exit, so CoE's mean FLOPs are delegator +
# expert, a cost the equal-FLOPs network can match. The variants without WGM,
# LGM or VCM only switch config keys (checked below) and each compiles its own
# training step, so the command runs the three whose figures differ in kind.
VARIANTS = ("coe", "single", "ensemble")
OVERRIDES = (
    f"--variants={','.join(VARIANTS)}",
    "--config.num_experts=2",
    "--config.train.num_steps=6",
    "--config.train.warmup_steps=1",
    "--config.train.batch_size=32",
    "--config.train.log_every_steps=2",
    "--config.train.eval_every_steps=4",  # At 2/3: the regime check.
    "--config.eval.threshold=1.0")


def _ablate(workdir: str) -> subprocess.CompletedProcess:
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      # One CPU device (not the suite's 8 fake ones), and quick compilation
      # for programs that run a few steps.
      XLA_FLAGS="--xla_backend_optimization_level=0")
  return subprocess.run([
      sys.executable, "-m", "coe_jax.ablate", f"--config={config_path('digits')}",
      f"--workdir={workdir}", "--seeds=1", *OVERRIDES
  ],
                        capture_output=True,
                        text=True,
                        cwd=REPO,
                        env=env,
                        timeout=900)


def _read(workdir: str, *parts: str):
  with open(os.path.join(workdir, *parts)) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ablation"))
  result = _ablate(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stdout


def _table_rows(markdown: str) -> dict[str, list[str]]:
  rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
  return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}  # Skip the header.


@pytest.mark.slow
def test_table_plot_and_progress(ablation):
  workdir, stdout = ablation
  with open(os.path.join(workdir, run_dir.ABLATION_TABLE)) as f:
    table = f.read()
  assert tuple(_table_rows(table)) == VARIANTS
  assert table in stdout  # Printed as well.
  with open(os.path.join(workdir, run_dir.ABLATION_PLOT), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  for i, variant in enumerate(VARIANTS):
    assert f"[{i + 1}/3] {variant}, seed 0:" in stdout
  assert "--config.train.num_steps=6" in table  # The command that made it.
  report = _read(workdir, run_dir.ABLATION)
  assert [row["name"] for row in report["rows"]] == list(VARIANTS)
  assert report["rows"][0]["runs"][0] == _read(workdir, "coe", "seed0", run_dir.ABLATION_RUN)
  # One family member (single) cannot bracket CoE's top-1.
  assert report["flops_ratio_at_equal_accuracy"] is None
  assert "not reached within the family" in table
  assert report["sizings"]["single"]["flops"] == _read(workdir, "single", "seed0",
                                                       "results.json")["expert_flops"]
  # CoE against the single network image by image, from the runs' predictions.
  paired = report["paired"]["coe - single"]["seed0"]
  rows = {row["name"]: row["runs"][0] for row in report["rows"]}
  assert paired["difference"] == pytest.approx(rows["coe"]["top1"] - rows["single"]["top1"])
  assert paired["low"] <= paired["difference"] <= paired["high"]
  assert "coe - single (top-1 points, paired bootstrap 95% interval" in table


@pytest.mark.slow
def test_rows_carry_each_runs_figures(ablation):
  workdir, _ = ablation
  with open(os.path.join(workdir, run_dir.ABLATION_TABLE)) as f:
    rows = _table_rows(f.read())
  run = {v: _read(workdir, v, "seed0", run_dir.ABLATION_RUN) for v in VARIANTS}
  results = {v: _read(workdir, v, "seed0", run_dir.RESULTS) for v in VARIANTS}
  assert run["coe"]["top1"] == results["coe"]["top1"]
  assert run["coe"]["mean_flops"] == results["coe"]["mean_flops"]
  assert rows["coe"][2] == f"{100 * results['coe']['top1']:.2f}"
  assert rows["coe"][6] == f"{100 * results['coe']['early_exit_rate']:.1f}"
  # The ensemble costs N experts; the single network is the run's only expert.
  expert_flops = flops.count(_config_of(workdir, "coe"))["expert_flops"]
  assert run["ensemble"]["mean_flops"] == 2 * expert_flops
  assert rows["ensemble"][5] == f"{2 * expert_flops / 1e6:.3f}"
  assert run["single"]["mean_flops"] == results["single"]["expert_flops"]
  assert run["single"]["top1"] == results["single"]["expert_top1"][0]
  assert run["single"]["mean_flops"] == pytest.approx(run["coe"]["mean_flops"], rel=0.15)
  assert rows["single"][6] == rows["ensemble"][6] == "—"
  # The regime check: the final top-1 less the evaluation at 2/3 of the steps
  # (step 4 of 6): CoE's answer, the single network's own (no exit).
  then = {
      v:
          next(line
               for line in run_dir.read_metrics(os.path.join(workdir, v, "seed0"))
               if line["step"] == 4 and "eval/top1" in line) for v in ("coe", "single")
  }
  assert run["coe"]["last_third_gain"] == pytest.approx(run["coe"]["top1"] -
                                                        then["coe"]["eval/top1"])
  assert run["single"]["last_third_gain"] == pytest.approx(
      run["single"]["top1"] - then["single"]["eval/top1_no_early_exit"])
  assert run["ensemble"]["last_third_gain"] is None and rows["ensemble"][7] == "—"
  assert rows["coe"][7] == f"{100 * run['coe']['last_third_gain']:.2f}"
  assert all(0 <= run[v]["top1"] <= 1 for v in VARIANTS)


def test_paired_bootstrap_interval():
  rng = np.random.default_rng(0)
  a = rng.random((1, 4000)) < 0.6
  b = rng.random((1, 4000)) < 0.5
  same = ablate.paired_bootstrap(a, a)
  assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
  assert ablate.paired_bootstrap(np.ones((1, 50), bool), np.zeros((1, 50), bool)) == {
      "difference": 1.0,
      "low": 1.0,
      "high": 1.0
  }
  got = ablate.paired_bootstrap(a, b)
  diff = a[0].astype(float) - b[0]
  assert got["difference"] == pytest.approx(diff.mean())
  # The percentile interval of a mean of 4000 draws: about the normal one.
  half = 1.96 * diff.std() / math.sqrt(diff.size)
  assert got["low"] == pytest.approx(diff.mean() - half, abs=0.15 * half)
  assert got["high"] == pytest.approx(diff.mean() + half, abs=0.15 * half)
  # Pooled over two seed pairs: the mean difference, a narrower interval.
  c, d = rng.random((1, 4000)) < 0.6, rng.random((1, 4000)) < 0.5
  pooled = ablate.paired_bootstrap(np.concatenate([a, c]), np.concatenate([b, d]))
  assert pooled["difference"] == pytest.approx(
      (diff.mean() + (c[0].astype(float) - d[0]).mean()) / 2)
  assert pooled["high"] - pooled["low"] < got["high"] - got["low"]


def test_paired_differences_pair_seeds_on_the_same_images(tmp_path):
  labels = np.arange(6) % 3
  answers = {  # variant -> per seed: right on the first n images.
      "coe": (5, 4),
      "single": (3, 4)
  }
  for variant, rights in answers.items():
    for k, n in enumerate(rights):
      run = tmp_path / variant / f"seed{k}"
      run.mkdir(parents=True)
      wrong = np.where(np.arange(6) < n, labels, (labels + 1) % 3)
      run_dir.write_predictions(str(run / run_dir.PREDICTIONS),
                                labels=labels,
                                coe=wrong,
                                experts=np.stack([wrong, labels]))
  got = ablate.paired_differences(str(tmp_path), {"coe": 2, "single": 2, "condconv": 1})
  assert set(got) == {"coe - single"}  # No condconv predictions: no comparison.
  figures = got["coe - single"]
  assert figures["seed0"]["difference"] == pytest.approx(2 / 6)  # CoE's answer vs expert 0's.
  assert figures["seed1"]["difference"] == 0
  assert figures["pooled"]["difference"] == pytest.approx(1 / 6)


def test_the_regime_check_reads_the_evaluation_nearest_two_thirds(tmp_path):
  lines = [{
      "step": 100,
      "loss": 2.0
  }, {
      "step": 300,
      "eval/top1": 0.5
  }, {
      "step": 600,
      "eval/top1": 0.6,
      "eval/top1_no_early_exit": 0.62
  }, {
      "step": 900,
      "eval/top1": 0.65
  }]
  (tmp_path / run_dir.METRICS).write_text("".join(json.dumps(line) + "\n" for line in lines) +
                                          '{"step": 9')  # A line cut short by a kill.
  assert ablate.last_third_gain("coe", str(tmp_path), 0.7, 900) == pytest.approx(0.1)
  assert ablate.last_third_gain("single", str(tmp_path), 0.7, 900) == pytest.approx(0.08)
  assert ablate.last_third_gain("ensemble", str(tmp_path), 0.7, 900) is None
  # No evaluation within 0.02 of 2/3 of the steps (600 of 1000 is 0.6).
  assert ablate.last_third_gain("coe", str(tmp_path), 0.7, 1000) is None
  assert ablate.last_third_gain("coe", str(tmp_path / "missing"), 0.7, 900) is None


def _config_of(workdir: str, variant: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(_read(workdir, variant, "seed0", run_dir.CONFIG))


def test_each_variant_switches_what_it_says():
  config = load_config(config_path("digits"))
  size = flops.Sizing(0.5, 1, 1.0)
  configs = {v: ablate.variant_config(config, v, seed=3, sizing=size) for v in ablate.VARIANTS}
  assert all(c.seed == 3 for c in configs.values())
  assert configs["coe"].to_dict() == {**config.to_dict(), "seed": 3}
  assert configs["no_wgm"].wgm.off_portion_weight == 1.0
  assert configs["no_lgm"].lgm.rule == "random"
  assert not configs["no_vcm"].vcm.enabled
  for variant in ("single", "ensemble"):
    assert dict(configs[variant].train.stages) == {"warmup": 1.0}  # Plain classifiers.
  assert configs["single"].num_experts == 1 and configs["ensemble"].num_experts == 4
  for variant in ("single", "single_0.5x", "single_2x", "condconv"):
    expert = configs[variant].expert
    assert expert.width_multiplier == 0.5, variant
    assert expert.depth_multiplier == config.expert.depth_multiplier, variant  # Width alone.
    assert configs[variant].num_experts == 1
    assert bool(expert.condconv_kernels) == (variant == "condconv"), variant
  assert configs["condconv"].expert.condconv_from_stage == len(config.expert.stages) // 2
  assert config.wgm.off_portion_weight == 0.2 and config.seed == 0  # The input is untouched.
  # The ceiling needs superclasses, so it runs only when asked for.
  assert ablate.ORACLE in ablate.VARIANTS and ablate.ORACLE not in ablate.DEFAULT_VARIANTS


@pytest.mark.slow
def test_the_runs_write_the_routing_figures(ablation):
  workdir, _ = ablation
  for name in (run_dir.ROUTING_GRID_PLOT, run_dir.CLASS_BY_EXPERT_PLOT, run_dir.CURVE_PLOT):
    with open(os.path.join(workdir, "coe", "seed0", name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  # The curve the plot draws is the run's own sweep: exits fall as tau rises,
  # each point costs what its exit rate says, and its first point is every
  # image exiting at the delegator's accuracy.
  curve = _read(workdir, "coe", "seed0", run_dir.CURVE)
  results = _read(workdir, "coe", "seed0", run_dir.RESULTS)
  assert curve["thresholds"] == sorted(curve["thresholds"])
  assert curve["exit_rate"] == sorted(curve["exit_rate"], reverse=True)
  for rate, cost in zip(curve["exit_rate"], curve["mean_flops"]):
    assert cost == pytest.approx(
        answers.mean_flops(results["delegator_flops"], results["expert_flops"], rate))
  assert curve["exit_rate"][0] == 1.0
  assert curve["accuracy"][0] == pytest.approx(results["delegator_top1"])


def test_the_sized_family_grows_in_width_alone_and_is_monotone_in_flops():
  config = load_config(config_path("cifar10"))
  expert = flops.count(config)["expert_flops"]
  factors = (0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0)
  family = [ablate.variant_sizing(config, f"single_{f}x", 10, expert) for f in factors]
  widths = [s.width_multiplier for s in family]
  assert widths == sorted(widths) and len(set(widths)) == len(widths), widths
  assert [s.flops for s in family] == sorted(s.flops for s in family)
  for factor, sizing in zip(factors, family):
    assert sizing.flops == pytest.approx(factor * expert, rel=0.1), (factor, sizing)
    network = ablate.variant_config(config, f"single_{factor}x", 0, sizing).expert
    assert network.depth_multiplier == config.expert.depth_multiplier
    assert network.stages == config.expert.stages


@pytest.mark.slow
def test_a_finished_run_is_reused_not_retrained(ablation):
  workdir, _ = ablation
  variant_dir = os.path.join(workdir, "coe", "seed0")
  # Returns before building a trainer: a finished run is read back.
  assert ablate.run_variant(_config_of(workdir, "coe"), "coe",
                            variant_dir) == _read(variant_dir, run_dir.ABLATION_RUN)


@pytest.mark.slow
def test_a_workdir_of_another_config_is_refused(ablation):
  workdir, _ = ablation
  config = ablate.variant_config(_config_of(workdir, "coe"), "coe", seed=0)
  config.train.num_steps = 5
  with pytest.raises(CoEError, match="holds a run of another config"):
    ablate.run_variant(config, "coe", os.path.join(workdir, "coe", "seed0"))


def test_sized_variants_come_close_to_their_multiple_of_coes_flops():
  config = load_config(config_path("digits"))
  expert = flops.count(config)["expert_flops"]
  for variant, factor in (("single", 1.0), ("single_2x", 2.0), ("condconv", 1.0)):
    # The bisection finds what trying every width finds (digits' narrow
    # layers move in coarse steps, so "closest" is all a width can promise).
    network = ablate._network_of(config, variant)
    every = [
        flops.network_macs(
            NetworkSpec.from_config(flops.Sizing(w, 0, 1.0).apply(network), "expert"),
            config.data.image_size, config.data.channels, 10)
        for w in flops.WIDTH_MULTIPLIERS[::3] + (1.0,)
    ]
    for target in (0.3 * expert, 0.5 * expert, 1.0 * expert, 1.7 * expert):
      found = ablate.variant_sizing(config, variant, 10, target)
      assert found.target == factor * target
      error = abs(math.log(found.flops / (factor * target)))
      assert error <= min(abs(math.log(m / (factor * target))) for m in every) + 1e-9, variant
      assert found.flops == pytest.approx(factor * target, rel=0.4), (variant, target)
  same = ablate.variant_sizing(config, "single", 10, expert)
  assert (same.width_multiplier, same.flops) == (1.0, expert)
  # The sizing's FLOPs are those of the network the variant trains.
  sized = ablate.variant_config(config, "single_0.7x", 0,
                                ablate.variant_sizing(config, "single_0.7x", 10, expert))
  assert flops.count(sized,
                     10)["expert_flops"] == ablate.variant_sizing(config, "single_0.7x", 10,
                                                                  expert).flops


def test_flops_ratio_at_equal_accuracy_interpolates_in_log_flops():
  family = [(1.0, 0.60), (2.0, 0.70), (4.0, 0.80), (8.0, 0.82)]
  # CoE at 2 FLOPs with the top-1 the family reaches at 4: ratio 2.
  assert ablate.flops_ratio_at_equal_accuracy(family, 0.80, 2.0) == pytest.approx(2.0)
  # Halfway between 0.70 and 0.80: sqrt(2 * 4) FLOPs.
  assert ablate.flops_ratio_at_equal_accuracy(family, 0.75, 1.0) == pytest.approx(8**0.5)
  assert ablate.flops_ratio_at_equal_accuracy(family[::-1], 0.75, 1.0) == pytest.approx(8**0.5)
  assert ablate.flops_ratio_at_equal_accuracy(family, 0.90, 1.0) is None  # CoE beats them all.
  assert ablate.flops_ratio_at_equal_accuracy(family, 0.55, 1.0) is None  # Below the family.


def test_bad_variants_and_seeds_are_refused(tmp_path):
  config = base_config()
  with pytest.raises(CoEError, match=r"^variant='single': needs"):
    ablate.variant_config(config, "single", seed=0)
  with pytest.raises(CoEError, match=r"^variant='single_0x'"):
    ablate.variant_config(config, "single_0x", seed=0)
  with pytest.raises(CoEError, match=r"^variants='coe,best'"):
    ablate.run_ablation(config, str(tmp_path), 1, ["coe", "best"])
  with pytest.raises(CoEError, match=r"^seeds=0"):
    ablate.run_ablation(config, str(tmp_path), 0)


B, N, K = 256, 4, 5


def test_random_lgm_labels_are_uniform_one_hot_and_ignore_the_experts():
  labels = jnp.arange(B) % K
  # Expert 0 is by far the best on every sample: LGM's argmax would always pick it.
  expert_logits = 5.0 * jax.nn.one_hot(labels, K)[None] * (jnp.arange(N) == 0)[:, None, None]
  rule = jax.jit(lambda z, rng: lgm.selection_targets(z, labels, rule="random", rng=rng)[0])
  targets = rule(expert_logits, jax.random.key(0))  # [B, N]
  np.testing.assert_array_equal(targets.sum(axis=1), np.ones(B))
  assert set(np.unique(targets)) == {0.0, 1.0}
  counts = np.bincount(np.argmax(targets, axis=1), minlength=N)
  assert counts.min() > B / N / 2  # Every expert drawn, about evenly.
  other = rule(expert_logits, jax.random.key(1))  # Another step: another draw.
  assert np.mean(np.argmax(targets, 1) == np.argmax(other, 1)) < 0.5
  grad = jax.grad(lambda z: jnp.sum(rule(z, jax.random.key(0)) * jnp.arange(N)))(expert_logits)
  np.testing.assert_array_equal(grad, np.zeros_like(grad))
  with pytest.raises(CoEError, match=r"^rng=None: lgm.rule='random' draws its labels with a key"):
    lgm.selection_targets(expert_logits, labels, rule="random")


def test_random_rule_passes_validation_and_trains_the_selection():
  config = base_config()
  config.lgm.rule = "random"
  config_base.validate(config)
  k = jax.random.split(jax.random.key(1), 4)
  args = (jax.random.normal(k[0], (16, K)), jax.random.normal(k[1], (16, N)),
          jax.random.normal(k[2], (N, 16, K)), jax.random.randint(k[3], (16,), 0, K))
  grad = jax.jit(
      jax.grad(lambda g: objective.coe_objective(args[0], g, args[2], args[3], config, "coadapt",
                                                 jax.random.key(0))[1]["selection_loss"]))(args[1])
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  config.lgm.rule = "randm"
  with pytest.raises(CoEError, match=r"^lgm.rule='randm'"):
    config_base.validate(config)

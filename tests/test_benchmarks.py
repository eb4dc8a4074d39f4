"""The benchmarks run end to end on a tiny config; their figures agree with each other."""

import time

import pytest

from benchmarks import inference, int8_conv, peak, train_step
from coe_jax import flops
from coe_jax.training import train
from tests.helpers import single_device_trainer, train_config
from tests.tiny import tiny_config

# End to end and minutes long: `make test-all` runs them, `make test` does not.
pytestmark = pytest.mark.slow

LITERT_VARIANTS = {
    "litert_coe_routed[batch=1]", "litert_coe_routed[batch=32]", "litert_int8_coe_routed[batch=1]",
    "litert_int8_coe_routed[batch=32]", "litert_expert", "litert_int8_expert",
    "litert_dense_equal_flops", "jax_coe_routed[batch=1]", "jax_coe_routed[batch=32]"
}
INT8_RATIOS = {
    "litert_int8_coe_routed[batch=32] / litert_coe_routed[batch=32]",
    "litert_int8_coe_routed[batch=1] / litert_coe_routed[batch=1]",
    "litert_int8_expert / litert_expert"
}
PEAK_KEYS = {"macs_per_s", "gmacs_per_s", "seconds", "matmul_size", "repeats", "cpu", "derivation"}


def _check_peak(measured):
  """A measured peak: its rate is the matmul's multiply-adds over the best time."""
  assert set(measured) == PEAK_KEYS
  assert measured["macs_per_s"] == pytest.approx(measured["matmul_size"]**3 / measured["seconds"])
  assert measured["gmacs_per_s"] == pytest.approx(measured["macs_per_s"] / 1e9)
  assert measured["derivation"].startswith("measured: float32 ")
  assert f"{measured['gmacs_per_s']:.1f} G multiply-adds/s" in measured["derivation"]


def test_measured_peak_times_a_float32_matmul():
  measured = peak.measured_peak(size=256, repeats=2)
  _check_peak(measured)
  assert measured["matmul_size"] == 256 and measured["repeats"] == 2
  assert measured["macs_per_s"] > 1e8  # Far below any CPU's rate: only catches a unit slip.


def test_int8_convolution_benchmark_times_both_precisions_of_the_same_layers():
  report = int8_conv.measure(cases=((8, 16, 1),))
  (row,) = report["rows"]
  assert row["case"] == "8x8x16 k1" and row["macs"] == int8_conv.LAYERS * 8 * 8 * 16 * 16
  assert row["int8_over_float32"] == pytest.approx(row["int8_gmacs_per_s"] /
                                                   row["float32_gmacs_per_s"])
  assert set(report["cpu_flags"]) == {"avx2", "avx512f", "avx512_vnni", "avx_vnni"}


def test_litert_benchmark_measures_float32_and_int8_against_the_measured_peak():
  # PWLU: the benchmark moves it to phase II, and the export must take that.
  config = tiny_config(num_experts=2, activation="pwlu")
  report = inference.run_litert(config, threshold=None, workdir=None, steps=1, rounds=1, threads=1)
  widths = {n for n in report["results"] if n.startswith("litert_dense_equal_flops[x")}
  assert set(report["results"]) - widths == LITERT_VARIANTS and 1 <= len(widths) <= 2
  assert report["delegates"] == ["xnnpack"] * 3
  assert set(report["threads"]["dense"].values()) == {1}
  assert report["int8"]["delegates"] == ["xnnpack"] * 3
  assert report["undelegated"] == [["CAST"]] * 3
  # tau at the median confidence, each export's own.
  assert 0 < report["exit_rate"] < 1 and 0 < report["int8"]["exit_rate"] < 1
  _check_peak(report["peak"])
  assert report["peak"]["matmul_size"] == peak.MATMUL_SIZE
  coe_flops = lambda rho: report["delegator_flops"] + (1 - rho) * report["expert_flops"]
  for name, result in report["results"].items():
    assert result["images_per_s"] > 0, name
    if name.startswith(("litert_coe", "jax_coe")):
      assert result["flops_per_image"] == pytest.approx(coe_flops(report["exit_rate"])), name
    if name.startswith("litert_int8_coe"):
      assert result["flops_per_image"] == pytest.approx(coe_flops(report["int8"]["exit_rate"]))
    if name.endswith("_expert"):
      assert result["flops_per_image"] == report["expert_flops"], name
    # No run can beat the machine's measured peak: a unit slip in the
    # multiply-adds or the timing would.
    assert 0 < result["percent_of_peak"] < 100, name
  assert INT8_RATIOS <= set(report["ratios"])
  # The ratios are timings of a tiny model in one round: their size is the
  # benchmark's to print (a tiny model's int8 serving ran 0.15x float32 on one CI
  # machine), the test checks only that each is a measured, finite quotient.
  assert all(0 < report["ratios"][ratio] < float("inf") for ratio in INT8_RATIOS), report["ratios"]
  table = inference.format_litert_table(report)
  assert all(name in table for name in LITERT_VARIANTS | INT8_RATIOS)
  assert report["peak"]["derivation"] in table


def test_equal_flops_speed_is_interpolated_between_the_neighbouring_widths():
  # A cost that grows as a power of the FLOPs is recovered exactly.
  speed = lambda f: 3e9 * f**-0.8
  points = [(2e5, speed(2e5)), (6e5, speed(6e5))]
  assert inference._at_target(points, 4e5) == pytest.approx(speed(4e5))
  assert inference._at_target(points, 2e5) == pytest.approx(speed(2e5))
  assert inference._at_target(points[:1], 4e5) == speed(2e5)  # One width: its own speed.


def test_inference_benchmark_reads_a_run_and_compares_at_equal_flops(tmp_path):
  """The README's `--workdir` form: the run's variables and calibrated threshold;
  the equal-FLOPs rows sit at CoE's mean FLOPs, between their two widths."""
  config = train_config(num_steps=2)
  workdir = str(tmp_path / "run")
  train.train(single_device_trainer(config, workdir))
  report = inference.run(config, batch_size=8, threshold=None, workdir=workdir, steps=1, rounds=1)
  assert report["threshold_source"] == f"calibrated ({workdir})"
  mean_flops = report["results"]["coe_routed[auto]"]["flops_per_image"]
  for name in ("dense_equal_flops", "condconv_equal_flops"):
    result, widths = report["results"][name], report["multipliers"][name]
    assert result["flops_per_image"] == mean_flops
    assert widths[0]["flops"] <= mean_flops <= widths[-1]["flops"], widths
    speeds = [report["results"][f"{name}[x{w['width']:.2f}]"]["images_per_s"] for w in widths]
    assert min(speeds) <= result["images_per_s"] <= max(speeds)
  assert report["ratios"]["coe_routed / dense_equal_flops"] == pytest.approx(
      report["results"]["coe_routed[auto]"]["images_per_s"] /
      report["results"]["dense_equal_flops"]["images_per_s"])
  assert "dense_equal_flops: interpolated between width x" in inference.format_table(report)
  # Where the routed call's time goes: its parts, timed alone, as shares of it.
  shares = report["time_shares"]
  assert set(shares) == {"delegator", "experts_on_buffers", "router", "one_expert_unsplit"}
  assert shares["router"] == pytest.approx(1 - shares["delegator"] - shares["experts_on_buffers"])
  assert all(shares[k] > 0 for k in ("delegator", "experts_on_buffers", "one_expert_unsplit"))
  assert not any(name.startswith("parts:") for name in report["results"])


def test_the_input_benchmark_reads_tfds_from_a_fake_imagenet(tmp_path):
  """`--input=fake_tfds`: ImageNet's TFDS pipeline (JPEG decoding, inception crop) on
  fake data, timed beside the step."""
  config = tiny_config(num_experts=2)
  source = train_step.fake_tfds_config(config, str(tmp_path), examples=16)
  batch = next(train_step.data.train_batches(source))
  assert batch["image"].shape == (config.train.batch_size, 16, 16, 3)
  report = train_step.run(config, batch_size=8, num_experts=2, repeats=1, input_config=source)
  assert report["input_images_per_s"] > 0


def test_train_step_benchmark_reports_its_share_and_percent_of_the_measured_peak(monkeypatch):
  config = tiny_config(num_experts=2)

  def slow_batches(config):  # An input pipeline that takes 0.2 s a batch.
    while True:
      time.sleep(0.2)
      yield {}

  monkeypatch.setattr(train_step.data, "train_batches", slow_batches)
  report = train_step.run(config, batch_size=8, num_experts=2, repeats=3)
  assert 8 / 0.25 < report["input_images_per_s"] <= 8 / 0.2
  bound = report["input_headroom"] < 1
  assert ("INPUT-BOUND" in train_step.format_table(report)) == bound
  _check_peak(report["peak"])
  cost = flops.count(config, config.data.num_classes or 10)
  # Forward and backward (twice the forward) through the delegator and both experts.
  assert report["step_macs"] == 3 * 8 * (cost["delegator_flops"] + 2 * cost["expert_flops"])
  # WGM, LGM and VCM are part of the step, so they take less time than all of it.
  assert 0 < report["share"] < 1
  for step in train_step.STEPS:
    assert 0 < report[f"{step}_percent_of_peak"] < 100, step
  table = train_step.format_table(report)
  assert report["peak"]["derivation"] in table and "% peak" in table

"""The inference benchmark runs end to end on a tiny config; its figures agree with each other."""

import pytest

from benchmarks import inference
from tests.tiny import tiny_config

LITERT_VARIANTS = {"litert_coe_routed[batch=1]", "litert_coe_routed[batch=32]",
                   "litert_dense_equal_flops", "jax_coe_routed[batch=1]",
                   "jax_coe_routed[batch=32]"}


def test_litert_benchmark_measures_every_variant_against_the_cpu_peak():
  # PWLU: the benchmark moves it to phase II, and the export must take that.
  config = tiny_config(num_experts=2, activation="pwlu")
  report = inference.run_litert(config, threshold=None, workdir=None, steps=1, rounds=1,
                                threads=1, fma_units=2)
  assert set(report["results"]) == LITERT_VARIANTS
  assert report["delegates"] == ["xnnpack"] * 3 and report["threads"]["dense"] == 1
  assert 0 < report["exit_rate"] < 1  # tau at the median confidence.
  peak = report["peak"]
  assert peak["macs_per_s"] == pytest.approx(
      peak["cores"] * 2 * peak["fp32_lanes"] * peak["ghz"] * 1e9)
  coe_flops = report["delegator_flops"] + (1 - report["exit_rate"]) * report["expert_flops"]
  for name, result in report["results"].items():
    assert result["images_per_s"] > 0, name
    if name.startswith(("litert_coe", "jax_coe")):
      assert result["flops_per_image"] == pytest.approx(coe_flops), name
    assert result["macs_per_s"] == pytest.approx(result["images_per_s"]
                                                 * result["flops_per_image"]), name
    assert result["percent_of_peak"] == pytest.approx(100 * result["macs_per_s"]
                                                      / peak["macs_per_s"]), name
  speed = lambda name: report["results"][name]["images_per_s"]
  assert report["ratios"]["litert_coe_routed[batch=1] / jax_coe_routed[batch=1]"] == \
      pytest.approx(speed("litert_coe_routed[batch=1]") / speed("jax_coe_routed[batch=1]"))
  table = inference.format_litert_table(report)
  assert all(name in table for name in LITERT_VARIANTS) and peak["derivation"] in table

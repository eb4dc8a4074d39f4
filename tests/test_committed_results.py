"""The CIFAR tables in README.md and docs/results.md agree with results/ and configs/.

Each table between `<!-- NAME-table -->` and `<!-- /NAME-table -->` reports
the committed runs of `results/NAME/<variant>_seed<k>/`: every figure in it
but `last third` (from evaluations during training, which are not committed)
is recomputed here from their results.json, and every run's config.json is
the one `coe_jax.ablate` would build today from its protocol's config. A rerun
that changes the weights, or a recipe change that is not rerun, fails here
until the README, the config and the results agree again.
"""

import glob
import json
import os
import re

import ml_collections
import pytest

from coe_jax import ablate, config_base
from coe_jax.config_loading import load_config
from tests.tiny import REPO, config_path

# The protocol each committed folder was run with: a config, these `train` overrides, and
# what the sized variants were sized to (None: the committed CoE seeds' mean FLOPs; else
# `coe_jax.ablate --reference_flops`).
PROTOCOLS = {
    "cifar10": ("cifar10", {}, None),
    "cifar10_30epochs": ("cifar10", {
        "num_steps": 9500,
        "eval_every_steps": 0
    }, None),
    "cifar10_120epochs": ("cifar10", {
        "num_steps": 38000,
        "eval_every_steps": 12666
    }, None),
    "cifar100_probe": ("cifar100", {}, 1.7e6),
}
TABLES = [("README.md", "cifar10"), ("docs/results.md", "cifar10"),
          ("docs/results.md", "cifar10_30epochs"), ("docs/results.md", "cifar10_120epochs"),
          ("docs/results.md", "cifar100_probe")]


def _table(doc: str, name: str) -> dict[str, dict[str, str]]:
  """The rows of the table between NAME's markers, by variant, cells by column header."""
  with open(os.path.join(REPO, doc)) as f:
    text = f.read()
  found = re.search(rf"<!-- {name}-table -->\n(.*?)\n<!-- /{name}-table -->", text, re.S)
  assert found, f"{doc}: no table between <!-- {name}-table --> markers"
  lines = [
      [cell.strip() for cell in line.strip("|").split("|")] for line in found.group(1).splitlines()
  ]
  header, rows = lines[0], lines[2:]
  # "**coe** (tau calibrated on the hold-out)" is coe, "single (1x)" is single.
  return {row[0].replace("*", "").split(" ")[0]: dict(zip(header, row)) for row in rows}


def _runs(name: str) -> dict[str, list[tuple[int, dict, dict]]]:
  """results/NAME's committed runs: (seed, results.json, config.json) by variant, in seed order."""
  runs = {}
  for folder in sorted(glob.glob(os.path.join(REPO, "results", name, "*_seed*"))):
    variant, seed = re.fullmatch(r"(.+)_seed(\d+)", os.path.basename(folder)).groups()
    with open(os.path.join(folder, "results.json")) as f:
      results = json.load(f)
    with open(os.path.join(folder, "config.json")) as f:
      config = json.load(f)
    runs.setdefault(variant, []).append((int(seed), results, config))
  return {v: sorted(seeds, key=lambda s: s[0]) for v, seeds in runs.items()}


def _per_seed(values, fmt: str) -> str:
  """Each seed's figure, one figure where every seed has the same (a network's FLOPs)."""
  cells = [format(v, fmt) for v in values]
  return cells[0] if len(set(cells)) == 1 else ", ".join(cells)


@pytest.mark.parametrize("doc,name", TABLES)
def test_each_table_reports_the_committed_runs(doc, name):
  table, runs = _table(doc, name), _runs(name)
  assert set(table) == set(runs), (doc, name, sorted(table), sorted(runs))
  for variant, seeds in runs.items():
    rows = [ablate.results_row(variant, results) for _, results, _ in seeds]
    cells, top1 = table[variant], [r["top1"] for r in rows]
    where = f"{doc}, {name}, {variant}"
    assert cells["top-1 (%)"].replace("*", "") == ablate.mean_sd(top1), where
    assert cells["seed 0, seed 1 (%)"] == ", ".join(f"{100 * t:.2f}" for t in top1), where
    assert cells["mean FLOPs (M)"] == _per_seed([r["mean_flops"] / 1e6 for r in rows], ".3f"), where
    exits = [r["early_exit_rate"] for r in rows]
    expected = "—" if exits[0] is None else ", ".join(f"{100 * e:.1f}" for e in exits)
    assert cells["early exits (%)"] == expected, where
    config = seeds[0][2]
    if ablate.flops_factor(variant) is None:
      assert cells["width x"] == (f"{config['num_experts']} experts of "
                                  f"{seeds[0][1]['expert_flops'] / 1e6:.2f}M"), where
    else:
      assert cells["width x"] == f"{config['expert']['width_multiplier']:g}", where
    if "train subset (%)" in cells:  # Top-1 on the fixed subset of the training images.
      assert cells["train subset (%)"] == _per_seed(
          [100 * r["train_subset_top1"] for _, r, _ in seeds], ".2f"), where
    if "30 epochs (%)" in cells:  # The 60-epoch table's column from the 30-epoch runs.
      earlier = [
          ablate.results_row(variant, r)["top1"] for _, r, _ in _runs("cifar10_30epochs")[variant]
      ]
      assert cells["30 epochs (%)"] == f"{100 * sum(earlier) / len(earlier):.2f}", where


@pytest.mark.parametrize("name", PROTOCOLS)
def test_each_committed_run_is_the_recipe_ablate_builds_from_its_config(name):
  """Sized variants are sized, as ablate does, to the mean FLOPs of the committed CoE
  seeds, or to the protocol's reference FLOPs."""
  config_name, overrides, reference_flops = PROTOCOLS[name]
  recipe = load_config(config_path(config_name))
  recipe.data.name, recipe.data.path = "image_folder", "DATA"
  recipe.train.update(overrides)
  runs = _runs(name)
  if reference_flops is None:
    reference_flops = sum(r["mean_flops"] for _, r, _ in runs["coe"]) / len(runs["coe"])
  for variant, seeds in runs.items():
    sizing = None
    if ablate.flops_factor(variant) is not None:
      sizing = ablate.variant_sizing(recipe, variant, recipe.data.num_classes, reference_flops)
    for seed, _, saved in seeds:
      expected = json.loads(ablate.variant_config(recipe, variant, seed, sizing).to_json())
      saved = config_base.upgrade(saved)
      saved["data"]["path"] = "DATA"  # Where the images were on the machine that trained.
      config_base.validate(ml_collections.ConfigDict(saved))
      differ = sorted(k for k in expected if expected[k] != saved.get(k))
      assert not differ, (name, variant, seed, differ)

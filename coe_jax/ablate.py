r"""Ablations: does each part of CoE earn its place, and does CoE beat one network of its cost?

    python -m coe_jax.ablate --config=configs/digits.py --workdir=runs/ablate [--seeds=3] \
        [--variants=coe:2,single:2,single_0.5x ...] [--config.train.num_steps=800 ...]

Trains each variant below with the ordinary trainer, once per seed (`seed`, `seed + 1`,
...; `--seeds` of each, or k of a variant given as `name:k`), each run in
`WORKDIR/<variant>/seed<s>`: running the same command again resumes unfinished runs and
reuses finished ones (a run directory that holds another config's run is refused).
Compiled programs are cached where the trainer caches a run's
(`train.use_compilation_cache`: `WORKDIR/compilation_cache` unless
`train.compilation_cache_dir` or JAX_COMPILATION_CACHE_DIR says otherwise), since the
variants and seeds share most of them. Writes `WORKDIR/ablation.md` (a Markdown table,
also printed) and `WORKDIR/ablation.png` (top-1 vs mean FLOPs); `coe_jax.run_dir` names
every file.

Variants:
- `coe`: the config as given.
- `no_wgm`: `wgm.off_portion_weight=1`: every expert weighs every sample alike
  (under `train.expert_dispatch=all`: every expert trains on every image).
- `no_lgm`: `lgm.rule=random`: the delegator's selection learns random labels.
- `no_vcm`: `vcm.enabled=False`: every sample weighs 1 in the selection loss.
- `single`: one network of the experts' architecture, its width (not its
  depth: the family keeps one shape) scaled so that its FLOPs come as close
  as the width allows to full CoE's mean FLOPs (averaged over seeds), trained
  alone as a plain classifier (`num_experts=1`, warm-up stage only; the
  delegator trained alongside is not used). Its cost is the network alone.
- `single_0.5x`, `single_0.7x`, `single_1.4x`, `single_2x` (any
  `single_<f>x`): the same at f times CoE's mean FLOPs. With `single` they
  form the single-network family whose accuracy-vs-FLOPs line CoE is judged
  against: `flops_ratio_at_equal_accuracy` is the FLOPs the family needs to
  reach CoE's top-1 (interpolated in log FLOPs) over CoE's mean FLOPs.
- `condconv`: the experts' architecture with CondConv (4 kernels) in its
  later half of stages, sized like `single` and trained alone.
- `coe_oracle_groups` (the ceiling; image folders with a `coarse.json`): N
  experts of `single`'s size, expert j trained only on the images of group j
  (the superclasses of `coarse.json` in name order, cut into N equal runs:
  `coe_jax.data.class_groups`) for the same epochs, each test image answered
  by its true group's expert. Its `router_top1` is the delegator's network
  trained alone to predict the group: how far a router is from the oracle.
- `ensemble`: the N experts trained independently as plain classifiers
  (warm-up stage only: same batches, own initialisations); the answer is the
  mean of their probabilities, at N x expert FLOPs.

CoE variants report top-1 at the tau the trainer calibrates (`eval.*` as
configured), their mean FLOPs and early-exit rate. Where the runs evaluate at 2/3 of
their steps (`--config.train.eval_every_steps` a third of `num_steps`), the table adds
each variant's top-1 gain over the last third of training (`last_third_gain`): the
check that capacity, not training, limits the networks. `WORKDIR/ablation.json`
holds every run's figures and the ratio; a run's `seconds` are those of the
process that finished it, so a resumed run shows only its last leg.
"""

import copy
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from coe_jax import config_base, data, flops, run_dir
from coe_jax.config_loading import flag_config, run_command
from coe_jax.data import class_groups
from coe_jax.errors import CoEError, require
from coe_jax.evaluation import plots
from coe_jax.evaluation import run as evaluation_run
from coe_jax.parallel import expert_parallel
from coe_jax.training import train
from coe_jax.training.train_step import TrainState

# The single-network family besides `single` (1x): multiples of CoE's mean FLOPs.
FAMILY = (0.5, 0.7, 1.4, 2.0)
VARIANTS = ("coe", "no_wgm", "no_lgm", "no_vcm", "single", *(f"single_{f:g}x" for f in FAMILY),
            "condconv", "coe_oracle_groups", "ensemble")
# The ceiling: experts on fixed class groups, images sent to their true group.
ORACLE = "coe_oracle_groups"
# What runs without --variants: every variant but the ceiling, which needs an
# image folder with superclasses.
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != ORACLE)
DESCRIPTIONS = {
    "coe": "full CoE: WGM + LGM + VCM, early exit",
    "no_wgm": "without WGM: uniform expert weights (wgm.off_portion_weight=1)",
    "no_lgm": "without LGM: selection trained on random labels (lgm.rule=random)",
    "no_vcm": "without VCM (vcm.enabled=False)",
    "single": "one network of CoE's mean FLOPs, trained alone",
    "condconv": "one CondConv network of CoE's mean FLOPs, trained alone",
    ORACLE: "N experts of single's size, each on a fixed group of superclasses, "
            "images sent to their true group (the ceiling)",
    "ensemble": "N independent experts, probabilities averaged",
}


def flops_factor(variant: str) -> Optional[float]:
  """The multiple of CoE's mean FLOPs a variant is sized to (`single_<f>x`: f); None if unsized."""
  if variant in ("single", "condconv", ORACLE):
    return 1.0
  if variant.startswith("single_") and variant.endswith("x"):
    try:
      factor = float(variant[len("single_"):-1])
    except ValueError:
      return None
    return factor if factor > 0 else None
  return None


def describe(variant: str) -> str:
  factor = flops_factor(variant)
  if variant in DESCRIPTIONS:
    return DESCRIPTIONS[variant]
  return f"one network of {factor:g}x CoE's mean FLOPs, trained alone"


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS and flops_factor(variant) is None:
    raise CoEError(f"variant={variant!r}: expected one of {', '.join(VARIANTS)} "
                   "or single_<f>x (f a positive number)")


def variant_config(config: ml_collections.ConfigDict,
                   variant: str,
                   seed: int,
                   sizing: Optional[flops.Sizing] = None) -> ml_collections.ConfigDict:
  """The config of one variant at one seed; the sized variants need `sizing`
  (multipliers on the expert network, or on its CondConv form for `condconv`)."""
  _check_variant(variant)
  config = copy.deepcopy(config)
  config.seed = seed
  if variant == "no_wgm":
    config.wgm.off_portion_weight = 1.0
    config.train.expert_dispatch = "all"  # Every expert on every image, alike.
  elif variant == "no_lgm":
    config.lgm.rule = config_base.RANDOM_RULE
  elif variant == "no_vcm":
    config.vcm.enabled = False
  elif variant == "ensemble" or flops_factor(variant) is not None:
    # Warm-up alone: every expert weighs every sample by 1 and no selection is
    # learned, so the experts train as independent plain classifiers.
    config.train.stages = ml_collections.ConfigDict({"warmup": 1.0})
    # Plain classifiers: no generalist to copy, no selection to learn.
    config.train.generalist_warmup = False
    config.loss.selection_in_warmup = False
    config.train.expert_dispatch = "all"  # Nothing to route.
    if variant != "ensemble":
      if sizing is None:
        raise CoEError(f"variant={variant!r}: needs the multipliers from full CoE's mean FLOPs")
      config.num_experts = 1
      config.mesh.expert = 1
      config.expert = sizing.apply(_network_of(config, variant))
  return config


def _network_of(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """The network a sized variant scales: the expert's, with CondConv for `condconv`."""
  return flops.condconv_network(config.expert) if variant == "condconv" else config.expert


def variant_sizing(config: ml_collections.ConfigDict, variant: str, num_classes: int,
                   coe_mean_flops: float) -> flops.Sizing:
  """The multipliers of a sized variant, from full CoE's mean FLOPs."""
  return flops.scaled_to_flops(_network_of(config, variant),
                               flops_factor(variant) * coe_mean_flops, config.data.image_size,
                               config.data.channels, num_classes)


def flops_ratio_at_equal_accuracy(family: Sequence[tuple[float, float]], coe_top1: float,
                                  coe_mean_flops: float) -> Optional[float]:
  """FLOPs the single-network family needs to reach CoE's top-1, over CoE's mean FLOPs.

  `family` holds (mean FLOPs, top-1) points; top-1 is interpolated linearly
  in log FLOPs between neighbouring points, and the first crossing counts.
  None when the family never reaches CoE's top-1 (CoE beats every member) or
  starts above it (the ratio would be an extrapolation below the family).
  """
  points = sorted(family)
  if len(points) < 2 or points[0][1] >= coe_top1:
    return None
  for (f0, a0), (f1, a1) in zip(points, points[1:]):
    if a0 < coe_top1 <= a1:
      t = (coe_top1 - a0) / (a1 - a0)
      return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0))) / coe_mean_flops
  return None


def ensemble_top1(trainer: train.Trainer, state: TrainState) -> float:
  """Test top-1 of the mean of the N experts' probabilities."""
  model, config = trainer.model, trainer.config

  @functools.partial(jax.jit, out_shardings=trainer.replicated)
  def hits(variables, batch):
    logits = expert_parallel.run_experts(model,
                                         variables,
                                         batch["image"],
                                         shared_input=True,
                                         expert_loop=config.expert_loop,
                                         mesh=trainer.mesh)  # [N, B, K]
    probs = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=0)  # [B, K]
    correct = (jnp.argmax(probs, axis=-1) == batch["label"]) & batch["mask"]  # [B]
    return jnp.sum(correct), jnp.sum(batch["mask"])

  variables = state.eval_variables()
  correct = total = 0
  for batch in trainer.eval_batches():
    c, t = jax.device_get(hits(variables, batch))
    correct, total = correct + int(c), total + int(t)
  return correct / total


def last_third_gain(variant: str, workdir: str, top1: float, num_steps: int) -> Optional[float]:
  """The top-1 a run gained over the last third of its training: `top1` (its final
  figure) less the periodic evaluation nearest 2/3 of its steps.

  The protocol's regime check: a network that still gains much there is limited
  by its training, not its capacity (under a cosine schedule part of that gain
  is the rate annealing). Needs `train.eval_every_steps` to evaluate within 0.02
  of 2/3 of the steps (a third of them, e.g. 6333 of 19000); None otherwise, and
  for the ensemble, which the periodic evaluation does not score.
  """
  if variant == "ensemble":
    return None
  # A network trained alone is its only expert: its answer is top-1 without the exit.
  key = "eval/top1_no_early_exit" if flops_factor(variant) is not None else "eval/top1"
  evaluations = [(line["step"], line[key]) for line in run_dir.read_metrics(workdir) if key in line]
  near = [(abs(step / num_steps - 2 / 3), top1_then)
          for step, top1_then in evaluations
          if abs(step / num_steps - 2 / 3) <= 0.02]
  return top1 - min(near)[1] if near else None


def results_row(variant: str, results: dict[str, Any]) -> dict[str, Any]:
  """One run's figures in the table, from its results.json (not for `ensemble`, whose
  averaged answer is not in it).

  A sized variant is the network alone, its own answer: the delegator it
  trained beside (the objective's, with one expert) is no part of it. A CoE
  variant answers at its calibrated tau.
  """
  if flops_factor(variant) is not None:
    return dict(top1=results["expert_top1"][0],
                mean_flops=results["expert_flops"],
                early_exit_rate=None,
                top1_no_early_exit=None)
  return {k: results[k] for k in ("top1", "mean_flops", "early_exit_rate", "top1_no_early_exit")}


def run_variant(config: ml_collections.ConfigDict, variant: str, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) one variant's run and returns its row figures.

  A finished run's figures are read back from `workdir/ablation_run.json`.

  Raises:
    CoEError: when `workdir` holds a run of another config, or training was
      stopped (SIGTERM) before the end.
  """
  saved_config = epath.Path(workdir) / run_dir.CONFIG
  if saved_config.exists() and config_base.upgrade(run_dir.read_json(
      str(saved_config))) != (json.loads(config.to_json())):
    raise CoEError(f"workdir={workdir!r}: holds a run of another config (other overrides?); "
                   "use a new --workdir")
  run_file = epath.Path(workdir) / run_dir.ABLATION_RUN
  if run_file.exists():
    row = run_dir.read_json(str(run_file))
    if "last_third_gain" not in row:  # A run finished before ablate reported it.
      row["last_third_gain"] = last_third_gain(variant, workdir, row["top1"],
                                               config.train.num_steps)
    return row
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  started = time.time()
  trainer = train.Trainer(config, workdir)
  state = train.train(trainer)
  if state is None:
    raise CoEError(f"workdir={workdir!r}: training stopped early; run the same command again "
                   "to resume")
  results = evaluation_run.evaluate(trainer, state)
  if variant == "ensemble":
    row = dict(top1=ensemble_top1(trainer, state),
               mean_flops=config.num_experts * results["expert_flops"],
               early_exit_rate=None,
               top1_no_early_exit=None)
  else:
    row = results_row(variant, results)
  row.update(expert_flops=results["expert_flops"],
             seconds=time.time() - started,
             last_third_gain=last_third_gain(variant, workdir, row["top1"], config.train.num_steps))
  run_dir.write_json(str(run_file), row)
  return row


def _steps_scaled(config: ml_collections.ConfigDict, fraction: float) -> None:
  """Every step count of `config.train` times `fraction` (at least 1): the same
  epochs and schedule on `fraction` of the images."""
  for key in ("num_steps", "warmup_steps", "checkpoint_every_steps", "log_every_steps",
              "eval_every_steps"):
    if config.train[key]:
      config.train[key] = max(1, round(config.train[key] * fraction))


def _image_count(folder: str) -> int:
  split = os.path.join(folder, "train")
  return sum(len(os.listdir(os.path.join(split, c))) for c in os.listdir(split))


def run_oracle_groups(config: ml_collections.ConfigDict, seed: int, sizing: flops.Sizing,
                      workdir: str) -> dict[str, Any]:
  """The ceiling (`coe_oracle_groups`): one expert per class group, each image answered
  by its group's; returns its row, with `router_top1` and each group's `group_top1`.

  Runs go in `workdir/group<j>` and `workdir/router`, over the folders
  `coe_jax.data.class_groups` writes in `workdir/folders`; as with every
  variant, the same command resumes or reuses them.
  """
  run_file = epath.Path(workdir) / run_dir.ABLATION_RUN
  if run_file.exists():
    return run_dir.read_json(str(run_file))
  require(config.data.name == "image_folder", "data.name", config.data.name,
          f"{ORACLE} groups an image folder's classes by its {class_groups.COARSE}")
  started = time.time()
  folders = class_groups.write_group_folders(config.data.path, config.num_experts,
                                             os.path.join(workdir, "folders"))
  total = _image_count(config.data.path)
  groups, tested = [], []
  for j in range(config.num_experts):
    group = variant_config(config, "single", seed, sizing)
    group.data.path, group.data.num_classes = folders[f"group{j}"], None
    _steps_scaled(group, _image_count(folders[f"group{j}"]) / total)
    group_dir = os.path.join(workdir, f"group{j}")
    groups.append(run_variant(group, "single", group_dir))
    tested.append(run_dir.read_json(os.path.join(group_dir, run_dir.RESULTS))["num_test_examples"])
  router = variant_config(config, "single", seed, flops.Sizing(1.0, 0, 0.0))
  router.expert = config.delegator.copy_and_resolve_references()
  router.data.path, router.data.num_classes = folders["router"], None
  routed = run_variant(router, "single", os.path.join(workdir, "router"))
  row = dict(top1=sum(g["top1"] * n for g, n in zip(groups, tested)) / sum(tested),
             mean_flops=_mean([g["mean_flops"] for g in groups]),
             early_exit_rate=None,
             top1_no_early_exit=None,
             group_top1=[g["top1"] for g in groups],
             router_top1=routed["top1"],
             expert_flops=_mean([g["expert_flops"] for g in groups]),
             seconds=time.time() - started,
             last_third_gain=None)
  run_dir.write_json(str(run_file), row)
  return row


# Resamples of the test images behind each paired interval.
BOOTSTRAP_SAMPLES = 10_000
# What CoE is compared with image by image (`paired_differences`).
PAIRED_AGAINST = ("single", "condconv")


def paired_bootstrap(a: np.ndarray,
                     b: np.ndarray,
                     samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> dict[str, float]:
  """top-1(a) - top-1(b) on the same test images, with a 95% percentile interval.

  `a`, `b`: bool [S, T], each of S paired runs (seed k against seed k) right
  or wrong on each of the T images. The difference is the mean over the
  pairs; each resample draws T images with replacement, the same images for
  every pair, so the interval carries the test set's sampling error and the
  pairs' agreement on the hard images.
  """
  per_image = (a.astype(np.float64) - b).mean(0)  # [T]
  rng = np.random.default_rng(seed)
  means = np.concatenate([  # In chunks: [1000, T] indices at a time.
      per_image[rng.integers(0, len(per_image),
                             (min(1000, samples - start), len(per_image)))].mean(1)
      for start in range(0, samples, 1000)
  ])
  low, high = np.percentile(means, [2.5, 97.5])
  return dict(difference=float(per_image.mean()), low=float(low), high=float(high))


def _correct(workdir: str, variant: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(labels, right or wrong) of a run's answers on each test image; None without them."""
  path = os.path.join(workdir, run_dir.PREDICTIONS)
  if not epath.Path(path).exists():
    return None
  p = run_dir.read_predictions(path)
  # A sized variant is its network alone (`results_row`), CoE its answer at tau.
  answer = p["experts"][0] if flops_factor(variant) is not None else p["coe"]
  return p["labels"], answer == p["labels"]


def paired_differences(workdir: str, seeds: dict[str, int]) -> dict[str, dict[str, Any]]:
  """`coe` minus each of PAIRED_AGAINST, image by image: each seed pair and all
  pairs pooled (`paired_bootstrap`), where both runs wrote their predictions
  on the same test images."""
  out = {}
  for other in PAIRED_AGAINST:
    pairs = []
    for k in range(min(seeds.get("coe", 0), seeds.get(other, 0))):
      mine = _correct(os.path.join(workdir, "coe", f"seed{k}"), "coe")
      theirs = _correct(os.path.join(workdir, other, f"seed{k}"), other)
      if mine is None or theirs is None or not np.array_equal(mine[0], theirs[0]):
        continue
      pairs.append((k, mine[1], theirs[1]))
    if not pairs:
      continue
    figures = {f"seed{k}": paired_bootstrap(a[None], b[None]) for k, a, b in pairs}
    if len(pairs) > 1:
      figures["pooled"] = paired_bootstrap(np.stack([a for _, a, _ in pairs]),
                                           np.stack([b for _, _, b in pairs]))
    out[f"coe - {other}"] = figures
  return out


def mean_sd(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
  """A table cell: "mean ± sample sd" of the scaled values, the value alone for one."""
  values = [scale * v for v in values]
  mean = sum(values) / len(values)
  if len(values) == 1:
    return f"{mean:.{digits}f}"
  sd = math.sqrt(sum((v - mean)**2 for v in values) / (len(values) - 1))
  return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def format_table(rows: Sequence[dict[str, Any]],
                 sizings: dict[str, flops.Sizing],
                 ratio: Optional[float],
                 command: str,
                 paired: Optional[dict[str, dict[str, Any]]] = None) -> str:
  """The Markdown report: the command, the table, how the sized variants were sized and
  `flops_ratio_at_equal_accuracy`."""
  lines = [
      "# CoE ablations", "", f"Command: `{command}`", "",
      "Top-1 on the test split, mean ± sample sd over each row's seeds, then each seed. "
      "Mean FLOPs are multiply-adds per image, averaged over the test split (CoE variants at "
      "their calibrated tau).", "",
      "| variant | what | top-1 (%) | per seed (%) | top-1, no early exit (%) | "
      "mean FLOPs (M) | early exits (%) |", "|---|---|---|---|---|---|---|"
  ]
  regime = any(r.get("last_third_gain") is not None for row in rows for r in row["runs"])
  if regime:
    lines[-2] += " last third (pts) |"
    lines[-1] += "---|"
    lines.insert(
        -2, "`last third`: top-1 gained over the last third of training (the "
        "regime check; under 0.5 points where capacity, not training, limits).")
    lines.insert(-2, "")
  for row in rows:
    runs = row["runs"]
    per_seed = ", ".join(f"{100 * r['top1']:.2f}" for r in runs)
    coe = runs[0]["early_exit_rate"] is not None
    no_exit = mean_sd([r["top1_no_early_exit"] for r in runs]) if coe else "—"
    exits = mean_sd([r["early_exit_rate"] for r in runs], digits=1) if coe else "—"
    mean_flops = mean_sd([r["mean_flops"] for r in runs], scale=1e-6, digits=3)
    lines.append(f"| {row['name']} | {describe(row['name'])} | "
                 f"{mean_sd([r['top1'] for r in runs])} | {per_seed} | {no_exit} | "
                 f"{mean_flops} | {exits} |" + (f" {_last_third(runs)} |" if regime else ""))
  if sizings:
    lines.append("")
  for variant, sizing in sizings.items():
    lines.append(
        f"`{variant}` is the {'CondConv ' if variant == 'condconv' else ''}expert "
        f"network at width x{sizing.width_multiplier:g}: {sizing.flops / 1e6:.4f}M multiply-adds, "
        f"{100 * (sizing.flops / sizing.target - 1):+.1f}% from its target of "
        f"{sizing.target / 1e6:.4f}M.")
  for row in rows:
    if row["name"] == ORACLE:
      runs = row["runs"]
      per_group = zip(*(r["group_top1"] for r in runs))
      lines += [
          "", f"`{ORACLE}`: each group's expert on its group's test images "
          f"{', '.join(mean_sd(g) for g in per_group)} %; the delegator's network "
          f"predicts the group at {mean_sd([r['router_top1'] for r in runs])} %."
      ]
  for comparison, figures in (paired or {}).items():
    cells = [
        f"{which} {100 * f['difference']:+.2f} [{100 * f['low']:+.2f}, {100 * f['high']:+.2f}]"
        for which, f in figures.items()
    ]
    lines += [
        "", f"{comparison} (top-1 points, paired bootstrap 95% interval over the test "
        f"images): {'; '.join(cells)}"
    ]
  if any(_is_family(row["name"]) for row in rows):
    lines += [
        "", "`flops_ratio_at_equal_accuracy` (FLOPs the single-network family needs to "
        "reach CoE's top-1, over CoE's mean FLOPs): " +
        (f"{ratio:.2f}" if ratio is not None else
         "not reached within the family (CoE's top-1 lies outside its range)")
    ]
  return "\n".join(lines) + "\n"


def _last_third(runs: Sequence[dict[str, Any]]) -> str:
  gains = [r.get("last_third_gain") for r in runs]
  return "—" if None in gains else mean_sd(gains)


def _is_family(variant: str) -> bool:
  return variant not in ("condconv", ORACLE) and flops_factor(variant) is not None


def _mean(values: Sequence[float]) -> float:
  return sum(values) / len(values)


def parse_variants(entries: Sequence[str],
                   seeds: int,
                   reference_flops: Optional[float] = None) -> dict[str, int]:
  """`name` or `name:k` entries -> {variant: seeds}, in the order VARIANTS lists them.

  `name:k` runs k seeds of that variant, `name` `seeds` of them: e.g. two seeds
  of `coe` and `single` and one of the rest of the family. The sized variants
  need full CoE's mean FLOPs, so `coe` runs with them (`seeds` of it unless given),
  unless `reference_flops` gives the cost they are sized to.
  """
  if not isinstance(seeds, int) or seeds < 1:
    raise CoEError(f"seeds={seeds!r}: expected a positive integer")
  if not entries:
    raise CoEError("variants='': expected some of " + ", ".join(VARIANTS))
  wanted = {}
  for entry in entries:
    name, sep, count = entry.partition(":")
    try:
      _check_variant(name)
      if sep and (not count.isdigit() or int(count) < 1):
        raise CoEError(entry)
    except CoEError:
      raise CoEError(f"variants={','.join(entries)!r}: expected some of {', '.join(VARIANTS)} "
                     "or single_<f>x, each with an optional :SEEDS") from None
    wanted[name] = int(count) if sep else seeds
  if reference_flops is None and any(flops_factor(v) is not None for v in wanted):
    wanted.setdefault("coe", seeds)
  order = [v for v in VARIANTS if v in wanted] + [v for v in wanted if v not in VARIANTS]
  return {v: wanted[v] for v in order}


def run_ablation(config: ml_collections.ConfigDict,
                 workdir: str,
                 seeds: int,
                 variants: Sequence[str] = DEFAULT_VARIANTS,
                 command: str = "",
                 reference_flops: Optional[float] = None) -> str:
  """Runs the variants over their seeds and writes the table, JSON and plot; returns the table.

  `variants` entries are names or `name:seeds` (`parse_variants`). The sized
  variants are sized to the mean FLOPs of every `coe` seed run, or to
  `reference_flops` when given (a regime probe of the single networks alone,
  before any CoE run).
  """
  if reference_flops is not None:
    require(reference_flops > 0, "reference_flops", reference_flops,
            "expected a positive number of multiply-adds")
  plan = parse_variants(list(variants), seeds, reference_flops)
  jobs, done = sum(plan.values()), 0
  rows, sizings = [], {}
  num_classes = None
  for variant, variant_seeds in plan.items():
    sizing = None
    if flops_factor(variant) is not None:
      num_classes = num_classes or data.get_info(config).num_classes
      reference = reference_flops or _mean([r["mean_flops"] for r in rows[0]["runs"]])
      sizing = sizings[variant] = variant_sizing(config, variant, num_classes, reference)
    runs = []
    for s in range(variant_seeds):
      done += 1
      variant_dir = os.path.join(workdir, variant, f"seed{s}")
      print(f"[{done}/{jobs}] {variant}, seed {config.seed + s}: {variant_dir}", flush=True)
      if variant == ORACLE:
        run = run_oracle_groups(config, config.seed + s, sizing, variant_dir)
      else:
        run = run_variant(variant_config(config, variant, config.seed + s, sizing), variant,
                          variant_dir)
      exits = (f", early exits {100 * run['early_exit_rate']:.1f}%"
               if run["early_exit_rate"] is not None else "")
      print(
          f"    top-1 {100 * run['top1']:.2f}%, mean FLOPs {run['mean_flops'] / 1e6:.4f}M"
          f"{exits} ({run['seconds']:.0f} s in the process that finished it)",
          flush=True)
      runs.append(run)
    rows.append({"name": variant, "runs": runs})

  summary = [{
      "name": row["name"],
      "top1": _mean([r["top1"] for r in row["runs"]]),
      "mean_flops": _mean([r["mean_flops"] for r in row["runs"]])
  } for row in rows]
  family = [(r["mean_flops"], r["top1"]) for r in summary if _is_family(r["name"])]
  ratio = None
  if family and rows[0]["name"] == "coe":
    ratio = flops_ratio_at_equal_accuracy(family, summary[0]["top1"], summary[0]["mean_flops"])
  seeds_of = {row["name"]: len(row["runs"]) for row in rows}
  paired = paired_differences(workdir, seeds_of)
  table = format_table(rows, sizings, ratio, command, paired)
  epath.Path(workdir, run_dir.ABLATION_TABLE).write_text(table)
  run_dir.write_json(
      os.path.join(workdir, run_dir.ABLATION), {
          "command": command,
          "seeds": {
              row["name"]: len(row["runs"]) for row in rows
          },
          "flops_ratio_at_equal_accuracy": ratio,
          "paired": paired,
          "rows": rows,
          "sizings": {
              k: dataclasses.asdict(v) for k, v in sizings.items()
          }
      })
  curve_path = os.path.join(workdir, "coe", "seed0", run_dir.CURVE)
  curve = run_dir.read_json(curve_path) if epath.Path(curve_path).exists() else None
  plot_rows = [{
      "name": row["name"],
      "top1": [r["top1"] for r in row["runs"]],
      "mean_flops": _mean([r["mean_flops"] for r in row["runs"]]),
      "family": _is_family(row["name"])
  } for row in rows]
  plots.ablation(plot_rows, os.path.join(workdir, run_dir.ABLATION_PLOT), curve=curve)
  return table


def main(argv):
  """Bad input ends in one `error:` line (`config_loading.run_command`)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = flag_config(_CONFIG)
  train.use_compilation_cache(config, _WORKDIR.value)
  command = " ".join(["python -m coe_jax.ablate", *sys.argv[1:]])
  table = run_ablation(config, _WORKDIR.value, _SEEDS.value, _VARIANTS.value, command,
                       _REFERENCE_FLOPS.value)
  print("\n" + table, flush=True)
  print(
      f"table: {_WORKDIR.value}/{run_dir.ABLATION_TABLE}\n"
      f"plot:  {_WORKDIR.value}/{run_dir.ABLATION_PLOT}",
      flush=True)


if __name__ == "__main__":
  # Defined here, not at import, so other entry points can import this module.
  _CONFIG = config_flags.DEFINE_config_file("config",
                                            None,
                                            "Path to a config file.",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the ablation's runs and report.")
  _SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per variant: seed, seed + 1, ...")
  _VARIANTS = flags.DEFINE_list(
      "variants", list(DEFAULT_VARIANTS),
      "Variants to run, each NAME or NAME:SEEDS (coe runs too when a sized variant does; "
      f"{ORACLE} only when named).")
  _REFERENCE_FLOPS = flags.DEFINE_float(
      "reference_flops", None, "Size the single_<f>x and condconv variants to f times this "
      "many multiply-adds instead of the coe runs' mean (coe need not run).")
  flags.mark_flags_as_required(["config", "workdir"])
  run_command(main)

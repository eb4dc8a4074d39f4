"""PNG plots: an evaluation's curves and routing, and the ablation's comparison.

Axis letters: K classes, N experts, A example images per expert, H/W/C image
height, width and channels (docs/method.md, section 2).
"""

import io
from typing import Any, Optional, Sequence

import numpy as np
from etils import epath

# Figures are built without pyplot: no display or global backend is needed
# (servers, CI, pods), and a notebook importing this keeps its inline plots.
from matplotlib.figure import Figure

from coe_jax.evaluation import Routing, Sweep

GRID_EXAMPLES = 8  # Test images per expert in the routing grid.
LABELLED_CLASSES = 30  # Up to this many, the class-by-expert plot names classes and shows counts.


def accuracy_vs_flops(curve: Sweep, results: dict[str, Any], path: str) -> str:
  """CoE's accuracy as tau sweeps, with each expert alone and the delegator alone marked."""
  fig, ax = _figure(figsize=(6.4, 4.4), dpi=120)
  mflops = lambda x: x / 1e6
  ax.plot(mflops(curve.mean_flops),
          100 * curve.accuracy,
          "-",
          color="tab:blue",
          label="CoE, threshold sweep")
  ax.plot(mflops(results["mean_flops"]),
          100 * results["top1"],
          "*",
          ms=14,
          color="tab:red",
          label=f"CoE at tau={results['threshold']:.3g}")
  ax.plot(mflops(results["delegator_flops"]),
          100 * results["delegator_top1"],
          "s",
          color="tab:gray",
          label="delegator alone")
  expert_x = [mflops(results["expert_flops"])] * len(results["expert_top1"])
  ax.plot(expert_x, [100 * a for a in results["expert_top1"]],
          "o",
          color="tab:green",
          label="each expert alone")
  ax.set_xlabel("mean multiply-adds per image (M)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("Accuracy vs cost as the early-exit threshold sweeps")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  return _save(fig, path)


def expert_load(results: dict[str, Any], path: str) -> str:
  """Share of the routed (not exited) test examples each expert answers."""
  load = results["expert_load"]
  fig, ax = _figure(figsize=(5.2, 3.6), dpi=120)
  ax.bar(range(len(load)), [100 * x for x in load], color="tab:green")
  ax.axhline(100 / len(load), color="tab:gray", ls="--", lw=1, label="balanced")
  ax.set_xticks(range(len(load)))
  ax.set_xlabel("expert")
  ax.set_ylabel("routed examples (%)")
  ax.set_title(f"Expert load (early exits: {100 * results['early_exit_rate']:.1f}%)")
  ax.legend(fontsize=8)
  return _save(fig, path)


def expert_portions(results: dict[str, Any], path: str) -> str:
  """On each expert's portion (the test examples the delegator selects it for), its
  top-1 against the other experts': a taller first bar means the delegator picks the
  expert that knows those examples. The expert on the other examples, for reference."""
  bars = (("expert_top1_own_portion", "the selected expert",
           "tab:green"), ("other_experts_top1_on_portion", "the other experts (mean)", "tab:gray"),
          ("expert_top1_off_portion", "the selected expert, on the other examples", "tab:olive"))
  positions = np.arange(len(results[bars[0][0]]))
  fig, ax = _figure(figsize=(6.4, 4.4), dpi=120)
  for i, (key, label, color) in enumerate(bars):
    values = [np.nan if v is None else 100 * v for v in results[key]]
    ax.bar(positions + (i - 1) * 0.27, values, width=0.27, color=color, label=label)
  ax.set_xticks(positions)
  ax.set_xlabel("portion of expert")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("Is the selected expert the one that knows its examples?", fontsize=10)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
  return _save(fig, path)


def early_exit_curve(curve: Sweep, results: dict[str, Any], path: str) -> str:
  """Accuracy and mean FLOPs as functions of tau, with the chosen tau marked."""
  fig, ax = _figure(figsize=(6.4, 4.2), dpi=120)
  # The figures at thresholds[i] hold for tau in (thresholds[i-1], thresholds[i]]
  # (steps-pre); the first also for any lower tau, the last for any higher one.
  tau = np.concatenate([[0.0], curve.thresholds, [max(1.0, curve.thresholds[-1])]])
  extend = lambda y: np.concatenate([y[:1], y, y[-1:]])
  accuracy, = ax.plot(tau,
                      100 * extend(curve.accuracy),
                      drawstyle="steps-pre",
                      color="tab:blue",
                      label="top-1 accuracy")
  ax.set_xlabel("early-exit threshold tau (delegator's max class probability)")
  ax.set_ylabel("top-1 accuracy (%)", color="tab:blue")
  right = ax.twinx()
  cost, = right.plot(tau,
                     extend(curve.mean_flops) / 1e6,
                     drawstyle="steps-pre",
                     color="tab:orange",
                     label="mean multiply-adds")
  right.set_ylabel("mean multiply-adds per image (M)", color="tab:orange")
  chosen = ax.axvline(results["threshold"],
                      ls="--",
                      lw=1,
                      color="tab:red",
                      label=f"chosen tau={results['threshold']:.3g}")
  ax.set_title(
      f"Early exit: {100 * results['early_exit_rate']:.1f}% of test images exit at "
      f"the chosen tau",
      fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(handles=[accuracy, cost, chosen], loc="center left", fontsize=8)
  return _save(fig, path)


def routing_grid(routing: Routing, class_names: Sequence[str], path: str) -> str:
  """One row per expert: the first test images it answered, titled with their true class."""
  num_experts = len(routing.examples)
  columns = max(1, max(len(x) for x in routing.examples))
  fig, axes = _figure(num_experts,
                      columns,
                      dpi=120,
                      squeeze=False,
                      figsize=(0.95 * columns + 1.2, 1.05 * num_experts + 0.6))
  routed = routing.class_by_expert.sum(axis=0)  # [N]
  for j in range(num_experts):
    for e, ax in enumerate(axes[j]):
      ax.set_xticks([])
      ax.set_yticks([])
      if e == 0:
        ax.set_ylabel(f"expert {j}\n{routed[j]} images", fontsize=8)
      if e >= len(routing.examples[j]):
        for spine in ax.spines.values():
          spine.set_visible(False)
        if e == 0:
          ax.text(0.5, 0.5, "no test images", ha="center", va="center", fontsize=8)
        continue
      image = routing.examples[j][e]  # [H, W, C]
      grey = image.shape[-1] == 1
      ax.imshow(image[..., 0] if grey else image,
                cmap="gray" if grey else None,
                interpolation="nearest")
      ax.set_title(str(class_names[routing.example_labels[j][e]]), fontsize=7, pad=2)
  fig.suptitle(
      f"Test images each expert answers (first {columns}; titles: true class); "
      f"{routing.delegator_by_class.sum()} answered by the delegator",
      fontsize=9)
  return _save(fig, path)


def class_by_expert(routing: Routing, class_names: Sequence[str], path: str) -> str:
  """Classes x (experts + delegator): who answers each class's test images.

  The delegator's column counts its early exits (and, in serving mode, the
  samples that found every expert full). Colour is the share of the class's
  images, so specialisation shows as one dark cell per row. With more than
  `LABELLED_CLASSES` classes the rows are sorted by their main expert and
  left unlabelled.
  """
  counts = np.concatenate([routing.class_by_expert, routing.delegator_by_class[:, None]],
                          axis=1)  # [K, N + 1]
  share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # [K, N + 1]
  num_classes, columns = counts.shape
  labelled = num_classes <= LABELLED_CLASSES
  rows = np.arange(num_classes) if labelled else np.lexsort((-share.max(1), share.argmax(1)))
  height = 1.6 + (0.3 * num_classes if labelled else 6.0)
  fig, ax = _figure(figsize=(max(4.8, 1.6 + 0.7 * columns), height), dpi=120)
  image = ax.imshow(share[rows],
                    cmap="Blues",
                    vmin=0,
                    vmax=1,
                    aspect="auto",
                    interpolation="nearest")
  ax.axvline(columns - 1.5, color="white", lw=3)  # Sets the delegator apart from the experts.
  ax.set_xticks(range(columns))
  ax.set_xticklabels([str(j) for j in range(columns - 1)] + ["delegator"], fontsize=8)
  ax.set_xlabel("answered by expert")
  if labelled:
    ax.set_yticks(range(num_classes))
    ax.set_yticklabels([str(class_names[k]) for k in rows], fontsize=8)
    for k in range(num_classes):
      for j in range(columns):
        ax.text(j,
                k,
                str(counts[rows[k], j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share[rows[k], j] > 0.6 else "black")
  else:
    ax.set_yticks([])
  ax.set_ylabel("true class" if labelled else f"{num_classes} classes, sorted by main expert")
  fig.colorbar(image, ax=ax, fraction=0.08, label="share of the class's test images")
  ax.set_title("Who answers each class\n(numbers: test images)", fontsize=10)
  return _save(fig, path)


def ablation(rows: Sequence[dict[str, Any]],
             path: str,
             curve: Optional[dict[str, Sequence[float]]] = None) -> str:
  """Each variant's top-1 (mean, and min-max over seeds) against its mean FLOPs.

  Args:
    rows: dicts with `name`, `mean_flops`, `top1` (per-seed list) and optionally
      `family` (True for the single-network family, whose points are joined).
    path: where to write the PNG.
    curve: full CoE's early-exit curve of one seed (`early_exit_curve.json`), drawn for context.
  """
  fig, ax = _figure(figsize=(7.0, 4.6), dpi=120)
  if curve is not None:
    ax.plot(np.asarray(curve["mean_flops"]) / 1e6,
            100 * np.asarray(curve["accuracy"]),
            drawstyle="steps-pre",
            color="tab:blue",
            alpha=0.35,
            label="coe, tau sweep (first seed)")
  family = sorted(
      (row["mean_flops"], 100 * np.mean(row["top1"])) for row in rows if row.get("family"))
  if len(family) > 1:
    ax.plot(*zip(*[(f / 1e6, a) for f, a in family]),
            "-",
            color="tab:gray",
            alpha=0.6,
            label="single-network family")
  markers = "*osD^vP<>hX"
  for i, row in enumerate(rows):
    top1 = 100 * np.asarray(row["top1"])
    low, high = top1.mean() - top1.min(), top1.max() - top1.mean()
    ax.errorbar(row["mean_flops"] / 1e6,
                top1.mean(),
                yerr=[[low], [high]],
                capsize=3,
                fmt=markers[i % len(markers)],
                ms=12 if i == 0 else 7,
                label=row["name"])
  ax.set_xscale("log")
  ax.set_xlabel("mean multiply-adds per image (M, log scale)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("Ablations: accuracy vs cost (bars: min-max over seeds)", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8, loc="best")
  return _save(fig, path)


def _figure(*grid: int, figsize: tuple[float, float], dpi: int, squeeze: bool = True):
  """A new figure and its axes, as `pyplot.subplots` makes them."""
  fig = Figure(figsize=figsize, dpi=dpi)
  return fig, fig.subplots(*grid, squeeze=squeeze)


def _save(fig: Figure, path: str) -> str:
  """Saves as PNG to a local or remote (gs://) path."""
  buffer = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buffer, format="png")
  epath.Path(path).write_bytes(buffer.getvalue())
  return path

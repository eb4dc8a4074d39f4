"""PNG plots of an evaluation: the accuracy-vs-FLOPs curve and the expert load."""

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Files only; no display is needed (servers, CI, pods).
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from etils import epath

from coe_jax.evaluation import Sweep


def accuracy_vs_flops(curve: Sweep, results: dict[str, Any], path: str) -> str:
  """CoE's accuracy as tau sweeps, with each expert alone and the delegator alone marked."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  mflops = lambda x: x / 1e6
  ax.plot(mflops(curve.mean_flops), 100 * curve.accuracy, "-", color="tab:blue",
          label="CoE, threshold sweep")
  ax.plot(mflops(results["mean_flops"]), 100 * results["top1"], "*", ms=14, color="tab:red",
          label=f"CoE at tau={results['threshold']:.3g}")
  ax.plot(mflops(results["delegator_flops"]), 100 * results["delegator_top1"], "s",
          color="tab:gray", label="delegator alone")
  expert_x = [mflops(results["expert_flops"])] * len(results["expert_top1"])
  ax.plot(expert_x, [100 * a for a in results["expert_top1"]], "o", color="tab:green",
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
  fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
  ax.bar(range(len(load)), [100 * x for x in load], color="tab:green")
  ax.axhline(100 / len(load), color="tab:gray", ls="--", lw=1, label="balanced")
  ax.set_xticks(range(len(load)))
  ax.set_xlabel("expert")
  ax.set_ylabel("routed examples (%)")
  ax.set_title(f"Expert load (early exits: {100 * results['early_exit_rate']:.1f}%)")
  ax.legend(fontsize=8)
  return _save(fig, path)


def _save(fig, path: str) -> str:
  """Saves as PNG to a local or remote (gs://) path."""
  buffer = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buffer, format="png")
  plt.close(fig)
  epath.Path(path).write_bytes(buffer.getvalue())
  return path

"""A short, human-readable table of a run's results."""

from typing import Any, Optional

from coe_jax import run_dir


def _percent(value: Optional[float]) -> str:
  return "-" if value is None else f"{100 * value:.1f}"


def format_results(results: dict[str, Any], workdir: str) -> str:
  if "threshold" not in results:  # A single network (`evaluation.single_network_figures`).
    return _format_single_network(results, workdir)
  experts = ", ".join(f"{100 * a:.1f}" for a in results["expert_top1"])
  portions = ", ".join(f"{_percent(own)} / {_percent(others)}" for own, others in zip(
      results["expert_top1_own_portion"], results["other_experts_top1_on_portion"]))
  load = ", ".join(f"{100 * x:.0f}%" for x in results["expert_load"])
  rows = [
      ("CoE top-1", f"{100 * results['top1']:.2f}%  (tau={results['threshold']:.4g}, "
       f"{results['threshold_rule']})"),
      ("CoE top-1, no early exit", f"{100 * results['top1_no_early_exit']:.2f}%"),
      ("delegator alone", f"{100 * results['delegator_top1']:.2f}%"),
      ("each expert alone", f"{experts} %"),
      ("on each expert's portion: it / others", f"{portions} %"),
      ("early exits", f"{100 * results['early_exit_rate']:.1f}%"),
      ("mean FLOPs (multiply-adds)", f"{results['mean_flops'] / 1e6:.3f}M  (delegator "
       f"{results['delegator_flops'] / 1e6:.3f}M + expert "
       f"{results['expert_flops'] / 1e6:.3f}M)"),
      ("expert load (routed samples)", load),
      ("test examples", str(results["num_test_examples"])),
  ]
  width = max(len(name) for name, _ in rows)
  lines = [f"  {name:<{width}}  {value}" for name, value in rows]
  lines += [
      "", f"  results: {workdir}/{run_dir.RESULTS}",
      f"  plots:   {workdir}/{', '.join(run_dir.PLOTS[:3])},",
      f"           {', '.join(run_dir.PLOTS[3:])}", f"  metrics: tensorboard --logdir={workdir}"
  ]
  return "\n".join(["", "CoE results", *lines, ""])


def _format_single_network(results: dict[str, Any], workdir: str) -> str:
  rows = [
      ("top-1", f"{100 * results['top1']:.2f}%"),
      ("FLOPs (multiply-adds)", f"{results['mean_flops'] / 1e6:.3f}M"),
      ("test examples", str(results["num_test_examples"])),
  ]
  width = max(len(name) for name, _ in rows)
  lines = [f"  {name:<{width}}  {value}" for name, value in rows]
  lines += [
      "", f"  results: {workdir}/{run_dir.RESULTS}", f"  metrics: tensorboard --logdir={workdir}"
  ]
  return "\n".join(["", "Single network results", *lines, ""])

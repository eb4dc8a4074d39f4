"""A run's workdir: the name of every file in it, and the atomic writes that make them.

    WORKDIR/
      config.json             CONFIG: the config the run was started with
      run.json                RUN: facts about the data (class names, counts) and FLOPs
      metrics.jsonl           METRICS: one JSON object of scalars per logged step
      checkpoints/<step>/     CHECKPOINTS: orbax checkpoints, the newest few kept
      unreadable_checkpoints/<step>/   UNREADABLE_CHECKPOINTS: found unreadable, set aside
      compilation_cache/      COMPILATION_CACHE: compiled programs, found again on resume
      results.json            RESULTS: the final evaluation, with the calibrated tau
      early_exit_curve.json   CURVE: the test split's accuracy and FLOPs at every tau
      test_predictions.npz    PREDICTIONS: each test image's label, CoE's answer at tau
                              and every expert's (paired comparisons of runs)
      accuracy_vs_flops.png   ACCURACY_VS_FLOPS_PLOT: top-1 against mean FLOPs as tau sweeps
      early_exit_curve.png    CURVE_PLOT: top-1 and mean FLOPs against tau
      expert_load.png         EXPERT_LOAD_PLOT: the share of routed test images per expert
      routing_grid.png        ROUTING_GRID_PLOT: test images per expert
      class_by_expert.png     CLASS_BY_EXPERT_PLOT: classes by the expert that answered them
      expert_portions.png     EXPERT_PORTIONS_PLOT: each expert on its portion and off it
                              (PLOTS: these figures of `coe_jax.evaluation.plots`)
      serving/                SERVING: the LiteRT export (`python -m coe_jax.serving.export`)

A run's weights alone (`python -m coe_jax.evaluate --save_weights=DIR`), small
enough to commit, load wherever a workdir does (predictor, exporter,
evaluation, `train.init_from`):

    DIR/
      config.json, run.json, results.json, early_exit_curve.json,
      test_predictions.npz    as above
      variables.msgpack       WEIGHTS: the evaluated parameters and BatchNorm
                              statistics (EMA where trained with it), no optimizer

An ablation's workdir holds one such run per variant and seed
(`<variant>/seed<k>/`, each with its ABLATION_RUN row) beside the figures of
them all (ABLATION: ablation.json), their Markdown table (ABLATION_TABLE:
ablation.md), top-1 against mean FLOPs (ABLATION_PLOT: ablation.png) and the
COMPILATION_CACHE the variants share.

JSON files are written whole or not at all: a killed writer leaves the old
file, never half a new one. Paths may be local or remote (gs://...), through
etils.epath.
"""

import io
import json
import os
from typing import Any

import numpy as np
from etils import epath

CONFIG = "config.json"
RUN = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
UNREADABLE_CHECKPOINTS = "unreadable_checkpoints"
COMPILATION_CACHE = "compilation_cache"
RESULTS = "results.json"
CURVE = "early_exit_curve.json"
PREDICTIONS = "test_predictions.npz"
SERVING = "serving"
ABLATION = "ablation.json"
ABLATION_RUN = "ablation_run.json"
ABLATION_TABLE = "ablation.md"
ABLATION_PLOT = "ablation.png"
WEIGHTS = "variables.msgpack"
ACCURACY_VS_FLOPS_PLOT = "accuracy_vs_flops.png"
CURVE_PLOT = "early_exit_curve.png"
EXPERT_LOAD_PLOT = "expert_load.png"
ROUTING_GRID_PLOT = "routing_grid.png"
CLASS_BY_EXPERT_PLOT = "class_by_expert.png"
EXPERT_PORTIONS_PLOT = "expert_portions.png"
PLOTS = (ACCURACY_VS_FLOPS_PLOT, CURVE_PLOT, EXPERT_LOAD_PLOT, ROUTING_GRID_PLOT,
         CLASS_BY_EXPERT_PLOT, EXPERT_PORTIONS_PLOT)


def is_remote(path: str) -> bool:
  """True for a path with a scheme (gs://bucket/...), which names no local file."""
  return "://" in str(path)


def absolute(path: str) -> str:
  """A local path made absolute; a remote one (gs://...) as it is.

  `os.path.abspath` or `epath.Path.resolve` would read gs://bucket/run as a
  relative path and make it <cwd>/gs:/bucket/run: every host would then keep
  its checkpoints on its own disk.
  """
  return str(path) if is_remote(path) else os.path.abspath(path)


def write_text_atomically(path: str, text: str) -> None:
  """Writes a file atomically: a reader sees the old file or the new one, never half."""
  write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: str, payload: bytes) -> None:
  """`write_text_atomically` for bytes."""
  target = epath.Path(path)
  tmp = target.parent / f"{target.name}.tmp"
  tmp.write_bytes(payload)
  tmp.replace(target)


def write_predictions(path: str, **arrays: np.ndarray) -> None:
  """Writes PREDICTIONS (named integer arrays, npz) atomically."""
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  write_bytes_atomically(path, buffer.getvalue())


def read_predictions(path: str) -> dict[str, np.ndarray]:
  with epath.Path(path).open("rb") as f:
    return dict(np.load(io.BytesIO(f.read())))


def write_json(path: str, payload: Any) -> None:
  """Writes JSON atomically (`write_text_atomically`), keys sorted, indented."""
  write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> Any:
  return json.loads(epath.Path(path).read_text())


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """A run's METRICS lines as dicts, in step order; a line cut short by a kill is skipped."""
  path = epath.Path(workdir) / METRICS
  if not path.exists():
    return []
  lines = []
  for line in path.read_text().splitlines():
    try:
      lines.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return lines

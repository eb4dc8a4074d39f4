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
      *.png                   the figures of `coe_jax.evaluation.plots`
      serving/                SERVING: the LiteRT export (`python -m coe_jax.serving.export`)

A run's weights alone (`python -m coe_jax.evaluate --save_weights=DIR`), small
enough to commit, load wherever a workdir does (predictor, exporter,
evaluation, `train.init_from`):

    DIR/
      config.json, run.json, results.json, early_exit_curve.json   as above
      variables.msgpack       WEIGHTS: the evaluated parameters and BatchNorm
                              statistics (EMA where trained with it), no optimizer

An ablation's workdir holds one such run per variant and seed
(`<variant>/seed<k>/`, each with its ABLATION_RUN row) beside the ABLATION
table of them all.

JSON files are written whole or not at all: a killed writer leaves the old
file, never half a new one. Paths may be local or remote (gs://...), through
etils.epath.
"""

import json
from typing import Any

from etils import epath

CONFIG = "config.json"
RUN = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
UNREADABLE_CHECKPOINTS = "unreadable_checkpoints"
COMPILATION_CACHE = "compilation_cache"
RESULTS = "results.json"
CURVE = "early_exit_curve.json"
SERVING = "serving"
ABLATION = "ablation.json"
ABLATION_RUN = "ablation_run.json"
WEIGHTS = "variables.msgpack"


def write_text_atomically(path: str, text: str) -> None:
  """Writes a file atomically: a reader sees the old file or the new one, never half."""
  target = epath.Path(path)
  tmp = target.parent / f"{target.name}.tmp"
  tmp.write_text(text)
  tmp.replace(target)


def write_json(path: str, payload: Any) -> None:
  """Writes JSON atomically (`write_text_atomically`), keys sorted, indented."""
  write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> Any:
  return json.loads(epath.Path(path).read_text())

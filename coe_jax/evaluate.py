r"""Evaluates a trained run on a folder of images, at the run's calibrated tau.

    python -m coe_jax.evaluate --workdir=RUN --data_path=FOLDER --json=OUT [--step=S]
    python -m coe_jax.evaluate --workdir=RUN --save_weights=DIR

RUN is a training run's workdir, or a weights-only copy of one (results/ holds
some). FOLDER is in the `image_folder` layout; only its `test/<class>/*`
images are read, and its classes must be the run's. OUT gets the keys of
results.json: `top1`, `top1_no_early_exit`, `delegator_top1`, `expert_top1`,
`mean_flops`, `early_exit_rate`, `num_test_examples` and the rest of
`evaluation.summary`. A single-network run (one expert, trained in warm-up
alone, as `coe_jax.ablate`'s `single*` and `condconv` variants) has `top1`
and `mean_flops`, the network's own.

--save_weights writes RUN's evaluated variables (no optimizer state) with its
config.json, run.json and results.json to DIR, a copy small enough to commit
that this command, the predictor, the exporter and `train.init_from` read.

Bad paths, and a folder whose classes differ from the run's, are reported in
one line with exit status 1.
"""

import json
import sys
from typing import Any, Optional, Sequence

import numpy as np

from coe_jax.errors import CoEError, require


def _batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
  """Padded, masked batches of the whole split, as `data.eval_batches` gives them."""
  for start in range(0, len(labels), batch_size):
    real = slice(start, min(start + batch_size, len(labels)))
    pad = batch_size - (real.stop - real.start)
    yield {
        "image": np.pad(images[real], ((0, pad), (0, 0), (0, 0), (0, 0))),
        "label": np.pad(labels[real], (0, pad)),
        "mask": np.arange(batch_size) < batch_size - pad,
    }


def evaluate_run(workdir: str, data_path: str, step: Optional[int] = None) -> dict[str, Any]:
  """The figures of the run in `workdir` on `data_path/test/` at its calibrated tau."""
  # pylint: disable=g-import-not-at-top
  from coe_jax import evaluation, flops, stages
  from coe_jax.data import image_folder
  from coe_jax.models.coe import CoE
  from coe_jax.training import saved_run
  # pylint: enable=g-import-not-at-top
  config, variables, meta = saved_run.load_for_inference(workdir, step)
  images, labels, classes = image_folder.load_test_split(data_path, config.data.image_size,
                                                         config.data.channels)
  require(
      classes == list(meta["class_names"]), "data_path", data_path,
      f"its test/ classes are not the run's: only in the folder "
      f"{sorted(set(classes) - set(meta['class_names']))}, only in the run "
      f"{sorted(set(meta['class_names']) - set(classes))}" if set(classes) != set(
          meta["class_names"]) else "its test/ classes are the run's in another order")
  num_classes = len(classes)
  model = CoE(config, num_classes)
  outputs = evaluation.collect_outputs(model,
                                       variables,
                                       _batches(images, labels, config.eval.batch_size),
                                       expert_loop=config.expert_loop,
                                       progress=evaluation.Progress("evaluating", len(labels)))
  costs = flops.count(config, num_classes)
  f_d, f_e = costs["delegator_flops"], costs["expert_flops"]
  if stages.is_single_network(config):
    return evaluation.single_network_figures(outputs, f_e)
  curve = evaluation.sweep(outputs, f_d, f_e)
  return evaluation.summary(outputs, curve, meta["threshold"], config.num_experts, f_d, f_e)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line (`argv` without the program's name; default `sys.argv[1:]`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  from coe_jax.serving import predict  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The run: a workdir or a weights-only copy.", flag_values=fv)
  flags.DEFINE_string("data_path", None, "A folder with test/<class>/* images.", flag_values=fv)
  flags.DEFINE_string("json", None, "Write the figures to this JSON file.", flag_values=fv)
  flags.DEFINE_integer("step",
                       None,
                       "This checkpoint's step instead of the newest.",
                       flag_values=fv)
  flags.DEFINE_string("save_weights",
                      None,
                      "Write the run's weights-only copy to this folder.",
                      flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)

  def body(rest: list[str]) -> None:
    if rest:
      raise CoEError(f"unexpected arguments: {' '.join(rest)}")
    workdir = fv["workdir"].value
    if fv["save_weights"].value:
      from coe_jax.training import saved_run  # pylint: disable=g-import-not-at-top
      path = saved_run.save_weights(workdir, fv["save_weights"].value, fv["step"].value)
      print(f"weights: {path}")
      return
    require(fv["data_path"].value is not None, "data_path", None,
            "expected a folder with test/<class>/* images (or --save_weights=DIR)")
    results = evaluate_run(workdir, fv["data_path"].value, fv["step"].value)
    if fv["json"].value:
      from coe_jax import run_dir  # pylint: disable=g-import-not-at-top
      run_dir.write_json(fv["json"].value, results)
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, list)}))

  return predict.run_command_line(fv, argv, "python -m coe_jax.evaluate", __doc__, body)


if __name__ == "__main__":
  sys.exit(main())

r"""Exports a trained CoE to LiteRT (TFLite) models for CPU and mobile serving.

    python -m coe_jax.serving.export --workdir=runs/demo --out=runs/demo/serving [--quantize=int8]

SERVE_DIR then holds `delegator.tflite`, one `expert_<j>.tflite` per expert
and `serving.json` (threshold, class names, preprocessing, FLOPs, and each
model's file, SHA-256 and signature, so the runtime can check they belong
together). `coe_jax.serving.litert_predictor.LiteRTPredictor` serves it without JAX or
TensorFlow. The export evaluates the exported models on the test split and
prints their top-1 next to the JAX model's.

Route: `jax2tf.convert` -> TF SavedModel -> `TFLiteConverter.from_saved_model`.
In the pinned versions (jax 0.10.2, tensorflow 2.21) this is the route LiteRT
documents for JAX models and the only one not deprecated:
`TFLiteConverter.experimental_from_jax` is marked deprecated in favour of
exactly this, and jax2tf's graph-op lowering (`enable_xla=False`,
`native_serialization=False`) is gone; what remains serialises StableHLO inside
an `XlaCallModule` op, which the converter legalises to TFLite builtins. The
SavedModel (rather than `from_concrete_functions`) gives each model a named
signature, so the runtime finds its outputs by name, not by position.

Batch: each model has a static input of one image. With a dynamic batch axis
(`polymorphic_shapes="(b, ...)"`) JAX lowers every reshape and broadcast with
shape arithmetic (SHAPE, UNSORTED_SEGMENT_PROD, BROADCAST_TO, ... ops) that
XNNPACK cannot take, and hard-swish is no longer matched, so most of the graph
falls back to the reference kernels, many times slower than the static
model. A static batch of 32 cannot be resized either (the converter bakes the
batch into the squeeze-excitation broadcast) and was slower than looping at
batch 1, so the runtime loops at batch 1 over each expert's group (figures in
benchmarks/README.md).

BatchNorm: the networks are traced in inference mode, in float32, with the
evaluation (EMA) parameters as constants, and the converter folds each
BatchNorm into the kernel and bias of the convolution before it.
`unfolded_batchnorm` checks every exported graph for a per-channel constant
multiply or add applied to a convolution's output, and the export fails if it
finds one. (A CondConv block has no convolution op to fold into; its BatchNorm
stays a multiply-add after the mixed-kernel products, which the check does not
look for.) Ops with several formulations are traced in the one XNNPACK runs
best: convolutions as convolutions (`conv.formulation("conv")`,
`depthwise.formulation("conv")`), one CONV_2D or DEPTHWISE_CONV_2D op each
rather than the CPU training path's matrix and shifted products, and PWLU as
a sum of ramps (`pwlu.formulation("ramps")`), elementwise ops rather than the
gathers of its lookup, which XNNPACK does not run.

int8: full-integer post-training quantisation with the converter's
representative data set: training images (the training pipeline's, so with
its augmentation), every op restricted to int8 kernels. Inputs stay uint8
pixels and outputs float32 logits, so the runtime is the same for both.
XNNPACK runs the whole int8 graph (all but the input's uint8 -> float32 CAST,
as in float32) because of two changes made for int8 only: hard-swish is traced
as products (`mbconv.hard_swish_formulation("products")`), since XNNPACK has no
int8 HARD_SWISH and each one split the graph around a builtin kernel; and
`fit_xnnpack_requantization` raises the output scale of a layer whose output
calibration saw constant (a squeeze-excitation with every ReLU unit dead), which
XNNPACK refused, and with it the whole model. (The runtime still falls back to
LiteRT's builtin kernels for a model XNNPACK rejects; see `coe_jax.serving.litert_predictor`.)
"""

import dataclasses
import os
import sys
import tempfile
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import flags
from ai_edge_litert import schema_py_generated as schema
from jax.experimental import jax2tf

from coe_jax import data, flops, routing, run_dir
from coe_jax.errors import CoEError, require
from coe_jax.models import conv, depthwise, mbconv, pwlu, stacked
from coe_jax.models.coe import CoE
from coe_jax.models.networks import Delegator, Expert
from coe_jax.models.stacked import Variables
from coe_jax.serving import litert_predictor
from coe_jax.serving.predict import run_command_line
from coe_jax.training import saved_run

QUANTIZATIONS = ("float32", "int8")
DELEGATOR_OUTPUTS = ("class_logits", "selection_logits")
EXPERT_OUTPUTS = ("logits",)
_CONVOLUTIONS = ("CONV_2D", "DEPTHWISE_CONV_2D")
# Ops with an int8 weight operand (input 1) and an int32 bias (input 2) whose
# scale is input scale x weight scale.
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# XNNPACK builds int8 weighted ops only for a requantisation scale (input scale
# x weight scale / output scale) below 256; one above fails the whole model.
_XNNPACK_REQUANTIZATION_LIMIT = 256.0
# Ops that requantise an input from that input's own scale when they run, so
# a new scale on it needs no other change. (Not RESHAPE, CONCATENATION and the
# like: the quantiser gave their output their input's scale, which would then differ.)
_READS_ITS_INPUT_SCALE = ("ADD", "SUB", "MUL", "LOGISTIC", "SUM", "MEAN", "QUANTIZE", "DEQUANTIZE")
_OP_NAMES = {
    code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")
}


def convert(fn: Callable[[jax.Array], dict[str, jax.Array]],
            image_shape: Sequence[int],
            calibration: Optional[np.ndarray] = None) -> bytes:
  """A LiteRT flatbuffer of `fn` on one image.

  Args:
    fn: maps uint8 images [1, S, S, C] to a dict of float32 outputs [1, ...];
      its variables must be closed-over concrete arrays, so the converter
      can fold them.
    image_shape: (S, S, C).
    calibration: uint8 [M, S, S, C] training images: quantise to int8,
      calibrated on them; None keeps float32.

  Returns:
    The .tflite model, with one signature `litert_predictor.SIGNATURE` whose input is
    `litert_predictor.INPUT_NAME`.
  """
  # Hard-swish as products in int8 only: in float32 its fused op is one
  # XNNPACK op where products would be three.
  hard_swish = "fused" if calibration is None else "products"
  with conv.formulation("conv"), depthwise.formulation("conv"), pwlu.formulation("ramps"), \
      mbconv.hard_swish_formulation(hard_swish), tempfile.TemporaryDirectory() as saved_model:
    spec = tf.TensorSpec((1, *image_shape), tf.uint8, litert_predictor.INPUT_NAME)
    # A fresh function for each conversion: jax2tf traces through `jax.jit`,
    # whose cache would otherwise hand back a trace of `fn` made under other
    # formulations (a float32 export's fused hard-swish, say).
    fresh = lambda images: fn(images)
    tf_fn = tf.function(jax2tf.convert(fresh, with_gradient=False),
                        autograph=False,
                        input_signature=[spec])
    module = tf.Module()
    module.serve = tf_fn
    tf.saved_model.save(module,
                        saved_model,
                        signatures={litert_predictor.SIGNATURE: tf_fn.get_concrete_function()})
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    if calibration is not None:
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.representative_dataset = lambda: ([image[None]] for image in calibration)
      # Fail on an op without an int8 kernel rather than silently keep it in float.
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
      # The uint8 input is raw pixels, cast to float inside the model; it has
      # no quantisation statistics to give.
      warnings.filterwarnings("ignore", "Statistics for quantized inputs")
      model = converter.convert()
  if calibration is not None:
    model, _ = fit_xnnpack_requantization(model)
  return model


def op_names(model: bytes) -> list[str]:
  """The builtin op of each operator of the model's main graph, in order."""
  flat = schema.Model.GetRootAs(model, 0)
  graph = flat.Subgraphs(0)
  codes = [flat.OperatorCodes(i) for i in range(flat.OperatorCodesLength())]
  # Opcodes above 127 live in BuiltinCode; DeprecatedBuiltinCode saturates at 127.
  code_of = lambda c: max(c.BuiltinCode(), c.DeprecatedBuiltinCode())
  return [
      _OP_NAMES.get(code_of(codes[graph.Operators(i).OpcodeIndex()]), "CUSTOM")
      for i in range(graph.OperatorsLength())
  ]


def fit_xnnpack_requantization(model: bytes) -> tuple[bytes, list[str]]:
  """The int8 model with each output scale that XNNPACK refuses raised to what it takes.

  A layer whose output calibration saw constant (a squeeze-excitation whose
  ReLU units are all dead on the calibration images, as in a barely trained
  network) gets the quantiser's smallest range, +-1e-6, and so an output step
  far finer than one step of its accumulator (input scale x weight scale).
  XNNPACK refuses a requantisation scale of 256 or more, and with it the whole
  model. The output scale becomes (input scale x largest weight scale) / 255:
  its range still covers the calibrated one, with a step below one accumulator
  step. The int32 biases of the weighted layers that read the output are
  rescaled with it, as their scale must stay input scale x weight scale.

  A layer whose output feeds an op that needs its input's scale to stay as
  calibrated (`_READS_ITS_INPUT_SCALE` lists those that do not) is left as is.

  Returns:
    (model, one "FULLY_CONNECTED (op 8): requantisation scale 738 -> 255" per
    layer changed).
  """
  blob = bytearray(model)  # Flatbuffer vectors read from a bytearray are writable views.
  flat = schema.Model.GetRootAs(blob, 0)
  graph = flat.Subgraphs(0)
  names = op_names(model)
  scale = lambda tensor: graph.Tensors(tensor).Quantization().ScaleAsNumpy()
  quantized = lambda tensor: (graph.Tensors(tensor).Quantization() is not None and graph.Tensors(
      tensor).Quantization().ScaleLength() > 0)
  consumers: dict[int, list[tuple[int, int]]] = {}  # tensor -> [(op, input position)]
  for i in range(graph.OperatorsLength()):
    for position, tensor in enumerate(graph.Operators(i).InputsAsNumpy()):
      consumers.setdefault(int(tensor), []).append((i, position))
  buffer_users: dict[int, int] = {}
  for t in range(graph.TensorsLength()):
    buffer_users[graph.Tensors(t).Buffer()] = buffer_users.get(graph.Tensors(t).Buffer(), 0) + 1

  def bias_of(op: int) -> Optional[int]:
    """The weighted op's bias tensor; None if it has none."""
    inputs = graph.Operators(op).InputsAsNumpy()
    return int(inputs[2]) if len(inputs) > 2 and inputs[2] >= 0 else None

  def rescalable(bias: Optional[int]) -> bool:
    """Whether the bias can take new units: absent, or int32 values in a buffer of its own."""
    if bias is None:
      return True
    tensor = graph.Tensors(bias)
    return (tensor.Type() == schema.TensorType.INT32 and quantized(bias) and
            buffer_users[tensor.Buffer()] == 1)

  changed = []
  for i, name in enumerate(names):
    op = graph.Operators(i)
    if name not in _WEIGHTED or not all(quantized(int(t)) for t in op.InputsAsNumpy()[:2]):
      continue
    source, output = int(op.Inputs(0)), int(op.Outputs(0))
    if not quantized(output):
      continue
    step = float(scale(source)[0]) * float(scale(int(op.Inputs(1))).max())  # Accumulator step.
    requantization = step / float(scale(output)[0])
    if requantization < _XNNPACK_REQUANTIZATION_LIMIT:
      continue
    readers = consumers.get(output, [])
    weighted = [c for c, position in readers if names[c] in _WEIGHTED and position == 0]
    others = [c for c, position in readers if c not in weighted]
    biases = [bias_of(c) for c in weighted]
    if not all(names[c] in _READS_ITS_INPUT_SCALE for c in others) or \
        not all(rescalable(b) for b in biases):
      continue
    old_scale, new_scale = float(scale(output)[0]), step / 255
    scale(output)[:] = new_scale
    for bias in biases:
      if bias is None:
        continue
      # The same bias values in the new units: stored / (new / old), rounded.
      values = flat.Buffers(graph.Tensors(bias).Buffer()).DataAsNumpy().view("<i4")
      values[:] = np.round(values * (old_scale / new_scale)).astype(np.int32)
      scale(bias)[:] *= new_scale / old_scale
    changed.append(f"{name} (op {i}): requantisation scale {requantization:.0f} -> 255")
  return bytes(blob), changed


def unfolded_batchnorm(model: bytes) -> list[str]:
  """Ops that scale or shift a convolution's output per channel by constants: unfolded BatchNorm.

  An inference BatchNorm the converter failed to fold stays a MUL by a
  per-channel constant and an ADD of one. Other arithmetic right after a
  convolution is not BatchNorm: PWLU subtracts its bounds (a SUB, by scalars
  unless per-channel), squeeze-excitation multiplies by a computed gate.

  Returns:
    One description per such op ("MUL after DEPTHWISE_CONV_2D (op 12)"); empty
    when every BatchNorm was folded into its convolution.
  """
  flat = schema.Model.GetRootAs(model, 0)
  graph = flat.Subgraphs(0)
  names = op_names(model)

  def channel_constant(tensor: int, channels: int) -> bool:
    """A constant [C] (or [1, 1, 1, C]) vector: a folded BatchNorm's leftover."""
    buffer = flat.Buffers(graph.Tensors(tensor).Buffer())
    stored = buffer.DataLength() > 0 or buffer.Offset() > 0  # Offset: after the flatbuffer.
    shape = list(graph.Tensors(tensor).ShapeAsNumpy())
    return stored and channels > 1 and shape[-1:] == [channels] and np.prod(shape) == channels

  producer = {}
  for i in range(graph.OperatorsLength()):
    for tensor in graph.Operators(i).OutputsAsNumpy():
      producer[int(tensor)] = i
  found = []
  for i, name in enumerate(names):
    if name not in ("MUL", "ADD"):
      continue
    inputs = [int(t) for t in graph.Operators(i).InputsAsNumpy()]
    for t in inputs:
      if t in producer and names[producer[t]] in _CONVOLUTIONS:
        channels = int(graph.Tensors(t).ShapeAsNumpy()[-1])
        if any(channel_constant(other, channels) for other in inputs if other != t):
          found.append(f"{name} after {names[producer[t]]} (op {i})")
  return found


def check_out_dir(out_dir: str) -> None:
  """Raises CoEError unless `out_dir` is, or can be made, a writable directory; creates nothing.

  Checked before the slow part of an export (loading, calibrating,
  converting), and without leaving a directory behind when something else
  then fails. A probe directory, made and removed in `out_dir` or in its
  nearest existing ancestor, finds what permission bits do not (root ignores
  them; /proc, read-only mounts).
  """
  # LiteRTPredictor, which checks the export here and serves it, reads local files only.
  require(not run_dir.is_remote(out_dir), "out", out_dir,
          "expected a local folder; copy the export to remote storage afterwards")
  existing = os.path.abspath(out_dir)
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    reason = f"{existing} is not a directory"
  else:
    try:
      os.rmdir(tempfile.mkdtemp(prefix=".export_probe_", dir=existing))
      return
    except OSError as e:
      reason = f"cannot create a directory in {existing}: {e.strerror or e}"
  raise CoEError(f"out={out_dir!r}: not writable ({reason})")


def _part(variables: Variables, part: str, index: Optional[int] = None) -> Variables:
  """One network's variables as concrete JAX arrays: the delegator's, or expert `index`'s.

  Sliced here, eagerly, outside the traced function: a slice inside it would
  embed every expert's weights in each model and hide the kernels from the
  folding.
  """
  own = stacked.part(variables, part)
  if index is not None:
    own = stacked.expert(own, index)
  return jax.tree.map(jnp.asarray, own)


def export_coe(model: CoE,
               variables: Variables,
               out_dir: str,
               *,
               class_names: Sequence[str],
               threshold: float,
               crop_fraction: float,
               model_flops: dict[str, int],
               calibration: Optional[np.ndarray] = None,
               source: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """Writes the delegator, the experts and `serving.json` into `out_dir`.

  Args:
    model: the CoE.
    variables: its evaluation variables.
    out_dir: SERVE_DIR; created if needed, our files in it are replaced.
    class_names: K names, in label order.
    threshold: the default tau (infinity: no early exit).
    crop_fraction: the evaluation centre crop.
    model_flops: `coe_jax.flops.count` of the config.
    calibration: uint8 [M, S, S, C] training images for int8; None for float32.
    source: provenance recorded in the manifest (e.g. the workdir).

  Returns:
    The manifest written to `serving.json`.

  Raises:
    CoEError: if `out_dir` is not writable, or a BatchNorm was left unfolded.
  """
  require(
      len(class_names) == model.num_classes, "class_names", len(class_names),
      f"expected {model.num_classes} names, one per class")
  check_out_dir(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  image_shape = model.image_shape
  # float32 networks whatever the training compute dtype (bfloat16 on TPUs):
  # LiteRT's CPU kernels are float32 or int8, and the converter rejects bfloat16.
  delegator_net = Delegator(model.delegator_spec, model.num_classes, model.num_experts)
  expert_net = Expert(model.expert_spec, model.num_classes)
  networks = [(stacked.DELEGATOR, "delegator.tflite", None, DELEGATOR_OUTPUTS, (model.num_classes,
                                                                                model.num_experts))]
  networks += [(stacked.EXPERTS, f"expert_{j}.tflite", j, EXPERT_OUTPUTS, (model.num_classes,))
               for j in range(model.num_experts)]
  entries = []
  for part, filename, index, names, widths in networks:
    own = _part(variables, part, index)
    net = delegator_net if part == stacked.DELEGATOR else expert_net
    # Bind `own` and `net` now; the function is traced inside `convert`.
    fn = lambda images, own=own, net=net, names=names: dict(
        zip(names, jax.tree.leaves(net.apply(own, images))))
    blob = convert(fn, image_shape, calibration)
    unfolded = unfolded_batchnorm(blob)
    if unfolded:
      raise CoEError(f"{filename}: BatchNorm was not folded into the convolutions "
                     f"({', '.join(unfolded[:3])})")
    path = os.path.join(out_dir, filename)
    with open(path, "wb") as f:
      f.write(blob)
    entries.append({
        "file": filename,
        "sha256": litert_predictor.sha256(path),
        "outputs": {
            name: [1, width] for name, width in zip(names, widths)
        }
    })
  manifest = {
      "format": litert_predictor.FORMAT,
      "version": litert_predictor.FORMAT_VERSION,
      "num_experts": model.num_experts,
      "num_classes": model.num_classes,
      "class_names": list(class_names),
      # JSON has no infinity; null means "no early exit" (any tau above 1 does the same).
      "threshold": None if threshold == float("inf") else float(threshold),
      "preprocessing": {
          "image_size": image_shape[0],
          "channels": image_shape[2],
          "crop_fraction": crop_fraction,
          "input_dtype": "uint8",
          "input_range": [0, 255],
          "batch_size": 1
      },
      "quantization": "float32" if calibration is None else "int8",
      "flops": {
          key: int(value) for key, value in model_flops.items()
      },
      "models": {
          "delegator": entries[0],
          "experts": entries[1:]
      },
      "source": {
          **(source or {}), "jax": jax.__version__,
          "tensorflow": tf.__version__
      },
  }
  run_dir.write_json(os.path.join(out_dir, litert_predictor.MANIFEST), manifest)
  return manifest


def calibration_images(config: Any, count: int) -> np.ndarray:
  """The first `count` images of the training stream: uint8 [count, S, S, C]."""
  require(count >= 1, "calibration_examples", count, "expected at least 1 image for int8")
  images, have = [], 0
  for batch in data.train_batches(config):
    images.append(batch["image"])
    have += len(batch["image"])
    if have >= count:
      break
  return np.concatenate(images)[:count]


@dataclasses.dataclass
class EvalSplit:
  """Test images at model resolution and their labels."""
  images: np.ndarray  # uint8 [M, S, S, C]
  labels: np.ndarray  # int [M]


def eval_split(config: Any, limit: int) -> EvalSplit:
  """The first `limit` real (unpadded) examples of the test split."""
  images, labels, have = [], [], 0
  for batch in data.eval_batches(config):
    mask = np.asarray(batch["mask"], bool)
    images.append(np.asarray(batch["image"])[mask])
    labels.append(np.asarray(batch["label"])[mask])
    have += int(mask.sum())
    if have >= limit:
      break
  return EvalSplit(np.concatenate(images)[:limit], np.concatenate(labels)[:limit])


def jax_top1(model: CoE, variables: Variables, split: EvalSplit, threshold: float, expert_loop: str,
             batch_size: int) -> float:
  """Top-1 of the JAX router (exact mode) at `threshold`, in percent."""
  correct = 0
  for start in range(0, len(split.labels), batch_size):
    images = split.images[start:start + batch_size]  # [b, S, S, C]
    labels = split.labels[start:start + batch_size]
    # Padded to one shape, so the router compiles once; padding rows are dropped.
    padded = np.pad(images, ((0, batch_size - len(images)),) + ((0, 0),) * 3)
    out = routing.route_and_predict(model,
                                    variables,
                                    padded,
                                    threshold,
                                    spec=routing.RoutingSpec(expert_loop=expert_loop))
    predicted = np.argmax(np.asarray(out["logits"])[:len(labels)], -1)
    correct += int(np.sum(predicted == labels))
  return 100.0 * correct / len(split.labels)


def litert_top1(predictor: "litert_predictor.LiteRTPredictor", split: EvalSplit,
                threshold: float) -> float:
  """Top-1 of the exported models, routed on the host, at `threshold`, in percent."""
  out = predictor.route(split.images, threshold)
  return 100.0 * float(np.mean(np.argmax(out["logits"], -1) == split.labels))


def export_run(workdir: str,
               out_dir: str,
               *,
               quantize: Optional[str] = None,
               calibration_examples: int = 512,
               eval_examples: int = 2000,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """Exports a training run's latest checkpoint; returns the manifest and the top-1s.

  Args:
    workdir: the run's workdir.
    out_dir: SERVE_DIR.
    quantize: None (float32) or "int8".
    calibration_examples: training images that calibrate int8.
    eval_examples: test examples to evaluate on (0: skip the evaluation).
    log: where progress lines and the top-1s go.

  Returns:
    {"manifest": ..., "top1": {"jax": %, "litert": %}} ("top1" empty when skipped).
  """
  quantization = quantize or "float32"
  require(quantization in QUANTIZATIONS, "quantize", quantize,
          f"expected one of {', '.join(QUANTIZATIONS)}")
  require(eval_examples >= 0, "eval_examples", eval_examples, "expected a count >= 0")
  check_out_dir(out_dir)
  config, variables, meta = saved_run.load_for_inference(workdir)
  model = CoE(config, meta["num_classes"])
  calibration = None
  if quantization == "int8":
    calibration = calibration_images(config, calibration_examples)
    log(f"calibrating int8 on {len(calibration)} training images")
  manifest = export_coe(model,
                        variables,
                        out_dir,
                        class_names=meta["class_names"],
                        threshold=meta["threshold"],
                        crop_fraction=data.eval_crop_fraction(config),
                        model_flops=flops.count(config, meta["num_classes"]),
                        calibration=calibration,
                        source={"workdir": run_dir.absolute(workdir)})
  log(f"wrote {out_dir}: delegator.tflite, {model.num_experts} experts, "
      f"{litert_predictor.MANIFEST} ({quantization})")
  top1 = {}
  if eval_examples:
    split = eval_split(config, eval_examples)
    tau = float(meta["threshold"])
    top1["jax"] = jax_top1(model, variables, split, tau, config.expert_loop, config.eval.batch_size)
    top1["litert"] = litert_top1(litert_predictor.LiteRTPredictor.load(out_dir), split, tau)
    log(f"test top-1 on {len(split.labels)} examples at threshold {tau:.4f}: "
        f"JAX {config.train.compute_dtype} {top1['jax']:.2f}%, LiteRT {quantization} "
        f"{top1['litert']:.2f}% ({top1['litert'] - top1['jax']:+.2f} points)")
  return {"manifest": manifest, "top1": top1}


def _flag_values() -> flags.FlagValues:
  """The command line's flags, in a FlagValues of their own (see `coe_jax.serving.predict`)."""
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The training run's workdir.", flag_values=fv)
  flags.DEFINE_string("out", None, "SERVE_DIR to write the models into.", flag_values=fv)
  flags.DEFINE_enum("quantize",
                    None, ["int8"],
                    "int8 post-training quantisation (default: float32).",
                    flag_values=fv)
  flags.DEFINE_integer("calibration-examples",
                       512,
                       "Training images that calibrate int8.",
                       flag_values=fv)
  flags.DEFINE_integer("eval-examples",
                       2000,
                       "Test examples to compare top-1 on (0 skips).",
                       flag_values=fv)
  flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)
  return fv


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line: `argv` without the program's name (default `sys.argv[1:]`); exit status."""
  fv = _flag_values()

  def body(rest: list[str]) -> None:
    if rest:
      raise CoEError(f"unexpected arguments: {' '.join(rest)}")
    export_run(fv["workdir"].value,
               fv["out"].value,
               quantize=fv["quantize"].value,
               calibration_examples=fv["calibration-examples"].value,
               eval_examples=fv["eval-examples"].value)

  return run_command_line(fv, argv, "python -m coe_jax.serving.export", __doc__, body)


if __name__ == "__main__":
  sys.exit(main())

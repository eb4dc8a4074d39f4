"""Serving an exported CoE with LiteRT on CPUs and phones, without JAX or TensorFlow.

    p = LiteRTPredictor.load("runs/demo/serving")   # written by `python -m coe_jax.serving.export`
    out = p(images)             # uint8 [B, H, W] or [B, H, W, C], any size
    out["logits"], out["early_exit"], out["expert"]
    class_logits, selection_logits = p.delegator(images)
    expert_logits = p.expert(2, images)

The same call as `coe_jax.serving.jax_predictor.Predictor`. Axis letters: B batch (a
caller's images), H/W their height and width, C channels, S the model's image size,
K classes, N experts (docs/method.md, section 2).

Routing happens here, on the host: the delegator runs on the whole batch, the
samples whose max class probability reaches tau exit with its logits, the rest
are grouped by their selected expert, each expert's interpreter runs once over
its group, and the answers go back to batch order. Every expert takes its whole
group, as in the JAX router's exact mode: nothing overflows. The models have a
static batch of one image (see `coe_jax.serving.export` for why), so a group is a loop
of single-image invocations; XNNPACK, LiteRT's default CPU delegate, runs each.

Only ai-edge-litert, numpy and Pillow are imported (the `serve` install extra).
An interpreter is not thread-safe: use one predictor per thread.
"""

import hashlib
import json
import os
import warnings
from typing import Any, Optional

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from coe_jax.answers import NO_EXPERT, exits
from coe_jax.errors import CoEError, require
from coe_jax.serving.predictor_base import PredictorBase

MANIFEST = "serving.json"
FORMAT = "coe-jax-litert"
FORMAT_VERSION = 1
SIGNATURE = "serving_default"
INPUT_NAME = "images"
# Networks below this many multiply-adds per image get one thread by default:
# XNNPACK synchronises its threads after every op, which costs more than a
# small op's work (figures in benchmarks/README.md).
SINGLE_THREAD_MACS = 5_000_000


def default_threads(macs: float) -> int:
  """Interpreter threads for a network of `macs` multiply-adds per image."""
  return 1 if macs < SINGLE_THREAD_MACS else os.cpu_count() or 1


def confidence(class_logits: np.ndarray) -> np.ndarray:
  """The max softmax probability, [B, K] -> [B], in float32 like the JAX router."""
  z = class_logits.astype(np.float32)
  # The largest probability is exp(0) over the sum of exp(z - max z).
  return np.float32(1.0) / np.sum(np.exp(z - z.max(axis=-1, keepdims=True)), axis=-1)


def sha256(path: str) -> str:
  """The hex SHA-256 of a file, as recorded in the manifest."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _allocated_interpreter(path: str, num_threads: int) -> tuple[Interpreter, str]:
  """(interpreter, "xnnpack"), or (interpreter, "builtin") where XNNPACK refuses the model.

  XNNPACK refuses a whole model when one int8 op's requantisation scale
  (input scale x weight scale / output scale) is outside the range it supports
  (below 256), as calibration can give a barely trained squeeze-excitation;
  LiteRT's builtin kernels then run it, slower. `coe_jax.serving.export` now raises
  such scales (`fit_xnnpack_requantization`); this keeps older exports and
  other refusals serving.
  """
  interpreter = Interpreter(model_path=path, num_threads=num_threads)
  try:
    interpreter.allocate_tensors()
    return interpreter, "xnnpack"
  except RuntimeError as e:
    warnings.warn(
        f"{path}: XNNPACK cannot run it ({str(e).splitlines()[0]}); "
        "using LiteRT's builtin kernels", RuntimeWarning)
  interpreter = Interpreter(
      model_path=path,
      num_threads=num_threads,
      experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  interpreter.allocate_tensors()
  return interpreter, "builtin"


def undelegated_ops(interpreter: Interpreter) -> list[str]:
  """The ops of an allocated interpreter that LiteRT runs with its own kernels, in graph order.

  A delegate replaces each partition of the graph it takes with one DELEGATE
  node; the other ops are those whose outputs are needed (by a partition or as
  the graph's outputs) without a partition computing them: all of them for a
  model on the builtin kernels. An op that XNNPACK does not run splits the
  graph into one more partition after it. (The interpreter's node list,
  `_get_ops_details`, is the only view the Python API gives of this.)
  """
  ops = interpreter._get_ops_details()  # pylint: disable=protected-access
  partitions = [op for op in ops if op["op_name"] == "DELEGATE"]
  producer = {
      int(t): op["index"] for op in ops if op["op_name"] != "DELEGATE" for t in op["outputs"]
  }
  computed = {int(t) for op in partitions for t in op["outputs"]}
  needed = [int(t) for op in partitions for t in op["inputs"]]
  needed += [int(details["index"]) for details in interpreter.get_output_details()]
  run: set[int] = set()
  while needed:
    tensor = needed.pop()
    if tensor in computed or tensor not in producer or producer[tensor] in run:
      continue  # A partition's output, a constant or a graph input, or seen.
    run.add(producer[tensor])
    needed += [int(t) for t in ops[producer[tensor]]["inputs"]]
  return [ops[i]["op_name"] for i in sorted(run)]


class Network:
  """One exported network on its own interpreter: images [B, S, S, C] -> outputs [B, width].

  Runs the images one at a time: the models have a static batch of one.
  """

  def __init__(self, path: str, entry: dict[str, Any], image_shape: tuple[int, int, int],
               num_threads: int):
    """Loads `path` and checks it against its `serving.json` entry.

    Args:
      path: the .tflite file.
      entry: its manifest entry: `sha256`, and `outputs` {name: [1, width]}.
      image_shape: (S, S, C) of the uint8 input.
      num_threads: CPU threads of the interpreter.

    Raises:
      CoEError: naming the file, if it is missing, altered, or its signature
        disagrees with the manifest.
    """
    if not os.path.isfile(path):
      raise CoEError(f"{path}: no such file (listed in {MANIFEST}); re-export the run")
    if sha256(path) != entry["sha256"]:
      raise CoEError(f"{path}: its SHA-256 differs from {MANIFEST}'s; the file was replaced "
                     "after the export, re-export the run")
    self.threads = num_threads
    try:
      # delegate: "xnnpack", or "builtin" where XNNPACK refused the model.
      self.interpreter, self.delegate = _allocated_interpreter(path, num_threads)
      runner = self.interpreter.get_signature_runner(SIGNATURE)
      # The ops XNNPACK left to LiteRT's kernels: the input's uint8 -> float32
      # CAST alone when XNNPACK runs the rest.
      self.undelegated = undelegated_ops(self.interpreter)
    except (ValueError, RuntimeError) as e:
      raise CoEError(
          f"{path}: cannot load it as a LiteRT model ({str(e).splitlines()[0]})") from None
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    want_input = (1, *image_shape)
    got_input = tuple(inputs[INPUT_NAME]["shape"]) if INPUT_NAME in inputs else None
    if got_input != want_input or inputs[INPUT_NAME]["dtype"] != np.uint8:
      raise CoEError(f"{path}: input {got_input} does not match {MANIFEST}'s uint8 "
                     f"{list(want_input)}; re-export the run")
    got_outputs = {name: list(details["shape"]) for name, details in outputs.items()}
    if got_outputs != entry["outputs"]:
      raise CoEError(f"{path}: outputs {got_outputs} do not match {MANIFEST}'s "
                     f"{entry['outputs']}; re-export the run")
    # Signature tensors of the main graph are its tensors: drive the
    # interpreter directly, cheaper per call than the signature runner.
    self._input = inputs[INPUT_NAME]["index"]
    self._outputs = {name: details["index"] for name, details in outputs.items()}
    self._widths = {name: shape[1] for name, shape in got_outputs.items()}

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Runs every image of uint8 [B, S, S, C]; returns {name: float32 [B, width]}."""
    out = {name: np.empty((len(images), width), np.float32) for name, width in self._widths.items()}
    for i in range(len(images)):
      self.interpreter.set_tensor(self._input, images[i:i + 1])
      self.interpreter.invoke()
      for name, index in self._outputs.items():
        out[name][i] = self.interpreter.get_tensor(index)[0]
    return out


def _read_manifest(serve_dir: str) -> dict[str, Any]:
  """serving.json, checked for the keys and values the runtime relies on."""
  if not os.path.isdir(serve_dir):
    raise CoEError(f"serving_dir={serve_dir!r}: no such directory; write one with "
                   "python -m coe_jax.serving.export --workdir=DIR --out=SERVE_DIR")
  path = os.path.join(serve_dir, MANIFEST)
  if not os.path.isfile(path):
    raise CoEError(f"{path}: no such file; is {serve_dir!r} a directory written by "
                   "python -m coe_jax.serving.export?")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CoEError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise CoEError(f"{path}: not a coe-jax serving manifest (format is not {FORMAT!r})")
  if manifest.get("version") != FORMAT_VERSION:
    raise CoEError(f"{path}: version={manifest.get('version')!r}: this runtime reads version "
                   f"{FORMAT_VERSION}; re-export the run")
  try:
    num_classes, num_experts = int(manifest["num_classes"]), int(manifest["num_experts"])
    pre = manifest["preprocessing"]
    image_shape = (int(pre["image_size"]), int(pre["image_size"]), int(pre["channels"]))
    crop = float(pre["crop_fraction"])
    delegator, experts = manifest["models"]["delegator"], manifest["models"]["experts"]
    names = [str(name) for name in manifest["class_names"]]
    threshold = manifest["threshold"]
    macs = {
        "delegator": int(manifest["flops"]["delegator_flops"]),
        "expert": int(manifest["flops"]["expert_flops"])
    }
  except (KeyError, TypeError, ValueError) as e:
    raise CoEError(f"{path}: missing or malformed entry ({type(e).__name__}: {e})") from None

  def check(ok: bool, key: str, value: Any, expectation: str) -> None:
    if not ok:
      raise CoEError(f"{path}: {key}={value!r}: {expectation}")

  model_keys = {"file", "sha256", "outputs"}
  check(
      isinstance(experts, list) and
      all(isinstance(e, dict) and model_keys <= set(e) for e in [delegator, *experts]), "models",
      manifest["models"],
      f"expected a delegator and a list of experts, each with {', '.join(sorted(model_keys))}")
  check(len(names) == num_classes, "class_names", len(names), f"expected {num_classes} names")
  check(
      len(experts) == num_experts, "models.experts", len(experts),
      f"expected {num_experts} experts (num_experts)")
  check(
      delegator["outputs"] == {
          "class_logits": [1, num_classes],
          "selection_logits": [1, num_experts]
      }, "models.delegator.outputs", delegator["outputs"],
      f"expected class_logits [1, {num_classes}] and selection_logits [1, {num_experts}]")
  for j, entry in enumerate(experts):
    check(entry["outputs"] == {"logits": [1, num_classes]}, f"models.experts[{j}].outputs",
          entry["outputs"], f"expected logits [1, {num_classes}]")
  check(0 < crop <= 1, "preprocessing.crop_fraction", crop, "expected a value in (0, 1]")
  valid_tau = threshold is None or (isinstance(threshold, (int, float)) and
                                    not isinstance(threshold, bool) and threshold >= 0)
  check(valid_tau, "threshold", threshold, "expected a number >= 0, or null for no early exit")
  return {
      **manifest, "class_names": names,
      "image_shape": image_shape,
      "crop_fraction": crop,
      "threshold": float("inf") if threshold is None else float(threshold),
      "macs": macs
  }


class LiteRTPredictor(PredictorBase):
  """An exported CoE: the delegator's and the experts' interpreters, routed on the host."""

  def __init__(self, serve_dir: str, num_threads: Optional[int] = None):
    """Loads SERVE_DIR and checks that its models match its `serving.json`.

    Args:
      serve_dir: a directory written by `python -m coe_jax.serving.export`.
      num_threads: CPU threads of each interpreter. Default: all the host's
        for a network of at least `SINGLE_THREAD_MACS` multiply-adds, else 1.

    Raises:
      CoEError: one line naming the file, for a missing or foreign directory,
        a malformed manifest, or a model that does not match it.
    """
    manifest = _read_manifest(serve_dir)
    require(num_threads is None or (isinstance(num_threads, int) and num_threads >= 1),
            "num_threads", num_threads, "expected a positive integer or None")
    threads = lambda macs: num_threads or default_threads(macs)
    self.serve_dir = serve_dir
    self.manifest = manifest
    self.image_size, _, self.channels = manifest["image_shape"]
    self.crop_fraction = manifest["crop_fraction"]
    self.class_names = manifest["class_names"]
    self.threshold = manifest["threshold"]
    self.num_experts = int(manifest["num_experts"])
    self.quantization = manifest.get("quantization", "float32")
    models = manifest["models"]
    load = lambda entry, macs: Network(os.path.join(serve_dir, entry["file"]), entry, manifest[
        "image_shape"], threads(macs))
    self._delegator = load(models["delegator"], manifest["macs"]["delegator"])
    self._experts = [load(entry, manifest["macs"]["expert"]) for entry in models["experts"]]
    # Per model, delegator first: "xnnpack", or "builtin" where XNNPACK refused it.
    self.delegates = [model.delegate for model in (self._delegator, *self._experts)]
    # Per model, delegator first: the ops LiteRT's builtin kernels run.
    self.undelegated = [model.undelegated for model in (self._delegator, *self._experts)]
    self.threads = [model.threads for model in (self._delegator, *self._experts)]

  @classmethod
  def load(cls, serve_dir: str, num_threads: Optional[int] = None) -> "LiteRTPredictor":
    """The predictor of an export directory (see `__init__`)."""
    return cls(serve_dir, num_threads)

  def route(self, pixels: np.ndarray, threshold: Optional[float] = None) -> dict[str, np.ndarray]:
    """`__call__` on images already at model input, uint8 [B, S, S, C] (e.g. eval batches)."""
    tau = self.tau(threshold)
    pixels = np.asarray(pixels)
    shape = (self.image_size, self.image_size, self.channels)
    require(
        pixels.ndim == 4 and pixels.shape[1:] == shape and pixels.dtype == np.uint8, "pixels",
        f"{pixels.dtype} {pixels.shape}",
        f"expected uint8 [B, {shape[0]}, {shape[1]}, {shape[2]}]; call the predictor "
        "itself on images of other sizes or types")
    pixels = np.ascontiguousarray(pixels)
    heads = self._delegator(pixels)
    logits = heads["class_logits"]  # [B, K]; the early exits keep these rows.
    early_exit = exits(confidence(logits), tau)  # [B]
    # argmax takes the lowest index on ties, like the JAX router's stable ranking.
    choice = np.argmax(heads["selection_logits"], axis=-1)  # [B]
    expert = np.where(early_exit, NO_EXPERT, choice).astype(np.int32)  # [B]
    for j in np.unique(expert[~early_exit]):
      group = np.flatnonzero(expert == j)  # Batch positions that expert j answers.
      logits[group] = self._experts[j](pixels[group])["logits"]
    return {"logits": logits, "early_exit": early_exit, "expert": expert}

  def delegator(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
    """The delegator alone: (class_logits [B, K], selection_logits [B, N])."""
    heads = self._delegator(self.preprocess(images))
    return heads["class_logits"], heads["selection_logits"]

  def expert(self, j: int, images: Any) -> np.ndarray:
    """Expert j alone on every image: logits [B, K]."""
    return self._experts[self.check_expert(j)](self.preprocess(images))["logits"]

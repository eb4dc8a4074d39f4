"""Export to LiteRT: a tiny trained run, exported in float32 and int8, against the JAX Predictor."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from flax import traverse_util
from PIL import Image

from coe_jax import flops, routing
from coe_jax.evaluation import run as evaluation_run
from coe_jax.models import pwlu
from coe_jax.models.coe import CoE
from coe_jax.serving import export, litert_predictor, predict
from coe_jax.serving.jax_predictor import Predictor
from coe_jax.serving.litert_predictor import LiteRTPredictor
from coe_jax.training import train
from tests.helpers import assert_same_answers, single_device_trainer, train_config
from tests.tiny import tiny_config

# End to end and minutes long: `make test-all` runs them, `make test` does not.
pytestmark = pytest.mark.slow

# Largest |int8 - float32| logit difference, relative to the float32 logits'
# largest magnitude per sample. Measured here on this barely trained run
# (logits of magnitude ~0.05): 0.05-0.10; each int8 layer adds roughly 1% of
# its tensor's range.
INT8_RELATIVE_ERROR = 0.2
# Largest |int8 - JAX float32| test top-1 difference, in points, on the 360
# test digits. Measured here: 0.28 (one digit), before and after hard-swish
# was exported as products.
INT8_TOP1_POINTS = 1.0
# What LiteRT's builtin kernels run of each exported model when XNNPACK runs the
# rest: the uint8 -> float32 input cast, for which XNNPACK has no kernel.
ONLY_THE_INPUT_CAST = ["CAST"]


def _test_images(count=96):
  """Digits test images at model resolution: uint8 [count, 16, 16, 3]."""
  return export.eval_split(train_config(), count).images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny trained and evaluated run: 4 steps, 2 experts, a calibrated threshold."""
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer = single_device_trainer(train_config(num_steps=4), workdir)
  evaluation_run.evaluate(trainer, train.train(trainer))
  return workdir


@pytest.fixture(scope="module")
def fp32(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("serve_fp32"))
  return out, export.export_run(run, out, eval_examples=0, log=lambda line: None)


@pytest.fixture(scope="module")
def int8(run, tmp_path_factory):
  out, lines = str(tmp_path_factory.mktemp("serve_int8")), []
  result = export.export_run(run,
                             out,
                             quantize="int8",
                             calibration_examples=64,
                             eval_examples=360,
                             log=lines.append)
  return out, result, lines


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_manifest_describes_the_run(run, fp32):
  out, result = fp32
  with open(os.path.join(out, "serving.json")) as f:
    manifest = json.load(f)
  assert manifest == result["manifest"]
  with open(os.path.join(run, "results.json")) as f:
    results = json.load(f)
  config = train_config()
  assert manifest["threshold"] == results["threshold"]
  assert len(manifest["class_names"]) == 10
  assert (manifest["num_experts"], manifest["num_classes"]) == (2, 10)
  assert manifest["preprocessing"] == {
      "image_size": 16,
      "channels": 3,
      "crop_fraction": 1.0,
      "input_dtype": "uint8",
      "input_range": [0, 255],
      "batch_size": 1
  }
  assert manifest["flops"] == flops.count(config, 10)
  assert manifest["quantization"] == "float32"
  models = manifest["models"]
  files = [models["delegator"]["file"]] + [e["file"] for e in models["experts"]]
  assert files == ["delegator.tflite", "expert_0.tflite", "expert_1.tflite"]
  assert sorted(os.listdir(out)) == sorted(files + ["serving.json"])


def test_batchnorm_is_folded_and_depthwise_convolutions_are_single_ops(fp32):
  out, _ = fp32
  for name in ("delegator.tflite", "expert_0.tflite", "expert_1.tflite"):
    model = _read(os.path.join(out, name))
    ops = export.op_names(model)
    assert export.unfolded_batchnorm(model) == [], name
    assert "DEPTHWISE_CONV_2D" in ops and "CONV_2D" in ops, (name, ops)
    # What elementwise arithmetic remains: the input normalisation (its scale
    # went into the stem), one gate per squeeze-excitation, the residual adds.
    assert ops.count("SUB") == 1 and ops.count("MUL") == ops.count("LOGISTIC"), (name, ops)
    assert not {"RSQRT", "DIV", "BROADCAST_TO", "SHAPE"} & set(ops), (name, ops)


def _uneven_pwlu(variables, rng):
  """Every PWLU moved to phase II, its heights no longer on the ReLU shape."""
  variables = pwlu.realign(variables)
  params = traverse_util.flatten_dict(variables["params"])
  for path, value in params.items():
    if path[-1] == "heights":
      params[path] = value + jnp.asarray(rng.normal(0, 0.3, value.shape), value.dtype)
  return {**variables, "params": traverse_util.unflatten_dict(params)}


def test_pwlu_and_condconv_export_to_ops_xnnpack_runs_and_match_jax(tmp_path):
  config = tiny_config(num_experts=2, activation="pwlu", condconv_kernels=3)
  model = CoE(config, num_classes=4)
  rng = np.random.default_rng(0)
  variables = _uneven_pwlu(jax.jit(model.init)(jax.random.key(0)), rng)
  export.export_coe(model,
                    variables,
                    str(tmp_path),
                    class_names=list("abcd"),
                    threshold=0.5,
                    crop_fraction=1.0,
                    model_flops=flops.count(config, 4))
  for name in ("delegator.tflite", "expert_0.tflite"):
    ops = export.op_names(_read(os.path.join(tmp_path, name)))
    # PWLU's lookup would bring gathers and selects, which XNNPACK does not run.
    assert not {"GATHER", "GATHER_ND", "SELECT", "SELECT_V2"} & set(ops), (name, ops)
  lite = LiteRTPredictor.load(str(tmp_path))
  assert lite.delegates == ["xnnpack"] * 3
  images = rng.integers(0, 256, (6, 16, 16, 3), np.uint8)
  for j in range(2):  # The JAX model computes PWLU by lookup, its training formulation.
    expected = np.asarray(model.expert(variables, j, images))
    np.testing.assert_allclose(lite.expert(j, images),
                               expected,
                               rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())
  expected = np.asarray(model.delegator(variables, images)[0])
  np.testing.assert_allclose(lite.delegator(images)[0],
                             expected,
                             rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())


def test_unfolded_batchnorm_is_detected():
  kernel = np.random.default_rng(0).normal(size=(3, 3, 3, 4)).astype(np.float32)
  scale = np.arange(1, 5, dtype=np.float32)

  def fn(images):  # A convolution whose output is also returned cannot absorb the scale.
    y = jax.lax.conv_general_dilated(images.astype(np.float32),
                                     kernel, (1, 1),
                                     "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return {"scaled": y * scale, "raw": y}

  found = export.unfolded_batchnorm(export.convert(fn, (8, 8, 3)))
  assert len(found) == 1 and found[0].startswith("MUL after CONV_2D"), found


def test_float32_round_trip_matches_the_jax_predictor(run, fp32):
  out, _ = fp32
  reference, lite = Predictor.load(run), LiteRTPredictor.load(out)
  assert lite.threshold == reference.threshold and lite.class_names == reference.class_names
  digits = _test_images()
  rng = np.random.default_rng(0)
  images = np.concatenate([digits, rng.integers(0, 256, (8, 16, 16, 3), np.uint8)])
  class_logits, selection_logits = reference.delegator(images)
  confidence = np.asarray(routing.confidence(class_logits))
  lite_class, lite_selection = lite.delegator(images)
  np.testing.assert_allclose(lite_class,
                             class_logits,
                             rtol=1e-4,
                             atol=1e-4 * np.abs(class_logits).max())
  np.testing.assert_allclose(lite_selection,
                             selection_logits,
                             rtol=1e-4,
                             atol=1e-4 * np.abs(selection_logits).max())
  for j in range(2):
    expected = reference.expert(j, images)
    np.testing.assert_allclose(lite.expert(j, images),
                               expected,
                               rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())
  # The calibrated tau, and taus that send about half and a quarter to the experts.
  for tau in (reference.threshold, float(np.median(confidence)),
              float(np.quantile(confidence, 0.25))):
    ref, got = reference(images, tau), lite(images, tau)
    assert got["logits"].dtype == np.float32 and got["expert"].dtype == ref["expert"].dtype
    assert_same_answers(got, ref, confidence, tau)
  routed = lite(images, float(np.median(confidence)))
  assert 0 < routed["early_exit"].mean() < 1


def test_int8_export_prints_top1_before_and_after(int8):
  out, result, lines = int8
  assert result["manifest"]["quantization"] == "int8"
  assert lines[0] == "calibrating int8 on 64 training images"
  assert lines[-1].startswith("test top-1 on 360 examples at threshold ")
  assert "JAX float32" in lines[-1] and "LiteRT int8" in lines[-1]
  assert set(result["top1"]) == {"jax", "litert"}
  # Integer inside: quantised once after the input cast, dequantised at each output.
  for name, outputs in (("delegator.tflite", 2), ("expert_0.tflite", 1)):
    ops = export.op_names(_read(os.path.join(out, name)))
    assert ops.count("QUANTIZE") == 1 and ops.count("DEQUANTIZE") == outputs, (name, ops)


def test_int8_top1_is_close_to_float32(int8):
  top1 = int8[1]["top1"]
  assert abs(top1["litert"] - top1["jax"]) <= INT8_TOP1_POINTS, top1


def test_xnnpack_runs_every_op_of_float32_and_int8_models_but_the_input_cast(fp32, int8):
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # The fallback to builtin kernels warns.
    exact, quantized = LiteRTPredictor.load(fp32[0]), LiteRTPredictor.load(int8[0])
  for lite in (exact, quantized):
    assert lite.delegates == ["xnnpack"] * 3
    # One op outside XNNPACK's partition: a HARD_SWISH there would split it.
    assert lite.undelegated == [ONLY_THE_INPUT_CAST] * 3, lite.undelegated
  # float32 keeps the one fused op; int8 has none, XNNPACK has no int8 kernel for it.
  assert "HARD_SWISH" in export.op_names(_read(os.path.join(fp32[0], "expert_0.tflite")))
  assert "HARD_SWISH" not in export.op_names(_read(os.path.join(int8[0], "expert_0.tflite")))


def _dead_squeeze_excitation():
  """A conv, then a squeeze-excitation whose ReLU units are dead on every image, then logits."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)
  kernel, reduce, expand, expand_bias, head = (normal(3, 3, 3, 8), normal(8, 4), normal(4, 8),
                                               normal(8), normal(8, 5))
  # Pooled values are far below 10: the ReLU after this bias is 0 on every image.
  reduce_bias = np.full(4, -10.0, np.float32)

  def fn(images):
    x = jax.lax.conv_general_dilated(images.astype(np.float32) / 255,
                                     kernel, (1, 1),
                                     "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    pooled = jnp.mean(x, (1, 2))  # [1, 8]
    gate = jax.nn.sigmoid(jax.nn.relu(pooled @ reduce + reduce_bias) @ expand + expand_bias)
    return {"logits": jnp.mean(x * gate[:, None, None, :], (1, 2)) @ head}

  return fn


def _interpreter(model):
  interpreter = Interpreter(model_content=model, num_threads=1)
  interpreter.allocate_tensors()
  return interpreter


def test_a_layer_constant_on_the_calibration_images_still_runs_on_xnnpack(monkeypatch):
  fn = _dead_squeeze_excitation()
  images = np.random.default_rng(1).integers(0, 256, (16, 8, 8, 3), np.uint8)
  with monkeypatch.context() as patch:  # As calibrated: XNNPACK refuses the model.
    patch.setattr(export, "fit_xnnpack_requantization", lambda model: (model, []))
    calibrated = export.convert(fn, (8, 8, 3), images)
  with pytest.raises(RuntimeError, match="XNNPACK"):
    _interpreter(calibrated)
  fitted, changed = export.fit_xnnpack_requantization(calibrated)
  assert len(changed) == 1 and changed[0].startswith("FULLY_CONNECTED"), changed
  assert export.convert(fn, (8, 8, 3), images) == fitted  # What the export writes.
  interpreter = _interpreter(fitted)
  assert litert_predictor.undelegated_ops(interpreter) == ONLY_THE_INPUT_CAST
  (index,), (output,) = ([d["index"] for d in interpreter.get_input_details()],
                         [d["index"] for d in interpreter.get_output_details()])
  for image in images[:4]:
    interpreter.set_tensor(index, image[None])
    interpreter.invoke()
    want = np.asarray(fn(image[None])["logits"])
    got = interpreter.get_tensor(output)
    assert np.abs(got - want).max() <= INT8_RELATIVE_ERROR * np.abs(want).max(), (got, want)


def test_int8_logits_are_close_to_float32(fp32, int8):
  quantized, exact = LiteRTPredictor.load(int8[0]), LiteRTPredictor.load(fp32[0])
  images = _test_images()
  for j in range(2):
    want, got = exact.expert(j, images), quantized.expert(j, images)
    error = np.abs(got - want).max(-1) / np.abs(want).max(-1)
    assert error.max() <= INT8_RELATIVE_ERROR, error.max()
  want, got = exact.delegator(images)[0], quantized.delegator(images)[0]
  assert (np.abs(got - want).max(-1) / np.abs(want).max(-1)).max() <= INT8_RELATIVE_ERROR


def test_predict_cli_serving_dir_agrees_with_workdir(run, fp32, tmp_path, capsys):
  paths = []
  for i, image in enumerate(_test_images(4)):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(image).save(paths[-1])
  assert predict.main([f"--serving-dir={fp32[0]}", *paths]) == 0
  served = capsys.readouterr().out.strip().splitlines()
  assert predict.main([f"--workdir={run}", *paths]) == 0
  reference = capsys.readouterr().out.strip().splitlines()
  assert len(served) == 4
  for got, want in zip(served, reference):  # The probabilities may differ in the last digit.
    assert got.split()[:2] == want.split()[:2] and got.split()[3:] == want.split()[3:]


def test_export_cli_reports_a_bad_workdir_in_one_line(tmp_path, capsys):
  assert export.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'serve'}"]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: workdir={str(tmp_path)!r}") and err.count("\n") == 1
  assert not os.path.exists(tmp_path / "serve")

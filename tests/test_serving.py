"""The LiteRT runtime: host-side routing, what it imports, and bad serving directories."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from coe_jax import flops, routing
from coe_jax.errors import CoEError
from coe_jax.models.coe import CoE
from coe_jax.serving import export, litert_predictor, predict
from coe_jax.serving.jax_predictor import Predictor
from coe_jax.serving.litert_predictor import LiteRTPredictor
from tests.helpers import assert_same_answers, random_variables
from tests.tiny import REPO, tiny_config

CLASS_NAMES = [f"digit_{k}" for k in range(10)]
NUM_EXPERTS = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """A random 3-expert CoE exported in float32, and the JAX Predictor of the same variables."""
  config = tiny_config(num_experts=NUM_EXPERTS)
  model = CoE(config, len(CLASS_NAMES))
  variables = random_variables(model)
  out = str(tmp_path_factory.mktemp("serve"))
  export.export_coe(model,
                    variables,
                    out,
                    class_names=CLASS_NAMES,
                    threshold=0.5,
                    crop_fraction=1.0,
                    model_flops=flops.count(config, len(CLASS_NAMES)))
  reference = Predictor(model,
                        variables,
                        image_size=16,
                        channels=3,
                        class_names=CLASS_NAMES,
                        threshold=0.5,
                        routing_spec=routing.RoutingSpec.from_config(config))
  return out, reference, LiteRTPredictor.load(out)


def _images(count, shape=(16, 16, 3), seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def test_importing_and_serving_loads_neither_jax_nor_tensorflow(served):
  code = ("import sys, numpy as np\n"
          "from coe_jax.serving.litert_predictor import LiteRTPredictor\n"
          f"p = LiteRTPredictor.load({served[0]!r})\n"
          "out = p(np.zeros((2, 20, 20, 3), np.uint8))\n"
          "heavy = {'jax', 'jaxlib', 'flax', 'tensorflow', 'keras', 'tensorboard'}\n"
          "print(sorted({m.split('.')[0] for m in sys.modules} & heavy), out['logits'].shape)\n")
  result = subprocess.run([sys.executable, "-c", code],
                          capture_output=True,
                          text=True,
                          cwd=REPO,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[] (2, 10)"


def test_routes_like_the_jax_predictor(served):
  _, reference, p = served
  images = _images(48)
  class_logits, _ = reference.delegator(images)
  confidence = np.asarray(routing.confidence(class_logits))
  for tau in (0.0, float(np.quantile(confidence, 0.3)), float(np.median(confidence)),
              float(np.quantile(confidence, 0.8)), float("inf")):
    assert_same_answers(p(images, tau), reference(images, tau), confidence, tau)
  out = p(images, float(np.median(confidence)))
  assert len(np.unique(out["expert"][~out["early_exit"]])) >= 2  # Several groups, not one.


def test_each_answer_comes_from_its_model_in_batch_order(served):
  p = served[2]
  images = _images(24, seed=1)
  class_logits, _ = p.delegator(images)
  out = p(images, float(np.median(routing.confidence(class_logits))))
  for i, image in enumerate(images):
    alone = p.delegator(image[None])[0] if out["early_exit"][i] else p.expert(
        int(out["expert"][i]), image[None])
    np.testing.assert_array_equal(out["logits"][i], alone[0])
  np.testing.assert_array_equal(out["expert"][out["early_exit"]], -1)
  assert np.all(out["expert"][~out["early_exit"]] >= 0)


def test_thresholds(served):
  p = served[2]
  images = _images(6)
  assert p.threshold == 0.5
  everyone = p(images, 0.0)
  assert everyone["early_exit"].all() and np.all(everyone["expert"] == -1)
  np.testing.assert_array_equal(everyone["logits"], p.delegator(images)[0])
  assert not p(images, float("inf"))["early_exit"].any()
  for bad in (-0.1, float("nan"), "0.5", True):
    with pytest.raises(CoEError, match=r"^threshold="):
      p(images, bad)


def test_image_layouts_and_bad_arguments(served):
  p = served[2]
  grey = _images(3, (20, 12))
  np.testing.assert_array_equal(p(grey)["logits"], p(grey[..., None])["logits"])
  assert p(_images(2, (9, 30, 4)))["logits"].shape == (2, 10)
  assert p(_images(2).astype(np.float32) / 255)["logits"].shape == (2, 10)
  with pytest.raises(CoEError, match=r"looks like one \[H, W, C\] image"):
    p(_images(1)[0])
  for bad in (NUM_EXPERTS, -1, True, 1.0):
    with pytest.raises(CoEError, match=r"^j="):
      p.expert(bad, _images(1))


def _one_line_error(serve_dir, *fragments):
  with pytest.raises(CoEError) as info:
    LiteRTPredictor.load(serve_dir)
  message = str(info.value)
  assert "\n" not in message and all(f in message for f in fragments), message


def test_missing_and_foreign_directories(tmp_path):
  _one_line_error(str(tmp_path / "nowhere"), "serving_dir=", "no such directory")
  _one_line_error(str(tmp_path), os.path.join(str(tmp_path), "serving.json"), "no such file")
  manifest = tmp_path / "serving.json"
  manifest.write_text("{not json")
  _one_line_error(str(tmp_path), str(manifest), "not readable JSON")
  manifest.write_text(json.dumps({"format": "someone-else", "models": []}))
  _one_line_error(str(tmp_path), str(manifest), "not a coe-jax serving manifest")


def _copy(served, tmp_path):
  """A copy of the served directory and its manifest, to break."""
  target = tmp_path / "copy"
  shutil.copytree(served[0], target)
  with open(target / "serving.json") as f:
    return target, json.load(f)


def _write(target, manifest):
  (target / "serving.json").write_text(json.dumps(manifest))


def test_manifest_that_does_not_match_its_models(served, tmp_path):
  target, manifest = _copy(served, tmp_path)
  manifest_path = str(target / "serving.json")
  expert_0 = str(target / "expert_0.tflite")

  _write(target, {**manifest, "num_experts": 2})
  _one_line_error(str(target), manifest_path, "models.experts=3")
  _write(target, {**manifest, "class_names": CLASS_NAMES[:9]})
  _one_line_error(str(target), manifest_path, "class_names=9")

  _write(target, {**manifest, "preprocessing": {**manifest["preprocessing"], "image_size": 32}})
  _one_line_error(str(target), str(target / "delegator.tflite"), "does not match")

  _write(target, manifest)
  shutil.copy(target / "expert_1.tflite", expert_0)  # Another model under a listed name.
  _one_line_error(str(target), expert_0, "SHA-256")
  shutil.copy(target / "delegator.tflite", expert_0)  # ... even with its digest updated.
  experts = [dict(e) for e in manifest["models"]["experts"]]
  experts[0]["sha256"] = litert_predictor.sha256(expert_0)
  _write(target, {**manifest, "models": {**manifest["models"], "experts": experts}})
  _one_line_error(str(target), expert_0, "outputs")

  os.remove(expert_0)
  _one_line_error(str(target), expert_0, "no such file")


def test_predict_cli_reports_a_bad_serving_dir(tmp_path, capsys):
  image = tmp_path / "digit.png"
  Image.fromarray(_images(1, (8, 8))[0]).save(image)
  assert predict.main([f"--serving-dir={tmp_path / 'missing'}", str(image)]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: serving_dir=") and err.count("\n") == 1

"""The Predictor and the `coe_jax.serving.predict` command line."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from coe_jax import routing
from coe_jax.data import preprocess_images
from coe_jax.errors import CoEError
from coe_jax.models.coe import CoE
from coe_jax.serving import jax_predictor, predict
from coe_jax.serving.jax_predictor import Predictor
from coe_jax.training import saved_run
from tests.helpers import random_variables
from tests.tiny import REPO, tiny_config

CLASS_NAMES = [f"digit_{k}" for k in range(10)]


def _predictor(config, model, variables, threshold=0.5):
  return Predictor(model,
                   variables,
                   image_size=config.data.image_size,
                   channels=config.data.channels,
                   class_names=CLASS_NAMES,
                   threshold=threshold,
                   routing_spec=routing.RoutingSpec.from_config(config))


@pytest.fixture(scope="module")
def setup():
  config = tiny_config(num_experts=3)
  model = CoE(config, num_classes=len(CLASS_NAMES))
  variables = random_variables(model)
  return config, model, variables, _predictor(config, model, variables)


def _user_images(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(5, 16, 16), (5, 16, 16, 1), (5, 16, 16, 3), (5, 20, 28, 3),
                                   (5, 9, 9)])
def test_logits_equal_the_router_on_preprocessed_images(setup, shape):
  _, model, variables, p = setup
  images = _user_images(shape)
  out = p(images)
  pixels = preprocess_images(images, 16, 3)  # [5, 16, 16, 3]
  routed = routing.route_and_predict(model, variables, pixels, p.threshold)
  # Two programs of different shapes may sum in different orders: float32 rounding, no more.
  np.testing.assert_allclose(out["logits"], routed["logits"], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out["early_exit"], routed["early_exit"])
  np.testing.assert_array_equal(out["expert"], routed["expert"])
  assert out["logits"].shape == (5, 10) and isinstance(out["logits"], np.ndarray)
  assert out["early_exit"].dtype == bool
  assert np.all(out["expert"][out["early_exit"]] == -1)
  assert np.all(out["expert"][~out["early_exit"]] >= 0)


def test_grey_layouts_agree(setup):
  p = setup[3]
  grey = _user_images((4, 16, 16))
  np.testing.assert_array_equal(p(grey)["logits"], p(grey[..., None])["logits"])
  np.testing.assert_array_equal(p(grey)["logits"], p(np.repeat(grey[..., None], 3, -1))["logits"])


def test_threshold_default_and_extremes(setup):
  p = setup[3]
  images = _user_images((5, 16, 16, 3), seed=1)
  np.testing.assert_array_equal(p(images)["logits"], p(images, threshold=p.threshold)["logits"])
  everyone_exits = p(images, threshold=0.0)
  class_logits, selection_logits = p.delegator(images)
  assert everyone_exits["early_exit"].all() and (everyone_exits["expert"] == -1).all()
  np.testing.assert_allclose(everyone_exits["logits"], class_logits, rtol=1e-5, atol=1e-5)
  nobody_exits = p(images, threshold=math.inf)
  assert not nobody_exits["early_exit"].any()
  np.testing.assert_array_equal(nobody_exits["expert"], selection_logits.argmax(-1))
  for i, j in enumerate(nobody_exits["expert"]):
    np.testing.assert_allclose(nobody_exits["logits"][i],
                               p.expert(int(j), images)[i],
                               rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("call,message", [
    (lambda p, x: p(x[0]), r"images.shape=\(16, 16, 3\): looks like one \[H, W, C\] image"),
    (lambda p, x: p(x[0, ..., 0]), r"images.shape=\(16, 16\): expected a non-empty batch"),
    (lambda p, x: p(x[:0]), r"images.shape=\(0, 16, 16, 3\)"),
    (lambda p, x: p(x[..., :2]), r"images.shape=\(5, 16, 16, 2\)"),
    (lambda p, x: p(x, threshold=-0.1), "threshold=-0.1"),
    (lambda p, x: p(x, threshold=float("nan")), "threshold=nan"),
    (lambda p, x: p(x, threshold="0.5"), "threshold='0.5'"),
    (lambda p, x: p.expert(3, x), "j=3: expected an expert index in"),
    (lambda p, x: p.expert(-1, x), "j=-1"),
    (lambda p, x: p.expert(True, x), "j=True"),
])
def test_bad_input_is_named_in_one_line(setup, call, message):
  with pytest.raises(CoEError, match=message) as error:
    call(setup[3], _user_images((5, 16, 16, 3)))
  assert "\n" not in str(error.value)


def test_serving_mode_predictor_routes_like_the_router(setup):
  config, model, variables, _ = setup
  serving = config.copy_and_resolve_references()
  serving.routing.mode = "serving"
  serving.routing.capacity_factor = 0.5
  p = Predictor(model,
                variables,
                image_size=16,
                channels=3,
                class_names=CLASS_NAMES,
                threshold=0.5,
                routing_spec=routing.RoutingSpec.from_config(serving))
  images = _user_images((5, 16, 16, 3), seed=2)
  routed = routing.route_and_predict(model,
                                     variables,
                                     images,
                                     0.5,
                                     spec=routing.RoutingSpec("serving", capacity_factor=0.5))
  np.testing.assert_array_equal(p(images)["expert"], routed["expert"])
  np.testing.assert_allclose(p(images)["logits"], routed["logits"], rtol=1e-4, atol=1e-5)


def test_bad_routing_config_is_named(setup):
  config, model, variables, _ = setup
  bad = config.copy_and_resolve_references()
  bad.expert_loop = "spiral"
  with pytest.raises(CoEError, match="^expert_loop='spiral'"):
    Predictor(model,
              variables,
              image_size=16,
              channels=3,
              class_names=CLASS_NAMES,
              threshold=0.5,
              routing_spec=routing.RoutingSpec.from_config(bad))


def test_load_uses_the_runs_config_and_calibrated_threshold(setup, monkeypatch):
  config, _, variables, _ = setup
  meta = {
      "class_names": CLASS_NAMES,
      "num_classes": 10,
      "threshold": 0.25,
      "expected_exit_rate": 0.0
  }
  monkeypatch.setattr(saved_run,
                      "load_for_inference",
                      lambda workdir, step=None: (config, variables, meta)
                      if workdir == "run" and step is None else None)
  p = Predictor.load("run")
  assert p.threshold == 0.25 and p.class_names == CLASS_NAMES
  assert (p.image_size, p.channels, p.num_experts) == (16, 3, 3)
  assert p(_user_images((2, 30, 30)))["logits"].shape == (2, 10)


def _write_image(path, shape, seed=0):
  Image.fromarray(_user_images(shape, seed)).save(path)
  return str(path)


def test_cli_prints_one_line_per_image(setup, tmp_path, monkeypatch, capsys):
  p = setup[3]
  monkeypatch.setattr(jax_predictor.Predictor, "load",
                      classmethod(lambda cls, workdir, step=None: p))
  paths = [
      _write_image(tmp_path / "a.png", (20, 20)),
      _write_image(tmp_path / "b.png", (12, 18, 3))
  ]
  assert predict.main(["--workdir=run", *paths]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2
  for path, line in zip(paths, lines):
    with Image.open(path) as image:
      out = p(np.asarray(image.convert("RGB"))[None])
    k = int(out["logits"][0].argmax())
    answered = "early exit" if out["early_exit"][0] else f"expert {out['expert'][0]}"
    assert line.startswith(f"{path}: {CLASS_NAMES[k]}  p=0.") and line.endswith(answered)


def test_cli_undecodable_image_and_bad_workdir(tmp_path, capsys):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  assert predict.main(["--workdir=run", str(bad)]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: image={str(bad)!r}: cannot decode it as an image")
  assert err.count("\n") == 1
  good = _write_image(tmp_path / "good.png", (8, 8))
  assert predict.main([f"--workdir={tmp_path}", good]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: workdir={str(tmp_path)!r}") and err.count("\n") == 1


def test_cli_missing_image_exits_nonzero_without_traceback(tmp_path):
  missing = str(tmp_path / "missing.png")
  result = subprocess.run(
      [sys.executable, "-m", "coe_jax.serving.predict", f"--workdir={tmp_path}", missing],
      capture_output=True,
      text=True,
      cwd=REPO,
      timeout=120,
      env={
          **os.environ, "JAX_PLATFORMS": "cpu"
      })
  assert result.returncode == 1
  assert result.stderr.strip() == f"error: image={missing!r}: no such file"
  assert result.stdout == ""

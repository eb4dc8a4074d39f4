"""preprocess_images: every input layout and dtype to uint8 [B, S, S, C]."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from coe_jax.data import images
from coe_jax.errors import CoEError


def _constant(shape, value, dtype=np.uint8):
  return np.full(shape, value, dtype)


@pytest.mark.parametrize("shape", [(2, 10, 14), (2, 10, 14, 1), (2, 10, 14, 3), (2, 10, 14, 4)])
@pytest.mark.parametrize("channels", [1, 3])
def test_layouts_give_model_shape(shape, channels):
  out = images.preprocess_images(np.zeros(shape, np.uint8), 6, channels)
  assert out.shape == (2, 6, 6, channels) and out.dtype == np.uint8


def test_grey_is_replicated_and_alpha_dropped():
  grey = images.preprocess_images(_constant((1, 9, 9), 77), 4, 3)
  assert (grey == 77).all()
  rgba = _constant((1, 9, 9, 4), 0)
  rgba[..., :3] = (10, 200, 30)  # Alpha stays 0: it must not make the pixels black.
  assert (images.preprocess_images(rgba, 4, 3) == (10, 200, 30)).all()


def test_rgb_to_grey_uses_luma():
  rgb = _constant((1, 5, 5, 3), 0)
  rgb[..., 0] = 200
  out = images.preprocess_images(rgb, 5, 1)
  assert out.shape == (1, 5, 5, 1) and (out == round(0.299 * 200)).all()


def test_float_and_wide_integer_inputs():
  as_float = images.preprocess_images(_constant((1, 4, 4), 0.5, np.float32), 4, 1)
  assert (as_float == 128).all()
  as_int = images.preprocess_images(_constant((1, 4, 4), 250, np.int64), 4, 1)
  assert (as_int == 250).all()


def test_resize_is_bilinear_and_center_crop_is_centred():
  ramp = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (24, 1))[None]  # [1, 24, 24]
  out = images.preprocess_images(ramp, 12, 1)[0, :, :, 0]
  expected = np.asarray(Image.fromarray(ramp[0]).resize((12, 12), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(out, expected)
  # The centred half of a left-to-right ramp has the ramp's middle values.
  crop = images.preprocess_images(ramp, 12, 1, crop_fraction=0.5)[0, :, :, 0]
  assert crop.min() >= 55 and crop.max() <= 185 and (np.diff(crop[0].astype(int)) >= 0).all()


def test_center_crop_box():
  assert images.center_crop_box(100, 80, 0.875) == (15, 5, 70)
  assert images.center_crop_box(3, 3, 0.1) == (1, 1, 1)


def test_empty_batch():
  assert images.preprocess_images(np.zeros((0, 8, 8, 3), np.uint8), 4, 3).shape == (0, 4, 4, 3)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((8, 8), np.uint8), "images.shape"),
    (np.zeros((1, 8, 8, 2), np.uint8), "images.shape"),
    (_constant((1, 8, 8), 255.0, np.float32), "float images"),
    (_constant((1, 8, 8), np.nan, np.float32), "float images"),
    (_constant((1, 8, 8), 300, np.int32), "integer images"),
    (np.zeros((1, 8, 8), bool), "images=bool"),
])
def test_rejects_what_it_cannot_interpret(bad, match):
  with pytest.raises(CoEError, match=match):
    images.preprocess_images(bad, 4, 3)


def test_rejects_bad_arguments():
  ok = np.zeros((1, 8, 8), np.uint8)
  with pytest.raises(CoEError, match="channels=4"):
    images.preprocess_images(ok, 4, 4)
  with pytest.raises(CoEError, match="crop_fraction"):
    images.preprocess_images(ok, 4, 3, crop_fraction=1.5)


def test_serving_import_needs_no_tensorflow_or_jax():
  code = ("import sys; from coe_jax.data import preprocess_images; "
          "print(sorted(m for m in ('tensorflow', 'jax', 'sklearn') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"

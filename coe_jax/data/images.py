"""Image preprocessing for inference: what a user holds to what the model takes.

Numpy and Pillow only, so the serving runtime and the predictor can use it
without TensorFlow or JAX. The same per-image transform builds the `digits` and
`image_folder` data sets, so serving sees exactly their evaluation inputs; the
TFDS evaluation pipeline (`tf_preprocess.py`) follows the same recipe with
TensorFlow ops.

The recipe: convert to the model's channels (grey = ITU-R 601 luma, alpha is
dropped), crop the centred square of side `crop_fraction * min(H, W)`, resize
it to `image_size` x `image_size` with (antialiased) bilinear filtering.
"""

from typing import Any

import numpy as np
from PIL import Image

from coe_jax.errors import CoEError, require

# Floats a little outside [0, 1] are rounding noise, not a different scale.
_FLOAT_TOLERANCE = 1e-3


def center_crop_box(height: int, width: int, crop_fraction: float) -> tuple[int, int, int]:
  """The centred square crop as (top, left, side); shared with the TF pipeline."""
  side = max(1, int(crop_fraction * min(height, width)))
  return (height - side + 1) // 2, (width - side + 1) // 2, side


def prepare_image(image: Image.Image,
                  image_size: int,
                  channels: int,
                  crop_fraction: float = 1.0) -> np.ndarray:
  """One Pillow image (any mode, any size) to model input.

  Args:
    image: a decoded Pillow image.
    image_size: side S of the square output.
    channels: C, 1 (grey) or 3 (RGB).
    crop_fraction: side of the centred square crop relative to the shorter side.

  Returns:
    uint8 array [S, S, C].
  """
  image = image.convert("L" if channels == 1 else "RGB")
  top, left, side = center_crop_box(image.height, image.width, crop_fraction)
  # Cropping first (rather than `resize(box=...)`, whose filter reaches past the
  # box) treats the crop's edges as TensorFlow's resize does. Pillow's bilinear
  # filter widens with the scale factor when shrinking: it is antialiased.
  image = image.crop((left, top, left + side, top + side)).resize((image_size, image_size),
                                                                  Image.Resampling.BILINEAR)
  return np.asarray(image, np.uint8).reshape(image_size, image_size, channels)


def _to_uint8(images: np.ndarray) -> np.ndarray:
  """uint8 as is; other integers must hold 0-255; floats must hold [0, 1]."""
  if images.dtype == np.uint8:
    return images
  if images.size == 0:
    return images.astype(np.uint8)
  low, high = images.min(), images.max()
  if np.issubdtype(images.dtype, np.integer):
    require(low >= 0 and high <= 255, "images", f"{images.dtype} in [{low}, {high}]",
            "integer images must hold values 0-255")
    return images.astype(np.uint8)
  if np.issubdtype(images.dtype, np.floating):
    require(
        bool(np.isfinite(images).all()) and low >= -_FLOAT_TOLERANCE and
        high <= 1 + _FLOAT_TOLERANCE, "images", f"{images.dtype} in [{low}, {high}]",
        "float images must hold finite values in [0, 1] (pass uint8 for 0-255 data)")
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
  raise CoEError(f"images={images.dtype}: expected uint8, integer 0-255 or float 0-1 pixels")


def preprocess_images(images: np.ndarray,
                      image_size: int,
                      channels: int,
                      crop_fraction: float = 1.0) -> np.ndarray:
  """A batch of user images to model input, as the evaluation pipeline does it.

  Args:
    images: [B, H, W] (grey) or [B, H, W, C] with C in 1 (grey), 3 (RGB),
      4 (RGBA); uint8 0-255, other integers 0-255, or floats in [0, 1].
    image_size: side S of the model input (`config.data.image_size`).
    channels: model channels (`config.data.channels`), 1 or 3.
    crop_fraction: centre crop relative to the shorter side; use
      `coe_jax.data.eval_crop_fraction(config)` to match a data set's evaluation.

  Returns:
    uint8 array [B, S, S, channels].

  Raises:
    CoEError: on a layout, dtype or value range it cannot interpret.
  """
  images = np.asarray(images)
  require(images.ndim in (3, 4), "images.shape", images.shape, "expected [B, H, W] or [B, H, W, C]")
  if images.ndim == 3:
    images = images[..., None]  # [B, H, W, 1]
  require(images.shape[-1] in (1, 3, 4), "images.shape", images.shape,
          "expected 1, 3 or 4 channels in the last axis")
  require(images.shape[1] > 0 and images.shape[2] > 0, "images.shape", images.shape,
          "expected non-empty images")
  require(channels in (1, 3), "channels", channels, "expected 1 or 3")
  require(image_size > 0, "image_size", image_size, "expected a positive size")
  require(0 < crop_fraction <= 1, "crop_fraction", crop_fraction, "expected a value in (0, 1]")
  images = _to_uint8(images)
  if images.shape[-1] == 1:
    images = images[..., 0]  # [B, H, W]: Pillow reads [H, W] as grey, [H, W, 3|4] as RGB|RGBA.
  out = np.empty((len(images), image_size, image_size, channels), np.uint8)  # [B, S, S, C]
  for i, image in enumerate(images):
    out[i] = prepare_image(Image.fromarray(image), image_size, channels, crop_fraction)
  return out


def preprocess_user_batch(images: Any,
                          image_size: int,
                          channels: int,
                          crop_fraction: float = 1.0) -> np.ndarray:
  """`preprocess_images` for a predictor's caller: checks the batch layout first.

  Args:
    images: [B, H, W] or [B, H, W, C], as a user holds them.
    image_size: S. channels: the model's C. crop_fraction: the eval centre crop.

  Returns:
    uint8 [B, S, S, C].
  """
  images = np.asarray(images)
  require(images.ndim in (3, 4) and images.shape[0] >= 1, "images.shape", images.shape,
          "expected a non-empty batch [B, H, W] or [B, H, W, C]")
  # A batch of grey images 1, 3 or 4 pixels wide is far less likely than one
  # [H, W, C] image without its batch axis.
  require(images.ndim == 4 or images.shape[-1] not in (1, 3, 4), "images.shape", images.shape,
          "looks like one [H, W, C] image; add a batch axis (images[None])")
  return preprocess_images(images, image_size, channels, crop_fraction)

"""TensorFlow image ops for the TFDS pipelines: decode, crop, resize.

Training decodes JPEGs only inside the random crop (`decode_and_crop_jpeg`,
fast DCT), which saves much of the decoding cost on ImageNet. Evaluation
decodes whole images as Pillow does and then crops, so that it gives the
pixels serving (`images.preprocess_images`) gives, to within rounding: the
partial decoder's colours differ near the crop edges by up to 20 levels.
All randomness comes from stateless ops fed explicit seeds, so an example's
augmentation depends on the seed and its stream position only.
"""

import tensorflow as tf

# Inception-style random-resized crop (Szegedy et al. 2015).
_CROP_AREA_RANGE = (0.08, 1.0)
_CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
_CROP_MIN_COVERED = 0.1
_CROP_ATTEMPTS = 10
_LUMA = (0.299, 0.587, 0.114)


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  """The whole image as uint8 RGB [H, W, 3]; grey is replicated, alpha dropped.

  JPEGs use the accurate integer DCT, which gives Pillow's pixels exactly; the
  default fast one differs by up to 10 levels.
  """
  image = tf.cond(tf.io.is_jpeg(encoded),
                  lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
                  lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
  return tf.ensure_shape(image, [None, None, 3])


def _decode_crop(encoded: tf.Tensor, crop_box_fn) -> tf.Tensor:
  """Decodes the window `crop_box_fn(shape)` -> (top, left, height, width) as RGB.

  Args:
    encoded: scalar string, an encoded image (JPEG, PNG, GIF, BMP); grey is
      replicated to RGB, alpha is dropped.
    crop_box_fn: maps the image shape [H, W, C] (int32) to the crop window.

  Returns:
    uint8 [h, w, 3].
  """

  def jpeg():
    top, left, height, width = crop_box_fn(tf.image.extract_jpeg_shape(encoded))
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack([top, left, height, width]), channels=3)

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    top, left, height, width = crop_box_fn(tf.shape(image))
    return image[top:top + height, left:left + width]

  return tf.ensure_shape(tf.cond(tf.io.is_jpeg(encoded), jpeg, other), [None, None, 3])


def _resize(image: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
  """Antialiased bilinear resize to uint8 [S, S, C], like Pillow's in `images.py`.

  Grey output uses Pillow's luma weights (ITU-R 601), not the decoders' own
  conversions, which differ between JPEG and PNG.
  """
  image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
  if channels == 1:
    image = tf.tensordot(image, tf.constant(_LUMA), axes=[[2], [0]])[..., None]  # [S, S, 1]
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def train_image(encoded: tf.Tensor, seed: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
  """Random-resized crop and horizontal flip; uint8 [S, S, C].

  Args:
    encoded: scalar string, an encoded image.
    seed: int64 [2], this example's stateless seed.
    image_size: side S of the output.
    channels: C.
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def random_box(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed,
        min_object_covered=_CROP_MIN_COVERED,
        aspect_ratio_range=_CROP_ASPECT_RANGE,
        area_range=_CROP_AREA_RANGE,
        max_attempts=_CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True)
    return begin[0], begin[1], size[0], size[1]

  image = _resize(_decode_crop(encoded, random_box), image_size, channels)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def pad_crop_flip_image(encoded: tf.Tensor, seed: tf.Tensor, image_size: int, channels: int,
                        margin: int) -> tf.Tensor:
  """The evaluation image (uncropped), zero-padded by `margin`, randomly cropped back, flipped.

  CIFAR's standard augmentation; uint8 [S, S, C]. Arguments as `train_image`'s.
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = eval_image(encoded, image_size, channels, crop_fraction=1.0)  # [S, S, C]
  padded = tf.pad(image, [[margin, margin], [margin, margin], [0, 0]])  # [S + 2m, S + 2m, C]
  image = tf.image.stateless_random_crop(padded, [image_size, image_size, channels], crop_seed)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def eval_image(encoded: tf.Tensor, image_size: int, channels: int,
               crop_fraction: float) -> tf.Tensor:
  """Centred square crop of `crop_fraction` of the shorter side, resized; uint8 [S, S, C].

  The crop box is `images.center_crop_box`, written with TF ops.
  """
  image = _decode(encoded)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.maximum(
      1, tf.cast(crop_fraction * tf.cast(tf.minimum(height, width), tf.float64), tf.int32))
  top, left = (height - side + 1) // 2, (width - side + 1) // 2
  return _resize(image[top:top + side, left:left + side], image_size, channels)

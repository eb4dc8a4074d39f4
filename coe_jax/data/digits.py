"""scikit-learn's bundled handwritten digits: the embedded default data set.

1,797 grey 8x8 images of the digits 0-9 with values 0-16, scaled to 0-255,
split 80/20 stratified by class with a fixed seed (so the test split never
depends on `config.seed`), then upsampled to `data.image_size` with the
serving transform (`images.preprocess_images`). `data.holdout_fraction` of the
80% is then held out to calibrate tau (`memory.holdout_indices`), so the test
split is the same whatever the fraction. Training batches get a small random
translation with black fill (the digits' background).
"""

import functools

import ml_collections
import numpy as np
from absl import logging
from sklearn import datasets, model_selection

from coe_jax.data import common, images, memory

_TEST_FRACTION = 0.2
_SPLIT_SEED = 0  # Fixed: every run and every seed is evaluated on the same examples.
_MAX_VALUE = 16  # load_digits pixels are counts 0-16.


@functools.lru_cache(maxsize=2)
def _load(image_size: int, channels: int, holdout_fraction: float) -> memory.Splits:
  digits = datasets.load_digits()
  pixels = np.round(digits.images * (255 / _MAX_VALUE)).astype(np.uint8)  # [n, 8, 8]
  labels = digits.target.astype(np.int32)  # [n]
  train_x, test_x, train_y, test_y = model_selection.train_test_split(pixels,
                                                                      labels,
                                                                      test_size=_TEST_FRACTION,
                                                                      stratify=labels,
                                                                      random_state=_SPLIT_SEED)
  kept, held = memory.holdout_indices(train_y, holdout_fraction)
  splits = memory.Splits(train_images=images.preprocess_images(train_x[kept], image_size, channels),
                         train_labels=train_y[kept],
                         holdout_images=images.preprocess_images(train_x[held], image_size,
                                                                 channels),
                         holdout_labels=train_y[held],
                         test_images=images.preprocess_images(test_x, image_size, channels),
                         test_labels=test_y,
                         class_names=[str(d) for d in range(10)],
                         pad_mode="constant")
  logging.info(
      "Data set digits (scikit-learn): %d train, %d held out, %d test examples, "
      "10 classes, 8x8 px upsampled to %dx%dx%d.", len(kept), len(held), len(test_y), image_size,
      image_size, channels)
  return splits


def load(config: ml_collections.ConfigDict) -> memory.Splits:
  """All three splits at `data.image_size` x `data.image_size` x `data.channels`."""
  common.check_data_config(config)
  return _load(config.data.image_size, config.data.channels, float(config.data.holdout_fraction))

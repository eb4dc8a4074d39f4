"""The digits source and the in-memory batching and hold-out it shares with image_folder."""

import itertools

import numpy as np
import pytest
from sklearn import datasets

from coe_jax import config_base, data
from coe_jax.data import digits, memory
from coe_jax.errors import CoEError


def _config(batch_size=64,
            eval_batch_size=100,
            seed=0,
            image_size=16,
            channels=3,
            holdout_fraction=0.1):
  config = config_base.base_config()
  config.seed = seed
  config.data.holdout_fraction = holdout_fraction
  config.data.image_size = image_size
  config.data.channels = channels
  config.train.batch_size = batch_size
  config.eval.batch_size = eval_batch_size
  return config


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _examples(images, labels):
  """Each example as bytes (label, then pixels), sorted: a split as a multiset."""
  return sorted(bytes([label]) + image.tobytes() for image, label in zip(images, labels))


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_shapes_and_dtypes():
  config = _config(image_size=12, channels=1)
  train = next(data.train_batches(config))
  assert train["image"].shape == (64, 12, 12, 1) and train["image"].dtype == np.uint8
  assert train["label"].shape == (64,) and train["label"].dtype == np.int32
  batch = next(data.eval_batches(config))
  assert batch["image"].shape == (100, 12, 12, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
  assert train["image"].max() > 200  # Scaled from 0-16 to 0-255.


def test_split_is_fixed_and_stratified():
  info = data.get_info(_config())
  assert (info.num_classes, info.num_train, info.num_holdout, info.num_test) == (10, 1293, 144, 360)
  assert info.class_names == [str(d) for d in range(10)]
  test_labels = np.concatenate([b["label"][b["mask"]] for b in data.eval_batches(_config())])
  per_class = np.bincount(datasets.load_digits().target)
  assert np.abs(np.bincount(test_labels) - 0.2 * per_class).max() <= 1
  # The test split does not move with the training seed.
  other = np.concatenate([b["label"][b["mask"]] for b in data.eval_batches(_config(seed=5))])
  np.testing.assert_array_equal(test_labels, other)


def test_holdout_partitions_the_training_split():
  full = digits.load(_config(holdout_fraction=0))
  for fraction in (0.1, 0.5):
    splits = digits.load(_config(holdout_fraction=fraction))
    # Disjoint and together the whole training split (as multisets, as digits has duplicates).
    assert _examples(np.concatenate([splits.train_images, splits.holdout_images]),
                     np.concatenate([splits.train_labels, splits.holdout_labels
                                    ])) == _examples(full.train_images, full.train_labels)
    assert len(splits.holdout_labels) == round(fraction * 1437)
    # Stratified: every class gives its share, to within one example.
    share = fraction * np.bincount(full.train_labels)
    assert np.abs(np.bincount(splits.holdout_labels, minlength=10) - share).max() < 1
    # The test split does not move with the hold-out.
    np.testing.assert_array_equal(splits.test_images, full.test_images)
    np.testing.assert_array_equal(splits.test_labels, full.test_labels)


def test_holdout_is_fixed_whatever_the_seed():
  passes = [list(data.eval_batches(_config(seed=seed), split="holdout")) for seed in (0, 5)]
  _assert_same(*passes)


def test_train_subset_is_a_fixed_unaugmented_draw_of_the_images_trained_on(monkeypatch):
  config = _config()
  splits = digits.load(config)
  passes = [list(data.eval_batches(_config(seed=seed), split="train_subset")) for seed in (0, 5)]
  _assert_same(*passes)  # The same images whatever the run's seed.
  images = np.concatenate([b["image"][b["mask"]] for b in passes[0]])
  labels = np.concatenate([b["label"][b["mask"]] for b in passes[0]])
  assert len(labels) == 1293  # Fewer training images than the subset's size: all of them.
  assert _examples(images, labels) == _examples(splits.train_images, splits.train_labels)
  # Larger training splits give TRAIN_SUBSET_SIZE distinct images, as they are.
  monkeypatch.setattr(data.common, "TRAIN_SUBSET_SIZE", 500)
  subset = memory.train_subset_indices(1293)
  assert len(np.unique(subset)) == 500 and np.all(np.diff(subset) > 0)
  batches = list(data.eval_batches(config, split="train_subset"))
  np.testing.assert_array_equal(np.concatenate([b["image"][b["mask"]] for b in batches]),
                                splits.train_images[subset])
  # TFDS data sets have no such split: one line, before any data is read.
  config.data.name = "cifar10"
  with pytest.raises(CoEError, match=r"split='train_subset': only the in-memory data sets"):
    data.eval_batches(config, split="train_subset")


def test_fraction_zero_holds_out_nothing():
  config = _config(holdout_fraction=0)
  info = data.get_info(config)
  assert (info.num_train, info.num_holdout) == (1437, 0)
  assert not list(data.eval_batches(config, split="holdout"))
  labels = next(data.train_batches(_config(batch_size=1437, holdout_fraction=0)))["label"]
  np.testing.assert_array_equal(np.bincount(labels), np.bincount(digits.load(config).train_labels))


def test_training_stream_is_deterministic_and_seeded():
  _assert_same(_take(data.train_batches(_config()), 3), _take(data.train_batches(_config()), 3))
  first, other = next(data.train_batches(_config())), next(data.train_batches(_config(seed=1)))
  assert not np.array_equal(first["label"], other["label"])


@pytest.mark.parametrize("start_step", [1, 20, 21])  # 1293 / 64: epoch 2 begins in step 20.
def test_start_step_equals_skipping(start_step):
  config = _config()
  skipped = _take(data.train_batches(config), start_step + 2)[start_step:]
  _assert_same(skipped, _take(data.train_batches(config, start_step=start_step), 2))


def test_epoch_visits_every_training_example_once():
  config = _config(batch_size=1293)  # One epoch of the training split less the hold-out.
  labels = next(data.train_batches(config))["label"]
  splits = digits.load(config)
  np.testing.assert_array_equal(np.sort(labels), np.sort(splits.train_labels))


def test_processes_split_each_global_batch():
  whole = _take(data.train_batches(_config(), start_step=5), 2)
  parts = [
      _take(data.train_batches(_config(), start_step=5, process_index=p, process_count=4), 2)
      for p in range(4)
  ]
  for step in range(2):
    assert parts[0][step]["image"].shape[0] == 16
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([part[step][key] for part in parts]),
                                    whole[step][key])


@pytest.mark.parametrize("split, process_count, eval_batch_size",
                         [("test", 1, 100), ("test", 1, 360), ("test", 3, 99), ("holdout", 1, 100),
                          ("holdout", 3, 99)])
def test_eval_covers_every_example_once(split, process_count, eval_batch_size):
  config = _config(eval_batch_size=eval_batch_size)
  passes = [
      list(data.eval_batches(config, p, process_count, split=split)) for p in range(process_count)
  ]
  assert len({len(batches) for batches in passes}) == 1  # Same count on every process.
  # Global batch i is the processes' batches i side by side.
  merged = {
      key: np.concatenate([b[key] for batches in zip(*passes) for b in batches])
      for key in ("image", "label", "mask")
  }
  splits = digits.load(config)
  images, labels = ((splits.test_images, splits.test_labels) if split == "test" else
                    (splits.holdout_images, splits.holdout_labels))
  size = {"test": 360, "holdout": 144}[split]
  assert len(merged["mask"]) == -(-size // eval_batch_size) * eval_batch_size
  np.testing.assert_array_equal(merged["mask"], np.arange(len(merged["mask"])) < size)
  np.testing.assert_array_equal(merged["image"][:size], images)
  np.testing.assert_array_equal(merged["label"][:size], labels)
  assert not merged["image"][size:].any() and not merged["label"][size:].any()


def test_eval_images_are_the_serving_transform_of_the_raw_digits():
  config = _config(image_size=20)
  raw = datasets.load_digits().images  # [N, 8, 8], 0-16
  served = data.preprocess_images(raw / 16.0, 20, 3)
  evaluated = np.concatenate([b["image"][b["mask"]] for b in data.eval_batches(config)])
  # Each test image is one of the raw digits, served exactly as a user would send it.
  served_set = {image.tobytes() for image in served}
  assert all(image.tobytes() in served_set for image in evaluated)


def test_translation_moves_pixels_and_fills():
  images = np.zeros((2, 5, 5, 1), np.uint8)
  images[:, 2, 2] = 9
  moved = memory._translate(images, np.array([[1, -2], [0, 0]]), "constant")
  assert moved[0, 3, 0, 0] == 9 and moved[0].sum() == 9
  np.testing.assert_array_equal(moved[1], images[1])
  edge = memory._translate(
      np.arange(5, dtype=np.uint8)[None, None, :, None].repeat(5, 1), np.array([[0, 2]]), "edge")
  np.testing.assert_array_equal(edge[0, 0, :, 0], [0, 0, 0, 1, 2])


@pytest.mark.parametrize("key, value, match", [
    ("train.batch_size", 30, "train.batch_size=30"),
    ("data.channels", 2, "data.channels=2"),
    ("data.image_size", 0, "data.image_size=0"),
    ("data.holdout_fraction", 0.6, "data.holdout_fraction=0.6"),
    ("data.holdout_fraction", -0.1, "data.holdout_fraction=-0.1"),
    ("data.holdout_fraction", 1e-4, "data.holdout_fraction=0.0001: holds out no example"),
])
def test_bad_config_is_one_line_error(key, value, match):
  config = _config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(CoEError, match=match) as error:
    next(data.train_batches(config, process_count=4))
  assert "\n" not in str(error.value)


def test_bad_process_index_and_split():
  with pytest.raises(CoEError, match="process_index=4"):
    data.eval_batches(_config(), process_index=4, process_count=4)
  with pytest.raises(CoEError, match="split='validation'"):
    data.eval_batches(_config(), split="validation")

"""TFDS sources on tiny fake data sets prepared on disk (mnist: PNG grey, imagenet2012: JPEG).

`tfds.testing.mock_data` cannot serve these tests: its splits have no sizes and
it ignores slices such as `train[10:20]`, which the sharding and the training
windows rely on. So the fakes are real prepared data sets, written with the
data sets' own features and read by TFDS as any prepared data set would be.
The fake mnist images are constant, with the example's id as the pixel value,
so an example stays recognisable through cropping and resizing. With the
default `data.holdout_fraction` of 0.1, mnist trains on train ids 5..49 and
holds out 0..4; imagenet2012 trains on 18 examples and holds out 2.
"""

import io
import itertools
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from coe_jax import config_base, data
from coe_jax.errors import CoEError
from tests.helpers import (
    IMAGENET_SIZES,
    imagenet_example,
    pad_crop_flip_candidates,
    write_prepared_tfds,
)

_MNIST = {"train": 50, "test": 23}
_TEST_ID_OFFSET = 100  # mnist test ids are 100..122, train ids 0..49.


def _mnist_example(split, i):
  value = i + (_TEST_ID_OFFSET if split == "test" else 0)
  return {"image": np.full((28, 28, 1), value, np.uint8), "label": i % 10}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  write_prepared_tfds(root, "mnist", _MNIST, _mnist_example)
  write_prepared_tfds(root, "imagenet2012", IMAGENET_SIZES, imagenet_example)
  return root


def _config(data_dir,
            name="mnist",
            batch_size=4,
            eval_batch_size=6,
            channels=1,
            image_size=8,
            shuffle_buffer=7,
            seed=0,
            holdout_fraction=0.1):
  config = config_base.base_config()
  config.seed = seed
  config.data.holdout_fraction = holdout_fraction
  config.data.name = name
  config.data.tfds_data_dir = data_dir
  config.data.image_size = image_size
  config.data.channels = channels
  config.data.shuffle_buffer = shuffle_buffer
  config.train.batch_size = batch_size
  config.eval.batch_size = eval_batch_size
  return config


def _ids(images):
  """The fake mnist id of each constant image: [b, S, S, C] -> [b]."""
  assert (images == images[:, :1, :1, :1]).all()
  return images[:, 0, 0, 0].astype(int)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_info(data_dir):
  mnist = data.get_info(_config(data_dir))
  assert (mnist.num_classes, mnist.num_train, mnist.num_holdout, mnist.num_test) == (10, 45, 5, 23)
  assert mnist.class_names[:3] == ["0", "1", "2"]
  imagenet = data.get_info(_config(data_dir, "imagenet2012"))
  # imagenet2012 has no labelled test split: evaluation uses validation.
  assert (imagenet.num_classes, imagenet.num_train, imagenet.num_holdout,
          imagenet.num_test) == (1000, 18, 2, 9)
  assert imagenet.class_names[0] == "n01440764"


@pytest.mark.parametrize("name, channels", [("mnist", 3), ("imagenet2012", 1), ("imagenet2012", 3)])
def test_shapes_and_channels(data_dir, name, channels):
  config = _config(data_dir, name, channels=channels, image_size=10)
  train = next(data.train_batches(config))
  assert train["image"].shape == (4, 10, 10, channels) and train["image"].dtype == np.uint8
  assert train["label"].shape == (4,) and train["label"].dtype == np.int32
  batch = next(data.eval_batches(config))
  assert batch["image"].shape == (6, 10, 10, channels) and batch["mask"].dtype == bool
  if name == "mnist":  # Grey replicated to RGB.
    assert (train["image"] == train["image"][..., :1]).all()


def test_every_epoch_is_a_permutation_of_the_shard(data_dir):
  ids = np.concatenate([
      _ids(b["image"]) for b in _take(data.train_batches(_config(data_dir, batch_size=5)), 27)
  ])  # Three epochs of 45.
  epochs = ids.reshape(3, 45)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(5, 50))  # Never the hold-out.
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0][:7], np.sort(epochs[0][:7]))  # Windows are shuffled.


def test_stream_is_deterministic_and_resumes_at_any_step(data_dir):
  config = _config(data_dir, name="imagenet2012", channels=3)
  # 18 examples after the hold-out: windows of 6, 6, 6; epoch 2 starts inside step 4, epoch 3
  # with step 9.
  run = _take(data.train_batches(config), 11)
  again = _take(data.train_batches(config), 11)
  for start_step in (3, 4, 9):  # Mid-epoch 1, across epochs 1 and 2, start of epoch 3.
    resumed = _take(data.train_batches(config, start_step=start_step), 2)
    for a, b in zip(run[start_step:], resumed):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
  for a, b in zip(run, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  other_seed = next(data.train_batches(_config(data_dir, "imagenet2012", channels=3, seed=1)))
  assert not np.array_equal(other_seed["image"], run[0]["image"])


def test_each_epoch_augments_an_example_anew(data_dir):
  config = _config(data_dir, name="imagenet2012", channels=3, batch_size=18, image_size=16)
  first, second = _take(data.train_batches(config), 2)  # Two epochs; labels 2..19 are ids.
  first_image = first["image"][np.argsort(first["label"])].astype(int)
  second_image = second["image"][np.argsort(second["label"])].astype(int)
  assert np.abs(first_image - second_image).mean(axis=(1, 2, 3)).min() > 1


def test_processes_train_on_disjoint_shards(data_dir):
  firsts = [
      np.concatenate([
          _ids(b["image"]) for b in _take(
              data.train_batches(_config(data_dir, batch_size=10, holdout_fraction=0.2),
                                 process_index=p,
                                 process_count=2), 4)
      ]) for p in range(2)
  ]  # Hold-out 0..9, shards 10..29 and 30..49.
  assert sorted(firsts[0]) == list(range(10, 30)) and sorted(firsts[1]) == list(range(30, 50))


def test_holdout_and_training_partition_the_train_split(data_dir):
  for fraction, holdout in ((0.1, 5), (0.0, 0)):
    config = _config(data_dir, holdout_fraction=fraction, batch_size=50 - holdout)
    held = [_ids(b["image"][b["mask"]]) for b in data.eval_batches(config, split="holdout")]
    trained = _ids(next(data.train_batches(config))["image"])  # One whole epoch.
    assert sorted(np.concatenate([*held, trained])) == list(range(50))
    assert sum(map(len, held)) == holdout == data.get_info(config).num_holdout


@pytest.mark.parametrize("split, process_count, eval_batch_size", [("test", 1, 6), ("test", 1, 23),
                                                                   ("test", 3, 6),
                                                                   ("holdout", 1, 4),
                                                                   ("holdout", 3, 6)])
def test_eval_pass_covers_every_example_once(data_dir, split, process_count, eval_batch_size):
  config = _config(data_dir, eval_batch_size=eval_batch_size, holdout_fraction=0.2)
  # The test split is ids 100..122; the hold-out is train[:10], ids 0..9.
  first, size = (_TEST_ID_OFFSET, 23) if split == "test" else (0, 10)
  passes = [
      list(data.eval_batches(config, p, process_count, split=split)) for p in range(process_count)
  ]
  # Every process yields as many batches as the largest shard needs, no more.
  largest_shard = math.ceil(size / process_count)
  assert [len(b) for b in passes
         ] == [math.ceil(largest_shard / len(passes[0][0]["mask"]))] * process_count
  ids, labels = [], []
  for batches in passes:
    for batch in batches:
      assert batch["image"].shape[0] == eval_batch_size // process_count
      assert not batch["image"][~batch["mask"]].any()
      ids.extend(_ids(batch["image"][batch["mask"]]))
      labels.extend(batch["label"][batch["mask"]])
  assert sorted(ids) == list(range(first, first + size))
  np.testing.assert_array_equal(np.array(labels), (np.array(ids) - first) % 10)
  # A second pass is the same (the decoded shard is cached).
  again = list(data.eval_batches(config, 0, process_count, split=split))
  np.testing.assert_array_equal(again[0]["image"], passes[0][0]["image"])


@pytest.mark.parametrize("split, tfds_split", [("test", "validation"), ("holdout", "train[:2]")])
def test_eval_matches_serving_preprocessing(data_dir, split, tfds_split):
  config = _config(data_dir, name="imagenet2012", channels=3, eval_batch_size=9, image_size=16)
  batch = next(data.eval_batches(config, split=split))
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  files = builder.as_dataset(split=tfds_split, decoders={"image": tfds.decode.SkipDecoding()})
  # What a user would do: decode the JPEG with Pillow, then preprocess.
  served = np.concatenate([
      data.preprocess_images(np.asarray(Image.open(io.BytesIO(ex["image"])))[None],
                             16,
                             3,
                             crop_fraction=data.eval_crop_fraction(config))
      for ex in tfds.as_numpy(files)
  ])
  difference = np.abs(served.astype(int) - batch["image"][batch["mask"]].astype(int))
  assert difference.max() <= 1  # Rounding only: no augmentation, the evaluation crop.


def test_pad_crop_flip_pads_the_whole_image_crops_and_flips(data_dir):
  """CIFAR's augmentation on TFDS: a zero-padded crop of the evaluation image, maybe flipped."""
  from coe_jax.data import tf_preprocess  # pylint: disable=g-import-not-at-top
  config = _config(data_dir, name="imagenet2012", channels=3, image_size=16, batch_size=6)
  config.data.augment = "pad_crop_flip"
  assert data.eval_crop_fraction(config) == 1.0
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  files = builder.as_dataset(split="train[2:]", decoders={"image": tfds.decode.SkipDecoding()})
  sources = [tf_preprocess.eval_image(ex["image"], 16, 3, 1.0).numpy() for ex in files]
  train = np.concatenate([b["image"] for b in _take(data.train_batches(config), 3)])
  kinds = []
  for image in train:  # [16, 16, 3]; 16 px -> margin 2, 25 shifts.
    matches = [
        k for source in sources
        for k, candidate in enumerate(pad_crop_flip_candidates(source, margin=2))
        if np.array_equal(candidate, image)
    ]
    assert matches, "not a zero-padded crop of any training image"
    kinds.append(matches[0])
  assert 0 < sum(k >= 25 for k in kinds) < len(train)  # Some flipped, some not.
  assert 0 < sum(k % 25 != 12 for k in kinds)  # Some shifted.


@pytest.mark.parametrize("fraction, match",
                         [(0.6, "expected a share of the training split in"),
                          (-0.1, "expected a share"),
                          (0.01, "holds out no example of the 50 training examples")])
def test_bad_holdout_fraction(data_dir, fraction, match):
  config = _config(data_dir, holdout_fraction=fraction)
  for make in (data.get_info, data.train_batches, data.eval_batches):
    with pytest.raises(CoEError, match=f"data.holdout_fraction={fraction}: {match}") as error:
      make(config)
    assert "\n" not in str(error.value)


def test_unknown_name(data_dir):
  with pytest.raises(CoEError, match="data.name='no_such_data'.*unknown data set"):
    data.get_info(_config(data_dir, name="no_such_data"))


def test_missing_data_set_names_it_and_the_data_dir(tmp_path):
  with pytest.raises(CoEError) as error:
    data.train_batches(_config(str(tmp_path), name="cifar10"))
  message = str(error.value)
  assert "data.name='cifar10'" in message and str(tmp_path) in message and "\n" not in message

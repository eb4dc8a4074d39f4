"""The image_folder source: layout, conversion, resizing, hold-out and every error case."""

import itertools
import os

import numpy as np
import pytest
from PIL import Image

from coe_jax import config_base, data
from coe_jax.config_loading import load_config
from coe_jax.errors import CoEError
from coe_jax.training import train
from tests.helpers import (
    IMAGE_FOLDER_CLASSES,
    make_image_folder,
    pad_crop_flip_candidates,
    save_image,
)
from tests.tiny import config_path


def _make_id_folder(root, counts):
  """A folder whose image i (train 0.., then test) is grey with value i, so it stays known."""
  ids = iter(range(256))
  for split in ("train", "test"):
    for name, count in counts.items():
      os.makedirs(os.path.join(root, split, name))
      for _ in range(count):
        i = next(ids)
        save_image(os.path.join(root, split, name, f"{i:03d}.png"), "L", i, (6, 6))
  return str(root)


def _config(path, channels=3, image_size=8, holdout_fraction=0.1, seed=0):
  config = config_base.base_config()
  config.seed = seed
  config.data.name = "image_folder"
  config.data.path = path
  config.data.holdout_fraction = holdout_fraction
  config.data.image_size = image_size
  config.data.channels = channels
  config.train.batch_size = 4
  config.eval.batch_size = 4
  return config


def _eval_pass(config, split="test"):
  batches = list(data.eval_batches(config, split=split))
  return {key: np.concatenate([b[key] for b in batches]) for key in ("image", "label", "mask")}


@pytest.fixture
def folder(tmp_path):
  root = make_image_folder(tmp_path)
  with open(os.path.join(root, "train", "cat", "notes.txt"), "w") as f:
    f.write("not an image")  # Ignored: not .png/.jpg/.jpeg.
  save_image(os.path.join(root, "train", "cat", ".hidden.png"), "L", 0, (4, 4))  # Ignored.
  return root


def test_classes_labels_and_sizes(folder):
  info = data.get_info(_config(folder))
  assert info.class_names == ["cat", "dog", "zebra"] and info.num_classes == 3
  assert (info.num_train, info.num_holdout, info.num_test) == (8, 1, 9)
  batch = _eval_pass(_config(folder))
  np.testing.assert_array_equal(batch["label"][batch["mask"]], np.repeat([0, 1, 2], 3))
  assert batch["image"].shape == (12, 8, 8, 3) and batch["image"].dtype == np.uint8
  assert batch["mask"].sum() == 9 and not batch["image"][~batch["mask"]].any()


@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_converts_to_the_model_channels(folder, channels):
  batch = _eval_pass(_config(folder, channels=channels))
  images = batch["image"][batch["mask"]].astype(int)  # [9, 8, 8, C]
  for label, (mode, value) in enumerate(IMAGE_FOLDER_CLASSES.values()):
    pixel = Image.new(mode, (1, 1), value).convert("L" if channels == 1 else "RGB")
    expected = np.asarray(pixel).reshape(channels)
    # JPEG round-trips colours to within a few levels.
    assert np.abs(images[3 * label:3 * label + 3] - expected).max() <= 3


def test_training_batches(folder):
  config = _config(folder, channels=1, image_size=6)
  batches = list(itertools.islice(data.train_batches(config, start_step=2), 3))
  assert batches[0]["image"].shape == (4, 6, 6, 1) and batches[0]["label"].dtype == np.int32
  again = list(itertools.islice(data.train_batches(config), 5))[2:]
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_pad_crop_flip_pads_with_zeros_crops_and_flips(tmp_path):
  """CIFAR's augmentation: every training image is a zero-padded crop of its own, maybe flipped."""
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for name in ("a", "b"):
      os.makedirs(tmp_path / split / name)
      for i in range(4):
        pixels = rng.integers(1, 256, (8, 8, 3), dtype=np.uint8)  # No zeros: padding shows.
        Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
  config = _config(str(tmp_path), image_size=8, holdout_fraction=0.0)
  config.data.augment = "pad_crop_flip"
  assert data.eval_crop_fraction(config) == 1.0  # Evaluated whole.
  train = np.concatenate([b["image"] for b in itertools.islice(data.train_batches(config), 8)])
  sources = [
      np.asarray(Image.open(tmp_path / "train" / name / f"{i}.png"))
      for name in ("a", "b")
      for i in range(4)
  ]  # [8, 8, 3] each
  kinds = []  # Index of the first matching candidate: shift (dy, dx) = divmod(k % 9, 3) - 1.
  for image in train:  # [8, 8, 3]; 8 px -> margin 1.
    matches = [
        k for source in sources
        for k, candidate in enumerate(pad_crop_flip_candidates(source, margin=1))
        if np.array_equal(candidate, image)
    ]
    assert matches, "not a zero-padded crop of any training image"
    kinds.append(matches[0])
  flipped = sum(k >= 9 for k in kinds)
  shifted = sum(k % 9 != 4 for k in kinds)
  assert 0 < flipped < len(train) and 0 < shifted < len(train)


def test_cifar10_config_reads_an_image_folder(tmp_path):
  """configs/cifar10.py with --config.data.name=image_folder --config.data.path=DIR."""
  rng = np.random.default_rng(0)
  classes = [f"class{i}" for i in range(10)]
  for split in ("train", "test"):
    for name in classes:
      os.makedirs(tmp_path / split / name)
      for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3),
                                     dtype=np.uint8)).save(tmp_path / split / name / f"{i}.jpg")
  config = load_config(config_path("cifar10"))
  assert config.data.name == "cifar10" and config.data.augment == "pad_crop_flip"
  config.data.name, config.data.path = "image_folder", str(tmp_path)
  config.data.holdout_fraction, config.train.batch_size = 0.0, 8
  info = data.get_info(config)
  assert (info.num_classes, info.num_train, info.num_test) == (10, 20, 20)
  batch = next(data.train_batches(config))
  assert batch["image"].shape == (8, 32, 32, 3) and data.eval_crop_fraction(config) == 1.0


def test_unsupported_augmentation_is_one_line(folder):
  config = _config(folder)
  config.data.augment = "inception_crop"
  with pytest.raises(CoEError,
                     match="data.augment='inception_crop': expected one of auto, "
                     "translate, pad_crop_flip for data.name='image_folder'"):
    list(itertools.islice(data.train_batches(config), 1))
  config.data.augment = "mixup"
  with pytest.raises(CoEError, match="data.augment='mixup': expected one of auto, translate"):
    data.eval_crop_fraction(config)


def test_holdout_is_stratified_fixed_and_apart_from_training(tmp_path):
  root = _make_id_folder(tmp_path, {"a": 5, "b": 4, "c": 3})  # Train ids 0-4, 5-8, 9-11.
  config = _config(root, channels=1, image_size=4, holdout_fraction=0.25)
  info = data.get_info(config)
  assert (info.num_train, info.num_holdout, info.num_test) == (9, 3, 12)
  # Two processes, global batch 4: the 3 held-out ids once each, the padding masked.
  passes = [list(data.eval_batches(config, p, 2, split="holdout")) for p in range(2)]
  assert [len(batches) for batches in passes] == [1, 1]
  batches = [b for batches in passes for b in batches]
  assert sum(b["mask"].sum() for b in batches) == 3
  assert not any(b["image"][~b["mask"]].any() for b in batches)
  held = np.concatenate([b["image"][b["mask"], 0, 0, 0] for b in batches]).astype(int)
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, np.searchsorted([5, 9], held, side="right"))
  assert sorted(labels) == [0, 1, 2]  # One per class: quotas 1.25, 1, 0.75.
  # Training never sees them: one epoch is exactly the other 9 train ids (the
  # translation's edge fill keeps a constant image constant).
  config.train.batch_size = 9
  trained = next(data.train_batches(config))["image"][:, 0, 0, 0].astype(int)
  assert sorted(np.concatenate([held, trained])) == list(range(12))
  # The same examples whatever the seed.
  other = _eval_pass(_config(root, channels=1, image_size=4, holdout_fraction=0.25, seed=7),
                     split="holdout")
  np.testing.assert_array_equal(other["image"][other["mask"], 0, 0, 0], held)


def test_fraction_zero_holds_out_nothing(tmp_path):
  root = _make_id_folder(tmp_path, {"a": 2, "b": 2})
  config = _config(root, channels=1, image_size=4, holdout_fraction=0)
  info = data.get_info(config)
  assert (info.num_train, info.num_holdout) == (4, 0)
  assert not list(data.eval_batches(config, split="holdout"))
  trained = next(data.train_batches(config))["image"][:, 0, 0, 0]
  assert sorted(trained) == [0, 1, 2, 3]


def _error(config):
  with pytest.raises(CoEError) as error:
    data.get_info(config)
  message = str(error.value)
  assert "\n" not in message
  return message


def test_missing_path(tmp_path):
  assert "data.path=''" in _error(_config(""))
  missing = str(tmp_path / "nowhere")
  assert missing in _error(_config(missing)) and "is not a folder" in _error(_config(missing))
  archive = tmp_path / "cifar10-dev.tar.gz"
  archive.write_bytes(b"\x1f\x8b")  # Not extracted.
  assert _error(_config(str(archive))) == (
      f"data.path={str(archive)!r}: is an archive: extract it (tar -xzf FILE -C DIR) and set "
      "data.path=DIR")


def test_a_folder_with_another_number_of_classes_than_the_config_is_refused(tmp_path):
  """configs/cifar10.py sets data.num_classes=10; a 3-class folder is named in one line."""
  config = load_config(config_path("cifar10"))
  config.data.name, config.data.path = "image_folder", make_image_folder(tmp_path)
  with pytest.raises(CoEError) as error:
    train.Trainer(config, str(tmp_path / "run"))
  assert str(error.value) == "data.num_classes=10: but the data set has 3 classes"


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_split(tmp_path, split):
  other = {"train": "test", "test": "train"}[split]
  root = make_image_folder(tmp_path, splits=(other,))
  message = _error(_config(root))
  assert root in message and f"no {split}/ folder" in message


def test_no_classes(tmp_path):
  os.makedirs(tmp_path / "train")
  os.makedirs(tmp_path / "test")
  assert "has no class folders" in _error(_config(str(tmp_path)))


def test_empty_class(tmp_path):
  root = make_image_folder(tmp_path)
  empty = os.path.join(root, "test", "yak")
  os.makedirs(empty)
  assert empty in _error(_config(root))


def test_classes_differ(tmp_path):
  root = make_image_folder(tmp_path)
  os.rename(os.path.join(root, "test", "dog"), os.path.join(root, "test", "wolf"))
  message = _error(_config(root))
  assert "only in train ['dog']" in message and "only in test ['wolf']" in message


@pytest.mark.parametrize("per_class, fraction, match", [
    (1, 0.5, "holding out 2 of the 3 training examples would leave a class with no training"),
    (3, 0.05, "holds out no example of the 9 training examples"),
    (3, 0.51, "expected a share of the training split in"),
])
def test_bad_holdout(tmp_path, per_class, fraction, match):
  root = make_image_folder(tmp_path, per_class=per_class)
  message = _error(_config(root, holdout_fraction=fraction))
  assert f"data.holdout_fraction={fraction}" in message and match in message


def test_corrupt_files_fail_naming_the_first_and_counting(tmp_path):
  root = make_image_folder(tmp_path)
  bad = [
      os.path.join(root, "train", "cat", "broken.png"),
      os.path.join(root, "train", "dog", "truncated.jpg")
  ]
  with open(bad[0], "wb") as f:
    f.write(b"definitely not a png")
  with open(os.path.join(root, "train", "dog", "1.jpg"), "rb") as f:
    head = f.read(200)
  with open(bad[1], "wb") as f:
    f.write(head)
  message = _error(_config(root))
  assert "2 of 11 image files cannot be read" in message and bad[0] in message

"""A folder of images: `DIR/train/<class>/*` and `DIR/test/<class>/*`.

Files ending in .png, .jpg or .jpeg (any case) are read with Pillow; other and
hidden files are ignored. Class names are the class folders' names, sorted,
and must be the same in both splits. Every image (grey, RGB, RGBA, palette,
...) is converted to `data.channels`, centre-cropped to a square and resized to
`data.image_size` by the serving transform (`images.prepare_image`), then kept
in memory, so the data set must fit in memory at that resolution (50,000
images at 64x64x3 take 600 MB). `data.holdout_fraction` of `train/` is held
out to calibrate tau (`memory.holdout_indices`: stratified, fixed seed).
Training batches get a small random translation with edge fill.

Corrupt files: loading fails with one CoEError that counts the unreadable
files and names the first, rather than skipping them, so a run is never
silently trained or evaluated on fewer examples than the folder holds.
"""

import concurrent.futures
import functools
import os

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from coe_jax.data import common, images, memory
from coe_jax.errors import CoEError, require

_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SPLITS = ("train", "test")
_ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")
# Pillow decodes with the GIL released, so threads give real parallelism.
_MAX_THREADS = 16


def _visible(names: list[str]) -> list[str]:
  return sorted(n for n in names if not n.startswith("."))


def _list_split(root: str, split: str) -> dict[str, list[str]]:
  """Class name -> sorted image paths of one split, with the layout checked."""
  split_dir = os.path.join(root, split)
  require(os.path.isdir(split_dir), "data.path", root,
          f"has no {split}/ folder (expected DIR/train/<class>/* and DIR/test/<class>/*)")
  classes = [
      c for c in _visible(os.listdir(split_dir)) if os.path.isdir(os.path.join(split_dir, c))
  ]
  require(bool(classes), "data.path", root, f"{split_dir} has no class folders")
  files = {}
  for name in classes:
    class_dir = os.path.join(split_dir, name)
    files[name] = [
        os.path.join(class_dir, f)
        for f in _visible(os.listdir(class_dir))
        if f.lower().endswith(_EXTENSIONS) and os.path.isfile(os.path.join(class_dir, f))
    ]
    require(bool(files[name]), "data.path", root,
            f"class folder {class_dir} has no .png/.jpg/.jpeg files")
  return files


def _read(path: str, image_size: int, channels: int) -> np.ndarray | str:
  """The image at model resolution, or why it cannot be read."""
  try:
    with Image.open(path) as image:
      return images.prepare_image(image, image_size, channels)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    return f"{type(e).__name__}: {e}"


def _check_readable(root: str, paths: list[str], results: list[np.ndarray | str]) -> None:
  failed = [(p, r) for p, r in zip(paths, results) if isinstance(r, str)]
  if failed:
    path, reason = failed[0]
    raise CoEError(f"data.path={root!r}: {len(failed)} of {len(paths)} image files cannot be "
                   f"read, the first is {path} ({reason}); fix or remove them")


def load_test_split(root: str, image_size: int,
                    channels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(images uint8 [T, S, S, C], labels int32 [T], class names) of `root/test/` alone.

  For evaluating a trained run on a folder: its train/ split is not read.
  """
  require(os.path.isdir(root), "data_path", root, "does not exist or is not a folder")
  files = _list_split(root, "test")
  classes = list(files)
  paths = [p for name in classes for p in files[name]]
  labels = np.array([label for label, name in enumerate(classes) for _ in files[name]], np.int32)
  read = functools.partial(_read, image_size=image_size, channels=channels)
  with concurrent.futures.ThreadPoolExecutor(min(_MAX_THREADS, os.cpu_count() or 1)) as pool:
    results = list(pool.map(read, paths))
  _check_readable(root, paths, results)
  return np.array(results, np.uint8).reshape(len(paths), image_size, image_size,
                                             channels), labels, classes


@functools.lru_cache(maxsize=2)
def _load(root: str, image_size: int, channels: int, holdout_fraction: float) -> memory.Splits:
  require(bool(root), "data.path", root, "data.name=image_folder needs data.path=DIR")
  require(not (os.path.isfile(root) and root.endswith(_ARCHIVES)), "data.path", root,
          "is an archive: extract it (tar -xzf FILE -C DIR) and set data.path=DIR")
  require(os.path.isdir(root), "data.path", root, "does not exist or is not a folder")
  listing = {split: _list_split(root, split) for split in _SPLITS}
  train_classes, test_classes = list(listing["train"]), list(listing["test"])
  require(
      train_classes == test_classes, "data.path", root,
      f"train and test class folders differ: only in train "
      f"{sorted(set(train_classes) - set(test_classes))}, only in test "
      f"{sorted(set(test_classes) - set(train_classes))}")
  paths, labels = {}, {}
  for split, files in listing.items():
    paths[split] = [p for name in train_classes for p in files[name]]
    labels[split] = np.array(
        [label for label, name in enumerate(train_classes) for _ in files[name]],
        np.int32)  # [n], the split's examples
  # Before any image is read, so that a bad hold-out fails at once.
  kept, held = memory.holdout_indices(labels["train"], holdout_fraction)
  read = functools.partial(_read, image_size=image_size, channels=channels)
  with concurrent.futures.ThreadPoolExecutor(min(_MAX_THREADS, os.cpu_count() or 1)) as pool:
    results = {split: list(pool.map(read, paths[split])) for split in _SPLITS}
  for split in _SPLITS:
    _check_readable(root, paths[split], results[split])

  def stack(split: str, indices: np.ndarray) -> np.ndarray:
    # From the per-image arrays, so the training split is never in memory twice.
    return np.array([results[split][i] for i in indices],
                    np.uint8).reshape(len(indices), image_size, image_size,
                                      channels)  # [n, S, S, C], n may be 0

  logging.info(
      "Data set image_folder %s: %d train, %d held out, %d test examples, %d "
      "classes %s, at %dx%dx%d.", root, len(kept), len(held), len(labels["test"]),
      len(train_classes), train_classes[:20], image_size, image_size, channels)
  return memory.Splits(train_images=stack("train", kept),
                       train_labels=labels["train"][kept],
                       holdout_images=stack("train", held),
                       holdout_labels=labels["train"][held],
                       test_images=stack("test", np.arange(len(labels["test"]))),
                       test_labels=labels["test"],
                       class_names=train_classes,
                       pad_mode="edge")


def load(config: ml_collections.ConfigDict) -> memory.Splits:
  """The three splits of the folder at `data.path`, at model resolution."""
  common.check_data_config(config)
  return _load(config.data.path, config.data.image_size, config.data.channels,
               float(config.data.holdout_fraction))

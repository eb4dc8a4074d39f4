"""Batches from a data set held in memory as numpy arrays (digits, image_folder).

Hold-out: `holdout_indices` sets aside round(`data.holdout_fraction` * n) of
the n training examples to calibrate tau, stratified by class (each class
gives its share, the rounding remainders going to the largest fractional
shares) and drawn with a fixed seed, so every run of a config, whatever its
`seed`, holds out the same examples. They are never in a training batch;
`eval_batches(..., split="holdout")` passes over them as over the test split.

Determinism and resumption: the training stream is the endless concatenation
of one permutation of the training set per epoch, each drawn from
(seed, epoch). Global batch k is positions [k*B, (k+1)*B) of that stream and
process p takes its rows [p*b, (p+1)*b) (b = B / process_count), so a batch is
a pure function of (seed, k): starting at step k costs nothing, and the global
batch does not depend on the number of processes. The random translation is
drawn per global batch from (seed, k) for the same reason, and so is the
horizontal flip of `pad_crop_flip` (`data.augment`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Iterator

import numpy as np

from coe_jax.data import common
from coe_jax.errors import require

if TYPE_CHECKING:
  import ml_collections

# Salts that keep the random streams of different uses apart.
_PERMUTATION_SALT = 1
_TRANSLATION_SALT = 2
# Fixed, not `config.seed`: every run of a config holds out the same examples.
_HOLDOUT_SEED = 0
# Largest random translation, as a fraction of the image side.
_MAX_SHIFT_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Splits:
  """A data set in memory, already at model resolution.

  Attributes:
    train_images: uint8 [n_train, S, S, C], the examples trained on.
    train_labels: int32 [n_train].
    holdout_images: uint8 [n_holdout, S, S, C], held out of the training split
      to calibrate tau; n_holdout may be 0.
    holdout_labels: int32 [n_holdout].
    test_images: uint8 [n_test, S, S, C].
    test_labels: int32 [n_test].
    class_names: name of each label.
    pad_mode: `np.pad` mode for the pixels a translation uncovers.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  holdout_images: np.ndarray
  holdout_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: list[str]
  pad_mode: str


def info(splits: Splits) -> common.DataInfo:
  """The summary of an in-memory data set."""
  return common.DataInfo(num_classes=len(splits.class_names),
                         class_names=list(splits.class_names),
                         num_train=len(splits.train_labels),
                         num_holdout=len(splits.holdout_labels),
                         num_test=len(splits.test_labels))


def holdout_indices(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Splits a training split into the examples trained on and the stratified hold-out.

  Class k gives floor(h * n_k / n) of its n_k examples, h = round(fraction * n);
  the rest of h goes one each to the classes with the largest remainders (ties
  broken at random), skipping classes that would lose their last training
  example. Which examples of a class are held out is random. All draws use
  `_HOLDOUT_SEED`.

  Args:
    labels: int [n], the training split's labels.
    fraction: the checked `data.holdout_fraction`, in [0, 0.5].

  Returns:
    (train, holdout): sorted int indices into `labels`, [n - h] and [h],
    disjoint and together 0..n-1.

  Raises:
    CoEError: if the hold-out would be empty while `fraction` > 0, or would
      leave a class with no training example.
  """
  size = len(labels)
  num_holdout = common.holdout_size(fraction, size)
  counts = np.bincount(labels)  # [K]
  # h < n, so the floors leave every class at least one training example.
  quotas = num_holdout * counts / size  # [K]
  takes = np.floor(quotas).astype(np.int64)  # [K]
  rng = np.random.default_rng(_HOLDOUT_SEED)
  by_remainder = np.lexsort((rng.permutation(len(counts)), takes - quotas))  # [K]
  can_give = by_remainder[takes[by_remainder] + 1 < counts[by_remainder]]
  missing = num_holdout - int(takes.sum())
  require(
      missing <= len(can_give), "data.holdout_fraction", fraction,
      f"holding out {num_holdout} of the {size} training examples would leave a class "
      "with no training example")
  takes[can_give[:missing]] += 1
  held = np.zeros(size, bool)  # [n]
  for label, take in enumerate(takes):
    held[rng.permutation(np.flatnonzero(labels == label))[:take]] = True
  return np.flatnonzero(~held), np.flatnonzero(held)


def _seed_entropy(seed: int) -> int:
  # SeedSequence wants non-negative entropy; this keeps distinct seeds distinct.
  return seed % 2**64


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
  """The order of the training set in `epoch` (cached: a batch touches 1-2 epochs)."""
  rng = np.random.default_rng([_seed_entropy(seed), _PERMUTATION_SALT, epoch])
  permutation = rng.permutation(size)
  permutation.flags.writeable = False
  return permutation


def _translate(images: np.ndarray, shifts: np.ndarray, pad_mode: str) -> np.ndarray:
  """Shifts each image by its own (dy, dx), filling uncovered pixels per `pad_mode`.

  Args:
    images: [b, S, S, C].
    shifts: int [b, 2], each in [-m, m].
    pad_mode: `np.pad` mode.

  Returns:
    [b, S, S, C], same dtype.
  """
  b, size = images.shape[:2]
  margin = int(np.abs(shifts).max(initial=0))
  padded = np.pad(images, ((0, 0), (margin, margin), (margin, margin), (0, 0)),
                  mode=pad_mode)  # [b, S+2m, S+2m, C]
  rows = margin - shifts[:, 0, None] + np.arange(size)  # [b, S]
  cols = margin - shifts[:, 1, None] + np.arange(size)  # [b, S]
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train_batches(splits: Splits, config: ml_collections.ConfigDict, start_step: int,
                  process_index: int, process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches from step `start_step` on; see the module docstring.

  Returns:
    An endless iterator of dicts: `image` uint8 [b, S, S, C], `label` int32 [b].
  """
  global_batch = config.train.batch_size
  batch = common.local_batch_size("train.batch_size", global_batch, process_index, process_count)
  own_rows = slice(process_index * batch, (process_index + 1) * batch)
  augment = common.augmentation(config, in_memory=True)
  return _train_stream(splits, config.seed, global_batch, own_rows, start_step, augment)


def _train_stream(splits: Splits, seed: int, global_batch: int, own_rows: slice, step: int,
                  augment: str) -> Iterator[dict[str, np.ndarray]]:
  size, side = len(splits.train_labels), splits.train_images.shape[1]
  if augment == "pad_crop_flip":
    # A crop of the zero-padded image is a translation with zeros filled in.
    max_shift, pad_mode = common.pad_crop_margin(side), "constant"
  else:
    max_shift, pad_mode = int(_MAX_SHIFT_FRACTION * side), splits.pad_mode
  while True:
    positions = step * global_batch + np.arange(global_batch)[own_rows]  # [b]
    epochs, offsets = np.divmod(positions, size)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      indices[here] = _epoch_permutation(seed, int(epoch), size)[offsets[here]]
    rng = np.random.default_rng([_seed_entropy(seed), _TRANSLATION_SALT, step])
    shifts = rng.integers(-max_shift, max_shift + 1, size=(global_batch, 2))[own_rows]  # [b, 2]
    images = _translate(splits.train_images[indices], shifts, pad_mode)  # [b, S, S, C]
    if augment == "pad_crop_flip":
      flips = (rng.random(global_batch) < 0.5)[own_rows]  # [b]
      images[flips] = images[flips, :, ::-1]
    yield {"image": images, "label": splits.train_labels[indices]}
    step += 1


def eval_batches(splits: Splits, config: ml_collections.ConfigDict, process_index: int,
                 process_count: int, split: str) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the test split, the hold-out or the train subset in order; padded
  rows have `mask` False.

  Global batch i is the split's examples [i*B, (i+1)*B) and process p takes
  rows [p*b, (p+1)*b) of it, so every process yields the same number of
  batches and every example appears exactly once over all processes. An empty
  hold-out yields no batches.

  Returns:
    An iterator of dicts: `image` uint8 [b, S, S, C], `label` int32 [b], `mask`
    bool [b].
  """
  global_batch = config.eval.batch_size
  batch = common.local_batch_size("eval.batch_size", global_batch, process_index, process_count)
  if split == "holdout":
    images, labels = splits.holdout_images, splits.holdout_labels
  elif split == "train_subset":
    subset = train_subset_indices(len(splits.train_labels))
    images, labels = splits.train_images[subset], splits.train_labels[subset]
  else:
    images, labels = splits.test_images, splits.test_labels
  return _eval_pass(images, labels, global_batch, process_index * batch, batch)


def train_subset_indices(num_train: int) -> np.ndarray:
  """The `train_subset` split: `common.TRAIN_SUBSET_SIZE` of the training
  examples, a fixed draw (the same for every run of a data set), in order."""
  size = min(common.TRAIN_SUBSET_SIZE, num_train)
  return np.sort(np.random.default_rng(0).choice(num_train, size, replace=False))


def _eval_pass(images: np.ndarray, labels: np.ndarray, global_batch: int, first_row: int,
               batch: int) -> Iterator[dict[str, np.ndarray]]:
  size = len(labels)
  for start in range(0, size, global_batch):
    positions = start + first_row + np.arange(batch)  # [b]
    mask = positions < size
    indices = np.where(mask, positions, 0)
    # Padding rows are zeroed, so they cannot be mistaken for real examples.
    image = np.where(mask[:, None, None, None], images[indices], 0).astype(np.uint8)
    label = np.where(mask, labels[indices], 0).astype(np.int32)
    yield {"image": image, "label": label, "mask": mask}

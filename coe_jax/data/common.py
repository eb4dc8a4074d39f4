"""What every data source shares: the data set summary and argument checks."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from coe_jax import config_base
from coe_jax.errors import require

if TYPE_CHECKING:
  import ml_collections

# Evaluation centre crop of TFDS data sets, as in the Inception and MobileNet papers.
TFDS_CROP_FRACTION = 0.875
# Training augmentations (`data.augment`):
#   translate: a random shift of up to a tenth of the side, the uncovered
#     pixels filled by the source (zeros for digits, edge pixels for folders);
#   inception_crop: a random-resized crop (8-100% of the area, aspect 3/4-4/3)
#     and a horizontal flip; evaluation takes a centred crop of
#     TFDS_CROP_FRACTION, as in the Inception and MobileNet papers;
#   pad_crop_flip: CIFAR's standard, zero-padding by an eighth of the side
#     (4 px at 32 px), a random crop back to the side, and a horizontal flip.
# `auto` is translate for the in-memory sources, inception_crop for TFDS.
IN_MEMORY_AUGMENTATIONS = ("translate", "pad_crop_flip")
TFDS_AUGMENTATIONS = ("inception_crop", "pad_crop_flip")
# What `eval_batches` can pass over: the evaluation split, the examples held
# out of the training split to calibrate tau, or (in-memory sources) a fixed
# subset of the images trained on, unaugmented: top-1 there beside the test
# split's shows how far a network fits its training data (the regime check).
EVAL_SPLITS = ("test", "holdout", "train_subset")
# Images in the `train_subset` split (all of them when the training split is smaller).
TRAIN_SUBSET_SIZE = 5000


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """A data set's summary.

  Attributes:
    num_classes: K, the number of classes; labels are 0..K-1.
    class_names: K names, index = label.
    num_train: examples trained on: the training split less the hold-out.
    num_holdout: examples of the training split held out to calibrate tau
      (`data.holdout_fraction`); 0 when there is no hold-out.
    num_test: examples in the evaluation split.
  """
  num_classes: int
  class_names: list[str]
  num_train: int
  num_holdout: int
  num_test: int


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """Checks the `data` keys every source reads, by `config_base`'s rules.

  A source can be opened with a config no entry point has validated (a
  notebook's), and a bad value must still fail in one line.
  """
  config_base.check(config, "data.image_size", "data.channels", "data.holdout_fraction",
                    "data.augment")


def augmentation(config: ml_collections.ConfigDict, in_memory: bool) -> str:
  """`data.augment` with `auto` resolved, checked against what the source supports."""
  choice = config.data.augment
  supported = IN_MEMORY_AUGMENTATIONS if in_memory else TFDS_AUGMENTATIONS
  if choice == "auto":
    return supported[0]
  config_base.check(config, "data.augment")
  require(choice in supported, "data.augment", choice,
          f"expected one of auto, {', '.join(supported)} for data.name={config.data.name!r}")
  return choice


def pad_crop_margin(image_size: int) -> int:
  """pad_crop_flip's padding: an eighth of the side (CIFAR's 4 px at 32 px), at least 1."""
  return max(1, image_size // 8)


def check_eval_split(split: str) -> None:
  """Checks the `split` argument of `eval_batches`."""
  require(split in EVAL_SPLITS, "split", split, f"expected one of {EVAL_SPLITS}")


def holdout_size(fraction: float, num_examples: int) -> int:
  """How many of `num_examples` training examples to hold out: round(fraction * num_examples).

  Raises:
    CoEError: if a positive fraction holds out no example.
  """
  size = round(fraction * num_examples)
  require(
      size > 0 or fraction == 0, "data.holdout_fraction", fraction,
      f"holds out no example of the {num_examples} training examples; raise it, or set 0 "
      "to calibrate on the test split")
  return size


def local_batch_size(key: str, global_batch_size: int, process_index: int,
                     process_count: int) -> int:
  """This process's share of a global batch: `global_batch_size // process_count`.

  Args:
    key: the config key of the global batch size, for the error message.
    global_batch_size: the batch over all processes.
    process_index: this process, 0..process_count-1.
    process_count: number of processes (hosts).

  Raises:
    CoEError: unless the global batch splits evenly over the processes.
  """
  require(process_count >= 1 and 0 <= process_index < process_count, "process_index", process_index,
          f"expected 0 <= process_index < process_count={process_count}")
  require(global_batch_size > 0 and global_batch_size % process_count == 0, key, global_batch_size,
          f"expected a positive multiple of the {process_count} processes")
  return global_batch_size // process_count

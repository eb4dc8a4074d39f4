"""Input pipelines: training and evaluation batches, and the serving transform.

    info = data.get_info(config)
    for batch in data.train_batches(config, start_step, process_index, process_count): ...
    for batch in data.eval_batches(config, process_index, process_count): ...
    for batch in data.eval_batches(config, process_index, process_count, split="holdout"): ...
    pixels = data.preprocess_images(images, image_size, channels,
                                    crop_fraction=data.eval_crop_fraction(config))

`data.name` picks the source: `digits` (scikit-learn, in memory), `image_folder`
(`data.path`, in memory) or any prepared TFDS image classification data set.
Batches are numpy dicts with uint8 images at the final resolution,
[b, S, S, C] with S = `data.image_size`, C = `data.channels`, and int32
labels; networks normalise on the device. b is the global batch size divided
by `process_count`. Training batches are a pure function of `seed`, the step
and the process layout, and evaluation makes one padded, masked pass with
every example on exactly one process; the source modules say how.

Hold-out: `data.holdout_fraction` of the training split is set aside, the same
examples in every run of a config, to calibrate the early-exit threshold tau;
training never sees it. `eval_batches(..., split="holdout")` passes over it
exactly as over the test split (evaluation preprocessing, padded, masked).
`DataInfo.num_train` counts the examples trained on, `num_holdout` the
held-out ones; fraction 0 gives no hold-out and a pass over it yields nothing.

Only numpy and Pillow are imported here, so the serving runtime can use
`preprocess_images` without TensorFlow, JAX or scikit-learn; each source is
imported when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Iterator

import numpy as np

from coe_jax.data import common, memory
from coe_jax.data.common import DataInfo
from coe_jax.data.images import preprocess_images
from coe_jax.errors import CoEError

if TYPE_CHECKING:
  import ml_collections

__all__ = [
    "DataInfo", "eval_batches", "eval_crop_fraction", "get_info", "has_train_subset",
    "preprocess_images", "train_batches"
]

_IN_MEMORY = ("digits", "image_folder")  # Module names under coe_jax.data.


def _source(name: str):
  """The module that implements data set `name`, imported on first use."""
  if name in _IN_MEMORY:
    return importlib.import_module(f"coe_jax.data.{name}")
  try:
    return importlib.import_module("coe_jax.data.tfds_source")
  except ImportError as e:  # No TensorFlow wheel on aarch64 (GH200/GB200 nodes).
    raise CoEError(f"data.name={name!r}: TFDS data sets are read through TensorFlow, which "
                   f"cannot be imported here ({e}); use data.name=image_folder or digits, which "
                   "need no TensorFlow") from None


def has_train_subset(config: ml_collections.ConfigDict) -> bool:
  """Whether `eval_batches` can pass over the `train_subset` split (in-memory data sets)."""
  return config.data.name in _IN_MEMORY


def eval_crop_fraction(config: ml_collections.ConfigDict) -> float:
  """The centre crop of evaluation; pass it to `preprocess_images` when serving."""
  augment = common.augmentation(config, config.data.name in _IN_MEMORY)
  return common.TFDS_CROP_FRACTION if augment == "inception_crop" else 1.0


def get_info(config: ml_collections.ConfigDict) -> DataInfo:
  """Classes and split sizes (train, hold-out, test) of the data set `config.data`.

  Raises:
    CoEError: on a bad data config or missing data.
  """
  if config.data.name in _IN_MEMORY:
    return memory.info(_source(config.data.name).load(config))
  return _source(config.data.name).get_info(config)


def train_batches(config: ml_collections.ConfigDict,
                  start_step: int = 0,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The endless training stream from step `start_step` on; never holds a held-out example.

  Args:
    config: the experiment config (`data.*`, `train.batch_size`, `seed`).
    start_step: first step to yield; a resumed run sees the batches an
      uninterrupted run would have seen from this step on.
    process_index: this process (host), 0..process_count-1.
    process_count: number of processes; each yields its part of every batch.

  Returns:
    An endless iterator of dicts with `image` uint8 [b, S, S, C] and `label`
    int32 [b], b = `train.batch_size // process_count`.

  Raises:
    CoEError: on a bad data config or batch size, or missing data.
  """
  if config.data.name in _IN_MEMORY:
    return memory.train_batches(
        _source(config.data.name).load(config), config, start_step, process_index, process_count)
  return _source(config.data.name).train_batches(config, start_step, process_index, process_count)


def eval_batches(config: ml_collections.ConfigDict,
                 process_index: int = 0,
                 process_count: int = 1,
                 split: str = "test") -> Iterator[dict[str, np.ndarray]]:
  """One complete pass over the evaluation split or the hold-out.

  Args:
    config: the experiment config (`data.*`, `eval.batch_size`).
    process_index: this process (host), 0..process_count-1.
    process_count: number of processes; together they see every example once.
    split: "test", the evaluation split, or "holdout", the examples held out
      of the training split to calibrate tau (none when
      `data.holdout_fraction` is 0: then no batches).

  Returns:
    An iterator of dicts with `image` uint8 [b, S, S, C], `label` int32 [b]
    and `mask` bool [b], b = `eval.batch_size // process_count`; the last
    batches are padded and the padding rows have `mask` False. Every process
    yields the same number of batches.

  Raises:
    CoEError: on a bad split, data config or batch size, or missing data.
  """
  common.check_eval_split(split)
  if split == "train_subset" and not has_train_subset(config):
    raise CoEError(f"split='train_subset': only the in-memory data sets {_IN_MEMORY} have it, "
                   f"not data.name={config.data.name!r}")
  if config.data.name in _IN_MEMORY:
    return memory.eval_batches(
        _source(config.data.name).load(config), config, process_index, process_count, split)
  return _source(config.data.name).eval_batches(config, process_index, process_count, split)

"""TFDS image-classification data sets (imagenet2012, mnist, ...), already prepared.

Data is read from `data.tfds_data_dir` (empty: the TFDS default) and never
downloaded at run time. Evaluation uses the `test` split, or `validation`
where there is no `test` (imagenet2012). Images are decoded, converted to
`data.channels` and augmented by `tf_preprocess` as `data.augment` says: by
default an Inception-style random-resized crop and a horizontal flip for
training and a centred crop of `common.TFDS_CROP_FRACTION` of the shorter
side for evaluation; with `pad_crop_flip` (CIFAR), a pad, random crop and
flip of the whole image, evaluated whole. TensorFlow
only feeds data and is kept off any accelerator.

Hold-out: the first h = round(`data.holdout_fraction` * n) of the n examples
of `train` (`train[:h]`), a fixed slice, are held out to calibrate tau and
evaluated like the test split; training reads `train[h:]` only. TFDS shuffles
examples when it prepares a data set, so the slice is a random sample of the
split, though not a stratified one; that every class keeps training examples
is not checked, as it would mean reading the whole split.

Sharding: process p owns the examples [p*n/process_count, (p+1)*n/process_count)
of each part it reads (`train[h:]`, the hold-out, the evaluation split; n
examples), read as absolute TFDS slices (`train[a:b]`). A process trains on its
own shard only; the evaluation shards together hold every example once.

Determinism and resumption. The training stream of a process is a pure
function of (seed, process, position), built without a stateful shuffle buffer:
- the shard is cut into windows of about `data.shuffle_buffer` examples (TFDS
  sub-splits), read whole, still encoded;
- epoch e visits the windows in an order drawn from (seed, process, e) and
  permutes each window by a draw from (seed, process, e, window);
- batch k is stream positions [k*b, (k+1)*b), and the example at position i
  is augmented with stateless ops seeded by (seed, process, i).
Starting at step k therefore reads (never decodes) the one window that holds
position k*b and drops the examples before it: one window of I/O, not k
batches. The cost is memory for up to three encoded windows (the one being
decoded, the next one loading in the background, one prefetched; about 3.3 GB
for ImageNet at the default 10,000) and mixing within a window, not across
the whole shard (TFDS shuffles examples when it prepares a data set, so a
window is already a random sample). Building the stream opens every window (a
few hundredths of a second each; ImageNet on one process has 128).

Caching (`data.cache`): the training shard's encoded records stay in memory
after their first read and the evaluation shard is kept decoded, each only
when it takes at most `_CACHE_LIMIT_BYTES` per process.
"""

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from coe_jax.data import common, tf_preprocess
from coe_jax.errors import CoEError, require

_TRAIN_SPLIT = "train"
_EVAL_SPLITS = ("test", "validation")  # The first one present is used.
_CACHE_LIMIT_BYTES = 4 * 2**30
_PREFETCH_BATCHES = 16  # Covers the pause while a window loads.
_ENDLESS = 2**62  # Epochs: the training stream never ends.
# Salts that keep the random streams of different uses apart.
_ORDER_SALT, _WINDOW_SALT, _EXAMPLE_SALT = 1, 2, 3


def _hide_accelerators() -> None:
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError as e:  # TensorFlow had already claimed its devices.
    logging.warning("Could not hide GPUs from TensorFlow: %s", e)


_hide_accelerators()


@dataclasses.dataclass(frozen=True)
class _Source:
  """A prepared TFDS data set and the parts of it this project uses."""
  builder: tfds.core.DatasetBuilder
  image_key: str
  label_key: str
  eval_split: str

  def num_examples(self, split: str) -> int:
    return self.builder.info.splits[split].num_examples


@functools.lru_cache(maxsize=4)
def _source(name: str, data_dir: str) -> _Source:
  """Opens data set `name` and checks it is a prepared image classification set."""
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.DatasetNotFoundError:
    raise CoEError(f"data.name={name!r}: unknown data set; expected digits, image_folder "
                   "or the name of a TFDS image classification data set") from None
  require(
      builder.is_prepared(), "data.name", name,
      f"not found in the TFDS data dir {builder.data_dir_root} (nothing is downloaded at "
      f"run time: run `tfds build {name}` there first, or set data.tfds_data_dir)")
  info = builder.info
  keys = info.supervised_keys
  image_key, label_key = keys if (isinstance(keys, tuple) and len(keys) == 2 and
                                  all(isinstance(k, str) for k in keys)) else ("image", "label")
  features = dict(info.features.items())
  require(
      isinstance(features.get(image_key), tfds.features.Image) and
      isinstance(features.get(label_key), tfds.features.ClassLabel), "data.name", name,
      f"is not an image classification data set (needs an Image feature {image_key!r} "
      f"and a ClassLabel {label_key!r})")
  eval_split = next((s for s in _EVAL_SPLITS if s in info.splits), None)
  require(_TRAIN_SPLIT in info.splits and eval_split is not None, "data.name", name,
          f"needs a train split and a test or validation split; has {sorted(info.splits)}")
  source = _Source(builder, image_key, label_key, eval_split)
  names = features[label_key].names
  logging.info("Data set %s (TFDS %s, %s): %d train, %d %s examples, %d classes %s.", name,
               info.version, builder.data_dir, source.num_examples(_TRAIN_SPLIT),
               source.num_examples(eval_split), eval_split, len(names), names[:20])
  return source


def _open(config: ml_collections.ConfigDict) -> tuple[_Source, int]:
  """The data set and h, the size of the hold-out `train[:h]`, with the config checked."""
  common.check_data_config(config)
  fraction = float(config.data.holdout_fraction)
  source = _source(config.data.name, config.data.tfds_data_dir)
  return source, common.holdout_size(fraction, source.num_examples(_TRAIN_SPLIT))


def get_info(config: ml_collections.ConfigDict) -> common.DataInfo:
  """The summary of the TFDS data set `data.name`."""
  source, holdout = _open(config)
  names = list(source.builder.info.features[source.label_key].names)
  return common.DataInfo(num_classes=len(names),
                         class_names=names,
                         num_train=source.num_examples(_TRAIN_SPLIT) - holdout,
                         num_holdout=holdout,
                         num_test=source.num_examples(source.eval_split))


def _shard(size: int, parts: int, index: int) -> tuple[int, int]:
  """[start, end) of part `index` when `size` examples are cut into `parts` even parts."""
  return index * size // parts, (index + 1) * size // parts


def _read(source: _Source, split: str, start: int, end: int) -> tf.data.Dataset:
  """Examples [start, end) of `split` in file order as (encoded image, int32 label)."""
  data = source.builder.as_dataset(
      split=f"{split}[{start}:{end}]",
      shuffle_files=False,
      decoders={source.image_key: tfds.decode.SkipDecoding()},
      # Caching is decided here, per shard, not by TFDS per sub-split.
      read_config=tfds.ReadConfig(try_autocache=False))
  return data.map(lambda ex: (ex[source.image_key], tf.cast(ex[source.label_key], tf.int32)))


def _use_cache(enabled: bool, name: str, what: str, num_bytes: float) -> bool:
  """Whether to cache `what` (`num_bytes` per process) in memory; logs the decision."""
  cache = enabled and num_bytes <= _CACHE_LIMIT_BYTES
  logging.info("Data set %s: %s take %.2f GB per process, %s.", name, what, num_bytes / 1e9,
               "cached in memory" if cache else "not cached")
  return cache


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _training_stream(source: _Source, config: ml_collections.ConfigDict, start: int, holdout: int,
                     process_index: int, process_count: int) -> tf.data.Dataset:
  """This process's endless stream of (encoded, label) from position `start` on.

  It reads this process's shard of `train[holdout:]`, never the hold-out.
  """
  size_all = source.num_examples(_TRAIN_SPLIT)
  lo, hi = _shard(size_all - holdout, process_count, process_index)
  first, size = holdout + lo, hi - lo
  require(
      size > 0, "data.name", config.data.name,
      f"has {size_all - holdout} training examples after the hold-out, too few for "
      f"{process_count} processes")
  num_windows = math.ceil(size / max(1, config.data.shuffle_buffer))
  cache = _use_cache(
      bool(config.data.cache), config.data.name, "training records",
      source.builder.info.splits[_TRAIN_SPLIT].num_bytes * (size_all - holdout) / size_all /
      process_count)
  windows, sizes = [], []
  for w in range(num_windows):
    lo, hi = _shard(size, num_windows, w)
    data = _read(source, _TRAIN_SPLIT, first + lo, first + hi)
    windows.append((data.cache() if cache else data).batch(hi - lo))  # One element.
    sizes.append(hi - lo)
  sizes = tf.constant(sizes, tf.int64)  # [num_windows]
  base_seed = tf.constant([config.seed, process_index], tf.int64)
  order_seed, window_seed = (tf.random.experimental.stateless_fold_in(base_seed, salt)
                             for salt in (_ORDER_SALT, _WINDOW_SALT))
  start_epoch, start_offset = divmod(start, size)

  def epoch_windows(epoch: tf.Tensor) -> tf.data.Dataset:
    """The windows of `epoch` from the one holding the start position, permuted."""
    offset = tf.where(epoch == start_epoch, tf.constant(start_offset, tf.int64), 0)
    order = tf.random.experimental.stateless_shuffle(tf.range(num_windows, dtype=tf.int64),
                                                     tf.random.experimental.stateless_fold_in(
                                                         order_seed, epoch))  # [num_windows]
    ends = tf.cumsum(tf.gather(sizes, order))  # [num_windows], stream offset where each ends
    current = tf.searchsorted(ends, offset[None], side="right")[0]
    skip = offset - (ends[current] - sizes[order[current]])
    visits = order[current:]  # [V]
    skips = tf.concat([skip[None], tf.zeros_like(visits[1:])], 0)  # [V]
    chosen = tf.data.Dataset.choose_from_datasets(windows,
                                                  tf.data.Dataset.from_tensor_slices(visits))

    def permute(window, drop, data):
      encoded, labels = data  # [n], [n]
      seed = tf.random.experimental.stateless_fold_in(
          tf.random.experimental.stateless_fold_in(window_seed, epoch), window)
      kept = tf.random.experimental.stateless_shuffle(tf.range(tf.size(labels)), seed)[drop:]
      return tf.gather(encoded, kept), tf.gather(labels, kept)

    return tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices((visits, skips)),
                               chosen).map(lambda ws, data: permute(*ws, data))

  stream = tf.data.Dataset.range(start_epoch, _ENDLESS).flat_map(epoch_windows)
  # Loads and permutes the next window while this one is decoded.
  return stream.prefetch(1).unbatch()


def train_batches(config: ml_collections.ConfigDict, start_step: int, process_index: int,
                  process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches from step `start_step` on; see the module docstring.

  Returns:
    An endless iterator of dicts: `image` uint8 [b, S, S, C], `label` int32 [b].
  """
  source, holdout = _open(config)
  batch = common.local_batch_size("train.batch_size", config.train.batch_size, process_index,
                                  process_count)
  start = start_step * batch
  stream = _training_stream(source, config, start, holdout, process_index, process_count)
  example_seed = tf.random.experimental.stateless_fold_in(
      tf.constant([config.seed, process_index], tf.int64), _EXAMPLE_SALT)
  size, channels = config.data.image_size, config.data.channels
  if common.augmentation(config, in_memory=False) == "pad_crop_flip":
    preprocess = functools.partial(tf_preprocess.pad_crop_flip_image,
                                   margin=common.pad_crop_margin(size))
  else:
    preprocess = tf_preprocess.train_image

  def augment(position, data):
    encoded, label = data
    seed = tf.random.experimental.stateless_fold_in(example_seed, position)
    return {"image": preprocess(encoded, seed, size, channels), "label": label}

  stream = stream.enumerate(start).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  stream = stream.batch(batch, drop_remainder=True).prefetch(_PREFETCH_BATCHES)
  return stream.with_options(_options()).as_numpy_iterator()


@functools.lru_cache(maxsize=4)
def _eval_dataset(name: str, data_dir: str, split: str, total: int, size: int, channels: int,
                  crop_fraction: float, batch: int, cache: bool, process_index: int,
                  process_count: int) -> tf.data.Dataset:
  """The padded, batched shard of `split[:total]`; kept so that its cache outlives one pass."""
  source = _source(name, data_dir)
  start, end = _shard(total, process_count, process_index)
  # Every process yields as many batches as the largest shard needs.
  num_batches = math.ceil(math.ceil(total / process_count) / batch)
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([size, size, channels], tf.uint8),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(False)
  }).repeat(num_batches * batch - (end - start))
  data = padding
  if end > start:
    data = _read(source, split, start, end).map(lambda encoded, label: {
        "image": tf_preprocess.eval_image(encoded, size, channels, crop_fraction),
        "label": label,
        "mask": tf.constant(True)
    },
                                                num_parallel_calls=tf.data.AUTOTUNE)
    if _use_cache(cache, name, f"decoded {split}[:{total}] images",
                  (end - start) * size * size * channels):
      data = data.cache()
    data = data.concatenate(padding)
  return data.batch(batch).prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_batches(config: ml_collections.ConfigDict, process_index: int, process_count: int,
                 split: str) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's shard of `split`, padded to whole batches.

  Args:
    config: the experiment config.
    process_index: this process, 0..process_count-1.
    process_count: number of processes.
    split: "test", the evaluation split, or "holdout", `train[:h]`; both get
      the evaluation preprocessing.

  Returns:
    An iterator of dicts: `image` uint8 [b, S, S, C], `label` int32 [b] and
    `mask` bool [b] (False on padding rows).
  """
  source, holdout = _open(config)
  batch = common.local_batch_size("eval.batch_size", config.eval.batch_size, process_index,
                                  process_count)
  # The hold-out is a prefix of train, so (TFDS split, size) names either part.
  tfds_split, total = ((_TRAIN_SPLIT, holdout) if split == "holdout" else
                       (source.eval_split, source.num_examples(source.eval_split)))
  data = _eval_dataset(
      config.data.name, config.data.tfds_data_dir, tfds_split, total, config.data.image_size,
      config.data.channels, common.TFDS_CROP_FRACTION
      if common.augmentation(config, in_memory=False) == "inception_crop" else 1.0, batch,
      bool(config.data.cache), process_index, process_count)
  return data.as_numpy_iterator()


def write_prepared(root: str,
                   name: str,
                   sizes: dict[str, int],
                   example: Callable[[str, int], dict[str, Any]],
                   shards: int = 2) -> None:
  """Writes TFDS data set `name` as if prepared, with `example(split, i)` for each
  of `sizes[split]` examples: real TFRecord files and metadata, so the pipelines
  read it as they read the real one (the tests and the input benchmark use it)."""
  builder = tfds.builder(name, data_dir=root)
  features = builder.info.features
  os.makedirs(builder.data_dir)
  split_infos = []
  for split, size in sizes.items():
    lengths, num_bytes = [], 0
    for shard, ids in enumerate(np.array_split(np.arange(size), shards)):
      path = os.path.join(builder.data_dir, f"{name}-{split}.tfrecord-{shard:05d}-of-{shards:05d}")
      with tf.io.TFRecordWriter(path) as writer:
        for i in ids:
          record = features.serialize_example(example(split, int(i)))
          writer.write(record)
          num_bytes += len(record)
      lengths.append(len(ids))
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes))
  # The splits' sizes given, not counted: counting reads the files through tf.data
  # pipelines built on several threads at once, which crashed TensorFlow
  # (a segmentation fault in graph construction) once in a loaded test run.
  tfds.folder_dataset.write_metadata(data_dir=builder.data_dir,
                                     features=features,
                                     split_infos=split_infos,
                                     check_data=False)

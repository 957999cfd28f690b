"""The order in which training reads a process's records, epoch by epoch: whole record
files in a per-epoch random order, read in windows and shuffled within them, every draw
stateless, so a restart reads only the window it starts in again."""

from __future__ import annotations

import os

import tensorflow as tf
import tensorflow_datasets as tfds

# The training order (see TrainOrder): each epoch visits the record files in a new order,
# two at a time, and shuffles those two files' records together. A resume reads the two
# files it starts in again: 2,502 records, 0.2% of an ImageNet epoch on one host (0.8% on
# each of four).
_WINDOW_FILES = 2


class TrainOrder:
  """The order of every epoch of one process's train examples, and how to read it.

  The process's records are ranges of the split's files (TFDS's file instructions for the
  process's part of the split: whole files, but for the first and last). Epoch ``e``
  visits the ranges in a random order drawn from ``(seed, process, e)``; each run of
  ``_WINDOW_FILES`` ranges in that order is a window, read whole and shuffled whole with a
  permutation drawn from the epoch's key and the window's index. Both draws are
  stateless, so the window that holds any position of any epoch, and where in it, is
  known without reading anything: a restart reads the window it starts in again, not the
  epoch so far.

  Files are read from start to end (the reads object storage serves best; a skip into a
  TFRecord file reads what it skips). TFDS shuffles examples when it writes a dataset, so
  a file is already a random sample of the split; shuffling two files together each epoch
  changes which examples share a batch from one epoch to the next. The next windows are
  read while the current one is consumed, across epoch boundaries too; a window is held
  in memory while it is consumed (two ImageNet files: ~280 MB).
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split: tfds.typing.SplitArg):
    if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
      raise ValueError(
        f'{builder.name} is stored as {builder.info.file_format.value}; the train pipeline '
        'reads TFRecord files: prepare it again with --file_format=tfrecord.'
      )
    files, skips, counts = [], [], []
    for instruction in builder.info.splits[split].file_instructions:
      take = instruction.take
      if take < 0:  # to the end of the file
        take = instruction.examples_in_shard - instruction.skip
      files.append(os.fspath(instruction.filename))
      skips.append(instruction.skip)
      counts.append(take)
    self.files = tf.constant(files, tf.string)
    self.skips = tf.constant(skips, tf.int64)
    self.counts = tf.constant(counts, tf.int64)
    self.num_ranges = len(files)
    self.num_windows = -(-self.num_ranges // _WINDOW_FILES)
    self.largest_window = _WINDOW_FILES * max(counts)

  def _range_order(self, order_key: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_shuffle(
      tf.range(self.num_ranges, dtype=tf.int64), order_key
    )

  def window_starts(self, order_key: tf.Tensor) -> tf.Tensor:
    """int64 [windows]: the position in the epoch of each window's first record."""
    counts = tf.gather(self.counts, self._range_order(order_key))
    return tf.math.cumsum(counts, exclusive=True)[::_WINDOW_FILES]

  def window(self, order_key: tf.Tensor, window: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(serialized records [n], their positions in the epoch [n])`` of one window."""
    ranges = self._range_order(order_key)[window * _WINDOW_FILES :][:_WINDOW_FILES]

    def read(file, skip, count):
      return tf.data.TFRecordDataset(file).skip(skip).take(count)

    records = tf.data.Dataset.from_tensor_slices(
      tuple(tf.gather(t, ranges) for t in (self.files, self.skips, self.counts))
    ).interleave(
      read, cycle_length=_WINDOW_FILES, num_parallel_calls=_WINDOW_FILES, deterministic=True
    )
    serialized = records.batch(self.largest_window).get_single_element()
    count = tf.size(serialized, out_type=tf.int64)
    shuffle = tf.random.experimental.stateless_shuffle(
      tf.range(count), tf.random.experimental.stateless_fold_in(order_key, window)
    )
    first = self.window_starts(order_key)[window]
    return tf.gather(serialized, shuffle), first + tf.range(count)

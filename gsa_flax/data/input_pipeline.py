"""Input pipelines: the tf.data mechanics shared by every dataset.

What differs between datasets (splits, classes, normalisation, which crops) is data in its
:class:`~gsa_flax.data.datasets.DatasetSpec`; this module reads specs and has no per-dataset
code. Training reads the TFRecord files of a split itself, in the order of
:class:`_TrainOrder` (so that a restart reads one window of records again, not the epoch
so far); evaluation reads them with ``tfds.builder(...).as_dataset``. Images stay encoded
(``tfds.decode.SkipDecoding``) until they are kept: the Inception crop decodes only its
window, fused in ``tf.image.decode_and_crop_jpeg``. :func:`decode` is the one image decoder,
used for training, evaluation and image files alike.

Multi-host: each process reads its own part of every split (``tfds.split_for_jax_process``)
and yields the process-local part of the global batch, ``global_batch_size //
jax.process_count()`` examples; the trainer assembles global arrays from them (e.g. with
``jax.make_array_from_process_local_data``).

Training order is a pure function of ``(seed, step)``: epoch ``e`` is the process's part of
the train split in an order drawn from ``(seed, process, e)`` (:class:`_TrainOrder`: blocks
of records in a random order, shuffled in windows), cut to ``steps_per_epoch`` whole
batches; the augmentation of an example is drawn from ``(seed, process, e, position in the
epoch)`` with stateless random ops. So ``create_train_iterator(..., start_step=k)`` yields
exactly what a fresh iterator yields after ``k`` batches, and reads only the window that
step ``k`` starts in. All epochs are one ``tf.data`` pipeline: the next epoch's first
window is read ahead like any other, so an epoch boundary does not stall.

Strong augmentation (:class:`Augment`, off by default) keeps that property: RandAugment
(:func:`gsa_flax.data.augment.rand_augment`) is drawn from the example's key, after the crop,
resize and flip; Mixup/CutMix (:func:`gsa_flax.data.augment.mix_params`) is drawn for each
batch with a key from ``(seed, process, absolute step)``, a stream apart from the examples'
keys, and applied on the accelerators. With augmentation off, no op of it is in the pipeline.

Batches carry ``uint8`` images, cropped and resized but not normalised: a quarter of the
float32 bytes to copy to the accelerators, which normalise them inside the compiled step
with the spec's mean and std (:func:`normalize` is the same function on the host, for
prediction). Mixup/CutMix is drawn here and applied there too (below).

Evaluation visits every example of the eval split once: the last batches are padded and
carry ``mask`` 0.0, and every process yields the same number of batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from gsa_flax.data.augment import mix_params, rand_augment
from gsa_flax.data.augment_config import Augment
from gsa_flax.data.datasets import DatasetNotFoundError, DatasetSpec

# 'center' evaluation crop: center crop of image_size / (image_size + 32) of the shorter side
# (224 of 256), then resize: the standard ResNet/Inception protocol.
_EVAL_CROP_PADDING = 32
# 'inception' training crop: random-resized crop (Szegedy et al. 2015).
_CROP_AREA_RANGE = (0.08, 1.0)
_CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
_CROP_MIN_OBJECT_COVERED = 0.1
_CROP_MAX_ATTEMPTS = 10
# 'pad' training crop: zero-pad by 4 pixels per 32 (scaled with image_size), then crop back
# at a random position.
_PAD_FRACTION = 4 / 32

# Key streams folded into (seed, process) where the example keys fold in the epoch, at
# values no epoch reaches, so that no two streams share a key: Mixup/CutMix's (folded with
# the step) and the training order's (folded with the epoch).
_MIX_STREAM = 2**31 - 1
_ORDER_STREAM = 2**31 - 2

# The training order (see _TrainOrder): each epoch visits the record files in a new order,
# two at a time, and shuffles those two files' records together. A resume reads the two
# files it starts in again: 2,502 records, 0.2% of an ImageNet epoch on one host (0.8% on
# each of four).
_WINDOW_FILES = 2


def _hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow, used for input only, off the accelerators that JAX owns."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # The TF runtime is already initialised, and the call was refused.
    if tf.config.get_visible_devices('GPU'):
      logging.warning('TensorFlow was initialised before the input pipeline and sees GPUs.')


def _check_builder(builder: tfds.core.DatasetBuilder, spec: DatasetSpec) -> None:
  if builder.name != spec.name:
    raise ValueError(f'builder of {builder.name!r} passed with the spec of {spec.name!r}.')


Process = tuple[int, int]  # (process index, process count)


def _this_process() -> Process:
  return jax.process_index(), jax.process_count()


def _local_batch_size(global_batch_size: int, process: Process) -> int:
  process_count = process[1]
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f'batch_size={global_batch_size} must be a positive multiple of the number of '
      f'processes ({process_count}): each process loads batch_size // {process_count} '
      'examples per step.'
    )
  return global_batch_size // process_count


def _process_split(split: str, process: Process, *, drop_remainder: bool) -> tfds.typing.SplitArg:
  return tfds.split_for_jax_process(
    split, process_index=process[0], process_count=process[1], drop_remainder=drop_remainder
  )


def get_builder(
  spec: DatasetSpec, data_dir: str | None, *, image_size: int = 32
) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder of a prepared dataset; cheap (reads metadata only).

  A dataset built on first use (``digits``) is built into ``data_dir`` when missing (a few
  seconds, no network); the others must have been prepared as their spec says.

  Args:
    spec: the dataset (``gsa_flax.data.datasets.get(name)``).
    data_dir: TFDS data directory; ``None`` or ``''`` for the TFDS default.
    image_size: the stored resolution, for datasets with a builder config per size;
      ignored by the others, which are resized in the pipeline.

  Returns:
    The builder, ready for the ``create_*_iterator`` functions.

  Raises:
    DatasetNotFoundError: the dataset is not prepared in ``data_dir`` (the message says
      how to prepare it).
  """
  _hide_accelerators_from_tf()
  data_dir = data_dir or None  # '' (the configs' default) means TFDS's default, not the cwd
  config = spec.builder_config(image_size) if spec.builder_config else None
  builder = tfds.builder(spec.name, config=config, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if not spec.built_on_first_use:
    root = str(builder.data_dir_root)
    raise DatasetNotFoundError(
      f'dataset {spec.name!r} is not prepared in data_dir={root!r} (nothing valid at '
      f'{builder.data_dir}); ' + spec.prepare.format(data_dir=root)
    )
  try:
    builder.download_and_prepare()
  except OSError:
    # Processes sharing data_dir build concurrently: one rename wins, the result is the same.
    if not builder.is_prepared():
      raise
    builder = tfds.builder(spec.name, config=config, data_dir=data_dir)
  return builder


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Class names of the ``label`` feature, indexed by label."""
  return list(builder.info.features['label'].names)


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of examples of a whole split (all processes together)."""
  return builder.info.splits[split].num_examples


def _train_steps_per_epoch(
  builder: tfds.core.DatasetBuilder, spec: DatasetSpec, local_batch: int, process: Process
) -> int:
  split = _process_split(spec.train_split, process, drop_remainder=True)
  return num_examples(builder, split) // local_batch


def steps_per_epoch(
  builder: tfds.core.DatasetBuilder,
  spec: DatasetSpec,
  global_batch_size: int,
  *,
  process: Process | None = None,
) -> int:
  """Training steps per epoch: whole batches, the same on every process.

  Equal to ``num_examples(train) // global_batch_size``: each process keeps
  ``n // process_count`` examples and ``floor(floor(n / p) / b) == floor(n / (p * b))``.

  Args:
    builder: from ``get_builder``.
    spec: the dataset.
    global_batch_size: examples per step summed over processes.
    process: ``(index, count)`` of this process among the JAX processes; default: JAX's.

  Returns:
    The number of steps after which the training order is reshuffled.
  """
  _check_builder(builder, spec)
  process = process or _this_process()
  local_batch = _local_batch_size(global_batch_size, process)
  return _train_steps_per_epoch(builder, spec, local_batch, process)


# Image ops. Images are uint8 [height, width, 3] throughout; batches leave the host as uint8
# (4x fewer bytes than float32) and the compiled steps mix and normalise them on the device.


def decode(encoded: tf.Tensor, window: tf.Tensor | None = None) -> tf.Tensor:
  """Decodes an encoded image (PNG, JPEG, GIF: first frame, BMP) to ``uint8 [h, w, 3]``.

  Args:
    encoded: the file's bytes (a scalar string tensor).
    window: optional ``[offset_y, offset_x, height, width]``: decode only that crop, fused
      with the decoding (JPEG only; the Inception crop uses it).

  Raises:
    tf.errors.InvalidArgumentError: not a decodable image (eagerly).
  """
  if window is not None:
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def normalize(images: tf.Tensor, spec: DatasetSpec) -> tf.Tensor:
  """``(images - mean) / std`` with the dataset's statistics, as float32.

  What the compiled steps do on the device to the batches of the ``create_*_iterator``
  functions (:func:`gsa_flax.train.steps.normalize_images`); here for images that go to a
  model without them (prediction, figures).

  Args:
    images: ``[..., 3]`` on the 0..255 scale, any real dtype.
    spec: the dataset: its ``mean_rgb`` and ``stddev_rgb``.
  """
  mean = tf.constant(spec.mean_rgb, tf.float32)
  std = tf.constant(spec.stddev_rgb, tf.float32)
  return (tf.cast(images, tf.float32) - mean) / std


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Bilinear without antialias, rounded half up to ``uint8``; the identity at equal size.

  Antialiasing costs 1.1 ms of CPU per ImageNet crop, more than the decode (0.6 ms), for a
  filter that the standard ResNet/Inception recipes trained without (TF-slim's Inception
  preprocessing, big_vision: bilinear; flax: bicubic, 0.15 ms more); training and
  evaluation use the same resize, so the model sees one image statistics
  (``benchmarks/pipeline.py``).
  """
  resized = tf.image.resize(image, [image_size, image_size], method='bilinear')
  # A convex combination of grey levels: adding 1/2 and truncating rounds half up.
  return tf.saturate_cast(resized + 0.5, tf.uint8)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  channels = image.shape[-1]
  if image.shape.rank != 3 or channels not in (1, 3, 4):
    raise ValueError(f'Expected an image [height, width, 1|3|4], got shape {image.shape}.')
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  return image[:, :, :3]  # Drops alpha.


def _center_crop_window(shape: tf.Tensor, image_size: int) -> tf.Tensor:
  """``[offset_y, offset_x, size, size]`` of the ``'center'`` evaluation crop."""
  height, width = shape[0], shape[1]
  shorter = tf.cast(tf.minimum(height, width), tf.float32)
  size = tf.cast(image_size / (image_size + _EVAL_CROP_PADDING) * shorter, tf.int32)
  size = tf.maximum(size, 1)
  return tf.stack([(height - size + 1) // 2, (width - size + 1) // 2, size, size])


def _central_square_window(shape: tf.Tensor) -> tf.Tensor:
  size = tf.minimum(shape[0], shape[1])
  return tf.stack([(shape[0] - size) // 2, (shape[1] - size) // 2, size, size])


def preprocess_for_eval(image: tf.Tensor, *, spec: DatasetSpec, image_size: int) -> tf.Tensor:
  """Prepares one decoded image exactly as evaluation batches are prepared.

  The spec's eval crop (``'center'``: ``image_size / (image_size + 32)`` of the shorter
  side; ``'square'``: the central square), then resize and normalise.

  Args:
    image: decoded ``uint8 [height, width, channels]``, channels 1 (grey), 3 or 4 (alpha
      dropped); a NumPy array is accepted.
    spec: the dataset: selects the crop and the normalization.
    image_size: output height and width.

  Returns:
    ``float32 [image_size, image_size, 3]``, normalized with the dataset's mean and std:
    :func:`normalize` of the ``uint8`` image that evaluation batches carry.
  """
  return normalize(_eval_crop(image, spec, image_size), spec)


def _eval_crop(image: tf.Tensor, spec: DatasetSpec, image_size: int) -> tf.Tensor:
  """The eval crop and resize of a decoded image: ``uint8 [image_size, image_size, 3]``."""
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise ValueError(f'Expected a uint8 image, got {image.dtype.name}.')
  image = _to_rgb(image)
  if spec.eval_crop == 'center':
    window = _center_crop_window(tf.shape(image), image_size)
  else:
    window = _central_square_window(tf.shape(image))
  y, x, height, width = tf.unstack(window)
  image = tf.image.crop_to_bounding_box(image, y, x, height, width)
  return _resize(image, image_size)


def _eval_image(encoded: tf.Tensor, spec: DatasetSpec, image_size: int) -> tf.Tensor:
  # A full decode, not a fused crop: the fused decoder's chroma upsampling differs from a
  # full decode along the crop border (a few grey levels), and a full decode keeps eval
  # batches bit-identical to preprocess_for_eval (the prediction path). The eval crop keeps
  # ~77% of the image anyway, so fusing would save little.
  return _eval_crop(decode(encoded), spec, image_size)


def _train_image(
  encoded: tf.Tensor, key: tf.Tensor, spec: DatasetSpec, image_size: int, augment: Augment
):
  """Decodes and augments one training image; all randomness comes from ``key``."""
  # The first two keys of a 3-way split are those of a 2-way split: crops and flips are
  # the same with RandAugment on or off.
  keys = tf.random.experimental.stateless_split(key, 3 if augment.rand_augment else 2)
  crop_key, flip_key = keys[0], keys[1]
  if spec.train_crop == 'inception':
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(encoded),
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=crop_key,
      min_object_covered=_CROP_MIN_OBJECT_COVERED,
      aspect_ratio_range=_CROP_ASPECT_RATIO_RANGE,
      area_range=_CROP_AREA_RANGE,
      max_attempts=_CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True,
    )
    y, x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    image = _resize(decode(encoded, tf.stack([y, x, height, width])), image_size)
  elif spec.train_crop == 'none':
    image = _resize(decode(encoded), image_size)
  else:  # 'pad'
    image = _resize(decode(encoded), image_size)
    pad = round(_PAD_FRACTION * image_size)
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=crop_key)
  if spec.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_key)
  if augment.rand_augment:
    image = rand_augment(
      image,
      keys[2],
      num_layers=augment.num_layers,
      magnitude=augment.magnitude,
      magnitude_std=augment.magnitude_std,
    )
  return image


def _decoders() -> tfds.decode.PartialDecoding:
  # Only image and label are read; the image stays encoded until after shuffling/skipping.
  return tfds.decode.PartialDecoding(
    {'image': True, 'label': True}, decoders={'image': tfds.decode.SkipDecoding()}
  )


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # Exact resume and identical eval step counts rely on a reproducible element order.
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


class _TrainOrder:
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


def _train_stream(
  builder: tfds.core.DatasetBuilder,
  *,
  spec: DatasetSpec,
  order: _TrainOrder,
  local_batch: int,
  steps: int,
  image_size: int,
  seed: int,
  start_step: int,
  process: Process,
  augment: Augment,
) -> tf.data.Dataset:
  """Every batch from ``start_step`` on, over epoch boundaries, as one ``tf.data`` pipeline."""
  run_key = tf.constant([seed % 2**63, process[0]], tf.int64)
  order_base = tf.random.experimental.stateless_fold_in(run_key, _ORDER_STREAM)
  epoch_length = steps * local_batch  # whole batches; the rest of the records wait an epoch

  def order_key(epoch):
    return tf.random.experimental.stateless_fold_in(order_base, tf.cast(epoch, tf.int32))

  # Where the stream starts: the window holding the first example of start_step.
  first_epoch, first_position = divmod(start_step * local_batch, epoch_length)
  starts = order.window_starts(order_key(first_epoch)).numpy()
  first_window = int(np.searchsorted(starts, first_position, side='right')) - 1
  first = first_epoch * order.num_windows + first_window

  def load(index):
    epoch, window = index // order.num_windows, index % order.num_windows
    serialized, positions = order.window(order_key(epoch), window)
    # The epoch is cut to whole batches; a resumed stream starts at its first position.
    keep = positions < epoch_length
    if first_position:
      keep &= (index != first) | (positions >= first_position)
    epochs = tf.fill(tf.shape(positions), epoch)
    kept = (tf.boolean_mask(t, keep) for t in (serialized, positions, epochs))
    return tf.data.Dataset.from_tensor_slices(tuple(kept))

  decoders = _decoders()
  features = decoders.extract_features(builder.info.features)

  def prepare(serialized, position, epoch):
    example = features.deserialize_example(serialized, decoders=decoders.decoders)
    epoch_key = tf.random.experimental.stateless_fold_in(run_key, tf.cast(epoch, tf.int32))
    key = tf.random.experimental.stateless_fold_in(epoch_key, position)
    return {
      'image': _train_image(example['image'], key, spec, image_size, augment),
      'label': tf.cast(example['label'], tf.int32),
    }

  # Windows are read ahead (two at once) while the current one is decoded.
  ds = tf.data.Dataset.range(first, tf.int64.max).map(
    load, num_parallel_calls=2, deterministic=True
  )
  ds = ds.prefetch(1).flat_map(lambda window: window)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  if augment.mix:
    mix_key = tf.random.experimental.stateless_fold_in(run_key, _MIX_STREAM)

    def mix(step, batch):
      key = tf.random.experimental.stateless_fold_in(mix_key, step)
      # Only the draws: the images stay uint8, and the step mixes them on the device.
      params = mix_params(
        batch['label'],
        key,
        image_shape=(image_size, image_size),
        mixup_alpha=augment.mixup_alpha,
        cutmix_alpha=augment.cutmix_alpha,
        prob=augment.prob,
        switch_prob=augment.switch_prob,
      )
      return {'image': batch['image'], **params}

    # Keyed by the absolute step, so a resumed run mixes its batches as a fresh one does.
    ds = ds.enumerate(start=start_step).map(mix, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def create_train_iterator(
  builder: tfds.core.DatasetBuilder,
  *,
  spec: DatasetSpec,
  global_batch_size: int,
  image_size: int,
  seed: int,
  start_step: int = 0,
  process: Process | None = None,
  augment: Augment | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator over augmented, shuffled training batches of this process.

  Epochs are ``steps_per_epoch`` whole batches; the few examples left over are dropped
  (different ones each epoch, as the order is reshuffled). One pipeline runs across epoch
  boundaries; a restart (``start_step``) reads the one window of records it starts in.

  Args:
    builder: from ``get_builder``.
    spec: the dataset: selects the crop, flips and normalization.
    global_batch_size: examples per step summed over processes.
    image_size: output height and width.
    seed: determines the order of every epoch and every augmentation.
    start_step: number of batches to skip: the iterator yields what a ``start_step=0``
      iterator yields from its ``start_step``-th batch on.
    process: ``(index, count)`` of this process among the JAX processes; default: JAX's.
    augment: RandAugment and Mixup/CutMix settings (``Augment(**config.augment)``); None
      or ``Augment()`` is off, and the batches are then exactly those of a pipeline
      without them.

  Returns:
    An iterator of ``{'image': uint8 [local_batch, image_size, image_size, 3], 'label':
    int32 [local_batch]}``, ``local_batch = global_batch_size // jax.process_count()``;
    images are not normalised (the compiled step does it on the device:
    :func:`normalize`). With Mixup or CutMix on, batches also carry the batch's mixing,
    drawn by :func:`gsa_flax.data.augment.mix_params` and applied by the compiled step
    (``gsa_flax.train.steps.mix_images``) to the unmixed ``uint8`` images:
    ``'mix_blend': float32 [local_batch]``, ``'mix_box': int32 [local_batch, 4]``, and
    the target, ``'mix_label': int32 [local_batch]`` and ``'mix_weight': float32
    [local_batch]``: ``mix_weight * onehot(label) + (1 - mix_weight) * onehot(mix_label)``
    (:func:`gsa_flax.data.augment.mix_batch` is the same mixing on the host).

  Raises:
    ValueError: bad ``batch_size``, negative ``start_step``, or a split with fewer examples
      per process than one batch.
  """
  _check_builder(builder, spec)
  _hide_accelerators_from_tf()
  process = process or _this_process()
  local_batch = _local_batch_size(global_batch_size, process)
  split = _process_split(spec.train_split, process, drop_remainder=True)
  steps = _train_steps_per_epoch(builder, spec, local_batch, process)
  if steps == 0:
    raise ValueError(
      f'batch_size={global_batch_size} is larger than the train split of {spec.name!r} '
      f'({num_examples(builder, spec.train_split)} examples).'
    )
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  augment = Augment() if augment is None else augment
  return _train_stream(
    builder,
    spec=spec,
    order=_TrainOrder(builder, split),
    local_batch=local_batch,
    steps=steps,
    image_size=image_size,
    seed=seed,
    start_step=start_step,
    process=process,
    augment=augment,
  ).as_numpy_iterator()


def _eval_dataset(builder: tfds.core.DatasetBuilder, split: tfds.typing.SplitArg):
  return builder.as_dataset(
    split=split,
    shuffle_files=False,
    decoders=_decoders(),
    read_config=tfds.ReadConfig(try_autocache=False),
  )


def create_eval_iterator(
  builder: tfds.core.DatasetBuilder,
  *,
  spec: DatasetSpec,
  global_batch_size: int,
  image_size: int,
  process: Process | None = None,
) -> tuple[Iterator[dict[str, np.ndarray]], int]:
  """Iterator over one pass of this process's part of the eval split, padded.

  Args:
    builder: from ``get_builder``.
    spec: the dataset.
    global_batch_size: examples per step summed over processes.
    image_size: output height and width.
    process: ``(index, count)`` of this process among the JAX processes; default: JAX's.

  Returns:
    ``(iterator, num_steps)``. The iterator yields exactly ``num_steps`` batches of
    ``{'image': uint8 [local_batch, image_size, image_size, 3] (not normalised), 'label':
    int32 [local_batch], 'mask': float32 [local_batch]}``; ``mask`` is 1.0 for real examples and
    0.0 for padding (zero image, label 0). ``num_steps = ceil(ceil(n / process_count) /
    local_batch)`` on every process, so collectives in the eval step line up.
  """
  _check_builder(builder, spec)
  _hide_accelerators_from_tf()
  process = process or _this_process()
  local_batch = _local_batch_size(global_batch_size, process)
  # Without drop_remainder the first n % process_count processes get one extra example;
  # the others make up for it with padding.
  split = _process_split(spec.eval_split, process, drop_remainder=False)
  num_local = num_examples(builder, split)
  per_process = math.ceil(num_examples(builder, spec.eval_split) / process[1])
  num_steps = math.ceil(per_process / local_batch)

  ds = _eval_dataset(builder, split).map(
    lambda example: {
      'image': _eval_image(example['image'], spec, image_size),
      'label': tf.cast(example['label'], tf.int32),
      'mask': tf.constant(1.0, tf.float32),
    },
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  padding = {
    'image': tf.zeros([image_size, image_size, 3], tf.uint8),
    'label': tf.constant(0, tf.int32),
    'mask': tf.constant(0.0, tf.float32),
  }
  ds = ds.concatenate(
    tf.data.Dataset.from_tensors(padding).repeat(num_steps * local_batch - num_local)
  )
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  ds = ds.with_options(_options())

  def batches() -> Iterator[dict[str, np.ndarray]]:
    count = 0
    for batch in ds.as_numpy_iterator():
      count += 1
      yield batch
    if count != num_steps:
      # Another process would wait forever in a collective: fail loudly instead.
      raise RuntimeError(
        f'Eval split {spec.eval_split!r} of {spec.name!r} gave {count} batches, expected '
        f'{num_steps}: its files do not match the dataset metadata.'
      )

  return batches(), num_steps


def eval_images(
  builder: tfds.core.DatasetBuilder, *, spec: DatasetSpec, image_size: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
  """The first ``count`` examples of the whole eval split, preprocessed exactly like eval.

  Returns:
    ``(images float32 [count, image_size, image_size, 3], labels int32 [count])``.
  """
  _check_builder(builder, spec)
  ds = _eval_dataset(builder, spec.eval_split).take(count)
  ds = ds.map(
    lambda example: (
      normalize(_eval_image(example['image'], spec, image_size), spec),
      example['label'],
    )
  )
  images, labels = [], []
  for image, label in ds.as_numpy_iterator():
    images.append(image)
    labels.append(int(label))
  return np.stack(images), np.asarray(labels, np.int32)

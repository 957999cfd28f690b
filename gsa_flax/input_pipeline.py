"""Input pipelines for ImageNet, CIFAR-100 and the embedded ``digits`` dataset.

Every dataset is read with ``tfds.builder(...).as_dataset`` with the image left encoded
(``tfds.decode.SkipDecoding``) so that shuffling and skipping move bytes only, and decoding
is spent on the examples that are kept (ImageNet training decodes only its random crop,
fused in ``tf.image.decode_and_crop_jpeg``).

Multi-host: each process reads its own part of every split (``tfds.split_for_jax_process``)
and yields the process-local part of the global batch, ``global_batch_size //
jax.process_count()`` examples; the trainer assembles global arrays from them (e.g. with
``jax.make_array_from_process_local_data``).

Training order is a pure function of ``(seed, step)``: epoch ``e`` is the process's part of
the train split in an order drawn from ``(seed, e)`` (file order, then a shuffle buffer),
cut to ``steps_per_epoch`` whole batches; the augmentation of an example is drawn from
``(seed, process, e, position in the epoch)`` with stateless random ops. So
``create_train_iterator(..., start_step=k)`` yields exactly what a fresh iterator yields
after ``k`` batches; it skips the records before step ``k`` of its epoch without decoding.

Evaluation visits every example of the eval split once: the last batches are padded and
carry ``mask`` 0.0, and every process yields the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from gsa_flax import datasets
from gsa_flax.datasets import digits as digits_lib

DATASETS: tuple[str, ...] = datasets.NAMES

# Per-channel mean and standard deviation on the 0..255 scale, subtracted and divided after
# resizing. ImageNet and CIFAR-100: the usual published statistics of their train splits.
# digits: grey-level statistics of its train split at the source resolution (identical
# after integer-factor nearest upscaling; tests/test_input_pipeline.py recomputes them).
MEAN_RGB: dict[str, tuple[float, float, float]] = {
  'imagenet2012': (0.485 * 255, 0.456 * 255, 0.406 * 255),
  'cifar100': (0.5071 * 255, 0.4865 * 255, 0.4409 * 255),
  'digits': (77.9, 77.9, 77.9),
}
STDDEV_RGB: dict[str, tuple[float, float, float]] = {
  'imagenet2012': (0.229 * 255, 0.224 * 255, 0.225 * 255),
  'cifar100': (0.2673 * 255, 0.2564 * 255, 0.2762 * 255),
  'digits': (95.7, 95.7, 95.7),
}

# ImageNet evaluation: center crop of image_size / (image_size + 32) of the shorter side
# (224 of 256), then resize: the standard ResNet/Inception protocol.
_EVAL_CROP_PADDING = 32
# ImageNet training: Inception-style random-resized crop (Szegedy et al. 2015).
_CROP_AREA_RANGE = (0.08, 1.0)
_CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
_CROP_MIN_OBJECT_COVERED = 0.1
_CROP_MAX_ATTEMPTS = 10
# CIFAR-100/digits training: zero-pad by 4 pixels per 32 (scaled with image_size), then
# crop back at a random position.
_PAD_FRACTION = 4 / 32

# Encoded records held by the per-epoch shuffle buffer (ImageNet: about 2 GB of JPEG bytes);
# smaller splits are shuffled whole.
_SHUFFLE_BUFFER_SIZE = 16_384


class DatasetNotFoundError(ValueError):
  """A dataset is not prepared in the data directory; the message says how to prepare it."""


def _hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow, used for input only, off the accelerators that JAX owns."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # The TF runtime is already initialised, and the call was refused.
    if tf.config.get_visible_devices('GPU'):
      logging.warning('TensorFlow was initialised before the input pipeline and sees GPUs.')


def _check_dataset(dataset: str) -> None:
  if dataset not in DATASETS:
    raise ValueError(f'Unknown dataset {dataset!r}; expected one of: {", ".join(DATASETS)}.')


def _check_builder(builder: tfds.core.DatasetBuilder, dataset: str) -> None:
  _check_dataset(dataset)
  if builder.name != dataset:
    raise ValueError(f'Builder of {builder.name!r} passed with dataset={dataset!r}.')


def _local_batch_size(global_batch_size: int) -> int:
  process_count = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f'batch_size={global_batch_size} must be a positive multiple of the number of '
      f'processes ({process_count}): each process loads batch_size // {process_count} '
      'examples per step.'
    )
  return global_batch_size // process_count


def _process_split(split: str, *, drop_remainder: bool) -> tfds.typing.SplitArg:
  return tfds.split_for_jax_process(
    split,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    drop_remainder=drop_remainder,
  )


def _not_found_message(dataset: str, builder: tfds.core.DatasetBuilder) -> str:
  data_dir = str(builder.data_dir_root)
  message = (
    f'Dataset {dataset!r} is not prepared in data_dir={data_dir!r} '
    f'(nothing valid at {builder.data_dir}). '
  )
  if dataset == 'imagenet2012':
    return message + (
      'ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and '
      f'ILSVRC2012_img_val.tar in {data_dir}/downloads/manual, then run once: '
      f'tfds build imagenet2012 --data_dir={data_dir}'
    )
  return message + f'Prepare it once with: tfds build {dataset} --data_dir={data_dir}'


def get_builder(
  dataset: str, data_dir: str | None, *, image_size: int = 32
) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder of a prepared dataset; cheap (reads metadata only).

  ``digits`` is built into ``data_dir`` on first use (a few seconds, no network); the
  others must have been prepared with ``tfds build``.

  Args:
    dataset: one of ``DATASETS``.
    data_dir: TFDS data directory; ``None`` or ``''`` for the TFDS default.
    image_size: stored image size of ``digits`` (a builder config per size); ignored by
      the other datasets, which are resized in the pipeline.

  Returns:
    The builder, ready for the ``create_*_iterator`` functions.

  Raises:
    ValueError: unknown dataset name.
    DatasetNotFoundError: ``cifar100`` or ``imagenet2012`` is not prepared in ``data_dir``.
  """
  _check_dataset(dataset)
  _hide_accelerators_from_tf()
  data_dir = data_dir or None  # '' (the configs' default) means TFDS's default, not the cwd
  if dataset == 'digits':
    config = digits_lib.DigitsConfig(image_size=image_size)
    builder = tfds.builder('digits', config=config, data_dir=data_dir)
    if not builder.is_prepared():
      try:
        builder.download_and_prepare()
      except OSError:
        # Processes sharing data_dir build concurrently: one rename wins, the result is
        # the same data.
        if not builder.is_prepared():
          raise
        builder = tfds.builder('digits', config=config, data_dir=data_dir)
    return builder
  builder = tfds.builder(dataset, data_dir=data_dir)
  if not builder.is_prepared():
    raise DatasetNotFoundError(_not_found_message(dataset, builder))
  return builder


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
  """Number of classes of the ``label`` feature."""
  return builder.info.features['label'].num_classes


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Class names of the ``label`` feature, indexed by label."""
  return list(builder.info.features['label'].names)


def train_split_name(dataset: str) -> str:
  """Name of the training split."""
  _check_dataset(dataset)
  return 'train'


def eval_split_name(dataset: str) -> str:
  """Name of the split evaluated on: ImageNet's ``validation``, otherwise ``test``."""
  _check_dataset(dataset)
  return 'validation' if dataset == 'imagenet2012' else 'test'


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of examples of a whole split (all processes together)."""
  return builder.info.splits[split].num_examples


def _train_steps_per_epoch(
  builder: tfds.core.DatasetBuilder, dataset: str, local_batch: int
) -> int:
  split = _process_split(train_split_name(dataset), drop_remainder=True)
  return num_examples(builder, split) // local_batch


def steps_per_epoch(builder: tfds.core.DatasetBuilder, dataset: str, global_batch_size: int) -> int:
  """Training steps per epoch: whole batches, the same on every process.

  Equal to ``num_examples(train) // global_batch_size``: each process keeps
  ``n // process_count`` examples and ``floor(floor(n / p) / b) == floor(n / (p * b))``.

  Args:
    builder: from ``get_builder``.
    dataset: one of ``DATASETS``.
    global_batch_size: examples per step summed over processes.

  Returns:
    The number of steps after which the training order is reshuffled.
  """
  _check_builder(builder, dataset)
  return _train_steps_per_epoch(builder, dataset, _local_batch_size(global_batch_size))


# Image ops. Images are uint8 [height, width, 3] until resized, then float32 on 0..255.


def _normalize(image: tf.Tensor, dataset: str) -> tf.Tensor:
  mean = tf.constant(MEAN_RGB[dataset], tf.float32)
  std = tf.constant(STDDEV_RGB[dataset], tf.float32)
  return (tf.cast(image, tf.float32) - mean) / std


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  # Antialiased bilinear stays within 0..255 and is the identity at equal size.
  return tf.image.resize(image, [image_size, image_size], method='bilinear', antialias=True)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  channels = image.shape[-1]
  if image.shape.rank != 3 or channels not in (1, 3, 4):
    raise ValueError(f'Expected an image [height, width, 1|3|4], got shape {image.shape}.')
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  return image[:, :, :3]  # Drops alpha.


def _center_crop_window(shape: tf.Tensor, image_size: int) -> tf.Tensor:
  """``[offset_y, offset_x, size, size]`` of the ImageNet evaluation crop."""
  height, width = shape[0], shape[1]
  shorter = tf.cast(tf.minimum(height, width), tf.float32)
  size = tf.cast(image_size / (image_size + _EVAL_CROP_PADDING) * shorter, tf.int32)
  size = tf.maximum(size, 1)
  return tf.stack([(height - size + 1) // 2, (width - size + 1) // 2, size, size])


def _central_square(image: tf.Tensor) -> tf.Tensor:
  shape = tf.shape(image)
  size = tf.minimum(shape[0], shape[1])
  return tf.image.crop_to_bounding_box(
    image, (shape[0] - size) // 2, (shape[1] - size) // 2, size, size
  )


def preprocess_for_eval(image: tf.Tensor, *, dataset: str, image_size: int) -> tf.Tensor:
  """Prepares one decoded image exactly as evaluation batches are prepared.

  ImageNet: center crop of ``image_size / (image_size + 32)`` of the shorter side, resize.
  CIFAR-100 and digits: central square (a no-op on their square images), resize.

  Args:
    image: decoded ``uint8 [height, width, channels]``, channels 1 (grey), 3 or 4 (alpha
      dropped); a NumPy array is accepted.
    dataset: one of ``DATASETS``: selects the crop and the normalization.
    image_size: output height and width.

  Returns:
    ``float32 [image_size, image_size, 3]``, normalized with the dataset's mean and std.
  """
  _check_dataset(dataset)
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise ValueError(f'Expected a uint8 image, got {image.dtype.name}.')
  image = _to_rgb(image)
  if dataset == 'imagenet2012':
    y, x, height, width = tf.unstack(_center_crop_window(tf.shape(image), image_size))
    image = tf.image.crop_to_bounding_box(image, y, x, height, width)
  else:
    image = _central_square(image)
  return _normalize(_resize(image, image_size), dataset)


def _eval_image(encoded: tf.Tensor, dataset: str, image_size: int) -> tf.Tensor:
  # A full decode, not decode_and_crop_jpeg: the fused decoder's chroma upsampling differs
  # from a full decode along the crop border (a few grey levels), and a full decode keeps
  # eval batches bit-identical to preprocess_for_eval (the prediction path). The eval crop
  # keeps ~77% of the image anyway, so fusing would save little.
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return preprocess_for_eval(image, dataset=dataset, image_size=image_size)


def _train_image(encoded: tf.Tensor, key: tf.Tensor, dataset: str, image_size: int):
  """Decodes and augments one training image; all randomness comes from ``key``."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  if dataset == 'imagenet2012':
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
    image = tf.image.decode_and_crop_jpeg(encoded, tf.stack([y, x, height, width]), channels=3)
    image = _resize(image, image_size)
    image = tf.image.stateless_random_flip_left_right(image, flip_key)
  else:
    image = _resize(tf.io.decode_image(encoded, channels=3, expand_animations=False), image_size)
    pad = round(_PAD_FRACTION * image_size)
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=crop_key)
    # Mirrored digits are not digits: flip CIFAR only.
    if dataset == 'cifar100':
      image = tf.image.stateless_random_flip_left_right(image, flip_key)
  return _normalize(image, dataset)


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


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1)[0])


def _train_epoch(
  builder: tfds.core.DatasetBuilder,
  *,
  dataset: str,
  split: tfds.typing.SplitArg,
  local_batch: int,
  steps: int,
  image_size: int,
  seed: int,
  epoch: int,
  first_step: int,
) -> tf.data.Dataset:
  """Batches ``first_step ..< steps`` of one epoch of this process's train examples."""
  epoch_seed = _epoch_seed(seed, epoch)
  ds = builder.as_dataset(
    split=split,
    shuffle_files=True,
    decoders=_decoders(),
    read_config=tfds.ReadConfig(shuffle_seed=epoch_seed, try_autocache=False),
  )
  ds = ds.shuffle(min(num_examples(builder, split), _SHUFFLE_BUFFER_SIZE), seed=epoch_seed)
  # Cut to whole batches before skipping, so a resumed epoch ends where a fresh one does;
  # the skipped records are never decoded.
  first = first_step * local_batch
  ds = ds.take(steps * local_batch).skip(first).enumerate(start=first)
  epoch_key = tf.random.experimental.stateless_fold_in(
    tf.constant([seed % 2**63, jax.process_index()], tf.int64), epoch
  )

  def prepare(position, example):
    key = tf.random.experimental.stateless_fold_in(epoch_key, position)
    return {
      'image': _train_image(example['image'], key, dataset, image_size),
      'label': tf.cast(example['label'], tf.int32),
    }

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def create_train_iterator(
  builder: tfds.core.DatasetBuilder,
  *,
  dataset: str,
  global_batch_size: int,
  image_size: int,
  seed: int,
  start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator over augmented, shuffled training batches of this process.

  Epochs are ``steps_per_epoch`` whole batches; the few examples left over are dropped
  (different ones each epoch, as the order is reshuffled). The pipeline is rebuilt at each
  epoch boundary, so the first batch of an epoch waits for the shuffle buffer to fill.

  Args:
    builder: from ``get_builder``.
    dataset: one of ``DATASETS``: selects augmentation and normalization.
    global_batch_size: examples per step summed over processes.
    image_size: output height and width.
    seed: determines the order of every epoch and every augmentation.
    start_step: number of batches to skip: the iterator yields what a ``start_step=0``
      iterator yields from its ``start_step``-th batch on.

  Returns:
    An iterator of ``{'image': float32 [local_batch, image_size, image_size, 3]
    (normalized), 'label': int32 [local_batch]}``, ``local_batch = global_batch_size //
    jax.process_count()``.

  Raises:
    ValueError: bad ``batch_size``, negative ``start_step``, or a split with fewer examples
      per process than one batch.
  """
  _check_builder(builder, dataset)
  _hide_accelerators_from_tf()
  local_batch = _local_batch_size(global_batch_size)
  split = _process_split(train_split_name(dataset), drop_remainder=True)
  steps = _train_steps_per_epoch(builder, dataset, local_batch)
  if steps == 0:
    raise ValueError(
      f'batch_size={global_batch_size} is larger than the train split of {dataset!r} '
      f'({num_examples(builder, train_split_name(dataset))} examples).'
    )
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')

  def batches() -> Iterator[dict[str, np.ndarray]]:
    epoch, first_step = divmod(start_step, steps)
    while True:
      yield from _train_epoch(
        builder,
        dataset=dataset,
        split=split,
        local_batch=local_batch,
        steps=steps,
        image_size=image_size,
        seed=seed,
        epoch=epoch,
        first_step=first_step,
      ).as_numpy_iterator()
      epoch, first_step = epoch + 1, 0

  return batches()


def create_eval_iterator(
  builder: tfds.core.DatasetBuilder,
  *,
  dataset: str,
  global_batch_size: int,
  image_size: int,
) -> tuple[Iterator[dict[str, np.ndarray]], int]:
  """Iterator over one pass of this process's part of the eval split, padded.

  Args:
    builder: from ``get_builder``.
    dataset: one of ``DATASETS``.
    global_batch_size: examples per step summed over processes.
    image_size: output height and width.

  Returns:
    ``(iterator, num_steps)``. The iterator yields exactly ``num_steps`` batches of
    ``{'image': float32 [local_batch, image_size, image_size, 3], 'label': int32
    [local_batch], 'mask': float32 [local_batch]}``; ``mask`` is 1.0 for real examples and
    0.0 for padding (zero image, label 0). ``num_steps = ceil(ceil(n / process_count) /
    local_batch)`` on every process, so collectives in the eval step line up.
  """
  _check_builder(builder, dataset)
  _hide_accelerators_from_tf()
  local_batch = _local_batch_size(global_batch_size)
  split_name = eval_split_name(dataset)
  # Without drop_remainder the first n % process_count processes get one extra example;
  # the others make up for it with padding.
  split = _process_split(split_name, drop_remainder=False)
  num_local = num_examples(builder, split)
  per_process = math.ceil(num_examples(builder, split_name) / jax.process_count())
  num_steps = math.ceil(per_process / local_batch)

  ds = builder.as_dataset(
    split=split,
    shuffle_files=False,
    decoders=_decoders(),
    read_config=tfds.ReadConfig(try_autocache=False),
  )
  ds = ds.map(
    lambda example: {
      'image': _eval_image(example['image'], dataset, image_size),
      'label': tf.cast(example['label'], tf.int32),
      'mask': tf.constant(1.0, tf.float32),
    },
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  padding = {
    'image': tf.zeros([image_size, image_size, 3], tf.float32),
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
        f'Eval split {split_name!r} of {dataset!r} gave {count} batches, expected '
        f'{num_steps}: its files do not match the dataset metadata.'
      )

  return batches(), num_steps

"""Input pipelines: the tf.data mechanics shared by every dataset.

What differs between datasets (splits, classes, normalisation, which crops) is data in its
:class:`~gsa_flax.data.datasets.DatasetSpec`; this module reads specs and has no per-dataset
code. Training reads the TFRecord files of a split itself, in the order of
:class:`~gsa_flax.data.train_order.TrainOrder` (so that a restart reads one window of
records again, not the epoch so far); evaluation reads them with
``tfds.builder(...).as_dataset``. Images stay encoded (``tfds.decode.SkipDecoding``) until
they are kept: the Inception crop decodes only its window, fused in
``tf.image.decode_and_crop_jpeg``. :func:`gsa_flax.data.preprocess.decode` is the one image
decoder, used for training, evaluation and image files alike.

Multi-host: each process reads its own part of every split (``tfds.split_for_jax_process``)
and yields the process-local part of the global batch, ``global_batch_size //
jax.process_count()`` examples; the trainer assembles global arrays from them (e.g. with
``jax.make_array_from_process_local_data``).

Training order is a pure function of ``(seed, step)``: epoch ``e`` is the process's part of
the train split in an order drawn from ``(seed, process, e)``
(:class:`~gsa_flax.data.train_order.TrainOrder`: blocks of records in a random order,
shuffled in windows), cut to ``steps_per_epoch`` whole batches; the augmentation of an
example is drawn from ``(seed, process, e, position in the epoch)`` with stateless random
ops. So ``create_train_iterator(..., start_step=k)`` yields exactly what a fresh iterator
yields after ``k`` batches, and reads only the window that step ``k`` starts in. All epochs
are one ``tf.data`` pipeline: the next epoch's first window is read ahead like any other, so
an epoch boundary does not stall.

Strong augmentation (:class:`Augment`, off by default) keeps that property: RandAugment
(:func:`gsa_flax.data.augment.rand_augment`) is drawn from the example's key, after the
crop, resize and flip; Mixup/CutMix (:func:`gsa_flax.data.mixing.mix_params`) is drawn for
each batch with a key from ``(seed, process, absolute step)``, a stream apart from the
examples' keys, and applied on the accelerators. With augmentation off, no op of it is in
the pipeline.

Batches carry ``uint8`` images, cropped and resized but not normalised: a quarter of the
float32 bytes to copy to the accelerators, which normalise them inside the compiled step
with the spec's mean and std (:func:`gsa_flax.data.preprocess.normalize` is the same
function on the host, for prediction). Mixup/CutMix is drawn here and applied there too
(below).

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

from gsa_flax.data import preprocess
from gsa_flax.data.augment_config import Augment
from gsa_flax.data.datasets import DatasetNotFoundError, DatasetSpec
from gsa_flax.data.mixing import mix_params
from gsa_flax.data.train_order import TrainOrder

# Key streams folded into (seed, process) where the example keys fold in the epoch, at
# values no epoch reaches, so that no two streams share a key: Mixup/CutMix's (folded with
# the step) and the training order's (folded with the epoch).
_MIX_STREAM = 2**31 - 1
_ORDER_STREAM = 2**31 - 2


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

  A dataset built on first use (``digits``), or one whose source files are found on this
  machine (``fashion_mnist``'s IDX files), is built into ``data_dir`` when missing (seconds,
  no network); the others must have been prepared as their spec says.

  Args:
    spec: the dataset (``gsa_flax.data.datasets.get(name)``).
    data_dir: TFDS data directory; ``None`` or ``''`` for the TFDS default.
    image_size: the stored resolution, for datasets with a builder config per size;
      ignored by the others, which are resized in the pipeline.

  Returns:
    The builder, ready for the ``create_*_iterator`` functions.

  Raises:
    DatasetNotFoundError: the dataset is not prepared in ``data_dir`` (the message says
      how to prepare it), or its local source files are bad (the message names the file).
  """
  _hide_accelerators_from_tf()
  data_dir = data_dir or None  # '' (the configs' default) means TFDS's default, not the cwd
  config = spec.builder_config(image_size) if spec.builder_config else None
  builder = tfds.builder(spec.name, config=config, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  root = str(builder.data_dir_root)
  # A dataset found as files on this machine is prepared from them, like one built on
  # first use; the builder that reads it afterwards is TFDS's own.
  preparer = spec.local_builder(root) if spec.local_builder else None
  if preparer is None and not spec.built_on_first_use:
    raise DatasetNotFoundError(
      f'dataset {spec.name!r} is not prepared in data_dir={root!r} (nothing valid at '
      f'{builder.data_dir}); ' + spec.prepare.format(data_dir=root)
    )
  try:
    (preparer or builder).download_and_prepare()
  except OSError:
    # Processes sharing data_dir build concurrently: one rename wins, the result is the same.
    if not builder.is_prepared():
      raise
  return tfds.builder(spec.name, config=config, data_dir=data_dir)


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


def _train_stream(
  builder: tfds.core.DatasetBuilder,
  *,
  spec: DatasetSpec,
  order: TrainOrder,
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
      'image': preprocess.train_image(example['image'], key, spec, image_size, augment),
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
    drawn by :func:`gsa_flax.data.mixing.mix_params` and applied by the compiled step
    (``gsa_flax.train.steps.mix_images``) to the unmixed ``uint8`` images:
    ``'mix_blend': float32 [local_batch]``, ``'mix_box': int32 [local_batch, 4]``, and
    the target, ``'mix_label': int32 [local_batch]`` and ``'mix_weight': float32
    [local_batch]``: ``mix_weight * onehot(label) + (1 - mix_weight) * onehot(mix_label)``
    (:func:`gsa_flax.data.mixing.mix_batch` is the same mixing on the host).

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
    order=TrainOrder(builder, split),
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
      'image': preprocess.eval_image(example['image'], spec, image_size),
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
      preprocess.normalize(preprocess.eval_image(example['image'], spec, image_size), spec),
      example['label'],
    )
  )
  images, labels = [], []
  for image, label in ds.as_numpy_iterator():
    images.append(image)
    labels.append(int(label))
  return np.stack(images), np.asarray(labels, np.int32)

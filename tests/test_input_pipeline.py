"""The input pipeline's mechanics on the embedded digits set and on mocked cifar100/imagenet2012.

digits is built once per session from scikit-learn into a temporary data dir; cifar100 and
imagenet2012 go through the real loading code on ``tfds.testing.mock_data`` (see
``helpers.py``). Nothing is downloaded. Several processes are played by passing
``process=(index, count)``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import DIGITS_IMAGE_SIZE as IMAGE_SIZE
from helpers import MOCK_EXAMPLES, environment, mock_data

from gsa_flax.data import augment, datasets, input_pipeline, mixing, preprocess
from gsa_flax.train import steps

DIGITS = datasets.get('digits')
# Decode and normalise only (no crop, no flip): training examples can be identified.
UNAUGMENTED = dataclasses.replace(DIGITS, train_crop='none', flip=False)


@pytest.fixture(scope='module')
def builder(digits_dir):
  return input_pipeline.get_builder(DIGITS, digits_dir, image_size=IMAGE_SIZE)


def _fingerprints(images: np.ndarray, labels: np.ndarray) -> collections.Counter:
  """Multiset of (image bytes, label) pairs: equality means the same examples."""
  return collections.Counter(
    (np.asarray(image).tobytes(), int(label)) for image, label in zip(images, labels, strict=True)
  )


def _split_fingerprints(builder, split: str) -> collections.Counter:
  examples = list(builder.as_dataset(split=split).as_numpy_iterator())
  return _fingerprints([e['image'] for e in examples], [e['label'] for e in examples])


def _unnormalize(images: np.ndarray, spec: datasets.DatasetSpec) -> np.ndarray:
  mean = np.array(spec.mean_rgb, np.float32)
  std = np.array(spec.stddev_rgb, np.float32)
  return np.round(images * std + mean).astype(np.uint8)


def _normalized(images: np.ndarray, spec: datasets.DatasetSpec = DIGITS) -> np.ndarray:
  """What the compiled steps make of a batch's images: ``(x - mean) / std`` in float32."""
  mean = np.array(spec.mean_rgb, np.float32)
  std = np.array(spec.stddev_rgb, np.float32)
  return (images.astype(np.float32) - mean) / std


def _collect_eval(builder, global_batch_size: int, process=None):
  iterator, num_steps = input_pipeline.create_eval_iterator(
    builder,
    spec=DIGITS,
    global_batch_size=global_batch_size,
    image_size=IMAGE_SIZE,
    process=process,
  )
  return list(iterator), num_steps


def _real_examples(batches) -> collections.Counter:
  """Fingerprints of the mask == 1 examples of eval batches (uint8 images)."""
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  real = np.concatenate([b['mask'] for b in batches]) == 1.0
  return _fingerprints(images[real], labels[real])


def test_get_builder_reuses_prepared_digits(builder):
  again = input_pipeline.get_builder(DIGITS, str(builder.data_dir_root), image_size=IMAGE_SIZE)
  assert again.data_dir == builder.data_dir
  assert input_pipeline.num_examples(again, DIGITS.eval_split) == 360


# Training


def test_train_batches(builder):
  iterator = input_pipeline.create_train_iterator(
    builder, spec=DIGITS, global_batch_size=32, image_size=IMAGE_SIZE, seed=0
  )
  first, second = next(iterator), next(iterator)
  assert first['image'].shape == (32, IMAGE_SIZE, IMAGE_SIZE, 3)
  # uint8, not normalised: the compiled step normalises on the device.
  assert first['image'].dtype == np.uint8 and first['label'].dtype == np.int32
  assert first['label'].shape == (32,)
  assert set(first['label']) <= set(range(10))
  assert not np.array_equal(first['image'], second['image'])
  # Normalised with the spec's statistics: mean near 0 and std near 1 (padding adds some
  # black, hence loose bounds).
  normalized = _normalized(first['image'])
  assert abs(normalized.mean()) < 0.5 and 0.6 < normalized.std() < 1.5


def test_steps_per_epoch(builder):
  assert input_pipeline.steps_per_epoch(builder, DIGITS, 100) == 1437 // 100


@pytest.mark.parametrize('start_step', [3, 14, 16])
def test_train_resume_is_exact(builder, start_step):
  # 1437 // 96 = 14 steps per epoch: resuming at 14 starts epoch 1, at 16 is inside it,
  # and the fresh stream crosses the boundary.
  kwargs = dict(spec=DIGITS, global_batch_size=96, image_size=IMAGE_SIZE, seed=7)
  assert input_pipeline.steps_per_epoch(builder, DIGITS, 96) == 14
  fresh = list(itertools.islice(input_pipeline.create_train_iterator(builder, **kwargs), 18))
  resumed = list(
    itertools.islice(
      input_pipeline.create_train_iterator(builder, **kwargs, start_step=start_step),
      18 - start_step,
    )
  )
  for expected, actual in zip(fresh[start_step:], resumed, strict=True):
    np.testing.assert_array_equal(actual['image'], expected['image'])
    np.testing.assert_array_equal(actual['label'], expected['label'])


def test_train_seed_changes_order_and_augmentation(builder):
  def first_batch(seed):
    return next(
      input_pipeline.create_train_iterator(
        builder, spec=DIGITS, global_batch_size=64, image_size=IMAGE_SIZE, seed=seed
      )
    )

  np.testing.assert_array_equal(first_batch(1)['image'], first_batch(1)['image'])
  assert not np.array_equal(first_batch(1)['label'], first_batch(2)['label'])


def test_train_epochs_are_reshuffled_permutations(builder):
  iterator = input_pipeline.create_train_iterator(
    builder, spec=UNAUGMENTED, global_batch_size=100, image_size=IMAGE_SIZE, seed=0
  )
  train = _split_fingerprints(builder, 'train')
  epochs = []
  for _ in range(2):
    batches = list(itertools.islice(iterator, 14))  # 1437 // 100 steps per epoch.
    images = np.concatenate([b['image'] for b in batches])
    labels = np.concatenate([b['label'] for b in batches])
    epoch = _fingerprints(images, labels)
    assert sum(epoch.values()) == 1400
    assert epoch <= train  # Distinct training examples.
    epochs.append(
      [(image.tobytes(), int(label)) for image, label in zip(images, labels, strict=True)]
    )
  assert epochs[0] != epochs[1]


def test_train_shards_of_two_processes_are_disjoint(builder):
  train = _split_fingerprints(builder, 'train')
  shards = []
  for index in range(2):
    process = (index, 2)
    assert input_pipeline.steps_per_epoch(builder, DIGITS, 64, process=process) == 1437 // 64
    iterator = input_pipeline.create_train_iterator(
      builder,
      spec=UNAUGMENTED,
      global_batch_size=64,
      image_size=IMAGE_SIZE,
      seed=0,
      process=process,
    )
    batches = list(itertools.islice(iterator, 1437 // 64))
    assert batches[0]['image'].shape == (32, IMAGE_SIZE, IMAGE_SIZE, 3)  # Local batch.
    images = np.concatenate([b['image'] for b in batches])
    shards.append(_fingerprints(images, np.concatenate([b['label'] for b in batches])))
  assert sum(shards[0].values()) == sum(shards[1].values()) == 32 * (1437 // 64)
  assert not shards[0] & shards[1]
  assert shards[0] + shards[1] <= train


# Evaluation


@pytest.mark.parametrize('global_batch_size', [1, 7, 64, 360, 500])
def test_eval_covers_split_once(builder, global_batch_size):
  batches, num_steps = _collect_eval(builder, global_batch_size)
  assert num_steps == len(batches) == math.ceil(360 / global_batch_size)
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.dtype == np.float32
  assert batches[0]['image'].dtype == np.uint8
  # Padding only at the end, with zero images.
  np.testing.assert_array_equal(masks, np.arange(len(masks)) < 360)
  padding = np.concatenate([b['image'] for b in batches])[360:]
  assert not padding.any()
  assert _real_examples(batches) == _split_fingerprints(builder, 'test')


@pytest.mark.parametrize('process_count', [2, 7])
def test_eval_processes_cover_split_with_equal_steps(builder, process_count):
  local_batch = 8
  covered = collections.Counter()
  steps = set()
  for index in range(process_count):
    batches, num_steps = _collect_eval(
      builder, local_batch * process_count, process=(index, process_count)
    )
    assert len(batches) == num_steps
    assert batches[0]['image'].shape[0] == local_batch
    steps.add(num_steps)
    shard = _real_examples(batches)
    assert not covered & shard
    covered += shard
  assert steps == {math.ceil(math.ceil(360 / process_count) / local_batch)}
  assert covered == _split_fingerprints(builder, 'test')


def test_preprocess_for_eval_matches_eval_batches(builder):
  (batch, *_), _ = _collect_eval(builder, 16)
  raw = [e['image'] for e in builder.as_dataset(split='test').take(16).as_numpy_iterator()]
  for image, expected in zip(raw, _normalized(batch['image']), strict=True):
    actual = preprocess.preprocess_for_eval(image, spec=DIGITS, image_size=IMAGE_SIZE)
    np.testing.assert_array_equal(actual.numpy(), expected)


@pytest.mark.parametrize('dataset', datasets.NAMES)
@pytest.mark.parametrize('channels', [1, 3, 4])
def test_preprocess_for_eval_any_image(dataset, channels):
  spec = datasets.get(dataset)
  image = np.random.default_rng(122).integers(0, 256, (37, 50, channels), dtype=np.uint8)
  out = preprocess.preprocess_for_eval(image, spec=spec, image_size=24).numpy()
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  assert np.isfinite(out).all()
  if channels == 1:
    assert np.allclose(_unnormalize(out, spec)[..., 0], _unnormalize(out, spec)[..., 2])


@pytest.mark.parametrize(('dataset', 'crop_side'), [('imagenet2012', 30), ('digits', 40)])
def test_eval_crop_keeps_the_center(dataset, crop_side):
  """'center' keeps image_size / (image_size + 32) of the shorter side, 'square' all of it."""
  spec = datasets.get(dataset)
  image = np.zeros((40, 60, 3), np.uint8)
  image[10:30, 20:40] = 255  # a white 20x20 square in the middle of a 40x60 image
  # At image_size 96 the 'center' crop is int(96 / 128 * 40) = 30 pixels wide.
  out = preprocess.preprocess_for_eval(image, spec=spec, image_size=96)
  white = (_unnormalize(out.numpy(), spec)[..., 0] > 127).mean()
  assert abs(white - (20 / crop_side) ** 2) < 0.03, white


# Errors


def test_batch_size_not_divisible_by_processes(builder):
  with pytest.raises(ValueError, match='batch_size=30'):
    input_pipeline.create_train_iterator(
      builder, spec=DIGITS, global_batch_size=30, image_size=IMAGE_SIZE, seed=0, process=(0, 4)
    )
  with pytest.raises(ValueError, match='batch_size'):
    input_pipeline.create_eval_iterator(
      builder, spec=DIGITS, global_batch_size=30, image_size=IMAGE_SIZE, process=(0, 4)
    )


@pytest.mark.parametrize('dataset', ['cifar100', 'imagenet2012'])
def test_missing_dataset(tmp_path, dataset):
  data_dir = str(tmp_path / 'empty')
  with pytest.raises(datasets.DatasetNotFoundError) as error:
    input_pipeline.get_builder(datasets.get(dataset), data_dir)
  message = str(error.value)
  assert isinstance(error.value, ValueError)
  assert dataset in message and data_dir in message
  assert f'tfds build {dataset} --data_dir={data_dir}' in message
  if dataset == 'imagenet2012':
    assert f'{data_dir}/downloads/manual' in message
    assert 'ILSVRC2012_img_train.tar' in message and 'ILSVRC2012_img_val.tar' in message


# cifar100 and imagenet2012 on mocked data


@pytest.mark.parametrize(('dataset', 'image_size'), [('cifar100', 40), ('imagenet2012', 24)])
def test_mocked_dataset_through_real_loading(mock_data_dir, dataset, image_size):
  """Metadata and evaluation through the real loading code (the mock serves no files, so
  training, which reads the record files, is tested on real JPEG records below)."""
  spec = datasets.get(dataset)
  with mock_data(mock_data_dir):
    builder = input_pipeline.get_builder(spec, '/data/dir/ignored/by/mock')
    names = input_pipeline.class_names(builder)
    assert len(names) == spec.num_classes == (1000 if dataset == 'imagenet2012' else 100)
    assert input_pipeline.steps_per_epoch(builder, spec, 4) == MOCK_EXAMPLES // 4

    iterator, num_steps = input_pipeline.create_eval_iterator(
      builder, spec=spec, global_batch_size=5, image_size=image_size
    )
    batches = list(iterator)
    assert num_steps == len(batches) == 3
    masks = np.concatenate([b['mask'] for b in batches])
    np.testing.assert_array_equal(masks, np.arange(15) < MOCK_EXAMPLES)
    images = _normalized(np.concatenate([b['image'] for b in batches]), spec)
    assert images.shape == (15, image_size, image_size, 3) and np.isfinite(images).all()

    # The prediction path (a decoded image) gives exactly the eval batches' images.
    encoded = builder.as_dataset(
      split=spec.eval_split,
      # The same features as the pipeline reads: the mock draws its examples from them.
      decoders=tfds.decode.PartialDecoding(
        {'image': True, 'label': True}, decoders={'image': tfds.decode.SkipDecoding()}
      ),
    )
    for example, expected in zip(encoded, images[:MOCK_EXAMPLES], strict=True):
      decoded = tf.io.decode_image(example['image'], channels=3, expand_animations=False)
      actual = preprocess.preprocess_for_eval(decoded, spec=spec, image_size=image_size)
      np.testing.assert_array_equal(actual.numpy(), expected)


# Real JPEG records in several files, read with imagenet2012's spec (Inception crop fused
# with the decode). Labels are the record indices, so each example can be identified.
# 2,100 records in three files: two windows of the training order (two files, then one).
JPEG_RECORDS = 2100
JPEGS = dataclasses.replace(datasets.get('imagenet2012'), name='jpeg_records')


@pytest.fixture(scope='module')
def jpeg_builder(tmp_path_factory):
  shapes = [(12, 16), (16, 12)]  # landscape and portrait, like ImageNet's

  def examples():
    rng = np.random.default_rng(0)
    for index in range(JPEG_RECORDS):
      yield {'image': rng.integers(0, 256, (*shapes[index % 2], 3), np.uint8), 'label': index}

  features = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
      'label': tfds.features.ClassLabel(num_classes=JPEG_RECORDS),
    }
  )
  train = tf.data.Dataset.from_generator(
    examples,
    output_signature={
      'image': tf.TensorSpec([None, None, 3], tf.uint8),
      'label': tf.TensorSpec([], tf.int64),
    },
  )
  builder = tfds.dataset_builders.TfDataBuilder(
    name=JPEGS.name,
    version='1.0.0',
    split_datasets={'train': train},
    features=features,
    data_dir=str(tmp_path_factory.mktemp('jpegs')),
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
  return builder


def test_jpeg_records_train_epochs_and_resume(jpeg_builder):
  assert len(jpeg_builder.info.splits['train'].file_instructions) == 3
  kwargs = dict(spec=JPEGS, global_batch_size=64, image_size=8, seed=3)
  steps = input_pipeline.steps_per_epoch(jpeg_builder, JPEGS, 64)
  assert steps == JPEG_RECORDS // 64
  batches = list(
    itertools.islice(input_pipeline.create_train_iterator(jpeg_builder, **kwargs), 2 * steps)
  )
  for batch in batches:
    assert batch['image'].shape == (64, 8, 8, 3) and batch['image'].dtype == np.uint8
  # Each epoch: distinct records from all three files, in a new order.
  epochs = [
    np.concatenate([b['label'] for b in batches[e * steps : (e + 1) * steps]]) for e in (0, 1)
  ]
  for labels in epochs:
    assert len(set(labels.tolist())) == steps * 64
    assert set(labels.tolist()) <= set(range(JPEG_RECORDS))
  assert epochs[0].tolist() != epochs[1].tolist()
  # Resumed anywhere (in the first window, in the second and last, in the next epoch):
  # the same batches.
  for start in (3, 25, steps - 1, steps + 25):
    resumed = input_pipeline.create_train_iterator(jpeg_builder, **kwargs, start_step=start)
    for expected in batches[start : start + 2]:
      actual = next(resumed)
      np.testing.assert_array_equal(actual['image'], expected['image'])
      np.testing.assert_array_equal(actual['label'], expected['label'])


def test_jpeg_records_processes_read_disjoint_parts(jpeg_builder):
  seen = []
  for index in range(3):
    iterator = input_pipeline.create_train_iterator(
      jpeg_builder,
      spec=JPEGS,
      global_batch_size=192,
      image_size=8,
      seed=0,
      process=(index, 3),
    )
    steps = input_pipeline.steps_per_epoch(jpeg_builder, JPEGS, 192, process=(index, 3))
    labels = np.concatenate([next(iterator)['label'] for _ in range(steps)])
    assert len(set(labels.tolist())) == len(labels) == steps * 64
    seen.append(set(labels.tolist()))
  assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_empty_data_dir_means_the_tfds_default(tmp_path):
  """configs use data_dir='' for "TFDS's default": it must not build into the cwd."""
  default_dir = tmp_path / 'tfds_default'
  program = (
    'from gsa_flax.data import datasets, input_pipeline\n'
    "b = input_pipeline.get_builder(datasets.get('digits'), '', image_size=8)\n"
    'print(b.data_dir)'
  )
  env = dict(environment(devices=1), TFDS_DATA_DIR=str(default_dir))
  result = subprocess.run(
    [sys.executable, '-c', program], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1].startswith(str(default_dir))
  assert not (tmp_path / 'digits').exists()


# Strong augmentation: RandAugment per example, Mixup/CutMix per batch.

# Process 1 of 8 (its own key stream; 1437 // 8 = 179 examples) at a local batch of 32:
# 5 steps per epoch, so a few batches cross an epoch boundary, and few images to augment.
PROCESS = (1, 8)
AUGMENT_BATCH = 256
LOCAL_BATCH = AUGMENT_BATCH // PROCESS[1]
RAND_AUGMENT = input_pipeline.Augment(num_layers=2, magnitude=9.0, magnitude_std=0.5)
MIX = input_pipeline.Augment(mixup_alpha=0.2, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
BOTH = dataclasses.replace(RAND_AUGMENT, mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.8)


def _batches(builder, count, *, spec=DIGITS, seed=5, start_step=0, augment=None):
  iterator = input_pipeline.create_train_iterator(
    builder,
    spec=spec,
    global_batch_size=AUGMENT_BATCH,
    image_size=IMAGE_SIZE,
    seed=seed,
    start_step=start_step,
    process=PROCESS,
    augment=augment,
  )
  return list(itertools.islice(iterator, count))


def _example_keys(seed: int, epoch: int, positions) -> list[tf.Tensor]:
  """The documented key of each example: (seed, process index) folded with the epoch (an
  int32 scalar), then with the position in the epoch (int64, as tf.data counts)."""
  run_key = tf.constant([seed, PROCESS[0]], tf.int64)
  epoch_key = tf.random.experimental.stateless_fold_in(run_key, epoch)
  return [
    tf.random.experimental.stateless_fold_in(epoch_key, tf.constant(p, tf.int64)) for p in positions
  ]


def _padded_crops(builder, seed: int, keys) -> np.ndarray:
  """digits' 'pad' crop by hand: the raw examples in the epoch's order (from the
  unaugmented pipeline, same seed), zero-padded by 2 and cropped back with each key's
  first 2-way split key. Returns the crops (uint8 [batch, 16, 16, 3]) and their
  labels."""
  (plain,) = _batches(builder, 1, spec=UNAUGMENTED, seed=seed)
  raw = plain['image']
  crops = []
  for image, key in zip(raw, keys, strict=True):
    crop_key = tf.random.experimental.stateless_split(key, 2)[0]
    padded = tf.pad(image, [[2, 2], [2, 2], [0, 0]])  # round(4 / 32 * 16) = 2
    crops.append(tf.image.stateless_random_crop(padded, image.shape, seed=crop_key).numpy())
  return np.stack(crops), plain['label']


def test_augmentation_off_leaves_the_batches_as_they_were(builder):
  keys = _example_keys(5, 0, range(LOCAL_BATCH))
  crops, labels = _padded_crops(builder, 5, keys)
  for off in (None, input_pipeline.Augment()):
    (batch,) = _batches(builder, 1, augment=off)
    assert set(batch) == {'image', 'label'}
    np.testing.assert_array_equal(batch['label'], labels)
    np.testing.assert_array_equal(batch['image'], crops)


def test_rand_augment_follows_the_crop_with_the_third_key(builder):
  keys = _example_keys(5, 0, range(LOCAL_BATCH))
  crops, labels = _padded_crops(builder, 5, keys)
  (batch,) = _batches(builder, 1, augment=RAND_AUGMENT)
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (LOCAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch['image'].dtype == np.uint8
  np.testing.assert_array_equal(batch['label'], labels)
  want = []
  for crop, key in zip(crops, keys, strict=True):
    ra_key = tf.random.experimental.stateless_split(key, 3)[2]
    want.append(augment.rand_augment(crop, ra_key, num_layers=2, magnitude=9.0, magnitude_std=0.5))
  np.testing.assert_array_equal(batch['image'], np.stack(want))
  # Most images are changed (2 ops of 15, most of which change a digit at magnitude ~9).
  changed = (batch['image'] != crops).any(axis=(1, 2, 3))
  assert changed.mean() > 0.5


MIX_FIELDS = {'image', 'label', 'mix_label', 'mix_weight', 'mix_blend', 'mix_box'}


def test_mixing_is_keyed_by_the_absolute_step(builder):
  plain = _batches(builder, 7)  # crosses into epoch 1 at step 5
  mixed = _batches(builder, 7, augment=MIX)
  run_key = tf.constant([5, PROCESS[0]], tf.int64)
  base = tf.random.experimental.stateless_fold_in(run_key, 2**31 - 1)
  weights = set()
  for step, (before, after) in enumerate(zip(plain, mixed, strict=True)):
    assert set(after) == MIX_FIELDS
    assert after['mix_label'].dtype == np.int32 and after['mix_weight'].dtype == np.float32
    np.testing.assert_array_equal(after['label'], before['label'])
    # The images leave the host unmixed, uint8; the compiled step mixes them.
    np.testing.assert_array_equal(after['image'], before['image'])
    # prob=1: every batch is mixed with itself reversed.
    np.testing.assert_array_equal(after['mix_label'], before['label'][::-1])
    key = tf.random.experimental.stateless_fold_in(base, tf.constant(step, tf.int64))
    # Mixed on the 0..255 scale, on the host, from the same key.
    want = mixing.mix_batch(
      before['image'].astype(np.float32),
      before['label'],
      key,
      mixup_alpha=0.2,
      cutmix_alpha=1.0,
      prob=1.0,
    )
    for name in ('label', 'mix_label', 'mix_weight'):
      np.testing.assert_array_equal(after[name], want[name].numpy(), err_msg=name)
    on_device = np.asarray(steps.mix_images(after))
    np.testing.assert_allclose(on_device, want['image'].numpy(), rtol=0, atol=1e-4)
    assert len(set(after['mix_weight'].tolist())) == 1
    weights.add(float(after['mix_weight'][0]))
  assert len(weights) == 7  # a new lam every step


@pytest.fixture(scope='module')
def augmented(builder):
  """Seven batches with RandAugment and mixing on, from step 0 (crossing into epoch 1)."""
  return _batches(builder, 7, augment=BOTH)


@pytest.mark.parametrize('start_step', [3, 6])
def test_augmented_resume_is_exact(builder, augmented, start_step):
  resumed = _batches(builder, 7 - start_step, augment=BOTH, start_step=start_step)
  for expected, actual in zip(augmented[start_step:], resumed, strict=True):
    assert set(actual) == MIX_FIELDS
    for name in expected:
      np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
  # prob=0.8 over 7 steps: both mixed and unmixed batches are in the stream.
  assert {float(batch['mix_weight'][0]) == 1.0 for batch in augmented} == {True, False}

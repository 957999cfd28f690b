"""Tests of gsa_flax.input_pipeline and the embedded digits dataset.

digits is built once per module from scikit-learn into a temporary data dir. cifar100 and
imagenet2012 go through the real loading code on ``tfds.testing.mock_data``: the mock
(policy USE_FILES) needs the datasets' metadata in a data dir, which the ``mock_data_dir``
fixture writes from the builders that ship with TFDS, with tiny split sizes that match the
number of mocked examples. Nothing is downloaded.
"""

from __future__ import annotations

import collections
import itertools
import math

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tfds_mock
from sklearn.datasets import load_digits
from tfds_mock import MOCK_EXAMPLES

from gsa_flax import input_pipeline
from gsa_flax.datasets import digits as digits_lib

# A multiple of 8, so the stored digits are the source pixels replicated 2x2 (np.kron).
IMAGE_SIZE = 16


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return input_pipeline.get_builder('digits', data_dir, image_size=IMAGE_SIZE)


def _source_images() -> tuple[np.ndarray, np.ndarray]:
  """sklearn digits as the stored format, computed independently of digits.upscale."""
  source = load_digits()
  grey = np.round(source.images * 255 / 16).astype(np.uint8)
  factor = IMAGE_SIZE // 8
  images = np.stack([np.kron(g, np.ones((factor, factor), np.uint8)) for g in grey])
  return np.repeat(images[..., None], 3, axis=-1), source.target


def _fingerprints(images: np.ndarray, labels: np.ndarray) -> collections.Counter:
  """Multiset of (image bytes, label) pairs: equality means the same examples."""
  return collections.Counter(
    (np.asarray(image).tobytes(), int(label)) for image, label in zip(images, labels, strict=True)
  )


def _split_fingerprints(builder, split: str) -> collections.Counter:
  examples = list(builder.as_dataset(split=split).as_numpy_iterator())
  return _fingerprints([e['image'] for e in examples], [e['label'] for e in examples])


def _unnormalize(images: np.ndarray, dataset: str) -> np.ndarray:
  mean = np.array(input_pipeline.MEAN_RGB[dataset], np.float32)
  std = np.array(input_pipeline.STDDEV_RGB[dataset], np.float32)
  return np.round(images * std + mean).astype(np.uint8)


def _collect_eval(builder, global_batch_size: int):
  iterator, num_steps = input_pipeline.create_eval_iterator(
    builder, dataset='digits', global_batch_size=global_batch_size, image_size=IMAGE_SIZE
  )
  return list(iterator), num_steps


def _real_examples(batches) -> collections.Counter:
  """Fingerprints of the mask == 1 examples of eval batches, back on the uint8 scale."""
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  real = np.concatenate([b['mask'] for b in batches]) == 1.0
  return _fingerprints(_unnormalize(images[real], 'digits'), labels[real])


@pytest.fixture
def fake_processes(monkeypatch):
  """Makes this process believe it is ``index`` of ``count`` JAX processes."""

  def pretend(index: int, count: int):
    monkeypatch.setattr(jax, 'process_index', lambda: index)
    monkeypatch.setattr(jax, 'process_count', lambda: count)

  return pretend


@pytest.fixture
def unaugmented(monkeypatch):
  """Training images decoded without augmentation, so examples can be identified."""

  def decode_only(encoded, key, dataset, image_size):
    del key, dataset, image_size
    return tf.cast(tf.io.decode_image(encoded, channels=3, expand_animations=False), tf.float32)

  monkeypatch.setattr(input_pipeline, '_train_image', decode_only)


# digits


def test_digits_is_sklearn_digits_with_fixed_split(builder):
  images, labels = _source_images()
  splits = builder.info.splits
  assert splits['train'].num_examples == digits_lib.NUM_TRAIN_EXAMPLES == 1437
  assert splits['test'].num_examples == digits_lib.NUM_TEST_EXAMPLES == 360
  assert splits['train'].num_examples + splits['test'].num_examples == 1797
  features = builder.info.features
  assert features['image'].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
  assert features['image'].dtype == np.uint8
  assert input_pipeline.class_names(builder) == [str(d) for d in range(10)]
  # Every stored example is a source image with its label: train the first 1437, test the rest.
  assert _split_fingerprints(builder, 'train') == _fingerprints(images[:1437], labels[:1437])
  assert _split_fingerprints(builder, 'test') == _fingerprints(images[1437:], labels[1437:])


def test_digits_upscale_nearest_at_any_size():
  source = load_digits().images[5]
  image = digits_lib.upscale(source, 20)
  assert image.shape == (20, 20, 3) and image.dtype == np.uint8
  assert (image[..., 0] == image[..., 2]).all()
  # Pixel (i, j) of the output comes from the source pixel under its top-left corner.
  for i, j in [(0, 0), (2, 3), (7, 19), (19, 19)]:
    assert image[i, j, 0] == round(source[i * 8 // 20, j * 8 // 20] * 255 / 16)


def test_digits_normalization_constants_match_train_split():
  images, _ = _source_images()
  train = images[: digits_lib.NUM_TRAIN_EXAMPLES].astype(np.float64)
  np.testing.assert_allclose(input_pipeline.MEAN_RGB['digits'], [train.mean()] * 3, atol=0.1)
  np.testing.assert_allclose(input_pipeline.STDDEV_RGB['digits'], [train.std()] * 3, atol=0.1)


def test_get_builder_reuses_prepared_digits(builder):
  again = input_pipeline.get_builder('digits', str(builder.data_dir_root), image_size=IMAGE_SIZE)
  assert again.data_dir == builder.data_dir
  assert input_pipeline.num_examples(again, 'test') == 360


# Training


def test_train_batches(builder):
  iterator = input_pipeline.create_train_iterator(
    builder, dataset='digits', global_batch_size=32, image_size=IMAGE_SIZE, seed=0
  )
  first, second = next(iterator), next(iterator)
  assert first['image'].shape == (32, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert first['image'].dtype == np.float32 and first['label'].dtype == np.int32
  assert first['label'].shape == (32,)
  assert np.isfinite(first['image']).all()
  assert set(first['label']) <= set(range(10))
  assert not np.array_equal(first['image'], second['image'])
  # Normalized: mean near 0 and std near 1 (padding adds some black, hence loose bounds).
  assert abs(first['image'].mean()) < 0.5 and 0.6 < first['image'].std() < 1.5


def test_steps_per_epoch(builder):
  assert input_pipeline.steps_per_epoch(builder, 'digits', 100) == 1437 // 100


@pytest.mark.parametrize('start_step', [3, 14, 16])
def test_train_resume_is_exact(builder, start_step):
  # 1437 // 96 = 14 steps per epoch: resuming at 14 starts epoch 1, at 16 is inside it,
  # and the fresh stream crosses the boundary.
  kwargs = dict(dataset='digits', global_batch_size=96, image_size=IMAGE_SIZE, seed=7)
  assert input_pipeline.steps_per_epoch(builder, 'digits', 96) == 14
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
        builder, dataset='digits', global_batch_size=64, image_size=IMAGE_SIZE, seed=seed
      )
    )

  np.testing.assert_array_equal(first_batch(1)['image'], first_batch(1)['image'])
  assert not np.array_equal(first_batch(1)['label'], first_batch(2)['label'])


def test_train_epochs_are_reshuffled_permutations(builder, unaugmented):
  iterator = input_pipeline.create_train_iterator(
    builder, dataset='digits', global_batch_size=100, image_size=IMAGE_SIZE, seed=0
  )
  train = _split_fingerprints(builder, 'train')
  epochs = []
  for _ in range(2):
    batches = list(itertools.islice(iterator, 14))  # 1437 // 100 steps per epoch.
    images = np.concatenate([b['image'] for b in batches]).astype(np.uint8)
    labels = np.concatenate([b['label'] for b in batches])
    epoch = _fingerprints(images, labels)
    assert sum(epoch.values()) == 1400
    assert epoch <= train  # Distinct training examples.
    epochs.append(
      [(image.tobytes(), int(label)) for image, label in zip(images, labels, strict=True)]
    )
  assert epochs[0] != epochs[1]


def test_train_shards_of_two_processes_are_disjoint(builder, fake_processes, unaugmented):
  train = _split_fingerprints(builder, 'train')
  shards = []
  for index in range(2):
    fake_processes(index, 2)
    assert input_pipeline.steps_per_epoch(builder, 'digits', 64) == 1437 // 64
    iterator = input_pipeline.create_train_iterator(
      builder, dataset='digits', global_batch_size=64, image_size=IMAGE_SIZE, seed=0
    )
    batches = list(itertools.islice(iterator, 1437 // 64))
    assert batches[0]['image'].shape == (32, IMAGE_SIZE, IMAGE_SIZE, 3)  # Local batch.
    images = np.concatenate([b['image'] for b in batches]).astype(np.uint8)
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
  # Padding only at the end, with zero images.
  np.testing.assert_array_equal(masks, np.arange(len(masks)) < 360)
  padding = np.concatenate([b['image'] for b in batches])[360:]
  assert not padding.any()
  assert _real_examples(batches) == _split_fingerprints(builder, 'test')


@pytest.mark.parametrize('process_count', [2, 7])
def test_eval_processes_cover_split_with_equal_steps(builder, fake_processes, process_count):
  local_batch = 8
  covered = collections.Counter()
  steps = set()
  for index in range(process_count):
    fake_processes(index, process_count)
    batches, num_steps = _collect_eval(builder, local_batch * process_count)
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
  for image, expected in zip(raw, batch['image'], strict=True):
    actual = input_pipeline.preprocess_for_eval(image, dataset='digits', image_size=IMAGE_SIZE)
    np.testing.assert_array_equal(actual.numpy(), expected)


@pytest.mark.parametrize('dataset', input_pipeline.DATASETS)
@pytest.mark.parametrize('channels', [1, 3, 4])
def test_preprocess_for_eval_any_image(dataset, channels):
  image = np.random.default_rng(0).integers(0, 256, (37, 50, channels), dtype=np.uint8)
  out = input_pipeline.preprocess_for_eval(image, dataset=dataset, image_size=24).numpy()
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  assert np.isfinite(out).all()
  if channels == 1:
    assert np.allclose(_unnormalize(out, dataset)[..., 0], _unnormalize(out, dataset)[..., 2])


# Errors


def test_batch_size_not_divisible_by_processes(builder, fake_processes):
  fake_processes(0, 4)
  with pytest.raises(ValueError, match='batch_size=30'):
    input_pipeline.create_train_iterator(
      builder, dataset='digits', global_batch_size=30, image_size=IMAGE_SIZE, seed=0
    )
  with pytest.raises(ValueError, match='batch_size'):
    input_pipeline.create_eval_iterator(
      builder, dataset='digits', global_batch_size=30, image_size=IMAGE_SIZE
    )


def test_unknown_dataset(tmp_path):
  with pytest.raises(ValueError, match='digits, cifar100, imagenet2012') as error:
    input_pipeline.get_builder('mnist', str(tmp_path))
  assert 'mnist' in str(error.value)
  assert not isinstance(error.value, input_pipeline.DatasetNotFoundError)


@pytest.mark.parametrize('dataset', ['cifar100', 'imagenet2012'])
def test_missing_dataset(tmp_path, dataset):
  data_dir = str(tmp_path / 'empty')
  with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
    input_pipeline.get_builder(dataset, data_dir)
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
  with tfds_mock.mock(mock_data_dir):
    builder = input_pipeline.get_builder(dataset, '/data/dir/ignored/by/mock')
    assert input_pipeline.num_classes(builder) == (1000 if dataset == 'imagenet2012' else 100)
    kwargs = dict(dataset=dataset, global_batch_size=4, image_size=image_size, seed=3)
    assert input_pipeline.steps_per_epoch(builder, dataset, 4) == MOCK_EXAMPLES // 4
    train = list(itertools.islice(input_pipeline.create_train_iterator(builder, **kwargs), 5))
    for batch in train:
      assert batch['image'].shape == (4, image_size, image_size, 3)
      assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
      assert np.isfinite(batch['image']).all()
      assert 0.1 < batch['image'].std() < 10
    resumed = next(input_pipeline.create_train_iterator(builder, **kwargs, start_step=4))
    np.testing.assert_array_equal(resumed['image'], train[4]['image'])

    iterator, num_steps = input_pipeline.create_eval_iterator(
      builder, dataset=dataset, global_batch_size=5, image_size=image_size
    )
    batches = list(iterator)
    assert num_steps == len(batches) == 3
    masks = np.concatenate([b['mask'] for b in batches])
    np.testing.assert_array_equal(masks, np.arange(15) < MOCK_EXAMPLES)
    images = np.concatenate([b['image'] for b in batches])
    assert images.shape == (15, image_size, image_size, 3) and np.isfinite(images).all()

    # The prediction path (a decoded image) gives exactly the eval batches' images.
    encoded = builder.as_dataset(
      split=input_pipeline.eval_split_name(dataset),
      # The same features as the pipeline reads: the mock draws its examples from them.
      decoders=tfds.decode.PartialDecoding(
        {'image': True, 'label': True}, decoders={'image': tfds.decode.SkipDecoding()}
      ),
    )
    for example, expected in zip(encoded, images[:MOCK_EXAMPLES], strict=True):
      decoded = tf.io.decode_image(example['image'], channels=3, expand_animations=False)
      actual = input_pipeline.preprocess_for_eval(decoded, dataset=dataset, image_size=image_size)
      np.testing.assert_array_equal(actual.numpy(), expected)


def test_empty_data_dir_means_the_tfds_default(monkeypatch, tmp_path):
  """configs use data_dir='' for "TFDS's default": it must not build into the cwd."""
  default_dir = tmp_path / 'tfds_default'
  # TFDS reads $TFDS_DATA_DIR once, at import: point its default here for this test.
  monkeypatch.setattr(tfds.core.constants, 'DATA_DIR', str(default_dir))
  monkeypatch.chdir(tmp_path)
  builder = input_pipeline.get_builder('digits', '', image_size=8)
  assert builder.is_prepared()
  assert str(builder.data_dir).startswith(str(default_dir))
  assert not (tmp_path / 'digits').exists()

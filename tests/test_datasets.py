"""The dataset specs and the embedded digits dataset, against scikit-learn's digits."""

import collections

import numpy as np
import pytest
from helpers import DIGITS_IMAGE_SIZE as IMAGE_SIZE
from sklearn.datasets import load_digits

from gsa_flax.data import datasets, input_pipeline
from gsa_flax.data.datasets import digits as digits_lib


@pytest.fixture(scope='module')
def builder(digits_dir):
  return input_pipeline.get_builder(datasets.get('digits'), digits_dir, image_size=IMAGE_SIZE)


def _source_images() -> tuple[np.ndarray, np.ndarray]:
  """sklearn digits as the stored format, computed independently of digits.upscale."""
  source = load_digits()
  grey = np.round(source.images * 255 / 16).astype(np.uint8)
  factor = IMAGE_SIZE // 8
  images = np.stack([np.kron(g, np.ones((factor, factor), np.uint8)) for g in grey])
  return np.repeat(images[..., None], 3, axis=-1), source.target


def _fingerprints(images, labels) -> collections.Counter:
  """Multiset of (image bytes, label) pairs: equality means the same examples."""
  return collections.Counter(
    (np.asarray(image).tobytes(), int(label)) for image, label in zip(images, labels, strict=True)
  )


def _split_fingerprints(builder, split: str) -> collections.Counter:
  examples = list(builder.as_dataset(split=split).as_numpy_iterator())
  return _fingerprints([e['image'] for e in examples], [e['label'] for e in examples])


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
  spec = datasets.get('digits')
  np.testing.assert_allclose(spec.mean_rgb, [train.mean()] * 3, atol=0.1)
  np.testing.assert_allclose(spec.stddev_rgb, [train.std()] * 3, atol=0.1)


def test_specs_are_consistent():
  assert datasets.NAMES[0] == 'digits'  # the default needs no download
  for name in datasets.NAMES:
    spec = datasets.get(name)
    assert spec.name == name
    assert spec.built_on_first_use == (name == 'digits')
    assert '{data_dir}' in spec.prepare or spec.built_on_first_use
  with pytest.raises(ValueError, match='digits, cifar100, imagenet2012') as error:
    datasets.get('mnist')
  assert 'mnist' in str(error.value)
  with pytest.raises(ValueError, match='train_crop'):
    datasets.DatasetSpec('x', 2, 'train', 'test', (0, 0, 0), (1, 1, 1), 'random', 'center', True)

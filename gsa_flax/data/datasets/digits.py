"""``digits``: the 8x8 handwritten digits shipped with scikit-learn, as a TFDS dataset.

The default dataset of the project: it needs no download (the 1,797 images are installed
with scikit-learn, ``sklearn.datasets.load_digits``, a copy of the test part of UCI
"Optical Recognition of Handwritten Digits"), so a fresh checkout can train end to end.
It is read through the same ``tfds.builder(...).as_dataset`` path as CIFAR-100 and ImageNet.

Splits are fixed and deterministic: ``train`` is the first 1,437 images and ``test`` the
last 360 (about 80/20; the source is ordered 0, 1, ..., 9, 0, 1, ... so both splits are
close to class balanced: 141 to 146 training images per class).

Images are stored as RGB ``uint8`` at ``image_size x image_size``: the source grey levels
0..16 are scaled to 0..255 (rounded), upscaled by nearest neighbour (exact pixel
replication when ``image_size`` is a multiple of 8) and tiled to three channels, so the
models see the same input format as on the other datasets. Each size is its own builder
config, created on demand::

    builder = tfds.builder('digits', config=DigitsConfig(image_size=32), data_dir=...)
    builder.download_and_prepare()  # Local, a few seconds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TRAIN_EXAMPLES = 1437
NUM_TEST_EXAMPLES = NUM_EXAMPLES - NUM_TRAIN_EXAMPLES
SOURCE_SIZE = 8
_SOURCE_MAX = 16


@dataclasses.dataclass(eq=False, kw_only=True)
class DigitsConfig(tfds.core.BuilderConfig):
  """Builder config of ``digits``: the stored image size.

  Attributes:
    image_size: height and width of the stored images, at least 8.
    name: defaults to ``f'size{image_size}'``; each size is prepared into its own folder.
  """

  name: str = ''
  image_size: int = 32

  def __post_init__(self):
    if self.image_size < SOURCE_SIZE:
      raise ValueError(
        f'DigitsConfig.image_size={self.image_size} is smaller than the {SOURCE_SIZE}x'
        f'{SOURCE_SIZE} source images; use image_size >= {SOURCE_SIZE}.'
      )
    if not self.name:
      self.name = f'size{self.image_size}'
    if not self.description:
      self.description = f'Digits upscaled to {self.image_size}x{self.image_size} RGB.'


def upscale(image: np.ndarray, image_size: int) -> np.ndarray:
  """Converts one source digit to the stored format.

  Args:
    image: ``[8, 8]`` grey levels in 0..16 (``load_digits().images[i]``).
    image_size: output height and width.

  Returns:
    ``uint8 [image_size, image_size, 3]``, grey levels scaled to 0..255 and replicated.
  """
  grey = np.round(np.asarray(image, np.float64) * (255.0 / _SOURCE_MAX)).astype(np.uint8)
  # Nearest neighbour: output pixel i samples source pixel floor(i * 8 / image_size).
  rows = np.arange(image_size) * SOURCE_SIZE // image_size
  grey = grey[rows][:, rows]
  return np.repeat(grey[:, :, None], 3, axis=-1)


class Digits(tfds.core.GeneratorBasedBuilder):
  """sklearn's 8x8 handwritten digits, upscaled RGB, fixed train/test split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  # No predefined configs: every size is a custom DigitsConfig, so that a config built by
  # the caller never collides with a registered one of the same name (TFDS rejects that).
  BUILDER_CONFIGS = []

  def get_default_builder_config(self) -> DigitsConfig:
    return DigitsConfig(image_size=32)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(size, size, 3)),
          'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
      citation=(
        '@misc{optdigits, author={Alpaydin, E. and Kaynak, C.}, title={Optical Recognition '
        'of Handwritten Digits}, year={1998}, howpublished={UCI Machine Learning Repository}}'
      ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: the images ship with scikit-learn.
    return {
      'train': self._generate_examples(range(NUM_TRAIN_EXAMPLES)),
      'test': self._generate_examples(range(NUM_TRAIN_EXAMPLES, NUM_EXAMPLES)),
    }

  def _generate_examples(self, indices: range):
    # Imported here so that merely registering the builder does not import scikit-learn.
    from sklearn.datasets import load_digits

    source = load_digits()
    if len(source.images) != NUM_EXAMPLES:
      raise ValueError(
        f'sklearn load_digits() returned {len(source.images)} images, expected {NUM_EXAMPLES}.'
      )
    size = self.builder_config.image_size
    for index in indices:
      # The source index is the key: TFDS derives its (deterministic) write order from it.
      yield (
        int(index),
        {
          'image': upscale(source.images[index], size),
          'label': int(source.target[index]),
        },
      )

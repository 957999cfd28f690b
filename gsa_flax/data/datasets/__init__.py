"""The datasets the project trains on: one :class:`DatasetSpec` each, in one registry.

A spec holds every fact about a dataset the rest of the code needs: its TFDS name, splits,
number of classes, normalisation, which crops train and eval use, and how to prepare it.
The input pipeline reads specs and has no per-dataset code, so adding a dataset is one
entry in :data:`SPECS` (plus a TFDS builder module if TFDS has none).

Importing this package is cheap (no TensorFlow): start-up validation reads the specs
before the input pipeline is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gsa_flax.data.datasets import digits, fashion_mnist
from gsa_flax.data.datasets.errors import DatasetNotFoundError as DatasetNotFoundError

TRAIN_CROPS = ('inception', 'pad', 'none')
EVAL_CROPS = ('center', 'square')


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Everything the project knows about one dataset.

  Attributes:
    name: the TFDS name (``config.dataset``).
    num_classes: classes of the ``label`` feature.
    train_split, eval_split: TFDS split names.
    mean_rgb, stddev_rgb: per-channel statistics on the 0..255 scale, subtracted and
      divided after resizing.
    train_crop: ``'inception'``: Inception-style random-resized crop (Szegedy et al. 2015;
      area 8-100%, aspect 3/4-4/3), decoded fused with the crop (JPEG only); ``'pad'``:
      resize, zero-pad by 4/32 of the size, random crop back; ``'none'``: resize only.
    eval_crop: ``'center'``: central crop of ``image_size / (image_size + 32)`` of the
      shorter side (224 of 256), then resize; ``'square'``: central square, then resize.
    flip: random horizontal flips in training.
    prepare: how to prepare the data once, with ``{data_dir}`` in it; empty for datasets
      built on first use.
    builder_config: for datasets whose stored resolution is a builder config (the
      embedded ``digits``), the config for an image size; None otherwise.
    min_image_size: the smallest ``image_size`` the dataset can be stored at.
    max_image_size: the largest ``image_size`` worth training at: beyond it the images are
      only upscaled source pixels, at a cost that grows with the square of the size.
    local_builder: for datasets that can also be prepared from files found on this
      machine (``fashion_mnist``'s IDX files): given the TFDS data directory, a builder
      that prepares the dataset from them, or None when none are found (then ``prepare``
      applies); None for the others.
  """

  name: str
  num_classes: int
  train_split: str
  eval_split: str
  mean_rgb: tuple[float, float, float]
  stddev_rgb: tuple[float, float, float]
  train_crop: str
  eval_crop: str
  flip: bool
  prepare: str = ''
  builder_config: Callable[[int], Any] | None = None
  min_image_size: int = 1
  max_image_size: int = 1024
  local_builder: Callable[[str], Any] | None = None

  def __post_init__(self):
    if self.train_crop not in TRAIN_CROPS:
      raise ValueError(f'{self.name}: train_crop={self.train_crop!r}; valid: {TRAIN_CROPS}.')
    if self.eval_crop not in EVAL_CROPS:
      raise ValueError(f'{self.name}: eval_crop={self.eval_crop!r}; valid: {EVAL_CROPS}.')

  @property
  def built_on_first_use(self) -> bool:
    """Whether the dataset is built locally when missing (no download, no manual step)."""
    return not self.prepare


# The first needs no download. Statistics: ImageNet and CIFAR-100 use the usual published
# statistics of their train splits; digits the grey-level statistics of its train split at
# the source resolution (identical after integer-factor nearest upscaling;
# tests/test_datasets.py recomputes them); fashion_mnist the grey-level statistics of its
# 60,000 training images (72.94 and 90.02).
SPECS: dict[str, DatasetSpec] = {
  spec.name: spec
  for spec in (
    DatasetSpec(
      name='digits',
      num_classes=10,
      train_split='train',
      eval_split='test',
      mean_rgb=(77.9, 77.9, 77.9),
      stddev_rgb=(95.7, 95.7, 95.7),
      train_crop='pad',
      eval_crop='square',
      flip=False,  # a mirrored digit is not a digit
      builder_config=lambda image_size: digits.DigitsConfig(image_size=image_size),
      # 8x8 source images: 32x their side is plenty (building the set grows with the square
      # of the size: about 4 s at 256, 17 minutes at 4096).
      min_image_size=digits.SOURCE_SIZE,
      max_image_size=32 * digits.SOURCE_SIZE,
    ),
    DatasetSpec(
      name='cifar100',
      num_classes=100,
      train_split='train',
      eval_split='test',
      mean_rgb=(0.5071 * 255, 0.4865 * 255, 0.4409 * 255),
      stddev_rgb=(0.2673 * 255, 0.2564 * 255, 0.2762 * 255),
      train_crop='pad',
      eval_crop='square',
      flip=True,
      prepare='run once: tfds build cifar100 --data_dir={data_dir}',
      max_image_size=512,  # 32x32 source images (224 is the usual size for transfer)
    ),
    DatasetSpec(
      name='imagenet2012',
      num_classes=1000,
      train_split='train',
      eval_split='validation',
      mean_rgb=(0.485 * 255, 0.456 * 255, 0.406 * 255),
      stddev_rgb=(0.229 * 255, 0.224 * 255, 0.225 * 255),
      train_crop='inception',
      eval_crop='center',
      flip=True,
      prepare=(
        'ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and '
        'ILSVRC2012_img_val.tar in {data_dir}/downloads/manual, then run once: '
        'tfds build imagenet2012 --data_dir={data_dir}'
      ),
    ),
    DatasetSpec(
      name='fashion_mnist',
      max_image_size=448,  # 28x28 source images: 16x their side
      num_classes=10,
      train_split='train',
      eval_split='test',
      mean_rgb=(72.94, 72.94, 72.94),
      stddev_rgb=(90.02, 90.02, 90.02),
      train_crop='pad',
      eval_crop='square',
      flip=True,  # garments are left-right symmetric enough; the usual recipe flips
      prepare=fashion_mnist.PREPARE,
      local_builder=fashion_mnist.local_builder,
    ),
  )
}

NAMES: tuple[str, ...] = tuple(SPECS)


def get(name: str) -> DatasetSpec:
  """The spec of a dataset by its ``config.dataset`` name.

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  if name not in SPECS:
    raise ValueError(f'unknown dataset {name!r}; valid: {", ".join(NAMES)}.')
  return SPECS[name]

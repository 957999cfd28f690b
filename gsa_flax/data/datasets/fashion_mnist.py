"""``fashion_mnist``: Zalando's Fashion-MNIST (Xiao et al. 2017) from its four IDX files.

60,000 train and 10,000 test 28x28 greyscale photos of clothing in 10 balanced classes
(MIT licence). The dataset is TFDS's own ``fashion_mnist`` (same name, version, features
and example keys), so it can be prepared in either of two ways, with the same result in
``{data_dir}/fashion_mnist/3.0.1``:

1. **From the IDX files on this machine** (no network): the first of these directories
   that holds any of the four files is used:

   - ``{data_dir}/downloads/manual/fashion_mnist/`` (copy the files there by hand);
   - ``/usr/share/datasets/fashion-mnist/`` (Debian/Ubuntu:
     ``apt-get install dataset-fashion-mnist``).

   The input pipeline does this on first use, in a few seconds, when a directory is found.
2. **TFDS's download** where there is internet: ``tfds build fashion_mnist
   --data_dir={data_dir}``, run once by hand (training never downloads on its own).

The files are ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped (``.gz``) or not.
An IDX file is a big-endian header (two zero bytes, a type byte 0x08 for unsigned bytes,
the number of dimensions, then each dimension as a 32-bit integer) followed by the data.
Every file is checked before anything is written: a missing, truncated or mislabelled
file stops with one line naming it and the fix (:class:`IdxFileError`).
"""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gsa_flax.data.datasets.errors import DatasetNotFoundError

IMAGE_SIZE = 28
NUM_CLASSES = 10
# Magic numbers: 0x0000 0803 (uint8, 3 dimensions: images), 0x0000 0801 (uint8, 1: labels).
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
# split -> (images file, labels file), without the optional .gz.
FILES = {
  'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
  'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
# Where the files are looked for, after {data_dir}/downloads/manual/fashion_mnist.
SYSTEM_DIRS = ('/usr/share/datasets/fashion-mnist',)  # Debian's dataset-fashion-mnist
MANUAL_SUBDIR = 'fashion_mnist'

PREPARE = (
  'install the IDX files with `apt-get install dataset-fashion-mnist` (found automatically), '
  'or copy train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, '
  't10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz to '
  '{data_dir}/downloads/manual/fashion_mnist, or download them once with: '
  'tfds build fashion_mnist --data_dir={data_dir}'
)
_FIX = (
  'replace it with a good copy (apt-get install --reinstall dataset-fashion-mnist, or the file '
  'of the Fashion-MNIST release)'
)


class IdxFileError(DatasetNotFoundError):
  """A Fashion-MNIST IDX file is missing, truncated or not what its name says."""


def _path(directory: epath.Path, name: str) -> epath.Path | None:
  for candidate in (directory / f'{name}.gz', directory / name):
    if candidate.exists():
      return candidate
  return None


def find_source(data_dir: str, system_dirs: tuple[str, ...] = SYSTEM_DIRS) -> epath.Path | None:
  """The directory the IDX files are read from, or None when no directory has any.

  Args:
    data_dir: the TFDS data directory; ``{data_dir}/downloads/manual/fashion_mnist`` is
      looked at first.
    system_dirs: then these, in order (default: the Debian package's location).

  Returns:
    The first directory holding at least one of the four files (whether all four are
    there and sound is checked when they are read).
  """
  candidates = [epath.Path(data_dir) / 'downloads' / 'manual' / MANUAL_SUBDIR]
  candidates += [epath.Path(d) for d in system_dirs]
  for directory in candidates:
    names = [name for pair in FILES.values() for name in pair]
    if any(_path(directory, name) for name in names):
      return directory
  return None


def read_idx(path: epath.Path, magic: int) -> np.ndarray:
  """Reads one IDX file of unsigned bytes, checking its header against its length.

  Args:
    path: the file, gzipped when its name ends in ``.gz``.
    magic: the expected magic number (:data:`IMAGES_MAGIC` or :data:`LABELS_MAGIC`).

  Returns:
    ``uint8`` array of the shape the header gives.

  Raises:
    IdxFileError: unreadable, wrong magic number, or a length that disagrees with the
      header.
  """
  try:
    data = path.read_bytes()
    if path.name.endswith('.gz'):
      data = gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as error:
    raise IdxFileError(f'{path}: unreadable ({error}); {_FIX}.') from None
  if len(data) < 4:
    raise IdxFileError(f'{path}: {len(data)} bytes is not an IDX file; {_FIX}.')
  found = int.from_bytes(data[:4], 'big')
  if found != magic:
    raise IdxFileError(
      f'{path}: magic number 0x{found:08x}, expected 0x{magic:08x} '
      f'({"images" if magic == IMAGES_MAGIC else "labels"}); is it the right file? {_FIX}.'
    )
  rank = magic & 0xFF
  header = 4 + 4 * rank
  if len(data) < header:
    raise IdxFileError(f'{path}: truncated header ({len(data)} bytes); {_FIX}.')
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(rank))
  expected = header + int(np.prod(shape))
  if len(data) != expected:
    state = 'truncated' if len(data) < expected else 'longer than its header says'
    raise IdxFileError(
      f'{path}: {state}: {len(data)} bytes, the header {shape} needs {expected}; {_FIX}.'
    )
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_split(directory: epath.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks the images and labels of one split.

  Args:
    directory: from :func:`find_source`.
    split: ``'train'`` or ``'test'``.

  Returns:
    ``(images uint8 [n, 28, 28], labels uint8 [n])``.

  Raises:
    IdxFileError: a file missing or bad, image dimensions other than 28x28, counts that
      differ between images and labels, or a label outside 0..9.
  """
  paths = []
  for name in FILES[split]:
    path = _path(directory, name)
    if path is None:
      raise IdxFileError(
        f'{directory}/{name}.gz is missing (neither it nor {name} exists); copy it there '
        'or reinstall dataset-fashion-mnist.'
      )
    paths.append(path)
  images = read_idx(paths[0], IMAGES_MAGIC)
  labels = read_idx(paths[1], LABELS_MAGIC)
  if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
    raise IdxFileError(
      f'{paths[0]}: images of {images.shape[1]}x{images.shape[2]}, Fashion-MNIST is '
      f'{IMAGE_SIZE}x{IMAGE_SIZE}; {_FIX}.'
    )
  if len(images) != len(labels):
    raise IdxFileError(
      f'{paths[1]}: {len(labels)} labels for the {len(images)} images of {paths[0].name}; '
      f'the two files come from different releases or one is damaged; {_FIX}.'
    )
  if len(labels) and labels.max() >= NUM_CLASSES:
    raise IdxFileError(f'{paths[1]}: label {labels.max()} outside 0..9; {_FIX}.')
  return images, labels


class FashionMnistFromIdx(tfds.image_classification.FashionMNIST, skip_registration=True):
  """TFDS's ``fashion_mnist``, prepared from IDX files in a local directory.

  Not registered: ``tfds.builder('fashion_mnist')`` stays TFDS's own builder, which reads
  what this one prepares (same name, version, features and keys).
  """

  name = 'fashion_mnist'

  def __init__(self, *, source: epath.Path, **kwargs):
    self._source = epath.Path(source)
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: the files are local.
    # Every file is read and checked before TFDS writes anything.
    splits = {split: read_split(self._source, split) for split in FILES}
    return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    # The index is the key, as in TFDS's builder: the same records in the same order.
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield index, {'image': image[:, :, None], 'label': int(label)}


def local_builder(data_dir: str) -> FashionMnistFromIdx | None:
  """A builder that prepares ``fashion_mnist`` into ``data_dir`` from local IDX files.

  Args:
    data_dir: the TFDS data directory (not empty).

  Returns:
    The builder (call ``download_and_prepare()``), or None when :func:`find_source` finds
    no files.
  """
  source = find_source(data_dir)
  if source is None:
    return None
  return FashionMnistFromIdx(source=source, data_dir=data_dir)

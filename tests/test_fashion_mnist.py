"""fashion_mnist from IDX files that each test writes itself (no package, no network).

The IDX files are written here with ``struct`` from the format's definition (big-endian
magic 0x00000803 / 0x00000801, then the dimensions), independently of the reader.
"""

import collections
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from gsa_flax.data import datasets, input_pipeline
from gsa_flax.data.datasets import fashion_mnist

SPEC = datasets.get('fashion_mnist')
DEBIAN = Path('/usr/share/datasets/fashion-mnist')
COUNTS = {'train': 12, 'test': 5}
CLASSES = [
  'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
  'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
]  # fmt: skip


def _idx(array: np.ndarray, magic_type: int = 0x08) -> bytes:
  header = struct.pack('>HBB', 0, magic_type, array.ndim)
  header += b''.join(struct.pack('>I', d) for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write(directory: Path, name: str, payload: bytes, *, compress: bool = True) -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / (f'{name}.gz' if compress else name)
  path.write_bytes(gzip.compress(payload) if compress else payload)
  return path


def _source(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  rng = np.random.default_rng(seed)
  return {
    split: (rng.integers(0, 256, (n, 28, 28), np.uint8), rng.integers(0, 10, n, np.uint8))
    for split, n in COUNTS.items()
  }


def _write_all(directory: Path, source, *, compress: bool = True) -> None:
  for split, (images, labels) in source.items():
    prefix = 'train' if split == 'train' else 't10k'
    _write(directory, f'{prefix}-images-idx3-ubyte', _idx(images), compress=compress)
    _write(directory, f'{prefix}-labels-idx1-ubyte', _idx(labels), compress=compress)


def _manual(data_dir: Path) -> Path:
  return data_dir / 'downloads' / 'manual' / 'fashion_mnist'


def _fingerprints(images, labels) -> collections.Counter:
  return collections.Counter(
    (np.asarray(i).tobytes(), int(c)) for i, c in zip(images, labels, strict=True)
  )


@pytest.mark.parametrize('compress', [True, False])
def test_built_from_the_idx_files_in_the_manual_dir(tmp_path, compress):
  source = _source()
  _write_all(_manual(tmp_path), source, compress=compress)
  builder = input_pipeline.get_builder(SPEC, str(tmp_path))
  assert builder.name == 'fashion_mnist'  # TFDS's own builder reads what was prepared
  assert input_pipeline.class_names(builder) == CLASSES
  assert builder.info.features['image'].shape == (28, 28, 1)
  for split, (images, labels) in source.items():
    assert input_pipeline.num_examples(builder, split) == COUNTS[split]
    examples = list(builder.as_dataset(split=split).as_numpy_iterator())
    assert _fingerprints(
      [e['image'][..., 0] for e in examples], [e['label'] for e in examples]
    ) == (_fingerprints(images, labels))
  # Evaluation batches carry the grey image on three channels, every test image once.
  batches, steps = input_pipeline.create_eval_iterator(
    builder, spec=SPEC, global_batch_size=5, image_size=28, process=(0, 1)
  )
  batch = next(batches)
  assert steps == 1 and batch['image'].shape == (5, 28, 28, 3)
  assert (batch['image'] == batch['image'][..., :1]).all()
  assert _fingerprints(batch['image'][..., 0], batch['label']) == _fingerprints(*source['test'])


def test_find_source_prefers_the_manual_dir(tmp_path):
  system = tmp_path / 'system'
  _write(system, 'train-images-idx3-ubyte', _idx(np.zeros((1, 28, 28))))
  assert fashion_mnist.find_source(str(tmp_path / 'tfds'), (str(system),)) == system
  _write(_manual(tmp_path / 'tfds'), 't10k-labels-idx1-ubyte', _idx(np.zeros(1)), compress=False)
  assert fashion_mnist.find_source(str(tmp_path / 'tfds'), (str(system),)) == _manual(
    tmp_path / 'tfds'
  )
  assert fashion_mnist.find_source(str(tmp_path / 'none'), (str(tmp_path / 'no'),)) is None


def _truncate(directory: Path) -> str:
  path = directory / 'train-images-idx3-ubyte.gz'
  path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
  return 'train-images-idx3-ubyte.gz: truncated'


def _missing(directory: Path) -> str:
  (directory / 't10k-labels-idx1-ubyte.gz').unlink()
  return 't10k-labels-idx1-ubyte.gz is missing'


def _wrong_magic(directory: Path) -> str:
  # A labels file where the images should be: magic 0x801, not 0x803.
  _write(directory, 't10k-images-idx3-ubyte', _idx(np.zeros(5)))
  return 't10k-images-idx3-ubyte.gz: magic number 0x00000801, expected 0x00000803'


def _count_mismatch(directory: Path) -> str:
  _write(directory, 'train-labels-idx1-ubyte', _idx(np.zeros(11)))
  return 'train-labels-idx1-ubyte.gz: 11 labels for the 12 images'


def _wrong_dims(directory: Path) -> str:
  _write(directory, 'train-images-idx3-ubyte', _idx(np.zeros((12, 32, 32))))
  return 'train-images-idx3-ubyte.gz: images of 32x32, Fashion-MNIST is 28x28'


def _bad_label(directory: Path) -> str:
  _write(directory, 't10k-labels-idx1-ubyte', _idx(np.full(5, 10)))
  return 't10k-labels-idx1-ubyte.gz: label 10 outside 0..9'


def _not_gzip(directory: Path) -> str:
  (directory / 'train-labels-idx1-ubyte.gz').write_bytes(b'not gzip at all')
  return 'train-labels-idx1-ubyte.gz: unreadable'


def _too_long(directory: Path) -> str:
  _write(directory, 't10k-labels-idx1-ubyte', _idx(np.zeros(5)) + b'\0')
  return 't10k-labels-idx1-ubyte.gz: longer than its header says'


@pytest.mark.parametrize(
  'damage',
  [
    _truncate,
    _missing,
    _wrong_magic,
    _count_mismatch,
    _wrong_dims,
    _bad_label,
    _not_gzip,
    _too_long,
  ],
)
def test_bad_file_is_one_line_naming_it(tmp_path, damage):
  directory = _manual(tmp_path)
  _write_all(directory, _source())
  expected = damage(directory)
  with pytest.raises(fashion_mnist.IdxFileError) as error:
    input_pipeline.get_builder(SPEC, str(tmp_path))
  message = str(error.value)
  assert isinstance(error.value, datasets.DatasetNotFoundError)  # main.py: one line, no trace
  assert '\n' not in message
  assert f'{directory}/{expected}' in message
  # Nothing was prepared: a fixed file is read on the next run.
  assert not (tmp_path / 'fashion_mnist').exists() or not any(
    (tmp_path / 'fashion_mnist').glob('*/dataset_info.json')
  )


def test_not_found_message_gives_every_way_to_prepare(tmp_path):
  data_dir = str(tmp_path)
  message = SPEC.prepare.format(data_dir=data_dir)
  assert 'apt-get install dataset-fashion-mnist' in message
  assert f'{data_dir}/downloads/manual/fashion_mnist' in message
  assert f'tfds build fashion_mnist --data_dir={data_dir}' in message
  assert fashion_mnist.SYSTEM_DIRS == (str(DEBIAN),)


@pytest.mark.skipif(not DEBIAN.exists(), reason='dataset-fashion-mnist is not installed')
def test_normalization_constants_match_train_split():
  with gzip.open(DEBIAN / 'train-images-idx3-ubyte.gz') as file:
    train = np.frombuffer(file.read(), np.uint8, offset=16).astype(np.float64)
  assert train.size == 60_000 * 28 * 28
  np.testing.assert_allclose(SPEC.mean_rgb, [train.mean()] * 3, atol=0.01)
  np.testing.assert_allclose(SPEC.stddev_rgb, [train.std()] * 3, atol=0.01)


def test_config_and_its_resnet_twin_are_valid():
  from configs import fashion_mnist as recipe
  from gsa_flax.train import config_validation, experiment

  config = recipe.get_config()
  assert (config.dataset, config.image_size, config.model) == (
    'fashion_mnist',
    28,
    'gsa_resnet_tiny',
  )
  config_validation.validate(config)
  twin = experiment.counterpart(config)
  assert twin.model == 'resnet_tiny'
  config_validation.validate(twin)

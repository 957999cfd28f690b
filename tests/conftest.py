"""Test set-up: 8 forced CPU devices (sharding is exercised everywhere), quiet TensorFlow,
and the embedded digits set built once per session into a temporary data dir."""

import os

# Before JAX is imported anywhere: 8 CPU devices, so every jitted step is really sharded.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

DIGITS_IMAGE_SIZE = 16


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the embedded digits set at 16x16."""
  from gsa_flax import input_pipeline

  data_dir = str(tmp_path_factory.mktemp('tfds_digits'))
  input_pipeline.get_builder('digits', data_dir, image_size=DIGITS_IMAGE_SIZE)
  return data_dir


@pytest.fixture(scope='session')
def mock_data_dir(tmp_path_factory) -> str:
  """Metadata for tfds.testing.mock_data of cifar100 and imagenet2012 (see tfds_mock.py)."""
  import tfds_mock

  return tfds_mock.write_mock_metadata(str(tmp_path_factory.mktemp('mock_metadata')))

"""Test set-up: 8 forced CPU devices (sharding is exercised everywhere), quiet TensorFlow,
libtpu allowed in every worker, one compilation cache for the session, and the datasets
built once per session."""

import os
import shutil
import tempfile

# Before JAX is imported anywhere: 8 CPU devices, so every jitted step is really sharded.
# LLVM's optimisations cost more compile time than they save on the few steps a test runs.
os.environ.setdefault(
  'XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compiles for TPU topologies load libtpu, which takes a lock file unless told otherwise.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

import helpers  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  """One persistent JAX compilation cache for the whole session (workers and the main.py
  processes the tests start inherit it): the same tiny networks are compiled by many tests
  and processes, and a cache hit gives the same executable, so results do not change."""
  if hasattr(config, 'workerinput'):
    return  # a pytest-xdist worker: the controller set the cache up
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    config.gsa_jax_cache = tempfile.mkdtemp(prefix='gsa-test-jax-cache-')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = config.gsa_jax_cache
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'


def pytest_unconfigure(config):
  if getattr(config, 'gsa_jax_cache', None):
    shutil.rmtree(config.gsa_jax_cache, ignore_errors=True)


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the embedded digits set at 16x16."""
  from gsa_flax.data import datasets, input_pipeline

  data_dir = str(tmp_path_factory.mktemp('tfds_digits'))
  input_pipeline.get_builder(datasets.get('digits'), data_dir, image_size=helpers.DIGITS_IMAGE_SIZE)
  return data_dir


@pytest.fixture(scope='session')
def mock_data_dir(tmp_path_factory) -> str:
  """Metadata for tfds.testing.mock_data of cifar100 and imagenet2012."""
  return helpers.write_mock_metadata(str(tmp_path_factory.mktemp('mock_metadata')))

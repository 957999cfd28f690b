"""What the tests share: the tiny digits run (in-process or as a command) and mocked TFDS data.

Nothing is downloaded: digits is built from scikit-learn, and cifar100/imagenet2012 go
through the real loading code on ``tfds.testing.mock_data``, whose USE_FILES policy needs
the datasets' metadata in a data dir; :func:`write_mock_metadata` writes it from the
builders that ship with TFDS, with split sizes that match the number of mocked examples.
"""

import os
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from configs import default
from gsa_flax.data import datasets

REPO = Path(__file__).resolve().parents[1]
# A multiple of 8, so the stored digits are the source pixels replicated 2x2.
DIGITS_IMAGE_SIZE = 16
DIGITS_TEST_EXAMPLES = 360
MOCK_EXAMPLES = 12

# The fields tests change from configs/default.py (dotted names for nested fields).
TINY = {
  'image_size': DIGITS_IMAGE_SIZE,
  'stage_sizes': (1, 1),  # Two stages: the whole model is exercised, compiles fast.
  'num_filters': 8,
  'gsa.num_heads': 2,
  'batch_size': 16,
  'eval_batch_size': 48,  # Does not divide the 360 test examples: padding is exercised.
  'num_train_steps': 6,
  'warmup_epochs': 0.0,  # A warmup must end before the run does; these runs are a few steps.
  'log_every_steps': 2,
  'eval_every_steps': 6,
  'eval_every_epochs': 0.0,
  'checkpoint_every_steps': 3,
  'checkpoint_every_epochs': 0.0,
  'attention_maps': False,  # tests/tools/test_attention_maps.py covers the eval-time images.
}


def tiny_config(data_dir: str, **overrides):
  """configs/default.py with TINY and ``overrides`` (dotted keys) applied."""
  config = default.get_config()
  for key, value in {'data_dir': data_dir, **TINY, **overrides}.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def main_command(
  data_dir: str, workdir, *, devices: int = 8, script: str = 'main.py', **overrides
) -> tuple[list[str], dict[str, str]]:
  """``(argv, env)`` running ``script`` with the config ``tiny_config(data_dir, **overrides)``."""
  values = {'data_dir': data_dir, **TINY, **overrides}
  command = [
    sys.executable,
    str(REPO / script),
    f'--config={REPO / "configs" / "default.py"}',
    f'--workdir={workdir}',
    *(f'--config.{k}={_flag(v)}' for k, v in values.items()),
  ]
  return command, environment(devices)


def environment(devices: int = 8) -> dict[str, str]:
  """The environment of a subprocess: the repository importable, ``devices`` CPU devices."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = (
    f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
  )
  return env


def _flag(value) -> str:
  if isinstance(value, tuple):
    return '(' + ','.join(str(v) for v in value) + ',)'
  return str(value)


def write_mock_metadata(root: str, num_examples: int = MOCK_EXAMPLES) -> str:
  """Real TFDS metadata for cifar100 / imagenet2012 with ``num_examples`` per split, and
  real train records (random examples)."""
  for name in ['cifar100', 'imagenet2012']:
    spec = datasets.get(name)
    builder = tfds.builder(name, data_dir=str(root))
    builder.info.set_splits(
      tfds.core.SplitDict(
        [
          tfds.core.SplitInfo(
            name=split,
            shard_lengths=[num_examples],
            num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
              data_dir=builder.data_path,
              dataset_name=name,
              split=split,
              filetype_suffix='tfrecord',
            ),
          )
          for split in (spec.train_split, spec.eval_split)
        ]
      )
    )
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
    _write_train_records(builder, spec.train_split, num_examples)
  return str(root)


def _random_value(feature, rng):
  """A random value of a TFDS feature (images 20-40 pixels a side)."""
  if isinstance(feature, tfds.features.Image):
    height, width, channels = (size or int(rng.integers(20, 41)) for size in feature.shape)
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  if isinstance(feature, tfds.features.ClassLabel):
    return int(rng.integers(feature.num_classes))
  if isinstance(feature, tfds.features.Text):
    return 'mock'
  return np.zeros(feature.shape, feature.np_dtype)


def _write_train_records(builder, split: str, num_examples: int) -> None:
  """Real records of random examples in the file the metadata names: training reads the
  record files itself, which ``mock_data`` does not serve."""
  import tensorflow as tf  # only here: the other helpers are used by tests without TF

  rng = np.random.default_rng(0)
  features = builder.info.features
  (path,) = builder.info.splits[split].filepaths
  with tf.io.TFRecordWriter(os.fspath(path)) as writer:
    for _ in range(num_examples):
      example = {name: _random_value(feature, rng) for name, feature in features.items()}
      writer.write(features.serialize_example(example))


def mock_data(root: str, num_examples: int = MOCK_EXAMPLES):
  """Context manager: tfds builders of cifar100/imagenet2012 serve random examples."""
  return tfds.testing.mock_data(
    num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=root
  )


def _taps(size, stride, kernel=3):
  """Kernel taps that land inside the image, summed over the outputs of one axis (SAME).

  XLA counts the multiply-adds with real inputs only, not those with the zero padding.
  """
  out = -(-size // stride)
  pad = max((out - 1) * stride + kernel - size, 0) // 2
  return sum(0 <= o * stride + t - pad < size for o in range(out) for t in range(kernel))


def resnet_macs(stage_sizes, filters, image_size, classes):
  """Multiply-adds of a small-stem bottleneck ResNet's convolutions and classifier."""
  size = image_size
  macs = _taps(size, 1) ** 2 * 3 * filters  # 3x3 stem, stride 1
  channels = filters
  for i, blocks in enumerate(stage_sizes):
    width = filters * 2**i
    for j in range(blocks):
      stride = 2 if i > 0 and j == 0 else 1
      out = size // stride
      macs += size * size * channels * width  # 1x1 reduce, at the input resolution
      macs += _taps(size, stride) ** 2 * width * width  # 3x3, strided
      macs += out * out * width * 4 * width  # 1x1 expand
      if channels != 4 * width or stride > 1:
        macs += out * out * channels * 4 * width  # projection shortcut
      channels, size = 4 * width, out
  return macs + channels * classes


def compile_gsa_layer(target, *, batch, height, width, heads, key_dim, value_dim):
  """A ``GSA(value_dim)`` layer's forward + backward (gradients of the variables and the
  input; loss = sum of squares in float32; train-mode BatchNorm), bfloat16, 8 input
  channels, compiled for an ``aot`` target with ``batch`` examples per chip, the batch
  split over the target's chips."""
  import jax
  import jax.numpy as jnp

  from gsa_flax.model.layers import GSA
  from gsa_flax.tools.sizing import aot

  module = GSA(value_dim, num_heads=heads, key_features=key_dim, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, height, width, 8), jnp.bfloat16)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
  replicated = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=target.sharding()), variables
  )
  x = jax.ShapeDtypeStruct(
    (batch * target.num_chips, height, width, 8),
    jnp.bfloat16,
    sharding=target.sharding(aot.DATA_AXIS),
  )

  def loss(variables, x):
    out, _ = module.apply(variables, x, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.square(out.astype(jnp.float32)))

  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(replicated, x).compile()

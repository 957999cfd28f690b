"""A tiny, fast configuration of the default digits run, in-process or as a main.py command."""

import os
import sys
from pathlib import Path

from conftest import DIGITS_IMAGE_SIZE

from configs import default

REPO = Path(__file__).resolve().parents[1]

# The fields tests change from configs/default.py (dotted names for nested fields).
TINY = {
  'image_size': DIGITS_IMAGE_SIZE,
  'stage_sizes': (1, 1),  # Two stages: the whole model is exercised, compiles fast.
  'num_filters': 8,
  'gsa.num_heads': 2,
  'batch_size': 16,
  'eval_batch_size': 48,  # Does not divide the 360 test examples: padding is exercised.
  'num_train_steps': 6,
  'log_every_steps': 2,
  'eval_every_steps': 6,
  'checkpoint_every_steps': 3,
  'attention_maps': False,  # tests/test_visualize.py covers the eval-time images.
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
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return command, env


def _flag(value) -> str:
  if isinstance(value, tuple):
    return '(' + ','.join(str(v) for v in value) + ',)'
  return str(value)

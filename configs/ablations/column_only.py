"""Ablation: column-only positional attention (no row step)."""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.gsa.positional = 'column'
  return config

"""Ablation: positional attention only, no content branch."""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.gsa.content = False
  return config

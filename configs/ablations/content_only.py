"""Ablation: content attention only, no positional branch."""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.gsa.positional = 'none'
  return config

"""Ablation: global attention only where maps are small (stages 3-4); convolutions in stages 1-2."""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.gsa.attention_stages = (False, False, True, True)
  return config

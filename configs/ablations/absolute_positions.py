"""Ablation: absolute instead of relative position embeddings in the positional branch."""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.gsa.position_embedding = 'absolute'
  return config

"""Ablation: local positional attention: relative embeddings of length L=15 (7 each way)."""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.gsa.rel_length = 15
  return config

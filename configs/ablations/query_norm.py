"""Ablation: softmax over each query's channels (efficient attention's original form)."""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.gsa.normalize_queries = True
  return config

"""The convolutional baseline: ResNet-50 with exactly the recipe of configs/imagenet.py."""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.model = 'resnet50'
  return config

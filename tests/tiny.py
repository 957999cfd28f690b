"""A tiny, fast configuration of the default digits run, for tests."""

from conftest import DIGITS_IMAGE_SIZE

from configs import default


def tiny_config(data_dir: str, **overrides):
  config = default.get_config()
  config.data_dir = data_dir
  config.image_size = DIGITS_IMAGE_SIZE
  config.stage_sizes = (1, 1)  # Two stages: the whole model is exercised, compiles fast.
  config.num_filters = 8
  config.gsa.num_heads = 2
  config.batch_size = 16
  config.eval_batch_size = 48  # Does not divide the 360 test examples: padding is exercised.
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 6
  config.checkpoint_every_steps = 3
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config

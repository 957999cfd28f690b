"""GSA-ResNet-26 on CIFAR-100 (32x32, small stem), the usual 200-epoch SGD recipe.

Prepare the data once: ``tfds build cifar100 --data_dir=$DATA_DIR``.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'gsa_resnet26'
  config.num_filters = 64
  config.small_stem = True  # 32x32 inputs: keep the resolution (no 7x7/2 conv, no max pool).
  config.gsa.num_heads = 8

  config.dataset = 'cifar100'
  config.image_size = 32

  config.batch_size = 128
  config.num_epochs = 200.0
  config.learning_rate = 0.2  # Per 256 examples: 0.1 at batch 128.
  config.warmup_epochs = 5.0
  config.weight_decay = 5e-4
  config.label_smoothing = 0.0

  config.log_every_steps = 100
  config.eval_every_epochs = 5.0
  config.checkpoint_every_epochs = 5.0
  return config

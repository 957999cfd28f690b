"""GSA-ResNet-50 on ImageNet at 224x224: the standard 90-epoch SGD recipe, for TPU/GPU.

The recipe ResNets are usually compared with (Goyal et al. 2017; the paper's setting):
Inception crop and flips only (no RandAugment, Mixup or CutMix), label smoothing 0.1, no
weight averaging. ``configs/imagenet_strong.py`` is the longer, strongly augmented recipe;
``configs/imagenet_finetune_384.py`` fine-tunes a run of either at 384x384.

Prepare the data once (manual download): put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in ``$DATA_DIR/downloads/manual`` and run
``tfds build imagenet2012 --data_dir=$DATA_DIR``.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'gsa_resnet50'
  config.num_filters = 64
  config.small_stem = False  # The ResNet stem (7x7/2 conv, 3x3/2 max pool) is kept (paper).
  config.dtype = 'bfloat16'
  config.gsa.num_heads = 8  # Paper: 8 heads per GSA module.

  config.dataset = 'imagenet2012'
  config.data_dir = ''  # Set to your TFDS dir, e.g. gs://bucket/tensorflow_datasets.
  config.image_size = 224

  config.batch_size = 1024  # Global; the learning rate scales with it.
  config.eval_batch_size = 0
  config.num_epochs = 90.0
  config.learning_rate = 0.1  # Per 256 examples (0.4 at batch 1024; Goyal et al. 2017).
  config.warmup_epochs = 5.0
  config.weight_decay = 1e-4
  config.label_smoothing = 0.1

  config.log_every_steps = 100
  config.eval_every_epochs = 1.0
  config.checkpoint_every_epochs = 1.0
  config.keep_checkpoints = 3
  return config

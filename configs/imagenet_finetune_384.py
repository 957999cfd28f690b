"""Fine-tunes a 224x224 GSA-ResNet-50 ImageNet run at 384x384 (FixRes-style).

Training at a lower resolution than the test resolution is cheaper and, after a short
fine-tuning at the test resolution, more accurate (Touvron et al. 2019, "Fixing the
train-test resolution discrepancy"). Set ``init_from`` to the 224 run (its workdir, or a
file exported with ``python -m gsa_flax.tools.export``):

  python main.py --config=configs/imagenet_finetune_384.py --workdir=gs://bucket/gsa50_384 \\
    --config.init_from=gs://bucket/gsa50 --config.data_dir=gs://bucket/tfds

Each GSA layer's global position tables are resized from the 224 run's length to the
global length at 384 (``gsa_flax/model/transfer.py``), so attention stays global; everything else
is copied. RandAugment and mixing stay off: the short fine-tuning adapts the network to
the statistics of the new resolution (Touvron et al. 2019), not to new regularisation.
"""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  # The 224 run to start from: set it (--config.init_from=...). The placeholder exists
  # nowhere, so a run that forgets it stops at start-up instead of training from scratch.
  config.init_from = 'SET_INIT_FROM_TO_THE_224_RUN'
  config.image_size = 384
  # 384x384 holds ~2.9x the pixels of 224x224: half the batch per step keeps the memory per
  # device close to the 224 run's.
  config.batch_size = 512
  # A few epochs suffice to adapt to the new resolution (Touvron et al. 2019 fine-tune for
  # a few epochs; DeiT at 384 for 30): 10 epochs, about 11% of the 90-epoch run.
  config.num_epochs = 10.0
  # Small and nearly constant: a tenth of the pretraining peak (0.01 per 256 examples),
  # no warmup, cosine over the 10 epochs. The weights are already good; a large step
  # would undo the pretraining.
  config.learning_rate = 0.01
  config.warmup_epochs = 0.0
  config.weight_decay = 1e-4  # The pretraining's.
  config.label_smoothing = 0.1  # The pretraining's.
  config.ema_decay = 0.0  # 10 epochs are too short for a 0.9999 average to help.

  config.eval_every_epochs = 1.0
  config.checkpoint_every_epochs = 1.0
  return config

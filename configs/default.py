"""Default: a small GSA-ResNet on the embedded digits set (no download, minutes on a CPU).

Every other config imports this one and overrides fields, so every field is defined and
commented here once. Override any field on the command line: ``--config.batch_size=256``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # --- Model -------------------------------------------------------------------------
  # A name from gsa_flax.model.networks.MODELS: resnet26|38|50|101, gsa_resnet26|38|50|101,
  # resnet_tiny, gsa_resnet_tiny.
  config.model = 'gsa_resnet_tiny'
  config.stage_sizes = ()  # Blocks per stage, e.g. (3, 4, 6, 3); () = the model's own depth.
  config.num_filters = 16  # Width of the first stage (64 for the paper's networks).
  config.small_stem = True  # 3x3/1 conv stem, no max pool (small images); False: ImageNet stem.
  config.dtype = 'float32'  # Compute dtype: 'bfloat16' on TPU/GPU; params stay float32.
  # Rematerialise each residual block in the backward pass: '' (off), 'block' (keep only
  # block inputs) or 'dots' (keep conv/matmul outputs): less memory, more compute.
  config.remat = ''

  # The GSA module's knobs (docs/method.md); ignored by the convolutional stages.
  config.gsa = ml_collections.ConfigDict()
  config.gsa.num_heads = 4  # Heads per GSA module; must divide every stage's width and d_k.
  config.gsa.key_ratio = 0.5  # d_k = key_ratio * d_out (paper: unstated; 0.5 is our choice).
  config.gsa.rel_length = 0  # Odd L of the relative embeddings; 0 = global (2*max(H, W) - 1).
  config.gsa.content = True  # Content branch on (False: positional-only ablation).
  config.gsa.positional = 'axial'  # 'axial' | 'column' (column-only) | 'none' (content-only).
  config.gsa.position_embedding = 'relative'  # 'relative' | 'absolute' (ablation).
  config.gsa.normalize_queries = False  # Softmax each query over channels (efficient attention).
  config.gsa.positional_softmax = False  # Softmax the positional weights (paper: none).
  # Contraction order of the positional steps: 'auto' (the cheaper for the shape), 'logits'
  # or 'values'; the same result either way (speed only; 'values' cannot softmax).
  config.gsa.order = 'auto'
  # Kernels: '' picks the best for the platform compiled for (Pallas kernels on TPU and
  # NVIDIA GPUs, the einsum ops elsewhere); 'xla' forces the einsum ops, 'pallas' the kernels.
  config.gsa.implementation = ''
  # One bool per stage: which stages use GSA. () = the model's default (GSA models: all).
  config.gsa.attention_stages = ()

  # --- Data --------------------------------------------------------------------------
  # 'digits' (embedded, built from scikit-learn) | 'fashion_mnist' (docs/fashion_mnist.md) |
  # 'cifar100' | 'imagenet2012'.
  config.dataset = 'digits'
  config.data_dir = (
    ''  # TFDS data dir; '' = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
  )
  config.image_size = 16  # Training and eval resolution (digits are upscaled from 8x8).

  # --- Optimisation ------------------------------------------------------------------
  config.batch_size = 64  # Global batch, over all devices and hosts.
  config.eval_batch_size = 0  # Global eval batch; 0 = batch_size.
  config.num_epochs = 15.0  # Length of training in epochs of the train split...
  config.num_train_steps = -1  # ...unless this is > 0 (-1: from num_epochs).
  config.learning_rate = 1.0  # Peak learning rate per 256 examples (scaled by batch_size/256).
  config.warmup_epochs = 1.0  # Linear warmup, then cosine decay to zero.
  config.momentum = 0.9  # SGD momentum.
  config.nesterov = True  # Nesterov momentum.
  config.weight_decay = 5e-5  # L2 on kernels and embeddings (not on BatchNorm or biases).
  config.label_smoothing = 0.0  # Label smoothing of the cross-entropy targets.
  config.seed = 0  # Initialisation and data order; the same seed gives the same run.
  # Exponential moving average of the parameters, ema = decay * ema + (1 - decay) * params
  # after every step, kept in the checkpoints. Every evaluation writes the raw parameters'
  # metrics (eval_accuracy, ...) and the average's (ema_eval_accuracy, ...), both with the
  # run's BatchNorm statistics; predict, visualize, export and init_from use the average.
  # 0 = off.
  config.ema_decay = 0.0

  # --- Augmentation (gsa_flax/data/augment.py); the defaults are off -------------------------
  config.augment = ml_collections.ConfigDict()
  # RandAugment (Cubuk et al. 2020) after crop and flip: ops per image (n of rand-m9-n2);
  # 0 = off.
  config.augment.num_layers = 0
  config.augment.magnitude = 0.0  # Strength of every op on 0..10 (m of rand-m9-n2).
  config.augment.magnitude_std = 0.0  # Std of each op's magnitude (timm's mstd); 0 = fixed.
  config.augment.mixup_alpha = 0.0  # Mixup's Beta(alpha, alpha) (Zhang et al. 2018); 0 = off.
  config.augment.cutmix_alpha = 0.0  # CutMix's Beta(alpha, alpha) (Yun et al. 2019); 0 = off.
  config.augment.prob = 1.0  # Probability that a batch is mixed, when an alpha is > 0.
  config.augment.switch_prob = 0.5  # Probability of CutMix over Mixup when both are on.

  # --- Transfer ------------------------------------------------------------------------
  # Start from trained weights instead of a random initialisation: a training workdir (its
  # newest checkpoint; the moving average of its parameters if it kept one), its
  # checkpoints directory, one checkpoint (<workdir>/checkpoints/<step>), or an exported
  # weights file (python -m gsa_flax.tools.export); local or gs://. Parameters and BatchNorm
  # statistics are copied, position tables resized to this image_size, and the classifier
  # re-initialised if the number of classes differs (gsa_flax/model/transfer.py); the optimizer
  # and the step start fresh. Read only when the workdir has no checkpoint yet: a restarted
  # run continues from its own and never reads it again. '' = random initialisation.
  config.init_from = ''

  # --- Bookkeeping -------------------------------------------------------------------
  # Intervals are in steps (<name>_steps) or epochs (<name>_epochs; kept when batch_size
  # changes): set exactly one of each pair > 0. Each also happens at the last step.
  config.log_every_steps = 20  # Train metrics (TensorBoard + log).
  config.log_every_epochs = 0.0
  config.eval_every_steps = 0  # Full eval-split evaluation...
  config.eval_every_epochs = 5.0  # ...every 5 epochs (110 steps at batch 64).
  config.checkpoint_every_steps = 0  # Checkpoint...
  config.checkpoint_every_epochs = 5.0  # ...every 5 epochs.
  config.keep_checkpoints = 3  # Newest checkpoints kept under <workdir>/checkpoints.
  config.profile_steps = (
    0  # Steps to trace with the JAX profiler (0: off; needs a GPU/TPU to matter).
  )
  config.eval_only = False  # Evaluate the latest checkpoint and exit.
  config.attention_maps = True  # Write attention-map images to TensorBoard at eval time.
  # A restarted run refuses a config that differs from its <workdir>/config.json in a field
  # that changes what is trained (model, data, batch, schedule, seed), unless the field is
  # listed here, comma-separated ('num_train_steps,batch_size'); each accepted change is
  # appended to <workdir>/config_history.jsonl. Intervals, keep_checkpoints, profile_steps,
  # eval_only, attention_maps, data_dir, eval_batch_size and init_from may change without it.
  config.allow_config_changes = ''
  return config

"""The compiled steps: the loss of mixed batches and what the train step reports."""

import functools

import jax
import numpy as np
from helpers import DIGITS_IMAGE_SIZE, tiny_config

from gsa_flax.train import experiment, steps
from gsa_flax.train import state as state_lib


def test_the_loss_of_a_mixed_batch_is_the_soft_target_cross_entropy():
  rng = np.random.default_rng(137)
  classes, size, smoothing = 7, 12, 0.1
  logits = rng.normal(size=(size, classes)).astype(np.float32) * 3
  batch = {
    'label': rng.integers(classes, size=size).astype(np.int32),
    'mix_label': rng.integers(classes, size=size).astype(np.int32),
    'mix_weight': rng.uniform(size=size).astype(np.float32),
  }
  # By hand: the mixed one-hot target, smoothed, against the log-softmax (float64).
  eye = np.eye(classes)
  w = batch['mix_weight'][:, None].astype(np.float64)
  target = w * eye[batch['label']] + (1 - w) * eye[batch['mix_label']]
  target = (1 - smoothing) * target + smoothing / classes
  shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  want = np.mean(-(target * log_softmax).sum(-1))
  got = steps.cross_entropy(logits, batch, classes, smoothing)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Without mixing fields, the plain (smoothed) one-hot target.
  plain = (1 - smoothing) * eye[batch['label']] + smoothing / classes
  got = steps.cross_entropy(logits, {'label': batch['label']}, classes, smoothing)
  np.testing.assert_allclose(float(got), np.mean(-(plain * log_softmax).sum(-1)), rtol=1e-5)


def test_the_train_step_trains_on_the_mixed_target_and_counts_the_label():
  # The step's loss and metrics do not depend on the network: the smallest one will do.
  config = tiny_config('', model='resnet_tiny', stage_sizes=(1,), num_filters=8)
  pieces = experiment.setup(config, 10, steps_per_epoch=10, num_train_steps=10)
  state = state_lib.create(pieces, jax.random.key(0), image_size=DIGITS_IMAGE_SIZE)
  schedule = pieces.schedule
  rng = np.random.default_rng(138)
  size = 8
  batch = {
    'image': rng.normal(size=(size, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, 3)).astype(np.float32),
    'label': rng.integers(10, size=size).astype(np.int32),
    'mix_label': rng.integers(10, size=size).astype(np.int32),
    'mix_weight': np.full(size, rng.uniform(), np.float32),
  }
  step = jax.jit(
    functools.partial(steps.train_step, schedule=schedule, num_classes=10, label_smoothing=0.1)
  )
  _, step_metrics = step(state, batch)
  metrics = step_metrics.compute()
  # The logits the step computed: the same forward pass (train mode, batch statistics).
  forward = jax.jit(functools.partial(state.apply_fn, train=True, mutable=['batch_stats']))
  logits, _ = forward(state_lib.variables(state), batch['image'])
  logits = np.asarray(logits, np.float64)
  eye = np.eye(10)
  w = batch['mix_weight'][:, None]
  target = 0.9 * (w * eye[batch['label']] + (1 - w) * eye[batch['mix_label']]) + 0.01
  shifted = logits - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  np.testing.assert_allclose(
    float(metrics['train_loss']), np.mean(-(target * log_softmax).sum(-1)), rtol=1e-5
  )
  assert float(metrics['train_accuracy']) == np.mean(logits.argmax(-1) == batch['label'])


def test_mix_images_pairs_examples_within_each_process_part():
  """Mixup and CutMix as the pipeline draws them, against the closed form on constant
  images (every pixel tells its source); two process parts of four examples each."""
  rng = np.random.default_rng(139)
  values = rng.permutation(np.arange(1, 250))[:8].astype(np.uint8)
  images = np.broadcast_to(values[:, None, None, None], (8, 5, 7, 3)).copy()
  partner = np.array([3, 2, 1, 0, 7, 6, 5, 4])  # reversed within each part
  lam = np.float32(rng.uniform())
  mixup = steps.mix_images(
    {'image': images, 'mix_blend': np.full(8, lam), 'mix_box': np.zeros((8, 4), np.int32)},
    groups=2,
  )
  want = lam * values.astype(np.float32) + (1 - lam) * values[partner].astype(np.float32)
  np.testing.assert_allclose(
    mixup, np.broadcast_to(want[:, None, None, None], mixup.shape), rtol=1e-6
  )
  box = np.tile(np.array([[1, 4, 2, 7]], np.int32), (8, 1))  # rows 1..3, columns 2..6
  cutmix = np.asarray(
    steps.mix_images(
      {'image': images, 'mix_blend': np.ones(8, np.float32), 'mix_box': box}, groups=2
    )
  )
  inside = np.zeros((5, 7), bool)
  inside[1:4, 2:7] = True
  for i in range(8):
    np.testing.assert_array_equal(cutmix[i][inside], values[partner[i]])
    np.testing.assert_array_equal(cutmix[i][~inside], values[i])

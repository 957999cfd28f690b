"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of a batch with itself reversed,
drawn from a stateless key so that a resumed run mixes exactly as an uninterrupted one.

The input pipeline draws the mixing of each batch (:func:`mix_params`) and the compiled
step applies it to the images (``gsa_flax.train.steps.mix_images``); :func:`mix_batch` does
both on the host.
"""

from __future__ import annotations

import tensorflow as tf

from gsa_flax.data import augment_config


def _sample_beta(key: tf.Tensor, alpha: tf.Tensor | float) -> tf.Tensor:
  """``Beta(alpha, alpha)`` as ``g1 / (g1 + g2)`` of two stateless gammas; float64 scalar."""
  keys = tf.random.experimental.stateless_split(key, 2)
  alpha = tf.cast(alpha, tf.float64)
  g1 = tf.random.stateless_gamma([], keys[0], alpha=alpha, dtype=tf.float64)
  g2 = tf.random.stateless_gamma([], keys[1], alpha=alpha, dtype=tf.float64)
  # With a tiny alpha both gammas can underflow to 0; lam = 0 (all partner) is then still a
  # consistent mix.
  return tf.math.divide_no_nan(g1, g1 + g2)


def _cutmix_box(height: tf.Tensor, width: tf.Tensor, lam: tf.Tensor, key: tf.Tensor):
  """``(box int32 [4] = (y0, y1, x0, x1), kept float32)``: a box of area about ``1 - lam``."""
  side = tf.sqrt(1.0 - lam)  # The box has the image's aspect ratio.
  box_height = tf.cast(side * tf.cast(height, tf.float64), tf.int32)
  box_width = tf.cast(side * tf.cast(width, tf.float64), tf.int32)
  y_key, x_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  # A uniform centre, then clipping: the box may be cut by the border, so its area is
  # recomputed below and the weight is the exact fraction of pixels kept.
  centre_y = tf.random.stateless_uniform([], y_key, minval=0, maxval=height, dtype=tf.int32)
  centre_x = tf.random.stateless_uniform([], x_key, minval=0, maxval=width, dtype=tf.int32)
  top, left = centre_y - box_height // 2, centre_x - box_width // 2
  y0, y1 = tf.clip_by_value(top, 0, height), tf.clip_by_value(top + box_height, 0, height)
  x0, x1 = tf.clip_by_value(left, 0, width), tf.clip_by_value(left + box_width, 0, width)
  kept = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float64) / tf.cast(height * width, tf.float64)
  return tf.stack([y0, y1, x0, x1]), tf.cast(kept, tf.float32)


def mix_params(
  labels: tf.Tensor,
  key: tf.Tensor,
  *,
  image_shape: tuple[int, int] | tf.Tensor,
  mixup_alpha: float,
  cutmix_alpha: float,
  prob: float = 1.0,
  switch_prob: float = 0.5,
) -> dict[str, tf.Tensor]:
  """The draws of :func:`mix_batch` for one batch, without the images.

  What the input pipeline puts in a batch so that the mixing itself is done on the
  accelerators, on ``uint8`` images copied there (``gsa_flax.train.steps.mix_images``):
  every example ``i`` becomes ``where(in mix_box, partner, mix_blend * image + (1 -
  mix_blend) * partner)`` with its partner ``batch - 1 - i``. That is :func:`mix_batch`'s
  image, which applies it here (:func:`apply_mix`).

  Args:
    labels: ``int32 [batch]``.
    key: as :func:`mix_batch`'s.
    image_shape: ``(height, width)`` of the images.
    mixup_alpha, cutmix_alpha, prob, switch_prob: as :func:`mix_batch`'s.

  Returns:
    ``{'label': int32 [batch] (unchanged), 'mix_label': int32 [batch], 'mix_weight':
    float32 [batch], 'mix_blend': float32 [batch] (Mixup's ``lam``, else 1), 'mix_box':
    int32 [batch, 4] (CutMix's box ``(y0, y1, x0, x1)``, else empty)}``; the same values
    for every example of the batch.
  """
  augment_config.check_config(
    mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob
  )
  labels = tf.convert_to_tensor(labels, tf.int32)
  ones = tf.ones_like(labels, tf.float32)
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return {
      'label': labels,
      'mix_label': labels,
      'mix_weight': ones,
      'mix_blend': ones,
      'mix_box': tf.zeros([tf.size(labels), 4], tf.int32),
    }
  prob_key, switch_key, lam_key, box_key = tf.unstack(
    tf.random.experimental.stateless_split(key, 4)
  )
  mix = tf.random.stateless_uniform([], prob_key) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], switch_key) < switch_prob
  else:
    use_cutmix = tf.constant(cutmix_alpha > 0)
  lam = _sample_beta(lam_key, tf.where(use_cutmix, cutmix_alpha, mixup_alpha))
  height, width = tf.unstack(tf.cast(image_shape, tf.int32))
  box, kept = _cutmix_box(height, width, lam, box_key)
  mixup, cutmix = mix & ~use_cutmix, mix & use_cutmix
  lam = tf.cast(lam, tf.float32)
  weight = tf.where(mixup, lam, tf.where(cutmix, kept, 1.0))
  return {
    'label': labels,
    'mix_label': tf.where(mix, tf.reverse(labels, [0]), labels),
    'mix_weight': weight * ones,
    'mix_blend': tf.where(mixup, lam, 1.0) * ones,
    'mix_box': tf.tile(tf.where(cutmix, box, 0)[None], [tf.size(labels), 1]),
  }


def apply_mix(images: tf.Tensor, blend: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
  """The images of :func:`mix_params`'s draws: each with its partner ``batch - 1 - i``.

  Args:
    images: ``[batch, height, width, 3]``, any real dtype.
    blend: float32 ``[batch]``.
    box: int32 ``[batch, 4]``, ``(y0, y1, x0, x1)``.

  Returns:
    float32 ``[batch, height, width, 3]``.
  """
  images = tf.cast(images, tf.float32)
  partners = tf.reverse(images, [0])
  rows = tf.range(tf.shape(images)[1])[None, :, None]
  cols = tf.range(tf.shape(images)[2])[None, None, :]
  y0, y1, x0, x1 = (box[:, i, None, None] for i in range(4))
  in_box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [batch, height, width]
  weight = blend[:, None, None, None]
  mixed = weight * images + (1.0 - weight) * partners
  return tf.where(in_box[..., None], partners, mixed)


def mix_batch(
  images: tf.Tensor,
  labels: tf.Tensor,
  key: tf.Tensor,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
  prob: float = 1.0,
  switch_prob: float = 0.5,
) -> dict[str, tf.Tensor]:
  """Mixup or CutMix of a batch with itself reversed: example ``i`` with ``batch - 1 - i``.

  One draw per batch, all from ``key``: whether to mix (probability ``prob``); Mixup or
  CutMix (CutMix with probability ``switch_prob`` when both alphas are positive, otherwise
  the one whose alpha is positive); ``lam ~ Beta(alpha, alpha)`` of the chosen method.
  Mixup: ``image = lam * image + (1 - lam) * partner``. CutMix: a box of the partner, of
  area ``(1 - lam)`` of the image and the image's aspect ratio, at a uniform centre, clipped
  to the image, is pasted into every image; the weight is then the exact fraction of pixels
  kept. With an odd batch, the middle example is paired with itself (its target stays its
  own label).

  Train on the soft target ``mix_weight * onehot(label) + (1 - mix_weight) *
  onehot(mix_label)`` with soft-target cross-entropy, ``-sum(target * log_softmax(logits))``,
  which equals ``mix_weight * CE(label) + (1 - mix_weight) * CE(mix_label)``. Label
  smoothing, if any, applies to that mixed target.

  The input pipeline draws the same with :func:`mix_params` and leaves the images to the
  accelerators.

  Args:
    images: ``float32 [batch, height, width, 3]`` (normalized or not: mixing is linear).
    labels: ``int32 [batch]``.
    key: stateless key, int32 or int64 ``[2]``; the input pipeline keys it by
      ``(seed, process, step)``.
    mixup_alpha: Beta parameter of Mixup; 0 turns Mixup off.
    cutmix_alpha: Beta parameter of CutMix; 0 turns CutMix off. Both 0: a no-op.
    prob: probability that the batch is mixed at all.
    switch_prob: probability of CutMix when both alphas are positive.

  Returns:
    ``{'image': float32 [batch, height, width, 3], 'label': int32 [batch] (unchanged),
    'mix_label': int32 [batch], 'mix_weight': float32 [batch]}``. An unmixed batch has
    ``mix_label == label`` and ``mix_weight == 1``; a mixed one ``mix_label`` the reversed
    labels and ``mix_weight`` the batch's ``lam`` (the same for every example).
  """
  images = tf.convert_to_tensor(images, tf.float32)
  params = mix_params(
    labels,
    key,
    image_shape=tf.shape(images)[1:3],
    mixup_alpha=mixup_alpha,
    cutmix_alpha=cutmix_alpha,
    prob=prob,
    switch_prob=switch_prob,
  )
  mixed = apply_mix(images, params.pop('mix_blend'), params.pop('mix_box'))
  return {'image': tf.ensure_shape(mixed, images.shape), **params}

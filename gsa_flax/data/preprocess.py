"""Preprocessing of one image: decoding, the train and eval crops, resizing, the train
augmentation and the normalisation, as TensorFlow functions of ``uint8 [height, width, 3]``
images.

Batches leave the host as ``uint8`` (4x fewer bytes than float32); the compiled steps mix
and normalise them on the device (:func:`normalize` is the same formula on the host, for
prediction). :func:`decode` is the one image decoder, of training, evaluation and image
files alike.
"""

from __future__ import annotations

import tensorflow as tf

from gsa_flax.data.augment import rand_augment
from gsa_flax.data.augment_config import Augment
from gsa_flax.data.datasets import DatasetSpec

# 'center' evaluation crop: center crop of image_size / (image_size + 32) of the shorter side
# (224 of 256), then resize: the standard ResNet/Inception protocol.
_EVAL_CROP_PADDING = 32
# 'inception' training crop: random-resized crop (Szegedy et al. 2015).
_CROP_AREA_RANGE = (0.08, 1.0)
_CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
_CROP_MIN_OBJECT_COVERED = 0.1
_CROP_MAX_ATTEMPTS = 10
# 'pad' training crop: zero-pad by 4 pixels per 32 (scaled with image_size), then crop back
# at a random position.
_PAD_FRACTION = 4 / 32


def decode(encoded: tf.Tensor, window: tf.Tensor | None = None) -> tf.Tensor:
  """Decodes an encoded image (PNG, JPEG, GIF: first frame, BMP) to ``uint8 [h, w, 3]``.

  Args:
    encoded: the file's bytes (a scalar string tensor).
    window: optional ``[offset_y, offset_x, height, width]``: decode only that crop, fused
      with the decoding (JPEG only; the Inception crop uses it).

  Raises:
    tf.errors.InvalidArgumentError: not a decodable image (eagerly).
  """
  if window is not None:
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def normalize(images: tf.Tensor, spec: DatasetSpec) -> tf.Tensor:
  """``(images - mean) / std`` with the dataset's statistics, as float32.

  What the compiled steps do on the device to the batches of the ``create_*_iterator``
  functions (:func:`gsa_flax.train.steps.normalize_images`); here for images that go to a
  model without them (prediction, figures).

  Args:
    images: ``[..., 3]`` on the 0..255 scale, any real dtype.
    spec: the dataset: its ``mean_rgb`` and ``stddev_rgb``.
  """
  mean = tf.constant(spec.mean_rgb, tf.float32)
  std = tf.constant(spec.stddev_rgb, tf.float32)
  return (tf.cast(images, tf.float32) - mean) / std


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Bilinear without antialias, rounded half up to ``uint8``; the identity at equal size.

  Antialiasing costs 1.1 ms of CPU per ImageNet crop, more than the decode (0.6 ms), for a
  filter that the standard ResNet/Inception recipes trained without (TF-slim's Inception
  preprocessing, big_vision: bilinear; flax: bicubic, 0.15 ms more); training and
  evaluation use the same resize, so the model sees one image statistics
  (``benchmarks/pipeline.py``).
  """
  resized = tf.image.resize(image, [image_size, image_size], method='bilinear')
  # A convex combination of grey levels: adding 1/2 and truncating rounds half up.
  return tf.saturate_cast(resized + 0.5, tf.uint8)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  channels = image.shape[-1]
  if image.shape.rank != 3 or channels not in (1, 3, 4):
    raise ValueError(f'Expected an image [height, width, 1|3|4], got shape {image.shape}.')
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  return image[:, :, :3]  # Drops alpha.


def _center_crop_window(shape: tf.Tensor, image_size: int) -> tf.Tensor:
  """``[offset_y, offset_x, size, size]`` of the ``'center'`` evaluation crop."""
  height, width = shape[0], shape[1]
  shorter = tf.cast(tf.minimum(height, width), tf.float32)
  size = tf.cast(image_size / (image_size + _EVAL_CROP_PADDING) * shorter, tf.int32)
  size = tf.maximum(size, 1)
  return tf.stack([(height - size + 1) // 2, (width - size + 1) // 2, size, size])


def _central_square_window(shape: tf.Tensor) -> tf.Tensor:
  size = tf.minimum(shape[0], shape[1])
  return tf.stack([(shape[0] - size) // 2, (shape[1] - size) // 2, size, size])


def preprocess_for_eval(image: tf.Tensor, *, spec: DatasetSpec, image_size: int) -> tf.Tensor:
  """Prepares one decoded image exactly as evaluation batches are prepared.

  The spec's eval crop (``'center'``: ``image_size / (image_size + 32)`` of the shorter
  side; ``'square'``: the central square), then resize and normalise.

  Args:
    image: decoded ``uint8 [height, width, channels]``, channels 1 (grey), 3 or 4 (alpha
      dropped); a NumPy array is accepted.
    spec: the dataset: selects the crop and the normalization.
    image_size: output height and width.

  Returns:
    ``float32 [image_size, image_size, 3]``, normalized with the dataset's mean and std:
    :func:`normalize` of the ``uint8`` image that evaluation batches carry.
  """
  return normalize(_eval_crop(image, spec, image_size), spec)


def _eval_crop(image: tf.Tensor, spec: DatasetSpec, image_size: int) -> tf.Tensor:
  """The eval crop and resize of a decoded image: ``uint8 [image_size, image_size, 3]``."""
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise ValueError(f'Expected a uint8 image, got {image.dtype.name}.')
  image = _to_rgb(image)
  if spec.eval_crop == 'center':
    window = _center_crop_window(tf.shape(image), image_size)
  else:
    window = _central_square_window(tf.shape(image))
  y, x, height, width = tf.unstack(window)
  image = tf.image.crop_to_bounding_box(image, y, x, height, width)
  return _resize(image, image_size)


def eval_image(encoded: tf.Tensor, spec: DatasetSpec, image_size: int) -> tf.Tensor:
  # A full decode, not a fused crop: the fused decoder's chroma upsampling differs from a
  # full decode along the crop border (a few grey levels), and a full decode keeps eval
  # batches bit-identical to preprocess_for_eval (the prediction path). The eval crop keeps
  # ~77% of the image anyway, so fusing would save little.
  return _eval_crop(decode(encoded), spec, image_size)


def train_image(
  encoded: tf.Tensor, key: tf.Tensor, spec: DatasetSpec, image_size: int, augment: Augment
):
  """Decodes and augments one training image; all randomness comes from ``key``."""
  # The first two keys of a 3-way split are those of a 2-way split: crops and flips are
  # the same with RandAugment on or off.
  keys = tf.random.experimental.stateless_split(key, 3 if augment.rand_augment else 2)
  crop_key, flip_key = keys[0], keys[1]
  if spec.train_crop == 'inception':
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(encoded),
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=crop_key,
      min_object_covered=_CROP_MIN_OBJECT_COVERED,
      aspect_ratio_range=_CROP_ASPECT_RATIO_RANGE,
      area_range=_CROP_AREA_RANGE,
      max_attempts=_CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True,
    )
    y, x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    image = _resize(decode(encoded, tf.stack([y, x, height, width])), image_size)
  elif spec.train_crop == 'none':
    image = _resize(decode(encoded), image_size)
  else:  # 'pad'
    image = _resize(decode(encoded), image_size)
    pad = round(_PAD_FRACTION * image_size)
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed=crop_key)
  if spec.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_key)
  if augment.rand_augment:
    image = rand_augment(
      image,
      keys[2],
      num_layers=augment.num_layers,
      magnitude=augment.magnitude,
      magnitude_std=augment.magnitude_std,
    )
  return image

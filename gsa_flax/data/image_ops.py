"""The pixel operations RandAugment draws from, as pure TensorFlow functions of a
``uint8 [height, width, 3]`` image: the colour and histogram ops (after PIL's ``ImageOps``
and ``ImageEnhance``, rounding to the nearest grey level where PIL truncates) and the
geometric ops (bilinear resampling about the centre, uncovered pixels filled with
:data:`FILL_VALUE`). Which op is applied at which strength is :mod:`gsa_flax.data.augment`'s.
"""

from __future__ import annotations

import math

import tensorflow as tf

# Grey level of the pixels that a geometric op uncovers (the image mean of most datasets is
# near mid grey, so the fill adds little new contrast).
FILL_VALUE = 128
# SolarizeAdd adds to the pixels below this grey level.
_SOLARIZE_ADD_THRESHOLD = 128


# ITU-R 601-2 luma weights (0.299, 0.587, 0.114) in 16-bit fixed point: they sum to exactly
# 2**16, so the grey level is an exact integer computation (PIL's convert('L') uses the same).
_LUMA_WEIGHTS_16BIT = (19595, 38470, 7471)


# Pixel-value ops on uint8 [height, width, 3].
#
# Written for TensorFlow's CPU kernels, which these ops run on in the input pipeline:
# elementwise ops with scalar operands are fast (~0.03 ms per pass over a 224x224 image),
# broadcasts of per-channel vectors, selects (tf.where) and gathers are 5-20x slower per
# element. So per-channel statistics work on the image as [3, pixels] rows, selects are
# written as arithmetic on grey levels (exact in float32: every value is an integer below
# 2**24), and the luma is one float32 matmul (exact for the same reason).

_LUMA_WEIGHTS = tf.constant([[float(w)] for w in _LUMA_WEIGHTS_16BIT], tf.float32)  # [3, 1]


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds half up and clips to 0..255 (``tf.round`` rounds half to even).

  ``saturate_cast`` clips to 0..255 and truncates: on ``x + 1/2`` that is ``floor(x + 1/2)``
  clipped, in two passes over the image instead of four.
  """
  return tf.saturate_cast(image + 0.5, tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
  """``degenerate + factor * (image - degenerate)``: PIL's ``ImageEnhance`` interpolation."""
  degenerate = tf.cast(degenerate, tf.float32)
  image = tf.cast(image, tf.float32)
  return _to_uint8(degenerate + tf.cast(factor, tf.float32) * (image - degenerate))


def _grey(image: tf.Tensor) -> tf.Tensor:
  """float32 [height, width] luma, rounded half up (an integer 0..255)."""
  pixels = tf.reshape(tf.cast(image, tf.float32), [-1, 3])
  # 16-bit fixed point: the weighted sum is below 2**24, so exact in float32.
  weighted = tf.matmul(pixels, _LUMA_WEIGHTS)[:, 0]
  return tf.reshape(tf.floor((weighted + 2.0**15) / 2.0**16), tf.shape(image)[:2])


def _channel_rows(image: tf.Tensor) -> tf.Tensor:
  """``uint8 [3, pixels]``: each channel as a row."""
  return tf.transpose(tf.reshape(image, [-1, 3]))


def _from_channel_rows(rows: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
  return tf.reshape(tf.transpose(rows), tf.shape(like))


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel linearly so that its darkest pixel is 0 and its brightest 255.

  Args:
    image: ``uint8 [height, width, 3]``.

  Returns:
    ``uint8 [height, width, 3]``; a constant channel is left unchanged.
  """
  rows = _channel_rows(image)
  low = tf.cast(tf.reduce_min(rows, axis=1, keepdims=True), tf.float32)  # [3, 1]
  high = tf.cast(tf.reduce_max(rows, axis=1, keepdims=True), tf.float32)
  # A constant channel maps through x * 255 / 255, the identity (exact in float32).
  stretch = high > low
  low = tf.where(stretch, low, 0.0)
  spread = tf.where(stretch, high - low, 255.0)
  # Multiplying before dividing keeps the brightest pixel at exactly 255.0.
  stretched = (tf.cast(rows, tf.float32) - low) * 255.0 / spread
  return _from_channel_rows(_to_uint8(stretched), image)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Equalizes the histogram of each channel (PIL's ``ImageOps.equalize``).

  Grey level ``v`` of a channel maps to ``(step // 2 + count(< v)) // step`` with ``step =
  (pixels - count(max)) // 255``: the brightest level is left out of the step so that it
  maps to 255. A channel whose step is 0 (for example a constant one) is left unchanged.

  Args:
    image: ``uint8 [height, width, 3]``.

  Returns:
    ``uint8 [height, width, 3]``.
  """
  # Each channel's grey levels offset into its own 256 bins: one flat histogram and one
  # flat lookup serve all three channels.
  index = tf.cast(_channel_rows(image), tf.int32) + tf.constant([[0], [256], [512]], tf.int32)
  # A histogram of a fixed size (tf.math.bincount sizes it from the largest value, which
  # XLA would need to know when it compiles: one compile per image).
  counts = tf.raw_ops.DenseBincount(
    input=tf.reshape(index, [-1]), size=768, weights=tf.constant([], tf.int32)
  )
  histogram = tf.reshape(counts, [3, 256])
  levels = tf.range(256)[None]
  # The count of each channel's brightest level: its last non-empty bin.
  brightest = tf.reduce_max(tf.where(histogram > 0, levels, 0), axis=1)
  brightest_count = tf.gather(histogram, brightest, batch_dims=1)
  step = (tf.reduce_sum(histogram, axis=1) - brightest_count) // 255  # [3]
  below = tf.math.cumsum(histogram, axis=1, exclusive=True)
  table = (step[:, None] // 2 + below) // tf.maximum(step, 1)[:, None]
  table = tf.where(step[:, None] > 0, tf.clip_by_value(table, 0, 255), levels)
  equalized = tf.gather(tf.reshape(tf.cast(table, tf.uint8), [-1]), index)
  return _from_channel_rows(equalized, image)


def invert(image: tf.Tensor) -> tf.Tensor:
  """``255 - image`` on ``uint8 [height, width, 3]``."""
  return 255 - image


def posterize(image: tf.Tensor, bits: int | tf.Tensor) -> tf.Tensor:
  """Keeps the ``bits`` most significant bits of every value (0..8), zeroing the others.

  Args:
    image: ``uint8 [height, width, 3]``.
    bits: scalar int in 0..8; 8 is the identity, 0 a black image.

  Returns:
    ``uint8 [height, width, 3]``.
  """
  bits = tf.cast(bits, tf.int32)
  # The mask is computed in int32: shifting a uint8 by 8 bits is undefined.
  mask = tf.cast(256 - tf.bitwise.left_shift(1, 8 - bits), tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def solarize(image: tf.Tensor, threshold: float | tf.Tensor) -> tf.Tensor:
  """Inverts the values ``>= threshold`` (256 or more: identity; 0: ``invert``).

  Args:
    image: ``uint8 [height, width, 3]``.
    threshold: scalar, on the 0..256 scale.

  Returns:
    ``uint8 [height, width, 3]``.
  """
  x = tf.cast(image, tf.float32)
  inverted = tf.cast(x >= tf.cast(threshold, tf.float32), tf.float32)
  # x or 255 - x, selected by 0/1 arithmetic (exact on grey levels).
  return tf.cast(x + inverted * (255.0 - 2.0 * x), tf.uint8)


def solarize_add(
  image: tf.Tensor, addition: int | tf.Tensor, threshold: int = _SOLARIZE_ADD_THRESHOLD
) -> tf.Tensor:
  """Adds ``addition`` to the values ``< threshold``, saturating at 255.

  Args:
    image: ``uint8 [height, width, 3]``.
    addition: scalar int.
    threshold: values at or above it are left unchanged.

  Returns:
    ``uint8 [height, width, 3]``.
  """
  x = tf.cast(image, tf.float32)
  below = tf.cast(x < float(threshold), tf.float32)
  added = tf.clip_by_value(x + tf.cast(addition, tf.float32), 0.0, 255.0)
  return tf.cast(x + below * (added - x), tf.uint8)


def color(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """Interpolates between the grey image (factor 0) and ``image`` (factor 1), or beyond.

  Args:
    image: ``uint8 [height, width, 3]``.
    factor: scalar; 1 is the identity.

  Returns:
    ``uint8 [height, width, 3]``.
  """
  # The grey image in every channel (a copy is cheaper than a broadcast in the blend).
  return _blend(tf.tile(_grey(image)[..., None], [1, 1, 3]), image, factor)


def contrast(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """Interpolates between a constant image at the mean grey level (factor 0) and ``image``.

  The mean is that of the integer luma, rounded half up to a grey level (as PIL does).

  Args:
    image: ``uint8 [height, width, 3]``.
    factor: scalar; 1 is the identity.

  Returns:
    ``uint8 [height, width, 3]``.
  """
  grey = _grey(image)
  pixels = tf.size(grey)
  # Rounded half up in integers: floor(sum / pixels + 1/2).
  mean = (2 * tf.reduce_sum(tf.cast(grey, tf.int32)) + pixels) // (2 * pixels)
  return _blend(mean, image, factor)


def brightness(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """Scales the image by ``factor`` (0: black, 1: identity), saturating at 255.

  Args:
    image: ``uint8 [height, width, 3]``.
    factor: scalar.

  Returns:
    ``uint8 [height, width, 3]``.
  """
  return _to_uint8(tf.cast(factor, tf.float32) * tf.cast(image, tf.float32))


def sharpness(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
  """Interpolates between a smoothed image (factor 0) and ``image`` (1); above 1 sharpens.

  The smoothed image is PIL's ``ImageFilter.SMOOTH``: the 3x3 kernel ``[[1, 1, 1], [1, 5, 1],
  [1, 1, 1]] / 13`` on interior pixels, rounded; the one-pixel border is left unsmoothed.

  Args:
    image: ``uint8 [height, width, 3]``.
    factor: scalar; 1 is the identity.

  Returns:
    ``uint8 [height, width, 3]``.
  """
  x = tf.cast(image, tf.float32)
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32)
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])  # [3, 3, in channels, 1]
  # Integer weights keep the sums exact; dividing once rounds correctly.
  smoothed = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], 'SAME')[0] / 13.0

  def smoothed_interior():
    # The change the smoothing makes to the interior, zero-padded onto the border.
    change = tf.floor(smoothed[1:-1, 1:-1] + 0.5) - x[1:-1, 1:-1]
    return x + tf.pad(change, [[1, 1], [1, 1], [0, 0]])

  has_interior = tf.reduce_min(tf.shape(image)[:2]) >= 3
  degenerate = tf.cond(has_interior, smoothed_interior, lambda: x)
  return _blend(degenerate, x, factor)


# Geometric ops. Coordinates are pixel indices: x is the column, y the row (downwards).


def _centre(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """``(x, y)`` of the image centre in pixel indices, float32."""
  shape = tf.cast(tf.shape(image), tf.float32)
  return (shape[1] - 1.0) / 2.0, (shape[0] - 1.0) / 2.0


def rotate(image: tf.Tensor, degrees: float | tf.Tensor) -> tf.Tensor:
  """Rotates counterclockwise (as displayed, rows downwards) about the image centre.

  Bilinear: output pixel ``(x, y)`` interpolates the four input pixels around its source
  point, pixels outside the image reading ``FILL_VALUE`` (the weights and the order of the
  sums of ``ImageProjectiveTransformV3``'s bilinear, constant-fill mode, as gathers and
  elementwise arithmetic that XLA compiles into one pass). A multiple of 90 degrees on a
  square image moves pixel centres onto pixel centres: it is ``np.rot90`` exactly.

  Args:
    image: ``uint8 [height, width, 3]``.
    degrees: scalar angle.

  Returns:
    ``uint8 [height, width, 3]``; uncovered pixels are ``FILL_VALUE``.
  """
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(radians), tf.sin(radians)
  cx, cy = _centre(image)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  x = tf.range(width, dtype=tf.float32)[None]
  y = tf.range(height, dtype=tf.float32)[:, None]
  # Inverse map: input = centre + R(angle) (output - centre), R the rotation that turns the
  # displayed image clockwise, since output pixels look up where their content came from.
  # A source point at or beyond one pixel outside reads only fill: clipping it to -1 or to
  # the size keeps that (its weight falls on the fill line at -1 or at the size).
  source_x = cos * x - sin * y + (cx - cos * cx + sin * cy)
  source_y = sin * x + cos * y + (cy - sin * cx - cos * cy)
  source_x = tf.clip_by_value(source_x, -1.0, tf.cast(width, tf.float32))
  source_y = tf.clip_by_value(source_y, -1.0, tf.cast(height, tf.float32))
  left, top = tf.floor(source_x), tf.floor(source_y)
  right_weight, bottom_weight = (source_x - left)[..., None], (source_y - top)[..., None]
  # One fill line before the image and two after it, so that every corner has an index.
  padded_width = width + 3
  pixels = tf.reshape(tf.pad(image, [[1, 2], [1, 2], [0, 0]], constant_values=FILL_VALUE), [-1, 3])
  corner = tf.cast(top + 1.0, tf.int32) * padded_width + tf.cast(left + 1.0, tf.int32)

  def read(index):
    return tf.cast(tf.gather(pixels, index), tf.float32)

  upper = (1.0 - right_weight) * read(corner) + right_weight * read(corner + 1)
  lower = (1.0 - right_weight) * read(corner + padded_width) + right_weight * read(
    corner + padded_width + 1
  )
  return _to_uint8((1.0 - bottom_weight) * upper + bottom_weight * lower)


def _resample_lines(image: tf.Tensor, offsets: tf.Tensor, axis: int) -> tf.Tensor:
  """Bilinear resampling along one axis, by a different offset for each line across it.

  ``axis=1``: output pixel ``(x, y)`` samples input point ``(x + offsets[y], y)`` (rows move);
  ``axis=0``: ``(x, y + offsets[x])`` (columns move). Shears and translations are such
  transforms: this is :func:`rotate`'s resampling for them (the same bilinear weights,
  the same ``FILL_VALUE`` outside) with two gathers instead of four.

  Args:
    image: ``uint8 [height, width, 3]``.
    offsets: float32 ``[height]`` (``axis=1``) or ``[width]`` (``axis=0``).
    axis: the axis along which pixels move.
  """
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  whole = tf.floor(offsets)
  fraction = offsets - whole
  # One fill line on each side; any source point beyond the first or last line reads it,
  # so that points outside the image read FILL_VALUE as in rotate.
  paddings = [[0, 0], [0, 0], [0, 0]]
  paddings[axis] = [1, 1]
  pixels = tf.reshape(tf.pad(image, paddings, constant_values=FILL_VALUE), [-1, 3])
  rows, cols = tf.range(height)[:, None], tf.range(width)[None]
  if axis == 1:
    source = cols + tf.cast(whole, tf.int32)[:, None]  # [height, width]
    fraction = fraction[:, None, None]

    def flat(line):  # input column `line` of each row, in the padded rows
      return rows * (width + 2) + tf.clip_by_value(line, -1, width) + 1

  else:
    source = rows + tf.cast(whole, tf.int32)[None]
    fraction = fraction[None, :, None]

    def flat(line):
      return (tf.clip_by_value(line, -1, height) + 1) * width + cols

  before = tf.cast(tf.gather(pixels, flat(source)), tf.float32)
  after = tf.cast(tf.gather(pixels, flat(source + 1)), tf.float32)
  return _to_uint8((1.0 - fraction) * before + fraction * after)


def _shear(image: tf.Tensor, shear: float | tf.Tensor, axis: int) -> tf.Tensor:
  """Lines along ``axis`` move by ``shear`` times their distance from the centre line."""
  shear = tf.cast(shear, tf.float32)
  centre = _centre(image)[axis]  # (cx, cy): rows (axis=1) move by their distance from cy
  lines = tf.range(tf.shape(image)[1 - axis], dtype=tf.float32)
  return _resample_lines(image, shear * lines - shear * centre, axis=axis)


def shear_x(image: tf.Tensor, shear: float | tf.Tensor) -> tf.Tensor:
  """Shears horizontally about the centre row: row ``y`` reads from ``x + shear * (y - cy)``.

  Args:
    image: ``uint8 [height, width, 3]``.
    shear: scalar.

  Returns:
    ``uint8 [height, width, 3]``; uncovered pixels are ``FILL_VALUE``.
  """
  return _shear(image, shear, axis=1)


def shear_y(image: tf.Tensor, shear: float | tf.Tensor) -> tf.Tensor:
  """Shears vertically about the centre column: column ``x`` reads from ``y + shear * (x - cx)``.

  Args:
    image: ``uint8 [height, width, 3]``; see ``shear_x``.
    shear: scalar.

  Returns:
    ``uint8 [height, width, 3]``; uncovered pixels are ``FILL_VALUE``.
  """
  return _shear(image, shear, axis=0)


def _translate(image: tf.Tensor, pixels: tf.Tensor, axis: int) -> tf.Tensor:
  """Moves the content ``pixels`` along ``axis`` (0: down, 1: right)."""
  pixels = tf.cast(pixels, tf.float32)

  def shift():
    # Whole pixels (RandAugment's): the content moves, the rest is fill; no resampling.
    size = tf.shape(image)[axis]
    moved = tf.clip_by_value(tf.cast(pixels, tf.int32), -size, size)
    paddings = [[0, 0], [0, 0], [0, 0]]
    paddings[axis] = [tf.maximum(moved, 0), tf.maximum(-moved, 0)]
    padded = tf.pad(image, paddings, constant_values=FILL_VALUE)
    begin = tf.maximum(-moved, 0)
    return padded[begin : begin + size] if axis == 0 else padded[:, begin : begin + size]

  def resample():
    return _resample_lines(image, tf.fill([tf.shape(image)[1 - axis]], -pixels), axis)

  return tf.ensure_shape(tf.cond(tf.floor(pixels) == pixels, shift, resample), image.shape)


def translate_x(image: tf.Tensor, pixels: float | tf.Tensor) -> tf.Tensor:
  """Moves the content ``pixels`` to the right (negative: left).

  Args:
    image: ``uint8 [height, width, 3]``.
    pixels: scalar; a whole number gives an exact shift, a fraction resamples bilinearly.

  Returns:
    ``uint8 [height, width, 3]``; uncovered pixels are ``FILL_VALUE``.
  """
  return _translate(image, pixels, axis=1)


def translate_y(image: tf.Tensor, pixels: float | tf.Tensor) -> tf.Tensor:
  """Moves the content ``pixels`` down (negative: up); see ``translate_x``."""
  return _translate(image, pixels, axis=0)


# RandAugment: magnitude (0..10) to op arguments.

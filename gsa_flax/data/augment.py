"""Strong augmentation as pure, deterministic TensorFlow functions: RandAugment, Mixup, CutMix.

Everything here is a function of its inputs and a stateless key (an int32/int64 tensor of
shape ``[2]``, as ``tf.random.experimental.stateless_split`` produces), so the input
pipeline can key it by ``(seed, process, epoch, position)`` or ``(seed, process, step)`` and a
resumed run replays the same batches. The functions run eagerly and inside
``tf.data.Dataset.map`` (graph mode: ops are selected with ``tf.switch_case``, never with
Python control flow on tensor values), for any image size.

RandAugment (Cubuk et al. 2020, "RandAugment: Practical automated data augmentation with a
reduced search space") applies ``num_layers`` ops drawn uniformly, with replacement, from
``OPS``, each at one global ``magnitude`` on a 0..10 scale (``rand-m9-n2`` is
``num_layers=2, magnitude=9``). Every op with an argument is the identity at magnitude 0 and
grows stronger with it (the paper's intent; timm calls these the "increasing" variants).
Signed ops take either sign with probability 1/2.

==============  =====================================================  ================
op              argument at magnitude ``m``                            at ``m = 9``
==============  =====================================================  ================
AutoContrast    none: each channel stretched to 0..255
Equalize        none: each channel's histogram equalized
Invert          none: ``255 - x``
Rotate          ``+-30 * m / 10`` degrees, about the centre            +-27 degrees
Posterize       keep ``8 - floor(4 * m / 10)`` bits                    5 bits
Solarize        invert pixels ``>= 256 * (1 - m / 10)``                ``>= 25.6``
SolarizeAdd     add ``floor(110 * m / 10)`` to pixels ``< 128``        99
Color           factor ``1 +- 0.9 * m / 10`` (1: unchanged)            0.19 or 1.81
Contrast        factor ``1 +- 0.9 * m / 10``                           0.19 or 1.81
Brightness      factor ``1 +- 0.9 * m / 10``                           0.19 or 1.81
Sharpness       factor ``1 +- 0.9 * m / 10``                           0.19 or 1.81
ShearX, ShearY  ``+-0.3 * m / 10``, about the centre                   +-0.27
TranslateX/Y    ``+-0.45 * m / 10`` of the width/height, whole pixels  +-40.5%
Identity        none (not in ``OPS``; pass ``ops=`` to include it)
==============  =====================================================  ================

The ranges are those of the common ImageNet recipe (timm's increasing ops, which follow the
AutoAugment search space), except Posterize, which keeps the AutoAugment paper's 8..4 bits
where timm's increasing variant goes down to 0 bits (a black image). Translation is a
fraction of the image size so that it scales with resolution. Geometric ops resample
bilinearly with ``tf.raw_ops.ImageProjectiveTransformV3`` and fill uncovered pixels with
``FILL_VALUE`` (mid grey). The colour ops follow PIL's ``ImageOps``/``ImageEnhance``
definitions but round to the nearest grey level where PIL truncates.

Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) act on a batch: see ``mix_batch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import tensorflow as tf

from gsa_flax.data import augment_config

MAX_MAGNITUDE = augment_config.MAX_MAGNITUDE
# Grey level of the pixels that a geometric op uncovers (the image mean of most datasets is
# near mid grey, so the fill adds little new contrast).
FILL_VALUE = 128

# Op arguments at MAX_MAGNITUDE (see the module docstring for the whole mapping).
_MAX_ROTATE_DEGREES = 30.0
_MAX_POSTERIZE_BITS_REMOVED = 4
_MAX_SOLARIZE_ADD = 110
_SOLARIZE_ADD_THRESHOLD = 128
_MAX_ENHANCE_DELTA = 0.9
_MAX_SHEAR = 0.3
_MAX_TRANSLATE_FRACTION = 0.45

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
  histogram = tf.reshape(tf.math.bincount(index, minlength=768, maxlength=768), [3, 256])
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


def _transform(image: tf.Tensor, rows: list[tf.Tensor]) -> tf.Tensor:
  """Output pixel ``(x, y)`` samples input point ``(a0 x + a1 y + a2, b0 x + b1 y + b2)``.

  ``rows`` is ``[a0, a1, a2, b0, b1, b2]``: the inverse map, as ``ImageProjectiveTransformV3``
  takes it. Bilinear; points outside the image read ``FILL_VALUE``.
  """
  transform = tf.stack([tf.cast(value, tf.float32) for value in rows] + [0.0, 0.0])
  transformed = tf.raw_ops.ImageProjectiveTransformV3(
    images=tf.cast(image, tf.float32)[None],
    transforms=transform[None],
    output_shape=tf.shape(image)[:2],
    fill_value=float(FILL_VALUE),
    interpolation='BILINEAR',
    fill_mode='CONSTANT',
  )
  return _to_uint8(transformed[0])


def _centre(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """``(x, y)`` of the image centre in pixel indices, float32."""
  shape = tf.cast(tf.shape(image), tf.float32)
  return (shape[1] - 1.0) / 2.0, (shape[0] - 1.0) / 2.0


def rotate(image: tf.Tensor, degrees: float | tf.Tensor) -> tf.Tensor:
  """Rotates counterclockwise (as displayed, rows downwards) about the image centre.

  A multiple of 90 degrees on a square image moves pixel centres onto pixel centres: it is
  ``np.rot90`` exactly.

  Args:
    image: ``uint8 [height, width, 3]``.
    degrees: scalar angle.

  Returns:
    ``uint8 [height, width, 3]``; uncovered pixels are ``FILL_VALUE``.
  """
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(radians), tf.sin(radians)
  cx, cy = _centre(image)
  # Inverse map: input = centre + R(angle) (output - centre), R the rotation that turns the
  # displayed image clockwise, since output pixels look up where their content came from.
  return _transform(
    image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]
  )


def _resample_lines(image: tf.Tensor, offsets: tf.Tensor, axis: int) -> tf.Tensor:
  """Bilinear resampling along one axis, by a different offset for each line across it.

  ``axis=1``: output pixel ``(x, y)`` samples input point ``(x + offsets[y], y)`` (rows move);
  ``axis=0``: ``(x, y + offsets[x])`` (columns move). Shears and translations are such
  transforms: this is :func:`_transform` for them (the same bilinear weights, the same
  ``FILL_VALUE`` outside) as two flat gathers and a blend, instead of
  ``ImageProjectiveTransformV3``'s per-pixel, per-channel projection, which costs about
  twice as much.

  Args:
    image: ``uint8 [height, width, 3]``.
    offsets: float32 ``[height]`` (``axis=1``) or ``[width]`` (``axis=0``).
    axis: the axis along which pixels move.
  """
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  whole = tf.floor(offsets)
  fraction = offsets - whole
  # One fill line on each side; any source point beyond the first or last line reads it,
  # so that points outside the image read FILL_VALUE as in _transform.
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


def shear_x(image: tf.Tensor, shear: float | tf.Tensor) -> tf.Tensor:
  """Shears horizontally about the centre row: row ``y`` reads from ``x + shear * (y - cy)``.

  Args:
    image: ``uint8 [height, width, 3]``.
    shear: scalar.

  Returns:
    ``uint8 [height, width, 3]``; uncovered pixels are ``FILL_VALUE``.
  """
  shear = tf.cast(shear, tf.float32)
  _, cy = _centre(image)
  rows = tf.range(tf.shape(image)[0], dtype=tf.float32)
  return _resample_lines(image, shear * rows - shear * cy, axis=1)


def shear_y(image: tf.Tensor, shear: float | tf.Tensor) -> tf.Tensor:
  """Shears vertically about the centre column: column ``x`` reads from ``y + shear * (x - cx)``.

  Args:
    image: ``uint8 [height, width, 3]``.
    shear: scalar.

  Returns:
    ``uint8 [height, width, 3]``; uncovered pixels are ``FILL_VALUE``.
  """
  shear = tf.cast(shear, tf.float32)
  cx, _ = _centre(image)
  cols = tf.range(tf.shape(image)[1], dtype=tf.float32)
  return _resample_lines(image, shear * cols - shear * cx, axis=0)


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

_Op = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


def _signed(value: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  return tf.where(negate, -value, value)


def _scaled(magnitude: tf.Tensor, maximum: float) -> tf.Tensor:
  # Multiplying first keeps whole magnitudes exact (9 * 110 / 10 is 99, 110 * 0.9 is not).
  return magnitude * maximum / MAX_MAGNITUDE


def _enhance_factor(magnitude: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  return 1.0 + _signed(_scaled(magnitude, _MAX_ENHANCE_DELTA), negate)


def _translate_pixels(
  image: tf.Tensor, axis: int, magnitude: tf.Tensor, negate: tf.Tensor
) -> tf.Tensor:
  # Whole pixels: a fractional shift would also blur the image.
  size = tf.cast(tf.shape(image)[axis], tf.float32)
  return _signed(tf.floor(_scaled(magnitude, _MAX_TRANSLATE_FRACTION) * size + 0.5), negate)


# Each op takes (image, magnitude float32 scalar, negate bool scalar); unsigned ops ignore
# negate, argument-free ops both.
_OPS: dict[str, _Op] = {
  'AutoContrast': lambda image, m, neg: auto_contrast(image),
  'Equalize': lambda image, m, neg: equalize(image),
  'Invert': lambda image, m, neg: invert(image),
  'Rotate': lambda image, m, neg: rotate(image, _signed(_scaled(m, _MAX_ROTATE_DEGREES), neg)),
  'Posterize': lambda image, m, neg: posterize(
    image, 8 - tf.cast(tf.floor(_scaled(m, _MAX_POSTERIZE_BITS_REMOVED)), tf.int32)
  ),
  'Solarize': lambda image, m, neg: solarize(image, 256.0 - _scaled(m, 256.0)),
  'SolarizeAdd': lambda image, m, neg: solarize_add(
    image, tf.cast(tf.floor(_scaled(m, _MAX_SOLARIZE_ADD)), tf.int32)
  ),
  'Color': lambda image, m, neg: color(image, _enhance_factor(m, neg)),
  'Contrast': lambda image, m, neg: contrast(image, _enhance_factor(m, neg)),
  'Brightness': lambda image, m, neg: brightness(image, _enhance_factor(m, neg)),
  'Sharpness': lambda image, m, neg: sharpness(image, _enhance_factor(m, neg)),
  'ShearX': lambda image, m, neg: shear_x(image, _signed(_scaled(m, _MAX_SHEAR), neg)),
  'ShearY': lambda image, m, neg: shear_y(image, _signed(_scaled(m, _MAX_SHEAR), neg)),
  'TranslateX': lambda image, m, neg: translate_x(image, _translate_pixels(image, 1, m, neg)),
  'TranslateY': lambda image, m, neg: translate_y(image, _translate_pixels(image, 0, m, neg)),
  'Identity': lambda image, m, neg: image,
}

# The default list: the paper's ops without Identity (timm's RandAugment list).
OPS: tuple[str, ...] = tuple(name for name in _OPS if name != 'Identity')
# Every op name that ``ops=`` accepts.
ALL_OPS: tuple[str, ...] = tuple(_OPS)
# Ops whose argument takes a random sign.
SIGNED_OPS: tuple[str, ...] = (
  'Rotate',
  'Color',
  'Contrast',
  'Brightness',
  'Sharpness',
  'ShearX',
  'ShearY',
  'TranslateX',
  'TranslateY',
)


def _check_image(image: tf.Tensor) -> tf.Tensor:
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8 or image.shape.rank != 3 or image.shape[-1] not in (3, None):
    raise ValueError(
      f'Expected a uint8 image [height, width, 3], got {image.dtype.name} {image.shape}.'
    )
  return image


def apply_op(
  image: tf.Tensor,
  name: str,
  magnitude: float | tf.Tensor,
  *,
  negate: bool | tf.Tensor = False,
) -> tf.Tensor:
  """Applies one RandAugment op at a magnitude, with the arguments of the module docstring.

  Args:
    image: ``uint8 [height, width, 3]``.
    name: one of ``ALL_OPS``.
    magnitude: scalar on the 0..10 scale.
    negate: use the negative argument of a signed op (ignored by unsigned ops).

  Returns:
    ``uint8 [height, width, 3]``.
  """
  if name not in _OPS:
    raise ValueError(f'Unknown RandAugment op {name!r}; valid: {", ".join(ALL_OPS)}.')
  image = _check_image(image)
  magnitude = tf.cast(magnitude, tf.float32)
  return _OPS[name](image, magnitude, tf.cast(negate, tf.bool))


def rand_augment(
  image: tf.Tensor,
  key: tf.Tensor,
  *,
  num_layers: int,
  magnitude: float,
  magnitude_std: float = 0.0,
  ops: Sequence[str] = OPS,
) -> tf.Tensor:
  """RandAugment: ``num_layers`` ops drawn uniformly with replacement from ``ops``.

  Each layer draws, from ``key`` only: the op, the sign of its argument (probability 1/2
  each) and, if ``magnitude_std > 0``, its own magnitude ``N(magnitude, magnitude_std**2)``
  clipped to 0..10 (timm's ``mstd``).

  Args:
    image: ``uint8 [height, width, 3]``, any size; call it after cropping and resizing,
      before normalization (``FILL_VALUE`` is a grey level).
    key: stateless key, int32 or int64 ``[2]``.
    num_layers: ops applied in sequence (``n`` of ``rand-m9-n2``); 0 is the identity.
    magnitude: strength on the 0..10 scale (``m`` of ``rand-m9-n2``).
    magnitude_std: standard deviation of the per-layer magnitude; 0 keeps it fixed.
    ops: names from ``ALL_OPS`` to draw from.

  Returns:
    ``uint8 [height, width, 3]``, the shape of ``image``.
  """
  check_config(num_layers=num_layers, magnitude=magnitude, magnitude_std=magnitude_std, ops=ops)
  image = _check_image(image)
  if num_layers == 0:
    return image
  op_key, sign_key, magnitude_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
  indices = tf.random.stateless_uniform(
    [num_layers], op_key, minval=0, maxval=len(ops), dtype=tf.int32
  )
  negate = tf.random.stateless_uniform([num_layers], sign_key) < 0.5
  magnitudes = tf.fill([num_layers], tf.constant(magnitude, tf.float32))
  if magnitude_std > 0:
    noise = tf.random.stateless_normal([num_layers], magnitude_key)
    magnitudes = tf.clip_by_value(magnitudes + magnitude_std * noise, 0.0, MAX_MAGNITUDE)
  fns = [_OPS[name] for name in ops]
  shape = image.shape
  for layer in range(num_layers):
    branches = [
      lambda fn=fn, x=image, m=magnitudes[layer], neg=negate[layer]: fn(x, m, neg) for fn in fns
    ]
    image = tf.ensure_shape(tf.switch_case(indices[layer], branches), shape)
  return image


# Mixup and CutMix.


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
  check_config(
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


# Configuration.


def check_config(
  *,
  num_layers: int = 0,
  magnitude: float = 0.0,
  magnitude_std: float = 0.0,
  ops: Sequence[str] = OPS,
  mixup_alpha: float = 0.0,
  cutmix_alpha: float = 0.0,
  prob: float = 1.0,
  switch_prob: float = 0.5,
  prefix: str = '',
) -> None:
  """Raises ``ValueError`` naming the first augmentation setting out of its valid range.

  The ranges of :func:`gsa_flax.data.augment_config.check_config` (which start-up validation
  runs without TensorFlow), plus the op names.

  Args:
    num_layers: RandAugment ops per image; an int >= 0 (0 turns RandAugment off).
    magnitude: RandAugment magnitude in 0..10.
    magnitude_std: standard deviation of the magnitude, >= 0.
    ops: RandAugment op names, a non-empty sequence from ``ALL_OPS``.
    mixup_alpha: >= 0 (0 turns Mixup off).
    cutmix_alpha: >= 0 (0 turns CutMix off).
    prob: probability of mixing a batch, in 0..1.
    switch_prob: probability of CutMix over Mixup, in 0..1.
    prefix: put before each name in the message (e.g. ``'config.augment.'``), so that it
      names the config field.

  Raises:
    ValueError: the message names the field, its value and the valid range.
  """
  augment_config.check_config(
    num_layers=num_layers,
    magnitude=magnitude,
    magnitude_std=magnitude_std,
    mixup_alpha=mixup_alpha,
    cutmix_alpha=cutmix_alpha,
    prob=prob,
    switch_prob=switch_prob,
    prefix=prefix,
  )
  if isinstance(ops, str) or len(ops) == 0 or not all(name in _OPS for name in ops):
    raise ValueError(
      f'{prefix}ops={ops!r} is invalid: a non-empty sequence of op names from: '
      f'{", ".join(ALL_OPS)}.'
    )

"""RandAugment as pure, deterministic TensorFlow functions: which op, at which strength.

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
bilinearly (the weights of ``ImageProjectiveTransformV3``'s bilinear mode) and fill
uncovered pixels with ``image_ops.FILL_VALUE`` (mid grey). The colour ops follow PIL's
``ImageOps``/``ImageEnhance`` definitions but round to the nearest grey level where PIL
truncates. Most ops run XLA-compiled (:data:`COMPILED_OPS`).

The ops themselves are :mod:`gsa_flax.data.image_ops`; Mixup and CutMix, which act on a
batch, are :mod:`gsa_flax.data.mixing`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from gsa_flax.data import augment_config, image_ops

MAX_MAGNITUDE = augment_config.MAX_MAGNITUDE
# Op arguments at MAX_MAGNITUDE (see the module docstring for the whole mapping).
_MAX_ROTATE_DEGREES = 30.0
_MAX_POSTERIZE_BITS_REMOVED = 4
_MAX_SOLARIZE_ADD = 110
_MAX_ENHANCE_DELTA = 0.9
_MAX_SHEAR = 0.3
_MAX_TRANSLATE_FRACTION = 0.45


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
  'AutoContrast': lambda image, m, neg: image_ops.auto_contrast(image),
  'Equalize': lambda image, m, neg: image_ops.equalize(image),
  'Invert': lambda image, m, neg: image_ops.invert(image),
  'Rotate': lambda image, m, neg: image_ops.rotate(
    image, _signed(_scaled(m, _MAX_ROTATE_DEGREES), neg)
  ),
  'Posterize': lambda image, m, neg: image_ops.posterize(
    image, 8 - tf.cast(tf.floor(_scaled(m, _MAX_POSTERIZE_BITS_REMOVED)), tf.int32)
  ),
  'Solarize': lambda image, m, neg: image_ops.solarize(image, 256.0 - _scaled(m, 256.0)),
  'SolarizeAdd': lambda image, m, neg: image_ops.solarize_add(
    image, tf.cast(tf.floor(_scaled(m, _MAX_SOLARIZE_ADD)), tf.int32)
  ),
  'Color': lambda image, m, neg: image_ops.color(image, _enhance_factor(m, neg)),
  'Contrast': lambda image, m, neg: image_ops.contrast(image, _enhance_factor(m, neg)),
  'Brightness': lambda image, m, neg: image_ops.brightness(image, _enhance_factor(m, neg)),
  'Sharpness': lambda image, m, neg: image_ops.sharpness(image, _enhance_factor(m, neg)),
  'ShearX': lambda image, m, neg: image_ops.shear_x(image, _signed(_scaled(m, _MAX_SHEAR), neg)),
  'ShearY': lambda image, m, neg: image_ops.shear_y(image, _signed(_scaled(m, _MAX_SHEAR), neg)),
  'TranslateX': lambda image, m, neg: image_ops.translate_x(
    image, _translate_pixels(image, 1, m, neg)
  ),
  'TranslateY': lambda image, m, neg: image_ops.translate_y(
    image, _translate_pixels(image, 0, m, neg)
  ),
  'Identity': lambda image, m, neg: image,
}

# Ops that run XLA-compiled (``tf.function(jit_compile=True)``, one executable per image
# shape): XLA fuses their elementwise arithmetic, gathers and histogram into a few passes
# where TensorFlow's kernels make one pass per op: 1.3-3.5x less CPU per image at 224x224
# (``benchmarks/augment_ops.py``). The others measured no faster compiled (Brightness,
# Posterize, Invert), much slower (Sharpness: XLA's CPU depthwise convolution), or would
# compile once per magnitude (TranslateX/Y: their padding depends on it, and XLA needs
# padding known when it compiles).
# No compiled op may size anything from pixel values (Equalize's histogram has a fixed
# size): XLA would compile it again for every image.
# Compiled, an op can differ from its TensorFlow run by one grey level on a few pixels in
# 100,000 (fused multiply-adds round once); a run gives the same bits every time.
COMPILED_OPS: tuple[str, ...] = (
  'AutoContrast',
  'Equalize',
  'Rotate',
  'Solarize',
  'SolarizeAdd',
  'Color',
  'Contrast',
  'ShearX',
  'ShearY',
)
for _name in COMPILED_OPS:
  _OPS[_name] = tf.function(_OPS[_name], jit_compile=True, reduce_retracing=True)

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
      before normalization (``image_ops.FILL_VALUE`` is a grey level).
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

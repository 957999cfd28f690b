"""gsa_flax.data.augment against independent references.

Colour ops: PIL's ``ImageOps``/``ImageEnhance``. Geometric ops: numpy closed forms (pixel
shifts, ``np.rot90``) and PIL's bilinear resampler. Mixing: the closed form of Mixup and
pixel counts for CutMix. Op selection, signs and Beta draws: counts over many keys. Images
and keys are fresh random draws; the expected values come from the documented ranges.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from helpers import environment
from PIL import Image, ImageEnhance, ImageOps
from scipy import stats

from configs import default, imagenet, imagenet_strong
from gsa_flax.data import augment, augment_config, image_ops, mixing

FILL = 128  # The documented fill of the geometric ops.
SIZES = [(16, 16), (32, 32), (20, 36)]
# Odd and non-square: catches transposed axes and off-by-one centres.
HEIGHT, WIDTH = 23, 31


def _image(rng, height=HEIGHT, width=WIDTH, low=0, high=256) -> np.ndarray:
  return rng.integers(low, high, (height, width, 3), dtype=np.uint8)


def _keys(rng, count: int) -> np.ndarray:
  return rng.integers(0, 2**62, (count, 2), dtype=np.int64)


def _numpy(image) -> np.ndarray:
  return np.asarray(image).astype(np.int64)


def _map_keys(keys: np.ndarray, fn) -> list:
  """``fn(key)`` for every key, inside a ``tf.data`` map (graph mode)."""
  ds = tf.data.Dataset.from_tensor_slices(keys).map(fn)
  return list(ds.batch(len(keys)).as_numpy_iterator())[0]


def _enhance_factor(magnitude: float, negate: bool) -> float:
  delta = 0.9 * magnitude / 10
  return 1 - delta if negate else 1 + delta


# RandAugment as a whole.


@pytest.mark.parametrize('size', SIZES)
def test_rand_augment_keeps_shape_and_dtype(size):
  rng = np.random.default_rng(101)
  image = _image(rng, *size)
  for num_layers, key in zip((0, 1, 3), _keys(rng, 3), strict=True):
    out = augment.rand_augment(image, key, num_layers=num_layers, magnitude=9, magnitude_std=0.5)
    assert out.dtype == tf.uint8
    assert out.shape == (*size, 3)
  # In a tf.data map the static shape survives (the model needs it).
  ds = tf.data.Dataset.from_tensor_slices(_keys(rng, 2)).map(
    lambda key: augment.rand_augment(image, key, num_layers=2, magnitude=9)
  )
  assert ds.element_spec.shape == (*size, 3)
  assert ds.element_spec.dtype == tf.uint8


def test_rand_augment_is_a_function_of_the_key():
  rng = np.random.default_rng(102)
  image = _image(rng, 16, 20)
  keys = _keys(rng, 24)
  kwargs = dict(num_layers=2, magnitude=9, magnitude_std=0.5)
  eager = np.stack([augment.rand_augment(image, key, **kwargs).numpy() for key in keys])
  again = augment.rand_augment(image, keys[3], **kwargs).numpy()
  np.testing.assert_array_equal(again, eager[3])
  # 15 ops x 2 signs x jittered magnitudes per layer: 24 keys give mostly distinct images.
  assert len({out.tobytes() for out in eager}) >= 12
  mapped = _map_keys(keys, lambda key: augment.rand_augment(image, key, **kwargs))
  np.testing.assert_array_equal(mapped, eager)


def test_rand_augment_applies_num_layers_ops_in_sequence():
  rng = np.random.default_rng(103)
  image = _image(rng)
  for num_layers, key in zip((1, 2, 3), _keys(rng, 3), strict=True):
    out = augment.rand_augment(image, key, num_layers=num_layers, magnitude=5, ops=('Invert',))
    want = 255 - image if num_layers % 2 else image
    np.testing.assert_array_equal(out, want)


def test_rand_augment_draws_ops_uniformly_and_signs_evenly():
  rng = np.random.default_rng(104)
  # Away from 0 and 255 so that AutoContrast changes the image.
  image = _image(rng, 12, 14, low=20, high=231)
  magnitude = 9.0
  # Identify the op of each draw by its output.
  signs = {name: (False, True) if name in augment.SIGNED_OPS else (False,) for name in augment.OPS}
  outcome = {
    augment.apply_op(image, name, magnitude, negate=negate).numpy().tobytes(): (name, negate)
    for name in augment.OPS
    for negate in signs[name]
  }
  assert len(outcome) == sum(len(s) for s in signs.values()), 'ambiguous test image'
  count = 3000
  outs = _map_keys(
    _keys(rng, count),
    lambda key: augment.rand_augment(image, key, num_layers=1, magnitude=magnitude),
  )
  drawn = [outcome[out.tobytes()] for out in outs]
  per_op = np.array([sum(name == op for name, _ in drawn) for op in augment.OPS])
  # Chi-square against uniform: a false alarm once in a million runs.
  chi2 = ((per_op - count / len(per_op)) ** 2 / (count / len(per_op))).sum()
  assert chi2 < stats.chi2.isf(1e-6, df=len(per_op) - 1), per_op
  negated = [negate for name, negate in drawn if name in augment.SIGNED_OPS]
  # ~1800 signed draws: 0.5 +- 0.012 (one sd); the bound is 6 sd.
  assert abs(np.mean(negated) - 0.5) < 0.07


def test_rand_augment_magnitude_jitter_is_gaussian_and_clipped():
  rng = np.random.default_rng(105)
  # Brightness of a constant 100 image is 100 * (1 +- 0.9 m / 10): m is readable to 0.06.
  image = np.full((4, 5, 3), 100, np.uint8)

  def magnitudes(magnitude, std, count):
    outs = _map_keys(
      _keys(rng, count),
      lambda key: augment.rand_augment(
        image, key, num_layers=1, magnitude=magnitude, magnitude_std=std, ops=('Brightness',)
      ),
    )
    return np.abs(outs[:, 0, 0, 0].astype(np.float64) - 100) / 90 * 10

  fixed = magnitudes(5.0, 0.0, 50)
  np.testing.assert_allclose(fixed, 5.0, atol=0.06)
  jittered = magnitudes(5.0, 2.0, 1500)
  # N(5, 2) clipped at 0 and 10 (2.5 sd away): mean 5, sd ~1.95; sampling error ~0.05.
  assert abs(jittered.mean() - 5.0) < 0.3
  assert 1.6 < jittered.std() < 2.3
  clipped = magnitudes(8.0, 2.0, 600)
  assert clipped.max() <= 10 + 0.06
  # P(N(8, 2) > 10) = 16%: about 95 of 600 land exactly on 10.
  assert 40 < np.sum(clipped > 10 - 0.06) < 160


# Each op at a fixed magnitude.

# PIL truncates (``int(v)``) in ``Image.blend`` and in autocontrast's table where this module
# rounds half up, from the same exact degenerate image (same fixed-point luma, mean rounded
# half up, smoothing rounded), so ours - PIL is 0 or 1 grey level, never anything else.
_PIL_TRUNCATES = (0, 1)
_PIL_EXACT = (0, 0)

_PIL_REFERENCES = {
  'AutoContrast': (lambda pil, m, neg: ImageOps.autocontrast(pil), _PIL_TRUNCATES),
  'Equalize': (lambda pil, m, neg: ImageOps.equalize(pil), _PIL_EXACT),
  'Invert': (lambda pil, m, neg: ImageOps.invert(pil), _PIL_EXACT),
  # Keeps 8 - floor(4 m / 10) bits.
  'Posterize': (
    lambda pil, m, neg: ImageOps.posterize(pil, 8 - math.floor(4 * m / 10)),
    _PIL_EXACT,
  ),
  # Inverts values >= 256 (1 - m / 10); PIL inverts values >= its integer threshold.
  'Solarize': (
    lambda pil, m, neg: ImageOps.solarize(pil, math.ceil(256 * (1 - m / 10))),
    _PIL_EXACT,
  ),
  'Color': (
    lambda pil, m, neg: ImageEnhance.Color(pil).enhance(_enhance_factor(m, neg)),
    _PIL_TRUNCATES,
  ),
  'Contrast': (
    lambda pil, m, neg: ImageEnhance.Contrast(pil).enhance(_enhance_factor(m, neg)),
    _PIL_TRUNCATES,
  ),
  'Brightness': (
    lambda pil, m, neg: ImageEnhance.Brightness(pil).enhance(_enhance_factor(m, neg)),
    _PIL_TRUNCATES,
  ),
  'Sharpness': (
    lambda pil, m, neg: ImageEnhance.Sharpness(pil).enhance(_enhance_factor(m, neg)),
    _PIL_TRUNCATES,
  ),
}


@pytest.mark.parametrize('name', list(_PIL_REFERENCES))
def test_colour_op_matches_pil(name):
  rng = np.random.default_rng(106)
  reference, (low, high) = _PIL_REFERENCES[name]
  # Away from 0 and 255 so that AutoContrast has something to stretch.
  image = _image(rng, low=20, high=231)
  for magnitude in (3.0, 9.0):
    for negate in (False, True):
      got = _numpy(augment.apply_op(image, name, magnitude, negate=negate))
      want = _numpy(reference(Image.fromarray(image), magnitude, negate))
      difference = got - want
      assert low <= difference.min() and difference.max() <= high, (magnitude, negate)


@pytest.mark.parametrize(
  'op, enhancer',
  [
    (image_ops.color, ImageEnhance.Color),
    (image_ops.contrast, ImageEnhance.Contrast),
    (image_ops.brightness, ImageEnhance.Brightness),
    (image_ops.sharpness, ImageEnhance.Sharpness),
  ],
)
def test_enhance_ops_at_factor_zero_are_pils_degenerate_images_exactly(op, enhancer):
  # At factor 0 PIL returns its degenerate image untouched (grey, mean grey, black,
  # smoothed), so nothing is truncated and the two must agree to the grey level.
  rng = np.random.default_rng(107)
  image = _image(rng)
  want = enhancer(Image.fromarray(image)).enhance(0.0)
  np.testing.assert_array_equal(op(image, 0.0), np.asarray(want))


def test_solarize_add_closed_form():
  rng = np.random.default_rng(108)
  image = _image(rng)
  for magnitude in (3.0, 9.0):
    addition = math.floor(110 * magnitude / 10)
    x = image.astype(np.int64)
    want = np.where(x < 128, np.minimum(x + addition, 255), x)
    np.testing.assert_array_equal(augment.apply_op(image, 'SolarizeAdd', magnitude), want)


def _shifted(image: np.ndarray, down: int, right: int) -> np.ndarray:
  """Content moved by whole pixels, uncovered pixels FILL."""
  height, width, _ = image.shape
  out = np.full_like(image, FILL)
  rows_out = slice(max(down, 0), height + min(down, 0))
  rows_in = slice(max(-down, 0), height - max(down, 0))
  cols_out = slice(max(right, 0), width + min(right, 0))
  cols_in = slice(max(-right, 0), width - max(right, 0))
  out[rows_out, cols_out] = image[rows_in, cols_in]
  return out


# Magnitudes whose shifts 0.45 m / 10 * size are not ties (31 and 23 pixels: 8.37, 6.21 at
# m = 6; 12.56, 9.32 at m = 9).
@pytest.mark.parametrize('magnitude', [6.0, 9.0])
def test_translate_is_an_exact_shift_with_fill(magnitude):
  rng = np.random.default_rng(109)
  image = _image(rng)
  right = round(0.45 * magnitude / 10 * WIDTH)
  down = round(0.45 * magnitude / 10 * HEIGHT)
  for negate, sign in ((False, 1), (True, -1)):
    got_x = augment.apply_op(image, 'TranslateX', magnitude, negate=negate)
    np.testing.assert_array_equal(got_x, _shifted(image, 0, sign * right))
    got_y = augment.apply_op(image, 'TranslateY', magnitude, negate=negate)
    np.testing.assert_array_equal(got_y, _shifted(image, sign * down, 0))


@pytest.mark.parametrize('pixels', [2.5, -3.25])
def test_fractional_translation_is_bilinear_along_one_axis(pixels):
  """Between whole pixels: each output pixel interpolates its two source neighbours (the fill
  outside the image), rounded half up; the closed form in float64."""
  rng = np.random.default_rng(110)
  image = _image(rng)
  padded = np.full((HEIGHT + 2, WIDTH + 2, 3), FILL, np.float64)
  padded[1:-1, 1:-1] = image
  whole, fraction = math.floor(pixels), pixels - math.floor(pixels)

  def column(index):  # input columns, the fill beyond the border
    return padded[1:-1, np.clip(index, -1, WIDTH) + 1]

  # The source of output column x is x - pixels, between columns x - whole - 1 and x -
  # whole, at 1 - fraction from the first.
  x = np.arange(WIDTH)
  want = fraction * column(x - whole - 1) + (1 - fraction) * column(x - whole)
  want = np.floor(want + 0.5).astype(np.uint8)
  np.testing.assert_array_equal(image_ops.translate_x(image, pixels), want)
  np.testing.assert_array_equal(
    image_ops.translate_y(np.transpose(image, (1, 0, 2)), pixels), np.transpose(want, (1, 0, 2))
  )


def test_rotate_by_right_angles_is_exact():
  rng = np.random.default_rng(111)
  square = _image(rng, 17, 17)
  # Positive angles turn the displayed image counterclockwise, as np.rot90 does.
  np.testing.assert_array_equal(image_ops.rotate(square, 90.0), np.rot90(square, 1))
  np.testing.assert_array_equal(image_ops.rotate(square, -90.0), np.rot90(square, -1))
  image = _image(rng, 16, 20)
  np.testing.assert_array_equal(image_ops.rotate(image, 180.0), image[::-1, ::-1])


def _check_resampled(got: np.ndarray, want: np.ndarray, source_x, source_y) -> None:
  """Compares where both resamplers read only real pixels, and the fill far outside.

  Where the source point lies in the image's pixel grid (with a margin for float error),
  both interpolate the same four pixels: PIL truncates, this module rounds half up, so ours
  - PIL is 0 or 1. Near the border the two treat the outside differently (PIL clamps
  neighbours), so only points more than a pixel outside are checked: fill there.
  """
  height, width, _ = got.shape
  margin = 1e-3
  inside = (
    (source_x >= margin)
    & (source_x <= width - 1 - margin)
    & (source_y >= margin)
    & (source_y <= height - 1 - margin)
  )
  difference = _numpy(got)[inside] - _numpy(want)[inside]
  assert inside.sum() > got.shape[0] * got.shape[1] // 3
  assert difference.min() >= 0 and difference.max() <= 1
  far = (source_x < -1) | (source_x > width) | (source_y < -1) | (source_y > height)
  np.testing.assert_array_equal(got[far], FILL)


@pytest.mark.parametrize('negate', [False, True])
def test_rotate_matches_pil(negate):
  rng = np.random.default_rng(112)
  image = _image(rng)
  magnitude = 9.0
  degrees = (-1 if negate else 1) * 30 * magnitude / 10
  got = augment.apply_op(image, 'Rotate', magnitude, negate=negate).numpy()
  # PIL rotates counterclockwise about the image centre, bilinear.
  want = Image.fromarray(image).rotate(degrees, Image.Resampling.BILINEAR, fillcolor=(FILL,) * 3)
  y, x = np.mgrid[:HEIGHT, :WIDTH].astype(np.float64)
  cx, cy, theta = (WIDTH - 1) / 2, (HEIGHT - 1) / 2, math.radians(degrees)
  # Source of each output pixel: the output point rotated back (clockwise on screen).
  source_x = cx + math.cos(theta) * (x - cx) - math.sin(theta) * (y - cy)
  source_y = cy + math.sin(theta) * (x - cx) + math.cos(theta) * (y - cy)
  _check_resampled(got, np.asarray(want), source_x, source_y)


@pytest.mark.parametrize('negate', [False, True])
def test_shear_matches_pil(negate):
  rng = np.random.default_rng(113)
  image = _image(rng)
  magnitude = 9.0
  shear = (-1 if negate else 1) * 0.3 * magnitude / 10
  y, x = np.mgrid[:HEIGHT, :WIDTH].astype(np.float64)
  cx, cy = (WIDTH - 1) / 2, (HEIGHT - 1) / 2
  pil = Image.fromarray(image)
  # PIL's affine data maps output to input in continuous coordinates (pixel centres at
  # +0.5), where the centre row/column is at HEIGHT / 2, WIDTH / 2.
  got = augment.apply_op(image, 'ShearX', magnitude, negate=negate).numpy()
  want = pil.transform(
    pil.size,
    Image.Transform.AFFINE,
    (1, shear, -shear * HEIGHT / 2, 0, 1, 0),
    Image.Resampling.BILINEAR,
    fillcolor=(FILL,) * 3,
  )
  _check_resampled(got, np.asarray(want), x + shear * (y - cy), y)
  got = augment.apply_op(image, 'ShearY', magnitude, negate=negate).numpy()
  want = pil.transform(
    pil.size,
    Image.Transform.AFFINE,
    (1, 0, 0, shear, 1, -shear * WIDTH / 2),
    Image.Resampling.BILINEAR,
    fillcolor=(FILL,) * 3,
  )
  _check_resampled(got, np.asarray(want), x, y + shear * (x - cx))


def test_ops_with_an_argument_are_the_identity_at_magnitude_zero():
  rng = np.random.default_rng(114)
  image = _image(rng)
  no_argument = ('AutoContrast', 'Equalize', 'Invert')
  for name in augment.ALL_OPS:
    if name in no_argument:
      continue
    for negate in (False, True):
      np.testing.assert_array_equal(augment.apply_op(image, name, 0.0, negate=negate), image)
  np.testing.assert_array_equal(image_ops.shear_x(image, 0.0), image)
  np.testing.assert_array_equal(image_ops.shear_y(image, 0.0), image)


def test_rand_augment_rejects_a_float_image_and_unknown_ops():
  image = np.zeros((8, 8, 3), np.uint8)
  key = np.array([1, 2], np.int64)
  with pytest.raises(ValueError, match='uint8'):
    augment.rand_augment(image.astype(np.float32), key, num_layers=2, magnitude=9)
  with pytest.raises(ValueError, match='Unknown RandAugment op'):
    augment.apply_op(image, 'Flip', 9.0)


# Mixup and CutMix.


def _batch(rng, batch=6, height=8, width=12):
  images = rng.standard_normal((batch, height, width, 3)).astype(np.float32)
  labels = rng.integers(0, 1000, batch).astype(np.int32)
  return images, labels


def _constant_batch(rng, batch=4, height=10, width=14):
  """Example i is the constant value[i], all distinct: every pixel tells its source."""
  values = rng.permutation(np.arange(1, 200))[:batch].astype(np.float32)
  images = np.broadcast_to(values[:, None, None, None], (batch, height, width, 3)).copy()
  labels = rng.permutation(np.arange(1000))[:batch].astype(np.int32)
  return images, labels, values


@pytest.mark.parametrize('batch', [5, 6])
def test_mixup_is_the_convex_combination_with_the_reversed_batch(batch):
  rng = np.random.default_rng(115)
  images, labels = _batch(rng, batch)
  for key in _keys(rng, 4):
    out = mixing.mix_batch(images, labels, key, mixup_alpha=0.4, cutmix_alpha=0.0)
    assert sorted(out) == ['image', 'label', 'mix_label', 'mix_weight']
    weight = out['mix_weight'].numpy()
    assert weight.dtype == np.float32 and weight.shape == (batch,)
    assert np.all(weight == weight[0]) and 0 <= weight[0] <= 1
    w = weight[0]
    for i in range(batch):
      # The same float32 operations, so equal to the bit.
      want = w * images[i] + (np.float32(1) - w) * images[batch - 1 - i]
      np.testing.assert_array_equal(out['image'][i], want)
      assert out['mix_label'][i] == labels[batch - 1 - i]
    np.testing.assert_array_equal(out['label'], labels)
    assert out['image'].dtype == tf.float32 and out['mix_label'].dtype == tf.int32


def _cutmix_box(out, values: np.ndarray) -> np.ndarray:
  """Checks every pixel comes from the example or its partner; returns the pasted mask."""
  mixed = np.asarray(out['image'])
  pasted = np.all(mixed == values[::-1, None, None, None], axis=-1)
  kept = np.all(mixed == values[:, None, None, None], axis=-1)
  assert np.all(pasted | kept)
  # One box for the whole batch.
  assert all(np.array_equal(mask, pasted[0]) for mask in pasted)
  return pasted[0]


def test_cutmix_pastes_one_rectangle_and_weights_by_the_pixels_kept():
  rng = np.random.default_rng(116)
  images, labels, values = _constant_batch(rng)
  height, width = images.shape[1:3]
  partial = 0
  for key in _keys(rng, 16):
    out = mixing.mix_batch(images, labels, key, mixup_alpha=0.0, cutmix_alpha=1.0)
    box = _cutmix_box(out, values)
    rows, cols = np.nonzero(box)
    if rows.size:
      # A rectangle: the pasted set fills its bounding box.
      assert box.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
      partial += rows.size < height * width
    kept_fraction = 1 - box.sum() / (height * width)
    np.testing.assert_allclose(out['mix_weight'], kept_fraction, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out['mix_label'], labels[::-1])
    np.testing.assert_array_equal(out['label'], labels)
  # lam ~ U(0, 1): almost every key pastes a box smaller than the image.
  assert partial >= 8


def test_switch_prob_chooses_between_mixup_and_cutmix():
  rng = np.random.default_rng(117)
  images, labels, values = _constant_batch(rng, batch=2, height=6, width=7)

  def cutmix_fraction(switch_prob: float, count: int) -> float:
    outs = _map_keys(
      _keys(rng, count),
      lambda key: mixing.mix_batch(
        images, labels, key, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob
      )['image'],
    )
    # CutMix leaves only the two source values; Mixup (0 < lam < 1) blends them.
    sources = np.isin(outs, values)
    assert np.all(sources.all(axis=(1, 2, 3, 4)) | ~sources.any(axis=(1, 2, 3, 4)))
    return sources.all(axis=(1, 2, 3, 4)).mean()

  assert cutmix_fraction(0.0, 50) == 0.0
  assert cutmix_fraction(1.0, 50) == 1.0
  # 400 draws: 0.5 +- 0.025 (one sd).
  assert 0.35 < cutmix_fraction(0.5, 400) < 0.65


def test_prob_sets_how_often_a_batch_is_mixed():
  rng = np.random.default_rng(118)
  images, labels = _batch(rng, 4, 5, 6)

  def mix(prob: float, count: int, cutmix_alpha: float) -> dict[str, np.ndarray]:
    return _map_keys(
      _keys(rng, count),
      lambda key: mixing.mix_batch(
        images, labels, key, mixup_alpha=1.0, cutmix_alpha=cutmix_alpha, prob=prob
      ),
    )

  # prob 0: no batch mixed by either method; own labels at weight 1.
  never = mix(0.0, 100, cutmix_alpha=1.0)
  np.testing.assert_array_equal(never['image'], np.broadcast_to(images, never['image'].shape))
  np.testing.assert_array_equal(never['mix_label'], np.broadcast_to(labels, (100, 4)))
  np.testing.assert_array_equal(never['mix_weight'], 1.0)
  # Mixup only: a mixed batch (0 < lam < 1) always differs from the input and carries the
  # reversed labels.
  for prob, count, low, high in ((1.0, 100, 1.0, 1.0), (0.5, 400, 0.35, 0.65)):
    outs = mix(prob, count, cutmix_alpha=0.0)
    mixed = np.any(outs['image'] != images, axis=(1, 2, 3, 4))
    assert low <= mixed.mean() <= high
    np.testing.assert_array_equal(
      outs['mix_label'][mixed], np.broadcast_to(labels[::-1], (mixed.sum(), 4))
    )
    np.testing.assert_array_equal(
      outs['mix_label'][~mixed], np.broadcast_to(labels, ((~mixed).sum(), 4))
    )
    np.testing.assert_array_equal(outs['mix_weight'][~mixed], 1.0)


def test_both_alphas_zero_is_the_identity():
  rng = np.random.default_rng(119)
  images, labels = _batch(rng)
  out = mixing.mix_batch(images, labels, _keys(rng, 1)[0], mixup_alpha=0.0, cutmix_alpha=0.0)
  assert sorted(out) == ['image', 'label', 'mix_label', 'mix_weight']
  np.testing.assert_array_equal(out['image'], images)
  np.testing.assert_array_equal(out['label'], labels)
  np.testing.assert_array_equal(out['mix_label'], labels)
  np.testing.assert_array_equal(out['mix_weight'], np.ones(len(labels), np.float32))


@pytest.mark.parametrize('alpha', [1.0, 0.2])
def test_mixup_lam_is_beta_distributed(alpha):
  rng = np.random.default_rng(120)
  images, labels = _batch(rng, 2, 1, 1)
  count = 2000
  weights = _map_keys(
    _keys(rng, count),
    lambda key: mixing.mix_batch(images, labels, key, mixup_alpha=alpha, cutmix_alpha=0.0)[
      'mix_weight'
    ][0],
  )
  assert np.all((weights >= 0) & (weights <= 1))
  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); sd of the mean <= 0.01 here.
  assert abs(weights.mean() - 0.5) < 0.05
  assert abs(weights.var() - 1 / (4 * (2 * alpha + 1))) < 0.02
  # Kolmogorov-Smirnov against scipy's Beta: a false alarm once in a million runs.
  assert stats.kstest(weights, stats.beta(alpha, alpha).cdf).pvalue > 1e-6


def test_mix_batch_is_a_function_of_the_key():
  rng = np.random.default_rng(121)
  images, labels = _batch(rng)
  keys = _keys(rng, 16)
  kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8)
  eager = [mixing.mix_batch(images, labels, key, **kwargs) for key in keys]
  again = mixing.mix_batch(images, labels, keys[2], **kwargs)
  for name in again:
    np.testing.assert_array_equal(again[name], eager[2][name])
  # About 13 of 16 batches are mixed, each with its own lam.
  assert len({float(out['mix_weight'][0]) for out in eager}) >= 4
  mapped = _map_keys(keys, lambda key: mixing.mix_batch(images, labels, key, **kwargs))
  for i, out in enumerate(eager):
    for name in out:
      np.testing.assert_array_equal(mapped[name][i], out[name])


# Configuration.


def test_check_config_accepts_the_common_recipes():
  augment.check_config(num_layers=2, magnitude=9, magnitude_std=0.5)
  augment.check_config(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
  augment.check_config(num_layers=0, ops=(*augment.OPS, 'Identity'))


@pytest.mark.parametrize(
  'field, value',
  [
    ('num_layers', -1),
    ('num_layers', 1.5),
    ('num_layers', True),
    ('magnitude', -0.5),
    ('magnitude', 10.5),
    ('magnitude', float('nan')),
    ('magnitude_std', -1.0),
    ('ops', ('Rotate', 'Flip')),
    ('ops', ()),
    ('ops', 'Invert'),
    ('mixup_alpha', -0.1),
    ('cutmix_alpha', float('inf')),
    ('prob', 1.5),
    ('switch_prob', -0.1),
    ('switch_prob', '0.5'),
  ],
)
def test_check_config_names_the_bad_field(field, value):
  with pytest.raises(ValueError, match=rf'^config\.augment\.{field}=.*invalid'):
    augment.check_config(**{field: value}, prefix='config.augment.')
  with pytest.raises(ValueError, match=rf'^{field}='):
    if field in ('mixup_alpha', 'cutmix_alpha', 'prob', 'switch_prob'):
      kwargs = dict(mixup_alpha=1.0, cutmix_alpha=1.0)
      mixing.mix_batch(
        np.zeros((2, 4, 4, 3), np.float32),
        np.zeros(2, np.int32),
        np.zeros(2, np.int64),
        **{**kwargs, field: value},
      )
    else:
      augment.rand_augment(
        np.zeros((4, 4, 3), np.uint8),
        np.zeros(2, np.int64),
        **{'num_layers': 1, 'magnitude': 5.0, field: value},
      )


def test_augment_settings_are_checked_without_tensorflow():
  """Start-up validation checks config.augment before TensorFlow is imported."""
  program = (
    'import sys\n'
    'from gsa_flax.data import augment_config\n'
    'augment_config.check_config(num_layers=2, magnitude=9.0, mixup_alpha=0.2)\n'
    "assert 'tensorflow' not in sys.modules, 'augment_config imported TensorFlow'\n"
  )
  result = subprocess.run(
    [sys.executable, '-c', program], env=environment(devices=1), capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
  'field, value', [('num_layers', -1), ('magnitude', 12.0), ('prob', 2.0), ('cutmix_alpha', -1.0)]
)
def test_augment_dataclass_names_the_bad_field(field, value):
  with pytest.raises(ValueError, match=rf'^{field}={value!r} is invalid'):
    augment_config.Augment(**{field: value})
  with pytest.raises(ValueError, match=rf'^config\.augment\.{field}='):
    augment_config.check_config(**{field: value}, prefix='config.augment.')


@pytest.mark.parametrize(
  'module, rand_augment, mix',
  [(default, False, False), (imagenet, False, False), (imagenet_strong, True, True)],
)
def test_configs_build_their_augmentation(module, rand_augment, mix):
  settings = augment_config.Augment(**module.get_config().augment)
  assert settings.rand_augment == rand_augment and settings.mix == mix
  if module is imagenet_strong:  # rand-m9-n2, Mixup 0.2, CutMix 1.0
    assert (settings.num_layers, settings.magnitude) == (2, 9.0)
    assert (settings.mixup_alpha, settings.cutmix_alpha) == (0.2, 1.0)

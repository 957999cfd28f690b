"""The augmentation settings of a run and their valid ranges, without TensorFlow.

:class:`Augment` is what the input pipeline takes (``input_pipeline.create_train_iterator(...,
augment=Augment(**config.augment))``); :func:`check_config` is the range check that start-up
validation runs on ``config.augment`` before TensorFlow is imported. The ops themselves
(RandAugment, Mixup, CutMix) are TensorFlow functions in :mod:`gsa_flax.data.augment`, which
checks its arguments with this module too, so a range is stated once.
"""

from __future__ import annotations

import dataclasses
import math

# The top of RandAugment's magnitude scale (Cubuk et al. 2020: 0..10).
MAX_MAGNITUDE = 10.0


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(
  *,
  num_layers: int = 0,
  magnitude: float = 0.0,
  magnitude_std: float = 0.0,
  mixup_alpha: float = 0.0,
  cutmix_alpha: float = 0.0,
  prob: float = 1.0,
  switch_prob: float = 0.5,
  prefix: str = '',
) -> None:
  """Raises ``ValueError`` naming the first augmentation setting out of its valid range.

  Cheap, eager and TensorFlow-free: call it at start-up with the config's values
  (``check_config(**config.augment, prefix='config.augment.')``).

  Args:
    num_layers: RandAugment ops per image; an int >= 0 (0 turns RandAugment off).
    magnitude: RandAugment magnitude in 0..10.
    magnitude_std: standard deviation of the per-layer magnitude, >= 0.
    mixup_alpha: >= 0 (0 turns Mixup off).
    cutmix_alpha: >= 0 (0 turns CutMix off).
    prob: probability of mixing a batch, in 0..1.
    switch_prob: probability of CutMix over Mixup when both are on, in 0..1.
    prefix: put before each name in the message (e.g. ``'config.augment.'``), so that it
      names the config field.

  Raises:
    ValueError: the message names the field, its value and the valid range.
  """

  def require(ok: bool, name: str, value, valid: str) -> None:
    if not ok:
      raise ValueError(f'{prefix}{name}={value!r} is invalid: {valid}.')

  require(
    isinstance(num_layers, int) and not isinstance(num_layers, bool) and num_layers >= 0,
    'num_layers',
    num_layers,
    'an integer >= 0 (0 turns RandAugment off)',
  )
  require(
    _is_number(magnitude) and 0 <= magnitude <= MAX_MAGNITUDE,
    'magnitude',
    magnitude,
    f'a number in 0..{MAX_MAGNITUDE:g}',
  )
  require(
    _is_number(magnitude_std) and 0 <= magnitude_std < math.inf,
    'magnitude_std',
    magnitude_std,
    'a finite number >= 0 (0 keeps the magnitude fixed)',
  )
  for name, value in (('mixup_alpha', mixup_alpha), ('cutmix_alpha', cutmix_alpha)):
    require(
      _is_number(value) and 0 <= value < math.inf,
      name,
      value,
      'a finite number >= 0 (0 turns it off)',
    )
  for name, value in (('prob', prob), ('switch_prob', switch_prob)):
    require(_is_number(value) and 0 <= value <= 1, name, value, 'a probability in 0..1')


@dataclasses.dataclass(frozen=True)
class Augment:
  """Strong augmentation of the training batches; the default is off (no op, no mixing).

  The fields are those of ``config.augment`` (``configs/default.py``), so
  ``Augment(**config.augment)`` builds it; each is checked by :func:`check_config`.

  Attributes:
    num_layers: RandAugment ops per image (``n`` of ``rand-m9-n2``); 0 turns it off.
    magnitude: RandAugment strength on the 0..10 scale (``m`` of ``rand-m9-n2``).
    magnitude_std: standard deviation of each layer's magnitude (timm's ``mstd``); 0 fixes it.
    mixup_alpha: Beta parameter of Mixup (Zhang et al. 2018); 0 turns Mixup off.
    cutmix_alpha: Beta parameter of CutMix (Yun et al. 2019); 0 turns CutMix off.
    prob: probability that a batch is mixed, when either alpha is > 0.
    switch_prob: probability of CutMix rather than Mixup when both alphas are > 0.
  """

  num_layers: int = 0
  magnitude: float = 0.0
  magnitude_std: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0
  switch_prob: float = 0.5

  def __post_init__(self):
    check_config(**dataclasses.asdict(self))

  @property
  def rand_augment(self) -> bool:
    """Whether RandAugment is applied to each training image."""
    return self.num_layers > 0

  @property
  def mix(self) -> bool:
    """Whether batches go through Mixup/CutMix (and carry ``mix_label``, ``mix_weight``)."""
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

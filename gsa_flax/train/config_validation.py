"""Checks a whole config at start-up, before any data is read or anything compiled.

Each problem is one :class:`ConfigError` naming the field, the bad value and what would be
accepted, so a typo costs seconds rather than a compile and a crash an hour later.

:data:`FIELDS` gives the type and the accepted values of every field that
``configs/default.py`` defines; :func:`check_fields` checks them one by one (present, of
the right type, finite, in range) and :func:`validate` adds what depends on several fields
and on the devices. A ``config.json`` read back from a workdir is checked the same way
(:func:`validate_record`). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from gsa_flax import errors
from gsa_flax.data import augment_config, datasets
from gsa_flax.model import layers, networks
from gsa_flax.train import workdir

DTYPES = ('float32', 'bfloat16', 'float16')
# jax.random.key keeps the low 32 bits of a larger seed: 2**32 and 0 would be the same run.
SEED_LIMIT = 2**32
# The train state counts steps in an int32: a run longer than this could never end (and
# its cosine would never decay).
MAX_STEPS = 2**31 - 1


class ConfigError(errors.UserError):
  """A config field has a value the run cannot use."""


@dataclasses.dataclass(frozen=True)
class Field:
  """The type and the accepted values of one config field.

  Attributes:
    kind: ``bool``, ``int``, ``float`` (an int is accepted; NaN and inf are not), ``str``
      or ``tuple`` (a JSON list is accepted).
    expected: what is accepted, for the message (``'a finite number > 0'``).
    accepts: whether a value of the right kind is accepted.
    trained: whether the field changes what is trained (the network, the data, the batches,
      the schedule, the seed). A restarted run may change the others freely; a
      ``config.json`` read back may lack them.
    before: for a field added after the first runs, the value that gives what runs did
      before it existed (its "off"); a ``config.json`` without the field takes it. ``None``:
      the field has always existed, and a record without it is damaged.
  """

  kind: type
  expected: str
  accepts: Callable[[Any], bool] = lambda value: True
  trained: bool = True
  before: Any = None


def _since(field: Field, before: Any) -> Field:
  """``field``, added after the first runs; a record without it trained as with ``before``."""
  return dataclasses.replace(field, before=before)


_KINDS = {int: 'an int', float: 'a finite number'}


def _choice(options) -> Field:
  return Field(str, f'one of {", ".join(map(repr, options))}', lambda value: value in options)


def _at_least(low, kind: type = int, *, trained: bool = True) -> Field:
  return Field(kind, f'{_KINDS[kind]} >= {low}', lambda value: value >= low, trained)


def _positive(kind: type = int, *, trained: bool = True) -> Field:
  return Field(kind, f'{_KINDS[kind]} > 0', lambda value: value > 0, trained)


def _fraction(closed_top: bool = False) -> Field:
  if closed_top:
    return Field(float, 'a number in (0, 1]', lambda value: 0 < value <= 1)
  return Field(float, 'a number in [0, 1)', lambda value: 0 <= value < 1)


_BOOL = Field(bool, 'True or False')
# Fields that do not change what is trained.
_FREE_BOOL = Field(bool, 'True or False', trained=False)
_FREE_STRING = Field(str, 'a string', trained=False)
_FREE_COUNT = _at_least(0, trained=False)
_FREE_EPOCHS = _at_least(0, float, trained=False)

# Every field of configs/default.py, by dotted name.
FIELDS: dict[str, Field] = {
  # Model.
  'model': _choice(networks.MODELS),
  'stage_sizes': Field(
    tuple,
    f'a tuple of at most {networks.MAX_STAGES} ints in [1, {networks.MAX_BLOCKS_PER_STAGE}] '
    "(blocks per stage), or () for the model's own depth",
    lambda value: (
      len(value) <= networks.MAX_STAGES
      and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v <= networks.MAX_BLOCKS_PER_STAGE
        for v in value
      )
    ),
  ),
  'num_filters': Field(
    int, f'an int in [1, {networks.MAX_FILTERS}]', lambda v: 0 < v <= networks.MAX_FILTERS
  ),
  'small_stem': _BOOL,
  'dtype': _choice(DTYPES),
  'remat': _since(_choice(('', *networks.REMAT_POLICIES)), ''),
  'gsa.num_heads': Field(
    int, f'an int in [1, {networks.MAX_HEADS}]', lambda v: 0 < v <= networks.MAX_HEADS
  ),
  'gsa.key_ratio': _fraction(closed_top=True),
  'gsa.rel_length': _at_least(0),
  'gsa.content': _BOOL,
  'gsa.positional': _choice(layers.POSITIONAL_MODES),
  'gsa.position_embedding': _since(_choice(layers.POSITION_EMBEDDINGS), 'relative'),
  'gsa.normalize_queries': _since(_BOOL, False),
  'gsa.positional_softmax': _since(_BOOL, False),
  'gsa.order': _since(_choice(layers.ORDERS), 'auto'),
  'gsa.implementation': _since(_choice(tuple(i or '' for i in layers.IMPLEMENTATIONS)), ''),
  'gsa.attention_stages': Field(
    tuple,
    "a tuple of bools (one per stage), or () for the model's default",
    lambda value: all(isinstance(v, bool) for v in value),
    before=(),
  ),
  # Data.
  'dataset': _choice(datasets.NAMES),
  'data_dir': _FREE_STRING,
  'image_size': Field(
    int,
    f'an int in [1, {networks.MAX_IMAGE_SIZE}]',
    lambda v: 0 < v <= networks.MAX_IMAGE_SIZE,
  ),
  # Optimisation.
  'batch_size': _positive(),
  'eval_batch_size': _FREE_COUNT,
  'num_epochs': _at_least(0, float),
  'num_train_steps': Field(
    int, 'an int in [-1, 2**31 - 1] (-1: num_epochs)', lambda value: -1 <= value <= MAX_STEPS
  ),
  'learning_rate': _positive(float),
  'warmup_epochs': _at_least(0, float),
  'momentum': _fraction(),
  'nesterov': _BOOL,
  'weight_decay': _at_least(0, float),
  'label_smoothing': _since(_fraction(), 0.0),
  'seed': Field(int, 'an int in [0, 2**32)', lambda value: 0 <= value < SEED_LIMIT),
  'ema_decay': _since(_fraction(), 0.0),
  # Augmentation: their types here; their ranges are augment_config.check_config's.
  'augment.num_layers': Field(int, 'an int', before=0),
  'augment.magnitude': Field(float, 'a finite number', before=0.0),
  'augment.magnitude_std': Field(float, 'a finite number', before=0.0),
  'augment.mixup_alpha': Field(float, 'a finite number', before=0.0),
  'augment.cutmix_alpha': Field(float, 'a finite number', before=0.0),
  'augment.prob': Field(float, 'a finite number', before=1.0),
  'augment.switch_prob': Field(float, 'a finite number', before=0.5),
  # Read only when a run starts from scratch (a restart continues from its own checkpoint),
  # so it changes nothing once a run has started; config.json keeps the first start's value.
  'init_from': _FREE_STRING,
  # Bookkeeping.
  'log_every_steps': _FREE_COUNT,
  'log_every_epochs': _FREE_EPOCHS,
  'eval_every_steps': _FREE_COUNT,
  'eval_every_epochs': _FREE_EPOCHS,
  'checkpoint_every_steps': _FREE_COUNT,
  'checkpoint_every_epochs': _FREE_EPOCHS,
  'keep_checkpoints': _positive(trained=False),
  'profile_steps': _FREE_COUNT,
  'eval_only': _FREE_BOOL,
  'attention_maps': _FREE_BOOL,
  'allow_config_changes': _FREE_STRING,
}


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def lookup(config: ml_collections.ConfigDict, name: str) -> Any:
  """The value of a dotted field (``'gsa.num_heads'``).

  Raises:
    ConfigError: the config has no such field.
  """
  value = config
  for part in name.split('.'):
    if not isinstance(value, (ml_collections.ConfigDict, dict)) or part not in value:
      raise ConfigError(f'config.{name} is missing; every field of configs/default.py is needed.')
    value = value[part]
  return value


def _of_kind(value: Any, kind: type) -> bool:
  if kind is bool:
    return isinstance(value, bool)
  if isinstance(value, bool):
    return False
  if kind is int:
    return isinstance(value, int)
  if kind is float:
    return isinstance(value, (int, float)) and math.isfinite(value)
  if kind is tuple:
    return isinstance(value, (tuple, list))
  return isinstance(value, kind)


def check_fields(config: ml_collections.ConfigDict, *, free_may_lack: bool = False) -> None:
  """Raises :class:`ConfigError` for the first field of :data:`FIELDS` that is missing, of
  the wrong type, not finite or out of range.

  Args:
    config: the config.
    free_may_lack: a field that does not change what is trained may be absent (a
      ``config.json`` written before the field existed); if present it is checked.
  """
  for name, field in FIELDS.items():
    if free_may_lack and not field.trained and not _has(config, name):
      continue
    value = lookup(config, name)
    if not _of_kind(value, field.kind):
      wrong_type = (
        '' if type(value) in (field.kind, int, float) else f' (got {type(value).__name__})'
      )
      raise ConfigError(f'config.{name}={value!r} must be {field.expected}{wrong_type}.')
    _require(field.accepts(value), f'config.{name}={value!r} must be {field.expected}.')


def _has(config: ml_collections.ConfigDict, name: str) -> bool:
  try:
    lookup(config, name)
  except ConfigError:
    return False
  return True


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` for the first unusable field of ``config``.

  Args:
    config: the experiment config (``configs/default.py`` defines every field).
  """
  check_fields(config)
  for name in ('log_every', 'eval_every', 'checkpoint_every'):
    steps, epochs = config[f'{name}_steps'], config[f'{name}_epochs']
    _require(
      (steps > 0) != (epochs > 0),
      f'config.{name}_steps={steps} and config.{name}_epochs={epochs}: set exactly one of '
      'them > 0 (the other 0).',
    )
  fields = set(_flat_names(config.to_dict()))
  for name in allowed_changes(config):
    _require(
      name in fields,
      f'config.allow_config_changes names {name!r}, which is not a config field; list fields '
      "by their dotted names, comma-separated (e.g. 'num_train_steps,gsa.num_heads').",
    )
  _validate_trained(config)
  data_dir = config.data_dir
  if data_dir and '://' not in data_dir and os.path.exists(data_dir):
    _require(
      os.path.isdir(data_dir),
      f'config.data_dir={data_dir!r} is not a directory: give the TFDS data directory (it is '
      'created if missing).',
    )
  # Batches over devices and hosts.
  devices = jax.device_count()
  for name in ('batch_size', 'eval_batch_size'):
    value = config[name]
    _require(
      value == 0 or value % devices == 0,
      f'config.{name}={value} is not divisible by the {devices} devices; use a multiple of '
      f'{devices} (e.g. {max(devices, value // devices * devices)}).',
    )


def validate_record(config: ml_collections.ConfigDict) -> None:
  """Checks a ``config.json`` read back from a workdir: what it says was trained.

  Every field present, typed and in range (those a restart may change freely may be
  absent: a record keeps the values of the run's first start) and the network they
  describe; not the devices (any machine may read a record).
  """
  check_fields(config, free_may_lack=True)
  _validate_trained(config)


def _validate_trained(config: ml_collections.ConfigDict) -> None:
  """The run's length, then heads, widths, stages and input size against its network."""
  _require(
    config.num_train_steps > 0 or (config.num_train_steps in (-1, 0) and config.num_epochs > 0),
    f'config.num_train_steps={config.num_train_steps} and config.num_epochs={config.num_epochs}: '
    'set num_train_steps > 0, or num_train_steps=-1 and num_epochs > 0.',
  )
  try:
    augment_config.check_config(**config.augment, prefix='config.augment.')
  except ValueError as error:
    raise ConfigError(str(error)) from None
  gsa = config.gsa
  model = networks.build(networks.architecture_of(config), datasets.get(config.dataset).num_classes)
  stages = len(model.stage_sizes)
  _require(
    not gsa.attention_stages or len(gsa.attention_stages) == stages,
    f'config.gsa.attention_stages={tuple(gsa.attention_stages)} has '
    f'{len(gsa.attention_stages)} entries; {config.model} has {stages} stages: give one '
    'bool per stage.',
  )
  for i, uses_gsa in enumerate(model.stage_attention()):
    if not uses_gsa:
      continue
    width = config.num_filters * 2**i
    key_width = int(width * gsa.key_ratio)
    try:
      layers.check_gsa_config(
        width,
        gsa.num_heads,
        key_width,
        gsa.content,
        gsa.positional,
        gsa.position_embedding,
        gsa.rel_length or None,
        gsa.order,
        gsa.positional_softmax,
        gsa.implementation or None,
      )
    except ValueError as error:
      raise ConfigError(
        f'config.gsa (stage {i + 1}, {width} channels, d_k = key_ratio * {width} = {key_width}): '
        f'{error}'
      ) from None
  stride = networks.downsampling(model)
  _require(
    config.image_size >= stride,
    f'config.image_size={config.image_size} is too small for {config.model}, which downsamples '
    f'by {stride}; use image_size >= {stride}.',
  )
  spec = datasets.get(config.dataset)
  _require(
    config.image_size >= spec.min_image_size,
    f'config.image_size={config.image_size} is smaller than {config.dataset} can be stored at; '
    f'use image_size >= {spec.min_image_size}.',
  )
  _require(
    config.image_size <= spec.max_image_size,
    f'config.image_size={config.image_size} is beyond what {config.dataset} holds (its largest '
    f'useful size is {spec.max_image_size}, the rest only upscales its pixels); use image_size '
    f'<= {spec.max_image_size}.',
  )


def allowed_changes(config: ml_collections.ConfigDict) -> list[str]:
  """The fields named in ``config.allow_config_changes`` (comma-separated, dotted)."""
  return [name.strip() for name in config.allow_config_changes.split(',') if name.strip()]


def _flat_names(tree: dict[str, Any], prefix: str = '') -> list[str]:
  names = []
  for key, value in tree.items():
    if isinstance(value, dict):
      names += _flat_names(value, f'{prefix}{key}.')
    else:
      names.append(f'{prefix}{key}')
  return names


def validate_against_data(config: ml_collections.ConfigDict, builder) -> None:
  """Checks the fields that depend on the prepared dataset (cheap: metadata only)."""
  split = datasets.get(config.dataset).train_split
  available = builder.info.splits[split].num_examples
  _require(
    config.batch_size <= available,
    f'config.batch_size={config.batch_size} is larger than the {available} examples of '
    f'{config.dataset}:{split}; use a smaller batch_size.',
  )


def validate_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> None:
  """Checks that the warmup ends before the run does (no silent clamp).

  Args:
    config: reads ``warmup_epochs``.
    steps_per_epoch: training steps per epoch at the config's batch size.
    num_train_steps: the run's length in steps.
  """
  _require(
    num_train_steps <= MAX_STEPS,
    f'config.num_epochs={config.num_epochs} is {num_train_steps} steps ({steps_per_epoch} per '
    f'epoch), more than the step counter holds ({MAX_STEPS}); use fewer epochs.',
  )
  warmup = int(config.warmup_epochs * steps_per_epoch)
  longest = (num_train_steps - 1) / steps_per_epoch
  _require(
    warmup < num_train_steps,
    f'config.warmup_epochs={config.warmup_epochs} is {warmup} steps of warmup ({steps_per_epoch} '
    f'steps per epoch), not shorter than the run ({num_train_steps} steps); use warmup_epochs '
    f'<= {math.floor(longest * 1000) / 1000:g} or a longer run.',
  )


# Fields that do not change what is trained: a restart may change them freely.
FREE_FIELDS = frozenset(name for name, field in FIELDS.items() if not field.trained)

# What the workdir's ledger needs to know of these fields.
RECORD_RULES = workdir.RecordRules(
  FREE_FIELDS,
  validate_record,
  allowed_changes,
  fields=frozenset(FIELDS),
  defaults={name: field.before for name, field in FIELDS.items() if field.before is not None},
)

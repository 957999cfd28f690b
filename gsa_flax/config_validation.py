"""Checks a whole config at start-up, before any data is read or anything compiled.

Each problem is one :class:`ConfigError` naming the field, the bad value and what would be
accepted, so a typo costs seconds rather than a compile and a crash an hour later.
"""

from __future__ import annotations

import jax
import ml_collections

from gsa_flax import datasets, layers, models

DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigError(ValueError):
  """A config field has a value the run cannot use."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _positive(config, *names: str) -> None:
  for name in names:
    value = config[name]
    _require(
      isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
      f'config.{name}={value!r} must be a positive number.',
    )


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` for the first unusable field of ``config``.

  Args:
    config: the experiment config (``configs/default.py`` defines every field).
  """
  # Names.
  _require(
    config.model in models.MODELS,
    f'config.model={config.model!r} is unknown; valid: {", ".join(models.MODELS)}.',
  )
  _require(
    config.dataset in datasets.NAMES,
    f'config.dataset={config.dataset!r} is unknown; valid: {", ".join(datasets.NAMES)}.',
  )
  spec = datasets.get(config.dataset)
  _require(
    config.dtype in DTYPES, f'config.dtype={config.dtype!r} is unknown; valid: {", ".join(DTYPES)}.'
  )

  # Counts and rates.
  _positive(
    config,
    'batch_size',
    'learning_rate',
    'image_size',
    'keep_checkpoints',
    'num_filters',
  )
  for name in ('log_every', 'eval_every', 'checkpoint_every'):
    steps, epochs = config[f'{name}_steps'], config.get(f'{name}_epochs', 0)
    _require(
      (steps > 0) != (epochs > 0),
      f'config.{name}_steps={steps} and config.{name}_epochs={epochs}: set exactly one of '
      'them > 0 (the other 0).',
    )
  _require(
    config.num_train_steps > 0 or (config.num_train_steps in (-1, 0) and config.num_epochs > 0),
    f'config.num_train_steps={config.num_train_steps} and config.num_epochs={config.num_epochs}: '
    'set num_train_steps > 0, or num_train_steps=-1 and num_epochs > 0.',
  )
  for name in ('warmup_epochs', 'weight_decay', 'momentum', 'eval_batch_size', 'profile_steps'):
    _require(config[name] >= 0, f'config.{name}={config[name]!r} must be >= 0.')
  _require(
    0.0 <= config.label_smoothing < 1.0,
    f'config.label_smoothing={config.label_smoothing!r} must be in [0, 1).',
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

  # The model: heads, widths, stages, input size.
  gsa = config.gsa
  model = models.build(config, spec.num_classes)
  stages = len(model.stage_sizes)
  _require(
    not gsa.attention_stages or len(gsa.attention_stages) == stages,
    f'config.gsa.attention_stages={tuple(gsa.attention_stages)} has '
    f'{len(gsa.attention_stages)} entries; {config.model} has {stages} stages: give one '
    'bool per stage.',
  )
  attention = model.stage_attention()
  for i, uses_gsa in enumerate(attention):
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
      )
    except ValueError as error:
      raise ConfigError(
        f'config.gsa (stage {i + 1}, {width} channels, d_k={key_width}): {error}'
      ) from None
  stride = models.downsampling(model)
  _require(
    config.image_size >= stride,
    f'config.image_size={config.image_size} is too small for {config.model}, which downsamples '
    f'by {stride}; use image_size >= {stride}.',
  )


def validate_against_data(config: ml_collections.ConfigDict, builder) -> None:
  """Checks the fields that depend on the prepared dataset (cheap: metadata only)."""
  split = datasets.get(config.dataset).train_split
  available = builder.info.splits[split].num_examples
  _require(
    config.batch_size <= available,
    f'config.batch_size={config.batch_size} is larger than the {available} examples of '
    f'{config.dataset}:{split}; use a smaller batch_size.',
  )

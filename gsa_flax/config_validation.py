"""Checks a whole config at start-up, before any data is read or anything compiled.

Each problem is one :class:`ConfigError` naming the field, the bad value and what would be
accepted, so a typo costs seconds rather than a compile and a crash an hour later.
"""

from __future__ import annotations

import os
import tempfile

import jax
import ml_collections
from etils import epath

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


def validate(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
  """Raises :class:`ConfigError` for the first unusable field of ``config``.

  Args:
    config: the experiment config (``configs/default.py`` defines every field).
    workdir: if given, checked to be writable (created if missing).
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
  _require(
    config.dtype in DTYPES, f'config.dtype={config.dtype!r} is unknown; valid: {", ".join(DTYPES)}.'
  )

  # Counts and rates.
  _positive(
    config,
    'batch_size',
    'learning_rate',
    'image_size',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'num_filters',
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
  model = models.create_model(
    config.model, num_filters=config.num_filters, small_stem=config.small_stem
  )
  stages = len(model.stage_sizes)
  if gsa.attention_stages:
    model = model.clone(attention_stages=tuple(gsa.attention_stages))
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

  if workdir is not None:
    _check_writable(workdir)


def validate_against_data(config: ml_collections.ConfigDict, builder) -> None:
  """Checks the fields that depend on the prepared dataset (cheap: metadata only)."""
  from gsa_flax import input_pipeline  # TensorFlow: only once a dataset is in hand.

  split = input_pipeline.train_split_name(config.dataset)
  available = input_pipeline.num_examples(builder, split)
  _require(
    config.batch_size <= available,
    f'config.batch_size={config.batch_size} is larger than the {available} examples of '
    f'{config.dataset}:{split}; use a smaller batch_size.',
  )


def _check_writable(workdir: str) -> None:
  if str(workdir).startswith(('gs://', 's3://')):
    return  # remote: permission errors surface on the first write
  path = os.path.abspath(workdir)
  try:
    epath.Path(path).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test'):
      pass
  except OSError as error:
    raise ConfigError(
      f'--workdir={workdir} cannot be written ({error.strerror}); choose a directory you can write.'
    ) from None

"""Trained weights read back: the one restore path of everything that applies a trained
network (evaluation of a finished run, prediction, attention maps, export, ``init_from``).

:func:`load` reads a training run (a workdir, its ``checkpoints`` directory or one step),
moving no file; :func:`load_weights` reads those or a portable weights file
(:mod:`gsa_flax.model.weights`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from etils import epath

from gsa_flax.data import datasets
from gsa_flax.model import pretrained, transfer, weights
from gsa_flax.train import config_validation, experiment
from gsa_flax.train import state as state_lib
from gsa_flax.train.checkpoints import Checkpointer, CheckpointError
from gsa_flax.train.workdir import CONFIG_FILE, checkpoint_dir, read_config, workdir_path


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained network, ready to apply.

  Attributes:
    config: the run's config (from ``config.json``).
    model: the network it trained.
    variables: ``{'params': ..., 'batch_stats': ...}`` to apply: the moving average of the
      parameters when the checkpoint has one (unless the raw parameters were asked for),
      with the run's BatchNorm statistics.
    step: the training step of the checkpoint.
    ema_params: the checkpoint's moving average of the parameters; None if it has none.
    origin: where the variables come from, in words (for logs and model cards).
  """

  config: ml_collections.ConfigDict
  model: nn.Module
  variables: dict[str, Any]
  step: int
  ema_params: Any = None
  origin: str = ''

  @property
  def averaged(self) -> bool:
    """Whether ``variables`` holds the moving average rather than the raw parameters."""
    return self.ema_params is not None and self.variables['params'] is self.ema_params


def locate_run(path: str | os.PathLike) -> tuple[epath.Path, int | None]:
  """The workdir and the step a path names: ``<workdir>`` (its newest intact checkpoint),
  ``<workdir>/checkpoints`` (the same) or ``<workdir>/checkpoints/<step>`` (that step).

  Returns:
    ``(workdir, step)``; ``step`` is None for the newest.
  """
  path = workdir_path(path)
  if not (path / CONFIG_FILE).exists():
    if path.name == 'checkpoints' and (path.parent / CONFIG_FILE).exists():
      return path.parent, None
    if path.name.isdigit() and path.parent.name == 'checkpoints':
      return path.parent.parent, int(path.name)
  return path, None


def load(
  workdir: str | os.PathLike,
  config: ml_collections.ConfigDict | None = None,
  *,
  sharding: jax.sharding.Sharding | None = None,
  raw: bool = False,
) -> Trained:
  """Restores a checkpoint of a training run for inference, moving no file.

  The one restore path of everything that applies a trained network (evaluation of a
  finished run, prediction, attention maps, export, ``init_from``).

  Args:
    workdir: the ``--workdir`` of a training run (its newest intact checkpoint), its
      ``checkpoints`` directory (the same), or one checkpoint, ``<workdir>/checkpoints/<step>``.
    config: the run's config; None reads ``<workdir>/config.json``.
    sharding: where the arrays go; None: this process's first device.
    raw: apply the raw parameters even when the checkpoint has their moving average
      (which is applied by default; ``ema_params`` holds it either way).

  Raises:
    CheckpointError: no config, no checkpoint, or checkpoints that cannot be read or do
      not fit the config (one line, saying what to do).
  """
  root, step = locate_run(workdir)
  config = read_config(root, config_validation.RECORD_RULES) if config is None else config
  pieces = experiment.setup(config, datasets.get(config.dataset).num_classes)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
    state_lib.state_dict(state_lib.abstract(pieces, config.image_size)),
  )
  directory = checkpoint_dir(root)
  if not directory.is_dir():
    raise CheckpointError(f'no checkpoint in {root}: train first ({directory} is missing).')
  reader = Checkpointer(str(root), keep=1, read_only=True)
  restored = reader.restore_latest(target) if step is None else reader.restore(step, target)
  if restored is None:
    raise CheckpointError(f'no checkpoint in {directory}: train first.')
  tree, _, step = restored
  ema = tree.get(state_lib.EMA)
  params = tree['params'] if raw or ema is None else ema
  origin = f'checkpoint {directory / str(step)}'
  if ema is not None:
    origin += ' (raw parameters)' if raw else ' (moving average of the parameters)'
  return Trained(
    config,
    pieces.model,
    {'params': params, 'batch_stats': tree['batch_stats']},
    step,
    ema_params=ema,
    origin=origin,
  )


def load_weights(path: str | os.PathLike) -> Trained:
  """The trained network at ``path``, wherever it is kept (what ``config.init_from`` reads).

  Args:
    path: a training workdir, its ``checkpoints`` directory or one checkpoint under it
      (:func:`load`: the moving average when the run kept one), or a portable-weights file
      (:func:`gsa_flax.model.pretrained.load_pretrained`); local or ``gs://``.

  Raises:
    gsa_flax.model.transfer.TransferError: the path does not exist or is a file of another kind.
    CheckpointError: a run whose config or checkpoints cannot be used.
    gsa_flax.model.weights.WeightsError: a weights file that cannot be read.
  """
  source = transfer.locate(path)
  if source.kind == 'run':
    return load(path)
  loaded = pretrained.load_pretrained(path)
  step = loaded.card.get('step')
  return Trained(
    loaded.config,
    loaded.model,
    loaded.variables,
    -1 if step is None else int(step),
    origin=f'weights file {path} ({weights.describe(loaded.card)})',
  )

"""The experiment config, read once: each part of a run gets the fields it needs.

The trainer's top (and a tool given a run's config) calls these; below them nothing takes
the whole ``ConfigDict``: the network gets a :class:`gsa_flax.model.networks.Architecture`,
the optimizer a :class:`gsa_flax.train.state.Optimizer`, the pipeline its data fields.
``configs/default.py`` documents every field.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from gsa_flax.model import networks
from gsa_flax.train import state as state_lib


def optimizer(config: ml_collections.ConfigDict) -> state_lib.Optimizer:
  """The optimisation fields of ``config``."""
  return state_lib.Optimizer(
    learning_rate=config.learning_rate,
    batch_size=config.batch_size,
    warmup_epochs=config.warmup_epochs,
    momentum=config.momentum,
    nesterov=config.nesterov,
    weight_decay=config.weight_decay,
  )


def setup(
  config: ml_collections.ConfigDict,
  num_classes: int,
  *,
  steps_per_epoch: int | None = None,
  num_train_steps: int | None = None,
) -> state_lib.Setup:
  """The network, schedule and optimizer of ``config`` (:func:`gsa_flax.train.state.setup`)."""
  return state_lib.setup(
    networks.architecture_of(config),
    optimizer(config),
    num_classes,
    ema_decay=config.ema_decay,
    steps_per_epoch=steps_per_epoch,
    num_train_steps=num_train_steps,
  )


def run_length(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The run's length in steps: ``num_train_steps``, or ``num_epochs`` of steps."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(np.ceil(config.num_epochs * steps_per_epoch))


def every(config: ml_collections.ConfigDict, name: str, steps_per_epoch: int) -> int:
  """An interval in steps from ``<name>_epochs`` (if > 0) or ``<name>_steps``.

  In epochs, an interval keeps its meaning when ``batch_size`` changes.
  """
  epochs = config.get(f'{name}_epochs', 0)
  if epochs > 0:
    return max(round(epochs * steps_per_epoch), 1)
  return config[f'{name}_steps']


def counterpart(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same experiment with the counterpart network (``gsa_resnet50`` <-> ``resnet50``),
  every stage of its own kind."""
  other = ml_collections.ConfigDict(config.to_dict())
  other.model = networks.counterpart(config.model)
  # An attention_stages override would turn stages of a ResNet into GSA: use the defaults.
  other.gsa.attention_stages = ()
  return other

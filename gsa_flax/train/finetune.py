"""Starting a run from trained weights (``config.init_from``).

The source (a training workdir, its checkpoints or one of them, or an exported weights
file) is read with :func:`gsa_flax.train.restore.load_weights` and fitted to the run's
network with :func:`gsa_flax.model.transfer.adapt` (position tables resized to the new
resolution, a classifier of another number of classes re-initialised), using only the
network's shapes: a source that does not fit stops the run before any compile. The
optimizer and the step start fresh. A run that has checkpoints of its own resumes from
them and never reads ``init_from``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import serialization, traverse_util
from jax.sharding import NamedSharding

from gsa_flax.model import networks, transfer, weights
from gsa_flax.train import restore
from gsa_flax.train import state as state_lib
from gsa_flax.train import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Start:
  """Trained weights a new run starts from (``config.init_from``).

  Attributes:
    adapted: the source's variables fitted to the run's network (:func:`transfer.adapt`;
      re-initialised leaves are shapes only, the run's own initialisation fills them).
    origin: where they come from, in words.
  """

  adapted: transfer.Adapted
  origin: str


def read_init_from(source: str, model: nn.Module, image_size: int, *, name: str = '') -> Start:
  """Reads the trained weights at ``source`` and fits them to ``model`` at ``image_size``.

  Only shapes of the target network are used (nothing is compiled), so a source that does
  not fit stops the run before any compile.

  Args:
    source: ``config.init_from``: a training workdir, its checkpoints, one checkpoint or a
      weights file (:func:`gsa_flax.train.restore.load_weights`).
    model: the run's network.
    image_size: the run's resolution (position tables are resized to it).
    name: the network's name, for messages.

  Raises:
    transfer.TransferError: the source cannot be read or does not fit, in one line
      naming ``config.init_from``.
  """
  where = f'config.init_from={source}'
  try:
    trained = restore.load_weights(source)
  except (transfer.TransferError, workdir_lib.WorkdirError, weights.WeightsError) as error:
    raise transfer.TransferError(f'{where}: {error}') from None
  try:
    adapted = transfer.adapt(trained.variables, networks.abstract_variables(model, image_size))
  except transfer.TransferError as error:
    raise transfer.TransferError(
      f"{where} does not fit this run's network ({name or type(model).__name__} at "
      f'{image_size}x{image_size}): {error}'
    ) from None
  return Start(adapted, trained.origin)


def _global(value: Any, sharding: NamedSharding) -> jax.Array:
  """A host array (the same on every process) as a global array of ``sharding``."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def start_from(
  state: state_lib.TrainState, start: Start, sharding: NamedSharding
) -> state_lib.TrainState:
  """A freshly initialised ``state`` with the weights of ``start``: parameters, BatchNorm
  statistics and the moving average (equal to the parameters); the optimizer starts fresh.

  Leaves that :func:`transfer.adapt` re-initialised keep ``state``'s initialisation.
  """
  own = traverse_util.flatten_dict(state_lib.variables(state), sep='/')
  host = traverse_util.flatten_dict(start.adapted.variables, sep='/')
  for path in start.adapted.reinitialized:
    host[path] = np.asarray(own[path].addressable_data(0))  # replicated: any shard is all

  def on_devices(collection: str, like: Any) -> Any:
    tree = {p: _global(v, sharding) for p, v in host.items() if p.startswith(collection + '/')}
    return serialization.from_state_dict(
      like, traverse_util.unflatten_dict(tree, sep='/')[collection]
    )

  params = on_devices('params', state.params)
  ema = None if state.ema_params is None else on_devices('params', state.ema_params)
  return state.replace(
    params=params,
    batch_stats=on_devices('batch_stats', state.batch_stats),
    opt_state=jax.jit(state.tx.init, out_shardings=sharding)(params),
    ema_params=ema,
  )

"""A run's workdir on disk: checkpoints, the state layout in them, and ``config.json``.

Checkpoints are one orbax ``CheckpointManager`` under ``<workdir>/checkpoints``. Orbax
writes each step to a temporary directory and renames it into place when complete, so a
crash during a save never touches the previous checkpoint. On restore, a step that is
unreadable (truncated, corrupted) is reported and skipped in favour of the newest intact
one; nothing is deleted. A checkpoint whose shapes do not match the model stops with the
first mismatching parameter named.

Every path goes through ``etils.epath``, so a workdir on ``gs://`` works like a local one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import serialization
from jax.experimental import multihost_utils

from gsa_flax import config_validation, datasets
from gsa_flax import state as state_lib


class CheckpointError(ValueError):
  """The checkpoints of a workdir cannot be used as they are."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint was written by a different model or configuration."""


UNREADABLE = 'checkpoints_unreadable'
CONFIG_FILE = 'config.json'


def is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` is on a cloud file system (``gs://``, ``s3://``) rather than a local disk."""
  return str(path).startswith(('gs://', 's3://'))


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as an ``epath.Path``, absolute if local (orbax requires absolute paths)."""
  return epath.Path(workdir if is_remote(workdir) else os.path.abspath(workdir))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """``<workdir>/checkpoints``."""
  return workdir_path(workdir) / 'checkpoints'


def check_workdir(workdir: str | os.PathLike) -> None:
  """Creates a local workdir if missing and checks it can be written.

  Raises:
    config_validation.ConfigError: it cannot (the message names ``--workdir``).
  """
  if is_remote(workdir):
    return  # permission errors surface on the first write
  path = workdir_path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test'):
      pass
  except OSError as error:
    raise config_validation.ConfigError(
      f'--workdir={workdir} cannot be written ({error.strerror}); choose a directory you can write.'
    ) from None


# ----------------------------------------------------------------------------- state layout


def state_dict(state: state_lib.TrainState) -> dict[str, Any]:
  """The checkpoint layout of a train state: step, params, batch_stats, opt_state."""
  return serialization.to_state_dict(
    {
      'step': state.step,
      'params': state.params,
      'batch_stats': state.batch_stats,
      'opt_state': state.opt_state,
    }
  )


def restore_into(state: state_lib.TrainState, restored: dict[str, Any]) -> state_lib.TrainState:
  """``state`` with the values of a restored :func:`state_dict`."""
  return state.replace(
    step=restored['step'],
    params=serialization.from_state_dict(state.params, restored['params']),
    batch_stats=serialization.from_state_dict(state.batch_stats, restored['batch_stats']),
    opt_state=serialization.from_state_dict(state.opt_state, restored['opt_state']),
  )


# ----------------------------------------------------------------------------- config.json


def write_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Writes the run's config to ``<workdir>/config.json`` (process 0 only)."""
  if jax.process_index() == 0:
    path = workdir_path(workdir) / CONFIG_FILE
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a run recorded in ``<workdir>/config.json``.

  Raises:
    CheckpointError: no such workdir or file, or a file that is not a JSON object.
  """
  root = workdir_path(workdir)
  path = root / CONFIG_FILE
  if not root.is_dir():
    raise CheckpointError(
      f'workdir {workdir} does not exist; pass the --workdir of a training run.'
    )
  if not path.exists():
    raise CheckpointError(
      f'{path} is missing: {workdir} is not a training workdir (main.py writes it).'
    )
  try:
    value = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as error:
    raise CheckpointError(
      f'{path} is not valid JSON ({error}); restore it from a backup or retrain.'
    ) from None
  if not isinstance(value, dict):
    raise CheckpointError(f'{path} holds a {type(value).__name__}, not a config object.')
  return ml_collections.ConfigDict(value)


# ----------------------------------------------------------------------------- trained weights


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained network, ready to apply.

  Attributes:
    config: the run's config (from ``config.json``).
    model: the network it trained.
    variables: ``{'params': ..., 'batch_stats': ...}`` from the checkpoint.
    step: the training step of the checkpoint.
  """

  config: ml_collections.ConfigDict
  model: nn.Module
  variables: dict[str, Any]
  step: int


def load(
  workdir: str | os.PathLike,
  config: ml_collections.ConfigDict | None = None,
  *,
  sharding: jax.sharding.Sharding | None = None,
) -> Trained:
  """Restores the newest intact checkpoint of a workdir for inference, moving no file.

  The one restore path of everything that applies a trained network (evaluation of a
  finished run, prediction, attention maps).

  Args:
    workdir: the ``--workdir`` of a training run.
    config: the run's config; None reads ``<workdir>/config.json``.
    sharding: where the arrays go; None: this process's first device.

  Raises:
    CheckpointError: no config, no checkpoint, or checkpoints that cannot be read or do
      not fit the config (one line, saying what to do).
  """
  config = read_config(workdir) if config is None else config
  pieces = state_lib.setup(config, datasets.get(config.dataset).num_classes)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
    state_dict(state_lib.abstract(pieces, config.image_size)),
  )
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    raise CheckpointError(f'no checkpoint in {workdir}: train first ({directory} is missing).')
  restored = Checkpointer(workdir, keep=config.keep_checkpoints).restore_latest(
    target, read_only=True
  )
  if restored is None:
    raise CheckpointError(f'no checkpoint in {directory}: train first.')
  tree, _, step = restored
  variables = {'params': tree['params'], 'batch_stats': tree['batch_stats']}
  return Trained(config, pieces.model, variables, step)


def _abstract(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``tree``, the restore target."""
  return jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, 'sharding', None)), tree
  )


def _first_mismatch(want: Any, got: Any) -> str | None:
  """The first leaf (by path) whose shape differs between two pytrees, as a sentence."""
  got_leaves = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]:
    name = jax.tree_util.keystr(path)
    if path not in got_leaves:
      return f'{name} is missing from the checkpoint'
    got_shape = tuple(got_leaves[path].shape)
    if tuple(leaf.shape) != got_shape:
      return f'{name} has shape {got_shape} in the checkpoint but {tuple(leaf.shape)} in this model'
  extra = set(got_leaves) - {p for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]}
  if extra:
    name = jax.tree_util.keystr(sorted(extra, key=str)[0])
    return f'{name} is in the checkpoint but not in this model'
  return None


class Checkpointer:
  """Saves and restores ``{'state': pytree, 'meta': json}`` by step.

  Args:
    workdir: the run's working directory (local or ``gs://``).
    keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, workdir: str, keep: int):
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_handlers={'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()},
    )

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts an (asynchronous) save of ``state`` at ``step``; ``wait`` makes it durable."""
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self.manager.wait_until_finished()

  @contextlib.contextmanager
  def finally_wait(self) -> Iterator[None]:
    """Waits for saves in flight when the block ends, also when it raises."""
    try:
      yield
    finally:
      self.wait()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(
    self, target: Any, *, read_only: bool = False
  ) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest intact checkpoint into the structure of ``target``.

    Args:
      target: the pytree (state dict) to restore into; its shapes are checked first.
      read_only: leave unreadable steps where they are (tools that only inspect a run);
        by default they are moved aside so training can save those steps again.

    Returns:
      ``(state, meta, step)``, or None when there is no checkpoint.

    Raises:
      CheckpointMismatchError: the checkpoint's parameters differ in shape from ``target``'s.
    """
    steps = self.steps()
    for step in reversed(steps):
      self._check_shapes(step, target)
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()
          ),
        )
      except Exception as error:  # noqa: BLE001  (any unreadable step: fall back, delete nothing)
        kept = self.directory / str(step) if read_only else self._set_aside(step)
        logging.warning(
          'Checkpoint step %d is unreadable (%s: %s); kept at %s (nothing deleted), trying '
          'an older one.',
          step,
          type(error).__name__,
          str(error).splitlines()[0][:300] if str(error) else '',
          kept,
        )
        continue
      if step != steps[-1]:
        logging.warning('Resumed from step %d, the newest intact checkpoint.', step)
      return restored['state'], dict(restored['meta']), step
    if steps:
      raise CheckpointError(
        f'none of the checkpoints {steps} in {self.directory} could be read (set aside in '
        f'{self.directory.parent / UNREADABLE}); fix or remove them, or use a new --workdir.'
      )
    return None

  def _set_aside(self, step: int) -> epath.Path:
    """Moves an unreadable step out of orbax's way, so it is neither reused nor deleted."""
    target = self.directory.parent / UNREADABLE / str(step)
    if jax.process_index() == 0:
      suffix = 0
      while target.exists():
        suffix += 1
        target = self.directory.parent / UNREADABLE / f'{step}.{suffix}'
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set_aside_{step}')
    self.manager.reload()
    return target

  def _check_shapes(self, step: int, target: dict[str, Any]) -> None:
    """Compares stored array shapes with ``target``'s from metadata, before reading data."""
    try:
      stored = self.manager.item_metadata(step)['state']
    except Exception:  # noqa: BLE001  unreadable metadata: the restore reports it.
      return
    if stored is None:
      return
    stored = _to_plain(getattr(stored, 'tree', stored))
    # Parameters first: the mismatch a user can act on, before optimizer state mirrors it.
    problem = None
    if isinstance(stored, dict) and 'params' in stored and 'params' in target:
      problem = _first_mismatch({'params': target['params']}, {'params': stored['params']})
    problem = problem or _first_mismatch(target, stored)
    if problem:
      raise CheckpointMismatchError(
        f'checkpoint {self.directory / str(step)} was written by a different model or config: '
        f'{problem}. Use the config it was trained with (see config.json in the workdir), or '
        'a new --workdir.'
      )


def _to_plain(tree: Any) -> Any:
  """Nested dicts (lists become dicts keyed by index), comparable to a state dict."""
  if isinstance(tree, dict):
    return {k: _to_plain(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, 'shape'):
    return {str(i): _to_plain(v) for i, v in enumerate(tree)}
  return tree

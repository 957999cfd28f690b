"""Checkpoints: one orbax ``CheckpointManager`` under ``<workdir>/checkpoints``.

Orbax writes each step to a temporary directory and renames it into place when complete,
so a crash during a save never touches the previous checkpoint. On restore, a step
that is unreadable (truncated, corrupted) is reported and skipped in favour of the newest
intact one; nothing is deleted. A checkpoint whose shapes do not match the model stops
with the first mismatching parameter named.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


class CheckpointError(ValueError):
  """The checkpoints of a workdir cannot be used as they are."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint was written by a different model or configuration."""


UNREADABLE = 'checkpoints_unreadable'


def checkpoint_dir(workdir: str) -> epath.Path:
  """``<workdir>/checkpoints`` as an absolute path (orbax requires one)."""
  path = epath.Path(workdir)
  if not str(workdir).startswith(('gs://', 's3://')):
    path = epath.Path(os.path.abspath(workdir))
  return path / 'checkpoints'


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

"""A run's checkpoints: one orbax ``CheckpointManager`` under ``<workdir>/checkpoints``.

Each step holds the train state (its layout is :func:`gsa_flax.train.state.state_dict`) and a
JSON record (the step, the config, where the weights came from when the run started from
trained ones). Orbax writes each step to a temporary directory and renames it into place
when complete, so a crash during a save never touches the previous checkpoint. What orbax
does not do is here:

- a save that fails (disk full, permissions) is one :class:`SaveError` naming the cause,
  the space needed and the newest intact step, with the failed step's partial files
  removed; what an interrupted save left is removed at the next start
  (:meth:`Checkpointer.discard_partial`);
- on restore an unreadable step is set aside in ``<workdir>/checkpoints_unreadable/`` and
  the newest intact one is used; nothing is deleted;
- a checkpoint whose shapes do not fit the model stops with the first mismatching
  parameter named, from the metadata, before any array is read.

Reading trained weights back for inference and ``init_from`` is :mod:`gsa_flax.train.restore`.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging as logging_std
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from gsa_flax.train.state import EMA
from gsa_flax.train.workdir import WorkdirError, checkpoint_dir, is_remote


class CheckpointError(WorkdirError):
  """The checkpoints of a workdir cannot be used as they are."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint was written by a different model or configuration."""


class SaveError(CheckpointError):
  """A checkpoint could not be written (disk full, permissions, ...)."""


UNREADABLE = 'checkpoints_unreadable'
# Orbax writes a step to `<step>.orbax-checkpoint-tmp...` and renames it when complete.
PARTIAL_MARK = '.orbax-checkpoint-tmp'


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


def nbytes(tree: Any) -> int:
  """Bytes of the arrays of a pytree (what a checkpoint of it holds, before compression)."""
  return sum(
    int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    for leaf in jax.tree.leaves(tree)
    if hasattr(leaf, 'shape')
  )


def _megabytes(count: int) -> str:
  return f'{count / 2**20:.1f} MiB'


def _ignore_abandoned_io(unraisable) -> None:
  """``sys.unraisablehook`` that drops the reports of an abandoned restore or save.

  Orbax reads or writes a step in an event loop of its own and closes it at the first
  array that fails (a corrupt file, a full disk), while TensorStore's operations on the
  other arrays are still in flight. Each of them then reports its completion to the closed
  loop, which Python prints as an unraisable ``RuntimeError: Event loop is closed``:
  hundreds of identical tracebacks that say nothing the one line about the step does not.
  Every other unraisable exception goes to the hook this one replaced.
  """
  if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == 'Event loop is closed':
    return
  _ignore_abandoned_io.previous(unraisable)


class _AbandonedOrbaxTasks(logging_std.Filter):
  """Drops asyncio's "Task exception was never retrieved" reports of orbax's abandoned
  writes (the same abandoned operations, reported when they are garbage-collected)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith('Task exception was never retrieved') and '/orbax/' in message)


def _install_ignore_abandoned_io() -> None:
  """Installs :func:`_ignore_abandoned_io` and :class:`_AbandonedOrbaxTasks` (once)."""
  if sys.unraisablehook is not _ignore_abandoned_io:
    _ignore_abandoned_io.previous = sys.unraisablehook
    sys.unraisablehook = _ignore_abandoned_io
  asyncio_logger = logging_std.getLogger('asyncio')
  if not any(isinstance(f, _AbandonedOrbaxTasks) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedOrbaxTasks())


def _remove(path: epath.Path) -> None:
  """Removes a file or directory, as much of it as can be (files may still be appearing)."""
  if not is_remote(path):
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.unlink(path)
    return
  with contextlib.suppress(OSError):
    path.rmtree() if path.is_dir() else path.unlink()


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
  """Copies a directory file by file (works between any two file systems)."""
  target.mkdir(parents=True, exist_ok=False)
  for entry in source.iterdir():
    if entry.is_dir():
      _copy_tree(entry, target / entry.name)
    else:
      entry.copy(target / entry.name)


class Checkpointer:
  """Saves and restores ``{'state': pytree, 'meta': json}`` by step.

  Saves are asynchronous: :meth:`save` starts one, :meth:`check` reports a failed one
  without waiting and :meth:`wait` blocks until it is on disk; a failure is a
  :class:`SaveError` and leaves no partial directory.

  Args:
    workdir: the run's working directory (local or ``gs://``).
    keep: how many of the newest checkpoints to keep.
    read_only: only restore (tools that inspect a run): nothing is created, moved or
      deleted, and unreadable steps are skipped where they are.
  """

  def __init__(self, workdir: str, keep: int, *, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    self.read_only = read_only
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        create=not read_only,
        read_only=read_only,
        # Not orbax's cleanup_tmp_directories: it runs in the background and, in testing,
        # removed the temporary directory of the restarted run's first save. What an
        # interrupted save left is removed before training by discard_partial instead.
      ),
      item_handlers={'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()},
    )
    self._saving: tuple[int, int] | None = None  # (step, bytes) of the save in flight
    _install_ignore_abandoned_io()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save of ``state`` at ``step``; :meth:`wait` makes it durable.

    Raises:
      SaveError: the previous save failed.
      Exception: whatever the start of this save raised (the caller turns it into a
        :class:`SaveError` with :meth:`save_failed`).
    """
    self.wait()  # a failure of the previous save is reported as that step's
    self._saving = (step, nbytes(state))
    # force: save at exactly the steps asked for (orbax's interval policy is not used); an
    # existing step is an error (StepAlreadyExistsError), never overwritten.
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def check(self) -> None:
    """Raises :class:`SaveError` if a save that has ended failed; never waits for one.

    Cheap enough to call after every step, so a failed save stops the run at once.
    """
    if self._saving is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until every started save is complete on disk.

    Raises:
      SaveError: the save failed (its partial files are removed first).
    """
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001  any failure of a save is reported the same way
      step = self._saving[0] if self._saving else -1
      raise self.save_failed(step, error) from None
    self._saving = None

  @contextlib.contextmanager
  def finally_wait(self) -> Iterator[None]:
    """Waits for saves in flight when the block ends, also when it raises."""
    try:
      yield
    except BaseException:
      with contextlib.suppress(SaveError):
        self.wait()  # the first error is the one to report
      raise
    self.wait()

  def save_failed(self, step: int, error: BaseException, needed: int | None = None) -> SaveError:
    """The one-line error of a failed save of ``step``, after removing its partial files.

    Names what failed (the OS error when there is one), where, how much space the
    checkpoint needs and how much is free (local disks), and the newest complete
    checkpoint, which is untouched.

    Args:
      step: the step whose save failed.
      error: what the save raised.
      needed: the checkpoint's size in bytes (:func:`nbytes`), if the caller knows it.
    """
    # TensorStore may still finish writes that the failed save abandoned: remove what they
    # leave until nothing has reappeared for a second (at most ten). A start of the run
    # removes whatever is still left.
    gc.collect()
    quiet = 0
    for _ in range(40):
      quiet = 0 if self.discard_partial(step) else quiet + 1
      if quiet == 4:
        break
      time.sleep(0.25)
    self._saving, saving = None, self._saving
    self.manager.reload()
    steps = self.steps()
    space = ''
    if needed is None and saving and saving[0] == step:
      needed = saving[1]
    if needed and not is_remote(self.directory):
      with contextlib.suppress(OSError):
        free = shutil.disk_usage(self.directory).free
        space = f'; a checkpoint needs about {_megabytes(needed)}, {_megabytes(free)} is free there'
    kept = (
      f'the newest complete checkpoint (step {steps[-1]}) is untouched'
      if steps
      else 'there is no complete checkpoint yet'
    )
    return SaveError(
      f'saving checkpoint step {step} in {self.directory} failed: {_reason(error)}{space}. Its '
      f'partial files were removed and {kept}: '
      f'{"free some space" if _is_full(error) else "fix the cause"}, then rerun the same command '
      'to resume.'
    )

  def discard_partial(self, step: int | None = None) -> list[epath.Path]:
    """Removes what an unfinished save of ``step`` (None: of any step) left behind.

    Orbax's temporary directories (``<step>.orbax-checkpoint-tmp...``) and, on file systems
    where orbax writes in place, a step directory it never finalized. Process 0 only; call
    it only while holding the workdir's lock (another run's save in flight looks the same).

    Returns:
      The paths found (and removed, as far as they could be).
    """
    if self.read_only or jax.process_index() > 0 or not self.directory.is_dir():
      return []
    finished = set(self.manager.all_steps())
    removed = []
    for entry in self.directory.iterdir():
      name = entry.name
      number = name.split('.')[0]
      if not number.isdigit() or (step is not None and int(number) != step):
        continue
      if PARTIAL_MARK in name or (name.isdigit() and int(name) not in finished):
        _remove(entry)
        removed.append(entry)
    return removed

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest intact checkpoint into the structure of ``target``.

    An unreadable step is set aside (so training can save that step again) or, read-only,
    left where it is; either way the next older one is tried. The moving average
    (:data:`EMA`) is restored when the checkpoint has one, whether ``target`` has it or not
    (it has the structure of ``params``), and is absent from the result otherwise.

    Args:
      target: the pytree (state dict) to restore into; its shapes are checked first.

    Returns:
      ``(state, meta, step)``, or None when there is no checkpoint.

    Raises:
      CheckpointMismatchError: the checkpoint's parameters differ in shape from ``target``'s.
      CheckpointError: there are checkpoints and none can be read.
    """
    steps = self.steps()
    for step in reversed(steps):
      try:
        restored = self._restore(step, target)
      except CheckpointMismatchError:
        raise
      except Exception as error:  # noqa: BLE001  (any unreadable step: fall back, delete nothing)
        kept = self.directory / str(step) if self.read_only else self._set_aside(step)
        logging.warning(
          'Checkpoint step %d is unreadable (%s); kept at %s (nothing deleted), trying an older '
          'one.',
          step,
          _reason(error),
          kept,
        )
        continue
      if step != steps[-1]:
        logging.warning('Resumed from step %d, the newest intact checkpoint.', step)
      return restored
    if steps:
      raise CheckpointError(
        f'none of the checkpoints {steps} in {self.directory} could be read (set aside in '
        f'{self.directory.parent / UNREADABLE}); fix or remove them, or use a new --workdir.'
      )
    return None

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any], int]:
    """Restores checkpoint ``step`` (like :meth:`restore_latest`, without falling back).

    Raises:
      CheckpointMismatchError: its parameters differ in shape from ``target``'s.
      CheckpointError: there is no such step, or it cannot be read (one line).
    """
    steps = self.steps()
    if step not in steps:
      raise CheckpointError(
        f'{self.directory} has no checkpoint of step {step} (it has {steps or "none"}).'
      )
    try:
      return self._restore(step, target)
    except CheckpointMismatchError:
      raise
    except Exception as error:  # noqa: BLE001  one line, whatever broke
      raise CheckpointError(
        f'checkpoint {self.directory / str(step)} cannot be read ({_reason(error)}).'
      ) from None

  def _restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any], int]:
    stored = self._stored(step)
    target = _with_stored_ema(target, stored)
    self._check_shapes(step, target, stored)
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()
      ),
    )
    return restored['state'], dict(restored['meta']), step

  def _set_aside(self, step: int) -> epath.Path:
    """Moves an unreadable step out of orbax's way, so it is neither reused nor deleted.

    A rename, or where ``checkpoints/`` is on another file system than the workdir, a copy
    then a delete. If even the copy fails (no space), the step stays where it is and is
    skipped; a later save of the same step then stops with a :class:`SaveError`.
    """
    source = self.directory / str(step)
    target = self.directory.parent / UNREADABLE / str(step)
    if jax.process_index() == 0:
      suffix = 0
      while target.exists():
        suffix += 1
        target = self.directory.parent / UNREADABLE / f'{step}.{suffix}'
      target.parent.mkdir(parents=True, exist_ok=True)
      try:
        source.rename(target)
      except OSError:
        try:
          _copy_tree(source, target)
          source.rmtree()
        except OSError as error:
          if target.exists():
            target.rmtree()
          logging.warning(
            'Could not set aside the unreadable step %s (%s); it stays where it is.',
            source,
            error,
          )
          target = source
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set_aside_{step}')
    self.manager.reload()
    return target

  def _stored(self, step: int) -> Any:
    """The stored tree of ``step`` (array metadata as nested dicts), or None if unreadable."""
    try:
      stored = self.manager.item_metadata(step)['state']
    except Exception:  # noqa: BLE001  unreadable metadata: the restore reports it.
      return None
    if stored is None:
      return None
    return _to_plain(getattr(stored, 'tree', stored))

  def _check_shapes(self, step: int, target: dict[str, Any], stored: Any) -> None:
    """Compares stored array shapes with ``target``'s from metadata, before reading data."""
    if stored is None:
      return
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


def _with_stored_ema(target: dict[str, Any], stored: Any) -> dict[str, Any]:
  """``target`` with the moving average exactly when the stored checkpoint has one."""
  if not isinstance(stored, dict) or not isinstance(target, dict) or 'params' not in target:
    return target
  target = {k: v for k, v in target.items() if k != EMA}
  if EMA in stored:
    target[EMA] = target['params']
  return target


def _reason(error: BaseException) -> str:
  """What went wrong, in a few words: the OS error when there is one (``No space left on
  device (errno 28)``), else the exception's first line."""
  if isinstance(error, OSError) and error.errno:
    where = f' ({error.filename})' if error.filename else ''
    return f'{error.strerror or os.strerror(error.errno)} (errno {error.errno}){where}'
  text = str(error).strip()
  # TensorStore (under orbax) reports an OS error as "... [os_error_code='28']".
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return f'{os.strerror(int(code.group(1)))} (errno {code.group(1)})'
  text = text.splitlines()[0][:300] if text else ''
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def _is_full(error: BaseException) -> bool:
  return getattr(error, 'errno', None) == errno.ENOSPC or "os_error_code='28'" in str(error)


def _to_plain(tree: Any) -> Any:
  """Nested dicts (lists become dicts keyed by index), comparable to a state dict."""
  if isinstance(tree, dict):
    return {k: _to_plain(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, 'shape'):
    return {str(i): _to_plain(v) for i, v in enumerate(tree)}
  return tree

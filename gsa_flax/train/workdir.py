"""A run's workdir as a ledger with one writer: its paths, its lock and its record.

- **The lock** (``<workdir>/lock.json``, naming host, pid and start time of the run that
  holds it): on a local disk an ``fcntl.flock`` that the kernel releases when the process
  dies, on a cloud file system (``gs://``) a :class:`Lease` that expires unless its holder
  renews it, so a preempted VM cannot hold a workdir for ever. A second run refuses to
  start and writes nothing.
- **The record**: ``config.json`` is written once, when a run starts from scratch. A
  restart compares its config with it and refuses a change to a field that changes what is
  trained unless the field is listed in ``config.allow_config_changes``; an accepted change
  is appended to ``config_history.jsonl`` (time, step, old and new values) and written into
  ``config.json``. Fields that do not change what is trained (intervals, eval settings,
  ``data_dir``, ``init_from``) may differ freely and are not recorded.

What the record's fields mean is the trainer's to say (:class:`RecordRules`: which fields a
restart may change, how a record is checked), so the ledger imports no model. The
checkpoints under ``<workdir>/checkpoints`` are :mod:`gsa_flax.train.checkpoints`'s. Every
path goes through ``etils.epath``, so a workdir on ``gs://`` works like a local one.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from gsa_flax import errors


class WorkdirError(errors.UserError):
  """A workdir cannot be used as it is (the message says why and what to do)."""


class WorkdirBusyError(WorkdirError):
  """Another run holds the workdir."""


class ConfigChangedError(WorkdirError):
  """A restart's config differs from the run's record in what is trained."""


CONFIG_FILE = 'config.json'
HISTORY_FILE = 'config_history.jsonl'
LOCK_FILE = 'lock.json'


@dataclasses.dataclass(frozen=True)
class RecordRules:
  """What the ledger needs to know of the config's fields.

  Attributes:
    free_fields: dotted names of the fields that do not change what is trained (a restart
      may change them; a record may lack them).
    check: raises ``ValueError`` (one line, naming the field) for a record that is not a
      usable config.
    allowed_changes: the fields a config accepts changes of (its
      ``allow_config_changes``).
  """

  free_fields: frozenset[str]
  check: Callable[[ml_collections.ConfigDict], None]
  allowed_changes: Callable[[ml_collections.ConfigDict], list[str]]


def is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` is on a cloud file system (``gs://``, ``s3://``) rather than a local disk."""
  return str(path).startswith(('gs://', 's3://'))


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as an ``epath.Path``, absolute if local (orbax requires absolute paths)."""
  return epath.Path(workdir if is_remote(workdir) else os.path.abspath(workdir))


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """``<workdir>/checkpoints``."""
  return workdir_path(workdir) / 'checkpoints'


def has_checkpoints(workdir: str | os.PathLike) -> bool:
  """Whether ``<workdir>/checkpoints`` holds a step directory (readable or not)."""
  directory = checkpoint_dir(workdir)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_workdir(workdir: str | os.PathLike, *, evaluate_only: bool = False) -> None:
  """Checks that a run can use ``workdir``, before anything is compiled.

  Args:
    workdir: the ``--workdir``.
    evaluate_only: the run only evaluates (``config.eval_only``): the workdir must hold a
      checkpoint, and nothing is created. Otherwise a local workdir is created if missing
      and must be writable.

  Raises:
    WorkdirError: it cannot be written (the message names ``--workdir``).
    WorkdirError: ``evaluate_only`` and there is no checkpoint to evaluate.
  """
  if evaluate_only:
    directory = checkpoint_dir(workdir)
    if not has_checkpoints(workdir):
      raise WorkdirError(
        f'config.eval_only=True, but {workdir} holds no checkpoint ({directory}): train first, '
        'or pass the --workdir of a training run.'
      )
    return
  if is_remote(workdir):
    return  # permission errors surface on the first write
  path = workdir_path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test'):
      pass
  except OSError as error:
    raise WorkdirError(
      f'--workdir={workdir} cannot be written ({error.strerror}); choose a directory you can write.'
    ) from None


# ----------------------------------------------------------------------------- one writer


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def _this_run() -> dict[str, Any]:
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'started': _now()}


def _read_holder(path: epath.Path) -> dict[str, Any] | None:
  """The holder a lock file names, or None if it names none (absent, empty, damaged)."""
  try:
    holder = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _busy(workdir: epath.Path, holder: dict[str, Any] | None, lease: str = '') -> WorkdirBusyError:
  if holder is None:
    who = 'another run'
  else:
    who = (
      f'another run (host {holder.get("host", "?")}, pid {holder.get("pid", "?")}, started '
      f'{holder.get("started", "?")}{lease})'
    )
  return WorkdirBusyError(
    f'{workdir} is in use by {who}: wait for it to end or stop it, or use another --workdir.'
  )


class FileLock:
  """The lock of a workdir on a local disk: ``fcntl.flock`` on ``<workdir>/lock.json``.

  The kernel releases it when the holding process ends, however it ends (``kill -9``
  included), so it never needs breaking. The file names the holder (host, pid, start
  time) for the message of a run that is refused; it stays after the run.

  Args:
    workdir: a local workdir (it must exist).
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = workdir_path(workdir)
    self.path = self.workdir / LOCK_FILE
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock or raises :class:`WorkdirBusyError` naming the holder."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      raise _busy(self.workdir, _read_holder(self.path)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_this_run()).encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> FileLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


class Lease:
  """A lock that expires, on any file system ``etils.epath`` reaches (``gs://`` included).

  The holder writes ``{host, pid, started, token, expires}`` to ``path`` and a background
  thread rewrites it every ``seconds / 3`` with a new expiry. Another run may take the
  lease once it has expired, so a holder that died without releasing it (a preempted VM)
  blocks the workdir for at most ``seconds``. Object stores offer no atomic
  create-if-absent through ``epath``: two runs starting within ``settle`` seconds of each
  other both write, and the one whose token is not read back after ``settle`` seconds
  steps back.

  Args:
    path: the lease file.
    seconds: how long a lease lasts without renewal.
    settle: seconds between writing the lease and reading it back.
  """

  def __init__(self, path: epath.PathLike, *, seconds: float = 300.0, settle: float = 2.0):
    self.path = epath.Path(path)
    self.seconds = seconds
    self.settle = settle
    self.token = uuid.uuid4().hex
    self._holder = dict(_this_run(), token=self.token)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def holder(self) -> dict[str, Any] | None:
    """Who holds the lease now: the file's content while it has not expired, else None."""
    holder = _read_holder(self.path)
    if holder is None or not isinstance(holder.get('expires'), (int, float)):
      return None
    return holder if holder['expires'] > time.time() else None

  def acquire(self) -> None:
    """Takes the lease, or raises :class:`WorkdirBusyError` naming its holder."""
    holder = self.holder()
    if holder is not None and holder.get('token') != self.token:
      raise self._refusal(holder)
    self.renew()
    if self.settle:
      time.sleep(self.settle)
    holder = self.holder()
    if holder is None or holder.get('token') != self.token:
      raise self._refusal(holder)
    self._stop.clear()
    self._thread = threading.Thread(target=self._keep_renewing, name='lease', daemon=True)
    self._thread.start()

  def renew(self) -> None:
    """Writes the lease with an expiry ``seconds`` from now."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(dict(self._holder, expires=time.time() + self.seconds)))

  def release(self) -> None:
    """Stops renewing and removes the lease if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    holder = _read_holder(self.path)
    if holder is not None and holder.get('token') == self.token:
      self.path.unlink()

  def _keep_renewing(self) -> None:
    while not self._stop.wait(self.seconds / 3):
      try:
        holder = _read_holder(self.path)
        if holder is not None and holder.get('token') != self.token:
          # Not renewed in time (a stalled process): another run took the workdir.
          logging.error(
            'The lease %s was taken by host %s, pid %s: this run no longer holds its workdir.',
            self.path,
            holder.get('host'),
            holder.get('pid'),
          )
          return
        self.renew()
      except Exception as error:  # noqa: BLE001  a renewal may fail; the next one retries.
        logging.warning('Could not renew the lease %s: %s', self.path, error)

  def _refusal(self, holder: dict[str, Any] | None) -> WorkdirBusyError:
    expires = ''
    if holder is not None:
      when = datetime.datetime.fromtimestamp(holder['expires']).astimezone()
      expires = f'; its lease expires at {when.isoformat(timespec="seconds")} unless renewed'
    return _busy(self.path.parent, holder, expires)

  def __enter__(self) -> Lease:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def lock(workdir: str | os.PathLike) -> FileLock | Lease:
  """The lock of ``workdir`` (a context manager): a :class:`FileLock` on a local disk, a
  :class:`Lease` on a cloud file system."""
  if is_remote(workdir):
    return Lease(workdir_path(workdir) / LOCK_FILE)
  return FileLock(workdir)


# ----------------------------------------------------------------------------- the record


def _write_atomically(path: epath.Path, text: str) -> None:
  partial = path.parent / f'.{path.name}.partial'
  partial.write_text(text)
  partial.replace(path)


def write_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Writes ``config`` as the run's record, ``<workdir>/config.json`` (process 0 only)."""
  if jax.process_index() == 0:
    path = workdir_path(workdir) / CONFIG_FILE
    _write_atomically(path, json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))


def has_config(workdir: str | os.PathLike) -> bool:
  """Whether the workdir holds a record (``config.json``)."""
  return (workdir_path(workdir) / CONFIG_FILE).exists()


def read_config(workdir: str | os.PathLike, rules: RecordRules) -> ml_collections.ConfigDict:
  """The config a run recorded in ``<workdir>/config.json``, checked field by field.

  Every field must be present (except those a restart may change freely, which a record
  may lack), of its type and in range (``rules.check``), so a damaged file is one clear
  error rather than a crash where a field is first used.

  Raises:
    WorkdirError: no such workdir or file, or a file that is not a usable record (not
      JSON, not an object, a field missing or of the wrong type), naming the field.
  """
  root = workdir_path(workdir)
  path = root / CONFIG_FILE
  if not root.is_dir():
    raise WorkdirError(f'workdir {workdir} does not exist; pass the --workdir of a training run.')
  if not path.exists():
    raise WorkdirError(
      f'{path} is missing: {workdir} is not a training workdir (main.py writes it).'
    )
  fix = (
    'restore it from a copy (every checkpoint keeps one, under "config" in '
    f'{checkpoint_dir(workdir)}/<step>/meta/metadata) or use a new --workdir.'
  )
  try:
    value = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as error:
    raise WorkdirError(f'{path} is not valid JSON ({error}); {fix}') from None
  if not isinstance(value, dict):
    raise WorkdirError(f'{path} holds a JSON {type(value).__name__}, not a config object; {fix}')
  config = ml_collections.ConfigDict(value)
  try:
    rules.check(config)
  except ValueError as error:
    raise WorkdirError(f'{path} is not a usable record ({str(error).rstrip(".")}); {fix}') from None
  return config


_ABSENT = '(absent)'


def _flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """``{'gsa.num_heads': 4, ...}`` with JSON values (tuples as lists), for comparing."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = json.loads(json.dumps(value, default=str))
  return flat


def changed_fields(
  record: ml_collections.ConfigDict, config: ml_collections.ConfigDict, free_fields: frozenset[str]
) -> dict[str, tuple[Any, Any]]:
  """The fields that change what is trained and differ: ``{name: (recorded, new)}``.

  Fields of ``free_fields`` are left out; a field present on one side only is a
  change from or to ``'(absent)'``.
  """
  old, new = _flat(record.to_dict()), _flat(config.to_dict())
  changes = {}
  for name in sorted(old.keys() | new.keys()):
    if name in free_fields:
      continue
    before, after = old.get(name, _ABSENT), new.get(name, _ABSENT)
    if before != after:
      changes[name] = (before, after)
  return changes


def check_against_record(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike, rules: RecordRules
) -> dict[str, tuple[Any, Any]]:
  """Compares ``config`` with the run's record; returns the changes it is allowed to make.

  Returns:
    ``{name: (recorded, new)}`` for the fields listed in ``config.allow_config_changes``
    that differ (empty when nothing that is trained changed, or there is no record).

  Raises:
    ConfigChangedError: a field that changes what is trained differs and is not listed;
      one line naming every such field with both values.
    WorkdirError: the record is damaged (see :func:`read_config`).
  """
  if not has_config(workdir):
    return {}
  changes = changed_fields(read_config(workdir, rules), config, rules.free_fields)
  allowed = set(rules.allowed_changes(config))
  refused = [name for name in changes if name not in allowed]
  if refused:
    listed = ', '.join(
      f'{name} {json.dumps(changes[name][0])} -> {json.dumps(changes[name][1])}' for name in refused
    )
    raise ConfigChangedError(
      f'the config differs from {workdir_path(workdir) / CONFIG_FILE}, the record of this run, '
      f'in what is trained: {listed}. Rerun with the recorded values, use a new --workdir, or '
      f'accept the change with --config.allow_config_changes={",".join(refused)} (it is '
      f'recorded in {HISTORY_FILE}).'
    )
  return changes


def record_changes(
  workdir: str | os.PathLike, changes: dict[str, tuple[Any, Any]], step: int, rules: RecordRules
) -> None:
  """Appends accepted changes to ``config_history.jsonl`` and writes them into the record.

  Process 0 only. Each line of the history is ``{"time", "step", "changes": {name: {"old",
  "new"}}}``; ``step`` is the step the run resumes from.
  """
  if not changes or jax.process_index() > 0:
    return
  root = workdir_path(workdir)
  entry = {
    'time': _now(),
    'step': step,
    'changes': {name: {'old': old, 'new': new} for name, (old, new) in changes.items()},
  }
  history = root / HISTORY_FILE
  previous = history.read_text() if history.exists() else ''
  _write_atomically(history, previous + json.dumps(entry, sort_keys=True) + '\n')
  record = read_config(workdir, rules).to_dict()
  for name, (_, new) in changes.items():
    *parents, leaf = name.split('.')
    target = record
    for parent in parents:
      target = target.setdefault(parent, {})
    if new == _ABSENT:
      target.pop(leaf, None)
    else:
      target[leaf] = new
  _write_atomically(root / CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True))

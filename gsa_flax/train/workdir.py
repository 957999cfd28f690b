"""A run's workdir as a ledger with one writer: its paths, its lock and its record.

- **The lock** (``<workdir>/lock.json``, naming host, pid and start time of the run that
  holds it): on a local disk an ``fcntl.flock`` of the workdir that the kernel releases
  when the process dies, on a cloud file system (``gs://``) a :class:`Lease` that expires
  unless its holder renews it, so a preempted VM cannot hold a workdir for ever. A second
  run refuses to start and writes nothing. Every file here is written whole
  (:mod:`gsa_flax.files`), never through a symbolic link.
- **The record**: ``config.json`` is written once, when a run starts from scratch. A
  restart compares its config with it and refuses a change to a field that changes what is
  trained unless the field is listed in ``config.allow_config_changes``; an accepted change
  is appended to ``config_history.jsonl`` (time, step, old and new values) and written into
  ``config.json``. Fields that do not change what is trained (intervals, eval settings,
  ``data_dir``, ``init_from``) may differ freely and are not recorded. A record is read as
  this code knows it: keys it does not know are reported once and ignored, fields added
  after it was written take the values runs had before them (:class:`RecordRules`).

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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from gsa_flax import errors, files


class WorkdirError(errors.UserError):
  """A workdir cannot be used as it is (the message says why and what to do)."""


class WorkdirBusyError(WorkdirError):
  """Another run holds the workdir."""


class ConfigChangedError(WorkdirError):
  """A restart's config differs from the run's record in what is trained."""


CONFIG_FILE = 'config.json'
HISTORY_FILE = 'config_history.jsonl'
LOCK_FILE = 'lock.json'
# The largest record and lock file read: anything larger is not one.
MAX_RECORD_BYTES = 16 * files.MiB


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
    fields: dotted names of every field this code knows; a record's other keys (written by
      another version, or by hand) are reported once and ignored. Empty: keep every key.
    defaults: the values of fields that a record written before they existed lacks (what
      such a run trained with); a record lacking one takes it, with a log line.
  """

  free_fields: frozenset[str]
  check: Callable[[ml_collections.ConfigDict], None]
  allowed_changes: Callable[[ml_collections.ConfigDict], list[str]]
  fields: frozenset[str] = frozenset()
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


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
  if path.exists() and not path.is_dir():
    raise WorkdirError(f'--workdir={workdir} is not a directory; choose a directory.')
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
    holder = json.loads(files.read_bytes(path, limit=MAX_RECORD_BYTES, what='a lock file'))
  except (OSError, ValueError):  # files.FileError is a ValueError
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
  """The lock of a workdir on a local disk: ``fcntl.flock`` on the workdir itself.

  The kernel releases it when the holding process ends, however it ends (``kill -9``
  included), so it never needs breaking. ``<workdir>/lock.json`` names the holder (host,
  pid, start time) for the message of a run that is refused; it stays after the run. It is
  written like every file of the project (:func:`gsa_flax.files.write_atomically`): a
  ``lock.json`` that is a symbolic link (a workdir received from someone else), a directory
  or a FIFO is refused in one line and whatever it points to is left alone.

  Args:
    workdir: a local workdir (it must exist).
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = workdir_path(workdir)
    self.path = self.workdir / LOCK_FILE
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock or raises :class:`WorkdirBusyError` naming the holder.

    Raises:
      WorkdirBusyError: another run holds the workdir.
      gsa_flax.files.FileError: ``lock.json`` is a symbolic link, a directory or a FIFO.
      WorkdirError: the workdir cannot be written (read-only, no permission, full).
    """
    files.check_writable(self.path)
    try:
      # The directory, not lock.json: lock.json is replaced by a new file on each start,
      # and a lock held on the old file would not stop a run that opens the new one.
      fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
      raise WorkdirError(
        f'--workdir={self.workdir} cannot be opened ({error.strerror}); pass a directory.'
      ) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      raise _busy(self.workdir, _read_holder(self.path)) from None
    try:
      files.write_atomically(self.path, json.dumps(_this_run()))
    except files.FileError as error:
      os.close(fd)  # releases the lock
      raise WorkdirError(
        f'{error.path} {error.reason.split(";")[0]}: a run (eval_only too) writes its lock '
        'and TensorBoard events in the workdir; use a workdir you can write (copy the run '
        'there).'
      ) from None
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
    files.write_atomically(
      self.path, json.dumps(dict(self._holder, expires=time.time() + self.seconds))
    )

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


def write_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Writes ``config`` as the run's record, ``<workdir>/config.json`` (process 0 only)."""
  if jax.process_index() == 0:
    path = workdir_path(workdir) / CONFIG_FILE
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
    files.write_atomically(path, text)


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
    missing = 'does not exist' if not root.exists() else 'is not a directory'
    raise WorkdirError(f'workdir {workdir} {missing}; pass the --workdir of a training run.')
  if not path.exists():
    raise WorkdirError(
      f'{path} is missing: {workdir} is not a training workdir (main.py writes it).'
    )
  fix = (
    'restore it from a copy (every checkpoint keeps one, under "config" in '
    f'{checkpoint_dir(workdir)}/<step>/meta/metadata) or use a new --workdir.'
  )
  value = _read_record(path, fix)
  config = ml_collections.ConfigDict(_reconcile(path, value, rules))
  try:
    rules.check(config)
  except ValueError as error:
    raise WorkdirError(f'{path} is not a usable record ({str(error).rstrip(".")}); {fix}') from None
  return config


def _read_record(path: epath.Path, fix: str) -> dict[str, Any]:
  """The JSON object of ``config.json``, as written."""
  try:
    value = json.loads(files.read_bytes(path, limit=MAX_RECORD_BYTES, what='a config.json'))
  except files.FileError as error:
    raise WorkdirError(f'{error}; {fix}') from None
  except (ValueError, UnicodeDecodeError) as error:
    raise WorkdirError(f'{path} is not valid JSON ({error}); {fix}') from None
  if not isinstance(value, dict):
    raise WorkdirError(f'{path} holds a JSON {type(value).__name__}, not a config object; {fix}')
  return value


# (record, field) pairs already reported: a run reads its record several times.
_reported: set[tuple[str, str]] = set()


def _report_once(path: epath.Path, name: str, message: str, *args: Any) -> None:
  if (str(path), name) not in _reported:
    _reported.add((str(path), name))
    logging.warning(message, *args)


def _reconcile(path: epath.Path, record: dict[str, Any], rules: RecordRules) -> dict[str, Any]:
  """The record as this code reads it: keys it does not know dropped (each reported once),
  fields newer than the record given the value a run without them trained with."""
  flat = _flat(record)
  if rules.fields:
    for name in sorted(set(flat) - rules.fields):
      _report_once(
        path,
        name,
        '%s holds %s, which this gsa-flax does not know (a field of another version, or '
        'added by hand): ignored.',
        path,
        name,
      )
      del flat[name]
  for name, default in rules.defaults.items():
    if name not in flat:
      _report_once(
        path,
        name,
        '%s has no %s (written before the field existed): it takes the value runs had '
        'without it, %r.',
        path,
        name,
        default,
      )
      flat[name] = default
  nested: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split('.')
    target = nested
    for parent in parents:
      target = target.setdefault(parent, {})
    target[leaf] = value
  return nested


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
  previous = b''
  if history.exists():
    previous = files.read_bytes(history, limit=MAX_RECORD_BYTES, what='a config history')
  files.write_atomically(history, previous + (json.dumps(entry, sort_keys=True) + '\n').encode())
  read_config(workdir, rules)  # checked; the file's own keys are kept, unknown ones too
  record = _read_record(root / CONFIG_FILE, '')
  for name, (_, new) in changes.items():
    *parents, leaf = name.split('.')
    target = record
    for parent in parents:
      target = target.setdefault(parent, {})
    if new == _ABSENT:
      target.pop(leaf, None)
    else:
      target[leaf] = new
  files.write_atomically(root / CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True))
